//! The control store: records in, records out, and a change feed. Every rule (revoked is
//! final, no restriction over a freeze, what a kill covers, approval caps, incident
//! transitions) lives once, in [`super::rules`], above any backend.
//!
//! A backend implements two traits:
//! - [`ControlStore`] (async): runs a unit of work in one transaction
//!   ([`ControlStore::transact`]), hands out the change feed ([`ControlStore::changes_since`])
//!   and announces new commits ([`ControlStore::subscribe`]).
//! - [`Txn`] (the unit of work's view): plain reads and writes of records
//!   ([`super::records`]: typed statuses, no wire types), and [`Txn::publish`], which
//!   commits the items data planes must apply as the next version of the watched state, in
//!   the same transaction. The feed keeps those items as the data planes receive them
//!   (`WatchEvent`s): it is the one record that is the wire, so a replica hands it out as
//!   stored. The gRPC messages are made from records at the edge ([`super::wire`]).
//!
//! [`super::sqlite::SqliteStore`] is the embedded backend. A unit of work is a plain
//! function over `&mut dyn Txn`; the backend may run it more than once (a serialization
//! conflict with another replica), so it must not act outside the transaction.

use std::sync::{Arc, Mutex};

use super::ControlError;
use super::pb;
use super::records::{
    Agent, Approval, Budget, Incident, IncidentEvent, KillMark, Revision, Scope, Tenant, Token,
};
use crate::types::{AgentStatus, IncidentStatus};

/// How long past its expiry a token still counts for revocation. Data planes accept a
/// token up to `token.leeway_secs` after `exp` (clock skew), so a revoked token must stay
/// in every snapshot, and stay revocable, a while after it expired: an hour is far above
/// any leeway a deployment would set.
pub const EXPIRED_SLACK_SECS: i64 = 3600;

/// How many committed changes the feed keeps: a replica or watcher further behind than
/// this reads a snapshot. A change is a few hundred bytes (a kill of many tokens, more).
pub const FEED_KEPT: u64 = 10_000;

/// How far above its own epoch a sidecar's report is believed ([`next_epoch`]).
pub const MAX_EPOCH_REPORT_AHEAD: u64 = 1_000_000;

pub use crate::config::CONTROL_DB_FILE;

/// A change to the watched state: the action's result, the version it was stored at and
/// the items data planes must apply (empty: nothing they see changed).
#[derive(Debug, Clone)]
pub struct Change<T> {
    /// What the action returns.
    pub value: T,
    /// The epoch the change was stored in (raised only by an operator's confirmation of
    /// a restore).
    pub epoch: u64,
    /// The version of the watched state the change was stored at.
    pub version: u64,
    /// What data planes apply.
    pub items: Vec<pb::StateItem>,
}

/// What [`ControlStore::changes_since`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Feed {
    /// The changes after the version asked for, oldest first (empty: none yet).
    Changes(Vec<pb::WatchEvent>),
    /// Changes after the version asked for were pruned: read a snapshot instead.
    Gap,
}

/// One webhook notification in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    /// The outbox row's id (assigned by the store).
    pub id: i64,
    /// The incident notified.
    pub incident: String,
    /// The incident's tenant.
    pub tenant: String,
    /// Where it is POSTed.
    pub url: String,
    /// The JSON body.
    pub payload: String,
    /// pending, delivered or failed (given up).
    pub state: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When (Unix milliseconds) the next attempt is due.
    pub next_at_ms: i64,
    /// The last attempt's error, empty if none.
    pub last_error: String,
}

/// A unit of work over the store, run in one transaction.
pub type Work<'a> = dyn Fn(&mut dyn Txn) -> Result<(), ControlError> + Send + Sync + 'a;

/// A backend of the control store.
#[async_trait::async_trait]
pub trait ControlStore: Send + Sync + std::fmt::Debug {
    /// Runs `work` in one transaction and commits it (rolls back on its error). A backend
    /// may run it again after a serialization conflict.
    async fn transact(&self, work: Arc<Work<'static>>) -> Result<(), ControlError>;

    /// The committed changes after version `after`, oldest first, at most `limit`, as the
    /// events data planes apply; [`Feed::Gap`] when some of them were pruned (the reader
    /// takes a snapshot instead). Every replica sharing a store delivers its changes, its
    /// own and other replicas', from here, in version order.
    async fn changes_since(&self, after: u64, limit: usize) -> Result<Feed, ControlError>;

    /// The newest committed version, updated as changes commit (in this process, or in
    /// another replica's for a shared backend): a wake-up for [`Self::changes_since`].
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
}

impl dyn ControlStore {
    /// Runs `work` in one transaction and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl Fn(&mut dyn Txn) -> Result<T, ControlError> + Send + Sync + 'static,
    ) -> Result<T, ControlError> {
        let out: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
        let slot = out.clone();
        self.transact(Arc::new(move |tx: &mut dyn Txn| {
            let value = work(tx)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
            Ok(())
        }))
        .await?;
        let value = out.lock().unwrap_or_else(|p| p.into_inner()).take();
        value.ok_or_else(|| ControlError::Store("a transaction ended without a result".into()))
    }
}

