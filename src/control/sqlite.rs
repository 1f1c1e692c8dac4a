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

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', 0);
CREATE TABLE IF NOT EXISTS agents (
    tenant TEXT NOT NULL, id TEXT NOT NULL, status TEXT NOT NULL, risk_tier TEXT NOT NULL,
    reason TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL, PRIMARY KEY (tenant, id));
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
    scopes TEXT NOT NULL, issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    revoked_at INTEGER, revoked_reason TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS tokens_by_agent ON tokens (tenant, agent);
CREATE INDEX IF NOT EXISTS tokens_by_session ON tokens (tenant, session);
CREATE TABLE IF NOT EXISTS kills (
    scope INTEGER NOT NULL, tenant TEXT NOT NULL, target TEXT NOT NULL, before INTEGER NOT NULL,
    reason TEXT NOT NULL, actor TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (scope, tenant, target));
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY, mode TEXT NOT NULL, autonomy_level INTEGER NOT NULL,
    updated_at INTEGER NOT NULL, updated_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (
    tenant TEXT NOT NULL, agent TEXT NOT NULL, max_calls INTEGER NOT NULL, max_cost REAL NOT NULL,
    window_secs INTEGER NOT NULL, updated_at INTEGER NOT NULL, updated_by TEXT NOT NULL,
    PRIMARY KEY (tenant, agent));
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
    run_id TEXT NOT NULL, tool TEXT NOT NULL, action TEXT NOT NULL, resource TEXT NOT NULL,
    arguments TEXT NOT NULL, call_hash TEXT NOT NULL, policy_reason TEXT NOT NULL,
    decision_id TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, decided_by TEXT NOT NULL DEFAULT '',
    decided_at INTEGER NOT NULL DEFAULT 0, decision_reason TEXT NOT NULL DEFAULT '',
    override_expires_at INTEGER NOT NULL DEFAULT 0, used_at INTEGER NOT NULL DEFAULT 0,
    used_by_decision TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS approvals_by_agent ON approvals (tenant, agent, status);
CREATE TABLE IF NOT EXISTS policy_bundles (
    digest TEXT PRIMARY KEY, revision TEXT NOT NULL, files BLOB NOT NULL, stored_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
    run_id TEXT NOT NULL, kind TEXT NOT NULL, severity TEXT NOT NULL, summary TEXT NOT NULL,
    evidence TEXT NOT NULL, trigger_decision TEXT NOT NULL, decided_at_ns INTEGER NOT NULL,
    status TEXT NOT NULL, created_at_ns INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    acknowledged_by TEXT NOT NULL DEFAULT '', closed_by TEXT NOT NULL DEFAULT '',
    close_reason TEXT NOT NULL DEFAULT '', actions TEXT NOT NULL DEFAULT '[]',
    autonomy_level INTEGER NOT NULL, reported_by TEXT NOT NULL, policy_revision TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS incidents_by_tenant ON incidents (tenant, status);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, incident TEXT NOT NULL, tenant TEXT NOT NULL,
    url TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    next_at_ms INTEGER NOT NULL, last_error TEXT NOT NULL, created_at_ms INTEGER NOT NULL,
    done_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at_ms);
CREATE TABLE IF NOT EXISTS changes (
    version INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, event BLOB NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('feed_floor', 0);
CREATE TABLE IF NOT EXISTS policy_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, revision TEXT NOT NULL, digest TEXT NOT NULL,
    action TEXT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL);
";

const AGENT_COLUMNS: &str = "tenant, id, status, risk_tier, reason, created_at, updated_at, updated_by, \
     (SELECT count(*) FROM tokens t WHERE t.tenant = agents.tenant AND t.agent = agents.id \
      AND t.revoked_at IS NULL AND t.expires_at > ?1)";
const TOKEN_COLUMNS: &str =
    "jti, tenant, agent, session, scopes, issued_at, expires_at, revoked_at, revoked_reason";
