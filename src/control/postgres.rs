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
//! - Nothing waits on the server without a bound ([`STORE_TIMEOUT`]): a connection that
//!   goes silent (a node or network lost without a reset) is cut when a unit of work or a
//!   feed read outlives it, so the replica's next action reconnects instead of holding
//!   every action behind it. TCP keepalives and a user timeout find a dead peer sooner,
//!   and the server cancels a statement or an idle transaction that outlives its own
//!   bounds. Each bound the URL sets itself is kept.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, NoTls, Row};

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
mod tls;

use queries::*;
use rows::*;
use schema::*;

/// The channel changes are announced on.
const CHANNEL: &str = "aegis_changes";
/// How often the stored version is read besides listening (a missed notification).
pub const VERSION_POLL: Duration = Duration::from_secs(1);
/// How often a unit of work is run again after serialization conflicts before giving up.
const MAX_ATTEMPTS: u32 = 20;
/// The longest a unit of work, a feed read or a version read may wait on the server
/// before its connection is cut and the call fails (`UNAVAILABLE`).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection: the client and its driver task (aborted to cut a silent connection).
#[derive(Debug)]
struct Conn {
    client: Client,
    driver: tokio::task::AbortHandle,
}

/// The database and the one connection units of work run on (one at a time: control
/// actions are rare), shared with the tasks that run them.
#[derive(Debug)]
struct Link {
    config: tokio_postgres::Config,
    /// The URL without its password, for messages.
    shown: String,
    client: Arc<Mutex<Option<Conn>>>,
    /// [`STORE_TIMEOUT`] unless a test shortens it.
    timeout: Duration,
    /// TLS, when the DSN asks for it ([`tls`]).
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// The PostgreSQL control store.
#[derive(Debug)]
pub struct PostgresStore {
    link: Arc<Link>,
    /// The newest committed version, for [`ControlStore::subscribe`].
    committed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Whether the listening and polling tasks run.
    watching: std::sync::Once,
    /// How many changes the feed keeps ([`FEED_KEPT`]).
    feed_kept: u64,
    /// Opened read-only (an export): no tables created, every unit of work a READ ONLY
    /// transaction.
    read_only: bool,
}

fn pg_err(e: tokio_postgres::Error) -> ControlError {
    ControlError::Store(format!("postgres: {}", describe(&e)))
}

/// The server's message and SQLSTATE, or the client's error with its cause (a column
/// that would not read says why).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
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
        Self::open_with(url, STORE_TIMEOUT).await
    }

    /// [`Self::open`] with another bound than [`STORE_TIMEOUT`] on each wait (tests).
    pub async fn open_with(url: &str, timeout: Duration) -> Result<Self, ControlError> {
        let store = Self::unopened(url, false, timeout)?;
        let link = &store.link;
        let mut conn = link.connect().await?;
        let created = async {
            let tx = conn.client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(7369676165)", &[])
                .await?;
            tx.batch_execute(SCHEMA).await?;
            tx.commit().await?;
            read_version(&conn.client).await
        };
        let version = match tokio::time::timeout(link.timeout, created).await {
            Ok(v) => v.map_err(|e| link.named(&e))?,
            Err(_) => {
                conn.driver.abort();
                return Err(link.silent("creating the tables"));
            }
        };
        announce(&store.committed, version);
        *link.client.lock().await = Some(conn);
        Ok(store)
    }

    /// Connects to an existing store to read it (an evidence export): nothing is created
    /// or written, and a database without the store's tables is refused, naming it.
    pub async fn open_read_only(url: &str) -> Result<Self, ControlError> {
        let store = Self::unopened(url, true, STORE_TIMEOUT)?;
        let link = &store.link;
        let conn = link.connect().await?;
        let read = tokio::time::timeout(link.timeout, read_version(&conn.client)).await;
        let version = match read {
            Ok(v) => v.map_err(|e| {
                ControlError::Store(format!(
                    "postgres {}: no Aegis control store here ({})",
                    link.shown,
                    describe(&e)
                ))
            })?,
            Err(_) => {
                conn.driver.abort();
                return Err(link.silent("reading the version"));
            }
        };
        announce(&store.committed, version);
        *link.client.lock().await = Some(conn);
        Ok(store)
    }

    fn unopened(url: &str, read_only: bool, timeout: Duration) -> Result<Self, ControlError> {
        let shown = crate::config::redact_url(url);
        let dsn = tls::dsn(url, &shown)?;
        let mut config: tokio_postgres::Config = dsn
            .url
            .parse()
            .map_err(|e| ControlError::Store(format!("control.database_url {shown}: {e}")))?;
        bounded(&mut config);
        Ok(Self {
            link: Arc::new(Link {
                config,
                shown,
                client: Arc::new(Mutex::new(None)),
                timeout,
                tls: dsn.tls,
            }),
            committed: Arc::new(tokio::sync::watch::Sender::new(0)),
            watching: std::sync::Once::new(),
            feed_kept: FEED_KEPT,
            read_only,
        })
    }
}

