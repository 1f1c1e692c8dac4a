//! The embedded control store: SQLite, `control.db` in the data directory (or the file
//! `control.database_url` names). WAL, `synchronous=FULL`: control actions are rare and
//! each must survive a power loss. A unit of work runs on the blocking pool in one
//! `BEGIN IMMEDIATE` transaction (SQLite has one writer at a time, so a unit of work never
//! conflicts and runs once). Several processes may share the file; each learns of the
//! others' commits by polling the stored version ([`FOREIGN_COMMIT_POLL`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::ControlError;
use super::pb::{self, KillScope};
use super::store::{ControlStore, FEED_KEPT, Feed, Outbox, Txn, Work};

mod queries;
mod rows;
mod schema;

use queries::*;
use rows::*;
use schema::*;

/// The SQLite control store.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// The newest committed version, for [`ControlStore::subscribe`].
    committed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Whether the task that notices other processes' commits runs.
    watching: std::sync::Once,
    /// How many changes the feed keeps ([`FEED_KEPT`]; fewer in tests).
    feed_kept: u64,
    /// Opened read-only (an export from a copy or a live file): units of work take no
    /// write lock, and a write fails.
    read_only: bool,
}

/// How often a subscribed SQLite store looks for changes committed by another process
/// sharing the file; its own are announced as they commit.
const FOREIGN_COMMIT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

fn db_err(e: impl std::fmt::Display) -> ControlError {
    ControlError::Store(e.to_string())
}

// === impl SqliteStore ===

