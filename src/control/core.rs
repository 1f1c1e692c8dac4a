//! The control actions: validate, store, publish, audit.
//!
//! Every action that changes what data planes enforce runs under one publish lock:
//! the store commits it at the next version, the local data plane (all-in-one) applies
//! it, every watcher is handed it, and only then is it audited and answered. So when
//! `aegis ctl agents freeze` returns, the all-in-one server already denies the agent, and
//! fleet sidecars have it in flight. A change that took effect but could not be audited
//! is answered with an error saying exactly that (and readiness reports the audit log).
//!
//! # Layout
//! This file holds the core itself: its settings, the unit-of-work runner, the change
//! feed's delivery (`pump`), the audit of each action, subscriptions and the state epoch.
//! The actions are grouped by what they act on:
//! - `agents`: agents, their tokens and kills;
//! - `approvals`: approvals and override tokens;
//! - `tenancy`: tenant settings and budgets;
//! - `policy`: policy revisions;
//! - `incidents`: incidents, their containment and notifications.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use tokio::sync::broadcast;

use super::approvals::{OVERRIDE_AUDIENCE, OverrideClaims};
use super::auth::{Need, Operator, Role};
use super::pb;
use super::refusals::{RefusalLimiter, Refuser};
use super::rules;
use super::store::{Change, ControlStore, Feed, Txn};
use super::{ControlError, now_secs, random_id, valid_id};
use crate::audit::Record;
use crate::audit::store::AuditLog;
use crate::identity::{Audience, Claims, KeyRing, mint, parse_and_verify};
use crate::keys::Signer;
use crate::policy::{BundleFiles, CompiledBundle, PolicyOptions};
use crate::seam::{ControlPlane, LocalDataPlane};

/// How many events a slow watcher may fall behind before it is resynced from a snapshot.
const WATCH_BUFFER: usize = 4096;
/// How often a delivery of committed changes that failed is tried again.
const FEED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long this replica's deliveries from its store may keep failing (tried every second,
/// counted from the start of the first failing attempt) before it hands its watchers off: their streams end `UNAVAILABLE` and new ones are refused, so sidecars
/// reconnect through the Service to a replica that reaches the store.
pub const HANDOFF_AFTER: std::time::Duration = std::time::Duration::from_secs(3);
/// How many incident events a slow incident watcher may fall behind before it is ended.
const INCIDENT_BUFFER: usize = 1024;

/// Settings of the control actions.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `iss` of agent tokens (as the data planes verify it).
    pub issuer: String,
    /// `aud` of agent tokens (as the data planes verify it).
    pub audience: String,
    /// Default lifetime of agent tokens, in seconds.
    pub token_ttl_secs: u64,
    /// Largest lifetime of agent tokens, in seconds (`control.max_token_ttl_secs`).
    pub max_token_ttl_secs: u64,
    /// How long a pending approval waits for an answer before it expires (deny).
    pub approval_ttl_secs: u64,
    /// Default lifetime of an override token.
    pub override_ttl_secs: u64,
    /// What an override token is bound to besides the call (`control.override_binding`).
    pub override_binding: crate::config::OverrideBinding,
    /// Most pending approvals per agent; past that, `approval_cap_reached`.
    pub max_pending_approvals: u32,
    /// A tenant's SOC autonomy level until one is set (`AEGIS_SOC_AUTONOMY_LEVEL`).
    pub default_autonomy: u32,
    /// Where incidents are notified (`[[notify.webhooks]]`).
    pub webhooks: Vec<crate::config::WebhookConfig>,
    /// RequestApproval and ReportIncident calls a second per sidecar credential
    /// (`control.sidecar_calls_per_sec`).
    pub sidecar_calls_per_sec: u32,
    /// The burst of those calls allowed above the rate (`control.sidecar_call_burst`).
    pub sidecar_call_burst: u32,
}

