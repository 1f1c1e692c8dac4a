//! The shared control store: PostgreSQL, for several control-plane replicas
//! (`control.database_url = "postgres://..."`).
//!
//! - A unit of work runs in one SERIALIZABLE transaction. Two replicas acting at once
//!   conflict on the state's version row (every change bumps it), so one of them is told
//!   to retry (SQLSTATE 40001) and runs its unit of work again on fresh reads: the rules
//!   in [`super::rules`] judge what is committed, never a stale copy.
//! - Every change is appended to the `changes` table with its version, and `NOTIFY
//!   aegis_changes` is sent in the same transaction (delivered at commit). Each replica
//!   LISTENs and announces what it hears ([`ControlStore::subscribe`]); it also reads the
//!   stored version every [`VERSION_POLL`], so a replica that missed notifications (its
//!   listening connection dropped) still catches up from the feed, in order.
//! - The unit of work is synchronous ([`Txn`]): it runs on the blocking pool and waits
//!   for each statement on the runtime (`Handle::block_on`). Control actions are rare;
//!   a blocking thread per action in flight is cheap and keeps the rules plain functions.
//! - Tables are created at start if missing, under an advisory lock, so replicas starting
//!   together do not race. A lost connection is reopened on the next unit of work.

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, NoTls, Row};

use super::ControlError;
use super::pb::{self, KillScope};
use super::store::{ControlStore, FEED_KEPT, Feed, Outbox, Txn, Work};

/// The channel changes are announced on.
const CHANNEL: &str = "aegis_changes";
/// How often the stored version is read besides listening (a missed notification).
pub const VERSION_POLL: Duration = Duration::from_secs(1);
/// How often a unit of work is run again after serialization conflicts before giving up.
const MAX_ATTEMPTS: u32 = 20;

const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS policy_history (
    id BIGSERIAL PRIMARY KEY, revision TEXT NOT NULL, digest TEXT NOT NULL,
    action TEXT NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL, at BIGINT NOT NULL);
";

const AGENT_COLUMNS: &str = "tenant, id, status, risk_tier, reason, created_at, updated_at, \
     updated_by, (SELECT count(*) FROM tokens t WHERE t.tenant = agents.tenant \
     AND t.agent = agents.id AND t.revoked_at IS NULL AND t.expires_at > $1)";
const TOKEN_COLUMNS: &str =
    "jti, tenant, agent, session, scopes, issued_at, expires_at, revoked_at, revoked_reason";
const APPROVAL_COLUMNS: &str = "id, tenant, agent, session, run_id, tool, action, resource, \
     arguments, call_hash, policy_reason, decision_id, status, created_at, expires_at, \
     decided_by, decided_at, decision_reason, override_expires_at, used_at, used_by_decision";
const INCIDENT_COLUMNS: &str = "id, tenant, agent, session, run_id, kind, severity, summary, \
     evidence, trigger_decision, decided_at_ns, status, created_at_ns, updated_at, \
     acknowledged_by, closed_by, close_reason, actions, autonomy_level, reported_by, \
     policy_revision, decisions";
const OUTBOX_COLUMNS: &str =
    "id, incident, tenant, url, payload, state, attempts, next_at_ms, last_error";
const BUDGET_COLUMNS: &str =
    "tenant, agent, max_calls, max_cost, window_secs, updated_at, updated_by";

/// The PostgreSQL control store.
#[derive(Debug)]
pub struct PostgresStore {
    config: tokio_postgres::Config,
    /// The URL without its password, for messages.
    shown: String,
    /// The connection units of work run on (one at a time: control actions are rare).
    client: Arc<Mutex<Option<Client>>>,
    /// The newest committed version, for [`ControlStore::subscribe`].
    committed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Whether the listening and polling tasks run.
    watching: std::sync::Once,
    /// How many changes the feed keeps ([`FEED_KEPT`]).
    feed_kept: u64,
}

fn pg_err(e: tokio_postgres::Error) -> ControlError {
    ControlError::Store(format!("postgres: {}", describe(&e)))
}

/// The server's message and SQLSTATE, or the client's error.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// A serialization failure or deadlock: the unit of work runs again.
fn is_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
            || *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
    })
}

fn stored(what: &str, v: u64) -> Result<i64, ControlError> {
    i64::try_from(v)
        .map_err(|_| ControlError::Store(format!("{what} {v} is past what PostgreSQL stores")))
}

// === impl PostgresStore ===

