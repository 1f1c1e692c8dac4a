//! Building the audit log's Merkle tree (RFC 6962): the writer's running [`Frontier`],
//! and inclusion and consistency proofs for `aegis audit export` and `aegis audit prove`.
//! Their checks live apart, in [`super::proof`].
//!
//! The builder never holds the tree: the writer keeps the frontier (the heads of the
//! perfect subtrees the leaves so far make, at most 64), and a proof asks for the heads of
//! the few leaf ranges it needs, which the caller computes by streaming those rows.

use super::Hash;
use super::proof::{empty_root, node_hash};

/// The heads of the perfect subtrees covering leaves `0..size`, largest first: what it
/// takes to append a leaf and to compute the tree head, in `O(log size)` memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a frontier from [`Frontier::to_bytes`]; `None` when the bytes cannot be
    /// the frontier of a tree of `size` leaves.
    pub fn from_bytes(size: u64, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 * size.count_ones() as usize {
            return None;
        }
        let nodes = bytes
            .chunks_exact(32)
            .map(|c| Hash::try_from(c).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(Self { size, nodes })
    }

    /// The subtree heads, concatenated, largest first.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.nodes.concat()
    }

    /// Leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            // The popped node is the left sibling of the subtree just completed.
            let Some(left) = self.nodes.pop() else { break };
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.nodes.push(h);
        self.size += 1;
    }

    /// The tree head of the leaves so far.
    pub fn root(&self) -> Hash {
        let mut nodes = self.nodes.iter().rev();
        let Some(last) = nodes.next() else {
            return empty_root();
        };
        nodes.fold(*last, |right, left| node_hash(left, &right))
    }
}

/// The tree head of `leaves`.
pub fn root_of(leaves: &[Hash]) -> Hash {
    let mut f = Frontier::new();
    for l in leaves {
        f.push(*l);
    }
    f.root()
}