/// The control plane's actions.
#[derive(Debug)]
pub struct ControlCore {
    store: Arc<dyn ControlStore>,
    audit: AuditLog,
    signer: Signer,
    /// The control plane's own key, for override tokens it minted.
    own_key: KeyRing,
    settings: Settings,
    /// The data plane in the same process (all-in-one): changes apply to it before an
    /// action answers. The core knows it only through the seam's trait.
    local: Option<Arc<dyn LocalDataPlane>>,
    policy_opts: PolicyOptions,
    events: broadcast::Sender<Arc<pb::WatchEvent>>,
    /// Incidents raised and changed, for `WatchIncidents`.
    pub(super) incident_events: broadcast::Sender<Arc<pb::IncidentEvent>>,
    /// The last incident event handed to the incident watchers (None until
    /// [`ControlCore::init_incident_feed`]).
    incidents_told: tokio::sync::Mutex<Option<u64>>,
    /// The webhook delivery task, woken when an incident queued notifications.
    notifier: std::sync::OnceLock<Arc<super::notify::Notifier>>,
    /// Held while a change is stored and delivered, and while a snapshot is taken.
    publish: tokio::sync::Mutex<()>,
    /// The newest version handed to the local data plane and the watchers: every change
    /// reaches them from the store's feed, in version order, once (see [`Self::pump`]).
    delivered: std::sync::atomic::AtomicU64,
    /// The history hash at `delivered`: the store holding another one there means its
    /// history was replaced under this replica (a restored backup that moved on, a
    /// failover that lost commits).
    delivered_chain: std::sync::Mutex<Vec<u8>>,
    /// The local data plane is owed a snapshot (after a new epoch).
    local_resync: std::sync::atomic::AtomicBool,
    /// Why this replica cannot deliver what its store commits, once that has lasted
    /// [`HANDOFF_AFTER`]; `None` while deliveries go through.
    lost: tokio::sync::watch::Sender<Option<String>>,
    /// Rations refusal rows per actor, per peer and overall, so that a caller who may not
    /// act cannot flood the signed log; the rest are only counted.
    refusals: RefusalLimiter,
    /// Incidents raised since start, per kind (indexed as [`INCIDENT_KINDS`]).
    incidents_raised: Vec<std::sync::atomic::AtomicU64>,
    /// The fleet calls that make the control plane act, per sidecar credential.
    sidecar_rate: super::rate::SidecarRate,
    /// Watch calls from sidecars holding a state ahead of this control plane's.
    pub sidecars_ahead: std::sync::atomic::AtomicU64,
}

/// The state's position and the highest a sidecar reported above it.
fn state_version_of(
    (epoch, version): (u64, u64),
    seen: Option<(u64, u64, String)>,
) -> pb::StateVersion {
    let seen = seen.unwrap_or_default();
    pb::StateVersion {
        epoch,
        version,
        highest_seen_epoch: seen.0,
        highest_seen_version: seen.1,
        highest_seen_by: seen.2,
    }
}

/// One audited control action.
struct Act<'a> {
    actor: &'a str,
    action: &'static str,
    tenant: &'a str,
    agent: &'a str,
    session: &'a str,
    target: String,
    reason: &'a str,
    approval_id: &'a str,
    revision: &'a str,
}

impl<'a> Act<'a> {
    fn new(actor: &'a str, action: &'static str, tenant: &'a str) -> Self {
        Self {
            actor,
            action,
            tenant,
            agent: "",
            session: "",
            target: String::new(),
            reason: "",
            approval_id: "",
            revision: "",
        }
    }
}

/// The identity the in-process data plane acts under.
pub fn data_plane_operator() -> Operator {
    Operator {
        name: "data-plane".into(),
        role: Role::Sidecar,
        tenant: super::auth::ALL_TENANTS.into(),
        expires_at: i64::MAX,
    }
}

/// The control plane as a data plane in the same process reaches it: the core called
/// directly, as the data plane's operator. The same trait a fleet sidecar reaches over
/// gRPC ([`crate::dataplane::link::Remote`]).
#[derive(Debug, Clone)]
pub struct InProcessControl {
    core: Arc<ControlCore>,
    op: Operator,
}

impl InProcessControl {
    /// The data plane's way to `core`.
    pub fn new(core: Arc<ControlCore>) -> Self {
        Self {
            core,
            op: data_plane_operator(),
        }
    }
}

