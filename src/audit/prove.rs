//! `aegis audit prove` and `aegis audit verify-proof`: one decision, proven without the log.
//!
//! A proof holds the decision's row (every field disclosed, with its salts), the newest
//! signed checkpoint (a witness line: tree size, chain head, tree head, signature), the
//! row's RFC 6962 audit path to that tree head, and optionally a consistency proof from an
//! earlier checkpoint (one a SIEM or witness already holds) to it. Whoever pins the audit
//! key checks all of it with a few hashes: the row is in the signed log, and the signed
//! log of today extends the one they saw before — nothing of it was cut or rewritten.

use std::collections::BTreeSet;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::bundle::BundleRow;
use super::export::{LogRanges, Secrets, bundle_row};
use super::merkle::{consistency_proof, inclusion_proof};
use super::proof::{leaf_hash, verify_consistency, verify_inclusion};
use super::verify::read_rows_between;
use super::witness::SignedCheckpoint;

/// The `schema` of a proof document.
pub const SCHEMA: &str = "aegis-audit-proof/1";

/// Everything needed to check that one decision is in the log: its row, a signed checkpoint, and
/// the row's audit path to it (`aegis audit prove`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    /// The proof format, [`SCHEMA`]; any other is refused.
    pub schema: String,
    /// The decision's row, every field disclosed.
    pub row: BundleRow,
    /// The newest signed checkpoint, as a witness line.
    pub checkpoint: String,
    /// The row's audit path to `checkpoint`'s tree head (hex, bottom-up).
    pub inclusion: Vec<String>,
    /// With `--from-size`: proof that the tree `checkpoint` signs extends an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
}

/// An earlier checkpoint and the proof that `checkpoint`'s tree extends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consistency {
    /// The earlier checkpoint, as a witness line.
    pub from: String,
    /// The consistency proof from its tree to `checkpoint`'s (hex hashes).
    pub proof: Vec<String>,
}

/// The first checkpoint with a tree head matching `tail` (more `WHERE` and an `ORDER BY`,
/// with `arg` as `?1`).
fn checkpoint(conn: &Connection, tail: &str, arg: i64) -> Result<Option<SignedCheckpoint>, String> {
    let sql = format!(
        "SELECT last_seq, head_hash, root, time_ns, key_id, signature FROM audit_checkpoint \
         WHERE root IS NOT NULL {tail} LIMIT 1"
    );
    let row = conn
        .query_row(&sql, [arg], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Vec<u8>>(5)?,
            ))
        })
        .optional()
        .map_err(|e| e.to_string())?;
    let Some((size, head, root, time_ns, key_id, sig)) = row else {
        return Ok(None);
    };
    let h32 = |v: Vec<u8>| <[u8; 32]>::try_from(v.as_slice()).ok();
    match (
        h32(head),
        h32(root),
        <[u8; 64]>::try_from(sig.as_slice()).ok(),
    ) {
        (Some(head), Some(root), Some(signature)) => Ok(Some(SignedCheckpoint {
            tree_size: size as u64,
            head,
            root,
            time_ns,
            key_id,
            signature,
        })),
        _ => Err(format!(
            "the checkpoint at seq {size} is malformed; run `aegis audit verify`"
        )),
    }
}

/// Builds the proof of the row of `decision_id`, against the newest checkpoint, with a
/// consistency proof from the checkpoint of tree size `from_size` if given.
pub fn prove(db: &Path, decision_id: &str, from_size: Option<u64>) -> Result<Proof, String> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", db.display()))?;
    if !super::verify::has_root_column(&conn).map_err(|e| e.to_string())? {
        return Err("this log has no signed tree heads yet (written before format 2)".into());
    }
    let seq: Option<i64> = conn
        .query_row(
            "SELECT min(seq) FROM audit_log WHERE decision_id = ?1",
            [decision_id],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    let seq = seq.ok_or_else(|| format!("no row with decision id {decision_id:?}"))?;
    let seq = u64::try_from(seq)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("row seq {seq} is not a log position; run `aegis audit verify`"))?;
    let newest = checkpoint(
        &conn,
        "AND last_seq >= ?1 ORDER BY last_seq DESC, id DESC",
        0,
    )?
    .ok_or("no checkpoint signs a tree head yet")?;
    if newest.tree_size < seq {
        return Err(format!(
            "row {seq} is not covered by a signed tree head yet (newest: {} rows)",
            newest.tree_size
        ));
    }
    let rows = read_rows_between(&conn, seq, seq).map_err(|e| e.to_string())?;
    let row = rows.first().ok_or_else(|| format!("row {seq} vanished"))?;
    let secrets = Secrets::new(BTreeSet::new()).map_err(|e| e.to_string())?;
    let row = bundle_row(row, true, &BTreeSet::new(), &secrets);
    let mut ranges = LogRanges::new(&conn).map_err(|e| e.to_string())?;
    let mut range_root = |lo, hi| ranges.root(lo, hi);
    let hexes = |v: Vec<[u8; 32]>| v.iter().map(|h| crate::hex(h)).collect::<Vec<_>>();
    let inclusion = inclusion_proof(seq - 1, newest.tree_size, &mut range_root)
        .map_err(|e| format!("reading the log: {e}; run `aegis audit verify`"))?;
    let consistency = match from_size {
        None => None,
        Some(m) => {
            let from = checkpoint(&conn, "AND last_seq = ?1", i64::try_from(m).unwrap_or(-1))?
                .ok_or_else(|| format!("no signed tree head of {m} rows"))?;
            let proof = consistency_proof(m, newest.tree_size, &mut range_root)
                .map_err(|e| format!("reading the log: {e}; run `aegis audit verify`"))?;
            Some(Consistency {
                from: from.to_line(),
                proof: hexes(proof),
            })
        }
    };
    Ok(Proof {
        schema: SCHEMA.into(),
        row,
        checkpoint: newest.to_line(),
        inclusion: hexes(inclusion),
        consistency,
    })
}

