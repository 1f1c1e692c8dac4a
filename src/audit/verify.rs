//! `aegis audit verify`: walks the chain and the signed checkpoints and reports the first
//! row where either breaks, and how: modified, deleted, inserted or reordered.
//!
//! How each is told apart (rows read in `seq` order):
//! - **modified**: a row in its place (expected `seq`, `prev_hash` links) whose contents
//!   no longer hash to its stored hash; or, if the attacker recomputed the hashes, a
//!   signed checkpoint whose head hash no longer matches (reported as the first row of
//!   that checkpoint's range);
//! - **deleted**: a gap in `seq`, a row whose `prev_hash` is no stored row's hash, or a
//!   checkpoint past the last row (truncated tail);
//! - **inserted**: a row after which the chain continues from the row *before* it, or
//!   rows past the last signed checkpoint;
//! - **reordered**: a row whose `prev_hash` is the hash of a row stored *after* it.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, VerifyingKey};
use rusqlite::Connection;

use super::{GENESIS, Hash, Record, Salt, checkpoint_message, hash_row};

/// How the log was tampered with, at the first bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    Modified,
    Deleted,
    Inserted,
    Reordered,
    /// A checkpoint's signature does not verify (or its key is unknown).
    BadSignature,
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tamper::Modified => "modified",
            Tamper::Deleted => "deleted",
            Tamper::Inserted => "inserted",
            Tamper::Reordered => "reordered",
            Tamper::BadSignature => "bad signature",
        })
    }
}

/// The first bad row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Sequence number of the first bad row.
    pub seq: u64,
    pub kind: Tamper,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "row {}: {} ({})", self.seq, self.kind, self.detail)
    }
}

/// An intact log's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub checkpoints: u64,
    pub head: Hash,
}

/// The verifier could not read the log at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read audit database {path}: {message}")]
    Read { path: String, message: String },
}

/// A stored row.
pub(crate) struct Row {
    pub(crate) seq: u64,
    pub(crate) record: Record,
    /// `None` for a format 1 row (written before salts).
    pub(crate) salt: Option<Salt>,
    pub(crate) key_id: String,
    pub(crate) prev: Hash,
    pub(crate) hash: Hash,
}

impl Row {
    /// The hash its contents give.
    fn content_hash(&self, seq: u64) -> Hash {
        hash_row(
            seq,
            &self.record,
            self.salt.as_ref(),
            &self.key_id,
            &self.prev,
        )
    }
}

struct Checkpoint {
    last_seq: u64,
    head: Hash,
    time_ns: i64,
    key_id: String,
    signature: Vec<u8>,
}

