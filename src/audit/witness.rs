//! Publishing signed checkpoints outside the host, as they are made.
//!
//! A hash chain signed by a key on the same disk proves nothing against whoever holds the
//! disk and the key: they can cut the tail (rows and checkpoints together) or rewrite the
//! whole history and sign it again. What they cannot do is recall what already left the
//! host. So the writer hands every checkpoint it commits to a [`Publisher`], whose thread
//! appends it to each configured [`Sink`]: a witness file (a JSON line per checkpoint,
//! `audit.witness_file`, meant to be on another host's mount or a log shipper's input)
//! and the OTLP collector (a span per batch, see `telemetry`). `aegis audit verify
//! --witness FILE` then requires the log to contain and extend every witnessed checkpoint.
//!
//! Publishing never delays or fails a Check: the publisher runs behind the writer and
//! publishes at most once per `audit.witness_interval_ms` (1 s by default) the newest
//! checkpoint committed (see [`Publisher::start`]). The ones in between are skipped
//! (counted), which loses nothing, since each checkpoint's tree extends the ones before
//! it. A sink that fails is counted and retried with the next. What is committed but not
//! yet published (at most the interval plus a write, normally) is the window an attacker
//! on the host can still cut.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{Hash, checkpoint_message_v2};

/// The `schema` of a witnessed checkpoint line.
pub const SCHEMA: &str = "aegis-audit-checkpoint/v2";

/// A checkpoint as the writer signed it: rows `1..=tree_size`, their chain head and their
/// RFC 6962 tree head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// Rows covered: `1..=tree_size`.
    pub tree_size: u64,
    /// The hash of row `tree_size` (the chain head).
    pub head: Hash,
    /// The RFC 6962 tree head of those rows.
    pub root: Hash,
    /// When it was signed, Unix nanoseconds.
    pub time_ns: i64,
    /// The id of the audit key that signed it.
    pub key_id: String,
    /// Ed25519 signature over the checkpoint message.
    pub signature: [u8; 64],
}

/// One line of a witness file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    schema: String,
    tree_size: u64,
    head: String,
    root: String,
    time_ns: i64,
    key_id: String,
    signature: String,
}

impl SignedCheckpoint {
    /// The JSON line written to a witness file (no newline).
    pub fn to_line(&self) -> String {
        let line = Line {
            schema: SCHEMA.into(),
            tree_size: self.tree_size,
            head: crate::hex(&self.head),
            root: crate::hex(&self.root),
            time_ns: self.time_ns,
            key_id: self.key_id.clone(),
            signature: crate::hex(&self.signature),
        };
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// Parses a line of a witness file, naming what is wrong with it.
    pub fn parse_line(text: &str) -> Result<Self, String> {
        let l: Line = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if l.schema != SCHEMA {
            return Err(format!("schema {:?}, expected {SCHEMA:?}", l.schema));
        }
        let hash = |name: &str, v: &str| {
            crate::unhex(v)
                .and_then(|b| Hash::try_from(b.as_slice()).ok())
                .ok_or_else(|| format!("{name} is not 64 hex digits"))
        };
        let signature = crate::unhex(&l.signature)
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .ok_or("signature is not 128 hex digits")?;
        Ok(Self {
            tree_size: l.tree_size,
            head: hash("head", &l.head)?,
            root: hash("root", &l.root)?,
            time_ns: l.time_ns,
            key_id: l.key_id,
            signature,
        })
    }

    /// The message its signature covers.
    pub fn message(&self) -> Vec<u8> {
        checkpoint_message_v2(
            self.tree_size,
            &self.head,
            &self.root,
            self.time_ns,
            &self.key_id,
        )
    }

    /// Whether one of `keys` signed it (under its key id).
    pub fn signed_by(&self, keys: &[VerifyingKey]) -> bool {
        keys.iter().any(|k| {
            crate::keys::key_id(k) == self.key_id
                && k.verify_strict(&self.message(), &Signature::from_bytes(&self.signature))
                    .is_ok()
        })
    }
}

/// Somewhere checkpoints are published.
pub trait Sink: Send + 'static {
    /// For logs and metrics.
    fn name(&self) -> String;
    /// Publishes `batch` (in commit order, never empty).
    fn publish(&mut self, batch: &[SignedCheckpoint]) -> Result<(), String>;
}

/// Appends each checkpoint as a JSON line to a file, synced before the next batch.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
}

impl FileSink {
    /// Opens (creating, 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }
}

impl Sink for FileSink {
    fn name(&self) -> String {
        format!("witness file {}", self.path.display())
    }

