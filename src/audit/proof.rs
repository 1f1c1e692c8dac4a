//! Checking Merkle proofs over the audit log (RFC 6962 / RFC 9162 §2.1), apart from the
//! code that builds them ([`super::merkle`]): a verifier shares nothing with the builder
//! but these hash definitions, so a bug in one cannot hide in the other.
//!
//! The log's leaves are its rows, in `seq` order: leaf `i` (0-based) is row `i + 1`, and
//! its leaf hash is `SHA-256(0x00 || row hash)`. A tree head of size `n` covers rows
//! `1..=n`. Interior nodes are `SHA-256(0x01 || left || right)`, the empty tree's head is
//! `SHA-256("")`, exactly as in Certificate Transparency, so any RFC 6962 verifier checks
//! Aegis's proofs.

use sha2::{Digest, Sha256};

use super::Hash;

/// The head of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A leaf's hash: `SHA-256(0x00 || entry)`; the entry is a row's hash.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// An interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Whether `proof` shows the leaf `leaf` at 0-based `index` in the tree of `size` leaves
/// whose head is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

/// Whether `proof` shows that the tree of `first` leaves with head `first_root` is a prefix
/// of the tree of `second` leaves with head `second_root` (RFC 9162 §2.1.4.2): nothing of
/// the first was changed or dropped, only leaves appended.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        return proof.is_empty() && *first_root == empty_root();
    }
    let Some((head, rest)) = proof.split_first() else {
        return false;
    };
    // When the first tree is a perfect subtree its head is the proof's implicit first node.
    let (seed, rest) = if first.is_power_of_two() {
        (first_root, proof)
    } else {
        (head, rest)
    };
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    for c in rest {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    fr == *first_root && sr == *second_root && sn == 0
}
