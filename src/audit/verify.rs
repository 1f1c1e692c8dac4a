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
//!
//! With a witness (`--witness`, the checkpoints Aegis published as it made them), the log
//! must also contain and extend every witnessed checkpoint: its tree head at each witnessed
//! size must be the one the witness saw. That finds what the signatures alone cannot, since
//! whoever holds the audit key can sign anything: a cut tail (rows and checkpoints deleted
//! together), and a history rewritten and signed again.
//!
//! **Streaming.** Rows are read in one pass in `seq` order, checkpoints in a second, each
//! checked against its row by primary key: memory stays constant whatever the log's size
//! (a frontier of at most 64 subtree heads). Only naming a break looks further, with a few
//! indexed or scanning queries.

use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, VerifyingKey};
use rusqlite::{Connection, OptionalExtension};

use super::merkle::Frontier;
use super::proof::leaf_hash;
use super::witness::SignedCheckpoint;
use super::{GENESIS, Hash, Record, Salt, checkpoint_message, checkpoint_message_v2, hash_row};

/// How the log was tampered with, at the first bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// A row's fields no longer give its hash, or a checkpoint no longer matches its row.
    Modified,
    /// A row is missing: a gap in the sequence, or a tail cut behind a checkpoint.
    Deleted,
    /// A row was added that the chain or the checkpoints do not account for.
    Inserted,
    /// Rows are out of order: a row links to another than its predecessor.
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
    /// What was done to it.
    pub kind: Tamper,
    /// One sentence naming the row and what does not match, for the operator.
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
    /// Rows verified.
    pub rows: u64,
    /// Checkpoints whose signatures verified.
    pub checkpoints: u64,
    /// The chain hash of the last row.
    pub head: Hash,
    /// The RFC 6962 tree head of every row.
    pub tree_head: Hash,
    /// Witnessed checkpoints the log was found to contain.
    pub witnessed: u64,
}

/// The verifier could not read the log or the witness at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The audit database could not be opened or read.
    #[error("cannot read audit database {path}: {message}")]
    Read {
        /// The database's path.
        path: String,
        /// What failed (SQLite's message).
        message: String,
    },
    /// The witness file could not be read or parsed (what went wrong).
    #[error("{0}")]
    Witness(String),
}

/// The keys checkpoints may be signed with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trust<'a> {
    /// The audit key and earlier audit keys (`audit.trusted_keys`).
    pub keys: &'a [VerifyingKey],
    /// Keys trusted only for format 1 checkpoints (no tree head) before the first one a key
    /// of `keys` signed: the token-signing key, which signed logs begun before the audit
    /// key was its own. It never signed a format 2 checkpoint, and after the audit key took
    /// over, a checkpoint signed by one of these is forged. Given only when the operator
    /// says so (`--legacy-key`) or by the start that creates the audit key.
    pub legacy: &'a [VerifyingKey],
}

impl<'a> Trust<'a> {
    /// Every key equally trusted.
    pub fn keys(keys: &'a [VerifyingKey]) -> Self {
        Self { keys, legacy: &[] }
    }

    fn find(keys: &[VerifyingKey], kid: &str) -> Option<VerifyingKey> {
        keys.iter().find(|k| crate::keys::key_id(k) == kid).copied()
    }
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
    pub(crate) fn content_hash(&self, seq: u64) -> Hash {
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
    /// The tree head a format 2 checkpoint signs; `None` for format 1.
    root: Option<Hash>,
    time_ns: i64,
    key_id: String,
    signature: Vec<u8>,
}

/// Verifies the audit database at `path` against the trusted `keys`.
pub fn verify_file(
    path: &Path,
    keys: &[VerifyingKey],
) -> Result<Result<Summary, Finding>, VerifyError> {
    verify_file_with(path, Trust::keys(keys), None)
}

/// Verifies the audit database at `path` against `trust` and, if given, the witness file
/// `witness` (see the module docs), in constant memory.
pub fn verify_file_with(
    path: &Path,
    trust: Trust<'_>,
    witness: Option<&Path>,
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
    let witnessed = match witness {
        Some(w) => Some(super::witness::read_file(w).map_err(VerifyError::Witness)?),
        None => None,
    };
    let walk = walk_rows(&conn, trust, witnessed).map_err(|e| match e {
        WalkError::Db(e) => read_err(e),
        WalkError::Witness(w) => VerifyError::Witness(w),
    })?;
    let signed = check_checkpoints(&conn, trust).map_err(read_err)?;
    Ok(combine(walk, signed))
}

fn blob32(v: Vec<u8>) -> Hash {
    // A wrong-sized blob is itself tampering: it can never equal a real hash.
    Hash::try_from(v.as_slice()).unwrap_or([0xff; 32])
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
    let mut stmt = conn.prepare(rows_between_sql(conn)?)?;
    let from = i64::try_from(from).unwrap_or(i64::MAX);
    let to = i64::try_from(to).unwrap_or(i64::MAX);
    let rows = stmt.query_map([from, to], row_from_sql)?;
    rows.collect()
}

/// The `SELECT` of [`read_rows_between`]: rows with `?1 <= seq <= ?2`, in `seq` order.
fn rows_between_sql(conn: &Connection) -> rusqlite::Result<&'static str> {
    Ok(if has_salt_column(conn)? {
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
    })
}