    fn publish(&mut self, batch: &[SignedCheckpoint]) -> Result<(), String> {
        let mut text = String::with_capacity(batch.len() * 320);
        for cp in batch {
            text.push_str(&cp.to_line());
            text.push('\n');
        }
        // One write of whole lines, in append mode: a reader never sees two interleaved.
        // A failed write (a full disk) is cut back off, so that no torn line is left for
        // the next one to be appended to.
        let before = self.file.metadata().map(|m| m.len());
        let written = self
            .file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data());
        if written.is_err()
            && let Ok(len) = before
        {
            let _ = self.file.set_len(len);
        }
        written.map_err(|e| e.to_string())
    }
}

/// What the publisher did, for `/metrics`.
#[derive(Debug, Default)]
pub struct WitnessStats {
    /// Checkpoints every sink took (the OTLP sink takes a span into the exporter's queue,
    /// not to the collector: the exporter's own failures are in its logs).
    pub published: AtomicU64,
    /// Checkpoints not published: a newer one came within the interval, or the publisher's
    /// queue was full (the newer ones extend them).
    pub skipped: AtomicU64,
    /// Batches a sink refused.
    pub failures: AtomicU64,
    /// The tree size of the newest checkpoint published.
    pub published_size: AtomicU64,
}

/// The writer's handle to the publisher thread.
#[derive(Debug, Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
    /// A zero interval: every checkpoint is published.
    every: bool,
    /// What the publisher has done, for `/metrics`.
    pub stats: Arc<WitnessStats>,
}

/// What the writer hands over and the publisher takes.
#[derive(Debug)]
struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Slot {
    /// Committed and not yet published, oldest first: at most one (the newest) with a
    /// non-zero interval, up to [`QUEUE`] with a zero interval.
    waiting: Vec<SignedCheckpoint>,
    /// The publisher waits for a checkpoint (only then is it worth a wake-up).
    idle: bool,
    /// Every writer handle is gone: publish what is left and stop.
    closed: bool,
}

/// Checkpoints waiting for a zero-interval publisher before newer ones are skipped.
const QUEUE: usize = 4096;

/// The default of `audit.witness_interval_ms`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(1000);

impl Publisher {
    /// Starts the publisher thread over `sinks`; it stops once the writer is done with it
    /// ([`Publisher::close`]), publishing the newest checkpoint first.
    ///
    /// With a non-zero `interval` the sinks get at most one checkpoint per interval, the
    /// newest committed: a saturated writer commits thousands of times a second, and each
    /// checkpoint's tree extends the ones before it, so the newest carries them all (a
    /// witness line for every commit would be megabytes a second). The interval is the
    /// window between a commit and its publication. The writer only swaps the newest into
    /// a slot; the publisher wakes once per interval, or when a checkpoint comes after a
    /// quiet spell. With a zero interval every checkpoint is published (tests, and
    /// witnesses that want each commit).
    pub fn start(
        sinks: Vec<Box<dyn Sink>>,
        interval: Duration,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            wake: Condvar::new(),
        });
        let stats = Arc::new(WitnessStats::default());
        let (thread_shared, thread_stats) = (shared.clone(), stats.clone());
        let handle = std::thread::Builder::new()
            .name("aegis-audit-witness".into())
            .spawn(move || run(&thread_shared, sinks, interval, &thread_stats))?;
        Ok((
            Self {
                shared,
                every: interval.is_zero(),
                stats,
            },
            handle,
        ))
    }

    /// Hands over a committed checkpoint; never blocks on the sinks.
    pub fn offer(&self, cp: SignedCheckpoint) {
        let Ok(mut slot) = self.shared.slot.lock() else {
            return;
        };
        if !self.every
            && let Some(old) = slot.waiting.pop()
        {
            drop(old);
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        }
        if slot.waiting.len() >= QUEUE {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            slot.waiting.remove(0);
        }
        slot.waiting.push(cp);
        if slot.idle {
            slot.idle = false;
            self.shared.wake.notify_one();
        }
    }

    /// The writer is done: the publisher publishes what is left and stops.
    pub fn close(&self) {
        if let Ok(mut slot) = self.shared.slot.lock() {
            slot.closed = true;
            self.shared.wake.notify_one();
        }
    }
}

