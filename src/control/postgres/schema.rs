//! The PostgreSQL store tables, and the columns each query reads.

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta (key, value) VALUES ('version', 0), ('epoch', 0), ('feed_floor', 0)
    ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS agents (
    tenant TEXT NOT NULL, id TEXT NOT NULL, status TEXT NOT NULL, risk_tier TEXT NOT NULL,
    reason TEXT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL, PRIMARY KEY (tenant, id));
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
    scopes TEXT NOT NULL, issued_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
    revoked_at BIGINT, revoked_reason TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS tokens_by_agent ON tokens (tenant, agent);
CREATE INDEX IF NOT EXISTS tokens_by_session ON tokens (tenant, session);
CREATE TABLE IF NOT EXISTS kills (
    scope INTEGER NOT NULL, tenant TEXT NOT NULL, target TEXT NOT NULL, before BIGINT NOT NULL,
    reason TEXT NOT NULL, actor TEXT NOT NULL, at BIGINT NOT NULL,
    PRIMARY KEY (scope, tenant, target));
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY, mode TEXT NOT NULL, autonomy_level BIGINT NOT NULL,
    updated_at BIGINT NOT NULL, updated_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (
    tenant TEXT NOT NULL, agent TEXT NOT NULL, max_calls BIGINT NOT NULL,
    max_cost DOUBLE PRECISION NOT NULL, window_secs BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL, PRIMARY KEY (tenant, agent));
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
    run_id TEXT NOT NULL, tool TEXT NOT NULL, action TEXT NOT NULL, resource TEXT NOT NULL,
    arguments TEXT NOT NULL, call_hash TEXT NOT NULL, policy_reason TEXT NOT NULL,
    decision_id TEXT NOT NULL, status TEXT NOT NULL, created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, decided_by TEXT NOT NULL, decided_at BIGINT NOT NULL,
    decision_reason TEXT NOT NULL, override_expires_at BIGINT NOT NULL, used_at BIGINT NOT NULL,
    used_by_decision TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS approvals_by_agent ON approvals (tenant, agent, status);
CREATE TABLE IF NOT EXISTS policy_bundles (
    digest TEXT PRIMARY KEY, revision TEXT NOT NULL, files BYTEA NOT NULL,
    stored_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
    run_id TEXT NOT NULL, kind TEXT NOT NULL, severity TEXT NOT NULL, summary TEXT NOT NULL,
    evidence TEXT NOT NULL, trigger_decision TEXT NOT NULL, decided_at_ns BIGINT NOT NULL,
    status TEXT NOT NULL, created_at_ns BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    acknowledged_by TEXT NOT NULL, closed_by TEXT NOT NULL, close_reason TEXT NOT NULL,
    actions TEXT NOT NULL, autonomy_level BIGINT NOT NULL, reported_by TEXT NOT NULL,
    policy_revision TEXT NOT NULL, decisions TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS incidents_by_tenant ON incidents (tenant, status);
CREATE TABLE IF NOT EXISTS outbox (
    id BIGSERIAL PRIMARY KEY, incident TEXT NOT NULL, tenant TEXT NOT NULL, url TEXT NOT NULL,
    payload TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    next_at_ms BIGINT NOT NULL, last_error TEXT NOT NULL, created_at_ms BIGINT NOT NULL,
    done_at_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at_ms);
CREATE TABLE IF NOT EXISTS changes (
    version BIGINT PRIMARY KEY, epoch BIGINT NOT NULL, event BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS chains (version BIGINT PRIMARY KEY, chain BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS incident_events (
    seq BIGINT PRIMARY KEY, event TEXT NOT NULL, tenant TEXT NOT NULL, incident TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('incident_seq', 0) ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS reported (
    id INTEGER PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL, version BIGINT NOT NULL,
    sidecar TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policy_history (
    id BIGSERIAL PRIMARY KEY, revision TEXT NOT NULL, digest TEXT NOT NULL,
    action TEXT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL, at BIGINT NOT NULL);
";

pub(super) const AGENT_COLUMNS: &str = "tenant, id, status, risk_tier, reason, created_at, updated_at, \
     updated_by, (SELECT count(*) FROM tokens t WHERE t.tenant = agents.tenant \
     AND t.agent = agents.id AND t.revoked_at IS NULL AND t.expires_at > $1)";

pub(super) const TOKEN_COLUMNS: &str =
    "jti, tenant, agent, session, scopes, issued_at, expires_at, revoked_at, revoked_reason";

pub(super) const APPROVAL_COLUMNS: &str = "id, tenant, agent, session, run_id, tool, action, resource, \
     arguments, call_hash, policy_reason, decision_id, status, created_at, expires_at, \
     decided_by, decided_at, decision_reason, override_expires_at, used_at, used_by_decision";

pub(super) const INCIDENT_COLUMNS: &str = "id, tenant, agent, session, run_id, kind, severity, summary, \
     evidence, trigger_decision, decided_at_ns, status, created_at_ns, updated_at, \
     acknowledged_by, closed_by, close_reason, actions, autonomy_level, reported_by, \
     policy_revision, decisions";

pub(super) const OUTBOX_COLUMNS: &str =
    "id, incident, tenant, url, payload, state, attempts, next_at_ms, last_error";

pub(super) const BUDGET_COLUMNS: &str =
    "tenant, agent, max_calls, max_cost, window_secs, updated_at, updated_by";