impl Link {
    /// An error naming the database.
    fn named(&self, e: &tokio_postgres::Error) -> ControlError {
        ControlError::Store(format!("postgres {}: {}", self.shown, describe(e)))
    }

    /// The error for a connection cut after it stayed silent past the bound.
    fn silent(&self, doing: &str) -> ControlError {
        ControlError::Unavailable(format!(
            "postgres {}: no answer in {} ms while {doing}; the connection was cut and the \
             next action reconnects",
            self.shown,
            self.timeout.as_millis()
        ))
    }

    /// A new connection, its driver spawned on the runtime, within the bound.
    async fn connect(&self) -> Result<Conn, ControlError> {
        let connecting = connect(&self.config, &self.shown, self.tls.as_ref());
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(conn) => conn,
            Err(_) => Err(self.silent("connecting")),
        }
    }

    /// Runs `work` on the connection. Each wait is bounded by the timeout on its own:
    /// for the connection another action holds (busy: the call fails, the connection is
    /// kept), for a new connection, and for the transaction once the connection is held.
    /// A transaction with no answer past it is cut (its driver ends, so the statement in
    /// flight fails and the blocking thread lets go); the next unit of work reconnects.
    async fn run(
        self: Arc<Self>,
        work: Arc<Work<'static>>,
        kept: u64,
        read_only: bool,
    ) -> Result<Option<u64>, ControlError> {
        let waited = tokio::time::timeout(self.timeout, self.client.clone().lock_owned()).await;
        let Ok(mut guard) = waited else {
            return Err(self.busy());
        };
        let driver = self.connected(&mut guard).await?;
        let runtime = Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            let result = match guard.as_mut() {
                Some(conn) => run_work(&runtime, &mut conn.client, work.as_ref(), kept, read_only),
                None => Err(ControlError::Unavailable("postgres: no connection".into())),
            };
            drop(guard);
            result
        });
        match tokio::time::timeout(self.timeout, task).await {
            Ok(joined) => {
                joined.map_err(|e| ControlError::Store(format!("store task failed: {e}")))?
            }
            Err(_) => {
                // A transaction not committed is rolled back by the server (one cut during
                // its COMMIT may have committed: the caller is told it is unavailable).
                driver.abort();
                Err(self.silent("running a unit of work"))
            }
        }
    }

    /// The feed after `after` (at most `limit` changes), each wait bounded as in
    /// [`Self::run`].
    async fn changes(self: Arc<Self>, after: u64, limit: usize) -> Result<Feed, ControlError> {
        let Ok(mut guard) = tokio::time::timeout(self.timeout, self.client.lock()).await else {
            return Err(self.busy());
        };
        let driver = self.connected(&mut guard).await?;
        let Some(conn) = guard.as_mut() else {
            return Err(ControlError::Unavailable("postgres: no connection".into()));
        };
        match tokio::time::timeout(self.timeout, read_changes(&mut conn.client, after, limit)).await
        {
            Ok(feed) => feed,
            Err(_) => {
                driver.abort();
                Err(self.silent("reading the change feed"))
            }
        }
    }

    /// The error for a call that waited past the bound for the connection another action
    /// holds (the store is busy, not silent: the connection is kept).
    fn busy(&self) -> ControlError {
        ControlError::Unavailable(format!(
            "postgres {}: busy: no turn on the connection in {} ms",
            self.shown,
            self.timeout.as_millis()
        ))
    }

    /// The open connection, or a new one in its place (within the bound) when there is none
    /// or it closed.
    async fn connected(
        &self,
        slot: &mut Option<Conn>,
    ) -> Result<tokio::task::AbortHandle, ControlError> {
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            if let Some(old) = slot.take() {
                old.driver.abort();
            }
            *slot = Some(self.connect().await?);
        }
        match slot.as_ref() {
            Some(c) => Ok(c.driver.clone()),
            None => Err(ControlError::Unavailable("postgres: no connection".into())),
        }
    }
}

/// Bounds a connection's waits where the URL does not: a connect timeout, keepalives that
/// find a dead peer in about 20 s, a TCP user timeout, and the server's own statement and
/// idle-transaction timeouts.
fn bounded(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(3))
            .keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(STORE_TIMEOUT);
    }
    let mut options = config.get_options().unwrap_or_default().to_owned();
    for (name, value) in [
        ("statement_timeout", STORE_TIMEOUT.as_millis()),
        (
            "idle_in_transaction_session_timeout",
            3 * STORE_TIMEOUT.as_millis(),
        ),
    ] {
        if !options.contains(name) {
            options.push_str(&format!(" -c {name}={value}"));
        }
    }
    config.options(options.trim());
}