fn row_from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
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
}

/// The columns [`checkpoint_from_row`] reads.
const CHECKPOINT_COLUMNS: &str = "last_seq, head_hash, time_ns, key_id, signature, root";

/// A checkpoint from a row of `SELECT` [`CHECKPOINT_COLUMNS`].
fn checkpoint_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        last_seq: r.get::<_, i64>(0)? as u64,
        head: blob32(r.get(1)?),
        time_ns: r.get(2)?,
        key_id: r.get(3)?,
        signature: r.get(4)?,
        root: r.get::<_, Option<Vec<u8>>>(5)?.map(blob32),
    })
}

/// Whether `audit_checkpoint` has the `root` column (format 2 checkpoints).
pub(crate) fn has_root_column(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stmt =
        conn.prepare("SELECT 1 FROM pragma_table_info('audit_checkpoint') WHERE name = 'root'")?;
    stmt.exists([])
}

/// `SELECT` [`CHECKPOINT_COLUMNS`] `FROM audit_checkpoint` and `tail` (`WHERE`, `ORDER BY`),
/// on a database whose checkpoints may predate the `root` column.
fn checkpoints_sql(conn: &Connection, tail: &str) -> rusqlite::Result<String> {
    let columns = if has_root_column(conn)? {
        CHECKPOINT_COLUMNS.to_owned()
    } else {
        CHECKPOINT_COLUMNS.replace(", root", ", NULL")
    };
    Ok(format!("SELECT {columns} FROM audit_checkpoint {tail}"))
}

/// What [`verify_tail`] found: the head to continue the chain from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// The last row's sequence number (0 for an empty log).
    pub seq: u64,
    /// The last row's hash (the genesis hash for an empty log).
    pub hash: Hash,
}