/// Reads and writes of records inside one transaction. Times are Unix seconds unless
/// named otherwise; `now` is the caller's clock, passed in once per action.
pub trait Txn {
    // --- the watched state's position ---

    /// The state's epoch (raised only by a confirmed restore).
    fn epoch(&mut self) -> Result<u64, ControlError>;
    /// The state's version (the last committed change's).
    fn version(&mut self) -> Result<u64, ControlError>;
    /// Commits this transaction's change as the next version: bumps the version, keeps the
    /// history hash at it ([`next_chain`]) and, when `items` is not empty or `epoch_event`
    /// is set, appends it to the feed with that hash. Returns (epoch, version).
    fn publish(
        &mut self,
        items: &[pb::StateItem],
        epoch_event: bool,
    ) -> Result<(u64, u64), ControlError>;
    /// Stores a new epoch (the rules check it only rises).
    fn set_epoch(&mut self, epoch: u64) -> Result<(), ControlError>;
    /// The history hash at `version` ([`next_chain`]), if still kept (the feed's window).
    fn chain_at(&mut self, version: u64) -> Result<Option<Vec<u8>>, ControlError>;
    /// The highest (epoch, version) a watching sidecar reported holding above the state's
    /// own, and that sidecar's name: shared by every replica of the store.
    fn reported_ahead(&mut self) -> Result<Option<(u64, u64, String)>, ControlError>;
    /// Stores (replaces) the highest report.
    fn set_reported_ahead(
        &mut self,
        epoch: u64,
        version: u64,
        sidecar: &str,
    ) -> Result<(), ControlError>;

    // --- agents ---

    /// One agent, with its live tokens counted at `now`.
    fn agent(&mut self, tenant: &str, id: &str, now: i64) -> Result<Option<Agent>, ControlError>;
    /// Agents in (tenant, id) order, optionally of one tenant and one stored status.
    fn agents(
        &mut self,
        tenant: Option<&str>,
        status: Option<AgentStatus>,
        now: i64,
    ) -> Result<Vec<Agent>, ControlError>;
    /// Stores a new agent.
    fn insert_agent(&mut self, agent: &Agent) -> Result<(), ControlError>;
    /// Stores an agent's status, reason and who changed it when.
    fn update_agent(&mut self, agent: &Agent) -> Result<(), ControlError>;

    // --- tokens ---

    /// One token as stored.
    fn token(&mut self, jti: &str) -> Result<Option<Token>, ControlError>;
    /// A tenant's tokens in (issued_at, jti) order, optionally of one agent, optionally
    /// only those not revoked and expiring after `expiring_after`.
    fn tokens(
        &mut self,
        tenant: &str,
        agent: Option<&str>,
        unrevoked_expiring_after: Option<i64>,
    ) -> Result<Vec<Token>, ControlError>;
    /// Tokens not revoked, expiring after `expiring_after`, in a kill's scope
    /// (session/agent/tenant of `tenant` named `target`, or all).
    fn tokens_in_scope(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
        expiring_after: i64,
    ) -> Result<Vec<Token>, ControlError>;
    /// Revoked tokens expiring after `expiring_after` (for snapshots).
    fn revoked_tokens(&mut self, expiring_after: i64) -> Result<Vec<Token>, ControlError>;
    /// Stores a newly issued token.
    fn insert_token(&mut self, token: &Token) -> Result<(), ControlError>;
    /// Marks a token revoked at `at` for `reason`.
    fn revoke_token(&mut self, jti: &str, at: i64, reason: &str) -> Result<(), ControlError>;

    // --- kill marks ---

    /// Whether anything was ever known in a kill's scope: a session that had tokens, an
    /// agent that is registered or had tokens, a tenant with agents, tokens or settings.
    fn scope_known(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
    ) -> Result<bool, ControlError>;
    /// The stored mark of a scope, if any.
    fn kill_mark(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
    ) -> Result<Option<KillMark>, ControlError>;
    /// Every stored kill mark.
    fn kill_marks(&mut self) -> Result<Vec<KillMark>, ControlError>;
    /// Stores (replaces) a scope's kill mark.
    fn put_kill_mark(
        &mut self,
        mark: &KillMark,
        reason: &str,
        actor: &str,
        at: i64,
    ) -> Result<(), ControlError>;

    // --- tenants and budgets ---

