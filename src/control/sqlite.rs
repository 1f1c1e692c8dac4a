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
use super::pb;
use super::records::{
    Agent, Approval, Budget, Incident, IncidentEvent, KillMark, Revision, Revocation, Scope,
    Tenant, Token,
};
use super::store::{ControlStore, FEED_KEPT, Feed, Outbox, Txn, Work, announce, next_chain};
use crate::types::{AgentStatus, IncidentStatus};

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
    /// What the blocking tasks and the poller share.
    shared: Arc<Shared>,
    /// Whether the task that notices other processes' commits runs.
    watching: std::sync::Once,
}

/// The connection and what goes with it, shared with blocking tasks and the poller.
#[derive(Debug)]
struct Shared {
    conn: Mutex<Connection>,
    /// The newest committed version, for [`ControlStore::subscribe`].
    committed: tokio::sync::watch::Sender<u64>,
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
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                committed: tokio::sync::watch::Sender::new(version),
                feed_kept: FEED_KEPT,
                read_only: false,
            }),
            watching: std::sync::Once::new(),
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
        // A file from before a column was added is not migrated here (read-only): a
        // temporary view, which shadows the table for this connection only, supplies the
        // column's default.
        let has_decisions: bool = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('incidents') WHERE name = 'decisions'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )
            .map_err(|e| named(&e))?;
        if !has_decisions {
            conn.execute_batch(
                "CREATE TEMP VIEW incidents AS SELECT *, '[]' AS decisions FROM main.incidents",
            )
            .map_err(|e| named(&e))?;
        }
        let version = meta(&conn, "version").map_err(|e| named(&e))?;
        Ok(Self {
            path: path.to_path_buf(),
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                committed: tokio::sync::watch::Sender::new(version),
                feed_kept: FEED_KEPT,
                read_only: true,
            }),
            watching: std::sync::Once::new(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn join_err(e: tokio::task::JoinError) -> ControlError {
    ControlError::Store(format!("store task failed: {e}"))
}

#[async_trait::async_trait]
impl ControlStore for SqliteStore {
    async fn transact(&self, work: Arc<Work<'static>>) -> Result<(), ControlError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.transact_here(work.as_ref()))
            .await
            .map_err(join_err)?
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Feed, ControlError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.changes_here(after, limit))
            .await
            .map_err(join_err)?
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        // Another process sharing the file commits without telling this one: the stored
        // version is polled while the store lives and a runtime is there to poll on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.watching.call_once(|| {
                runtime.spawn(watch_foreign_commits(Arc::downgrade(&self.shared)));
            });
        }
        self.shared.committed.subscribe()
    }
}