const APPROVAL_COLUMNS: &str = "id, tenant, agent, session, run_id, tool, action, resource, arguments, \
     call_hash, policy_reason, decision_id, status, created_at, expires_at, decided_by, decided_at, \
     decision_reason, override_expires_at, used_at, used_by_decision";

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

/// Columns added since the first release of a table, added to older databases on open.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('incidents') WHERE name = 'decisions'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        conn.execute_batch(
            "ALTER TABLE incidents ADD COLUMN decisions TEXT NOT NULL DEFAULT '[]'",
        )?;
    }
    Ok(())
}

const OUTBOX_COLUMNS: &str =
    "id, incident, tenant, url, payload, state, attempts, next_at_ms, last_error";

fn outbox_row(r: &Row<'_>) -> rusqlite::Result<Outbox> {
    Ok(Outbox {
        id: r.get(0)?,
        incident: r.get(1)?,
        tenant: r.get(2)?,
        url: r.get(3)?,
        payload: r.get(4)?,
        state: r.get(5)?,
        attempts: r.get(6)?,
        next_at_ms: r.get(7)?,
        last_error: r.get(8)?,
    })
}

/// Bumps and returns the watched-state version (inside the caller's transaction).
fn bump(tx: &Connection) -> Result<u64, ControlError> {
    let v: i64 = tx
        .query_row(
            "UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// A counter of the `meta` table (`version`, `epoch`, `feed_floor`).
fn meta(tx: &Connection, key: &str) -> Result<u64, ControlError> {
    let v: i64 = tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .map_err(db_err)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// A stored integer from a u64 (versions, epochs, limits), or an error naming it.
fn stored(what: &str, v: u64) -> Result<i64, ControlError> {
    i64::try_from(v).map_err(|_| db_err(format!("{what} {v} is past what SQLite stores")))
}

/// Appends a committed change to the feed (inside the caller's transaction) and prunes
/// the feed to its last `kept` versions (every 100 versions), remembering the highest
/// pruned.
fn append_change(
    tx: &Connection,
    epoch: u64,
    version: u64,
    items: &[pb::StateItem],
    kept: u64,
) -> Result<(), ControlError> {
    use prost::Message;
    let event = pb::WatchEvent {
        epoch,
        version,
        snapshot: false,
        items: items.to_vec(),
    }
    .encode_to_vec();
    let stored = |v: u64| i64::try_from(v).map_err(|_| db_err(format!("version {v} too large")));
    tx.execute(
        "INSERT INTO changes (version, epoch, event) VALUES (?1, ?2, ?3)",
        params![stored(version)?, stored(epoch)?, event],
    )
    .map_err(db_err)?;
    if let Some(floor) = version.checked_sub(kept).filter(|f| f % 100 == 0) {
        let floor = stored(floor)?;
        let pruned = tx
            .execute("DELETE FROM changes WHERE version <= ?1", [floor])
            .map_err(db_err)?;
        if pruned > 0 {
            tx.execute(
                "UPDATE meta SET value = max(value, ?1) WHERE key = 'feed_floor'",
                [floor],
            )
            .map_err(db_err)?;
        }
    }
    Ok(())
}

fn agent_row(r: &Row<'_>) -> rusqlite::Result<pb::Agent> {
    Ok(pb::Agent {
        tenant: r.get(0)?,
        id: r.get(1)?,
        status: r.get(2)?,
        risk_tier: r.get(3)?,
        reason: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        updated_by: r.get(7)?,
        live_tokens: r
            .get::<_, i64>(8)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))?,
    })
}

fn token_row(r: &Row<'_>) -> rusqlite::Result<pb::TokenInfo> {
    let scopes: String = r.get(4)?;
    let revoked_at: Option<i64> = r.get(7)?;
    Ok(pb::TokenInfo {
        jti: r.get(0)?,
        tenant: r.get(1)?,
        agent: r.get(2)?,
        session: r.get(3)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        issued_at: r.get(5)?,
        expires_at: r.get(6)?,
        status: String::new(),
        revoked_at: revoked_at.unwrap_or(0),
        revoked_reason: r.get(8)?,
    })
}

fn approval_row(r: &Row<'_>) -> rusqlite::Result<pb::Approval> {
    Ok(pb::Approval {
        id: r.get(0)?,
        tenant: r.get(1)?,
        agent: r.get(2)?,
        session: r.get(3)?,
        run_id: r.get(4)?,
        tool: r.get(5)?,
        action: r.get(6)?,
        resource: r.get(7)?,
        arguments: r.get(8)?,
        call_hash: r.get(9)?,
        policy_reason: r.get(10)?,
        decision_id: r.get(11)?,
        status: r.get(12)?,
        created_at: r.get(13)?,
        expires_at: r.get(14)?,
        decided_by: r.get(15)?,
        decided_at: r.get(16)?,
        decision_reason: r.get(17)?,
        override_expires_at: r.get(18)?,
        used_at: r.get(19)?,
        used_by_decision: r.get(20)?,
    })
}

fn revision_row(r: &Row<'_>) -> rusqlite::Result<pb::PolicyRevision> {
    let id: i64 = r.get(0)?;
    Ok(pb::PolicyRevision {
        id: u64::try_from(id).unwrap_or(0),
        revision: r.get(1)?,
        digest: r.get(2)?,
        action: r.get(3)?,
        actor: r.get(4)?,
        reason: r.get(5)?,
        activated_at: r.get(6)?,
        active: false,
    })
}

fn collect<T>(
    rows: rusqlite::MappedRows<'_, impl FnMut(&Row<'_>) -> rusqlite::Result<T>>,
) -> Result<Vec<T>, ControlError> {
    rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
}

