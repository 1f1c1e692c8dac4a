//! The audit store: SQLite (WAL) written by one dedicated thread with group commit.
//!
//! Checks hand their [`Record`] to the writer over a bounded channel and wait for the
//! commit. The writer takes everything queued (up to `max_batch`; while more rows are
//! announced, after waiting [`GATHER`] for them), chains and inserts it, appends one
//! signed checkpoint, and commits the lot in one transaction; then it answers every
//! waiting Check. A failed transaction rolls back whole and every Check in it gets
//! the error (and fails closed); the chain head only moves on a successful commit, so the
//! next batch continues from the last row that is really stored.
//!
//! WAL checkpoints (copying the WAL back into the database file, with an fsync) run on a
//! second thread with its own connection, never inside a Check's commit: SQLite's
//! automatic checkpoint would otherwise stall whichever commit crosses the threshold for
//! milliseconds. A PASSIVE checkpoint runs beside the writer without blocking it. Only
//! when the WAL has grown past [`WAL_RESTART_FRAMES`] does the writer itself checkpoint,
//! between two batches, so that the WAL starts over: that costs the writer one
//! checkpoint's syncs, and it never waits for a reader.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::merkle::Frontier;
use super::proof::leaf_hash;
use super::verify::Trust;
use super::witness::{Publisher, SignedCheckpoint};
use super::{Hash, Record, Salt, checkpoint_message_v2, commitments, row_hash_v2};
use crate::files::{create_private, open_nofollow};
use crate::keys::Signer;

/// File name of the audit database in the data directory.
pub const AUDIT_DB_FILE: &str = "audit.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    http_status INTEGER NOT NULL,
    kind TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    agent TEXT NOT NULL,
    session TEXT NOT NULL,
    run_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    policy_revision TEXT NOT NULL,
    trust_level TEXT NOT NULL,
    approval_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    salt BLOB
);
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    id INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    head_hash BLOB NOT NULL,
    time_ns INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    signature BLOB NOT NULL,
    root BLOB,
    frontier BLOB
);
";

const INSERT_ROW: &str = concat!(
    "INSERT INTO audit_log (",
    super::audit_columns!(),
    ", salt) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24)"
);

/// Adds the `salt` column (format 2 rows) to a database created before it. Rows already
/// stored keep `NULL` and their format 1 hash: nothing stored changes.
///
/// Adds `root` and `frontier` (format 2 checkpoints: the Merkle tree head they sign, and
/// the subtree heads the writer continues the tree from) to `audit_checkpoint` likewise.
fn upgrade_schema(conn: &Connection) -> rusqlite::Result<()> {
    if !super::verify::has_salt_column(conn)? {
        conn.execute_batch("ALTER TABLE audit_log ADD COLUMN salt BLOB")?;
    }
    if !super::verify::has_root_column(conn)? {
        conn.execute_batch(
            "ALTER TABLE audit_checkpoint ADD COLUMN root BLOB; \
             ALTER TABLE audit_checkpoint ADD COLUMN frontier BLOB",
        )?;
    }
    Ok(())
}

/// A failure of the audit log. Every one fails the Check closed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The audit database could not be opened, created or migrated.
    #[error("audit database {path}: {message}")]
    Open {
        /// The database's path.
        path: PathBuf,
        /// What failed (SQLite's or the filesystem's message).
        message: String,
    },
    /// The log's tail does not verify (the finding): a writer will not chain onto it.
    #[error(
        "audit log tail does not verify, refusing to continue it: {0}; run `aegis audit verify`"
    )]
    UncoveredTail(String),
    /// A batch could not be committed (SQLite's message); its Checks fail closed.
    #[error("audit write failed: {0}")]
    Write(String),
    /// The log is behind its witness file (what was found): it was rolled back or replaced.
    #[error(
        "audit log contradicts its witness, refusing to continue it: {0}. Investigate with \
         `aegis audit verify --witness`; to go on from this log anyway, move the witness file \
         aside (keep it: it is the record of what was there)"
    )]
    BehindWitness(String),
    /// The queue holds this many rows already: the Check is shed (RESOURCE_EXHAUSTED).
    #[error("audit queue is full ({0} rows waiting)")]
    Overloaded(usize),
    /// The writer thread has stopped (after a failed commit, or at shutdown).
    #[error("audit writer has stopped")]
    Closed,
}

/// SQLite's `synchronous` setting, a plain setting of the configuration.
pub use crate::config::Durability;

/// Writer settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Rows waiting for the writer before Checks are refused (fail closed, RESOURCE_EXHAUSTED).
    pub queue_capacity: usize,
    /// Most rows in one transaction.
    pub max_batch: usize,
    /// How far a commit is made durable before its Checks are answered.
    pub durability: Durability,
    /// How long the writer holds a batch open while rows are announced ([`GATHER`];
    /// zero: never).
    pub gather: std::time::Duration,
    /// WAL frames past which the writer makes the WAL start over ([`WAL_RESTART_FRAMES`]).
    pub wal_restart_frames: i64,
}

/// One queued row. The record is boxed: std allocates the queue's ring of
/// `queue_capacity` slots whole and writes every slot's stamp when the channel is made,
/// so the whole ring is resident from start-up. A slot holding the 424-byte `Record`
/// inline (440 bytes with its stamp) kept ~3.4 MiB resident at the default 8,192; with a
/// box a slot is 24 bytes.
struct Job {
    record: Box<Record>,
    reply: oneshot::Sender<Result<Appended, AuditError>>,
}