async fn connect(
    config: &tokio_postgres::Config,
    shown: &str,
    tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
) -> Result<Conn, ControlError> {
    let failed = |e: tokio_postgres::Error| {
        ControlError::Unavailable(format!("postgres {shown}: {}", describe(&e)))
    };
    fn drive<F>(connection: F) -> tokio::task::AbortHandle
    where
        F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
    {
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                crate::log!(warn, "control store: postgres connection ended: {e}");
            }
        })
        .abort_handle()
    }
    let (client, driver) = match tls {
        None => {
            let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
            (client, drive(connection))
        }
        Some(c) => {
            let (client, connection) = config
                .connect(tls::MakeTls(c.clone()))
                .await
                .map_err(failed)?;
            (client, drive(connection))
        }
    };
    Ok(Conn { client, driver })
}

/// A connection that forwards the versions notified on [`CHANNEL`] to `notified`, its
/// driver spawned (aborted to drop it).
async fn connect_listening(
    config: &tokio_postgres::Config,
    tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
    notified: tokio::sync::mpsc::UnboundedSender<u64>,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    use tokio_postgres::AsyncMessage;
    async fn forward<S, T>(
        mut connection: tokio_postgres::Connection<S, T>,
        notified: tokio::sync::mpsc::UnboundedSender<u64>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Ok(v) = n.payload().parse::<u64>()
                        && notified.send(v).is_err()
                    {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }
    Ok(match tls {
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            (client, tokio::spawn(forward(connection, notified)))
        }
        Some(c) => {
            let (client, connection) = config.connect(tls::MakeTls(c.clone())).await?;
            (client, tokio::spawn(forward(connection, notified)))
        }
    })
}

async fn read_version(client: &Client) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT value FROM meta WHERE key = 'version'", &[])
        .await?;
    let v: i64 = row.try_get(0)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

#[async_trait::async_trait]
impl ControlStore for PostgresStore {
    async fn transact(&self, work: Arc<Work<'static>>) -> Result<(), ControlError> {
        // On its own task: a caller that gives up (a request's deadline) does not stop the
        // bound, so a silent connection is still cut and the next action gets through.
        let run = self.link.clone().run(work, self.feed_kept, self.read_only);
        let published = tokio::spawn(run)
            .await
            .map_err(|e| ControlError::Store(format!("store task failed: {e}")))??;
        if let Some(version) = published {
            announce(&self.committed, version);
        }
        Ok(())
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Feed, ControlError> {
        tokio::spawn(self.link.clone().changes(after, limit))
            .await
            .map_err(|e| ControlError::Store(format!("store task failed: {e}")))?
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        if let Ok(runtime) = Handle::try_current() {
            self.watching.call_once(|| {
                let committed = Arc::downgrade(&self.committed);
                runtime.spawn(listen(
                    self.link.config.clone(),
                    self.link.shown.clone(),
                    self.link.tls.clone(),
                    committed,
                    self.link.timeout,
                ));
            });
        }
        self.committed.subscribe()
    }
}

/// The changes after `after` (at most `limit`), or a gap when the feed was pruned past it.
async fn read_changes(client: &mut Client, after: u64, limit: usize) -> Result<Feed, ControlError> {
    use prost::Message;
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
        let event = pb::WatchEvent::decode(bytes.as_slice())
            .map_err(|e| ControlError::Store(format!("a stored change does not decode: {e}")))?;
        events.push(event);
    }
    Ok(Feed::Changes(events))
}

/// LISTENs on its own connection and announces the versions notified; reads the stored
/// version every [`VERSION_POLL`] as well (a notification missed while the connection was
/// down). Reconnects after a second when the connection drops; ends with the store.
async fn listen(
    config: tokio_postgres::Config,
    shown: String,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    committed: std::sync::Weak<tokio::sync::watch::Sender<u64>>,
    timeout: Duration,
) {
    loop {
        let (notified_tx, mut notified) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let connected = tokio::time::timeout(
            timeout,
            connect_listening(&config, tls.as_ref(), notified_tx),
        )
        .await;
        let (client, driver) = match connected {
            Ok(Ok(c)) => c,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => describe(&e),
                    _ => format!("no answer in {} ms", timeout.as_millis()),
                };
                crate::log!(
                    warn,
                    "control store: postgres {shown}: cannot listen: {why}"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                if committed.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let listening =
            tokio::time::timeout(timeout, client.batch_execute(&format!("LISTEN {CHANNEL}"))).await;
        if let Ok(Err(e)) = listening {
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
                _ = poll.tick() => match tokio::time::timeout(timeout, read_version(&client)).await {
                    Ok(Ok(v)) => announce(&sender, v),
                    Ok(Err(_)) if client.is_closed() => break,
                    Ok(Err(e)) => crate::log!(warn, "control store: postgres {shown}: {}", describe(&e)),
                    // A silent connection: drop it and listen on a new one.
                    Err(_) => break,
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
