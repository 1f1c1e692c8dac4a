//! The control actions: validate, store, publish, audit.
//!
//! Every action that changes what data planes enforce runs under one publish lock:
//! the store commits it at the next version, the local data plane (all-in-one) applies
//! it, every watcher is handed it, and only then is it audited and answered. So when
//! `aegis ctl agents freeze` returns, the all-in-one server already denies the agent, and
//! fleet sidecars have it in flight. A change that took effect but could not be audited
//! is answered with an error saying exactly that (and readiness reports the audit log).
#![allow(missing_docs, clippy::indexing_slicing)] // until the store rewrite (issue 16) lands

use std::sync::Arc;

use prost::Message;
use tokio::sync::broadcast;

use super::approvals::{OVERRIDE_AUDIENCE, OverrideClaims};
use super::auth::{Need, Operator, Role};
use super::budget::{Limit, Meter};
use super::pb;
use super::refusals::{RefusalLimiter, Refuser};
use super::state::State;
use super::store::{Change, ControlStore};
use super::{ControlError, now_secs, random_id, valid_id};
use crate::audit::Record;
use crate::audit::store::AuditLog;
use crate::identity::{Audience, Claims, KeyRing, mint, parse_and_verify};
use crate::keys::Signer;
use crate::policy::{BundleFiles, CompiledBundle, Policy, PolicyOptions};

/// How many events a slow watcher may fall behind before it is resynced from a snapshot.
const WATCH_BUFFER: usize = 4096;
/// How many incident events a slow incident watcher may fall behind before it is ended.
const INCIDENT_BUFFER: usize = 1024;

/// Settings of the control actions.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `iss` and `aud` of agent tokens (as the data planes verify them).
    pub issuer: String,
    pub audience: String,
    /// Default and largest lifetime of agent tokens.
    pub token_ttl_secs: u64,
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
    /// RequestApproval and ReportIncident calls a second per sidecar credential, and the
    /// burst allowed (`control.sidecar_calls_per_sec`, `control.sidecar_call_burst`).
    pub sidecar_calls_per_sec: u32,
    pub sidecar_call_burst: u32,
}