impl PostgresStore {
    /// Connects, creating the tables if missing; the error names the database (never its
    /// password).
    pub async fn open(url: &str) -> Result<Self, ControlError> {
        let shown = crate::config::redact_url(url);
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| ControlError::Store(format!("control.database_url {shown}: {e}")))?;
        let store = Self {
            config,
            shown,
            client: Arc::new(Mutex::new(None)),
            committed: Arc::new(tokio::sync::watch::Sender::new(0)),
            watching: std::sync::Once::new(),
            feed_kept: FEED_KEPT,
        };
        let mut client = store.connect().await?;
        let tx = client.transaction().await.map_err(|e| store.named(&e))?;
        tx.execute("SELECT pg_advisory_xact_lock(7369676165)", &[])
            .await
            .map_err(|e| store.named(&e))?;
        tx.batch_execute(SCHEMA)
            .await
            .map_err(|e| store.named(&e))?;
        tx.commit().await.map_err(|e| store.named(&e))?;
        let version = read_version(&client).await.map_err(|e| store.named(&e))?;
        announce(&store.committed, version);
        *store.client.lock().await = Some(client);
        Ok(store)
    }

    /// An error naming the database.
    fn named(&self, e: &tokio_postgres::Error) -> ControlError {
        ControlError::Store(format!("postgres {}: {}", self.shown, describe(e)))
    }

    /// A new connection, its driver spawned on the runtime.
    async fn connect(&self) -> Result<Client, ControlError> {
        connect(&self.config, &self.shown).await
    }
}

async fn connect(config: &tokio_postgres::Config, shown: &str) -> Result<Client, ControlError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| ControlError::Unavailable(format!("postgres {shown}: {}", describe(&e))))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            crate::log!(warn, "control store: postgres connection ended: {e}");
        }
    });
    Ok(client)
}

async fn read_version(client: &Client) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT value FROM meta WHERE key = 'version'", &[])
        .await?;
    let v: i64 = row.try_get(0)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// Announces `version` as committed, if it is past what was.
fn announce(committed: &tokio::sync::watch::Sender<u64>, version: u64) {
    committed.send_if_modified(|v| {
        let newer = version > *v;
        *v = (*v).max(version);
        newer
    });
}

#[async_trait::async_trait]
impl ControlStore for PostgresStore {
    async fn transact(&self, work: Arc<Work<'static>>) -> Result<(), ControlError> {
        let mut guard = self.client.clone().lock_owned().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await?);
        }
        let runtime = Handle::current();
        let kept = self.feed_kept;
        let (result, guard) = tokio::task::spawn_blocking(move || {
            let result = match guard.as_mut() {
                Some(client) => run_work(&runtime, client, work.as_ref(), kept),
                None => Err(ControlError::Unavailable("postgres: no connection".into())),
            };
            (result, guard)
        })
        .await
        .map_err(|e| ControlError::Store(format!("store task failed: {e}")))?;
        drop(guard);
        if let Some(version) = result? {
            announce(&self.committed, version);
        }
        Ok(())
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Feed, ControlError> {
        use prost::Message;
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await?);
        }
        let Some(client) = guard.as_mut() else {
            return Err(ControlError::Unavailable("postgres: no connection".into()));
        };
        // One snapshot for the floor and the rows.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        let floor: i64 = tx
            .query_one("SELECT value FROM meta WHERE key = 'feed_floor'", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(pg_err)?;
        if stored("version", after)? < floor {
            return Ok(Feed::Gap);
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = tx
            .query(
                "SELECT event FROM changes WHERE version > $1 ORDER BY version LIMIT $2",
                &[&stored("version", after)?, &limit],
            )
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let bytes: Vec<u8> = row.try_get(0).map_err(pg_err)?;
            let event = pb::WatchEvent::decode(bytes.as_slice()).map_err(|e| {
                ControlError::Store(format!("a stored change does not decode: {e}"))
            })?;
            events.push(event);
        }
        Ok(Feed::Changes(events))
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        if let Ok(runtime) = Handle::try_current() {
            self.watching.call_once(|| {
                let committed = Arc::downgrade(&self.committed);
                runtime.spawn(listen(self.config.clone(), self.shown.clone(), committed));
            });
        }
        self.committed.subscribe()
    }
}