/// Verifies the audit database at `path` against the trusted `keys`.
pub fn verify_file(
    path: &Path,
    keys: &[VerifyingKey],
) -> Result<Result<Summary, Finding>, VerifyError> {
    let read_err = |e: rusqlite::Error| VerifyError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if !path.exists() {
        return Err(VerifyError::Read {
            path: path.display().to_string(),
            message: "no such file".into(),
        });
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(read_err)?;
    let rows = read_rows(&conn).map_err(read_err)?;
    let checkpoints = read_checkpoints(&conn).map_err(read_err)?;
    Ok(verify(&rows, &checkpoints, keys))
}

fn blob32(v: Vec<u8>) -> Hash {
    // A wrong-sized blob is itself tampering: it can never equal a real hash.
    Hash::try_from(v.as_slice()).unwrap_or([0xff; 32])
}

fn read_rows(conn: &Connection) -> rusqlite::Result<Vec<Row>> {
    read_rows_between(conn, 0, u64::MAX)
}

/// Whether `audit_log` has the `salt` column (a database no writer has opened since
/// format 2 does not; `aegis audit verify` opens it read-only, without upgrading it).
pub(crate) fn has_salt_column(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stmt =
        conn.prepare("SELECT 1 FROM pragma_table_info('audit_log') WHERE name = 'salt'")?;
    stmt.exists([])
}

/// Rows with `from <= seq <= to`, in `seq` order.
pub(crate) fn read_rows_between(
    conn: &Connection,
    from: u64,
    to: u64,
) -> rusqlite::Result<Vec<Row>> {
    let sql = if has_salt_column(conn)? {
        concat!(
            "SELECT ",
            super::audit_columns!(),
            ", salt FROM audit_log WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq"
        )
    } else {
        concat!(
            "SELECT ",
            super::audit_columns!(),
            ", NULL FROM audit_log WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq"
        )
    };
    let mut stmt = conn.prepare(sql)?;
    let from = i64::try_from(from).unwrap_or(i64::MAX);
    let to = i64::try_from(to).unwrap_or(i64::MAX);
    let rows = stmt.query_map([from, to], |r| {
        Ok(Row {
            seq: r.get::<_, i64>(0)? as u64,
            record: Record {
                time_ns: r.get(1)?,
                http_status: r.get(2)?,
                kind: r.get(3)?,
                decision_id: r.get(4)?,
                tenant: r.get(5)?,
                agent: r.get(6)?,
                session: r.get(7)?,
                run_id: r.get(8)?,
                tool: r.get(9)?,
                action: r.get(10)?,
                resource: r.get(11)?,
                decision: r.get(12)?,
                reason: r.get(13)?,
                policy_revision: r.get(14)?,
                trust_level: r.get(15)?,
                approval_id: r.get(16)?,
                actor: r.get(17)?,
                trace_id: r.get(18)?,
                span_id: r.get(19)?,
            },
            key_id: r.get(20)?,
            prev: blob32(r.get(21)?),
            hash: blob32(r.get(22)?),
            salt: r.get::<_, Option<Vec<u8>>>(23)?.map(blob32),
        })
    })?;
    rows.collect()
}

fn read_checkpoints(conn: &Connection) -> rusqlite::Result<Vec<Checkpoint>> {
    let mut stmt = conn.prepare(
        "SELECT last_seq, head_hash, time_ns, key_id, signature FROM audit_checkpoint ORDER BY id",
    )?;
    let cps = stmt.query_map([], checkpoint_from_row)?;
    cps.collect()
}

/// A checkpoint from a row of `SELECT last_seq, head_hash, time_ns, key_id, signature`.
fn checkpoint_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        last_seq: r.get::<_, i64>(0)? as u64,
        head: blob32(r.get(1)?),
        time_ns: r.get(2)?,
        key_id: r.get(3)?,
        signature: r.get(4)?,
    })
}

/// What [`verify_tail`] found: the head to continue the chain from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    pub seq: u64,
    pub hash: Hash,
}

