//! The control store: agents, tokens, kills, tenants, budgets, approvals and policy
//! revisions, behind one narrow trait ([`ControlStore`]) so that a second backend
//! (PostgreSQL, for several control-plane replicas) is an added file, not a rewrite.
//!
//! Every change a data plane must see (agent status, a revoked token, a kill mark, tenant
//! settings, a budget, the active policy) bumps the store's version in the same
//! transaction and returns the changed items as a [`Change`]: the control plane publishes
//! exactly that, at exactly that version.
//!
//! [`SqliteStore`] keeps everything in `control.db` in the data directory (WAL,
//! `synchronous=FULL`: control actions are rare and each must survive a power loss).
//! Calls block; the core runs them on the blocking pool.
#![allow(missing_docs, clippy::indexing_slicing)] // until the store rewrite (issue 16) lands

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::ControlError;
use super::pb::{self, KillScope, state_item::Item};

/// File name of the control database in the data directory.
pub const CONTROL_DB_FILE: &str = "control.db";

/// How long past its expiry a token still counts for revocation. Data planes accept a
/// token up to `token.leeway_secs` after `exp` (clock skew), so a revoked token must stay
/// in every snapshot, and stay revocable, a while after it expired: an hour is far above
/// any leeway a deployment would set.
pub const EXPIRED_SLACK_SECS: i64 = 3600;

/// A change to the watched state: the action's result, the version it was stored at and
/// the items data planes must apply (empty: nothing they see changed).
#[derive(Debug, Clone)]
pub struct Change<T> {
    pub value: T,
    /// The epoch the change was stored in (raised only by an operator's confirmation of
    /// a restore) and its version.
    pub epoch: u64,
    pub version: u64,
    pub items: Vec<pb::StateItem>,
}

/// What the control plane stores. Times are Unix seconds; `now` is passed in so that
/// expiry is judged by the caller's clock, once per action.
pub trait ControlStore: Send + Sync + std::fmt::Debug {
    /// The whole watched state and its version.
    fn snapshot(&self, now: i64) -> Result<(u64, Vec<pb::StateItem>), ControlError>;
    /// The watched state's (epoch, version).
    fn state_version(&self) -> Result<(u64, u64), ControlError>;
    /// Raises the epoch past both its own and `reported` ([`next_epoch`]), and the
    /// version with it (an operator confirmed that the state held now, restored from a
    /// backup, is intended); returns the new pair.
    fn raise_epoch(&self, reported: u64) -> Result<(u64, u64), ControlError>;

    fn register_agent(&self, agent: &pb::Agent) -> Result<Change<pb::Agent>, ControlError>;
    fn agent(&self, tenant: &str, id: &str, now: i64) -> Result<Option<pb::Agent>, ControlError>;
    fn agents(
        &self,
        tenant: Option<&str>,
        status: Option<&str>,
        now: i64,
    ) -> Result<Vec<pb::Agent>, ControlError>;
    /// Moves an agent to `status`; refuses a revoked agent (terminal) and a no-op.
    fn set_agent_status(
        &self,
        tenant: &str,
        id: &str,
        status: &str,
        reason: &str,
        actor: &str,
        now: i64,
    ) -> Result<Change<pb::Agent>, ControlError>;

    /// The latest kill mark covering a token of (tenant, agent, session), or `i64::MIN`.
    fn kill_floor(&self, tenant: &str, agent: &str, session: &str) -> Result<i64, ControlError>;
    fn insert_token(&self, token: &pb::TokenInfo) -> Result<(), ControlError>;
    fn token(&self, jti: &str, now: i64) -> Result<Option<pb::TokenInfo>, ControlError>;
    fn tokens(
        &self,
        tenant: &str,
        agent: Option<&str>,
        all: bool,
        now: i64,
    ) -> Result<Vec<pb::TokenInfo>, ControlError>;
    /// Revokes a live token; returns it as revoked.
    fn revoke_token(
        &self,
        jti: &str,
        reason: &str,
        now: i64,
    ) -> Result<Change<pb::TokenInfo>, ControlError>;
    /// Stores `new` and revokes `old_jti` in one transaction; returns the old token.
    fn rotate_token(
        &self,
        old_jti: &str,
        new: &pb::TokenInfo,
        reason: &str,
        now: i64,
    ) -> Result<Change<pb::TokenInfo>, ControlError>;
    /// Records a kill mark and marks the live tokens it covers revoked; counts them.
    fn kill(
        &self,
        mark: &pb::KillMark,
        reason: &str,
        actor: &str,
        now: i64,
    ) -> Result<Change<pb::KillResponse>, ControlError>;

    fn tenant(&self, name: &str) -> Result<Option<pb::Tenant>, ControlError>;
    fn put_tenant(&self, tenant: &pb::Tenant) -> Result<Change<pb::Tenant>, ControlError>;