/// Where a row went: its sequence number and its hash in the chain (what an incident's
/// evidence names, so it can be checked against an exported log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The row's sequence number, from 1.
    pub seq: u64,
    /// The row's hash (what the next row links to).
    pub hash: Hash,
}

/// The outcome of one queued row's commit.
type Committed = oneshot::Receiver<Result<Appended, AuditError>>;

/// A row on its way to the writer ([`AuditLog::expect_row`]); dropping it ends the
/// announcement.
#[derive(Debug)]
pub struct Coming(Arc<AtomicUsize>);

impl Drop for Coming {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long the writer sleeps, once per batch, when it takes a batch while other rows are
/// announced (Checks between their start and their append, not waiting on the control
/// plane); then it takes what has arrived. With no other Check in flight nothing waits;
/// under load one signature and one transaction cover more rows (PostgreSQL's
/// `commit_delay` with `commit_siblings`). A sleep, so at least this long (Linux's timer
/// slack adds ~50 µs).
pub const GATHER: std::time::Duration = std::time::Duration::from_micros(100);

/// The longest `AEGIS_AUDIT_GATHER_US` may set.
const GATHER_MAX: std::time::Duration = std::time::Duration::from_millis(10);

/// [`GATHER`], or for measuring, `AEGIS_AUDIT_GATHER_US` (0 turns the gathering off; at
/// most 10 ms: every batch would wait that long under load).
pub fn gather_window() -> Result<std::time::Duration, String> {
    parse_gather(std::env::var("AEGIS_AUDIT_GATHER_US").ok().as_deref())
}

/// The gathering window an `AEGIS_AUDIT_GATHER_US` value sets ([`GATHER`] when unset).
fn parse_gather(value: Option<&str>) -> Result<std::time::Duration, String> {
    let Some(v) = value else {
        return Ok(GATHER);
    };
    let most = GATHER_MAX.as_micros() as u64;
    parse_env_number("AEGIS_AUDIT_GATHER_US", v, "µs", 0..=most)
        .map(std::time::Duration::from_micros)
}

/// Environment variable `name`'s value `value`, a whole number of `unit` within `range`.
fn parse_env_number(
    name: &str,
    value: &str,
    unit: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, String> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{name}={value:?}: not a whole number of {unit}"))?;
    if n > *range.end() {
        return Err(format!(
            "{name}={n}: above the most, {} {unit}",
            range.end()
        ));
    }
    if n < *range.start() {
        return Err(format!(
            "{name}={n}: below the least, {} {unit}",
            range.start()
        ));
    }
    Ok(n)
}

/// Handle to the audit log: append rows; cloneable.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: SyncSender<Job>,
    healthy: Arc<AtomicBool>,
    capacity: usize,
    /// Rows handed to the writer and not yet taken by it.
    queued: Arc<AtomicUsize>,
    /// Rows on their way: Checks that will append and have not yet ([`Self::expect_row`]).
    coming: Arc<AtomicUsize>,
    /// Commit latency, batch sizes and failed commits, for `/metrics`.
    pub stats: Arc<AuditStats>,
    /// What the witness publisher did, if checkpoints are published.
    pub witness: Option<Arc<super::witness::WitnessStats>>,
}

/// What the writer measures of its commits.
#[derive(Debug)]
pub struct AuditStats {
    /// Seconds per group commit (insert, checkpoint signature, COMMIT), successful or not.
    pub commit_seconds: crate::metrics::Histogram,
    /// Rows per group commit.
    pub batch_rows: crate::metrics::Histogram,
    /// Commits that failed (their Checks answered with an error).
    pub failed_commits: std::sync::atomic::AtomicU64,
    /// Batches the writer held open for announced rows ([`GATHER`]).
    pub gather_sleeps: std::sync::atomic::AtomicU64,
}