/// `" AND col = ?n"` filters for optional values; returns the SQL and the bound values.
fn filters<'a>(first: usize, pairs: &[(&str, Option<&'a str>)]) -> (String, Vec<&'a str>) {
    let mut sql = String::new();
    let mut values = Vec::new();
    for (col, v) in pairs {
        if let Some(v) = v {
            values.push(*v);
            sql.push_str(&format!(" AND {col} = ?{}", first + values.len() - 1));
        }
    }
    (sql, values)
}

const INCIDENT_COLUMNS: &str = "id, tenant, agent, session, run_id, kind, severity, summary, evidence, \
     trigger_decision, decided_at_ns, status, created_at_ns, updated_at, acknowledged_by, closed_by, \
     close_reason, actions, autonomy_level, reported_by, policy_revision, decisions";

fn incident_row(r: &Row<'_>) -> rusqlite::Result<pb::Incident> {
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let text: String = r.get(i)?;
        Ok(serde_json::from_str(&text).unwrap_or_default())
    };
    Ok(pb::Incident {
        id: r.get(0)?,
        tenant: r.get(1)?,
        agent: r.get(2)?,
        session: r.get(3)?,
        run_id: r.get(4)?,
        kind: r.get(5)?,
        severity: r.get(6)?,
        summary: r.get(7)?,
        evidence: list(8)?,
        trigger_decision: r.get(9)?,
        decided_at_ns: r.get(10)?,
        status: r.get(11)?,
        created_at_ns: r.get(12)?,
        updated_at: r.get(13)?,
        acknowledged_by: r.get(14)?,
        closed_by: r.get(15)?,
        close_reason: r.get(16)?,
        actions: list(17)?,
        autonomy_level: r.get(18)?,
        reported_by: r.get(19)?,
        policy_revision: r.get(20)?,
        decisions: {
            let text: String = r.get(21)?;
            serde_json::from_str(&text).unwrap_or_default()
        },
        notifications: Vec::new(),
    })
}

const BUDGET_COLUMNS: &str =
    "tenant, agent, max_calls, max_cost, window_secs, updated_at, updated_by";