fn hashes(v: &[String]) -> Option<Vec<[u8; 32]>> {
    v.iter()
        .map(|h| crate::unhex(h).and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok()))
        .collect()
}

/// Whether the witness file `held` has a checkpoint of `cp`'s size, tree head and chain
/// head.
fn held_by(held: &Path, cp: &SignedCheckpoint) -> Result<bool, String> {
    for line in super::witness::read_file(held)? {
        let (_, seen) = line?;
        if seen.tree_size == cp.tree_size && seen.root == cp.root && seen.head == cp.head {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Checks a proof against the pinned `keys` and, for its consistency proof, against the
/// checkpoints the reader holds (`held`, a witness file): `Ok` says what it proves, `Err`
/// every problem. Without `held`, the earlier tree head is the one the proof supplies, so
/// the consistency proof is reported as unchecked: a thief of the key can make one.
pub fn check(p: &Proof, keys: &[VerifyingKey], held: Option<&Path>) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    if p.schema != SCHEMA {
        problems.push(format!("schema {:?} is not {SCHEMA:?}", p.schema));
    }
    let cp = match SignedCheckpoint::parse_line(&p.checkpoint) {
        Ok(cp) => cp,
        Err(e) => return Err(vec![format!("checkpoint: {e}")]),
    };
    if !cp.signed_by(keys) {
        problems.push(format!(
            "checkpoint: not signed by a pinned key (it names {})",
            cp.key_id
        ));
    }
    let seq = p.row.seq;
    match super::bundle::recompute(&p.row) {
        Ok(h) if crate::hex(&h) == p.row.hash => {}
        Ok(_) => problems.push(format!("row {seq}: its fields do not give its hash")),
        Err(e) => problems.push(format!("row {seq}: {e}")),
    }
    let included = match (
        hashes(&p.inclusion),
        hashes(std::slice::from_ref(&p.row.hash)),
    ) {
        (Some(path), Some(leaf)) => match leaf.as_slice() {
            [leaf] => {
                seq >= 1
                    && verify_inclusion(seq - 1, cp.tree_size, &leaf_hash(leaf), &path, &cp.root)
            }
            _ => false,
        },
        _ => false,
    };
    if !included {
        problems.push(format!(
            "row {seq}: its inclusion proof does not lead to the tree head of {} rows",
            cp.tree_size
        ));
    }
    let mut extends = String::new();
    if let Some(c) = &p.consistency {
        match SignedCheckpoint::parse_line(&c.from) {
            Err(e) => problems.push(format!("consistency.from: {e}")),
            Ok(from) => {
                if !from.signed_by(keys) {
                    problems.push("consistency.from: not signed by a pinned key".into());
                }
                let ok = hashes(&c.proof).is_some_and(|proof| {
                    verify_consistency(from.tree_size, cp.tree_size, &from.root, &cp.root, &proof)
                });
                let held = match held.map(|h| (h, held_by(h, &from))) {
                    None => None,
                    Some((_, Ok(found))) => Some(found),
                    Some((h, Err(e))) => {
                        problems.push(format!("{}: {e}", h.display()));
                        Some(false)
                    }
                };
                if ok && held == Some(false) {
                    problems.push(format!(
                        "consistency.from: the tree head of {} rows is not one of the checkpoints \
                         you hold: the log may have been rewritten and signed again",
                        from.tree_size
                    ));
                } else if ok {
                    extends = format!(
                        "; it extends the log of {} rows (tree head {}) signed at {}{}",
                        from.tree_size,
                        crate::hex(&from.root),
                        crate::time::rfc3339_nanos(from.time_ns),
                        if held.is_some() {
                            ", one of the checkpoints you hold"
                        } else {
                            ", as the proof names it: unchecked without --witness"
                        }
                    );
                } else {
                    problems.push(format!(
                        "consistency: the log of {} rows is not shown to extend the log of {} rows",
                        cp.tree_size, from.tree_size
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let decision_id = p
        .row
        .fields
        .get("decision_id")
        .and_then(|f| f.value.as_ref())
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    Ok(format!(
        "decision {decision_id} is row {seq} of the log of {} rows signed by {} at {}{extends}",
        cp.tree_size,
        cp.key_id,
        crate::time::rfc3339_nanos(cp.time_ns)
    ))
}