/// The data plane in the same process (all-in-one): changes apply to it synchronously.
#[derive(Debug, Clone)]
pub struct Local {
    pub state: Arc<State>,
    pub policy: Arc<Policy>,
    pub meter: Arc<Meter>,
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
    local: Option<Local>,
    policy_opts: PolicyOptions,
    events: broadcast::Sender<Arc<pb::WatchEvent>>,
    /// Incidents raised and changed, for `WatchIncidents`.
    pub(super) incident_events: broadcast::Sender<Arc<pb::IncidentEvent>>,
    /// The webhook delivery task, woken when an incident queued notifications.
    notifier: std::sync::OnceLock<Arc<super::notify::Notifier>>,
    publish: tokio::sync::Mutex<()>,
    /// Rations refusal rows per actor, per peer and overall, so that a caller who may not
    /// act cannot flood the signed log; the rest are only counted.
    refusals: RefusalLimiter,
    /// Incidents raised since start, per kind (indexed as [`INCIDENT_KINDS`]).
    incidents_raised: Vec<std::sync::atomic::AtomicU64>,
    /// The fleet calls that make the control plane act, per sidecar credential.
    sidecar_rate: super::rate::SidecarRate,
    /// The highest (epoch, version, sidecar) a sidecar reported holding above this
    /// control plane's own since start: it was restored or failed over to a stale copy.
    seen_ahead: std::sync::Mutex<Option<(u64, u64, String)>>,
    /// Watch calls from sidecars holding a state ahead of this control plane's.
    pub sidecars_ahead: std::sync::atomic::AtomicU64,
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
    pub fn new(
        store: Arc<dyn ControlStore>,
        audit: AuditLog,
        signer: Signer,
        settings: Settings,
        local: Option<Local>,
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
            notifier: std::sync::OnceLock::new(),
            publish: tokio::sync::Mutex::new(()),
            refusals: RefusalLimiter::default(),
            sidecar_rate,
            incidents_raised: INCIDENT_KINDS
                .iter()
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            seen_ahead: std::sync::Mutex::new(None),
            sidecars_ahead: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Loads the stored state into the local data plane (all-in-one start-up).
    pub async fn load_local(&self) -> Result<(), ControlError> {
        let (event, _rx) = self.subscribe().await?;
        if let Some(local) = &self.local {
            local.state.apply(&event);
        }
        Ok(())
    }

    /// A snapshot of the whole state and a receiver for every change after it.
    pub async fn subscribe(
        &self,
    ) -> Result<(pb::WatchEvent, broadcast::Receiver<Arc<pb::WatchEvent>>), ControlError> {
        // Under the publish lock: no change can slip between the snapshot and the receiver.
        let _guard = self.publish.lock().await;
        let rx = self.events.subscribe();
        let now = now_secs();
        let (epoch, version, items) = self
            .blocking(move |s| {
                let (version, items) = s.snapshot(now)?;
                let (epoch, _) = s.state_version()?;
                Ok((epoch, version, items))
            })
            .await?;
        Ok((
            pb::WatchEvent {
                epoch,
                version,
                snapshot: true,
                items,
            },
            rx,
        ))
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
    pub fn note_sidecar_state(&self, sidecar: &str, seen: (u64, u64), own: (u64, u64)) {
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
        let mut highest = self.seen_ahead.lock().unwrap_or_else(|p| p.into_inner());
        if highest.as_ref().is_none_or(|h| (h.0, h.1) < seen) {
            *highest = Some((seen.0, seen.1, sidecar.to_owned()));
        }
    }

    /// The state's (epoch, version) and the highest a sidecar reported above it.
    pub async fn state_version(
        &self,
        op: &Operator,
        _req: pb::GetStateVersionRequest,
    ) -> Result<pb::StateVersion, ControlError> {
        op.require(Need::Read, "")?;
        let own = self.blocking(|s| s.state_version()).await?;
        let mut v = self.state_version_of(own);
        if op.tenant != super::auth::ALL_TENANTS {
            // The sidecar that reported being ahead may serve another tenant: its name is
            // for the operators of every tenant only.
            v.highest_seen_by.clear();
        }
        Ok(v)
    }

    fn state_version_of(&self, (epoch, version): (u64, u64)) -> pb::StateVersion {
        let seen = self
            .seen_ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        pb::StateVersion {
            epoch,
            version,
            highest_seen_epoch: seen.0,
            highest_seen_version: seen.1,
            highest_seen_by: seen.2,
        }
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
        // The highest epoch a sidecar reported: the new one must be past it too.
        let reported = self
            .seen_ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |h| h.0);
        let (epoch, version) = {
            let _guard = self.publish.lock().await;
            let (epoch, version) = self.blocking(move |s| s.raise_epoch(reported)).await?;
            if reported >= epoch {
                crate::log!(
                    error,
                    "control plane: a sidecar reported state epoch {reported}, more than {} \
                     above this control plane's: not believed (a forged report?); the epoch \
                     is raised to {epoch} only",
                    super::store::MAX_EPOCH_REPORT_AHEAD
                );
            }
            // An event with no items: it carries the new epoch to every watcher (a
            // sidecar resyncs from a fresh snapshot on seeing it) and the local data plane.
            let event = pb::WatchEvent {
                epoch,
                version,
                snapshot: false,
                items: Vec::new(),
            };
            if let Some(local) = &self.local {
                local.state.apply(&event);
            }
            let _ = self.events.send(Arc::new(event));
            (epoch, version)
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
        Ok(self.state_version_of((epoch, version)))
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

    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn ControlStore) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(join_err)?
    }

    /// Stores a change and publishes it (local data plane, then watchers).
    async fn publish<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn ControlStore) -> Result<Change<T>, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let _guard = self.publish.lock().await;
        let change = self.blocking(f).await?;
        self.deliver(change.epoch, change.version, change.items);
        Ok(change.value)
    }

    fn deliver(&self, epoch: u64, version: u64, items: Vec<pb::StateItem>) {
        if items.is_empty() {
            return;
        }
        let event = pb::WatchEvent {
            epoch,
            version,
            snapshot: false,
            items,
        };
        if let Some(local) = &self.local {
            local.state.apply(&event);
        }
        let _ = self.events.send(Arc::new(event));
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

    // --- agents ---

    pub async fn register_agent(
        &self,
        op: &Operator,
        req: pb::RegisterAgentRequest,
    ) -> Result<pb::Agent, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        valid_id("tenant", &tenant)?;
        valid_id("agent id", &req.id)?;
        let risk_tier = if req.risk_tier.is_empty() {
            "medium".to_owned()
        } else {
            req.risk_tier
        };
        if !["low", "medium", "high", "critical"].contains(&risk_tier.as_str()) {
            return Err(ControlError::invalid(format!(
                "risk tier {risk_tier:?} is not one of low, medium, high, critical"
            )));
        }
        let now = now_secs();
        let actor = op.actor();
        let agent = pb::Agent {
            tenant: tenant.clone(),
            id: req.id.clone(),
            status: super::ACTIVE.into(),
            risk_tier,
            reason: "registered".into(),
            created_at: now,
            updated_at: now,
            updated_by: actor.clone(),
            live_tokens: 0,
        };
        let a = agent.clone();
        let agent = self.publish(move |s| s.register_agent(&a)).await?;
        let mut act = Act::new(&actor, "agent.register", &tenant);
        act.agent = &agent.id;
        act.target = format!("agent:{tenant}/{}", agent.id);
        act.reason = &agent.risk_tier;
        self.record(act, None).await?;
        Ok(agent)
    }

    pub async fn get_agent(
        &self,
        op: &Operator,
        req: pb::AgentRef,
    ) -> Result<pb::Agent, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        let now = now_secs();
        let id = req.id.clone();
        let t = tenant.clone();
        self.blocking(move |s| s.agent(&t, &id, now))
            .await?
            .ok_or_else(|| {
                ControlError::not_found(format!("no agent {} in tenant {tenant}", req.id))
            })
    }

    pub async fn list_agents(
        &self,
        op: &Operator,
        req: pb::ListAgentsRequest,
    ) -> Result<Vec<pb::Agent>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let status = (!req.status.is_empty()).then_some(req.status);
        let now = now_secs();
        self.blocking(move |s| s.agents(scope.as_deref(), status.as_deref(), now))
            .await
    }

    /// Freeze (`frozen`), unfreeze (`active`) or revoke (`revoked`) an agent.
    pub async fn set_agent_status(
        &self,
        op: &Operator,
        req: pb::AgentActionRequest,
        status: &'static str,
    ) -> Result<pb::Agent, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        let action = match status {
            super::FROZEN => "agent.freeze",
            super::REVOKED => "agent.revoke",
            super::RESTRICTED => "agent.restrict",
            _ => "agent.unfreeze",
        };
        required_reason(&req.reason, action)?;
        let now = now_secs();
        let actor = op.actor();
        let (t, id, reason, who) = (
            tenant.clone(),
            req.id.clone(),
            req.reason.clone(),
            actor.clone(),
        );
        let agent = self
            .publish(move |s| s.set_agent_status(&t, &id, status, &reason, &who, now))
            .await?;
        let mut act = Act::new(&actor, action, &tenant);
        act.agent = &agent.id;
        act.target = format!("agent:{tenant}/{}", agent.id);
        act.reason = &req.reason;
        self.record(act, None).await?;
        if status == super::REVOKED {
            // Revocation is final: its tokens are killed too, so lists show them dead (the
            // status alone already denies every call; the kill is audited as its own row).
            self.kill(
                op,
                pb::KillRequest {
                    scope: pb::KillScope::Agent as i32,
                    tenant: tenant.clone(),
                    target: req.id.clone(),
                    reason: format!("agent revoked: {}", req.reason),
                    confirm_all: false,
                },
            )
            .await?;
        }
        Ok(agent)
    }

    // --- tokens ---

    pub async fn issue_token(
        &self,
        op: &Operator,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssuedToken, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        let agent = self.agent_for_token(&tenant, &req.agent, false).await?;
        let session = if req.session.is_empty() {
            random_id("sess-")
        } else {
            valid_id("session", &req.session)?;
            req.session
        };
        let (token, info) = self
            .mint_agent_token(&agent, &session, req.scopes, req.ttl_secs)
            .await?;
        let i = info.clone();
        self.blocking(move |s| s.insert_token(&i)).await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "token.issue", &tenant);
        act.agent = &info.agent;
        act.session = &info.session;
        act.target = format!("token:{}", info.jti);
        self.record(act, None).await?;
        Ok(pb::IssuedToken {
            token,
            info: Some(info),
        })
    }

    pub async fn rotate_token(
        &self,
        op: &Operator,
        req: pb::RotateTokenRequest,
    ) -> Result<pb::IssuedToken, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        required_reason(&req.reason, "token.rotate")?;
        let old = self.token_in(&tenant, &req.jti).await?;
        // A frozen agent's token may be rotated (an exposed credential is replaced while
        // the agent is contained); the new token works once the agent is unfrozen.
        let agent = self.agent_for_token(&tenant, &old.agent, true).await?;
        let (token, info) = self
            .mint_agent_token(&agent, &old.session, old.scopes.clone(), req.ttl_secs)
            .await?;
        let (jti, new, reason) = (
            req.jti.clone(),
            info.clone(),
            format!("rotated: {}", req.reason),
        );
        let now = now_secs();
        self.publish(move |s| s.rotate_token(&jti, &new, &reason, now))
            .await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "token.rotate", &tenant);
        act.agent = &info.agent;
        act.session = &info.session;
        act.target = format!("token:{} -> token:{}", req.jti, info.jti);
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(pb::IssuedToken {
            token,
            info: Some(info),
        })
    }

    pub async fn revoke_token(
        &self,
        op: &Operator,
        req: pb::RevokeTokenRequest,
    ) -> Result<pb::TokenInfo, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        required_reason(&req.reason, "token.revoke")?;
        self.token_in(&tenant, &req.jti).await?;
        let (jti, reason) = (req.jti.clone(), req.reason.clone());
        let now = now_secs();
        let info = self
            .publish(move |s| s.revoke_token(&jti, &reason, now))
            .await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "token.revoke", &tenant);
        act.agent = &info.agent;
        act.session = &info.session;
        act.target = format!("token:{}", info.jti);
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(info)
    }

    pub async fn list_tokens(
        &self,
        op: &Operator,
        req: pb::ListTokensRequest,
    ) -> Result<Vec<pb::TokenInfo>, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        let now = now_secs();
        self.blocking(move |s| s.tokens(&tenant, agent.as_deref(), req.all, now))
            .await
    }

    /// A token of `tenant` by jti; NOT_FOUND for another tenant's, as for none.
    async fn token_in(&self, tenant: &str, jti: &str) -> Result<pb::TokenInfo, ControlError> {
        let now = now_secs();
        let j = jti.to_owned();
        match self.blocking(move |s| s.token(&j, now)).await? {
            Some(t) if t.tenant == tenant => Ok(t),
            _ => Err(ControlError::not_found(format!(
                "no token {jti} in tenant {tenant} was issued by this control plane"
            ))),
        }
    }

    /// The agent a token is minted for: registered, and active (or frozen, when
    /// `frozen_ok`); never revoked.
    async fn agent_for_token(
        &self,
        tenant: &str,
        id: &str,
        frozen_ok: bool,
    ) -> Result<pb::Agent, ControlError> {
        let now = now_secs();
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let agent = self
            .blocking(move |s| s.agent(&t, &i, now))
            .await?
            .ok_or_else(|| {
                ControlError::not_found(format!(
                    "no agent {id} in tenant {tenant} (register it first: aegis ctl agents register)"
                ))
            })?;
        let usable = agent.status == super::ACTIVE || agent.status == super::RESTRICTED;
        if !(usable || (frozen_ok && agent.status == super::FROZEN)) {
            return Err(ControlError::precondition(format!(
                "agent {tenant}/{id} is {}: no token can be issued",
                agent.status
            )));
        }
        Ok(agent)
    }

    /// Mints an agent token. Its `iat` is after every kill mark covering it, so a kill in
    /// this same second does not catch a token minted after it.
    async fn mint_agent_token(
        &self,
        agent: &pb::Agent,
        session: &str,
        scopes: Vec<String>,
        ttl_secs: u64,
    ) -> Result<(String, pb::TokenInfo), ControlError> {
        let ttl = if ttl_secs == 0 {
            self.settings.token_ttl_secs
        } else {
            ttl_secs
        };
        if ttl > self.settings.max_token_ttl_secs {
            return Err(ControlError::invalid(format!(
                "ttl {ttl} s is over the {} s limit (control.max_token_ttl_secs)",
                self.settings.max_token_ttl_secs
            )));
        }
        for s in &scopes {
            if s.is_empty() || s.len() > 128 || s.chars().any(char::is_whitespace) {
                return Err(ControlError::invalid(format!(
                    "scope {s:?} is not a scope name"
                )));
            }
        }
        let (t, a, sid) = (agent.tenant.clone(), agent.id.clone(), session.to_owned());
        let floor = self.blocking(move |s| s.kill_floor(&t, &a, &sid)).await?;
        let now = now_secs();
        let iat = now.max(floor.saturating_add(1));
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            aud: Audience::One(self.settings.audience.clone()),
            sub: agent.id.clone(),
            tenant: agent.tenant.clone(),
            scopes: scopes.clone(),
            sid: session.to_owned(),
            jti: random_id("tok-"),
            iat,
            nbf: now,
            exp: now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)),
        };
        let token =
            mint(&self.signer, &claims).map_err(|e| ControlError::invalid(format!("mint: {e}")))?;
        let info = pb::TokenInfo {
            jti: claims.jti,
            tenant: claims.tenant,
            agent: claims.sub,
            session: claims.sid,
            scopes,
            issued_at: claims.iat,
            expires_at: claims.exp,
            status: "live".into(),
            revoked_at: 0,
            revoked_reason: String::new(),
        };
        Ok((token, info))
    }

    // --- kills ---

    pub async fn kill(
        &self,
        op: &Operator,
        req: pb::KillRequest,
    ) -> Result<pb::KillResponse, ControlError> {
        use pb::KillScope;
        let scope = KillScope::try_from(req.scope).unwrap_or(KillScope::Unspecified);
        required_reason(&req.reason, "a kill")?;
        let tenant = match scope {
            KillScope::All => {
                op.require(Need::Global, "")?;
                if !req.confirm_all {
                    return Err(ControlError::precondition(
                        "a kill of every token of every tenant needs confirm_all \
                         (--all --confirm-kill-all); it is never the default",
                    ));
                }
                String::new()
            }
            KillScope::Unspecified => {
                return Err(ControlError::invalid(
                    "name what to kill: a token, session, agent, tenant, or all",
                ));
            }
            _ => {
                let tenant = op.tenant_for(&req.tenant)?;
                op.require(Need::Operate, &tenant)?;
                tenant
            }
        };
        if matches!(
            scope,
            KillScope::Token | KillScope::Session | KillScope::Agent
        ) && req.target.is_empty()
        {
            return Err(ControlError::invalid(
                "name the token, session or agent to kill",
            ));
        }
        let actor = op.actor();
        let response = if scope == KillScope::Token {
            let info = self
                .revoke_token(
                    op,
                    pb::RevokeTokenRequest {
                        tenant: tenant.clone(),
                        jti: req.target.clone(),
                        reason: format!("killed: {}", req.reason),
                    },
                )
                .await?;
            pb::KillResponse {
                scope: req.scope,
                tenant: tenant.clone(),
                target: req.target.clone(),
                before: info.revoked_at,
                tokens: 1,
                sessions: 1,
                agents: 1,
                tenants: 1,
            }
        } else {
            let now = now_secs();
            let target = match scope {
                KillScope::Session | KillScope::Agent => req.target.clone(),
                _ => String::new(),
            };
            let mark = pb::KillMark {
                scope: req.scope,
                tenant: tenant.clone(),
                target,
                before: now,
            };
            let (reason, who) = (req.reason.clone(), actor.clone());
            self.publish(move |s| s.kill(&mark, &reason, &who, now))
                .await?
        };
        let action = match scope {
            KillScope::Token => "kill.token",
            KillScope::Session => "kill.session",
            KillScope::Agent => "kill.agent",
            KillScope::Tenant => "kill.tenant",
            _ => "kill.all",
        };
        let mut act = Act::new(&actor, action, &tenant);
        if scope == KillScope::Agent {
            act.agent = &req.target;
        }
        if scope == KillScope::Session {
            act.session = &req.target;
        }
        act.target = format!(
            "{action}:{}{} ({} tokens, {} sessions, {} agents, {} tenants)",
            if tenant.is_empty() { "*" } else { &tenant },
            if req.target.is_empty() {
                String::new()
            } else {
                format!("/{}", req.target)
            },
            response.tokens,
            response.sessions,
            response.agents,
            response.tenants
        );
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(response)
    }

    // --- approvals ---

    pub async fn list_approvals(
        &self,
        op: &Operator,
        req: pb::ListApprovalsRequest,
    ) -> Result<Vec<pb::Approval>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let status = match req.status.as_str() {
            "" => Some("pending".to_owned()),
            "all" => None,
            s => Some(s.to_owned()),
        };
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        let now = now_secs();
        self.blocking(move |s| {
            s.approvals(scope.as_deref(), status.as_deref(), agent.as_deref(), now)
        })
        .await
    }

    pub async fn get_approval(
        &self,
        op: &Operator,
        req: pb::ApprovalRef,
    ) -> Result<pb::Approval, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        self.approval_in(&tenant, &req.id).await
    }

    async fn approval_in(&self, tenant: &str, id: &str) -> Result<pb::Approval, ControlError> {
        let now = now_secs();
        let (t, i) = (tenant.to_owned(), id.to_owned());
        self.blocking(move |s| s.approval(&t, &i, now))
            .await?
            .ok_or_else(|| ControlError::not_found(format!("no approval {id} in tenant {tenant}")))
    }

    /// Approves (minting the override token) or denies a pending approval.
    pub async fn decide_approval(
        &self,
        op: &Operator,
        req: pb::DecideApprovalRequest,
        approve: bool,
    ) -> Result<pb::ApprovalDecision, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Approve, &tenant)?;
        let action = if approve {
            "approval.approve"
        } else {
            "approval.deny"
        };
        required_reason(&req.reason, action)?;
        let before = self.approval_in(&tenant, &req.id).await?;
        if before.status != "pending" {
            return Err(ControlError::precondition(format!(
                "approval {} is {}, not pending",
                req.id, before.status
            )));
        }
        let ttl = if req.override_ttl_secs == 0 {
            self.settings.override_ttl_secs
        } else {
            req.override_ttl_secs.min(
                self.settings
                    .approval_ttl_secs
                    .max(self.settings.override_ttl_secs),
            )
        };
        let now = now_secs();
        let override_exp = if approve {
            now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))
        } else {
            0
        };
        let actor = op.actor();
        let (t, i, who, reason) = (
            tenant.clone(),
            req.id.clone(),
            actor.clone(),
            req.reason.clone(),
        );
        let approval = self
            .blocking(move |s| s.decide_approval(&t, &i, approve, &who, &reason, override_exp, now))
            .await?
            .ok_or_else(|| {
                ControlError::precondition(format!("approval {} is no longer pending", req.id))
            })?;
        let override_token = if approve {
            let claims = OverrideClaims {
                iss: self.settings.issuer.clone(),
                aud: OVERRIDE_AUDIENCE.into(),
                sub: approval.agent.clone(),
                tenant: approval.tenant.clone(),
                apr: approval.id.clone(),
                call: approval.call_hash.clone(),
                jti: random_id("ovr-"),
                iat: now,
                exp: override_exp,
            };
            mint(&self.signer, &claims).map_err(|e| ControlError::invalid(format!("mint: {e}")))?
        } else {
            String::new()
        };
        let mut act = Act::new(&actor, action, &tenant);
        act.agent = &approval.agent;
        act.session = &approval.session;
        act.target = format!(
            "approval:{} ({}.{})",
            approval.id, approval.tool, approval.action
        );
        act.reason = &req.reason;
        act.approval_id = &approval.id;
        self.record(act, None).await?;
        Ok(pb::ApprovalDecision {
            approval: Some(approval),
            override_token,
        })
    }

    /// Raises (or finds) the pending approval for a call (a data plane's request).
    pub async fn request_approval(
        &self,
        op: &Operator,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, ControlError> {
        if req.tenant.is_empty() || req.agent.is_empty() || req.call_hash.len() != 64 {
            op.require(Need::Fleet, "")?;
            return Err(ControlError::invalid(
                "an approval needs a tenant, an agent and a 64-digit call hash",
            ));
        }
        // Only for the tenants the sidecar serves: another tenant's agents' caps of pending
        // approvals are not its to fill.
        op.require(Need::Fleet, &req.tenant)?;
        let now = now_secs();
        let approval = pb::Approval {
            id: random_id("apr-"),
            tenant: req.tenant.clone(),
            agent: req.agent.clone(),
            session: req.session,
            run_id: req.run_id,
            tool: req.tool,
            action: req.action,
            resource: req.resource,
            arguments: req.arguments,
            call_hash: req.call_hash,
            policy_reason: req.policy_reason,
            decision_id: req.decision_id,
            status: "pending".into(),
            created_at: now,
            expires_at: now
                .saturating_add(i64::try_from(self.settings.approval_ttl_secs).unwrap_or(i64::MAX)),
            ..Default::default()
        };
        let cap = self.settings.max_pending_approvals;
        let same_session =
            self.settings.override_binding == crate::config::OverrideBinding::Session;
        let a = approval.clone();
        let response = self
            .blocking(move |s| s.request_approval(&a, cap, same_session, now))
            .await?;
        if response.created {
            let actor = op.actor();
            let mut act = Act::new(&actor, "approval.request", &approval.tenant);
            act.agent = &approval.agent;
            act.session = &approval.session;
            act.target = format!(
                "approval:{} ({}.{})",
                approval.id, approval.tool, approval.action
            );
            act.reason = &approval.policy_reason;
            act.approval_id = &approval.id;
            self.record(act, None).await?;
        }
        Ok(response)
    }

    /// Redeems an override token for a call (a data plane's request): accepted once.
    pub async fn redeem_override(
        &self,
        op: &Operator,
        req: pb::RedeemOverrideRequest,
    ) -> Result<pb::RedeemOverrideResponse, ControlError> {
        // Only for the sidecar's tenants (the token must be of the tenant asked for): a
        // sidecar cannot burn another tenant's override before its agent uses it.
        op.require(Need::Fleet, &req.tenant)?;
        let refuse = |reason: &str, approval_id: &str| pb::RedeemOverrideResponse {
            accepted: false,
            reason: reason.into(),
            approval_id: approval_id.into(),
        };
        let Ok(claims) = parse_and_verify::<OverrideClaims>(&req.override_token, &self.own_key)
        else {
            return Ok(refuse("override_invalid", ""));
        };
        if claims.aud != OVERRIDE_AUDIENCE || claims.iss != self.settings.issuer {
            return Ok(refuse("override_invalid", ""));
        }
        let now = now_secs();
        if now >= claims.exp {
            return Ok(refuse("override_expired", &claims.apr));
        }
        if claims.tenant != req.tenant || claims.sub != req.agent || claims.call != req.call_hash {
            return Ok(refuse("override_mismatch", &claims.apr));
        }
        if self.settings.override_binding == crate::config::OverrideBinding::Session {
            // The approver approved the call of the session that asked, not the same call
            // from the agent's other sessions (another run, another user's conversation).
            let approval = self.approval_in(&claims.tenant, &claims.apr).await?;
            if approval.session != req.session {
                return Ok(refuse("override_wrong_session", &claims.apr));
            }
        }
        let (t, i, d) = (
            claims.tenant.clone(),
            claims.apr.clone(),
            req.decision_id.clone(),
        );
        let used = self
            .blocking(move |s| s.use_approval(&t, &i, &d, now))
            .await?;
        if !used {
            let current = self.approval_in(&claims.tenant, &claims.apr).await?;
            let reason = match current.status.as_str() {
                "expired" => "override_expired",
                "used" => "override_used",
                _ => "override_invalid",
            };
            return Ok(refuse(reason, &claims.apr));
        }
        let actor = op.actor();
        let mut act = Act::new(&actor, "approval.redeem", &claims.tenant);
        act.agent = &claims.sub;
        act.target = format!("approval:{} by decision {}", claims.apr, req.decision_id);
        act.approval_id = &claims.apr;
        self.record(act, None).await?;
        Ok(pb::RedeemOverrideResponse {
            accepted: true,
            reason: "approved_override".into(),
            approval_id: claims.apr,
        })
    }

    // --- tenants ---

    pub async fn get_tenant(
        &self,
        op: &Operator,
        req: pb::TenantRef,
    ) -> Result<pb::Tenant, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        let t = tenant.clone();
        let stored = self.blocking(move |s| s.tenant(&t)).await?;
        Ok(stored.unwrap_or(pb::Tenant {
            name: tenant,
            mode: super::ENFORCE.into(),
            autonomy_level: self.settings.default_autonomy,
            updated_at: 0,
            updated_by: String::new(),
        }))
    }

    pub async fn update_tenant(
        &self,
        op: &Operator,
        req: pb::UpdateTenantRequest,
    ) -> Result<pb::Tenant, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Administer, &tenant)?;
        valid_id("tenant", &tenant)?;
        required_reason(&req.reason, "tenant.update")?;
        let mut t = self
            .get_tenant(
                op,
                pb::TenantRef {
                    tenant: tenant.clone(),
                },
            )
            .await?;
        if let Some(mode) = req.mode {
            if mode != super::ENFORCE && mode != super::SHADOW {
                return Err(ControlError::invalid(format!(
                    "mode {mode:?} is not enforce or shadow"
                )));
            }
            t.mode = mode;
        }
        if let Some(level) = req.autonomy_level {
            if !(1..=4).contains(&level) {
                return Err(ControlError::invalid(format!(
                    "autonomy level {level} is not 1-4 (L1 notify only ... L4 contain automatically)"
                )));
            }
            t.autonomy_level = level;
        }
        t.updated_at = now_secs();
        t.updated_by = op.actor();
        let stored = t.clone();
        let t = self.publish(move |s| s.put_tenant(&stored)).await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "tenant.update", &tenant);
        act.target = format!(
            "tenant:{tenant} mode={} autonomy=L{}",
            t.mode, t.autonomy_level
        );
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(t)
    }

    // --- budgets ---

    pub async fn set_budget(
        &self,
        op: &Operator,
        req: pb::SetBudgetRequest,
    ) -> Result<pb::Budget, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        valid_id("agent id", &req.agent)?;
        required_reason(&req.reason, "budget.set")?;
        if !req.max_cost.is_finite() || req.max_cost < 0.0 {
            return Err(ControlError::invalid(
                "max cost must be a finite number ≥ 0",
            ));
        }
        let removing = req.max_calls == 0 && req.max_cost == 0.0;
        if !removing && req.window_secs == 0 {
            return Err(ControlError::invalid(
                "a budget needs a window (window_secs > 0)",
            ));
        }
        let budget = pb::Budget {
            tenant: tenant.clone(),
            agent: req.agent.clone(),
            max_calls: req.max_calls,
            max_cost: req.max_cost,
            window_secs: req.window_secs,
            updated_at: now_secs(),
            updated_by: op.actor(),
            ..Default::default()
        };
        let b = budget.clone();
        let budget = self.publish(move |s| s.put_budget(&b)).await?;
        let actor = op.actor();
        let mut act = Act::new(
            &actor,
            if removing {
                "budget.remove"
            } else {
                "budget.set"
            },
            &tenant,
        );
        act.agent = &budget.agent;
        act.target = format!(
            "budget:{tenant}/{} calls={} cost={} window={}s",
            budget.agent, budget.max_calls, budget.max_cost, budget.window_secs
        );
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(self.with_usage(budget))
    }

    pub async fn list_budgets(
        &self,
        op: &Operator,
        req: pb::ListBudgetsRequest,
    ) -> Result<Vec<pb::Budget>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        let budgets = self
            .blocking(move |s| s.budgets(scope.as_deref(), agent.as_deref()))
            .await?;
        Ok(budgets.into_iter().map(|b| self.with_usage(b)).collect())
    }

    fn with_usage(&self, mut b: pb::Budget) -> pb::Budget {
        if let Some(local) = &self.local {
            let limit = Limit {
                max_calls: b.max_calls,
                max_cost: b.max_cost,
                window_secs: b.window_secs,
            };
            let u = local.meter.usage(&b.tenant, &b.agent, &limit, now_secs());
            b.usage_known = true;
            b.used_calls = u.calls;
            b.used_cost = u.cost;
        }
        b
    }

    // --- policy ---

    /// Compiles and activates a bundle pushed by an operator.
    pub async fn activate_policy(
        &self,
        op: &Operator,
        req: pb::ActivatePolicyRequest,
    ) -> Result<pb::PolicyRevision, ControlError> {
        op.require(Need::Global, "")?;
        required_reason(&req.reason, "policy.activate")?;
        let bundle = req
            .bundle
            .ok_or_else(|| ControlError::invalid("no bundle in the request"))?;
        let files = BundleFiles::from(bundle);
        let compiled = self.compile(files.clone()).await?;
        self.install(compiled, &files, "push", &op.actor(), &req.reason)
            .await
    }

    pub async fn list_policy_revisions(
        &self,
        op: &Operator,
        req: pb::ListPolicyRevisionsRequest,
    ) -> Result<Vec<pb::PolicyRevision>, ControlError> {
        op.require(Need::Read, "")?;
        let limit = if req.limit == 0 { 50 } else { req.limit };
        self.blocking(move |s| s.policy_history(limit)).await
    }

    /// Reactivates an earlier revision.
    pub async fn rollback_policy(
        &self,
        op: &Operator,
        req: pb::RollbackPolicyRequest,
    ) -> Result<pb::PolicyRevision, ControlError> {
        op.require(Need::Global, "")?;
        required_reason(&req.reason, "policy.rollback")?;
        let history = self.blocking(|s| s.policy_history(10_000)).await?;
        let current = history
            .first()
            .ok_or_else(|| ControlError::precondition("no policy revision has been activated"))?;
        let target = if req.to.is_empty() {
            history.iter().find(|r| r.digest != current.digest)
        } else {
            history
                .iter()
                .find(|r| r.id.to_string() == req.to)
                .or_else(|| {
                    history
                        .iter()
                        .find(|r| r.revision == req.to || r.digest == req.to)
                })
        };
        let target = target.ok_or_else(|| {
            if req.to.is_empty() {
                ControlError::precondition("no earlier revision to roll back to")
            } else {
                ControlError::not_found(format!("no policy revision {:?} in the history", req.to))
            }
        })?;
        if target.digest == current.digest {
            return Err(ControlError::precondition(format!(
                "revision {} ({}) is already active",
                target.revision, target.digest
            )));
        }
        let files = self.stored_bundle(&target.digest).await?;
        let compiled = self.compile(files.clone()).await?;
        self.install(compiled, &files, "rollback", &op.actor(), &req.reason)
            .await
    }

    /// A stored bundle by digest (a data plane's fetch).
    pub async fn bundle(&self, op: &Operator, digest: &str) -> Result<pb::Bundle, ControlError> {
        op.require(Need::Fleet, "")?;
        let files = self.stored_bundle(digest).await?;
        Ok(pb::Bundle::from(&files))
    }

    async fn stored_bundle(&self, digest: &str) -> Result<BundleFiles, ControlError> {
        let d = digest.to_owned();
        let bytes = self
            .blocking(move |s| s.bundle(&d))
            .await?
            .ok_or_else(|| ControlError::not_found(format!("no stored bundle {digest}")))?;
        let bundle = pb::Bundle::decode(bytes.as_slice()).map_err(|e| {
            ControlError::Store(format!("stored bundle {digest} is unreadable: {e}"))
        })?;
        Ok(BundleFiles::from(bundle))
    }

    async fn compile(&self, files: BundleFiles) -> Result<CompiledBundle, ControlError> {
        let opts = self.policy_opts.clone();
        tokio::task::spawn_blocking(move || {
            opts.verify(&files)?;
            files
                .parse()
                .and_then(|parsed| CompiledBundle::compile(parsed, &opts))
        })
        .await
        .map_err(join_err)?
        .map_err(|e| ControlError::invalid(format!("policy bundle refused: {e}")))
    }

    /// Records the activation, installs it locally (all-in-one) and publishes it.
    async fn install(
        &self,
        compiled: CompiledBundle,
        files: &BundleFiles,
        action: &'static str,
        actor: &str,
        reason: &str,
    ) -> Result<pb::PolicyRevision, ControlError> {
        let rev = pb::PolicyRevision {
            id: 0,
            revision: compiled.revision().to_owned(),
            digest: compiled.digest().to_owned(),
            action: action.into(),
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            activated_at: now_secs(),
            active: true,
        };
        let bytes = pb::Bundle::from(files).encode_to_vec();
        let revision = {
            let _guard = self.publish.lock().await;
            let r = rev.clone();
            let change = self
                .blocking(move |s| s.activate_policy(&r, &bytes))
                .await?;
            if let Some(local) = &self.local
                && local.policy.current().digest() != compiled.digest()
            {
                local.policy.install(Arc::new(compiled));
            }
            self.deliver(change.epoch, change.version, change.items);
            change.value
        };
        let mut act = Act::new(actor, "policy.activate", "");
        act.target = format!(
            "policy:{} {} ({action})",
            revision.revision, revision.digest
        );
        act.reason = reason;
        act.revision = &revision.revision;
        self.record(act, None).await?;
        crate::log!(
            info,
            "policy revision {} ({}) activated by {actor} ({action})",
            revision.revision,
            revision.digest
        );
        Ok(revision)
    }

    /// Start-up: reconciles the configured bundle with the stored history. A bundle that
    /// changed since it was last activated from configuration is activated (`startup`); an
    /// unchanged one yields to a later push or rollback, which is restored.
    pub async fn reconcile_policy(
        &self,
        configured: Arc<CompiledBundle>,
        files: &BundleFiles,
    ) -> Result<(), ControlError> {
        let history = self.blocking(|s| s.policy_history(10_000)).await?;
        let active = history.first();
        let last_from_config = history
            .iter()
            .find(|r| r.action == "startup" || r.action == "file");
        match (active, last_from_config) {
            (Some(a), _) if a.digest == configured.digest() => Ok(()),
            (Some(a), Some(c)) if c.digest == configured.digest() => {
                let stored = self.stored_bundle(&a.digest).await?;
                let compiled = self.compile(stored).await?;
                crate::log!(
                    info,
                    "policy: restoring revision {} ({}), activated by {} ({}) after the configured bundle",
                    a.revision,
                    a.digest,
                    a.actor,
                    a.action
                );
                if let Some(local) = &self.local {
                    local.policy.install(Arc::new(compiled));
                }
                Ok(())
            }
            _ => self
                .record_activation(configured, files, "startup", "system:startup")
                .await
                .map(|_| ()),
        }
    }

    /// Records a bundle the data plane has already installed (start-up, file watch).
    pub async fn record_activation(
        &self,
        compiled: Arc<CompiledBundle>,
        files: &BundleFiles,
        action: &'static str,
        actor: &str,
    ) -> Result<pb::PolicyRevision, ControlError> {
        let bytes = pb::Bundle::from(files).encode_to_vec();
        let rev = pb::PolicyRevision {
            id: 0,
            revision: compiled.revision().to_owned(),
            digest: compiled.digest().to_owned(),
            action: action.into(),
            actor: actor.to_owned(),
            reason: format!("{action}: configured bundle"),
            activated_at: now_secs(),
            active: true,
        };
        let revision = self
            .publish(move |s| s.activate_policy(&rev, &bytes))
            .await?;
        let mut act = Act::new(actor, "policy.activate", "");
        act.target = format!(
            "policy:{} {} ({action})",
            revision.revision, revision.digest
        );
        act.reason = &revision.reason;
        act.revision = &revision.revision;
        self.record(act, None).await?;
        Ok(revision)
    }
}