/// Checks the end of the log before a writer continues it: the last two checkpoints'
/// signatures, and every row after the second-to-last checkpoint re-hashed and re-linked
/// up to the last checkpoint's head, with nothing after it. The work is one commit's rows,
/// whatever the log's size, so it runs at every start-up; a torn or garbled tail, rows
/// no checkpoint covers, or a forged checkpoint is a [`Finding`], never continued from.
pub fn verify_tail(
    conn: &Connection,
    trust: Trust<'_>,
) -> Result<Result<Tail, Finding>, rusqlite::Error> {
    let mut stmt = conn.prepare(&checkpoints_sql(conn, "ORDER BY id DESC LIMIT 2")?)?;
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
    // Streamed: however many rows a damaged or crafted file holds after the anchor,
    // memory stays one row.
    let mut stmt = conn.prepare(rows_between_sql(conn)?)?;
    let from = i64::try_from(start).unwrap_or(i64::MAX);
    let mut rows = stmt.query_map([from, i64::MAX], row_from_sql)?;
    let anchor = if start == 0 {
        GENESIS
    } else {
        match rows.next().transpose()? {
            // `start` is not 0 only when there are two checkpoints: the first is `prev`.
            Some(r) if r.seq == start && cps.first().is_some_and(|c| r.hash == c.head) => r.hash,
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
    if cps.is_empty()
        && let Some(r) = rows.next().transpose()?
    {
        return Ok(Err(Finding {
            seq: r.seq,
            kind: Tamper::Inserted,
            detail: "rows exist but no signed checkpoint covers them".into(),
        }));
    }
    check_tail(rows, start, anchor, &cps, trust)
}

/// The chain from (`start`, `anchor`) through `rows` must end exactly at the last of
/// `cps`, and every one of `cps` must be signed by a trusted key.
fn check_tail(
    rows: impl Iterator<Item = rusqlite::Result<Row>>,
    start: u64,
    anchor: Hash,
    cps: &[Checkpoint],
    trust: Trust<'_>,
) -> rusqlite::Result<Result<Tail, Finding>> {
    let finding = |seq, kind, detail: String| Ok(Err(Finding { seq, kind, detail }));
    let mut signers = Signers::new(trust);
    for cp in cps {
        if let Err(why) = signers.check(cp) {
            return finding(
                start + 1,
                Tamper::BadSignature,
                format!("checkpoint at seq {}: {why}", cp.last_seq),
            );
        }
    }
    let (mut seq, mut prev) = (start, anchor);
    for r in rows {
        let r = r?;
        if r.seq != seq + 1 {
            return finding(
                seq + 1,
                Tamper::Deleted,
                format!("row {} follows row {seq}", r.seq),
            );
        }
        if r.prev != prev || r.content_hash(r.seq) != r.hash {
            return finding(
                r.seq,
                Tamper::Modified,
                "a torn or altered row: its contents or link do not match its hash".into(),
            );
        }
        seq = r.seq;
        prev = r.hash;
    }
    let Some(last) = cps.last() else {
        return Ok(Ok(Tail { seq, hash: prev }));
    };
    if seq > last.last_seq {
        return finding(
            last.last_seq + 1,
            Tamper::Inserted,
            format!(
                "rows {}..={seq} are not covered by any signed checkpoint",
                last.last_seq + 1
            ),
        );
    }
    if seq < last.last_seq || prev != last.head {
        return finding(
            seq + 1,
            Tamper::Deleted,
            format!(
                "log ends at seq {seq} but the last checkpoint signs seq {}",
                last.last_seq
            ),
        );
    }
    Ok(Ok(Tail { seq, hash: prev }))
}

/// Checks checkpoint signatures in log order, remembering whether the audit key has taken
/// over from a legacy key (see [`Trust::legacy`]).
struct Signers<'a> {
    trust: Trust<'a>,
    audit_key_seen: bool,
}

impl<'a> Signers<'a> {
    fn new(trust: Trust<'a>) -> Self {
        Self {
            trust,
            audit_key_seen: false,
        }
    }

    /// `Err` says why the checkpoint's signature is not accepted.
    fn check(&mut self, cp: &Checkpoint) -> Result<(), &'static str> {
        let (key, current) = match Trust::find(self.trust.keys, &cp.key_id) {
            Some(k) => (k, true),
            None => match Trust::find(self.trust.legacy, &cp.key_id) {
                Some(_) if self.audit_key_seen => {
                    return Err(
                        "signed by the token-signing key after the audit key had taken over",
                    );
                }
                Some(_) if cp.root.is_some() => {
                    return Err(
                        "a format 2 checkpoint signed by the token-signing key, which never signs them",
                    );
                }
                Some(k) => (k, false),
                None => return Err("signed by an untrusted key"),
            },
        };
        let message = match &cp.root {
            Some(root) => {
                checkpoint_message_v2(cp.last_seq, &cp.head, root, cp.time_ns, &cp.key_id)
            }
            None => checkpoint_message(cp.last_seq, &cp.head, cp.time_ns, &cp.key_id),
        };
        let ok = <[u8; 64]>::try_from(cp.signature.as_slice()).is_ok_and(|s| {
            key.verify_strict(&message, &Signature::from_bytes(&s))
                .is_ok()
        });
        if !ok {
            return Err("signature does not verify");
        }
        self.audit_key_seen |= current;
        Ok(())
    }
}

/// What the pass over the rows found.
struct Walk {
    rows: u64,
    head: Hash,
    tree_head: Hash,
    witnessed: u64,
    /// The first break of the chain.
    chain: Option<Finding>,
    /// The first witnessed checkpoint the log does not contain.
    witness: Option<Finding>,
    /// The first format 2 checkpoint whose tree head is not the rows'.
    root: Option<Finding>,
}

enum WalkError {
    Db(rusqlite::Error),
    Witness(String),
}

impl From<rusqlite::Error> for WalkError {
    fn from(e: rusqlite::Error) -> Self {
        WalkError::Db(e)
    }
}