fn budget_row(r: &Row<'_>) -> rusqlite::Result<pb::Budget> {
    let calls: i64 = r.get(2)?;
    let window: i64 = r.get(4)?;
    Ok(pb::Budget {
        tenant: r.get(0)?,
        agent: r.get(1)?,
        max_calls: u64::try_from(calls).unwrap_or(0),
        max_cost: r.get(3)?,
        window_secs: u64::try_from(window).unwrap_or(0),
        updated_at: r.get(5)?,
        updated_by: r.get(6)?,
        ..Default::default()
    })
}

fn tenant_row(r: &Row<'_>) -> rusqlite::Result<pb::Tenant> {
    Ok(pb::Tenant {
        name: r.get(0)?,
        mode: r.get(1)?,
        autonomy_level: r.get(2)?,
        updated_at: r.get(3)?,
        updated_by: r.get(4)?,
    })
}

/// A unit of work's view of one SQLite transaction.
struct SqliteTxn<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    feed_kept: u64,
    /// The version this transaction published, announced after the commit.
    published: Option<u64>,
}

impl SqliteTxn<'_> {
    fn all<T>(
        &self,
        sql: &str,
        bound: &[&dyn rusqlite::ToSql],
        row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, ControlError> {
        let mut s = self.tx.prepare(sql).map_err(db_err)?;
        collect(s.query_map(bound, row).map_err(db_err)?)
    }

    fn one<T>(
        &self,
        sql: &str,
        bound: &[&dyn rusqlite::ToSql],
        row: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, ControlError> {
        self.tx
            .query_row(sql, bound, row)
            .optional()
            .map_err(db_err)
    }

    fn exec(&self, sql: &str, bound: &[&dyn rusqlite::ToSql]) -> Result<usize, ControlError> {
        self.tx.execute(sql, bound).map_err(db_err)
    }
}

/// The condition selecting a kill scope's tokens (bound as ?1 tenant, ?2 target).
fn scope_condition(scope: KillScope) -> &'static str {
    match scope {
        KillScope::Session => "tenant = ?1 AND session = ?2",
        KillScope::Agent => "tenant = ?1 AND agent = ?2",
        KillScope::Tenant => "tenant = ?1 AND ?2 = ?2",
        KillScope::All | KillScope::Token | KillScope::Unspecified => "?1 = ?1 AND ?2 = ?2",
    }
}