impl Default for AuditStats {
    fn default() -> Self {
        Self {
            commit_seconds: crate::metrics::Histogram::new(crate::metrics::LATENCY_BOUNDS),
            batch_rows: crate::metrics::Histogram::new(crate::metrics::BATCH_BOUNDS),
            failed_commits: std::sync::atomic::AtomicU64::new(0),
            gather_sleeps: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// Joins the writer (and checkpointer) threads after every [`AuditLog`] handle is dropped.
#[derive(Debug)]
pub struct WriterThread(
    Option<JoinHandle<()>>,
    Option<JoinHandle<()>>,
    Option<JoinHandle<()>>,
);

/// How often the checkpointer copies the WAL into the database. Each checkpoint still
/// briefly delays the writer (its WAL writes contend with the checkpoint's fsync), in
/// proportion to the checkpoint's size. Measured with `aegis bench` at 2,000 Checks/s
/// (p99): 5 s → 14–17 ms, 500 ms → 3.2–3.4 ms, 100 ms → 2.0–2.1 ms, 50 ms → 2.3–2.6 ms,
/// 20 ms → 2.7–3.1 ms.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

// === impl AuditLog ===

impl AuditLog {
    /// Opens (creating if needed) the audit database and starts the writer thread; the
    /// log must be signed by `signer` alone, and nothing is published.
    pub fn open(
        path: &Path,
        signer: Signer,
        opts: &StoreOptions,
    ) -> Result<(Self, WriterThread), AuditError> {
        let own = [signer.verifying_key()];
        Self::open_with(path, signer, opts, Trust::keys(&own), None, None)
    }

    /// Opens the audit database, checking its tail against `trust` (which must include
    /// `signer`'s key) and against the last checkpoint of `witness_file`, if given (the log
    /// must contain it: a log cut or restored from a backup is refused), and starts the
    /// writer thread, which hands every checkpoint it commits to `witness`, if any (its
    /// thread is joined with the writer's).
    pub fn open_with(
        path: &Path,
        signer: Signer,
        opts: &StoreOptions,
        trust: Trust<'_>,
        witness: Option<(Publisher, JoinHandle<()>)>,
        witness_file: Option<&Path>,
    ) -> Result<(Self, WriterThread), AuditError> {
        create_private(path).map_err(|e| open_err(path, e))?;
        let conn = open_connection(path, opts.durability)?;
        conn.execute_batch("PRAGMA wal_autocheckpoint=0;")
            .map_err(|e| open_err(path, e))?;
        let checked = read_head(&conn, trust, path).and_then(|(seq, hash)| {
            let frontier = read_frontier(&conn, seq).map_err(|e| open_err(path, e))?;
            if let Some(w) = witness_file {
                check_witness(&conn, w, trust, (seq, &hash), &frontier)?;
            }
            Ok((seq, hash, frontier))
        });
        let (head_seq, head_hash, frontier) = match checked {
            Ok(v) => v,
            Err(e) => {
                // No writer will close the publisher: stop its thread.
                if let Some((p, _)) = &witness {
                    p.close();
                }
                return Err(e);
            }
        };
        let (publisher, witness_thread) = witness.unzip();
        let witness_stats = publisher.as_ref().map(|p| p.stats.clone());
        let checkpoint_conn = open_connection(path, opts.durability)?;
        let (stop_checkpoints, checkpoint_rx) = std::sync::mpsc::channel::<()>();
        let restart_wal = Arc::new(AtomicBool::new(false));
        let wal_bound = opts.wal_restart_frames;
        let (tx, rx) = sync_channel(opts.queue_capacity);
        let healthy = Arc::new(AtomicBool::new(true));
        let queued = Arc::new(AtomicUsize::new(0));
        let coming = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(AuditStats::default());
        let mut writer = Writer {
            stats: stats.clone(),
            queued: queued.clone(),
            coming: coming.clone(),
            gather: opts.gather,
            conn,
            path: path.to_path_buf(),
            file: file_id(path).map_err(|e| open_err(path, e))?,
            signer,
            head_seq,
            head_hash,
            frontier,
            publisher,
            max_batch: opts.max_batch.max(1),
            healthy: healthy.clone(),
            restart_wal: restart_wal.clone(),
        };
        let checkpointer = std::thread::Builder::new()
            .name("aegis-audit-ckpt".into())
            .spawn(move || {
                run_checkpoints(&checkpoint_conn, &checkpoint_rx, &restart_wal, wal_bound)
            })
            .map_err(|e| open_err(path, e.to_string()))?;
        let handle = std::thread::Builder::new()
            .name("aegis-audit-writer".into())
            .spawn(move || {
                writer.run(rx);
                drop(stop_checkpoints);
            })
            .map_err(|e| open_err(path, e.to_string()))?;
        Ok((
            Self {
                tx,
                healthy,
                capacity: opts.queue_capacity,
                queued,
                coming,
                stats,
                witness: witness_stats,
            },
            WriterThread(Some(handle), Some(checkpointer), witness_thread),
        ))
    }

    /// Appends `record`, its text fields bounded ([`Record::bounded`]), and waits until its
    /// transaction has committed; returns its sequence number. If the caller stops
    /// waiting, the row is still written.
    pub async fn append(&self, record: Record) -> Result<u64, AuditError> {
        self.append_row(record).await.map(|a| a.seq)
    }

    /// [`Self::append`], returning the row's hash too.
    pub async fn append_row(&self, record: Record) -> Result<Appended, AuditError> {
        let committed = self.send(record)?;
        committed.await.map_err(|_| AuditError::Closed)?
    }

    /// Announces a row on its way: a writer that takes a batch while rows are announced
    /// sleeps [`GATHER`] once for them. The announcement ends when it is dropped, which
    /// the Check does just before it appends the row.
    pub fn expect_row(&self) -> Coming {
        self.coming.fetch_add(1, Ordering::Relaxed);
        Coming(self.coming.clone())
    }

    /// Queues `record` for the writer; the receiver gets the commit's outcome.
    fn send(&self, record: Record) -> Result<Committed, AuditError> {
        let record = Box::new(record.bounded());
        let (reply, rx) = oneshot::channel();
        // Counted before the send so the writer's decrement can never come first.
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(Job { record, reply }).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => AuditError::Overloaded(self.capacity),
                TrySendError::Disconnected(_) => AuditError::Closed,
            }
        })?;
        Ok(rx)
    }