#[async_trait::async_trait]
impl ControlPlane for InProcessControl {
    async fn request_approval(
        &self,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, ControlError> {
        self.core.request_approval(&self.op, req).await
    }

    async fn report_incident(
        &self,
        req: pb::ReportIncidentRequest,
    ) -> Result<pb::Incident, ControlError> {
        self.core.report_incident(&self.op, req).await
    }

    async fn redeem_override(
        &self,
        req: pb::RedeemOverrideRequest,
    ) -> Result<pb::RedeemOverrideResponse, ControlError> {
        self.core.redeem_override(&self.op, req).await
    }
}

fn required_reason(reason: &str, what: &str) -> Result<(), ControlError> {
    if reason.trim().is_empty() {
        Err(ControlError::invalid(format!(
            "{what} needs a reason (--reason): it is recorded in the audit log"
        )))
    } else {
        Ok(())
    }
}

fn join_err(e: tokio::task::JoinError) -> ControlError {
    ControlError::Store(format!("store task failed: {e}"))
}

// === impl ControlCore ===

impl ControlCore {
    /// A core over `store`, auditing to `audit` and minting with `signer`; `local` is the
    /// data plane in the same process (all-in-one), if any.
    pub fn new(
        store: Arc<dyn ControlStore>,
        audit: AuditLog,
        signer: Signer,
        settings: Settings,
        local: Option<Arc<dyn LocalDataPlane>>,
        policy_opts: PolicyOptions,
    ) -> Self {
        let mut own_key = KeyRing::default();
        own_key.insert(signer.verifying_key());
        let sidecar_rate = super::rate::SidecarRate::new(
            settings.sidecar_calls_per_sec,
            settings.sidecar_call_burst,
        );
        Self {
            store,
            audit,
            signer,
            own_key,
            settings,
            local,
            policy_opts,
            events: broadcast::channel(WATCH_BUFFER).0,
            incident_events: broadcast::channel(INCIDENT_BUFFER).0,
            incidents_told: tokio::sync::Mutex::new(None),
            notifier: std::sync::OnceLock::new(),
            publish: tokio::sync::Mutex::new(()),
            delivered: std::sync::atomic::AtomicU64::new(0),
            delivered_chain: std::sync::Mutex::new(Vec::new()),
            local_resync: std::sync::atomic::AtomicBool::new(false),
            lost: tokio::sync::watch::Sender::new(None),
            refusals: RefusalLimiter::default(),
            sidecar_rate,
            incidents_raised: INCIDENT_KINDS
                .iter()
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            sidecars_ahead: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Loads the stored state into the local data plane (all-in-one start-up) and starts
    /// delivering the store's feed after it.
    pub async fn load_local(&self) -> Result<(), ControlError> {
        let _guard = self.publish.lock().await;
        let event = self.snapshot().await?;
        if let Some(local) = &self.local {
            local.apply(&event);
        }
        self.set_delivered(&event);
        Ok(())
    }

    /// A snapshot of the whole state and a receiver for every change after it.
    pub async fn subscribe(
        &self,
    ) -> Result<(pb::WatchEvent, broadcast::Receiver<Arc<pb::WatchEvent>>), ControlError> {
        // Under the publish lock, after delivering what the feed holds: no change can slip
        // between the snapshot and the receiver (one committed by another replica meanwhile
        // is in the snapshot and delivered again later, which watchers skip by version).
        if let Some(why) = self.store_lost() {
            return Err(ControlError::Unavailable(why));
        }
        let _guard = self.publish.lock().await;
        self.pump().await?;
        let rx = self.events.subscribe();
        Ok((self.snapshot().await?, rx))
    }

    /// Why this replica cannot deliver its store's changes, when that has lasted
    /// [`HANDOFF_AFTER`] (readiness reports it; watchers are handed off).
    pub fn store_lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Told when deliveries are lost (`Some`) and when they go through again.
    pub fn store_lost_watch(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.lost.subscribe()
    }

    /// The whole watched state as a snapshot event.
    async fn snapshot(&self) -> Result<pb::WatchEvent, ControlError> {
        let now = now_secs();
        self.run(move |tx| rules::snapshot(tx, now)).await
    }

    /// Whether the state a watcher says it holds (epoch, version, history hash) is part of
    /// the history `snapshot` is at: `Some(false)` when the store holds another history at
    /// that version (a restored backup that moved on, a failover that lost commits),
    /// logged; `None` when it cannot tell (another epoch, a version past the snapshot's or
    /// out of the kept window, or no hash on either side).
    pub async fn descends(
        &self,
        sidecar: &str,
        seen: (u64, u64),
        seen_chain: &[u8],
        snapshot: &pb::WatchEvent,
    ) -> Option<bool> {
        if seen_chain.is_empty() || seen.0 != snapshot.epoch || seen.1 > snapshot.version {
            return None;
        }
        let version = seen.1;
        let stored = self.run(move |tx| tx.chain_at(version)).await.ok()??;
        if stored.is_empty() {
            return None;
        }
        let descends = stored == seen_chain;
        if !descends {
            crate::log!(
                error,
                "control plane: sidecar {sidecar:?} holds epoch {} version {} of another \
                 history than this store's (restored from a backup that moved on, or failed \
                 over to a copy that lost commits?): its snapshot is marked diverged and the \
                 sidecar refuses it until an operator re-applies what is missing and runs \
                 `aegis ctl state confirm-restore`",
                seen.0,
                seen.1
            );
        }
        Some(descends)
    }

    /// Notes `event` as the last delivered: its version and history hash.
    fn set_delivered(&self, event: &pb::WatchEvent) {
        self.delivered.store(event.version, Ordering::Release);
        *self
            .delivered_chain
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = event.chain.clone();
    }

    /// Hands every change the store committed after the last one delivered to the local
    /// data plane and to every watcher, in version order: this replica's own changes and,
    /// with a shared store, other replicas'. A gap (the feed was pruned past what was
    /// delivered) is bridged with a snapshot. Called under the publish lock.
    async fn pump(&self) -> Result<(), ControlError> {
        const BATCH: usize = 1000;
        // The store went back (a restored file, a failover to a standby that had not
        // caught up): versions this replica already delivered are being used again for
        // other changes. Everyone gets a snapshot of what the store holds now (sidecars
        // refuse it as a rollback, keeping what they hold, until an operator confirms
        // the restore), and delivery goes on from there.
        let delivered = self.delivered.load(Ordering::Acquire);
        let ((_, version), at_delivered) = self
            .run(move |tx| Ok((rules::state_version(tx)?, tx.chain_at(delivered)?)))
            .await?;
        if version < delivered {
            crate::log!(
                error,
                "control plane: the store is at version {version}, behind the {delivered} \
                 this replica delivered (restored, or failed over to a stale copy?): \
                 resending a snapshot"
            );
            let snapshot = self.snapshot().await?;
            self.set_delivered(&snapshot);
            if let Some(local) = &self.local {
                local.apply(&snapshot);
            }
            let _ = self.events.send(Arc::new(snapshot));
            return Ok(());
        }
        // The store reached (or passed) the version delivered along another history: what
        // was delivered there is not what it holds. Everyone gets a snapshot marked
        // diverged, refused like a rollback until an operator confirms the restore.
        let held = self
            .delivered_chain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(stored) = at_delivered
            && !stored.is_empty()
            && !held.is_empty()
            && stored != held
        {
            crate::log!(
                error,
                "control plane: the store holds another history at version {delivered} than \
                 the one this replica delivered (restored from a backup that moved on, or \
                 failed over to a copy that lost commits?): resending a snapshot marked \
                 diverged; data planes keep what they hold until an operator re-applies what \
                 is missing and runs `aegis ctl state confirm-restore`"
            );
            let mut snapshot = self.snapshot().await?;
            snapshot.diverged = true;
            self.set_delivered(&snapshot);
            if let Some(local) = &self.local {
                local.apply(&snapshot);
            }
            let _ = self.events.send(Arc::new(snapshot));
            return Ok(());
        }
        loop {
            let after = self.delivered.load(Ordering::Acquire);
            let events = match self.store.changes_since(after, BATCH).await? {
                Feed::Changes(events) => events,
                Feed::Gap => vec![self.snapshot().await?],
            };
            let full = events.len() >= BATCH;
            for event in events {
                if event.version <= self.delivered.load(Ordering::Acquire) {
                    continue;
                }
                self.set_delivered(&event);
                if let Some(local) = &self.local {
                    local.apply(&event);
                    if !event.snapshot && event.items.is_empty() {
                        // A new epoch (an operator confirmed a restore): the local data
                        // plane judges the state at it, as a sidecar resyncs (below, once
                        // the watchers have the event; tried again until it is through).
                        self.local_resync.store(true, Ordering::Release);
                    }
                }
                let _ = self.events.send(Arc::new(event));
            }
            if !full {
                break;
            }
        }
        if let Some(local) = &self.local
            && self.local_resync.load(Ordering::Acquire)
        {
            local.apply(&self.snapshot().await?);
            self.local_resync.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Delivers what other replicas committed to a shared store, as it commits: woken by
    /// the store's subscription, it pumps the feed until `shutdown`. With the embedded
    /// SQLite store every change is this process's and already delivered by its action;
    /// the task then only wakes to find nothing new.
    pub fn start_feed(
        self: &Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        let mut committed = self.store.subscribe();
        // Other replicas' incidents (raised, acknowledged, closed), every second, on a task
        // of their own: a slow read there never delays the state's delivery.
        let incidents = Arc::downgrade(self);
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FEED_RETRY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                let Some(core) = incidents.upgrade() else {
                    return;
                };
                core.tell_incident_watchers().await;
            }
        });
        tokio::spawn(async move {
            // A commit is announced once; besides, the feed is read every second: a delivery
            // that failed (the store unreachable for a moment) is tried again until it is
            // through, and a store that went back in version is noticed.
            let mut retry = tokio::time::interval(FEED_RETRY);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Deliveries are tried every second; the first failing attempt, from its start,
            // tells how long this replica has been without its store (a wait for the
            // publish lock is not counted, nor the time before an old success).
            let mut failing_since: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    changed = committed.changed() => if changed.is_err() { return },
                    _ = retry.tick() => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                let Some(core) = me.upgrade() else { return };
                let guard = core.publish.lock().await;
                let attempt = std::time::Instant::now();
                let pumped = core.pump().await;
                drop(guard);
                match pumped {
                    Ok(()) => {
                        failing_since = None;
                        if core.lost.send_if_modified(|lost| lost.take().is_some()) {
                            crate::log!(
                                info,
                                "control plane: the store is reached again; watchers are served"
                            );
                        }
                    }
                    Err(e) => {
                        crate::log!(
                            error,
                            "control plane: delivering stored changes failed (retried every \
                             second): {e}"
                        );
                        let since = *failing_since.get_or_insert(attempt);
                        if since.elapsed() >= HANDOFF_AFTER {
                            let why = format!(
                                "this control-plane replica has not reached its store for {} s \
                                 ({e}); follow another replica",
                                since.elapsed().as_secs()
                            );
                            core.lost.send_if_modified(|lost| {
                                let first = lost.is_none();
                                if first {
                                    crate::log!(
                                        error,
                                        "control plane: handing watchers off: {why}"
                                    );
                                }
                                *lost = Some(why.clone());
                                first
                            });
                        }
                    }
                }
            }
        })
    }