    /// Sets (both limits 0: removes) an agent's budget.
    fn put_budget(&self, budget: &pb::Budget) -> Result<Change<pb::Budget>, ControlError>;
    fn budgets(
        &self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Budget>, ControlError>;

    /// Raises a pending approval, or returns the pending one for the same call (and, with
    /// `same_session`, the same session: an override is redeemed only in the session that
    /// raised it, so another session's pending approval is of no use), or refuses when the
    /// agent already has `max_pending` pending.
    fn request_approval(
        &self,
        approval: &pb::Approval,
        max_pending: u32,
        same_session: bool,
        now: i64,
    ) -> Result<pb::RequestApprovalResponse, ControlError>;
    fn approvals(
        &self,
        tenant: Option<&str>,
        status: Option<&str>,
        agent: Option<&str>,
        now: i64,
    ) -> Result<Vec<pb::Approval>, ControlError>;
    fn approval(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<pb::Approval>, ControlError>;
    /// Approves or denies a pending, unexpired approval; `None` if it is not one.
    #[allow(clippy::too_many_arguments)]
    fn decide_approval(
        &self,
        tenant: &str,
        id: &str,
        approve: bool,
        actor: &str,
        reason: &str,
        override_expires_at: i64,
        now: i64,
    ) -> Result<Option<pb::Approval>, ControlError>;
    /// Marks an approved approval with an unexpired override used; false if it is not one.
    fn use_approval(
        &self,
        tenant: &str,
        id: &str,
        decision_id: &str,
        now: i64,
    ) -> Result<bool, ControlError>;

    /// Stores the bundle (if new) and appends an activation to the history.
    fn activate_policy(
        &self,
        revision: &pb::PolicyRevision,
        bundle: &[u8],
    ) -> Result<Change<pb::PolicyRevision>, ControlError>;
    /// Newest first.
    fn policy_history(&self, limit: u32) -> Result<Vec<pb::PolicyRevision>, ControlError>;
    fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>, ControlError>;

    /// Stores an incident and, in the same transaction, its webhook notifications
    /// (url, payload) in the outbox: none is lost if the process stops right after.
    fn insert_incident(
        &self,
        incident: &pb::Incident,
        notifications: &[(String, String)],
    ) -> Result<(), ControlError>;
    fn incidents(
        &self,
        tenant: Option<&str>,
        status: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Incident>, ControlError>;
    fn incident(&self, tenant: &str, id: &str) -> Result<Option<pb::Incident>, ControlError>;
    /// Acknowledges (from open) or closes (from open or acknowledged) an incident; `None`
    /// if it is not in a state that allows it.
    fn set_incident_status(
        &self,
        tenant: &str,
        id: &str,
        status: &str,
        actor: &str,
        reason: &str,
        now: i64,
    ) -> Result<Option<pb::Incident>, ControlError>;
    /// Outbox entries due for delivery at `now_ms`, oldest first.
    fn due_notifications(&self, now_ms: i64, limit: usize) -> Result<Vec<Outbox>, ControlError>;
    /// The earliest `next_at_ms` of an undelivered entry.
    fn next_notification_at(&self) -> Result<Option<i64>, ControlError>;
    /// Records a delivery attempt: delivered, retry at `next_at_ms`, or given up
    /// (`next_at_ms` = None and not delivered).
    fn notification_attempted(
        &self,
        id: i64,
        delivered: bool,
        next_at_ms: Option<i64>,
        error: &str,
        now_ms: i64,
    ) -> Result<(), ControlError>;
    /// The notifications of an incident.
    fn notifications(&self, incident: &str) -> Result<Vec<Outbox>, ControlError>;
    /// Replaces the payloads of an incident's notifications not yet attempted (after the
    /// response engine acted, so they say what it did).
    fn refresh_notifications(
        &self,
        incident: &str,
        notifications: &[(String, String)],
    ) -> Result<(), ControlError>;
    /// Deletes delivered and failed notifications finished before `before_ms`; returns how many.
    fn prune_notifications(&self, before_ms: i64) -> Result<usize, ControlError>;
    /// Appends what the response engine did.
    fn add_incident_actions(
        &self,
        tenant: &str,
        id: &str,
        actions: &[String],
    ) -> Result<(), ControlError>;
}

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
    conn: Mutex<Connection>,
}

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
        crate::audit::store::create_private(path)
            .map_err(|e| ControlError::Store(format!("{}: {e}", path.display())))?;
        let conn = crate::audit::store::open_nofollow(path).map_err(named)?;
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
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
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

/// One webhook notification in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    pub id: i64,
    pub incident: String,
    pub tenant: String,
    pub url: String,
    pub payload: String,
    /// pending, delivered or failed (given up).
    pub state: String,
    pub attempts: u32,
    pub next_at_ms: i64,
    pub last_error: String,
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

impl SqliteStore {
    /// Runs `f` in one transaction that also bumps the watched-state version: `f` returns
    /// the action's result and the items data planes must apply.
    fn change<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(T, Vec<pb::StateItem>), ControlError>,
    ) -> Result<Change<T>, ControlError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            let (value, items) = f(&tx)?;
            let version = bump(&tx)?;
            let epoch = meta(&tx, "epoch")?;
            tx.commit().map_err(db_err)?;
            Ok(Change {
                value,
                epoch,
                version,
                items,
            })
        })
    }
}

/// How far above its own epoch a sidecar's report is believed ([`next_epoch`]).
pub const MAX_EPOCH_REPORT_AHEAD: u64 = 1_000_000;