/// LISTENs on its own connection and announces the versions notified; reads the stored
/// version every [`VERSION_POLL`] as well (a notification missed while the connection was
/// down). Reconnects after a second when the connection drops; ends with the store.
async fn listen(
    config: tokio_postgres::Config,
    shown: String,
    committed: std::sync::Weak<tokio::sync::watch::Sender<u64>>,
) {
    use tokio_postgres::AsyncMessage;
    loop {
        let connected = config.connect(NoTls).await;
        let (client, mut connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                crate::log!(
                    warn,
                    "control store: postgres {shown}: cannot listen: {}",
                    describe(&e)
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                if committed.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let (notified_tx, mut notified) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if let Ok(v) = n.payload().parse::<u64>()
                            && notified_tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        });
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            crate::log!(
                warn,
                "control store: postgres {shown}: LISTEN failed: {}",
                describe(&e)
            );
        }
        let mut poll = tokio::time::interval(VERSION_POLL);
        loop {
            let Some(sender) = committed.upgrade() else {
                driver.abort();
                return;
            };
            tokio::select! {
                v = notified.recv() => match v {
                    Some(v) => announce(&sender, v),
                    None => break,
                },
                _ = poll.tick() => match read_version(&client).await {
                    Ok(v) => announce(&sender, v),
                    Err(_) if client.is_closed() => break,
                    Err(e) => crate::log!(warn, "control store: postgres {shown}: {}", describe(&e)),
                },
            }
        }
        driver.abort();
        crate::log!(
            warn,
            "control store: postgres {shown}: the listening connection dropped; reconnecting"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs `work` in a SERIALIZABLE transaction on `client`, again after a conflict; the
/// version it published, if any.
fn run_work(
    runtime: &Handle,
    client: &mut Client,
    work: &Work<'_>,
    kept: u64,
) -> Result<Option<u64>, ControlError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tx = runtime
            .block_on(
                client
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .start(),
            )
            .map_err(pg_err)?;
        let mut t = PgTxn {
            runtime,
            tx: &tx,
            kept,
            published: None,
            conflict: false,
        };
        let done = work(&mut t);
        let (published, conflict) = (t.published, t.conflict);
        let committed = match done {
            Ok(()) => runtime.block_on(tx.commit()),
            Err(_) if conflict && attempt < MAX_ATTEMPTS => {
                let _ = runtime.block_on(tx.rollback());
                backoff(attempt);
                continue;
            }
            Err(e) => {
                let _ = runtime.block_on(tx.rollback());
                return Err(e);
            }
        };
        match committed {
            Ok(()) => return Ok(published),
            Err(e) if is_conflict(&e) && attempt < MAX_ATTEMPTS => backoff(attempt),
            Err(e) => return Err(pg_err(e)),
        }
    }
}

/// A short, growing, jittered pause before running a conflicting unit of work again.
fn backoff(attempt: u32) {
    let mut jitter = [0u8; 1];
    let _ = getrandom::fill(&mut jitter);
    let ms = u64::from(attempt.min(10)) * 2 + u64::from(jitter[0] % 5);
    std::thread::sleep(Duration::from_millis(ms));
}

/// A unit of work's view of one PostgreSQL transaction.
struct PgTxn<'a> {
    runtime: &'a Handle,
    tx: &'a tokio_postgres::Transaction<'a>,
    kept: u64,
    /// The version this transaction published.
    published: Option<u64>,
    /// A statement failed with a serialization conflict: run the work again.
    conflict: bool,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl PgTxn<'_> {
    fn err(&mut self, e: tokio_postgres::Error) -> ControlError {
        if is_conflict(&e) {
            self.conflict = true;
        }
        pg_err(e)
    }

    fn all<T>(
        &mut self,
        sql: &str,
        params: &Params<'_>,
        row: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Vec<T>, ControlError> {
        let rows = self.runtime.block_on(self.tx.query(sql, params));
        let rows = rows.map_err(|e| self.err(e))?;
        rows.iter().map(|r| row(r).map_err(pg_err)).collect()
    }

    fn one<T>(
        &mut self,
        sql: &str,
        params: &Params<'_>,
        row: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Option<T>, ControlError> {
        let found = self.runtime.block_on(self.tx.query_opt(sql, params));
        let found = found.map_err(|e| self.err(e))?;
        found.map(|r| row(&r).map_err(pg_err)).transpose()
    }

    fn exec(&mut self, sql: &str, params: &Params<'_>) -> Result<u64, ControlError> {
        let n = self.runtime.block_on(self.tx.execute(sql, params));
        n.map_err(|e| self.err(e))
    }

    fn meta(&mut self, key: &str) -> Result<u64, ControlError> {
        let v = self.one("SELECT value FROM meta WHERE key = $1", &[&key], |r| {
            r.try_get::<_, i64>(0)
        })?;
        Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
    }
}

/// `AND col = $n` filters for the optional values, numbered from `first`.
fn filters<'a>(first: usize, pairs: &[(&str, Option<&'a str>)]) -> (String, Vec<&'a str>) {
    let mut sql = String::new();
    let mut values = Vec::new();
    for (col, v) in pairs {
        if let Some(v) = v {
            values.push(*v);
            sql.push_str(&format!(" AND {col} = ${}", first + values.len() - 1));
        }
    }
    (sql, values)
}