    /// Takes one call from a sidecar credential's rate (RequestApproval, ReportIncident
    /// over gRPC), or RESOURCE_EXHAUSTED.
    /// The tenant is checked first: a call for a tenant the credential does not name is
    /// PERMISSION_DENIED (and audited) whatever the rate, and costs the bucket nothing.
    pub fn admit_sidecar(
        &self,
        op: &Operator,
        what: &str,
        tenant: &str,
        agent: &str,
    ) -> Result<(), ControlError> {
        op.require(Need::Fleet, tenant)?;
        self.sidecar_rate.admit(op, what, agent)
    }

    /// Sidecar calls refused over their credential's rate since start.
    pub fn sidecar_calls_refused(&self) -> u64 {
        self.sidecar_rate
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    // --- state epoch ---

    /// Notes the (epoch, version) a watching sidecar says it holds. One ahead of this
    /// control plane's own means this one lost changes (restored from a backup, failed
    /// over to a stale replica): logged as an error and counted, never silently followed
    /// (the sidecar refuses this state until an operator confirms the restore).
    /// The highest such report is kept in the store, for whichever replica the operator
    /// confirms the restore at.
    pub async fn note_sidecar_state(&self, sidecar: &str, seen: (u64, u64), own: (u64, u64)) {
        if seen <= own {
            return;
        }
        self.sidecars_ahead
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::log!(
            error,
            "control plane: sidecar {sidecar:?} holds state epoch {} version {}, ahead of this \
             control plane's epoch {} version {}: restored from a backup or failed over to a \
             stale replica? Changes made since are lost here (revocations, kills, freezes); \
             sidecars refuse this state until an operator re-applies what is missing and runs \
             `aegis ctl state confirm-restore`",
            seen.0,
            seen.1,
            own.0,
            own.1
        );
        let name = sidecar.to_owned();
        if let Err(e) = self
            .run(move |tx| rules::note_reported(tx, seen, &name))
            .await
        {
            crate::log!(
                error,
                "control plane: cannot keep sidecar {sidecar:?}'s report in the store: {e}"
            );
        }
    }

    /// The state's (epoch, version) and the highest a sidecar reported above it.
    pub async fn state_version(
        &self,
        op: &Operator,
        _req: pb::GetStateVersionRequest,
    ) -> Result<pb::StateVersion, ControlError> {
        op.require(Need::Read, "")?;
        let (own, seen) = self
            .run(move |tx| Ok((rules::state_version(tx)?, tx.reported_ahead()?)))
            .await?;
        let mut v = state_version_of(own, seen);
        if op.tenant != super::auth::ALL_TENANTS {
            // The sidecar that reported being ahead may serve another tenant: its name is
            // for the operators of every tenant only.
            v.highest_seen_by.clear();
        }
        Ok(v)
    }

    /// Raises the epoch: the operator says the state held now (restored from a backup)
    /// is intended. Sidecars that refused it as a rollback follow it again; they keep the
    /// revocations and kill marks they knew until the tokens those cover expire. The new
    /// epoch is past the highest a sidecar reported holding too ([`super::store::next_epoch`]),
    /// so no sidecar can take it for a state it already followed. Audited as
    /// `state.confirm_restore`.
    pub async fn confirm_restore(
        &self,
        op: &Operator,
        req: pb::ConfirmRestoreRequest,
    ) -> Result<pb::StateVersion, ControlError> {
        op.require(Need::Global, "")?;
        required_reason(&req.reason, "state.confirm-restore")?;
        // Past the highest epoch a sidecar reported to any replica too.
        let (epoch, version, seen) = {
            let _guard = self.publish.lock().await;
            let (epoch, version, reported, seen) = self
                .run(move |tx| {
                    let (epoch, version, reported) = rules::raise_epoch(tx)?;
                    Ok((epoch, version, reported, tx.reported_ahead()?))
                })
                .await?;
            if reported >= epoch {
                crate::log!(
                    error,
                    "control plane: a sidecar reported state epoch {reported}, more than {} \
                     above this control plane's: not believed (a forged report?); the epoch \
                     is raised to {epoch} only",
                    super::store::MAX_EPOCH_REPORT_AHEAD
                );
            }
            // The store's feed carries an event with no items: the new epoch, to every
            // watcher (a sidecar resyncs from a fresh snapshot on seeing it) and the local
            // data plane.
            self.pump().await?;
            (epoch, version, seen)
        };
        let actor = op.actor();
        let mut act = Act::new(&actor, "state.confirm_restore", "");
        act.target = format!("state:epoch={epoch} version={version}");
        act.reason = &req.reason;
        self.record(act, None).await?;
        crate::log!(
            warn,
            "control plane: {actor} confirmed the restored state: epoch {epoch} version {version} ({})",
            req.reason
        );
        Ok(state_version_of((epoch, version), seen))
    }

    /// Watchers connected now.
    pub fn watchers(&self) -> usize {
        self.events.receiver_count()
    }

    /// (kind, incidents raised since start) for every kind.
    pub fn incidents_raised(&self) -> Vec<(&'static str, u64)> {
        INCIDENT_KINDS
            .iter()
            .zip(&self.incidents_raised)
            .map(|(k, n)| (*k, n.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }

    /// (reason, refused calls counted but not recorded) for every reason: a refuser or
    /// every refuser together past its rate.
    pub fn unrecorded_refusals(&self) -> Vec<(&'static str, u64)> {
        self.refusals.unrecorded()
    }

    /// Starts the webhook delivery task for this control plane's outbox.
    pub fn start_notifier(
        &self,
        config: crate::config::NotifyConfig,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>, String> {
        let (notifier, task) =
            super::notify::Notifier::start(self.store.clone(), config, shutdown)?;
        let _ = self.notifier.set(notifier);
        Ok(task)
    }

    /// The delivery task's counters, if it runs.
    pub fn notifier(&self) -> Option<&Arc<super::notify::Notifier>> {
        self.notifier.get()
    }

    /// Runs a unit of work in one store transaction.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        work: impl Fn(&mut dyn Txn) -> Result<T, ControlError> + Send + Sync + 'static,
    ) -> Result<T, ControlError> {
        self.store.run(work).await
    }

    /// Stores a change and publishes it (local data plane, then watchers).
    async fn publish<T: Send + 'static>(
        &self,
        work: impl Fn(&mut dyn Txn) -> Result<Change<T>, ControlError> + Send + Sync + 'static,
    ) -> Result<T, ControlError> {
        let _guard = self.publish.lock().await;
        let change = self.run(work).await?;
        self.pump().await.map_err(|e| {
            ControlError::Store(format!(
                "the change is stored (version {}) but handing it to the data planes failed: \
                 {e}; it is tried again every second",
                change.version
            ))
        })?;
        Ok(change.value)
    }

    /// Writes the audit row of a control action; `refused` carries the refusal, if any.
    async fn record(&self, act: Act<'_>, refused: Option<&str>) -> Result<(), ControlError> {
        let record = Record {
            time_ns: crate::unix_nanos(),
            kind: "control".into(),
            decision_id: random_id("ctl-"),
            tenant: act.tenant.to_owned(),
            agent: act.agent.to_owned(),
            session: act.session.to_owned(),
            action: act.action.to_owned(),
            resource: act.target,
            decision: if refused.is_some() { "refused" } else { "ok" }.into(),
            reason: refused.unwrap_or(act.reason).to_owned(),
            policy_revision: act.revision.to_owned(),
            approval_id: act.approval_id.to_owned(),
            actor: act.actor.to_owned(),
            ..Record::default()
        };
        self.audit.append(record).await.map(|_| ()).map_err(|e| {
            ControlError::Audit(format!(
                "{} took effect but its audit row could not be written: {e}",
                act.action
            ))
        })
    }

    /// Audits a refused call (authentication or permission): who tried what, within the
    /// refusal rates (see [`super::refusals`]); past them the refusal is only counted. The
    /// tenant is recorded only if it is a valid id; a caller without a valid credential is
    /// recorded as `unauthenticated` with its address.
    pub async fn record_refusal(
        &self,
        who: &Refuser,
        action: &'static str,
        tenant: &str,
        error: &ControlError,
    ) {
        if self.refusals.admit(who, now_secs()).is_err() {
            return;
        }
        let tenant = if valid_id("tenant", tenant).is_ok() {
            tenant
        } else {
            ""
        };
        let (actor, target) = match who {
            Refuser::Actor(actor) => (actor.as_str(), String::new()),
            Refuser::Peer(Some(ip)) => ("unauthenticated", format!("peer:{ip}")),
            Refuser::Peer(None) => ("unauthenticated", "peer:unknown".to_owned()),
        };
        let mut act = Act::new(actor, action, tenant);
        act.target = target;
        if let Err(e) = self.record(act, Some(&error.to_string())).await {
            crate::log!(error, "{e}");
        }
    }
}

mod agents;
mod approvals;
mod incidents;
mod policy;
mod tenancy;

pub use incidents::{INCIDENT_KINDS, MAX_EVIDENCE, plan};