/// Checks the end of the log before a writer continues it: the last two checkpoints'
/// signatures, and every row after the second-to-last checkpoint re-hashed and re-linked
/// up to the last checkpoint's head, with nothing after it. The work is one commit's rows,
/// whatever the log's size, so it runs at every start-up; a torn or garbled tail, rows
/// no checkpoint covers, or a forged checkpoint is a [`Finding`], never continued from.
pub fn verify_tail(
    conn: &Connection,
    keys: &[VerifyingKey],
) -> Result<Result<Tail, Finding>, rusqlite::Error> {
    let mut stmt = conn.prepare(
        "SELECT last_seq, head_hash, time_ns, key_id, signature FROM audit_checkpoint ORDER BY id DESC LIMIT 2",
    )?;
    let mut cps: Vec<Checkpoint> = stmt
        .query_map([], checkpoint_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    cps.reverse();
    // The previous checkpoint's row anchors the tail's chain; with one checkpoint or
    // none, the chain starts at genesis.
    let start = match cps.as_slice() {
        [prev, _] => prev.last_seq,
        _ => 0,
    };
    let mut rows = read_rows_between(conn, start, u64::MAX)?;
    let anchor = if start == 0 {
        GENESIS
    } else {
        match rows.first() {
            Some(r) if r.seq == start && r.hash == cps[0].head => rows.remove(0).hash,
            Some(r) if r.seq == start => {
                return Ok(Err(Finding {
                    seq: start,
                    kind: Tamper::Modified,
                    detail: format!("row {start} no longer matches the checkpoint that signs it"),
                }));
            }
            _ => {
                return Ok(Err(Finding {
                    seq: start,
                    kind: Tamper::Deleted,
                    detail: format!("the row checkpoint {start} signs is gone"),
                }));
            }
        }
    };
    if cps.is_empty() && !rows.is_empty() {
        return Ok(Err(Finding {
            seq: rows[0].seq,
            kind: Tamper::Inserted,
            detail: "rows exist but no signed checkpoint covers them".into(),
        }));
    }
    Ok(check_tail(&rows, start, anchor, &cps, keys))
}

/// The chain from (`start`, `anchor`) through `rows` must end exactly at the last of
/// `cps`, and every one of `cps` must be signed by a trusted key.
fn check_tail(
    rows: &[Row],
    start: u64,
    anchor: Hash,
    cps: &[Checkpoint],
    keys: &[VerifyingKey],
) -> Result<Tail, Finding> {
    let by_kid: HashMap<String, &VerifyingKey> =
        keys.iter().map(|k| (crate::keys::key_id(k), k)).collect();
    for cp in cps {
        if !signature_ok(cp, &by_kid) {
            return Err(Finding {
                seq: start + 1,
                kind: Tamper::BadSignature,
                detail: format!(
                    "checkpoint at seq {}: signature does not verify with a trusted key",
                    cp.last_seq
                ),
            });
        }
    }
    let (mut seq, mut prev) = (start, anchor);
    for r in rows {
        if r.seq != seq + 1 {
            return Err(Finding {
                seq: seq + 1,
                kind: Tamper::Deleted,
                detail: format!("row {} follows row {seq}", r.seq),
            });
        }
        if r.prev != prev || r.content_hash(r.seq) != r.hash {
            return Err(Finding {
                seq: r.seq,
                kind: Tamper::Modified,
                detail: "a torn or altered row: its contents or link do not match its hash".into(),
            });
        }
        seq = r.seq;
        prev = r.hash;
    }
    let Some(last) = cps.last() else {
        return Ok(Tail { seq, hash: prev });
    };
    if seq > last.last_seq {
        return Err(Finding {
            seq: last.last_seq + 1,
            kind: Tamper::Inserted,
            detail: format!(
                "rows {}..={seq} are not covered by any signed checkpoint",
                last.last_seq + 1
            ),
        });
    }
    if seq < last.last_seq || prev != last.head {
        return Err(Finding {
            seq: seq + 1,
            kind: Tamper::Deleted,
            detail: format!(
                "log ends at seq {seq} but the last checkpoint signs seq {}",
                last.last_seq
            ),
        });
    }
    Ok(Tail { seq, hash: prev })
}

fn signature_ok(cp: &Checkpoint, by_kid: &HashMap<String, &VerifyingKey>) -> bool {
    by_kid.get(&cp.key_id).is_some_and(|k| {
        <[u8; 64]>::try_from(cp.signature.as_slice()).is_ok_and(|s| {
            k.verify_strict(
                &checkpoint_message(cp.last_seq, &cp.head, cp.time_ns, &cp.key_id),
                &Signature::from_bytes(&s),
            )
            .is_ok()
        })
    })
}

fn verify(
    rows: &[Row],
    checkpoints: &[Checkpoint],
    keys: &[VerifyingKey],
) -> Result<Summary, Finding> {
    let chain = walk_chain(rows).err();
    let signed = check_checkpoints(rows, checkpoints, keys).err();
    // Report whichever finding comes first in the log. On a tie the chain's is more precise,
    // except for rows past the last checkpoint: Aegis checkpoints every commit, so such
    // rows were never written by it.
    match (chain, signed) {
        (Some(c), Some(s)) => Err(
            if s.seq < c.seq || (s.seq == c.seq && s.kind == Tamper::Inserted) {
                s
            } else {
                c
            },
        ),
        (Some(f), None) | (None, Some(f)) => Err(f),
        (None, None) => Ok(Summary {
            rows: rows.len() as u64,
            checkpoints: checkpoints.len() as u64,
            head: rows.last().map_or(GENESIS, |r| r.hash),
        }),
    }
}

fn walk_chain(rows: &[Row]) -> Result<(), Finding> {
    let position: HashMap<Hash, usize> =
        rows.iter().enumerate().map(|(i, r)| (r.hash, i)).collect();
    let mut expected_seq = 1u64;
    let mut expected_prev = GENESIS;
    for (i, r) in rows.iter().enumerate() {
        let content_ok = r.content_hash(r.seq) == r.hash;
        let link_ok = r.prev == expected_prev;
        if r.seq == expected_seq && link_ok && content_ok {
            expected_seq += 1;
            expected_prev = r.hash;
            continue;
        }
        return Err(classify(
            rows,
            i,
            expected_seq,
            &expected_prev,
            content_ok,
            &position,
        ));
    }
    Ok(())
}

/// Names what happened at the first row where the chain breaks (see the module docs).
fn classify(
    rows: &[Row],
    i: usize,
    expected_seq: u64,
    expected_prev: &Hash,
    content_ok: bool,
    position: &HashMap<Hash, usize>,
) -> Finding {
    let r = &rows[i];
    let finding = |seq, kind, detail: String| Finding { seq, kind, detail };
    let next_skips_this = rows.get(i + 1).is_some_and(|n| n.prev == *expected_prev);
    if r.seq > expected_seq {
        let n = r.seq - expected_seq;
        return finding(
            expected_seq,
            Tamper::Deleted,
            format!("{n} row(s) missing before seq {}", r.seq),
        );
    }
    if r.prev == *expected_prev {
        // In its place and linked, but its contents do not hash to its stored hash.
        if next_skips_this {
            return finding(
                r.seq,
                Tamper::Inserted,
                "the next row links to the row before this one".into(),
            );
        }
        return finding(
            r.seq,
            Tamper::Modified,
            "contents do not match the stored hash".into(),
        );
    }
    // The link is broken: where does this row's predecessor live?
    match position.get(&r.prev) {
        Some(&j) if j > i => {
            return finding(
                r.seq,
                Tamper::Reordered,
                format!("its predecessor is stored later, at seq {}", rows[j].seq),
            );
        }
        _ if next_skips_this => {
            return finding(
                r.seq,
                Tamper::Inserted,
                "the next row links to the row before this one".into(),
            );
        }
        Some(&j) if j + 1 < i => {
            let first = rows[j + 1].seq;
            return finding(
                first,
                Tamper::Inserted,
                format!(
                    "seq {} links to seq {}; the rows between do not belong",
                    r.seq, rows[j].seq
                ),
            );
        }
        _ => {}
    }
    match original_seq(r) {
        Some(orig) if orig > r.seq => finding(
            r.seq,
            Tamper::Deleted,
            format!(
                "this row was seq {orig}: {} row(s) before it deleted and the rest renumbered",
                orig - r.seq
            ),
        ),
        Some(orig) if orig < r.seq => finding(
            r.seq,
            Tamper::Inserted,
            format!("this row was seq {orig}: rows were inserted before it"),
        ),
        _ if content_ok => finding(
            r.seq,
            Tamper::Deleted,
            "its predecessor is no longer in the log".into(),
        ),
        _ => finding(
            r.seq,
            Tamper::Modified,
            "neither its contents nor its link to the previous row match".into(),
        ),
    }
}

/// The seq a renumbered but otherwise intact row was written with (searched nearby).
fn original_seq(r: &Row) -> Option<u64> {
    (1..=64u64)
        .flat_map(|d| [r.seq.checked_add(d), r.seq.checked_sub(d)])
        .flatten()
        .find(|&s| s > 0 && r.content_hash(s) == r.hash)
}

fn check_checkpoints(
    rows: &[Row],
    checkpoints: &[Checkpoint],
    keys: &[VerifyingKey],
) -> Result<(), Finding> {
    let by_kid: HashMap<String, &VerifyingKey> =
        keys.iter().map(|k| (crate::keys::key_id(k), k)).collect();
    let hash_at: HashMap<u64, Hash> = rows.iter().map(|r| (r.seq, r.hash)).collect();
    let last_row = rows.last().map_or(0, |r| r.seq);
    let mut covered = 0u64;
    for cp in checkpoints {
        let first = covered + 1;
        if !signature_ok(cp, &by_kid) {
            let why = if by_kid.contains_key(&cp.key_id) {
                "signature does not verify"
            } else {
                "signed by an untrusted key"
            };
            return Err(Finding {
                seq: first,
                kind: Tamper::BadSignature,
                detail: format!("checkpoint at seq {}: {why}", cp.last_seq),
            });
        }
        match hash_at.get(&cp.last_seq) {
            Some(h) if *h == cp.head => {}
            Some(_) => {
                return Err(Finding {
                    seq: first,
                    kind: Tamper::Modified,
                    detail: format!(
                        "rows {first}..={} were rewritten: the checkpoint signed at seq {} does not match",
                        cp.last_seq, cp.last_seq
                    ),
                });
            }
            None if cp.last_seq > last_row => {
                return Err(Finding {
                    seq: last_row + 1,
                    kind: Tamper::Deleted,
                    detail: format!(
                        "log ends at seq {last_row} but a checkpoint covers up to seq {}",
                        cp.last_seq
                    ),
                });
            }
            None => {
                return Err(Finding {
                    seq: cp.last_seq,
                    kind: Tamper::Deleted,
                    detail: "the row a checkpoint signs is gone".into(),
                });
            }
        }
        covered = covered.max(cp.last_seq);
    }
    if last_row > covered {
        return Err(Finding {
            seq: covered + 1,
            kind: Tamper::Inserted,
            detail: format!(
                "rows {}..={last_row} are not covered by any signed checkpoint",
                covered + 1
            ),
        });
    }
    Ok(())
}