/// One pass over the rows in `seq` order: the chain, the tree heads at every format 2
/// checkpoint's size, and every witnessed checkpoint.
fn walk_rows(
    conn: &Connection,
    trust: Trust<'_>,
    witness: Option<super::witness::WitnessLines>,
) -> Result<Walk, WalkError> {
    let mut row_stmt = conn.prepare(rows_between_sql(conn)?)?;
    let mut rows = row_stmt.query_map([0, i64::MAX], row_from_sql)?.peekable();
    let with_roots = if has_root_column(conn)? {
        "WHERE root IS NOT NULL ORDER BY last_seq, id"
    } else {
        "WHERE 0"
    };
    let mut root_stmt = conn.prepare(&checkpoints_sql(conn, with_roots)?)?;
    let mut signed_roots = root_stmt.query_map([], checkpoint_from_row)?.peekable();
    let mut witness = WitnessCursor::new(witness, trust);

    let mut frontier = Frontier::new();
    let (mut expected_seq, mut expected_prev) = (1u64, GENESIS);
    let mut walk = Walk {
        rows: 0,
        head: GENESIS,
        tree_head: frontier.root(),
        witnessed: 0,
        chain: None,
        witness: None,
        root: None,
    };
    let mut last_signed_size = 0u64;
    while let Some(r) = rows.next() {
        let r = r?;
        let content_ok = r.content_hash(r.seq) == r.hash;
        if r.seq != expected_seq || r.prev != expected_prev || !content_ok {
            let next = match rows.peek() {
                Some(Ok(n)) => Some(n),
                _ => None,
            };
            walk.chain = Some(classify(
                conn,
                &r,
                next,
                expected_seq,
                &expected_prev,
                content_ok,
            )?);
            break;
        }
        expected_seq += 1;
        expected_prev = r.hash;
        frontier.push(leaf_hash(&r.hash));
        let size = frontier.size();
        // Format 2 checkpoints at this size: their signed tree head must be the rows'.
        while let Some(Ok(cp)) = signed_roots.peek() {
            if cp.last_seq > size {
                break;
            }
            if cp.last_seq == size && walk.root.is_none() && cp.root != Some(frontier.root()) {
                walk.root = Some(Finding {
                    seq: last_signed_size + 1,
                    kind: Tamper::Modified,
                    detail: format!(
                        "rows {}..={size} no longer have the tree head the checkpoint at seq \
                         {size} signs",
                        last_signed_size + 1
                    ),
                });
            }
            if cp.last_seq == size {
                last_signed_size = size;
            }
            signed_roots.next();
        }
        if let Some(Err(_)) = signed_roots.peek()
            && let Some(Err(e)) = signed_roots.next()
        {
            return Err(e.into());
        }
        if walk.witness.is_none() {
            walk.witness = witness.at(size, &r.hash, &frontier)?;
        }
    }
    walk.rows = frontier.size();
    walk.head = expected_prev;
    walk.tree_head = frontier.root();
    walk.witnessed = witness.matched;
    if walk.witness.is_none() && walk.chain.is_none() {
        walk.witness = witness.beyond(frontier.size())?;
    }
    Ok(walk)
}

/// Reads the witness in step with the rows: tree sizes must only grow, and at each
/// witnessed size the rows' tree head and chain head must be the witnessed ones.
struct WitnessCursor {
    lines: Option<std::iter::Peekable<super::witness::WitnessLines>>,
    keys: Vec<VerifyingKey>,
    /// The largest size the log was found to contain, and its witness line.
    matched_size: u64,
    matched_line: u64,
    matched: u64,
}

impl WitnessCursor {
    fn new(lines: Option<super::witness::WitnessLines>, trust: Trust<'_>) -> Self {
        Self {
            lines: lines.map(Iterator::peekable),
            // Witness lines are format 2 checkpoints: never the legacy key's.
            keys: trust.keys.to_vec(),
            matched_size: 0,
            matched_line: 0,
            matched: 0,
        }
    }