    /// Rows waiting for the writer now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// `audit.queue_capacity`.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// False after a failed commit, true again after the next successful one.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

impl WriterThread {
    /// Waits for the writer to drain its queue and stop (all handles must be dropped).
    pub fn join(mut self) {
        // The writer first: the witness publisher stops once the writer has dropped it.
        for h in [self.0.take(), self.1.take(), self.2.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }
}

/// WAL frames (pages) past which the WAL is made to start over by default (~64 MiB;
/// [`StoreOptions::wal_restart_frames`]).
///
/// The checkpointer's PASSIVE checkpoints copy frames beside the writer but never reset
/// the WAL while a writer commits continuously: the WAL then only grows. Found by the
/// 10-minute soak at 7,800 Checks/s: 1.5 GB of WAL after 5 minutes, its index (mapped, so
/// resident) growing, and every page lookup slower (p50 1.2 → 2.0 ms). Past this bound the
/// checkpointer asks the writer, which checkpoints between two batches
/// ([`Writer::start_wal_over`]); its next commit then writes from the start of the WAL,
/// unless a reader is still using the WAL at that moment (then the checkpointer asks
/// again).
///
/// Not a RESTART checkpoint from the checkpointer's connection: that takes the write lock
/// and, holding it, waits for every reader using the WAL (up to the busy timeout, 1 s).
/// Each one stalled every Check for as long as it ran, and the writer's backoff in
/// SQLite's busy handler (sleeps of 1, 2, 5, 10, 15 ms…) added to it: 33 ms of sleeps in
/// one such stall, seen with strace at 5,000 Checks/s. An outside reader holding a
/// snapshot (an operator's `sqlite3` shell left in a transaction) made commits wait the
/// full second, every 100 ms.
pub const WAL_RESTART_FRAMES: i64 = 16_384;

/// The range `AEGIS_AUDIT_WAL_RESTART_FRAMES` may set: from 64 frames (the tests', a
/// start-over every few commits) to 1,048,576 (4 GiB of WAL).
const WAL_RESTART_RANGE: std::ops::RangeInclusive<u64> = 64..=1_048_576;

/// [`WAL_RESTART_FRAMES`], or for tests and measuring, `AEGIS_AUDIT_WAL_RESTART_FRAMES`.
pub fn wal_restart_frames() -> Result<i64, String> {
    let Ok(v) = std::env::var("AEGIS_AUDIT_WAL_RESTART_FRAMES") else {
        return Ok(WAL_RESTART_FRAMES);
    };
    let frames = parse_env_number(
        "AEGIS_AUDIT_WAL_RESTART_FRAMES",
        &v,
        "frames",
        WAL_RESTART_RANGE,
    )?;
    i64::try_from(frames).map_err(|e| e.to_string())
}

/// The WAL file is cut back to this size when it starts over.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Checkpoints the WAL every [`CHECKPOINT_INTERVAL`] until the writer stops, then once
/// more, truncating the WAL. Never waits for the writer or for readers (PASSIVE). Past
/// `bound` frames, if its checkpoint copied every frame it saw (no reader held it
/// back, so the writer's would not be held back either), it sets `restart`, for the
/// writer to make the WAL start over.
fn run_checkpoints(
    conn: &Connection,
    stop: &std::sync::mpsc::Receiver<()>,
    restart: &AtomicBool,
    bound: i64,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut warned = false;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        match passive {
            // (busy, frames in the WAL, frames copied)
            Ok((busy, frames, copied)) if frames > bound => {
                if busy == 0 && copied == frames {
                    restart.store(true, Ordering::Relaxed);
                }
                if frames > 4 * bound && !warned {
                    warned = true;
                    crate::log!(
                        warn,
                        "audit WAL holds {frames} frames, over 4 times its bound of \
                         {bound}: a reader of the audit database is keeping \
                         it from starting over"
                    );
                }
            }
            Ok(_) => warned = false,
            Err(e) => crate::log!(warn, "audit WAL checkpoint failed (will retry): {e}"),
        }
    }
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

/// (device, inode) of the file at `path`.
type FileId = (u64, u64);

fn file_id(path: &Path) -> std::io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

fn open_err(path: &Path, e: impl ToString) -> AuditError {
    AuditError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Opens the database with the audit schema and pragmas, only through SQLite (see
/// [`create_private`]).
pub fn open_connection(path: &Path, durability: Durability) -> Result<Connection, AuditError> {
    let conn = open_nofollow(path).map_err(|e| open_err(path, e))?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout=1000; \
         PRAGMA journal_size_limit={WAL_SIZE_LIMIT};"
    ))
    .and_then(|()| conn.execute_batch(SCHEMA))
    .and_then(|()| upgrade_schema(&conn))
    .map_err(|e| open_err(path, e))?;
    Ok(conn)
}

/// The last row's sequence and hash, after [`verify_tail`](super::verify::verify_tail)
/// has checked the end of the log: a writer never continues a torn, garbled or unsigned
/// tail.
fn read_head(conn: &Connection, trust: Trust<'_>, path: &Path) -> Result<(u64, Hash), AuditError> {
    // A file SQLite cannot read back (a torn page, garbage where rows were) names the file.
    let tail = super::verify::verify_tail(conn, trust).map_err(|e| {
        open_err(
            path,
            format!(
                "the end of the log cannot be read (torn or corrupt file?): {e}; \
                 run `aegis audit verify`"
            ),
        )
    })?;
    match tail {
        Ok(t) => Ok((t.seq, t.hash)),
        Err(finding) => Err(AuditError::UncoveredTail(finding.to_string())),
    }
}

/// The Merkle frontier at `head_seq` (the tail has been verified): from the last
/// checkpoint, when it is a format 2 checkpoint whose frontier gives the tree head it
/// signs; else rebuilt from every row's hash, once (a log written before format 2).
fn read_frontier(conn: &Connection, head_seq: u64) -> rusqlite::Result<Frontier> {
    /// (last_seq, root, frontier) of the last checkpoint.
    type Stored = (i64, Option<Vec<u8>>, Option<Vec<u8>>);
    let stored: Option<Stored> = conn
        .query_row(
            "SELECT last_seq, root, frontier FROM audit_checkpoint ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((last, Some(root), Some(bytes))) = stored
        && last as u64 == head_seq
        && let Some(f) = Frontier::from_bytes(head_seq, &bytes)
        && f.root()[..] == root[..]
    {
        return Ok(f);
    }
    if head_seq > 0 {
        crate::log!(
            info,
            "audit log: building the Merkle tree over {head_seq} rows written before tree heads \
             were signed (once)"
        );
    }
    let mut f = Frontier::new();
    let mut stmt = conn.prepare("SELECT hash FROM audit_log WHERE seq <= ?1 ORDER BY seq")?;
    for h in stmt.query_map([i64::try_from(head_seq).unwrap_or(i64::MAX)], |r| {
        r.get::<_, Vec<u8>>(0)
    })? {
        f.push(leaf_hash(&h?));
    }
    Ok(f)
}

/// The log at start-up (its head and tree) must contain the last checkpoint its witness
/// file holds.
fn check_witness(
    conn: &Connection,
    witness: &Path,
    trust: Trust<'_>,
    (head_seq, head_hash): (u64, &Hash),
    frontier: &Frontier,
) -> Result<(), AuditError> {
    let Some(seen) = super::witness::last_in_file(witness).map_err(AuditError::BehindWitness)?
    else {
        return Ok(());
    };
    // Witness lines are format 2 checkpoints: never the legacy key's.
    let keys = trust.keys;
    let shown = witness.display();
    let when = crate::time::rfc3339_nanos(seen.time_ns);
    if !seen.signed_by(keys) {
        return Err(AuditError::BehindWitness(format!(
            "the last line of {shown} is not signed by a trusted key ({})",
            seen.key_id
        )));
    }
    if seen.tree_size > head_seq {
        return Err(AuditError::BehindWitness(format!(
            "the log ends at seq {head_seq}, but {shown} saw {} rows (signed at {when}): rows \
             {}..={} are gone, cut or lost to a restored backup",
            seen.tree_size,
            head_seq + 1,
            seen.tree_size
        )));
    }
    let contains = if seen.tree_size == head_seq {
        seen.root == frontier.root() && seen.head == *head_hash
    } else {
        rows_extend(conn, seen.tree_size, &seen.head, head_seq).map_err(|e| open_err(witness, e))?
    };
    if !contains {
        return Err(AuditError::BehindWitness(format!(
            "the log's first {} rows are not the ones {shown} saw (signed at {when}): the \
             history was rewritten or replaced by a backup",
            seen.tree_size
        )));
    }
    Ok(())
}

/// However the writer ends, its publisher publishes what is left and stops.
impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(p) = &self.publisher {
            p.close();
        }
    }
}

/// Whether row `from` still has the witnessed chain hash `head`, and every row after it,
/// up to the verified tail at `to`, hashes to its stored hash and links to the one before:
/// the log contains what the witness saw and continues it. Read in chunks; the rows
/// between a witnessed checkpoint and the tail are normally one publication interval's.
fn rows_extend(conn: &Connection, from: u64, head: &Hash, to: u64) -> rusqlite::Result<bool> {
    const CHUNK: u64 = 10_000;
    let mut prev: Option<Hash> = None;
    let mut next = from;
    while next <= to {
        let rows = super::verify::read_rows_between(conn, next, to.min(next + CHUNK - 1))?;
        for r in &rows {
            let ok = r.seq == next
                && r.content_hash(r.seq) == r.hash
                && match prev {
                    None => r.hash == *head,
                    Some(p) => r.prev == p,
                };
            if !ok {
                return Ok(false);
            }
            prev = Some(r.hash);
            next += 1;
        }
        if rows.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

struct Writer {
    conn: Connection,
    /// Shared with [`AuditLog`]: decremented as jobs are taken off the queue.
    queued: Arc<AtomicUsize>,
    /// Shared with [`AuditLog`]: rows announced and not yet queued.
    coming: Arc<AtomicUsize>,
    /// How long a batch is held open for announced rows ([`GATHER`]).
    gather: std::time::Duration,
    /// The database path, and the identity of the file `conn` writes to.
    path: PathBuf,
    file: FileId,
    signer: Signer,
    head_seq: u64,
    head_hash: Hash,
    /// The Merkle tree of rows `1..=head_seq`.
    frontier: Frontier,
    /// Where committed checkpoints are published, if anywhere.
    publisher: Option<Publisher>,
    max_batch: usize,
    healthy: Arc<AtomicBool>,
    stats: Arc<AuditStats>,
    /// Set by the checkpointer: the WAL is past its bound (`wal_restart_frames`). Set again
    /// by the writer when its own checkpoint found the checkpointer's running.
    restart_wal: Arc<AtomicBool>,
}

// === impl Writer ===

impl Writer {
    fn run(&mut self, rx: Receiver<Job>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        // recv() fails only once every sender is gone and the queue is empty: a drained stop.
        while let Ok(first) = rx.recv() {
            batch.push(first);
            self.gather(&rx, &mut batch);
            self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
            let started = std::time::Instant::now();
            let committed = self.commit(&batch);
            self.stats
                .commit_seconds
                .observe_duration(started.elapsed());
            self.stats.batch_rows.observe(batch.len() as f64);
            if committed.is_err() {
                self.stats.failed_commits.fetch_add(1, Ordering::Relaxed);
            }
            match committed {
                Ok((first_seq, hashes)) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    for ((i, job), hash) in batch.drain(..).enumerate().zip(hashes) {
                        let seq = first_seq + i as u64;
                        let _ = job.reply.send(Ok(Appended { seq, hash }));
                    }
                }
                Err(e) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    crate::log!(error, "audit commit of {} rows failed: {e}", batch.len());
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(AuditError::Write(e.clone())));
                    }
                }
            }
            if self.restart_wal.swap(false, Ordering::Relaxed) {
                self.start_wal_over();
            }
        }
    }

    /// Makes the WAL start over at the next commit, between two batches (their Checks
    /// already answered): only this connection writes, so a PASSIVE checkpoint here copies
    /// every frame that no reader's snapshot still needs, and SQLite's next write
    /// transaction then writes from the start of the WAL if no reader is using it. It
    /// waits for no one: while a reader uses the WAL, the WAL grows and the checkpointer
    /// asks again. If the checkpointer's own checkpoint was running (busy), it tries again
    /// after the next batch.
    fn start_wal_over(&self) {
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))
        {
            Ok(0) => {}
            Ok(_) => self.restart_wal.store(true, Ordering::Relaxed),
            Err(e) => crate::log!(
                warn,
                "audit WAL checkpoint by the writer failed (will retry): {e}"
            ),
        }
    }

    /// Adds what is queued to the batch; then, if the batch has room and rows are
    /// announced, sleeps the gathering window once and adds what has arrived.
    fn gather(&self, rx: &Receiver<Job>, batch: &mut Vec<Job>) {
        let take_queued = |batch: &mut Vec<Job>| {
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        };
        take_queued(batch);
        // One sleep, not a wake-up per arriving row: the senders never find the writer
        // waiting on the channel, so queuing a row costs them no wake-up either.
        if batch.len() < self.max_batch
            && !self.gather.is_zero()
            && self.coming.load(Ordering::Relaxed) > 0
        {
            self.stats.gather_sleeps.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.gather);
            take_queued(batch);
        }
    }

    /// Commits the batch to the file it belongs in; returns the first seq and every row's
    /// hash.
    fn commit(&mut self, batch: &[Job]) -> Result<(u64, Vec<Hash>), String> {
        self.check_file()?;
        // One read of the OS's randomness for the whole batch.
        let mut salts = vec![[0u8; 32]; batch.len()];
        getrandom::fill(salts.as_flattened_mut())
            .map_err(|e| format!("no randomness for row salts: {e}"))?;
        self.insert(batch, &salts).map_err(|e| e.to_string())
    }

    /// The file at the path must still be the one being written: SQLite writes through
    /// its open handle, so rows committed after the file was deleted or replaced would be
    /// lost with the handle, though their Checks were answered. While it differs every
    /// commit fails (closed), and service resumes once the original file is back. A
    /// restored copy is never adopted while running: the `-wal` and `-shm` files at the
    /// path belong to the original, and SQLite would read their pages into the copy. A
    /// restart adopts it, after start-up has verified its tail.
    fn check_file(&self) -> Result<(), String> {
        let shown = self.path.display();
        match file_id(&self.path) {
            Ok(id) if id == self.file => Ok(()),
            Ok(_) => Err(format!(
                "audit database {shown} was replaced by another file; put the original back \
                 to resume, or restart aegis to adopt a restored copy (its tail is verified)"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "audit database {shown} was deleted; put it back to resume"
            )),
            Err(e) => Err(format!("audit database {shown}: {e}")),
        }
    }

    /// Inserts the batch and its checkpoint in one transaction; returns the first seq and
    /// the rows' hashes. The head, the tree and the publisher only see the batch once it
    /// has committed.
    fn insert(&mut self, batch: &[Job], salts: &[Salt]) -> rusqlite::Result<(u64, Vec<Hash>)> {
        let kid = self.signer.kid().to_owned();
        let tx = self.conn.transaction()?;
        let mut seq = self.head_seq;
        let mut prev = self.head_hash;
        let mut tree = self.frontier.clone();
        let mut hashes = Vec::with_capacity(batch.len());
        let checkpoint;
        {
            let mut insert = tx.prepare_cached(INSERT_ROW)?;
            for (job, salt) in batch.iter().zip(salts) {
                seq += 1;
                let r = &job.record;
                let hash = row_hash_v2(seq, &commitments(r, salt), &kid, &prev);
                insert.execute(params![
                    seq as i64,
                    r.time_ns,
                    r.http_status,
                    r.kind,
                    r.decision_id,
                    r.tenant,
                    r.agent,
                    r.session,
                    r.run_id,
                    r.tool,
                    r.action,
                    r.resource,
                    r.decision,
                    r.reason,
                    r.policy_revision,
                    r.trust_level,
                    r.approval_id,
                    r.actor,
                    r.trace_id,
                    r.span_id,
                    kid,
                    &prev[..],
                    &hash[..],
                    &salt[..],
                ])?;
                prev = hash;
                hashes.push(hash);
                tree.push(leaf_hash(&hash));
            }
            let now = crate::unix_nanos();
            let root = tree.root();
            let sig = self
                .signer
                .sign(&checkpoint_message_v2(seq, &prev, &root, now, &kid));
            tx.prepare_cached("INSERT INTO audit_checkpoint (last_seq, head_hash, time_ns, key_id, signature, root, frontier) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
                .execute(params![seq as i64, &prev[..], now, kid, &sig[..], &root[..], tree.to_bytes()])?;
            checkpoint = SignedCheckpoint {
                tree_size: seq,
                head: prev,
                root,
                time_ns: now,
                key_id: kid,
                signature: sig,
            };
        }
        tx.commit()?;
        let first = self.head_seq + 1;
        self.head_seq = seq;
        self.head_hash = prev;
        self.frontier = tree;
        if let Some(p) = &self.publisher {
            p.offer(checkpoint);
        }
        Ok((first, hashes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{GENESIS, checkpoint_message, row_hash};

    /// A database as the writer left it before salts: the old schema, one format 1 row
    /// and its checkpoint.
    fn v1_database(path: &Path, signer: &Signer) -> Record {
        let conn = Connection::open(path).expect("open");
        conn.execute_batch(&SCHEMA.replace(",\n    salt BLOB\n", "\n"))
            .expect("old schema");
        let r = Record {
            time_ns: 42,
            kind: "check".into(),
            tenant: "acme".into(),
            decision: "allow".into(),
            ..Default::default()
        };
        let kid = signer.kid();
        let hash = row_hash(1, &r, kid, &GENESIS);
        conn.execute(
            concat!(
                "INSERT INTO audit_log (",
                crate::audit::audit_columns!(),
                ") VALUES (1, ?1, 0, 'check', '', 'acme', '', '', '', '', '', '', 'allow', '', '', \
                 '', '', '', '', '', ?2, ?3, ?4)"
            ),
            params![r.time_ns, kid, &GENESIS[..], &hash[..]],
        )
        .expect("v1 row");
        let sig = signer.sign(&checkpoint_message(1, &hash, 43, kid));
        conn.execute(
            "INSERT INTO audit_checkpoint (last_seq, head_hash, time_ns, key_id, signature) \
             VALUES (1, ?1, 43, ?2, ?3)",
            params![&hash[..], kid, &sig[..]],
        )
        .expect("v1 checkpoint");
        r
    }

    #[tokio::test]
    async fn an_old_database_is_upgraded_and_its_rows_still_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(AUDIT_DB_FILE);
        let signer = Signer::generate().expect("key");
        let old = v1_database(&path, &signer);
        assert!(
            !crate::audit::verify::has_salt_column(&Connection::open(&path).expect("open"))
                .expect("pragma")
        );
        let opts = StoreOptions {
            queue_capacity: 4,
            max_batch: 4,
            durability: Durability::Normal,
            gather: GATHER,
            wal_restart_frames: WAL_RESTART_FRAMES,
        };
        let (log, writer) = AuditLog::open(&path, signer.clone(), &opts).expect("opens an old log");
        assert_eq!(log.append(old.clone()).await.expect("append"), 2);
        drop(log);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("join");

        let conn = Connection::open(&path).expect("open");
        let salts: Vec<Option<Vec<u8>>> = conn
            .prepare("SELECT salt FROM audit_log ORDER BY seq")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("salts");
        assert_eq!(salts.len(), 2);
        assert!(salts[0].is_none(), "the old row is left as it was");
        assert_eq!(salts[1].as_ref().map(Vec::len), Some(32));
        let summary = crate::audit::verify::verify_file(&path, &[signer.verifying_key()])
            .expect("readable")
            .expect("intact");
        assert_eq!(summary.rows, 2);
    }

    #[test]
    fn the_gathering_window_is_read_and_bounded() {
        use std::time::Duration;
        assert_eq!(parse_gather(None), Ok(GATHER));
        assert_eq!(parse_gather(Some("0")), Ok(Duration::ZERO));
        assert_eq!(parse_gather(Some(" 250 ")), Ok(Duration::from_micros(250)));
        assert_eq!(parse_gather(Some("10000")), Ok(Duration::from_millis(10)));
        let too_long = parse_gather(Some("10001")).err().unwrap_or_default();
        assert!(too_long.contains("above the most, 10000 µs"), "{too_long}");
        let junk = parse_gather(Some("100us")).err().unwrap_or_default();
        assert!(junk.contains("not a whole number of µs"), "{junk}");
        let few = parse_env_number(
            "AEGIS_AUDIT_WAL_RESTART_FRAMES",
            "63",
            "frames",
            WAL_RESTART_RANGE,
        )
        .err()
        .unwrap_or_default();
        assert!(few.contains("=63: below the least, 64 frames"), "{few}");
    }

    /// A log in a temporary directory whose writer gathers for `gather`.
    fn gathering_log(gather: std::time::Duration) -> (tempfile::TempDir, AuditLog, WriterThread) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(AUDIT_DB_FILE);
        let opts = StoreOptions {
            queue_capacity: 16,
            max_batch: 16,
            durability: Durability::Normal,
            gather,
            // A start-over every few commits, so that the tests meet it.
            wal_restart_frames: 64,
        };
        let (log, writer) =
            AuditLog::open(&path, Signer::generate().expect("key"), &opts).expect("opens");
        (dir, log, writer)
    }

    fn row(n: i64) -> Record {
        Record {
            time_ns: n,
            kind: "check".into(),
            decision: "allow".into(),
            ..Default::default()
        }
    }

    fn checkpoints(dir: &tempfile::TempDir) -> i64 {
        Connection::open(dir.path().join(AUDIT_DB_FILE))
            .expect("open")
            .query_row("SELECT COUNT(*) FROM audit_checkpoint", [], |r| r.get(0))
            .expect("count")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_announced_while_a_batch_gathers_shares_its_commit() {
        // A window far longer than the test's steps, so no timing can split the batch.
        let (dir, log, writer) = gathering_log(std::time::Duration::from_secs(2));
        let coming = log.expect_row();
        let first = tokio::spawn({
            let log = log.clone();
            async move { log.append_row(row(1)).await }
        });
        // Wait until the writer has taken the first row and sleeps to gather for the
        // announced one. Waiting only for the row to be queued let a writer thread that
        // was not scheduled yet find both rows queued at once (no gathering at all): a
        // loaded CI machine failed the test that way.
        let sleeps = || log.stats.gather_sleeps.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while sleeps() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(sleeps(), 1, "the writer gathers for the announced row");
        drop(coming);
        let second = log.append_row(row(2)).await.expect("second");
        let first = first.await.expect("task").expect("first");
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(
            checkpoints(&dir),
            1,
            "one transaction, one signature for both rows"
        );
        assert_eq!(sleeps(), 1, "one window for both rows");
        drop(log);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("join");
    }

    /// The WAL file: how many times it has started over (its header's checkpoint
    /// sequence number, bytes 12..16, big-endian, which SQLite raises at each start-over),
    /// and its size.
    fn wal(dir: &tempfile::TempDir) -> (u32, u64) {
        use std::io::Read;
        let mut file = std::fs::File::open(dir.path().join(AUDIT_DB_FILE).with_extension("db-wal"))
            .expect("the WAL");
        let mut header = [0u8; 16];
        file.read_exact(&mut header).expect("a WAL header");
        let size = file.metadata().expect("size").len();
        (
            u32::from_be_bytes([header[12], header[13], header[14], header[15]]),
            size,
        )
    }

    /// Appends rows from `callers` tasks at once, without a pause, so the writer always
    /// has the next batch waiting (a writer left idle lets the checkpointer copy the whole
    /// WAL on its own), for at least `at_least` and then until `done` holds (looked at
    /// every 20 ms) or 30 s have passed; the slowest append.
    async fn append_until(
        log: &AuditLog,
        callers: usize,
        at_least: std::time::Duration,
        done: impl Fn() -> bool,
    ) -> std::time::Duration {
        let started = std::time::Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let (log, stop) = (log.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut slowest = std::time::Duration::ZERO;
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let t = std::time::Instant::now();
                        log.append(row((c * 10_000_000 + n) as i64))
                            .await
                            .expect("appended");
                        slowest = slowest.max(t.elapsed());
                        n += 1;
                    }
                    slowest
                })
            })
            .collect();
        let give_up = std::time::Duration::from_secs(30);
        while started.elapsed() < give_up && (started.elapsed() < at_least || !done()) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut slowest = std::time::Duration::ZERO;
        for t in tasks {
            slowest = slowest.max(t.await.expect("caller"));
        }
        slowest
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_holding_a_snapshot_never_stalls_the_writer_and_the_wal_starts_over_after_it()
    {
        let (dir, log, writer) = gathering_log(std::time::Duration::ZERO);
        log.append(row(0)).await.expect("first row");
        // An outside reader holding one snapshot: an operator's sqlite3 shell left in a
        // transaction, a long verification of the live file.
        let reader = Connection::open(dir.path().join(AUDIT_DB_FILE)).expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let seen: i64 = reader
            .query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))
            .expect("read");
        assert_eq!(seen, 1);
        let (restarts, _) = wal(&dir);
        // The WAL passes its bound (64 frames in unit tests) within the first commits.
        // The old RESTART checkpoint then held the write lock for the busy timeout (1 s)
        // waiting for this reader, every 100 ms.
        // At least 1.5 s, and on until the WAL is well past its bound (a loaded machine
        // commits less in that time).
        let slowest = append_until(&log, 16, std::time::Duration::from_millis(1500), || {
            wal(&dir).1 > 4 * 64 * 4096
        })
        .await;
        assert!(
            slowest < std::time::Duration::from_millis(600),
            "a commit waited {slowest:?} for a reader"
        );
        let (pinned, size) = wal(&dir);
        assert!(
            size > 4 * 64 * 4096,
            "the WAL passed its bound: {size} bytes"
        );
        assert_eq!(
            pinned, restarts,
            "no start-over while the reader uses the WAL"
        );
        reader.execute_batch("COMMIT").expect("commit");
        drop(reader);
        // Under continuous writes the checkpointer's own checkpoints never catch up with
        // the writer: the start-overs are the writer's.
        append_until(&log, 16, std::time::Duration::ZERO, || {
            wal(&dir).0 >= pinned + 3
        })
        .await;
        let (after, _) = wal(&dir);
        assert!(
            after >= pinned + 3,
            "the WAL starts over again and again once the reader is gone: {pinned} → {after}"
        );
        drop(log);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("join");
    }

    /// The queue's ring of `queue_capacity` slots is allocated and written whole when the
    /// channel is made: a record held inline kept ~3.4 MiB resident at the default
    /// capacity (the README's resident-memory figures). A slot must stay a small
    /// fraction of a record.
    #[test]
    fn a_queue_slot_holds_a_boxed_record_not_the_record() {
        let (slot, record) = (std::mem::size_of::<Job>(), std::mem::size_of::<Record>());
        assert!(
            slot * 8 <= record,
            "a queue slot is {slot} bytes; a Record is {record}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_row_is_not_held_and_a_row_that_never_comes_holds_one_window() {
        let window = std::time::Duration::from_millis(300);
        let (dir, log, writer) = gathering_log(window);
        let sleeps = || log.stats.gather_sleeps.load(Ordering::Relaxed);
        log.append(row(1)).await.expect("lone");
        assert_eq!(sleeps(), 0, "nothing announced: committed at once");
        // Announced and never sent (a Check that stalls, or is cancelled later).
        let never = log.expect_row();
        let started = std::time::Instant::now();
        log.append(row(2)).await.expect("held");
        let held = started.elapsed();
        assert_eq!(sleeps(), 1);
        assert!(held >= window, "held for the window: {held:?}");
        assert!(held < window * 10, "and no longer: {held:?}");
        drop(never);
        log.append(row(3)).await.expect("after");
        assert_eq!(sleeps(), 1, "a dropped announcement ends");
        assert_eq!(checkpoints(&dir), 3);
        drop(log);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("join");
    }
}
