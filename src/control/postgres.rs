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
use super::pb;
use super::records::{
    Agent, Approval, Budget, Incident, KillMark, Revision, Revocation, Scope, Tenant, Token,
};
use super::store::{ControlStore, FEED_KEPT, Feed, Outbox, Txn, Work, announce};
use crate::types::{AgentStatus, IncidentStatus};

mod queries;
mod rows;
mod schema;

use queries::*;
use rows::*;
use schema::*;

/// The channel changes are announced on.
const CHANNEL: &str = "aegis_changes";
/// How often the stored version is read besides listening (a missed notification).
pub const VERSION_POLL: Duration = Duration::from_secs(1);
/// How often a unit of work is run again after serialization conflicts before giving up.
const MAX_ATTEMPTS: u32 = 20;

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
        let store = Self::unopened(url, false)?;
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

    /// Connects to an existing store to read it (an evidence export): nothing is created
    /// or written, and a database without the store's tables is refused, naming it.
    pub async fn open_read_only(url: &str) -> Result<Self, ControlError> {
        let store = Self::unopened(url, true)?;
        let client = store.connect().await?;
        let version = read_version(&client).await.map_err(|e| {
            ControlError::Store(format!(
                "postgres {}: no Aegis control store here ({})",
                store.shown,
                describe(&e)
            ))
        })?;
        announce(&store.committed, version);
        *store.client.lock().await = Some(client);
        Ok(store)
    }

    fn unopened(url: &str, read_only: bool) -> Result<Self, ControlError> {
        let shown = crate::config::redact_url(url);
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| ControlError::Store(format!("control.database_url {shown}: {e}")))?;
        Ok(Self {
            config,
            shown,
            client: Arc::new(Mutex::new(None)),
            committed: Arc::new(tokio::sync::watch::Sender::new(0)),
            watching: std::sync::Once::new(),
            feed_kept: FEED_KEPT,
            read_only,
        })
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

#[async_trait::async_trait]
impl ControlStore for PostgresStore {
    async fn transact(&self, work: Arc<Work<'static>>) -> Result<(), ControlError> {
        let mut guard = self.client.clone().lock_owned().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await?);
        }
        let runtime = Handle::current();
        let (kept, read_only) = (self.feed_kept, self.read_only);
        let (result, guard) = tokio::task::spawn_blocking(move || {
            let result = match guard.as_mut() {
                Some(client) => run_work(&runtime, client, work.as_ref(), kept, read_only),
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