    /// The next witnessed checkpoint if its tree size is at most `size`, checked for its
    /// signature and order.
    fn next_upto(&mut self, size: u64) -> Result<Option<(u64, SignedCheckpoint)>, String> {
        let Some(lines) = self.lines.as_mut() else {
            return Ok(None);
        };
        match lines.peek() {
            None => return Ok(None),
            Some(Ok((_, cp))) if cp.tree_size > size => return Ok(None),
            Some(_) => {}
        }
        let (line, cp) = match lines.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(e),
            None => return Ok(None),
        };
        if !cp.signed_by(&self.keys) {
            return Err(format!(
                "witness line {line}: the checkpoint at tree size {} is not signed by a trusted \
                 key ({}); the witness itself was altered, or the wrong key was given",
                cp.tree_size, cp.key_id
            ));
        }
        Ok(Some((line, cp)))
    }

    /// Checks every witnessed checkpoint of tree size `size` (the rows so far, the last
    /// one's hash `head`).
    fn at(
        &mut self,
        size: u64,
        head: &Hash,
        frontier: &Frontier,
    ) -> Result<Option<Finding>, WalkError> {
        while let Some((line, cp)) = self.next_upto(size).map_err(WalkError::Witness)? {
            if cp.tree_size < self.matched_size {
                return Ok(Some(Finding {
                    seq: cp.tree_size + 1,
                    kind: Tamper::Deleted,
                    detail: format!(
                        "the witness saw the log shrink from {} rows (line {}) to {} (line \
                         {line}): rows were cut and the log written again",
                        self.matched_size, self.matched_line, cp.tree_size
                    ),
                }));
            }
            if cp.tree_size < size {
                // Only reachable for a size the walk already passed: out of order.
                return Ok(Some(Finding {
                    seq: cp.tree_size + 1,
                    kind: Tamper::Modified,
                    detail: format!("witness line {line} is out of order"),
                }));
            }
            if cp.root != frontier.root() || cp.head != *head {
                return Ok(Some(Finding {
                    seq: self.matched_size + 1,
                    kind: Tamper::Modified,
                    detail: format!(
                        "rows {}..={size} are not the rows the witness saw (line {line}, tree \
                         size {size}, signed at {}): history was rewritten after it was \
                         published",
                        self.matched_size + 1,
                        crate::time::rfc3339_nanos(cp.time_ns)
                    ),
                }));
            }
            self.matched_size = size;
            self.matched_line = line;
            self.matched += 1;
        }
        Ok(None)
    }

    /// After the last row (`size` rows): any witnessed checkpoint left covers rows the log
    /// no longer has.
    fn beyond(&mut self, size: u64) -> Result<Option<Finding>, WalkError> {
        let mut largest: Option<(u64, SignedCheckpoint)> = None;
        while let Some(next) = self.next_upto(u64::MAX).map_err(WalkError::Witness)? {
            largest = Some(next);
        }
        Ok(largest.map(|(line, cp)| Finding {
            seq: size + 1,
            kind: Tamper::Deleted,
            detail: format!(
                "the log ends at seq {size}, but the witness saw a checkpoint of {} rows (line \
                 {line}, signed at {}): rows {}..={} were cut off with their checkpoints",
                cp.tree_size,
                crate::time::rfc3339_nanos(cp.time_ns),
                size + 1,
                cp.tree_size
            ),
        }))
    }
}

/// Whichever finding comes first in the log. On a tie the chain's is more precise, except
/// for rows past the last checkpoint: Aegis checkpoints every commit, so such rows were
/// never written by it. The witness's and the tree heads' findings count only when they
/// come strictly first: what they see, the chain or the signatures usually name better.
fn combine(walk: Walk, signed: Result<u64, Finding>) -> Result<Summary, Finding> {
    let first = match (walk.chain, signed.as_ref().err().cloned()) {
        (Some(c), Some(s)) => Some(
            if s.seq < c.seq || (s.seq == c.seq && s.kind == Tamper::Inserted) {
                s
            } else {
                c
            },
        ),
        (a, b) => a.or(b),
    };
    let first = [walk.witness, walk.root]
        .into_iter()
        .flatten()
        .fold(first, |best, f| match best {
            Some(b) if b.seq <= f.seq => Some(b),
            _ => Some(f),
        });
    match first {
        Some(f) => Err(f),
        None => Ok(Summary {
            rows: walk.rows,
            checkpoints: signed.unwrap_or(0),
            head: walk.head,
            tree_head: walk.tree_head,
            witnessed: walk.witnessed,
        }),
    }
}