fn run(shared: &Shared, mut sinks: Vec<Box<dyn Sink>>, interval: Duration, stats: &WitnessStats) {
    let mut failing = vec![false; sinks.len()];
    loop {
        let (batch, closed) = {
            let Ok(mut slot) = shared.slot.lock() else {
                return;
            };
            while slot.waiting.is_empty() && !slot.closed {
                slot.idle = true;
                slot = match shared.wake.wait(slot) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            slot.idle = false;
            (std::mem::take(&mut slot.waiting), slot.closed)
        };
        let mut wait = interval;
        if !batch.is_empty() && !publish(&mut sinks, &mut failing, &batch, stats) {
            // Retried after a pause even if nothing new is committed: on a quiet server
            // the last checkpoint must still leave. Newer ones replace it meanwhile.
            wait = interval.max(RETRY);
            if let (Ok(mut slot), Some(newest)) = (shared.slot.lock(), batch.last())
                && slot.waiting.is_empty()
            {
                slot.waiting.push(newest.clone());
            }
        }
        if closed {
            return;
        }
        // The next one waits out the interval, unless the writer stops meanwhile.
        if !wait.is_zero()
            && let Ok(slot) = shared.slot.lock()
        {
            let _ = shared.wake.wait_timeout_while(slot, wait, |s| !s.closed);
        }
    }
}

/// A failed publication is retried after at least this long.
const RETRY: Duration = Duration::from_secs(1);

/// Hands `batch` to every sink; true when every one took it. Only then does it count as
/// published (`aegis_audit_witness_tree_size` is what has left the host).
fn publish(
    sinks: &mut [Box<dyn Sink>],
    failing: &mut [bool],
    batch: &[SignedCheckpoint],
    stats: &WitnessStats,
) -> bool {
    let mut all = true;
    for (sink, failing) in sinks.iter_mut().zip(failing) {
        match sink.publish(batch) {
            Ok(()) => {
                if *failing {
                    crate::log!(info, "{}: publishing checkpoints again", sink.name());
                }
                *failing = false;
            }
            Err(e) => {
                all = false;
                stats.failures.fetch_add(1, Ordering::Relaxed);
                if !*failing {
                    crate::log!(
                        error,
                        "{}: cannot publish audit checkpoints (will retry with the next): {e}",
                        sink.name()
                    );
                }
                *failing = true;
            }
        }
    }
    if all {
        stats
            .published
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Some(last) = batch.last() {
            stats
                .published_size
                .store(last.tree_size, Ordering::Relaxed);
        }
    }
    all
}

/// The last checkpoint of a witness file (`None` for a missing or empty file), read from
/// its end: what a restarting writer checks its log against.
pub fn last_in_file(path: &Path) -> Result<Option<SignedCheckpoint>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let shown = path.display();
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("witness file {shown}: {e}")),
    };
    let len = f
        .metadata()
        .map_err(|e| format!("witness file {shown}: {e}"))?
        .len();
    // A line is ~330 bytes; the tail holds the last whole one.
    let from = len.saturating_sub(4096);
    let mut tail = String::new();
    f.seek(SeekFrom::Start(from))
        .and_then(|_| f.read_to_string(&mut tail))
        .map_err(|e| format!("witness file {shown}: {e}"))?;
    // A last line without its newline was torn by a crash mid-write: the one before it
    // is the last whole checkpoint.
    let whole = match tail.rfind('\n') {
        Some(i) => &tail[..i],
        None => "",
    };
    let mut lines = whole.lines().filter(|l| !l.trim().is_empty());
    let Some(last) = lines.next_back() else {
        return Ok(None);
    };
    SignedCheckpoint::parse_line(last)
        .map(Some)
        .map_err(|e| format!("witness file {shown}, last line: {e}"))
}

/// Reads a witness file: its checkpoints in order, or the first bad line (1-based) and why.
pub fn read_file(path: &Path) -> Result<WitnessLines, String> {
    let file = File::open(path).map_err(|e| format!("witness file {}: {e}", path.display()))?;
    Ok(WitnessLines {
        lines: std::io::BufRead::lines(std::io::BufReader::new(file)),
        number: 0,
        path: path.to_path_buf(),
    })
}

/// The checkpoints of a witness file, read one line at a time (constant memory).
pub struct WitnessLines {
    lines: std::io::Lines<std::io::BufReader<File>>,
    number: u64,
    path: PathBuf,
}

impl Iterator for WitnessLines {
    /// (line number, checkpoint) or an error naming the file and line.
    type Item = Result<(u64, SignedCheckpoint), String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = self.lines.next()?;
            self.number += 1;
            let where_ = format!("witness file {} line {}", self.path.display(), self.number);
            let text = match line {
                Ok(t) => t,
                Err(e) => return Some(Err(format!("{where_}: {e}"))),
            };
            if text.trim().is_empty() {
                continue;
            }
            return Some(
                SignedCheckpoint::parse_line(&text)
                    .map(|cp| (self.number, cp))
                    .map_err(|e| format!("{where_}: {e}")),
            );
        }
    }
}