/// The largest power of two below `n` (`n >= 2`): where RFC 6962 splits a tree of `n`.
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 6962 §2.1.1).
/// `range_root(lo, hi)` returns the head of leaves `lo..hi`.
pub fn inclusion_proof<E>(
    index: u64,
    size: u64,
    range_root: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    let mut proof = Vec::new();
    if index >= size {
        return Ok(proof);
    }
    let (mut lo, mut hi) = (0, size);
    // Collected top-down; the audit path lists siblings bottom-up.
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            proof.push(range_root(lo + k, hi)?);
            hi = lo + k;
        } else {
            proof.push(range_root(lo, lo + k)?);
            lo += k;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// The consistency proof from the tree of the first `first` leaves to the tree of the first
/// `second` (RFC 6962 §2.1.2); empty when `first` is 0 or not below `second`.
pub fn consistency_proof<E>(
    first: u64,
    second: u64,
    range_root: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E> {
    let mut proof = Vec::new();
    if first == 0 || first >= second {
        return Ok(proof);
    }
    // SUBPROOF(m, D[lo..hi], b), unrolled: each step keeps one side and records the other.
    let (mut m, mut lo, mut hi, mut whole) = (first, 0, second, true);
    while m != hi - lo {
        let k = split(hi - lo);
        if m <= k {
            proof.push(range_root(lo + k, hi)?);
            hi = lo + k;
        } else {
            proof.push(range_root(lo, lo + k)?);
            m -= k;
            lo += k;
            whole = false;
        }
    }
    if !whole {
        proof.push(range_root(lo, hi)?);
    }
    proof.reverse();
    Ok(proof)
}

/// [`inclusion_proof`] and [`consistency_proof`]'s `range_root` over leaves in memory; a
/// range past the leaves held is an error naming it.
pub fn slice_roots(leaves: &[Hash]) -> impl FnMut(u64, u64) -> Result<Hash, String> + '_ {
    |lo, hi| {
        usize::try_from(lo)
            .ok()
            .zip(usize::try_from(hi).ok())
            .and_then(|(lo, hi)| leaves.get(lo..hi))
            .map(root_of)
            .ok_or_else(|| format!("leaves {lo}..{hi}: only {} are held", leaves.len()))
    }
}

#[cfg(test)]
mod tests {
    //! The Certificate Transparency reference vectors (the leaves and tree heads of
    //! RFC 6962's reference implementation), then every proof of every tree up to 40
    //! leaves built here and checked by [`super::super::proof`], and mutated.
    use super::*;
    use crate::audit::proof::{leaf_hash, verify_consistency, verify_inclusion};

    fn h(s: &str) -> Hash {
        Hash::try_from(crate::unhex(s).expect("hex").as_slice()).expect("32 bytes")
    }

    fn ct_leaves() -> Vec<Hash> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|e| leaf_hash(&crate::unhex(e).expect("hex")))
        .collect()
    }

    const CT_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn tree_heads_match_the_rfc_6962_reference() {
        let leaves = ct_leaves();
        for (n, want) in CT_ROOTS.iter().enumerate() {
            assert_eq!(root_of(&leaves[..n]), h(want), "tree of {n} leaves");
        }
    }

    #[test]
    fn proofs_match_the_rfc_6962_reference() {
        let leaves = ct_leaves();
        let mut roots = slice_roots(&leaves);
        let inclusion = [
            (
                0,
                8,
                vec![
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                vec![
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (index, size, want) in inclusion {
            let want: Vec<Hash> = want.into_iter().map(h).collect();
            assert_eq!(inclusion_proof(index, size, &mut roots), Ok(want.clone()));
            let root = h(CT_ROOTS[size as usize]);
            assert!(verify_inclusion(
                index,
                size,
                &leaves[index as usize],
                &want,
                &root
            ));
        }
        let consistency = [
            (
                2,
                8,
                vec![
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                vec![
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (first, second, want) in consistency {
            let want: Vec<Hash> = want.into_iter().map(h).collect();
            assert_eq!(
                consistency_proof(first, second, &mut roots),
                Ok(want.clone())
            );
            let (a, b) = (h(CT_ROOTS[first as usize]), h(CT_ROOTS[second as usize]));
            assert!(verify_consistency(first, second, &a, &b, &want));
        }
    }

    fn many(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// The ways a proof gets mangled; each must be refused.
    fn mutations(proof: &[Hash]) -> Vec<(&'static str, Vec<Hash>)> {
        let mut out = Vec::new();
        if let Some(last) = proof.len().checked_sub(1) {
            let mut flipped = proof.to_vec();
            flipped[last][7] ^= 1;
            out.push(("flipped-byte", flipped));
            out.push(("truncated", proof[..last].to_vec()));
        }
        if proof.len() >= 2 && proof[0] != proof[1] {
            let mut swapped = proof.to_vec();
            swapped.swap(0, 1);
            out.push(("swapped-siblings", swapped));
        }
        let mut extended = proof.to_vec();
        extended.push([0xab; 32]);
        out.push(("extended", extended));
        out
    }

    #[test]
    fn every_inclusion_proof_verifies_and_no_mutation_does() {
        let leaves = many(40);
        let mut roots = slice_roots(&leaves);
        for size in 1..=40u64 {
            let root = root_of(&leaves[..size as usize]);
            for i in 0..size {
                let leaf = &leaves[i as usize];
                let proof = inclusion_proof(i, size, &mut roots).expect("proof");
                assert!(verify_inclusion(i, size, leaf, &proof, &root), "{i}/{size}");
                for (name, bad) in mutations(&proof) {
                    assert!(
                        !verify_inclusion(i, size, leaf, &bad, &root),
                        "{name} {i}/{size}"
                    );
                }
                let other = &leaves[((i + 1) % 40) as usize];
                assert!(
                    !verify_inclusion(i, size, other, &proof, &root),
                    "other leaf {i}/{size}"
                );
                if size > 1 {
                    let j = (i + 1) % size;
                    assert!(
                        !verify_inclusion(j, size, leaf, &proof, &root),
                        "wrong index {i}/{size}"
                    );
                }
            }
            assert!(!verify_inclusion(size, size, &leaves[0], &[], &root));
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_no_mutation_does() {
        let leaves = many(40);
        let mut roots = slice_roots(&leaves);
        let head = |n: u64| root_of(&leaves[..n as usize]);
        for second in 0..=40u64 {
            for first in 0..=second {
                let (a, b) = (head(first), head(second));
                let proof = consistency_proof(first, second, &mut roots).expect("proof");
                assert!(
                    verify_consistency(first, second, &a, &b, &proof),
                    "{first}->{second}"
                );
                if first == 0 || first == second {
                    continue;
                }
                for (name, bad) in mutations(&proof) {
                    assert!(
                        !verify_consistency(first, second, &a, &b, &bad),
                        "{name} {first}->{second}"
                    );
                }
                // A rewritten first tree (one of its leaves changed) is not a prefix.
                let mut rewritten = leaves[..first as usize].to_vec();
                rewritten[0][0] ^= 1;
                assert!(!verify_consistency(
                    first,
                    second,
                    &root_of(&rewritten),
                    &b,
                    &proof
                ));
                assert!(!verify_consistency(second, first, &b, &a, &proof));
            }
        }
    }

    #[test]
    fn the_frontier_round_trips_and_refuses_a_wrong_shape() {
        let mut f = Frontier::new();
        for l in many(13) {
            f.push(l);
        }
        assert_eq!(f.root(), root_of(&many(13)));
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), 3 * 32, "13 = 8 + 4 + 1");
        assert_eq!(Frontier::from_bytes(13, &bytes), Some(f));
        assert_eq!(Frontier::from_bytes(12, &bytes), None);
        assert_eq!(Frontier::from_bytes(13, &bytes[..64]), None);
    }
}