/// Names what happened at the first row where the chain breaks (see the module docs),
/// looking up only what it needs: where the row's predecessor is stored, and the row after.
fn classify(
    conn: &Connection,
    r: &Row,
    next: Option<&Row>,
    expected_seq: u64,
    expected_prev: &Hash,
    content_ok: bool,
) -> rusqlite::Result<Finding> {
    let finding = |seq, kind, detail: String| Finding { seq, kind, detail };
    let next_skips_this = next.is_some_and(|n| n.prev == *expected_prev);
    if r.seq > expected_seq {
        let n = r.seq - expected_seq;
        return Ok(finding(
            expected_seq,
            Tamper::Deleted,
            format!("{n} row(s) missing before seq {}", r.seq),
        ));
    }
    if r.prev == *expected_prev {
        // In its place and linked, but its contents do not hash to its stored hash.
        if next_skips_this {
            return Ok(finding(
                r.seq,
                Tamper::Inserted,
                "the next row links to the row before this one".into(),
            ));
        }
        return Ok(finding(
            r.seq,
            Tamper::Modified,
            "contents do not match the stored hash".into(),
        ));
    }
    // The link is broken: where does this row's predecessor live? (The last row stored
    // with that hash, as a copied row shares its original's.)
    let pred: Option<u64> = conn
        .query_row(
            "SELECT max(seq) FROM audit_log WHERE hash = ?1",
            [&r.prev[..]],
            |row| row.get::<_, Option<i64>>(0),
        )?
        .map(|s| s as u64);
    match pred {
        Some(p) if p > r.seq => {
            return Ok(finding(
                r.seq,
                Tamper::Reordered,
                format!("its predecessor is stored later, at seq {p}"),
            ));
        }
        _ if next_skips_this => {
            return Ok(finding(
                r.seq,
                Tamper::Inserted,
                "the next row links to the row before this one".into(),
            ));
        }
        Some(p) => {
            let after: Option<i64> = conn
                .query_row(
                    "SELECT min(seq) FROM audit_log WHERE seq > ?1",
                    [p as i64],
                    |row| row.get(0),
                )
                .optional()?
                .flatten();
            if let Some(first) = after.map(|s| s as u64).filter(|&s| s < r.seq) {
                return Ok(finding(
                    first,
                    Tamper::Inserted,
                    format!(
                        "seq {} links to seq {p}; the rows between do not belong",
                        r.seq
                    ),
                ));
            }
        }
        None => {}
    }
    Ok(match original_seq(r) {
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
    })
}

/// The seq a renumbered but otherwise intact row was written with (searched nearby).
fn original_seq(r: &Row) -> Option<u64> {
    (1..=64u64)
        .flat_map(|d| [r.seq.checked_add(d), r.seq.checked_sub(d)])
        .flatten()
        .find(|&s| s > 0 && r.content_hash(s) == r.hash)
}

/// Every checkpoint in the order written: signed by a trusted key, and naming a stored row
/// by its seq and hash; every row covered. Returns the number of checkpoints.
fn check_checkpoints(
    conn: &Connection,
    trust: Trust<'_>,
) -> rusqlite::Result<Result<u64, Finding>> {
    let last_row: u64 = conn
        .query_row("SELECT max(seq) FROM audit_log", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?
        .map_or(0, |s| s as u64);
    let mut hash_at = conn.prepare("SELECT hash FROM audit_log WHERE seq = ?1")?;
    let mut stmt = conn.prepare(&checkpoints_sql(conn, "ORDER BY id")?)?;
    let mut signers = Signers::new(trust);
    let mut covered = 0u64;
    let mut count = 0u64;
    for cp in stmt.query_map([], checkpoint_from_row)? {
        let cp = cp?;
        count += 1;
        let first = covered + 1;
        if let Err(why) = signers.check(&cp) {
            return Ok(Err(Finding {
                seq: first,
                kind: Tamper::BadSignature,
                detail: format!("checkpoint at seq {}: {why}", cp.last_seq),
            }));
        }
        let stored: Option<Hash> = hash_at
            .query_row([i64::try_from(cp.last_seq).unwrap_or(i64::MAX)], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
            .map(blob32);
        match stored {
            Some(h) if h == cp.head => {}
            Some(_) => {
                return Ok(Err(Finding {
                    seq: first,
                    kind: Tamper::Modified,
                    detail: format!(
                        "rows {first}..={} were rewritten: the checkpoint signed at seq {} does not match",
                        cp.last_seq, cp.last_seq
                    ),
                }));
            }
            None if cp.last_seq > last_row => {
                return Ok(Err(Finding {
                    seq: last_row + 1,
                    kind: Tamper::Deleted,
                    detail: format!(
                        "log ends at seq {last_row} but a checkpoint covers up to seq {}",
                        cp.last_seq
                    ),
                }));
            }
            None => {
                return Ok(Err(Finding {
                    seq: cp.last_seq,
                    kind: Tamper::Deleted,
                    detail: "the row a checkpoint signs is gone".into(),
                }));
            }
        }
        covered = covered.max(cp.last_seq);
    }
    if last_row > covered {
        return Ok(Err(Finding {
            seq: covered + 1,
            kind: Tamper::Inserted,
            detail: format!(
                "rows {}..={last_row} are not covered by any signed checkpoint",
                covered + 1
            ),
        }));
    }
    Ok(Ok(count))
}