    /// One tenant's settings.
    fn tenant(&mut self, name: &str) -> Result<Option<Tenant>, ControlError>;
    /// Every tenant's settings.
    fn tenants(&mut self) -> Result<Vec<Tenant>, ControlError>;
    /// Stores (replaces) a tenant's settings.
    fn put_tenant(&mut self, tenant: &Tenant) -> Result<(), ControlError>;
    /// Budgets in (tenant, agent) order, optionally of one tenant and one agent.
    fn budgets(
        &mut self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<Budget>, ControlError>;
    /// Stores (replaces) an agent's budget.
    fn put_budget(&mut self, budget: &Budget) -> Result<(), ControlError>;
    /// Removes an agent's budget.
    fn delete_budget(&mut self, tenant: &str, agent: &str) -> Result<(), ControlError>;

    // --- approvals ---

    /// Approvals as stored, in (created_at, id) order, optionally of one tenant and agent.
    fn approvals(
        &mut self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<Approval>, ControlError>;
    /// One approval as stored.
    fn approval(&mut self, tenant: &str, id: &str) -> Result<Option<Approval>, ControlError>;
    /// Stores a new approval.
    fn insert_approval(&mut self, approval: &Approval) -> Result<(), ControlError>;
    /// Stores an approval's status and its decision and use fields.
    fn update_approval(&mut self, approval: &Approval) -> Result<(), ControlError>;

    // --- policy ---

    /// Stores a bundle under its digest (kept if already there).
    fn store_bundle(
        &mut self,
        digest: &str,
        revision: &str,
        files: &[u8],
        at: i64,
    ) -> Result<(), ControlError>;
    /// A stored bundle's bytes.
    fn bundle(&mut self, digest: &str) -> Result<Option<Vec<u8>>, ControlError>;
    /// Appends an activation to the history; returns its id.
    fn append_revision(&mut self, revision: &Revision) -> Result<u64, ControlError>;
    /// The newest `limit` activations, newest first.
    fn revisions(&mut self, limit: u32) -> Result<Vec<Revision>, ControlError>;

    // --- incidents and their notifications ---

    /// Stores a new incident.
    fn insert_incident(&mut self, incident: &Incident) -> Result<(), ControlError>;
    /// One incident.
    fn incident(&mut self, tenant: &str, id: &str) -> Result<Option<Incident>, ControlError>;
    /// Incidents in (created_at_ns, id) order, optionally of one tenant, status and agent.
    fn incidents(
        &mut self,
        tenant: Option<&str>,
        status: Option<IncidentStatus>,
        agent: Option<&str>,
    ) -> Result<Vec<Incident>, ControlError>;
    /// Stores an incident's status, who acknowledged or closed it, and its actions.
    fn update_incident(&mut self, incident: &Incident) -> Result<(), ControlError>;
    /// Queues a notification (state pending, no attempt yet, due at `at_ms`).
    fn insert_notification(
        &mut self,
        incident: &Incident,
        url: &str,
        payload: &str,
        at_ms: i64,
    ) -> Result<(), ControlError>;
    /// Pending notifications due at `now_ms`, oldest first.
    fn due_notifications(&mut self, now_ms: i64, limit: usize)
    -> Result<Vec<Outbox>, ControlError>;
    /// The earliest `next_at_ms` of a pending notification.
    fn next_notification_at(&mut self) -> Result<Option<i64>, ControlError>;
    /// An incident's notifications, in id order.
    fn notifications(&mut self, incident: &str) -> Result<Vec<Outbox>, ControlError>;
    /// Stores a notification's state, attempts, next time, last error and, when finished,
    /// the time it finished (`done_at_ms`, 0 while pending).
    fn update_notification(&mut self, n: &Outbox, done_at_ms: i64) -> Result<(), ControlError>;
    /// Deletes finished (not pending) notifications finished before `before_ms`.
    fn delete_finished_notifications(&mut self, before_ms: i64) -> Result<usize, ControlError>;
    /// Appends an event of an incident to the incident feed, numbered in commit order (the
    /// number is taken from a counter the transaction updates, so two replicas' events are
    /// numbered as they commit); keeps the last [`FEED_KEPT`]. Returns its number.
    fn append_incident_event(
        &mut self,
        event: &str,
        tenant: &str,
        incident: &str,
    ) -> Result<u64, ControlError>;
    /// Incident events after `after`, oldest first, at most `limit`.
    fn incident_events(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<IncidentEvent>, ControlError>;
    /// The newest incident event's number (0: none).
    fn last_incident_event(&mut self) -> Result<u64, ControlError>;
}

/// The history hash at a version: SHA-256 over a domain tag, the previous version's hash
/// (empty for the first, or for a store from before hashes were kept) and the version's
/// change as the feed encodes it (a `WatchEvent` with its epoch, version and items, no
/// hash). Two stores that reach one version along different histories differ here.
pub fn next_chain(previous: &[u8], change: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"aegis-control-chain-v1\0");
    h.update(
        u64::try_from(previous.len())
            .unwrap_or(u64::MAX)
            .to_be_bytes(),
    );
    h.update(previous);
    h.update(change);
    h.finalize().to_vec()
}

/// Announces `version` as committed to a backend's subscribers, if it is past what was
/// (a backend learns of commits in any order: its own, a notification, a poll).
pub(crate) fn announce(committed: &tokio::sync::watch::Sender<u64>, version: u64) {
    committed.send_if_modified(|v| {
        let newer = version > *v;
        *v = (*v).max(version);
        newer
    });
}

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