impl Txn for SqliteTxn<'_> {
    fn epoch(&mut self) -> Result<u64, ControlError> {
        meta(self.tx, "epoch")
    }

    fn version(&mut self) -> Result<u64, ControlError> {
        meta(self.tx, "version")
    }

    fn publish(
        &mut self,
        items: &[pb::StateItem],
        epoch_event: bool,
    ) -> Result<(u64, u64), ControlError> {
        let version = bump(self.tx)?;
        let epoch = meta(self.tx, "epoch")?;
        if !items.is_empty() || epoch_event {
            append_change(self.tx, epoch, version, items, self.feed_kept)?;
        }
        self.published = Some(version);
        Ok((epoch, version))
    }

    fn set_epoch(&mut self, epoch: u64) -> Result<(), ControlError> {
        let epoch = stored("state epoch", epoch)?;
        self.exec("UPDATE meta SET value = ?1 WHERE key = 'epoch'", &[&epoch])
            .map(|_| ())
    }

    fn agent(
        &mut self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<pb::Agent>, ControlError> {
        self.one(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE tenant = ?2 AND id = ?3"),
            &[&now, &tenant, &id],
            agent_row,
        )
    }

    fn agents(
        &mut self,
        tenant: Option<&str>,
        status: Option<&str>,
        now: i64,
    ) -> Result<Vec<pb::Agent>, ControlError> {
        let (cond, values) = filters(2, &[("tenant", tenant), ("status", status)]);
        let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&now];
        bound.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
        self.all(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE 1 = 1{cond} ORDER BY tenant, id"),
            &bound,
            agent_row,
        )
    }

    fn insert_agent(&mut self, a: &pb::Agent) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO agents (tenant, id, status, risk_tier, reason, created_at, updated_at, \
             updated_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
            params![
                a.tenant,
                a.id,
                a.status,
                a.risk_tier,
                a.reason,
                a.created_at,
                a.updated_by
            ],
        )
        .map(|_| ())
    }

    fn update_agent(&mut self, a: &pb::Agent) -> Result<(), ControlError> {
        self.exec(
            "UPDATE agents SET status = ?3, reason = ?4, updated_at = ?5, updated_by = ?6 \
             WHERE tenant = ?1 AND id = ?2",
            params![
                a.tenant,
                a.id,
                a.status,
                a.reason,
                a.updated_at,
                a.updated_by
            ],
        )
        .map(|_| ())
    }

    fn token(&mut self, jti: &str) -> Result<Option<pb::TokenInfo>, ControlError> {
        self.one(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = ?1"),
            &[&jti],
            token_row,
        )
    }

    fn tokens(
        &mut self,
        tenant: &str,
        agent: Option<&str>,
        unrevoked_expiring_after: Option<i64>,
    ) -> Result<Vec<pb::TokenInfo>, ControlError> {
        let after = unrevoked_expiring_after.unwrap_or(i64::MIN);
        let live = if unrevoked_expiring_after.is_some() {
            " AND revoked_at IS NULL AND expires_at > ?2"
        } else {
            " AND ?2 = ?2"
        };
        let (cond, values) = filters(3, &[("agent", agent)]);
        let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&tenant, &after];
        bound.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant = ?1{live}{cond} \
                 ORDER BY issued_at, jti"
            ),
            &bound,
            token_row,
        )
    }

    fn tokens_in_scope(
        &mut self,
        scope: KillScope,
        tenant: &str,
        target: &str,
        expiring_after: i64,
    ) -> Result<Vec<pb::TokenInfo>, ControlError> {
        let cond = scope_condition(scope);
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE {cond} AND revoked_at IS NULL \
                 AND expires_at > ?3 ORDER BY issued_at, jti"
            ),
            &[&tenant, &target, &expiring_after],
            token_row,
        )
    }

    fn revoked_tokens(
        &mut self,
        expiring_after: i64,
    ) -> Result<Vec<pb::RevokedToken>, ControlError> {
        self.all(
            "SELECT jti, expires_at, tenant FROM tokens WHERE revoked_at IS NOT NULL \
             AND expires_at > ?1",
            &[&expiring_after],
            |r| {
                Ok(pb::RevokedToken {
                    jti: r.get(0)?,
                    expires_at: r.get(1)?,
                    tenant: r.get(2)?,
                })
            },
        )
    }

    fn insert_token(&mut self, t: &pb::TokenInfo) -> Result<(), ControlError> {
        let scopes = serde_json::to_string(&t.scopes).map_err(db_err)?;
        self.exec(
            "INSERT INTO tokens (jti, tenant, agent, session, scopes, issued_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.jti,
                t.tenant,
                t.agent,
                t.session,
                scopes,
                t.issued_at,
                t.expires_at
            ],
        )
        .map(|_| ())
    }

    fn revoke_token(&mut self, jti: &str, at: i64, reason: &str) -> Result<(), ControlError> {
        self.exec(
            "UPDATE tokens SET revoked_at = ?2, revoked_reason = ?3 WHERE jti = ?1",
            params![jti, at, reason],
        )
        .map(|_| ())
    }

    fn scope_known(
        &mut self,
        scope: KillScope,
        tenant: &str,
        target: &str,
    ) -> Result<bool, ControlError> {
        let sql = match scope {
            KillScope::Session => "SELECT count(*) FROM tokens WHERE tenant = ?1 AND session = ?2",
            KillScope::Agent => {
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = ?1 AND agent = ?2) + \
                 (SELECT count(*) FROM agents WHERE tenant = ?1 AND id = ?2)"
            }
            KillScope::Tenant => {
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = ?1) + \
                 (SELECT count(*) FROM agents WHERE tenant = ?1) + \
                 (SELECT count(*) FROM tenants WHERE name = ?1) + 0 * length(?2)"
            }
            KillScope::All | KillScope::Token | KillScope::Unspecified => {
                "SELECT 1 + 0 * length(?1 || ?2)"
            }
        };
        let n: i64 = self
            .tx
            .query_row(sql, params![tenant, target], |r| r.get(0))
            .map_err(db_err)?;
        Ok(n > 0)
    }

    fn kill_mark(
        &mut self,
        scope: KillScope,
        tenant: &str,
        target: &str,
    ) -> Result<Option<pb::KillMark>, ControlError> {
        self.one(
            "SELECT scope, tenant, target, before FROM kills \
             WHERE scope = ?1 AND tenant = ?2 AND target = ?3",
            &[&(scope as i32), &tenant, &target],
            kill_row,
        )
    }

    fn kill_marks(&mut self) -> Result<Vec<pb::KillMark>, ControlError> {
        self.all(
            "SELECT scope, tenant, target, before FROM kills ORDER BY scope, tenant, target",
            &[],
            kill_row,
        )
    }

    fn put_kill_mark(
        &mut self,
        mark: &pb::KillMark,
        reason: &str,
        actor: &str,
        at: i64,
    ) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO kills (scope, tenant, target, before, reason, actor, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (scope, tenant, target) DO UPDATE SET before = excluded.before, \
             reason = excluded.reason, actor = excluded.actor, at = excluded.at",
            params![
                mark.scope,
                mark.tenant,
                mark.target,
                mark.before,
                reason,
                actor,
                at
            ],
        )
        .map(|_| ())
    }

    fn tenant(&mut self, name: &str) -> Result<Option<pb::Tenant>, ControlError> {
        self.one(
            "SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants WHERE name = ?1",
            &[&name],
            tenant_row,
        )
    }

    fn tenants(&mut self) -> Result<Vec<pb::Tenant>, ControlError> {
        self.all(
            "SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants ORDER BY name",
            &[],
            tenant_row,
        )
    }

    fn put_tenant(&mut self, t: &pb::Tenant) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO tenants (name, mode, autonomy_level, updated_at, updated_by) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, \
             autonomy_level = excluded.autonomy_level, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            params![t.name, t.mode, t.autonomy_level, t.updated_at, t.updated_by],
        )
        .map(|_| ())
    }

    fn budgets(
        &mut self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Budget>, ControlError> {
        let (cond, values) = filters(1, &[("tenant", tenant), ("agent", agent)]);
        let bound: Vec<&dyn rusqlite::ToSql> =
            values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        self.all(
            &format!(
                "SELECT {BUDGET_COLUMNS} FROM budgets WHERE 1 = 1{cond} ORDER BY tenant, agent"
            ),
            &bound,
            budget_row,
        )
    }

    fn put_budget(&mut self, b: &pb::Budget) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO budgets (tenant, agent, max_calls, max_cost, window_secs, updated_at, \
             updated_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (tenant, agent) DO UPDATE \
             SET max_calls = excluded.max_calls, max_cost = excluded.max_cost, \
             window_secs = excluded.window_secs, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            params![
                b.tenant,
                b.agent,
                i64::try_from(b.max_calls).unwrap_or(i64::MAX),
                b.max_cost,
                i64::try_from(b.window_secs).unwrap_or(i64::MAX),
                b.updated_at,
                b.updated_by
            ],
        )
        .map(|_| ())
    }

    fn delete_budget(&mut self, tenant: &str, agent: &str) -> Result<(), ControlError> {
        self.exec(
            "DELETE FROM budgets WHERE tenant = ?1 AND agent = ?2",
            &[&tenant, &agent],
        )
        .map(|_| ())
    }

    fn approvals(
        &mut self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Approval>, ControlError> {
        let (cond, values) = filters(1, &[("tenant", tenant), ("agent", agent)]);
        let bound: Vec<&dyn rusqlite::ToSql> =
            values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        self.all(
            &format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE 1 = 1{cond} ORDER BY created_at, id"
            ),
            &bound,
            approval_row,
        )
    }

    fn approval(&mut self, tenant: &str, id: &str) -> Result<Option<pb::Approval>, ControlError> {
        self.one(
            &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = ?1 AND id = ?2"),
            &[&tenant, &id],
            approval_row,
        )
    }

    fn insert_approval(&mut self, a: &pb::Approval) -> Result<(), ControlError> {
        self.exec(
            &format!(
                "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"
            ),
            params![
                a.id,
                a.tenant,
                a.agent,
                a.session,
                a.run_id,
                a.tool,
                a.action,
                a.resource,
                a.arguments,
                a.call_hash,
                a.policy_reason,
                a.decision_id,
                a.status,
                a.created_at,
                a.expires_at,
                a.decided_by,
                a.decided_at,
                a.decision_reason,
                a.override_expires_at,
                a.used_at,
                a.used_by_decision
            ],
        )
        .map(|_| ())
    }

    fn update_approval(&mut self, a: &pb::Approval) -> Result<(), ControlError> {
        self.exec(
            "UPDATE approvals SET status = ?3, decided_by = ?4, decided_at = ?5, \
             decision_reason = ?6, override_expires_at = ?7, used_at = ?8, used_by_decision = ?9 \
             WHERE tenant = ?1 AND id = ?2",
            params![
                a.tenant,
                a.id,
                a.status,
                a.decided_by,
                a.decided_at,
                a.decision_reason,
                a.override_expires_at,
                a.used_at,
                a.used_by_decision
            ],
        )
        .map(|_| ())
    }

    fn store_bundle(
        &mut self,
        digest: &str,
        revision: &str,
        files: &[u8],
        at: i64,
    ) -> Result<(), ControlError> {
        self.exec(
            "INSERT OR IGNORE INTO policy_bundles (digest, revision, files, stored_at) \
             VALUES (?1, ?2, ?3, ?4)",
            params![digest, revision, files, at],
        )
        .map(|_| ())
    }

    fn bundle(&mut self, digest: &str) -> Result<Option<Vec<u8>>, ControlError> {
        self.one(
            "SELECT files FROM policy_bundles WHERE digest = ?1",
            &[&digest],
            |r| r.get(0),
        )
    }

    fn append_revision(&mut self, rev: &pb::PolicyRevision) -> Result<u64, ControlError> {
        self.exec(
            "INSERT INTO policy_history (revision, digest, action, actor, reason, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                rev.revision,
                rev.digest,
                rev.action,
                rev.actor,
                rev.reason,
                rev.activated_at
            ],
        )?;
        Ok(u64::try_from(self.tx.last_insert_rowid()).unwrap_or(0))
    }

    fn revisions(&mut self, limit: u32) -> Result<Vec<pb::PolicyRevision>, ControlError> {
        self.all(
            "SELECT id, revision, digest, action, actor, reason, at FROM policy_history \
             ORDER BY id DESC LIMIT ?1",
            &[&limit],
            revision_row,
        )
    }

    fn insert_incident(&mut self, i: &pb::Incident) -> Result<(), ControlError> {
        let evidence = serde_json::to_string(&i.evidence).map_err(db_err)?;
        let actions = serde_json::to_string(&i.actions).map_err(db_err)?;
        let decisions = serde_json::to_string(&i.decisions).map_err(db_err)?;
        self.exec(
            &format!(
                "INSERT INTO incidents ({INCIDENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
            ),
            params![
                i.id,
                i.tenant,
                i.agent,
                i.session,
                i.run_id,
                i.kind,
                i.severity,
                i.summary,
                evidence,
                i.trigger_decision,
                i.decided_at_ns,
                i.status,
                i.created_at_ns,
                i.updated_at,
                i.acknowledged_by,
                i.closed_by,
                i.close_reason,
                actions,
                i.autonomy_level,
                i.reported_by,
                i.policy_revision,
                decisions
            ],
        )
        .map(|_| ())
    }

    fn incident(&mut self, tenant: &str, id: &str) -> Result<Option<pb::Incident>, ControlError> {
        self.one(
            &format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE tenant = ?1 AND id = ?2"),
            &[&tenant, &id],
            incident_row,
        )
    }

    fn incidents(
        &mut self,
        tenant: Option<&str>,
        status: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Incident>, ControlError> {
        let (cond, values) = filters(
            1,
            &[("tenant", tenant), ("status", status), ("agent", agent)],
        );
        let bound: Vec<&dyn rusqlite::ToSql> =
            values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        self.all(
            &format!(
                "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE 1 = 1{cond} ORDER BY created_at_ns, id"
            ),
            &bound,
            incident_row,
        )
    }

    fn update_incident(&mut self, i: &pb::Incident) -> Result<(), ControlError> {
        let actions = serde_json::to_string(&i.actions).map_err(db_err)?;
        self.exec(
            "UPDATE incidents SET status = ?3, acknowledged_by = ?4, closed_by = ?5, \
             close_reason = ?6, updated_at = ?7, actions = ?8 WHERE tenant = ?1 AND id = ?2",
            params![
                i.tenant,
                i.id,
                i.status,
                i.acknowledged_by,
                i.closed_by,
                i.close_reason,
                i.updated_at,
                actions
            ],
        )
        .map(|_| ())
    }

    fn insert_notification(
        &mut self,
        incident: &pb::Incident,
        url: &str,
        payload: &str,
        at_ms: i64,
    ) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO outbox (incident, tenant, url, payload, state, attempts, next_at_ms, \
             last_error, created_at_ms, done_at_ms) VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, '', ?5, 0)",
            params![incident.id, incident.tenant, url, payload, at_ms],
        )
        .map(|_| ())
    }

    fn due_notifications(
        &mut self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Outbox>, ControlError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.all(
            &format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' \
                 AND next_at_ms <= ?1 ORDER BY next_at_ms, id LIMIT ?2"
            ),
            &[&now_ms, &limit],
            outbox_row,
        )
    }

    fn next_notification_at(&mut self) -> Result<Option<i64>, ControlError> {
        self.tx
            .query_row(
                "SELECT min(next_at_ms) FROM outbox WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)
    }

    fn notifications(&mut self, incident: &str) -> Result<Vec<Outbox>, ControlError> {
        self.all(
            &format!("SELECT {OUTBOX_COLUMNS} FROM outbox WHERE incident = ?1 ORDER BY id"),
            &[&incident],
            outbox_row,
        )
    }

    fn update_notification(&mut self, n: &Outbox, done_at_ms: i64) -> Result<(), ControlError> {
        self.exec(
            "UPDATE outbox SET payload = ?2, state = ?3, attempts = ?4, next_at_ms = ?5, \
             last_error = ?6, done_at_ms = ?7 WHERE id = ?1",
            params![
                n.id,
                n.payload,
                n.state,
                n.attempts,
                n.next_at_ms,
                n.last_error,
                done_at_ms
            ],
        )
        .map(|_| ())
    }

    fn delete_finished_notifications(&mut self, before_ms: i64) -> Result<usize, ControlError> {
        self.exec(
            "DELETE FROM outbox WHERE state != 'pending' AND done_at_ms < ?1",
            &[&before_ms],
        )
    }
}

fn kill_row(r: &Row<'_>) -> rusqlite::Result<pb::KillMark> {
    Ok(pb::KillMark {
        scope: r.get(0)?,
        tenant: r.get(1)?,
        target: r.get(2)?,
        before: r.get(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::rules;

    fn tenant(name: &str, mode: &str) -> pb::Tenant {
        pb::Tenant {
            name: name.into(),
            mode: mode.into(),
            autonomy_level: 1,
            updated_at: 1,
            updated_by: "test".into(),
        }
    }

    fn open(path: &Path) -> Arc<dyn ControlStore> {
        Arc::new(SqliteStore::open(path).expect("open"))
    }

    async fn put(store: &Arc<dyn ControlStore>, t: pb::Tenant) -> u64 {
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
            .run(|tx| rules::raise_epoch(tx, 0))
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
        sqlite.feed_kept = 5;
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