fn bound<'a>(
    head: Vec<&'a (dyn ToSql + Sync)>,
    values: &'a [&'a str],
) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut all = head;
    all.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
    all
}

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn agent_row(r: &Row) -> Result<pb::Agent, tokio_postgres::Error> {
    Ok(pb::Agent {
        tenant: r.try_get(0)?,
        id: r.try_get(1)?,
        status: r.try_get(2)?,
        risk_tier: r.try_get(3)?,
        reason: r.try_get(4)?,
        created_at: r.try_get(5)?,
        updated_at: r.try_get(6)?,
        updated_by: r.try_get(7)?,
        live_tokens: u32_of(r.try_get(8)?),
    })
}

fn token_row(r: &Row) -> Result<pb::TokenInfo, tokio_postgres::Error> {
    let scopes: String = r.try_get(4)?;
    let revoked_at: Option<i64> = r.try_get(7)?;
    Ok(pb::TokenInfo {
        jti: r.try_get(0)?,
        tenant: r.try_get(1)?,
        agent: r.try_get(2)?,
        session: r.try_get(3)?,
        scopes: json_list(&scopes),
        issued_at: r.try_get(5)?,
        expires_at: r.try_get(6)?,
        status: String::new(),
        revoked_at: revoked_at.unwrap_or(0),
        revoked_reason: r.try_get(8)?,
    })
}

fn kill_row(r: &Row) -> Result<pb::KillMark, tokio_postgres::Error> {
    Ok(pb::KillMark {
        scope: r.try_get(0)?,
        tenant: r.try_get(1)?,
        target: r.try_get(2)?,
        before: r.try_get(3)?,
    })
}

fn tenant_row(r: &Row) -> Result<pb::Tenant, tokio_postgres::Error> {
    Ok(pb::Tenant {
        name: r.try_get(0)?,
        mode: r.try_get(1)?,
        autonomy_level: u32_of(r.try_get(2)?),
        updated_at: r.try_get(3)?,
        updated_by: r.try_get(4)?,
    })
}

fn budget_row(r: &Row) -> Result<pb::Budget, tokio_postgres::Error> {
    let calls: i64 = r.try_get(2)?;
    let window: i64 = r.try_get(4)?;
    Ok(pb::Budget {
        tenant: r.try_get(0)?,
        agent: r.try_get(1)?,
        max_calls: u64::try_from(calls).unwrap_or(0),
        max_cost: r.try_get(3)?,
        window_secs: u64::try_from(window).unwrap_or(0),
        updated_at: r.try_get(5)?,
        updated_by: r.try_get(6)?,
        ..Default::default()
    })
}

fn approval_row(r: &Row) -> Result<pb::Approval, tokio_postgres::Error> {
    Ok(pb::Approval {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        agent: r.try_get(2)?,
        session: r.try_get(3)?,
        run_id: r.try_get(4)?,
        tool: r.try_get(5)?,
        action: r.try_get(6)?,
        resource: r.try_get(7)?,
        arguments: r.try_get(8)?,
        call_hash: r.try_get(9)?,
        policy_reason: r.try_get(10)?,
        decision_id: r.try_get(11)?,
        status: r.try_get(12)?,
        created_at: r.try_get(13)?,
        expires_at: r.try_get(14)?,
        decided_by: r.try_get(15)?,
        decided_at: r.try_get(16)?,
        decision_reason: r.try_get(17)?,
        override_expires_at: r.try_get(18)?,
        used_at: r.try_get(19)?,
        used_by_decision: r.try_get(20)?,
    })
}

fn revision_row(r: &Row) -> Result<pb::PolicyRevision, tokio_postgres::Error> {
    let id: i64 = r.try_get(0)?;
    Ok(pb::PolicyRevision {
        id: u64::try_from(id).unwrap_or(0),
        revision: r.try_get(1)?,
        digest: r.try_get(2)?,
        action: r.try_get(3)?,
        actor: r.try_get(4)?,
        reason: r.try_get(5)?,
        activated_at: r.try_get(6)?,
        active: false,
    })
}