impl SqliteStore {
    /// Opens (creating if needed) the control database; the error names the file.
    pub fn open(path: &Path) -> Result<Self, ControlError> {
        let named = |e: rusqlite::Error| ControlError::Store(format!("{}: {e}", path.display()));
        // Created 0600 if missing; an existing file is opened only through SQLite (see
        // `create_private`: a plain open and close would drop SQLite's locks).
        crate::files::create_private(path)
            .map_err(|e| ControlError::Store(format!("{}: {e}", path.display())))?;
        let conn = crate::files::open_nofollow(path).map_err(named)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=2000; \
             PRAGMA foreign_keys=ON;",
        )
        .and_then(|()| conn.execute_batch(SCHEMA))
        .and_then(|()| migrate(&conn))
        .map_err(named)?;
        // Read every table once: a corrupt file is refused at start-up, naming itself.
        conn.query_row(
            "SELECT (SELECT count(*) FROM agents) + (SELECT count(*) FROM tokens) + \
             (SELECT count(*) FROM approvals) + (SELECT count(*) FROM policy_history)",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(named)?;
        let version = meta(&conn, "version")?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            committed: Arc::new(tokio::sync::watch::Sender::new(version)),
            watching: std::sync::Once::new(),
            feed_kept: FEED_KEPT,
            read_only: false,
        })
    }

    /// Opens an existing control database read-only (nothing created, no schema run, no
    /// write lock taken); the error names the file.
    pub fn open_read_only(path: &Path) -> Result<Self, ControlError> {
        let named =
            |e: &dyn std::fmt::Display| ControlError::Store(format!("{}: {e}", path.display()));
        if !path.exists() {
            return Err(named(&"no such file"));
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(|e| named(&e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| named(&e))?;
        let version = meta(&conn, "version").map_err(|e| named(&e))?;
        Ok(Self {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            committed: Arc::new(tokio::sync::watch::Sender::new(version)),
            watching: std::sync::Once::new(),
            feed_kept: FEED_KEPT,
            read_only: true,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Announces `version` as committed, if it is past what was.
fn announce(committed: &tokio::sync::watch::Sender<u64>, version: u64) {
    committed.send_if_modified(|v| {
        let newer = version > *v;
        *v = (*v).max(version);
        newer
    });
}

fn join_err(e: tokio::task::JoinError) -> ControlError {
    ControlError::Store(format!("store task failed: {e}"))
}

#[async_trait::async_trait]
impl ControlStore for SqliteStore {
    async fn transact(&self, work: Arc<Work<'static>>) -> Result<(), ControlError> {
        let me = self.handle();
        tokio::task::spawn_blocking(move || me.transact_here(work.as_ref()))
            .await
            .map_err(join_err)?
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Feed, ControlError> {
        let me = self.handle();
        tokio::task::spawn_blocking(move || me.changes_here(after, limit))
            .await
            .map_err(join_err)?
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        // Another process sharing the file commits without telling this one: the stored
        // version is polled while the store lives and a runtime is there to poll on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.watching.call_once(|| {
                let conn = Arc::downgrade(&self.conn);
                let committed = self.committed.clone();
                runtime.spawn(watch_foreign_commits(conn, committed));
            });
        }
        self.committed.subscribe()
    }
}

impl SqliteStore {
    /// The parts a blocking task needs, without borrowing the store.
    fn handle(&self) -> Handle {
        Handle {
            conn: self.conn.clone(),
            committed: self.committed.clone(),
            feed_kept: self.feed_kept,
            read_only: self.read_only,
        }
    }
}

/// What a blocking task holds of a [`SqliteStore`].
struct Handle {
    conn: Arc<Mutex<Connection>>,
    committed: Arc<tokio::sync::watch::Sender<u64>>,
    feed_kept: u64,
    read_only: bool,
}

impl Handle {
    fn transact_here(&self, work: &Work<'_>) -> Result<(), ControlError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let behavior = if self.read_only {
            rusqlite::TransactionBehavior::Deferred
        } else {
            rusqlite::TransactionBehavior::Immediate
        };
        let tx = conn.transaction_with_behavior(behavior).map_err(db_err)?;
        let mut t = SqliteTxn {
            tx: &tx,
            feed_kept: self.feed_kept,
            published: None,
        };
        work(&mut t)?;
        let published = t.published;
        tx.commit().map_err(db_err)?;
        if let Some(version) = published {
            announce(&self.committed, version);
        }
        Ok(())
    }

    fn changes_here(&self, after: u64, limit: usize) -> Result<Feed, ControlError> {
        use prost::Message;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(db_err)?;
        if after < meta(&tx, "feed_floor")? {
            return Ok(Feed::Gap);
        }
        let mut s = tx
            .prepare("SELECT event FROM changes WHERE version > ?1 ORDER BY version LIMIT ?2")
            .map_err(db_err)?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = s
            .query_map(params![after, limit], |r| r.get::<_, Vec<u8>>(0))
            .map_err(db_err)?;
        let mut events = Vec::new();
        for bytes in collect(rows)? {
            let event = pb::WatchEvent::decode(bytes.as_slice())
                .map_err(|e| db_err(format!("a stored change does not decode: {e}")))?;
            events.push(event);
        }
        Ok(Feed::Changes(events))
    }
}

/// Announces the version of commits made by other connections to the file, until the
/// store is dropped: the stored version is read every [`FOREIGN_COMMIT_POLL`] (one row by
/// primary key) and announced when it is past what was.
async fn watch_foreign_commits(
    conn: std::sync::Weak<Mutex<Connection>>,
    committed: Arc<tokio::sync::watch::Sender<u64>>,
) {
    loop {
        tokio::time::sleep(FOREIGN_COMMIT_POLL).await;
        let Some(conn) = conn.upgrade() else { return };
        let polled = tokio::task::spawn_blocking(move || {
            let c = conn.lock().unwrap_or_else(|p| p.into_inner());
            meta(&c, "version")
        })
        .await;
        match polled {
            Ok(Ok(version)) => {
                committed.send_if_modified(|v| {
                    let newer = version > *v;
                    *v = (*v).max(version);
                    newer
                });
            }
            Ok(Err(e)) => crate::log!(warn, "control store: polling for other writers failed: {e}"),
            Err(_) => return,
        }
    }
}