/// The epoch a confirmed restore moves to: one past both the control plane's own
/// (`own`, from the restored database) and `reported`, the highest a sidecar said it held.
/// The fleet may hold an epoch the restored database never saw (a restore confirmed after
/// the backup was taken); raising only the database's would hand out an epoch the fleet
/// already had, with another history. A sidecar's report comes with its credential and
/// can be forged, so it is believed at most [`MAX_EPOCH_REPORT_AHEAD`] above `own`.
pub fn next_epoch(own: u64, reported: u64) -> Result<u64, ControlError> {
    let believed = reported.min(own.saturating_add(MAX_EPOCH_REPORT_AHEAD));
    own.max(believed)
        .checked_add(1)
        .filter(|e| i64::try_from(*e).is_ok())
        .ok_or_else(|| {
            ControlError::precondition(format!(
                "state epoch {} cannot be raised further",
                own.max(believed)
            ))
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

/// A counter of the `meta` table (`version`, `epoch`).
fn meta(tx: &Connection, key: &str) -> Result<u64, ControlError> {
    let v: i64 = tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .map_err(db_err)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn item(i: Item) -> pb::StateItem {
    pb::StateItem { item: Some(i) }
}

fn agent_item(a: &pb::Agent) -> pb::StateItem {
    item(Item::Agent(pb::AgentState {
        tenant: a.tenant.clone(),
        id: a.id.clone(),
        status: a.status.clone(),
        risk_tier: a.risk_tier.clone(),
    }))
}

fn tenant_item(t: &pb::Tenant) -> pb::StateItem {
    item(Item::Tenant(pb::TenantState {
        name: t.name.clone(),
        mode: t.mode.clone(),
        autonomy_level: t.autonomy_level,
    }))
}

fn budget_item(b: &pb::Budget) -> pb::StateItem {
    item(Item::Budget(pb::BudgetState {
        tenant: b.tenant.clone(),
        agent: b.agent.clone(),
        max_calls: b.max_calls,
        max_cost: b.max_cost,
        window_secs: b.window_secs,
    }))
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

fn token_row(now: i64) -> impl Fn(&Row<'_>) -> rusqlite::Result<pb::TokenInfo> {
    move |r| {
        let scopes: String = r.get(4)?;
        let revoked_at: Option<i64> = r.get(7)?;
        let expires_at: i64 = r.get(6)?;
        let status = if revoked_at.is_some() {
            "revoked"
        } else if expires_at <= now {
            "expired"
        } else {
            "live"
        };
        Ok(pb::TokenInfo {
            jti: r.get(0)?,
            tenant: r.get(1)?,
            agent: r.get(2)?,
            session: r.get(3)?,
            scopes: serde_json::from_str(&scopes).unwrap_or_default(),
            issued_at: r.get(5)?,
            expires_at,
            status: status.into(),
            revoked_at: revoked_at.unwrap_or(0),
            revoked_reason: r.get(8)?,
        })
    }
}

fn approval_row(now: i64) -> impl Fn(&Row<'_>) -> rusqlite::Result<pb::Approval> {
    move |r| {
        let mut a = pb::Approval {
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
        };
        // Expiry is judged on read: a pending approval nobody answered in time, or an
        // override nobody used in time, is expired (and denies).
        let expired = match a.status.as_str() {
            "pending" => a.expires_at <= now,
            "approved" => a.override_expires_at <= now,
            _ => false,
        };
        if expired {
            a.status = "expired".into();
        }
        Ok(a)
    }
}

fn revision_row(active_id: i64) -> impl Fn(&Row<'_>) -> rusqlite::Result<pb::PolicyRevision> {
    move |r| {
        let id: i64 = r.get(0)?;
        Ok(pb::PolicyRevision {
            id: u64::try_from(id).unwrap_or(0),
            revision: r.get(1)?,
            digest: r.get(2)?,
            action: r.get(3)?,
            actor: r.get(4)?,
            reason: r.get(5)?,
            activated_at: r.get(6)?,
            active: id == active_id,
        })
    }
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

impl ControlStore for SqliteStore {
    fn state_version(&self) -> Result<(u64, u64), ControlError> {
        self.with(|c| Ok((meta(c, "epoch")?, meta(c, "version")?)))
    }

    fn raise_epoch(&self, reported: u64) -> Result<(u64, u64), ControlError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            let epoch = next_epoch(meta(&tx, "epoch")?, reported)?;
            let stored = i64::try_from(epoch).map_err(|_| {
                ControlError::precondition(format!("state epoch {epoch} is past what is stored"))
            })?;
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'epoch'", [stored])
                .map_err(db_err)?;
            let version = bump(&tx)?;
            tx.commit().map_err(db_err)?;
            Ok((epoch, version))
        })
    }

    fn snapshot(&self, now: i64) -> Result<(u64, Vec<pb::StateItem>), ControlError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            let version: i64 = tx
                .query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| r.get(0))
                .map_err(db_err)?;
            let mut items = Vec::new();
            {
                let mut s = tx
                    .prepare(&format!("SELECT {AGENT_COLUMNS} FROM agents"))
                    .map_err(db_err)?;
                for a in collect(s.query_map([now], agent_row).map_err(db_err)?)? {
                    items.push(agent_item(&a));
                }
                let mut s = tx
                    .prepare("SELECT jti, expires_at, tenant FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ?1")
                    .map_err(db_err)?;
                let revoked = s
                    .query_map([now - EXPIRED_SLACK_SECS], |r| {
                        Ok(item(Item::RevokedToken(pb::RevokedToken {
                            jti: r.get(0)?,
                            expires_at: r.get(1)?,
                            tenant: r.get(2)?,
                        })))
                    })
                    .map_err(db_err)?;
                items.extend(collect(revoked)?);
                let mut s = tx
                    .prepare("SELECT scope, tenant, target, before FROM kills")
                    .map_err(db_err)?;
                let kills = s
                    .query_map([], |r| {
                        Ok(item(Item::Kill(pb::KillMark {
                            scope: r.get(0)?,
                            tenant: r.get(1)?,
                            target: r.get(2)?,
                            before: r.get(3)?,
                        })))
                    })
                    .map_err(db_err)?;
                items.extend(collect(kills)?);
                let mut s = tx
                    .prepare("SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants")
                    .map_err(db_err)?;
                for t in collect(s.query_map([], tenant_row).map_err(db_err)?)? {
                    items.push(tenant_item(&t));
                }
                let mut s = tx
                    .prepare(&format!("SELECT {BUDGET_COLUMNS} FROM budgets"))
                    .map_err(db_err)?;
                for b in collect(s.query_map([], budget_row).map_err(db_err)?)? {
                    items.push(budget_item(&b));
                }
                let active = tx
                    .query_row(
                        "SELECT revision, digest FROM policy_history ORDER BY id DESC LIMIT 1",
                        [],
                        |r| Ok(pb::PolicyRef { revision: r.get(0)?, digest: r.get(1)? }),
                    )
                    .optional()
                    .map_err(db_err)?;
                if let Some(p) = active {
                    items.push(item(Item::Policy(p)));
                }
            }
            tx.commit().map_err(db_err)?;
            Ok((u64::try_from(version).unwrap_or(0), items))
        })
    }

    fn register_agent(&self, agent: &pb::Agent) -> Result<Change<pb::Agent>, ControlError> {
        self.change(|tx| {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT status FROM agents WHERE tenant = ?1 AND id = ?2",
                    params![agent.tenant, agent.id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            if let Some(status) = existing {
                return Err(ControlError::AlreadyExists(format!(
                    "agent {}/{} is already registered ({status})",
                    agent.tenant, agent.id
                )));
            }
            tx.execute(
                "INSERT INTO agents (tenant, id, status, risk_tier, reason, created_at, updated_at, updated_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
                params![agent.tenant, agent.id, agent.status, agent.risk_tier, agent.reason, agent.created_at, agent.updated_by],
            )
            .map_err(db_err)?;
            Ok((agent.clone(), vec![agent_item(agent)]))
        })
    }

    fn agent(&self, tenant: &str, id: &str, now: i64) -> Result<Option<pb::Agent>, ControlError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE tenant = ?2 AND id = ?3"),
                params![now, tenant, id],
                agent_row,
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn agents(
        &self,
        tenant: Option<&str>,
        status: Option<&str>,
        now: i64,
    ) -> Result<Vec<pb::Agent>, ControlError> {
        self.with(|c| {
            let (cond, values) = filters(2, &[("tenant", tenant), ("status", status)]);
            let mut s = c
                .prepare(&format!(
                    "SELECT {AGENT_COLUMNS} FROM agents WHERE 1 = 1{cond} ORDER BY tenant, id"
                ))
                .map_err(db_err)?;
            let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&now];
            bound.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
            collect(s.query_map(bound.as_slice(), agent_row).map_err(db_err)?)
        })
    }

    fn set_agent_status(
        &self,
        tenant: &str,
        id: &str,
        status: &str,
        reason: &str,
        actor: &str,
        now: i64,
    ) -> Result<Change<pb::Agent>, ControlError> {
        self.change(|tx| {
            let current: Option<String> = tx
                .query_row(
                    "SELECT status FROM agents WHERE tenant = ?1 AND id = ?2",
                    params![tenant, id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let current = current.ok_or_else(|| {
                ControlError::not_found(format!("no agent {id} in tenant {tenant}"))
            })?;
            if current == super::REVOKED {
                return Err(ControlError::precondition(format!(
                    "agent {tenant}/{id} is revoked, which is final"
                )));
            }
            if current == status {
                return Err(ControlError::precondition(format!(
                    "agent {tenant}/{id} is already {status}"
                )));
            }
            // Checked here, in the transaction: a restriction racing a freeze never wins.
            if status == super::RESTRICTED && current == super::FROZEN {
                return Err(ControlError::precondition(format!(
                    "agent {tenant}/{id} is frozen; a restriction would loosen that (unfreeze it first)"
                )));
            }
            tx.execute(
                "UPDATE agents SET status = ?3, reason = ?4, updated_at = ?5, updated_by = ?6 \
                 WHERE tenant = ?1 AND id = ?2",
                params![tenant, id, status, reason, now, actor],
            )
            .map_err(db_err)?;
            let agent = tx
                .query_row(
                    &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE tenant = ?2 AND id = ?3"),
                    params![now, tenant, id],
                    agent_row,
                )
                .map_err(db_err)?;
            let items = vec![agent_item(&agent)];
            Ok((agent, items))
        })
    }

    fn kill_floor(&self, tenant: &str, agent: &str, session: &str) -> Result<i64, ControlError> {
        self.with(|c| {
            c.query_row(
                "SELECT coalesce(max(before), -9223372036854775808) FROM kills WHERE scope = ?1 \
                 OR (scope = ?2 AND tenant = ?5) \
                 OR (scope = ?3 AND tenant = ?5 AND target = ?6) \
                 OR (scope = ?4 AND tenant = ?5 AND target = ?7)",
                params![
                    KillScope::All as i32,
                    KillScope::Tenant as i32,
                    KillScope::Agent as i32,
                    KillScope::Session as i32,
                    tenant,
                    agent,
                    session
                ],
                |r| r.get(0),
            )
            .map_err(db_err)
        })
    }

    fn insert_token(&self, t: &pb::TokenInfo) -> Result<(), ControlError> {
        self.with(|c| insert_token(c, t))
    }

    fn token(&self, jti: &str, now: i64) -> Result<Option<pb::TokenInfo>, ControlError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = ?1"),
                [jti],
                token_row(now),
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn tokens(
        &self,
        tenant: &str,
        agent: Option<&str>,
        all: bool,
        now: i64,
    ) -> Result<Vec<pb::TokenInfo>, ControlError> {
        self.with(|c| {
            let live = if all {
                ""
            } else {
                " AND revoked_at IS NULL AND expires_at > ?2"
            };
            let (cond, values) = filters(3, &[("agent", agent)]);
            let mut s = c
                .prepare(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant = ?1 AND ?2 = ?2{live}{cond} \
                     ORDER BY issued_at, jti"
                ))
                .map_err(db_err)?;
            let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&tenant, &now];
            bound.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
            collect(
                s.query_map(bound.as_slice(), token_row(now))
                    .map_err(db_err)?,
            )
        })
    }

    fn revoke_token(
        &self,
        jti: &str,
        reason: &str,
        now: i64,
    ) -> Result<Change<pb::TokenInfo>, ControlError> {
        self.change(|tx| {
            let token = revoke_live(tx, jti, reason, now)?;
            let items = vec![revoked_item(&token)];
            Ok((token, items))
        })
    }

    fn rotate_token(
        &self,
        old_jti: &str,
        new: &pb::TokenInfo,
        reason: &str,
        now: i64,
    ) -> Result<Change<pb::TokenInfo>, ControlError> {
        self.change(|tx| {
            let old = revoke_live(tx, old_jti, reason, now)?;
            insert_token(tx, new)?;
            let items = vec![revoked_item(&old)];
            Ok((old, items))
        })
    }

    fn kill(
        &self,
        mark: &pb::KillMark,
        reason: &str,
        actor: &str,
        now: i64,
    ) -> Result<Change<pb::KillResponse>, ControlError> {
        let scope = KillScope::try_from(mark.scope)
            .map_err(|_| ControlError::invalid("unknown kill scope"))?;
        self.change(|tx| {
            // Which live tokens the kill covers, and whether its target exists at all.
            let (cond, known): (&str, &str) = match scope {
                KillScope::Session => (
                    "tenant = ?1 AND session = ?2",
                    "SELECT count(*) FROM tokens WHERE tenant = ?1 AND session = ?2",
                ),
                KillScope::Agent => (
                    "tenant = ?1 AND agent = ?2",
                    "SELECT (SELECT count(*) FROM tokens WHERE tenant = ?1 AND agent = ?2) + \
                     (SELECT count(*) FROM agents WHERE tenant = ?1 AND id = ?2)",
                ),
                KillScope::Tenant => (
                    "tenant = ?1 AND ?2 = ?2",
                    "SELECT (SELECT count(*) FROM tokens WHERE tenant = ?1) + \
                     (SELECT count(*) FROM agents WHERE tenant = ?1) + \
                     (SELECT count(*) FROM tenants WHERE name = ?1) + 0 * length(?2)",
                ),
                KillScope::All => ("?1 = ?1 AND ?2 = ?2", "SELECT 1 + 0 * length(?1 || ?2)"),
                KillScope::Token | KillScope::Unspecified => {
                    return Err(ControlError::invalid(
                        "a token kill is a token revocation; scope must be session, agent, tenant or all",
                    ));
                }
            };
            let exists: i64 = tx
                .query_row(known, params![mark.tenant, mark.target], |r| r.get(0))
                .map_err(db_err)?;
            if exists == 0 {
                let what = match scope {
                    KillScope::Session => format!("no token was ever issued in session {} of tenant {}", mark.target, mark.tenant),
                    KillScope::Agent => format!("no agent {} in tenant {}", mark.target, mark.tenant),
                    _ => format!("tenant {} has no agents, tokens or settings", mark.tenant),
                };
                return Err(ControlError::not_found(format!("nothing to kill: {what}")));
            }
            let live = format!("{cond} AND revoked_at IS NULL AND expires_at > ?3");
            // The tokens it covers are also revoked by id (live ones, and expired ones still
            // inside the data planes' leeway): a token minted in the kill's own second after
            // an earlier kill carries a later `iat` than the mark.
            let mut items = vec![item(Item::Kill(mark.clone()))];
            {
                let mut s = tx
                    .prepare(&format!("SELECT jti, expires_at, tenant FROM tokens WHERE {live}"))
                    .map_err(db_err)?;
                let revoked = s
                    .query_map(params![mark.tenant, mark.target, now - EXPIRED_SLACK_SECS], |r| {
                        Ok(item(Item::RevokedToken(pb::RevokedToken {
                            jti: r.get(0)?,
                            expires_at: r.get(1)?,
                            tenant: r.get(2)?,
                        })))
                    })
                    .map_err(db_err)?;
                items.extend(collect(revoked)?);
            }
            let (tokens, sessions, agents, tenants): (i64, i64, i64, i64) = tx
                .query_row(
                    &format!(
                        "SELECT count(*), count(DISTINCT tenant || '/' || session), \
                         count(DISTINCT tenant || '/' || agent), count(DISTINCT tenant) \
                         FROM tokens WHERE {live}"
                    ),
                    params![mark.tenant, mark.target, now],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .map_err(db_err)?;
            tx.execute(
                &format!("UPDATE tokens SET revoked_at = ?4, revoked_reason = ?5 WHERE {live}"),
                params![
                    mark.tenant,
                    mark.target,
                    now - EXPIRED_SLACK_SECS,
                    now,
                    format!("killed: {reason}")
                ],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO kills (scope, tenant, target, before, reason, actor, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (scope, tenant, target) DO UPDATE SET \
                 before = max(before, excluded.before), reason = excluded.reason, \
                 actor = excluded.actor, at = excluded.at",
                params![mark.scope, mark.tenant, mark.target, mark.before, reason, actor, now],
            )
            .map_err(db_err)?;
            let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
            let value = pb::KillResponse {
                    scope: mark.scope,
                    tenant: mark.tenant.clone(),
                    target: mark.target.clone(),
                    before: mark.before,
                    tokens: n(tokens),
                    sessions: n(sessions),
                    agents: n(agents),
                tenants: n(tenants),
            };
            Ok((value, items))
        })
    }

    fn tenant(&self, name: &str) -> Result<Option<pb::Tenant>, ControlError> {
        self.with(|c| {
            c.query_row(
                "SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants WHERE name = ?1",
                [name],
                tenant_row,
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn put_tenant(&self, t: &pb::Tenant) -> Result<Change<pb::Tenant>, ControlError> {
        self.change(|tx| {
            tx.execute(
                "INSERT INTO tenants (name, mode, autonomy_level, updated_at, updated_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, \
                 autonomy_level = excluded.autonomy_level, updated_at = excluded.updated_at, \
                 updated_by = excluded.updated_by",
                params![t.name, t.mode, t.autonomy_level, t.updated_at, t.updated_by],
            )
            .map_err(db_err)?;
            Ok((t.clone(), vec![tenant_item(t)]))
        })
    }

    fn put_budget(&self, b: &pb::Budget) -> Result<Change<pb::Budget>, ControlError> {
        self.change(|tx| {
            if b.max_calls == 0 && b.max_cost <= 0.0 {
                tx.execute(
                    "DELETE FROM budgets WHERE tenant = ?1 AND agent = ?2",
                    params![b.tenant, b.agent],
                )
                .map_err(db_err)?;
            } else {
                tx.execute(
                    "INSERT INTO budgets (tenant, agent, max_calls, max_cost, window_secs, updated_at, updated_by) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (tenant, agent) DO UPDATE SET \
                     max_calls = excluded.max_calls, max_cost = excluded.max_cost, \
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
                .map_err(db_err)?;
            }
            Ok((b.clone(), vec![budget_item(b)]))
        })
    }

    fn budgets(
        &self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Budget>, ControlError> {
        self.with(|c| {
            let (cond, values) = filters(1, &[("tenant", tenant), ("agent", agent)]);
            let mut s = c
                .prepare(&format!(
                    "SELECT {BUDGET_COLUMNS} FROM budgets WHERE 1 = 1{cond} ORDER BY tenant, agent"
                ))
                .map_err(db_err)?;
            let bound: Vec<&dyn rusqlite::ToSql> =
                values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
            collect(s.query_map(bound.as_slice(), budget_row).map_err(db_err)?)
        })
    }

    fn request_approval(
        &self,
        a: &pb::Approval,
        max_pending: u32,
        same_session: bool,
        now: i64,
    ) -> Result<pb::RequestApprovalResponse, ControlError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            let same: Option<String> = tx
                .query_row(
                    "SELECT id FROM approvals WHERE tenant = ?1 AND agent = ?2 AND call_hash = ?3 \
                     AND status = 'pending' AND expires_at > ?4 AND (?5 = 0 OR session = ?6) \
                     LIMIT 1",
                    params![a.tenant, a.agent, a.call_hash, now, same_session, a.session],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            if let Some(id) = same {
                return Ok(pb::RequestApprovalResponse {
                    approval_id: id,
                    created: false,
                    cap_reached: false,
                });
            }
            let pending: i64 = tx
                .query_row(
                    "SELECT count(*) FROM approvals WHERE tenant = ?1 AND agent = ?2 \
                     AND status = 'pending' AND expires_at > ?3",
                    params![a.tenant, a.agent, now],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if pending >= i64::from(max_pending) {
                return Ok(pb::RequestApprovalResponse {
                    approval_id: String::new(),
                    created: false,
                    cap_reached: true,
                });
            }
            tx.execute(
                &format!(
                    "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                     ?8, ?9, ?10, ?11, ?12, 'pending', ?13, ?14, '', 0, '', 0, 0, '')"
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
                    a.created_at,
                    a.expires_at
                ],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(pb::RequestApprovalResponse {
                approval_id: a.id.clone(),
                created: true,
                cap_reached: false,
            })
        })
    }

    fn approvals(
        &self,
        tenant: Option<&str>,
        status: Option<&str>,
        agent: Option<&str>,
        now: i64,
    ) -> Result<Vec<pb::Approval>, ControlError> {
        let all = self.with(|c| {
            let (cond, values) = filters(1, &[("tenant", tenant), ("agent", agent)]);
            let mut s = c
                .prepare(&format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE 1 = 1{cond} ORDER BY created_at, id"
                ))
                .map_err(db_err)?;
            let bound: Vec<&dyn rusqlite::ToSql> =
                values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
            collect(s.query_map(bound.as_slice(), approval_row(now)).map_err(db_err)?)
        })?;
        // The status filter applies to the status as of `now` (expiry is judged on read).
        Ok(match status {
            Some(s) => all.into_iter().filter(|a| a.status == s).collect(),
            None => all,
        })
    }

    fn approval(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<pb::Approval>, ControlError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = ?1 AND id = ?2"),
                params![tenant, id],
                approval_row(now),
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn decide_approval(
        &self,
        tenant: &str,
        id: &str,
        approve: bool,
        actor: &str,
        reason: &str,
        override_expires_at: i64,
        now: i64,
    ) -> Result<Option<pb::Approval>, ControlError> {
        self.with(|c| {
            let status = if approve { "approved" } else { "denied" };
            let changed = c
                .execute(
                    "UPDATE approvals SET status = ?3, decided_by = ?4, decided_at = ?5, \
                     decision_reason = ?6, override_expires_at = ?7 \
                     WHERE tenant = ?1 AND id = ?2 AND status = 'pending' AND expires_at > ?5",
                    params![tenant, id, status, actor, now, reason, override_expires_at],
                )
                .map_err(db_err)?;
            if changed == 0 {
                return Ok(None);
            }
            c.query_row(
                &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = ?1 AND id = ?2"),
                params![tenant, id],
                approval_row(now),
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn use_approval(
        &self,
        tenant: &str,
        id: &str,
        decision_id: &str,
        now: i64,
    ) -> Result<bool, ControlError> {
        self.with(|c| {
            let changed = c
                .execute(
                    "UPDATE approvals SET status = 'used', used_at = ?3, used_by_decision = ?4 \
                     WHERE tenant = ?1 AND id = ?2 AND status = 'approved' AND override_expires_at > ?3",
                    params![tenant, id, now, decision_id],
                )
                .map_err(db_err)?;
            Ok(changed == 1)
        })
    }

    fn activate_policy(
        &self,
        rev: &pb::PolicyRevision,
        bundle: &[u8],
    ) -> Result<Change<pb::PolicyRevision>, ControlError> {
        self.change(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO policy_bundles (digest, revision, files, stored_at) VALUES (?1, ?2, ?3, ?4)",
                params![rev.digest, rev.revision, bundle, rev.activated_at],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO policy_history (revision, digest, action, actor, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![rev.revision, rev.digest, rev.action, rev.actor, rev.reason, rev.activated_at],
            )
            .map_err(db_err)?;
            let id = tx.last_insert_rowid();
            let mut value = rev.clone();
            value.id = u64::try_from(id).unwrap_or(0);
            value.active = true;
            let items = vec![item(Item::Policy(pb::PolicyRef {
                revision: rev.revision.clone(),
                digest: rev.digest.clone(),
            }))];
            Ok((value, items))
        })
    }

    fn policy_history(&self, limit: u32) -> Result<Vec<pb::PolicyRevision>, ControlError> {
        self.with(|c| {
            let active: i64 = c
                .query_row("SELECT coalesce(max(id), 0) FROM policy_history", [], |r| {
                    r.get(0)
                })
                .map_err(db_err)?;
            let mut s = c
                .prepare(
                    "SELECT id, revision, digest, action, actor, reason, at FROM policy_history \
                     ORDER BY id DESC LIMIT ?1",
                )
                .map_err(db_err)?;
            collect(s.query_map([limit], revision_row(active)).map_err(db_err)?)
        })
    }

    fn bundle(&self, digest: &str) -> Result<Option<Vec<u8>>, ControlError> {
        self.with(|c| {
            c.query_row(
                "SELECT files FROM policy_bundles WHERE digest = ?1",
                [digest],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn insert_incident(
        &self,
        i: &pb::Incident,
        notifications: &[(String, String)],
    ) -> Result<(), ControlError> {
        let evidence = serde_json::to_string(&i.evidence).map_err(db_err)?;
        let actions = serde_json::to_string(&i.actions).map_err(db_err)?;
        let decisions = serde_json::to_string(&i.decisions).map_err(db_err)?;
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            tx.execute(
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
            .map_err(db_err)?;
            let now_ms = i.created_at_ns / 1_000_000;
            for (url, payload) in notifications {
                tx.execute(
                    "INSERT INTO outbox (incident, tenant, url, payload, state, attempts, \
                     next_at_ms, last_error, created_at_ms, done_at_ms) \
                     VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, '', ?5, 0)",
                    params![i.id, i.tenant, url, payload, now_ms],
                )
                .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        })
    }

    fn due_notifications(&self, now_ms: i64, limit: usize) -> Result<Vec<Outbox>, ControlError> {
        self.with(|c| {
            let mut s = c
                .prepare(&format!(
                    "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' \
                     AND next_at_ms <= ?1 ORDER BY next_at_ms, id LIMIT ?2"
                ))
                .map_err(db_err)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            collect(
                s.query_map(params![now_ms, limit], outbox_row)
                    .map_err(db_err)?,
            )
        })
    }

    fn next_notification_at(&self) -> Result<Option<i64>, ControlError> {
        self.with(|c| {
            c.query_row(
                "SELECT min(next_at_ms) FROM outbox WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)
        })
    }

    fn notification_attempted(
        &self,
        id: i64,
        delivered: bool,
        next_at_ms: Option<i64>,
        error: &str,
        now_ms: i64,
    ) -> Result<(), ControlError> {
        let (state, next, done) = match (delivered, next_at_ms) {
            (true, _) => ("delivered", now_ms, now_ms),
            (false, Some(at)) => ("pending", at, 0),
            (false, None) => ("failed", now_ms, now_ms),
        };
        self.with(|c| {
            c.execute(
                "UPDATE outbox SET state = ?2, attempts = attempts + 1, next_at_ms = ?3, \
                 last_error = ?4, done_at_ms = ?5 WHERE id = ?1",
                params![id, state, next, error, done],
            )
            .map_err(db_err)?;
            Ok(())
        })
    }

    fn refresh_notifications(
        &self,
        incident: &str,
        notifications: &[(String, String)],
    ) -> Result<(), ControlError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            for (url, payload) in notifications {
                tx.execute(
                    "UPDATE outbox SET payload = ?3 WHERE incident = ?1 AND url = ?2 \
                     AND state = 'pending' AND attempts = 0",
                    params![incident, url, payload],
                )
                .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        })
    }

    fn prune_notifications(&self, before_ms: i64) -> Result<usize, ControlError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM outbox WHERE state != 'pending' AND done_at_ms < ?1",
                params![before_ms],
            )
            .map_err(db_err)
        })
    }

    fn notifications(&self, incident: &str) -> Result<Vec<Outbox>, ControlError> {
        self.with(|c| {
            let mut s = c
                .prepare(&format!(
                    "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE incident = ?1 ORDER BY id"
                ))
                .map_err(db_err)?;
            collect(s.query_map(params![incident], outbox_row).map_err(db_err)?)
        })
    }

    fn incidents(
        &self,
        tenant: Option<&str>,
        status: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Incident>, ControlError> {
        self.with(|c| {
            let (cond, values) =
                filters(1, &[("tenant", tenant), ("status", status), ("agent", agent)]);
            let mut s = c
                .prepare(&format!(
                    "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE 1 = 1{cond} ORDER BY created_at_ns, id"
                ))
                .map_err(db_err)?;
            let bound: Vec<&dyn rusqlite::ToSql> =
                values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
            collect(s.query_map(bound.as_slice(), incident_row).map_err(db_err)?)
        })
    }

    fn incident(&self, tenant: &str, id: &str) -> Result<Option<pb::Incident>, ControlError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE tenant = ?1 AND id = ?2"),
                params![tenant, id],
                incident_row,
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn set_incident_status(
        &self,
        tenant: &str,
        id: &str,
        status: &str,
        actor: &str,
        reason: &str,
        now: i64,
    ) -> Result<Option<pb::Incident>, ControlError> {
        self.with(|c| {
            let changed = if status == "acknowledged" {
                c.execute(
                    "UPDATE incidents SET status = 'acknowledged', acknowledged_by = ?3, updated_at = ?4 \
                     WHERE tenant = ?1 AND id = ?2 AND status = 'open'",
                    params![tenant, id, actor, now],
                )
            } else {
                c.execute(
                    "UPDATE incidents SET status = 'closed', closed_by = ?3, close_reason = ?4, \
                     updated_at = ?5 WHERE tenant = ?1 AND id = ?2 AND status != 'closed'",
                    params![tenant, id, actor, reason, now],
                )
            }
            .map_err(db_err)?;
            if changed == 0 {
                return Ok(None);
            }
            c.query_row(
                &format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE tenant = ?1 AND id = ?2"),
                params![tenant, id],
                incident_row,
            )
            .optional()
            .map_err(db_err)
        })
    }

    fn add_incident_actions(
        &self,
        tenant: &str,
        id: &str,
        actions: &[String],
    ) -> Result<(), ControlError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db_err)?;
            let current: String = tx
                .query_row(
                    "SELECT actions FROM incidents WHERE tenant = ?1 AND id = ?2",
                    params![tenant, id],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            let mut list: Vec<String> = serde_json::from_str(&current).unwrap_or_default();
            list.extend(actions.iter().cloned());
            let text = serde_json::to_string(&list).map_err(db_err)?;
            tx.execute(
                "UPDATE incidents SET actions = ?3 WHERE tenant = ?1 AND id = ?2",
                params![tenant, id, text],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
    }
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

fn revoked_item(t: &pb::TokenInfo) -> pb::StateItem {
    item(Item::RevokedToken(pb::RevokedToken {
        jti: t.jti.clone(),
        expires_at: t.expires_at,
        tenant: t.tenant.clone(),
    }))
}

fn insert_token(c: &Connection, t: &pb::TokenInfo) -> Result<(), ControlError> {
    let scopes = serde_json::to_string(&t.scopes).map_err(db_err)?;
    c.execute(
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
    .map_err(db_err)?;
    Ok(())
}

/// Revokes a live token inside the caller's transaction; refuses an unknown, revoked or
/// expired one.
fn revoke_live(
    tx: &Connection,
    jti: &str,
    reason: &str,
    now: i64,
) -> Result<pb::TokenInfo, ControlError> {
    let token = tx
        .query_row(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = ?1"),
            [jti],
            token_row(now),
        )
        .optional()
        .map_err(db_err)?
        .ok_or_else(|| {
            ControlError::not_found(format!(
                "no token {jti} was issued by this control plane (kill its session or agent instead)"
            ))
        })?;
    // An expired token is still revocable inside the slack: data planes accept it up to
    // their leeway past `exp`.
    let revocable = token.status == "live"
        || (token.status == "expired" && token.expires_at > now - EXPIRED_SLACK_SECS);
    if !revocable {
        return Err(ControlError::precondition(format!(
            "token {jti} is already {}",
            token.status
        )));
    }
    tx.execute(
        "UPDATE tokens SET revoked_at = ?2, revoked_reason = ?3 WHERE jti = ?1",
        params![jti, now, reason],
    )
    .map_err(db_err)?;
    Ok(pb::TokenInfo {
        status: "revoked".into(),
        revoked_at: now,
        revoked_reason: reason.to_owned(),
        ..token
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmed_epoch_is_past_the_reported_one_bounded_and_checked() {
        assert_eq!(next_epoch(0, 0).ok(), Some(1));
        assert_eq!(next_epoch(0, 1).ok(), Some(2));
        assert_eq!(next_epoch(5, 2).ok(), Some(6));
        assert_eq!(
            next_epoch(3, u64::MAX).ok(),
            Some(3 + MAX_EPOCH_REPORT_AHEAD + 1)
        );
        // Stored as SQLite's i64: the end of that range is an error, not a wrap.
        let top = u64::try_from(i64::MAX).expect("fits");
        let err = next_epoch(top, 0).expect_err("no epoch past i64::MAX");
        assert!(err.to_string().contains("cannot be raised"), "{err}");
        assert_eq!(next_epoch(top - 1, 0).ok(), Some(top));
    }
}