fn incident_row(r: &Row) -> Result<pb::Incident, tokio_postgres::Error> {
    let evidence: String = r.try_get(8)?;
    let actions: String = r.try_get(17)?;
    let decisions: String = r.try_get(21)?;
    Ok(pb::Incident {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        agent: r.try_get(2)?,
        session: r.try_get(3)?,
        run_id: r.try_get(4)?,
        kind: r.try_get(5)?,
        severity: r.try_get(6)?,
        summary: r.try_get(7)?,
        evidence: json_list(&evidence),
        trigger_decision: r.try_get(9)?,
        decided_at_ns: r.try_get(10)?,
        status: r.try_get(11)?,
        created_at_ns: r.try_get(12)?,
        updated_at: r.try_get(13)?,
        acknowledged_by: r.try_get(14)?,
        closed_by: r.try_get(15)?,
        close_reason: r.try_get(16)?,
        actions: json_list(&actions),
        autonomy_level: u32_of(r.try_get(18)?),
        reported_by: r.try_get(19)?,
        policy_revision: r.try_get(20)?,
        decisions: serde_json::from_str(&decisions).unwrap_or_default(),
        notifications: Vec::new(),
    })
}

fn outbox_row(r: &Row) -> Result<Outbox, tokio_postgres::Error> {
    let attempts: i32 = r.try_get(6)?;
    Ok(Outbox {
        id: r.try_get(0)?,
        incident: r.try_get(1)?,
        tenant: r.try_get(2)?,
        url: r.try_get(3)?,
        payload: r.try_get(4)?,
        state: r.try_get(5)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_at_ms: r.try_get(7)?,
        last_error: r.try_get(8)?,
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ControlError> {
    serde_json::to_string(v).map_err(|e| ControlError::Store(e.to_string()))
}

/// The condition selecting a kill scope's tokens (`$1` tenant, `$2` target when used).
fn scope_condition(scope: KillScope) -> (&'static str, bool, bool) {
    match scope {
        KillScope::Session => ("tenant = $1 AND session = $2", true, true),
        KillScope::Agent => ("tenant = $1 AND agent = $2", true, true),
        KillScope::Tenant => ("tenant = $1", true, false),
        KillScope::All | KillScope::Token | KillScope::Unspecified => ("TRUE", false, false),
    }
}

impl Txn for PgTxn<'_> {
    fn epoch(&mut self) -> Result<u64, ControlError> {
        self.meta("epoch")
    }

    fn version(&mut self) -> Result<u64, ControlError> {
        self.meta("version")
    }

    fn publish(
        &mut self,
        items: &[pb::StateItem],
        epoch_event: bool,
    ) -> Result<(u64, u64), ControlError> {
        use prost::Message;
        let version = self
            .one(
                "UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value",
                &[],
                |r| r.try_get::<_, i64>(0),
            )?
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| ControlError::Store("the state version row is missing".into()))?;
        let epoch = self.meta("epoch")?;
        if !items.is_empty() || epoch_event {
            let event = pb::WatchEvent {
                epoch,
                version,
                snapshot: false,
                items: items.to_vec(),
            }
            .encode_to_vec();
            let (v, e) = (stored("version", version)?, stored("epoch", epoch)?);
            self.exec(
                "INSERT INTO changes (version, epoch, event) VALUES ($1, $2, $3)",
                &[&v, &e, &event],
            )?;
            if let Some(floor) = version.checked_sub(self.kept).filter(|f| f % 100 == 0) {
                let floor = stored("version", floor)?;
                let pruned = self.exec("DELETE FROM changes WHERE version <= $1", &[&floor])?;
                if pruned > 0 {
                    self.exec(
                        "UPDATE meta SET value = GREATEST(value, $1) WHERE key = 'feed_floor'",
                        &[&floor],
                    )?;
                }
            }
        }
        let payload = version.to_string();
        self.exec("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])?;
        self.published = Some(version);
        Ok((epoch, version))
    }

    fn set_epoch(&mut self, epoch: u64) -> Result<(), ControlError> {
        let epoch = stored("state epoch", epoch)?;
        self.exec("UPDATE meta SET value = $1 WHERE key = 'epoch'", &[&epoch])
            .map(|_| ())
    }

    fn agent(
        &mut self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<pb::Agent>, ControlError> {
        self.one(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE tenant = $2 AND id = $3"),
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
        let params = bound(vec![&now], &values);
        self.all(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE TRUE{cond} ORDER BY tenant, id"),
            &params,
            agent_row,
        )
    }

    fn insert_agent(&mut self, a: &pb::Agent) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO agents (tenant, id, status, risk_tier, reason, created_at, updated_at, \
             updated_by) VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
            &[
                &a.tenant,
                &a.id,
                &a.status,
                &a.risk_tier,
                &a.reason,
                &a.created_at,
                &a.updated_by,
            ],
        )
        .map(|_| ())
    }

    fn update_agent(&mut self, a: &pb::Agent) -> Result<(), ControlError> {
        self.exec(
            "UPDATE agents SET status = $3, reason = $4, updated_at = $5, updated_by = $6 \
             WHERE tenant = $1 AND id = $2",
            &[
                &a.tenant,
                &a.id,
                &a.status,
                &a.reason,
                &a.updated_at,
                &a.updated_by,
            ],
        )
        .map(|_| ())
    }

    fn token(&mut self, jti: &str) -> Result<Option<pb::TokenInfo>, ControlError> {
        self.one(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = $1"),
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
            " AND revoked_at IS NULL AND expires_at > $2"
        } else {
            " AND $2::BIGINT IS NOT NULL"
        };
        let (cond, values) = filters(3, &[("agent", agent)]);
        let params = bound(vec![&tenant, &after], &values);
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant = $1{live}{cond} \
                 ORDER BY issued_at, jti"
            ),
            &params,
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
        let (cond, with_tenant, with_target) = scope_condition(scope);
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if with_tenant {
            params.push(&tenant);
        }
        if with_target {
            params.push(&target);
        }
        params.push(&expiring_after);
        let n = params.len();
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE {cond} AND revoked_at IS NULL \
                 AND expires_at > ${n} ORDER BY issued_at, jti"
            ),
            &params,
            token_row,
        )
    }

    fn revoked_tokens(
        &mut self,
        expiring_after: i64,
    ) -> Result<Vec<pb::RevokedToken>, ControlError> {
        self.all(
            "SELECT jti, expires_at, tenant FROM tokens WHERE revoked_at IS NOT NULL \
             AND expires_at > $1 ORDER BY jti",
            &[&expiring_after],
            |r| {
                Ok(pb::RevokedToken {
                    jti: r.try_get(0)?,
                    expires_at: r.try_get(1)?,
                    tenant: r.try_get(2)?,
                })
            },
        )
    }

    fn insert_token(&mut self, t: &pb::TokenInfo) -> Result<(), ControlError> {
        let scopes = to_json(&t.scopes)?;
        self.exec(
            "INSERT INTO tokens (jti, tenant, agent, session, scopes, issued_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &t.jti,
                &t.tenant,
                &t.agent,
                &t.session,
                &scopes,
                &t.issued_at,
                &t.expires_at,
            ],
        )
        .map(|_| ())
    }

    fn revoke_token(&mut self, jti: &str, at: i64, reason: &str) -> Result<(), ControlError> {
        self.exec(
            "UPDATE tokens SET revoked_at = $2, revoked_reason = $3 WHERE jti = $1",
            &[&jti, &at, &reason],
        )
        .map(|_| ())
    }

    fn scope_known(
        &mut self,
        scope: KillScope,
        tenant: &str,
        target: &str,
    ) -> Result<bool, ControlError> {
        let count = |r: &Row| r.try_get::<_, i64>(0);
        let n = match scope {
            KillScope::Session => self.one(
                "SELECT count(*) FROM tokens WHERE tenant = $1 AND session = $2",
                &[&tenant, &target],
                count,
            )?,
            KillScope::Agent => self.one(
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = $1 AND agent = $2) + \
                 (SELECT count(*) FROM agents WHERE tenant = $1 AND id = $2)",
                &[&tenant, &target],
                count,
            )?,
            KillScope::Tenant => self.one(
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = $1) + \
                 (SELECT count(*) FROM agents WHERE tenant = $1) + \
                 (SELECT count(*) FROM tenants WHERE name = $1)",
                &[&tenant],
                count,
            )?,
            KillScope::All | KillScope::Token | KillScope::Unspecified => Some(1),
        };
        Ok(n.unwrap_or(0) > 0)
    }

    fn kill_mark(
        &mut self,
        scope: KillScope,
        tenant: &str,
        target: &str,
    ) -> Result<Option<pb::KillMark>, ControlError> {
        self.one(
            "SELECT scope, tenant, target, before FROM kills \
             WHERE scope = $1 AND tenant = $2 AND target = $3",
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
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (scope, tenant, target) DO UPDATE SET before = excluded.before, \
             reason = excluded.reason, actor = excluded.actor, at = excluded.at",
            &[
                &mark.scope,
                &mark.tenant,
                &mark.target,
                &mark.before,
                &reason,
                &actor,
                &at,
            ],
        )
        .map(|_| ())
    }

    fn tenant(&mut self, name: &str) -> Result<Option<pb::Tenant>, ControlError> {
        self.one(
            "SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants WHERE name = $1",
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
        let level = i64::from(t.autonomy_level);
        self.exec(
            "INSERT INTO tenants (name, mode, autonomy_level, updated_at, updated_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, \
             autonomy_level = excluded.autonomy_level, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            &[&t.name, &t.mode, &level, &t.updated_at, &t.updated_by],
        )
        .map(|_| ())
    }

    fn budgets(
        &mut self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<pb::Budget>, ControlError> {
        let (cond, values) = filters(1, &[("tenant", tenant), ("agent", agent)]);
        let params = bound(Vec::new(), &values);
        self.all(
            &format!(
                "SELECT {BUDGET_COLUMNS} FROM budgets WHERE TRUE{cond} ORDER BY tenant, agent"
            ),
            &params,
            budget_row,
        )
    }

    fn put_budget(&mut self, b: &pb::Budget) -> Result<(), ControlError> {
        let calls = i64::try_from(b.max_calls).unwrap_or(i64::MAX);
        let window = i64::try_from(b.window_secs).unwrap_or(i64::MAX);
        self.exec(
            "INSERT INTO budgets (tenant, agent, max_calls, max_cost, window_secs, updated_at, \
             updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, agent) DO UPDATE \
             SET max_calls = excluded.max_calls, max_cost = excluded.max_cost, \
             window_secs = excluded.window_secs, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            &[
                &b.tenant,
                &b.agent,
                &calls,
                &b.max_cost,
                &window,
                &b.updated_at,
                &b.updated_by,
            ],
        )
        .map(|_| ())
    }

    fn delete_budget(&mut self, tenant: &str, agent: &str) -> Result<(), ControlError> {
        self.exec(
            "DELETE FROM budgets WHERE tenant = $1 AND agent = $2",
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
        let params = bound(Vec::new(), &values);
        self.all(
            &format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE TRUE{cond} ORDER BY created_at, id"
            ),
            &params,
            approval_row,
        )
    }

    fn approval(&mut self, tenant: &str, id: &str) -> Result<Option<pb::Approval>, ControlError> {
        self.one(
            &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = $1 AND id = $2"),
            &[&tenant, &id],
            approval_row,
        )
    }

    fn insert_approval(&mut self, a: &pb::Approval) -> Result<(), ControlError> {
        self.exec(
            &format!(
                "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, \
                 $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"
            ),
            &[
                &a.id,
                &a.tenant,
                &a.agent,
                &a.session,
                &a.run_id,
                &a.tool,
                &a.action,
                &a.resource,
                &a.arguments,
                &a.call_hash,
                &a.policy_reason,
                &a.decision_id,
                &a.status,
                &a.created_at,
                &a.expires_at,
                &a.decided_by,
                &a.decided_at,
                &a.decision_reason,
                &a.override_expires_at,
                &a.used_at,
                &a.used_by_decision,
            ],
        )
        .map(|_| ())
    }

    fn update_approval(&mut self, a: &pb::Approval) -> Result<(), ControlError> {
        self.exec(
            "UPDATE approvals SET status = $3, decided_by = $4, decided_at = $5, \
             decision_reason = $6, override_expires_at = $7, used_at = $8, used_by_decision = $9 \
             WHERE tenant = $1 AND id = $2",
            &[
                &a.tenant,
                &a.id,
                &a.status,
                &a.decided_by,
                &a.decided_at,
                &a.decision_reason,
                &a.override_expires_at,
                &a.used_at,
                &a.used_by_decision,
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
            "INSERT INTO policy_bundles (digest, revision, files, stored_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO NOTHING",
            &[&digest, &revision, &files, &at],
        )
        .map(|_| ())
    }

    fn bundle(&mut self, digest: &str) -> Result<Option<Vec<u8>>, ControlError> {
        self.one(
            "SELECT files FROM policy_bundles WHERE digest = $1",
            &[&digest],
            |r| r.try_get(0),
        )
    }

    fn append_revision(&mut self, rev: &pb::PolicyRevision) -> Result<u64, ControlError> {
        let id = self.one(
            "INSERT INTO policy_history (revision, digest, action, actor, reason, at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            &[
                &rev.revision,
                &rev.digest,
                &rev.action,
                &rev.actor,
                &rev.reason,
                &rev.activated_at,
            ],
            |r| r.try_get::<_, i64>(0),
        )?;
        Ok(id.and_then(|id| u64::try_from(id).ok()).unwrap_or(0))
    }

    fn revisions(&mut self, limit: u32) -> Result<Vec<pb::PolicyRevision>, ControlError> {
        let limit = i64::from(limit);
        self.all(
            "SELECT id, revision, digest, action, actor, reason, at FROM policy_history \
             ORDER BY id DESC LIMIT $1",
            &[&limit],
            revision_row,
        )
    }

    fn insert_incident(&mut self, i: &pb::Incident) -> Result<(), ControlError> {
        let evidence = to_json(&i.evidence)?;
        let actions = to_json(&i.actions)?;
        let decisions = to_json(&i.decisions)?;
        let level = i64::from(i.autonomy_level);
        self.exec(
            &format!(
                "INSERT INTO incidents ({INCIDENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, \
                 $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)"
            ),
            &[
                &i.id,
                &i.tenant,
                &i.agent,
                &i.session,
                &i.run_id,
                &i.kind,
                &i.severity,
                &i.summary,
                &evidence,
                &i.trigger_decision,
                &i.decided_at_ns,
                &i.status,
                &i.created_at_ns,
                &i.updated_at,
                &i.acknowledged_by,
                &i.closed_by,
                &i.close_reason,
                &actions,
                &level,
                &i.reported_by,
                &i.policy_revision,
                &decisions,
            ],
        )
        .map(|_| ())
    }

    fn incident(&mut self, tenant: &str, id: &str) -> Result<Option<pb::Incident>, ControlError> {
        self.one(
            &format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE tenant = $1 AND id = $2"),
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
        let params = bound(Vec::new(), &values);
        self.all(
            &format!(
                "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE TRUE{cond} \
                 ORDER BY created_at_ns, id"
            ),
            &params,
            incident_row,
        )
    }

    fn update_incident(&mut self, i: &pb::Incident) -> Result<(), ControlError> {
        let actions = to_json(&i.actions)?;
        self.exec(
            "UPDATE incidents SET status = $3, acknowledged_by = $4, closed_by = $5, \
             close_reason = $6, updated_at = $7, actions = $8 WHERE tenant = $1 AND id = $2",
            &[
                &i.tenant,
                &i.id,
                &i.status,
                &i.acknowledged_by,
                &i.closed_by,
                &i.close_reason,
                &i.updated_at,
                &actions,
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
             last_error, created_at_ms, done_at_ms) \
             VALUES ($1, $2, $3, $4, 'pending', 0, $5, '', $5, 0)",
            &[&incident.id, &incident.tenant, &url, &payload, &at_ms],
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
                 AND next_at_ms <= $1 ORDER BY next_at_ms, id LIMIT $2"
            ),
            &[&now_ms, &limit],
            outbox_row,
        )
    }

    fn next_notification_at(&mut self) -> Result<Option<i64>, ControlError> {
        Ok(self
            .one(
                "SELECT min(next_at_ms) FROM outbox WHERE state = 'pending'",
                &[],
                |r| r.try_get::<_, Option<i64>>(0),
            )?
            .flatten())
    }

    fn notifications(&mut self, incident: &str) -> Result<Vec<Outbox>, ControlError> {
        self.all(
            &format!("SELECT {OUTBOX_COLUMNS} FROM outbox WHERE incident = $1 ORDER BY id"),
            &[&incident],
            outbox_row,
        )
    }

    fn update_notification(&mut self, n: &Outbox, done_at_ms: i64) -> Result<(), ControlError> {
        let attempts = i32::try_from(n.attempts).unwrap_or(i32::MAX);
        self.exec(
            "UPDATE outbox SET payload = $2, state = $3, attempts = $4, next_at_ms = $5, \
             last_error = $6, done_at_ms = $7 WHERE id = $1",
            &[
                &n.id,
                &n.payload,
                &n.state,
                &attempts,
                &n.next_at_ms,
                &n.last_error,
                &done_at_ms,
            ],
        )
        .map(|_| ())
    }

    fn delete_finished_notifications(&mut self, before_ms: i64) -> Result<usize, ControlError> {
        let n = self.exec(
            "DELETE FROM outbox WHERE state <> 'pending' AND done_at_ms < $1",
            &[&before_ms],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}
