//! The SQLite store's tables, and the columns each query reads.

pub(super) const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS chains (version INTEGER PRIMARY KEY, chain BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS incident_events (
    seq INTEGER PRIMARY KEY, event TEXT NOT NULL, tenant TEXT NOT NULL, incident TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('incident_seq', 0);
CREATE TABLE IF NOT EXISTS reported (
    id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL, version INTEGER NOT NULL,
    sidecar TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policy_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, revision TEXT NOT NULL, digest TEXT NOT NULL,
    action TEXT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL);
";

pub(super) const AGENT_COLUMNS: &str = "tenant, id, status, risk_tier, reason, created_at, updated_at, updated_by, \
     (SELECT count(*) FROM tokens t WHERE t.tenant = agents.tenant AND t.agent = agents.id \
      AND t.revoked_at IS NULL AND t.expires_at > ?1)";

pub(super) const TOKEN_COLUMNS: &str =
    "jti, tenant, agent, session, scopes, issued_at, expires_at, revoked_at, revoked_reason";

pub(super) const APPROVAL_COLUMNS: &str = "id, tenant, agent, session, run_id, tool, action, resource, arguments, \
     call_hash, policy_reason, decision_id, status, created_at, expires_at, decided_by, decided_at, \
     decision_reason, override_expires_at, used_at, used_by_decision";

/// Columns added since the first release of a table, added to older databases on open.
pub(super) fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
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

pub(super) const OUTBOX_COLUMNS: &str =
    "id, incident, tenant, url, payload, state, attempts, next_at_ms, last_error";

pub(super) const INCIDENT_COLUMNS: &str = "id, tenant, agent, session, run_id, kind, severity, summary, evidence, \
     trigger_decision, decided_at_ns, status, created_at_ns, updated_at, acknowledged_by, closed_by, \
     close_reason, actions, autonomy_level, reported_by, policy_revision, decisions";

pub(super) const BUDGET_COLUMNS: &str =
    "tenant, agent, max_calls, max_cost, window_secs, updated_at, updated_by";