/// The kinds of incident the correlation engine raises.
pub const INCIDENT_KINDS: &[&str] = &[
    "deny_storm",
    "data_exfil_pattern",
    "approval_flood",
    "runaway",
    "budget_exhausted",
    "trust_escalation",
    "untrusted_mutation",
];

/// What the response engine does for an incident of `severity` at autonomy `level`:
/// L1 notify only; L2 also require approval for the agent's state-mutating calls
/// (restrict it); L3 freeze the agent instead on high and critical incidents; L4 also
/// revoke its tokens and kill its session.
pub fn plan(level: u32, severity: &str) -> Vec<&'static str> {
    let serious = matches!(severity, "high" | "critical");
    let mut actions = vec!["notify"];
    if level >= 3 && serious {
        actions.push("freeze_agent");
    } else if level >= 2 {
        actions.push("require_approval");
    }
    if level >= 4 && serious {
        actions.push("kill_agent_tokens");
        actions.push("kill_session");
    }
    actions
}

/// Most decisions behind one incident.
pub const MAX_EVIDENCE: usize = 1024;

/// An incident's evidence must name decisions the reporting data plane recorded: each
/// evidence id once, with its decision (same order) carrying the sequence number and the
/// hash of the audit row the data plane signed for it, and the trigger among them. The
/// control plane cannot read that log; it stores the hashes (with the reporter) so the
/// evidence can be checked later against the data plane's exported log
/// (`aegis audit check-evidence`). Refused before anything is stored or contained.
fn check_evidence(req: &pb::ReportIncidentRequest) -> Result<(), ControlError> {
    let bad = |m: String| Err(ControlError::invalid(format!("incident evidence: {m}")));
    if req.evidence.is_empty() {
        return bad("names no decision".into());
    }
    if req.evidence.len() > MAX_EVIDENCE {
        return bad(format!("over {MAX_EVIDENCE} decisions"));
    }
    if req.decisions.len() != req.evidence.len() {
        return bad(format!(
            "{} decision id(s) but {} decision(s) with their audit rows: each evidence id \
             needs its decision, row hash and sequence number",
            req.evidence.len(),
            req.decisions.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (id, d) in req.evidence.iter().zip(&req.decisions) {
        valid_id("evidence decision id", id)?;
        if d.decision_id != *id {
            return bad(format!(
                "decision {} is listed where evidence names {}",
                super::shown(&d.decision_id),
                super::shown(id)
            ));
        }
        if !seen.insert(id.as_str()) {
            return bad(format!("decision {id} is named twice"));
        }
        let hex = d.row_hash.len() == 64
            && d.row_hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return bad(format!(
                "decision {id} has no row hash (64 lower-case hex digits of the audit row \
                 the data plane signed for it)"
            ));
        }
        if d.audit_seq == 0 {
            return bad(format!("decision {id} has no audit row sequence number"));
        }
    }
    if !seen.contains(req.trigger_decision.as_str()) {
        return bad(format!(
            "the trigger decision {} is not among the evidence",
            super::shown(&req.trigger_decision)
        ));
    }
    Ok(())
}

impl ControlCore {
    /// The identity the response engine acts under.
    fn response_engine() -> Operator {
        Operator {
            name: "response-engine".into(),
            role: Role::Admin,
            tenant: super::auth::ALL_TENANTS.into(),
            expires_at: i64::MAX,
        }
    }

    /// A data plane's finding: stored, audited, and contained as the tenant's autonomy
    /// level says; every automatic action is audited with the incident id and listed in
    /// the incident.
    pub async fn report_incident(
        &self,
        op: &Operator,
        req: pb::ReportIncidentRequest,
    ) -> Result<pb::Incident, ControlError> {
        valid_id("tenant", &req.tenant)?;
        // Only for the tenants the sidecar serves: what the response engine does next
        // (restrict, freeze, kill tokens) stays inside them.
        op.require(Need::Fleet, &req.tenant)?;
        valid_id("agent id", &req.agent)?;
        check_evidence(&req)?;
        if !INCIDENT_KINDS.contains(&req.kind.as_str()) {
            return Err(ControlError::invalid(format!(
                "unknown incident kind {:?}",
                req.kind
            )));
        }
        if !["low", "medium", "high", "critical"].contains(&req.severity.as_str()) {
            return Err(ControlError::invalid(format!(
                "unknown severity {:?}",
                req.severity
            )));
        }
        if req.decided_at_ns <= 0 {
            return Err(ControlError::invalid(
                "an incident needs the time of its decision",
            ));
        }
        let level = self
            .get_tenant(
                &Self::response_engine(),
                pb::TenantRef {
                    tenant: req.tenant.clone(),
                },
            )
            .await?
            .autonomy_level;
        let now_ns = crate::unix_nanos();
        let incident = pb::Incident {
            id: random_id("INC-"),
            tenant: req.tenant,
            agent: req.agent,
            session: req.session,
            run_id: req.run_id,
            kind: req.kind,
            severity: req.severity,
            summary: req.summary,
            evidence: req.evidence,
            trigger_decision: req.trigger_decision,
            decided_at_ns: req.decided_at_ns,
            status: "open".into(),
            created_at_ns: now_ns,
            updated_at: now_ns / 1_000_000_000,
            autonomy_level: level,
            reported_by: op.actor(),
            policy_revision: req.policy_revision,
            decisions: req.decisions,
            ..Default::default()
        };
        let notes = super::notify::notifications(&incident, &self.settings.webhooks);
        let queued = notes.len();
        let i = incident.clone();
        self.blocking(move |s| s.insert_incident(&i, &notes))
            .await?;
        if let Some(n) = INCIDENT_KINDS
            .iter()
            .position(|k| *k == incident.kind)
            .and_then(|i| self.incidents_raised.get(i))
        {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let actor = op.actor();
        let mut act = Act::new(&actor, "incident.raise", &incident.tenant);
        act.agent = &incident.agent;
        act.session = &incident.session;
        act.target = format!(
            "incident:{} {} {}",
            incident.id, incident.kind, incident.severity
        );
        act.reason = &incident.summary;
        act.revision = &incident.policy_revision;
        self.record(act, None).await?;
        let done = self.contain(&incident, queued).await;
        let (t, id, d) = (incident.tenant.clone(), incident.id.clone(), done.clone());
        self.blocking(move |s| s.add_incident_actions(&t, &id, &d))
            .await?;
        crate::log!(
            warn,
            "incident {} {} ({}) for {}/{} at L{level}: {}; actions: {}",
            incident.id,
            incident.kind,
            incident.severity,
            incident.tenant,
            incident.agent,
            incident.summary,
            done.join(", ")
        );
        let incident = pb::Incident {
            actions: done,
            ..incident
        };
        if queued > 0 {
            // The notifications were stored with the incident (durable from the start);
            // now that the response engine has acted, they say what it did.
            let notes = super::notify::notifications(&incident, &self.settings.webhooks);
            let id = incident.id.clone();
            if let Err(e) = self
                .blocking(move |s| s.refresh_notifications(&id, &notes))
                .await
            {
                crate::log!(
                    warn,
                    "incident {}: notifications keep their first payload: {e}",
                    incident.id
                );
            }
            if let Some(n) = self.notifier.get() {
                n.wake.notify_one();
            }
        }
        let _ = self.incident_events.send(Arc::new(pb::IncidentEvent {
            event: "raised".into(),
            incident: Some(incident.clone()),
        }));
        Ok(incident)
    }

    /// Carries out the plan for `incident`; returns what was done, one line per action.
    async fn contain(&self, incident: &pb::Incident, webhooks: usize) -> Vec<String> {
        let engine = Self::response_engine();
        let reason = format!("incident {} ({})", incident.id, incident.kind);
        let mut done = Vec::new();
        for action in plan(incident.autonomy_level, &incident.severity) {
            let outcome = match action {
                "notify" if webhooks == 0 => Ok("logged (no webhook for this tenant)".to_owned()),
                "notify" => Ok(format!("logged, {webhooks} webhook(s) queued")),
                "freeze_agent" => {
                    self.contain_agent(&engine, incident, &reason, super::FROZEN)
                        .await
                }
                "require_approval" => {
                    self.contain_agent(&engine, incident, &reason, super::RESTRICTED)
                        .await
                }
                "kill_agent_tokens" => self
                    .kill(
                        &engine,
                        pb::KillRequest {
                            scope: pb::KillScope::Agent as i32,
                            tenant: incident.tenant.clone(),
                            target: incident.agent.clone(),
                            reason: reason.clone(),
                            confirm_all: false,
                        },
                    )
                    .await
                    .map(|k| format!("{} tokens", k.tokens)),
                "kill_session" if incident.session.is_empty() => Ok("no session".into()),
                _ => self
                    .kill(
                        &engine,
                        pb::KillRequest {
                            scope: pb::KillScope::Session as i32,
                            tenant: incident.tenant.clone(),
                            target: incident.session.clone(),
                            reason: reason.clone(),
                            confirm_all: false,
                        },
                    )
                    .await
                    .map(|k| format!("session {}: {} tokens", incident.session, k.tokens)),
            };
            done.push(match outcome {
                Ok(detail) => format!("{action}: {detail}"),
                Err(e) => format!("{action}: failed: {e}"),
            });
        }
        done
    }

    /// Freezes or restricts the incident's agent, registering it first if the control plane
    /// did not know it (a token minted offline). A restriction never loosens a freeze.
    async fn contain_agent(
        &self,
        engine: &Operator,
        incident: &pb::Incident,
        reason: &str,
        status: &'static str,
    ) -> Result<String, ControlError> {
        let done = if status == super::FROZEN {
            "frozen"
        } else {
            "restricted"
        };
        let req = pb::AgentActionRequest {
            tenant: incident.tenant.clone(),
            id: incident.agent.clone(),
            reason: reason.to_owned(),
        };
        match self.set_agent_status(engine, req.clone(), status).await {
            Ok(_) => Ok(done.into()),
            Err(ControlError::Precondition(m)) => Ok(format!("unchanged ({m})")),
            Err(ControlError::NotFound(_)) => {
                self.register_agent(
                    engine,
                    pb::RegisterAgentRequest {
                        tenant: incident.tenant.clone(),
                        id: incident.agent.clone(),
                        risk_tier: "high".into(),
                    },
                )
                .await?;
                self.set_agent_status(engine, req, status).await?;
                Ok(format!("registered and {done}"))
            }
            Err(e) => Err(e),
        }
    }

    pub async fn list_incidents(
        &self,
        op: &Operator,
        req: pb::ListIncidentsRequest,
    ) -> Result<Vec<pb::Incident>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let status = (!req.status.is_empty()).then_some(req.status);
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        self.blocking(move |s| s.incidents(scope.as_deref(), status.as_deref(), agent.as_deref()))
            .await
    }

    pub async fn get_incident(
        &self,
        op: &Operator,
        req: pb::IncidentRef,
    ) -> Result<pb::Incident, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        let (t, i) = (tenant.clone(), req.id.clone());
        let (incident, notes) = self
            .blocking(move |s| {
                let notes = s.notifications(&i)?;
                Ok((s.incident(&t, &i)?, notes))
            })
            .await?;
        let mut incident = incident.ok_or_else(|| {
            ControlError::not_found(format!("no incident {} in tenant {tenant}", req.id))
        })?;
        incident.notifications = notes
            .iter()
            .map(|n| {
                let mut line = format!(
                    "{} {} ({} attempts)",
                    super::notify::host_of(&n.url),
                    n.state,
                    n.attempts
                );
                if n.state != "delivered" && !n.last_error.is_empty() {
                    line.push_str(&format!(": {}", n.last_error));
                }
                line
            })
            .collect();
        Ok(incident)
    }

    /// Acknowledges (`acknowledged`) or closes (`closed`, with a reason) an incident.
    pub async fn set_incident_status(
        &self,
        op: &Operator,
        req: pb::IncidentActionRequest,
        status: &'static str,
    ) -> Result<pb::Incident, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        let action = if status == "closed" {
            "incident.close"
        } else {
            "incident.acknowledge"
        };
        if status == "closed" {
            required_reason(&req.reason, action)?;
        }
        let current = self
            .get_incident(
                op,
                pb::IncidentRef {
                    tenant: tenant.clone(),
                    id: req.id.clone(),
                },
            )
            .await?;
        let actor = op.actor();
        let (t, i, who, why) = (
            tenant.clone(),
            req.id.clone(),
            actor.clone(),
            req.reason.clone(),
        );
        let now = now_secs();
        let updated = self
            .blocking(move |s| s.set_incident_status(&t, &i, status, &who, &why, now))
            .await?
            .ok_or_else(|| {
                ControlError::precondition(format!("incident {} is {}", req.id, current.status))
            })?;
        let mut act = Act::new(&actor, action, &tenant);
        act.agent = &updated.agent;
        act.target = format!("incident:{}", updated.id);
        act.reason = &req.reason;
        self.record(act, None).await?;
        let _ = self.incident_events.send(Arc::new(pb::IncidentEvent {
            event: status.into(),
            incident: Some(updated.clone()),
        }));
        Ok(updated)
    }

    /// The dry run: what the response engine would do at `level` (0: the tenant's).
    pub async fn plan_response(
        &self,
        op: &Operator,
        req: pb::PlanResponseRequest,
    ) -> Result<pb::ResponsePlan, ControlError> {
        let incident = self
            .get_incident(
                op,
                pb::IncidentRef {
                    tenant: req.tenant.clone(),
                    id: req.id.clone(),
                },
            )
            .await?;
        let level = match req.autonomy_level {
            0 => {
                self.get_tenant(
                    op,
                    pb::TenantRef {
                        tenant: incident.tenant.clone(),
                    },
                )
                .await?
                .autonomy_level
            }
            l @ 1..=4 => l,
            l => {
                return Err(ControlError::invalid(format!(
                    "autonomy level {l} is not 1-4"
                )));
            }
        };
        Ok(pb::ResponsePlan {
            autonomy_level: level,
            actions: plan(level, &incident.severity)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
    }
}