impl Shared {
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
async fn watch_foreign_commits(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(FOREIGN_COMMIT_POLL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let polled = tokio::task::spawn_blocking(move || {
            let version = {
                let c = shared.conn.lock().unwrap_or_else(|p| p.into_inner());
                meta(&c, "version")
            };
            version.map(|v| announce(&shared.committed, v))
        })
        .await;
        match polled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => crate::log!(warn, "control store: polling for other writers failed: {e}"),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::rules;

    fn tenant(name: &str, mode: &str) -> Tenant {
        Tenant {
            name: name.into(),
            mode: mode.parse().expect("mode"),
            autonomy_level: 1,
            updated_at: 1,
            updated_by: "test".into(),
        }
    }

    fn open(path: &Path) -> Arc<dyn ControlStore> {
        Arc::new(SqliteStore::open(path).expect("open"))
    }

    async fn put(store: &Arc<dyn ControlStore>, t: Tenant) -> u64 {
        store
            .run(move |tx| rules::put_tenant(tx, &t))
            .await
            .expect("put")
            .version
    }

    async fn changes(store: &Arc<dyn ControlStore>, after: u64) -> Vec<pb::WatchEvent> {
        match store.changes_since(after, 1000).await.expect("feed") {
            Feed::Changes(events) => events,
            Feed::Gap => panic!("a gap after {after}"),
        }
    }

    #[tokio::test]
    async fn the_feed_holds_every_committed_change_in_order() {
        use pb::state_item::Item;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir.path().join(crate::config::CONTROL_DB_FILE));
        let first = put(&store, tenant("acme", "enforce")).await;
        let second = put(&store, tenant("acme", "shadow")).await;
        let (epoch, raised) = store
            .run(|tx| rules::raise_epoch(tx).map(|(e, v, _)| (e, v)))
            .await
            .expect("raise");

        let all = changes(&store, 0).await;
        let versions: Vec<u64> = all.iter().map(|e| e.version).collect();
        assert_eq!(versions, vec![first, second, raised]);
        let mode = |e: &pb::WatchEvent| match e.items.first().and_then(|i| i.item.as_ref()) {
            Some(Item::Tenant(t)) => t.mode.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(mode(&all[0]), "enforce");
        assert_eq!(mode(&all[1]), "shadow");
        // The epoch raise is an event with no items, at the new epoch.
        assert!(all[2].items.is_empty());
        assert_eq!(all[2].epoch, epoch);
        assert!(all.iter().all(|e| !e.snapshot));

        // Only what came after the version asked for.
        assert_eq!(changes(&store, first).await.len(), 2);
        assert!(changes(&store, raised).await.is_empty());
    }

    #[tokio::test]
    async fn a_reader_behind_the_pruned_feed_is_told_to_take_a_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sqlite =
            SqliteStore::open(&dir.path().join(crate::config::CONTROL_DB_FILE)).expect("open");
        Arc::get_mut(&mut sqlite.shared)
            .expect("not shared yet")
            .feed_kept = 5;
        let store: Arc<dyn ControlStore> = Arc::new(sqlite);
        let mut last = 0;
        for i in 0..106 {
            let mode = if i % 2 == 0 { "enforce" } else { "shadow" };
            last = put(&store, tenant("acme", mode)).await;
        }
        // Pruned at version 105 up to 100: a reader at 99 missed changes, one at 100 did not.
        assert_eq!(store.changes_since(99, 10).await.expect("feed"), Feed::Gap);
        let kept = changes(&store, 100).await.len();
        assert_eq!(kept, usize::try_from(last - 100).expect("small"));
    }

    #[tokio::test]
    async fn a_file_from_before_the_decisions_column_is_read_without_writing_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(crate::config::CONTROL_DB_FILE);
        {
            let store = SqliteStore::open(&path).expect("open");
            let c = store.shared.conn.lock().expect("lock");
            c.execute_batch(
                "ALTER TABLE incidents DROP COLUMN decisions; \
                 INSERT INTO incidents (id, tenant, agent, session, run_id, kind, severity, \
                 summary, evidence, trigger_decision, decided_at_ns, status, created_at_ns, \
                 updated_at, autonomy_level, reported_by, policy_revision) VALUES ('INC-1', \
                 'acme', 'bot', '', '', 'deny_storm', 'high', 'old', '[\"d1\"]', 'd1', 1, \
                 'open', 1, 1, 1, 'sidecar', 'r1')",
            )
            .expect("an older file");
        }
        let before = std::fs::read(&path).expect("read");
        let store: Arc<dyn ControlStore> =
            Arc::new(SqliteStore::open_read_only(&path).expect("open read-only"));
        let found = store
            .run(|tx| tx.incidents(None, None, None))
            .await
            .expect("incidents");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].evidence, ["d1"]);
        assert!(found[0].decisions.is_empty());
        drop(store);
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "nothing written"
        );
    }

    #[tokio::test]
    async fn another_processs_commits_are_announced_to_subscribers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(crate::config::CONTROL_DB_FILE);
        let here = open(&path);
        let other = open(&path);
        let mut announced = here.subscribe();
        let version = put(&other, tenant("acme", "shadow")).await;
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            announced.wait_for(|v| *v >= version),
        )
        .await
        .expect("announced within 5 s")
        .expect("store alive");
        let seen = changes(&here, 0).await;
        assert_eq!(seen.last().map(|e| e.version), Some(version));
    }
}
