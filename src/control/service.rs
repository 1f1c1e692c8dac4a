//! The `aegis.control.v1.ControlPlane` gRPC service: authenticate the caller, check the
//! request's ids and texts ([`super::validate`]), hand the call to the core, map its
//! error. Refused calls (no or bad credential, a role or tenant that does not allow the
//! call) are audited too, who tried what, within the refusal rates of
//! [`super::refusals`]: per actor, per peer address, overall.
//!
//! A sidecar's `Watch` carries only its credential's tenants' state (see [`visible`]), and
//! its RequestApproval and ReportIncident calls are rationed per credential
//! ([`super::rate`]) before the core checks their tenant.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::ControlError;
use super::auth::{Authenticator, Operator};
use super::core::ControlCore;
use super::pb::{self, control_plane_server::ControlPlane};
use super::refusals::Refuser;
use super::validate::Validate;
use crate::types::AgentStatus;

/// The service: the core plus the credential check.
#[derive(Debug, Clone)]
pub struct ControlService {
    core: Arc<ControlCore>,
    auth: Arc<Authenticator>,
    /// Ends open watch streams when the server stops (they would otherwise hold the
    /// server's graceful shutdown open forever).
    shutdown: tokio::sync::watch::Receiver<bool>,
}

type Answer<T> = Result<Response<T>, Status>;

impl ControlService {
    /// The gRPC service over `core`, authenticating callers with `auth`; watch streams end when
    /// `shutdown` turns true.
    pub fn new(
        core: Arc<ControlCore>,
        auth: Authenticator,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            core,
            auth: Arc::new(auth),
            shutdown,
        }
    }

    /// The caller, or UNAUTHENTICATED (audited, as its peer address); then the request's
    /// ids and texts, or INVALID_ARGUMENT naming the field (not audited: nothing ran).
    async fn caller<T: Validate>(
        &self,
        req: &Request<T>,
        action: &'static str,
        tenant: &str,
    ) -> Result<Operator, Status> {
        let op = match self.auth.authenticate(req.metadata()) {
            Ok(op) => op,
            Err(e) => {
                let peer = Refuser::Peer(req.remote_addr().map(|a| a.ip()));
                self.core.record_refusal(&peer, action, tenant, &e).await;
                return Err(e.into());
            }
        };
        req.get_ref().validate()?;
        Ok(op)
    }

    /// Maps the core's answer; a permission refusal is audited with the caller's identity.
    async fn answer<T>(
        &self,
        op: &Operator,
        action: &'static str,
        tenant: &str,
        result: Result<T, ControlError>,
    ) -> Answer<T> {
        match result {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                if matches!(e, ControlError::PermissionDenied(_)) {
                    let actor = Refuser::Actor(op.actor());
                    self.core.record_refusal(&actor, action, tenant, &e).await;
                }
                Err(e.into())
            }
        }
    }
}

/// Runs one call: authenticate, act, answer.
macro_rules! call {
    ($self:ident, $req:ident, $action:literal, $tenant:expr, |$op:ident, $body:ident| $act:expr) => {{
        let tenant: String = ($tenant)(&$req);
        let $op = $self.caller(&$req, $action, &tenant).await?;
        let $body = $req.into_inner();
        let result = $act;
        $self.answer(&$op, $action, &tenant, result).await
    }};
}

fn none<T>(_: &Request<T>) -> String {
    String::new()
}

#[tonic::async_trait]
impl ControlPlane for ControlService {
    async fn who_am_i(&self, req: Request<pb::WhoAmIRequest>) -> Answer<pb::Operator> {
        let op = self.caller(&req, "whoami", "").await?;
        Ok(Response::new(pb::Operator {
            name: op.name.clone(),
            role: op.role.as_str().into(),
            tenant: op.tenant.clone(),
            expires_at: op.expires_at,
        }))
    }

    async fn register_agent(&self, req: Request<pb::RegisterAgentRequest>) -> Answer<pb::Agent> {
        call!(
            self,
            req,
            "agent.register",
            |r: &Request<pb::RegisterAgentRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.register_agent(&op, b).await }
        )
    }

    async fn get_agent(&self, req: Request<pb::AgentRef>) -> Answer<pb::Agent> {
        call!(
            self,
            req,
            "agent.get",
            |r: &Request<pb::AgentRef>| r.get_ref().tenant.clone(),
            |op, b| { self.core.get_agent(&op, b).await }
        )
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Answer<pb::ListAgentsResponse> {
        call!(
            self,
            req,
            "agent.list",
            |r: &Request<pb::ListAgentsRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .list_agents(&op, b)
                    .await
                    .map(|agents| pb::ListAgentsResponse { agents })
            }
        )
    }

    async fn freeze_agent(&self, req: Request<pb::AgentActionRequest>) -> Answer<pb::Agent> {
        call!(
            self,
            req,
            "agent.freeze",
            |r: &Request<pb::AgentActionRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .set_agent_status(&op, b, AgentStatus::Frozen)
                    .await
            }
        )
    }

    async fn unfreeze_agent(&self, req: Request<pb::AgentActionRequest>) -> Answer<pb::Agent> {
        call!(
            self,
            req,
            "agent.unfreeze",
            |r: &Request<pb::AgentActionRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .set_agent_status(&op, b, AgentStatus::Active)
                    .await
            }
        )
    }

    async fn restrict_agent(&self, req: Request<pb::AgentActionRequest>) -> Answer<pb::Agent> {
        call!(
            self,
            req,
            "agent.restrict",
            |r: &Request<pb::AgentActionRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .set_agent_status(&op, b, AgentStatus::Restricted)
                    .await
            }
        )
    }

    async fn revoke_agent(&self, req: Request<pb::AgentActionRequest>) -> Answer<pb::Agent> {
        call!(
            self,
            req,
            "agent.revoke",
            |r: &Request<pb::AgentActionRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .set_agent_status(&op, b, AgentStatus::Revoked)
                    .await
            }
        )
    }

    async fn issue_token(&self, req: Request<pb::IssueTokenRequest>) -> Answer<pb::IssuedToken> {
        call!(
            self,
            req,
            "token.issue",
            |r: &Request<pb::IssueTokenRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.issue_token(&op, b).await }
        )
    }

    async fn rotate_token(&self, req: Request<pb::RotateTokenRequest>) -> Answer<pb::IssuedToken> {
        call!(
            self,
            req,
            "token.rotate",
            |r: &Request<pb::RotateTokenRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.rotate_token(&op, b).await }
        )
    }

    async fn revoke_token(&self, req: Request<pb::RevokeTokenRequest>) -> Answer<pb::TokenInfo> {
        call!(
            self,
            req,
            "token.revoke",
            |r: &Request<pb::RevokeTokenRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.revoke_token(&op, b).await }
        )
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Answer<pb::ListTokensResponse> {
        call!(
            self,
            req,
            "token.list",
            |r: &Request<pb::ListTokensRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .list_tokens(&op, b)
                    .await
                    .map(|tokens| pb::ListTokensResponse { tokens })
            }
        )
    }

    async fn kill(&self, req: Request<pb::KillRequest>) -> Answer<pb::KillResponse> {
        call!(
            self,
            req,
            "kill",
            |r: &Request<pb::KillRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.kill(&op, b).await }
        )
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Answer<pb::ListApprovalsResponse> {
        call!(
            self,
            req,
            "approval.list",
            |r: &Request<pb::ListApprovalsRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .list_approvals(&op, b)
                    .await
                    .map(|approvals| pb::ListApprovalsResponse { approvals })
            }
        )
    }

    async fn get_approval(&self, req: Request<pb::ApprovalRef>) -> Answer<pb::Approval> {
        call!(
            self,
            req,
            "approval.get",
            |r: &Request<pb::ApprovalRef>| r.get_ref().tenant.clone(),
            |op, b| { self.core.get_approval(&op, b).await }
        )
    }

    async fn approve_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Answer<pb::ApprovalDecision> {
        call!(
            self,
            req,
            "approval.approve",
            |r: &Request<pb::DecideApprovalRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.decide_approval(&op, b, true).await }
        )
    }

    async fn deny_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Answer<pb::ApprovalDecision> {
        call!(
            self,
            req,
            "approval.deny",
            |r: &Request<pb::DecideApprovalRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.decide_approval(&op, b, false).await }
        )
    }

    async fn get_tenant(&self, req: Request<pb::TenantRef>) -> Answer<pb::Tenant> {
        call!(
            self,
            req,
            "tenant.get",
            |r: &Request<pb::TenantRef>| r.get_ref().tenant.clone(),
            |op, b| { self.core.get_tenant(&op, b).await }
        )
    }

    async fn update_tenant(&self, req: Request<pb::UpdateTenantRequest>) -> Answer<pb::Tenant> {
        call!(
            self,
            req,
            "tenant.update",
            |r: &Request<pb::UpdateTenantRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.update_tenant(&op, b).await }
        )
    }

    async fn set_budget(&self, req: Request<pb::SetBudgetRequest>) -> Answer<pb::Budget> {
        call!(
            self,
            req,
            "budget.set",
            |r: &Request<pb::SetBudgetRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.set_budget(&op, b).await }
        )
    }

    async fn list_budgets(
        &self,
        req: Request<pb::ListBudgetsRequest>,
    ) -> Answer<pb::ListBudgetsResponse> {
        call!(
            self,
            req,
            "budget.list",
            |r: &Request<pb::ListBudgetsRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .list_budgets(&op, b)
                    .await
                    .map(|budgets| pb::ListBudgetsResponse { budgets })
            }
        )
    }

    async fn activate_policy(
        &self,
        req: Request<pb::ActivatePolicyRequest>,
    ) -> Answer<pb::PolicyRevision> {
        call!(self, req, "policy.activate", none, |op, b| {
            self.core.activate_policy(&op, b).await
        })
    }

    async fn list_policy_revisions(
        &self,
        req: Request<pb::ListPolicyRevisionsRequest>,
    ) -> Answer<pb::ListPolicyRevisionsResponse> {
        call!(self, req, "policy.history", none, |op, b| {
            self.core
                .list_policy_revisions(&op, b)
                .await
                .map(|revisions| pb::ListPolicyRevisionsResponse { revisions })
        })
    }

    async fn rollback_policy(
        &self,
        req: Request<pb::RollbackPolicyRequest>,
    ) -> Answer<pb::PolicyRevision> {
        call!(self, req, "policy.rollback", none, |op, b| {
            self.core.rollback_policy(&op, b).await
        })
    }

    async fn get_state_version(
        &self,
        req: Request<pb::GetStateVersionRequest>,
    ) -> Answer<pb::StateVersion> {
        call!(self, req, "state.version", none, |op, b| {
            self.core.state_version(&op, b).await
        })
    }

    async fn confirm_restore(
        &self,
        req: Request<pb::ConfirmRestoreRequest>,
    ) -> Answer<pb::StateVersion> {
        call!(self, req, "state.confirm_restore", none, |op, b| {
            self.core.confirm_restore(&op, b).await
        })
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Answer<Self::WatchStream> {
        let op = self.caller(&req, "watch", "").await?;
        if let Err(e) = op.require(super::auth::Need::Fleet, "") {
            return self.answer(&op, "watch", "", Err(e)).await;
        }
        let req = req.into_inner();
        let sidecar = req.sidecar;
        let scope = op.scope();
        let (mut snapshot, rx) = self.core.subscribe().await.map_err(Status::from)?;
        self.core
            .note_sidecar_state(
                &sidecar,
                (req.seen_epoch, req.seen_version),
                (snapshot.epoch, snapshot.version),
            )
            .await;
        if self
            .core
            .descends(
                &sidecar,
                (req.seen_epoch, req.seen_version),
                &req.seen_chain,
                &snapshot,
            )
            .await
            .is_some_and(|descends| !descends)
        {
            snapshot.diverged = true;
        }
        let snapshot = scoped(scope.as_deref(), &snapshot);
        crate::log!(
            info,
            "control plane: sidecar {sidecar:?} ({} for tenant(s) {}) watching from epoch {} version {}",
            op.name,
            op.tenant,
            snapshot.epoch,
            snapshot.version
        );
        Ok(Response::new(Box::pin(watch_stream(
            Arc::downgrade(&self.core),
            sidecar,
            scope,
            snapshot,
            rx,
            self.core.store_lost_watch(),
            self.shutdown.clone(),
        ))))
    }

    async fn get_bundle(&self, req: Request<pb::GetBundleRequest>) -> Answer<pb::Bundle> {
        call!(self, req, "policy.fetch", none, |op, b| {
            self.core.bundle(&op, &b.digest).await
        })
    }

    async fn request_approval(
        &self,
        req: Request<pb::RequestApprovalRequest>,
    ) -> Answer<pb::RequestApprovalResponse> {
        call!(
            self,
            req,
            "approval.request",
            |r: &Request<pb::RequestApprovalRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                match self
                    .core
                    .admit_sidecar(&op, "approval request", &b.tenant, &b.agent)
                {
                    Ok(()) => self.core.request_approval(&op, b).await,
                    Err(e) => Err(e),
                }
            }
        )
    }

    async fn report_incident(
        &self,
        req: Request<pb::ReportIncidentRequest>,
    ) -> Answer<pb::Incident> {
        call!(
            self,
            req,
            "incident.raise",
            |r: &Request<pb::ReportIncidentRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                match self
                    .core
                    .admit_sidecar(&op, "incident report", &b.tenant, &b.agent)
                {
                    Ok(()) => self.core.report_incident(&op, b).await,
                    Err(e) => Err(e),
                }
            }
        )
    }

    async fn list_incidents(
        &self,
        req: Request<pb::ListIncidentsRequest>,
    ) -> Answer<pb::ListIncidentsResponse> {
        call!(
            self,
            req,
            "incident.list",
            |r: &Request<pb::ListIncidentsRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .list_incidents(&op, b)
                    .await
                    .map(|incidents| pb::ListIncidentsResponse { incidents })
            }
        )
    }

    async fn get_incident(&self, req: Request<pb::IncidentRef>) -> Answer<pb::Incident> {
        call!(
            self,
            req,
            "incident.get",
            |r: &Request<pb::IncidentRef>| r.get_ref().tenant.clone(),
            |op, b| { self.core.get_incident(&op, b).await }
        )
    }

    async fn acknowledge_incident(
        &self,
        req: Request<pb::IncidentActionRequest>,
    ) -> Answer<pb::Incident> {
        call!(
            self,
            req,
            "incident.acknowledge",
            |r: &Request<pb::IncidentActionRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .set_incident_status(&op, b, crate::types::IncidentStatus::Acknowledged)
                    .await
            }
        )
    }

    async fn close_incident(
        &self,
        req: Request<pb::IncidentActionRequest>,
    ) -> Answer<pb::Incident> {
        call!(
            self,
            req,
            "incident.close",
            |r: &Request<pb::IncidentActionRequest>| r.get_ref().tenant.clone(),
            |op, b| {
                self.core
                    .set_incident_status(&op, b, crate::types::IncidentStatus::Closed)
                    .await
            }
        )
    }

    async fn plan_response(
        &self,
        req: Request<pb::PlanResponseRequest>,
    ) -> Answer<pb::ResponsePlan> {
        call!(
            self,
            req,
            "incident.plan",
            |r: &Request<pb::PlanResponseRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.plan_response(&op, b).await }
        )
    }

    async fn get_incident_graph(&self, req: Request<pb::IncidentRef>) -> Answer<pb::IncidentGraph> {
        call!(
            self,
            req,
            "incident.graph",
            |r: &Request<pb::IncidentRef>| r.get_ref().tenant.clone(),
            |op, b| { self.core.incident_graph(&op, b).await }
        )
    }

    type WatchIncidentsStream =
        Pin<Box<dyn Stream<Item = Result<pb::IncidentEvent, Status>> + Send>>;

    async fn watch_incidents(
        &self,
        req: Request<pb::WatchIncidentsRequest>,
    ) -> Answer<Self::WatchIncidentsStream> {
        let tenant = req.get_ref().tenant.clone();
        let op = self.caller(&req, "incident.watch", &tenant).await?;
        let scope = match op.list_scope(&tenant).and_then(|scope| {
            op.require(super::auth::Need::Read, scope.as_deref().unwrap_or(""))
                .map(|()| scope)
        }) {
            Ok(scope) => scope,
            Err(e) => return self.answer(&op, "incident.watch", &tenant, Err(e)).await,
        };
        // Subscribed before the list: nothing raised in between is missed (it may come
        // twice, as existing and as raised; the id tells).
        let rx = self.core.incident_events.subscribe();
        let existing = if req.get_ref().new_only {
            Vec::new()
        } else {
            self.core
                .list_incidents(
                    &op,
                    pb::ListIncidentsRequest {
                        tenant: tenant.clone(),
                        status: "open".into(),
                        agent: String::new(),
                    },
                )
                .await
                .map_err(Status::from)?
        };
        Ok(Response::new(Box::pin(incident_stream(
            scope,
            existing,
            rx,
            self.shutdown.clone(),
        ))))
    }

    async fn redeem_override(
        &self,
        req: Request<pb::RedeemOverrideRequest>,
    ) -> Answer<pb::RedeemOverrideResponse> {
        call!(
            self,
            req,
            "approval.redeem",
            |r: &Request<pb::RedeemOverrideRequest>| r.get_ref().tenant.clone(),
            |op, b| { self.core.redeem_override(&op, b).await }
        )
    }
}

/// Whether a watcher of `scope` (`None`: every tenant) is sent `item`: every kind of item
/// names its tenant, and only what every tenant shares (the policy revision, a kill of
/// everything) goes to every watcher. A new kind of item is sent to no scoped watcher
/// until it is listed here (the match is exhaustive).
pub fn visible(scope: Option<&[String]>, item: &pb::StateItem) -> bool {
    use pb::state_item::Item;
    let Some(scope) = scope else {
        return true;
    };
    let tenant = match &item.item {
        Some(Item::Agent(a)) => &a.tenant,
        Some(Item::RevokedToken(t)) => &t.tenant,
        Some(Item::Kill(k)) if k.scope == pb::KillScope::All as i32 => return true,
        Some(Item::Kill(k)) => &k.tenant,
        Some(Item::Tenant(t)) => &t.name,
        Some(Item::Budget(b)) => &b.tenant,
        Some(Item::Policy(_)) => return true,
        None => return false,
    };
    scope.iter().any(|t| t == tenant)
}

/// `event` with only the items a watcher of `scope` is sent.
fn scoped(scope: Option<&[String]>, event: &pb::WatchEvent) -> pb::WatchEvent {
    pb::WatchEvent {
        version: event.version,
        epoch: event.epoch,
        snapshot: event.snapshot,
        chain: event.chain.clone(),
        diverged: event.diverged,
        items: event
            .items
            .iter()
            .filter(|i| visible(scope, i))
            .cloned()
            .collect(),
    }
}

/// The snapshot, then every delta after its version, each cut to the watcher's scope (a
/// delta with nothing left for it is not sent). A watcher that falls more than the
/// buffer behind gets a fresh snapshot instead of the deltas it missed. The stream holds
/// the core weakly and ends when the server stops.
fn watch_stream(
    core: std::sync::Weak<ControlCore>,
    sidecar: String,
    scope: Option<Vec<String>>,
    snapshot: pb::WatchEvent,
    rx: tokio::sync::broadcast::Receiver<Arc<pb::WatchEvent>>,
    lost: tokio::sync::watch::Receiver<Option<String>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = Result<pb::WatchEvent, Status>> + Send {
    use tokio::sync::broadcast::error::RecvError;
    struct S {
        core: std::sync::Weak<ControlCore>,
        sidecar: String,
        /// What the watcher holds: the (epoch, version, history hash) of the last event
        /// sent to it.
        sent: (u64, u64, Vec<u8>),
        scope: Option<Vec<String>>,
        rx: tokio::sync::broadcast::Receiver<Arc<pb::WatchEvent>>,
        first: Option<pb::WatchEvent>,
        version: u64,
        lost: tokio::sync::watch::Receiver<Option<String>>,
        ended: bool,
        shutdown: tokio::sync::watch::Receiver<bool>,
    }
    /// Whether `snapshot` is of another history than the one the watcher holds
    /// (`None`: cannot tell).
    async fn judge(s: &S, snapshot: &pb::WatchEvent) -> Option<bool> {
        let core = s.core.upgrade()?;
        let (epoch, version, chain) = &s.sent;
        core.descends(&s.sidecar, (*epoch, *version), chain, snapshot)
            .await
            .map(|descends| !descends)
    }
    let stop = shutdown.clone();
    let state = S {
        version: snapshot.version,
        core,
        sidecar,
        sent: (snapshot.epoch, snapshot.version, snapshot.chain.clone()),
        scope,
        rx,
        first: Some(snapshot),
        lost,
        ended: false,
        shutdown,
    };
    futures_stream(state, stop, |mut s| async move {
        if s.ended {
            return None;
        }
        if let Some(first) = s.first.take() {
            return Some((Ok(first), s));
        }
        loop {
            let next = tokio::select! {
                r = s.rx.recv() => Ok(r),
                lost = s.lost.wait_for(Option::is_some) => {
                    Err(lost.map(|l| l.clone().unwrap_or_default()).unwrap_or_default())
                }
                _ = s.shutdown.wait_for(|stop| *stop) => return None,
            };
            let received = match next {
                Ok(received) => received,
                // This replica lost its store: the stream ends, and the sidecar
                // reconnects (through the Service, to a replica that reaches it).
                Err(why) => {
                    s.ended = true;
                    return Some((Err(Status::unavailable(why)), s));
                }
            };
            match received {
                // A snapshot is always sent, whatever its version: the replica resends
                // one when its store went back (the sidecar judges it a rollback).
                Ok(ev) if !ev.snapshot && ev.version <= s.version => continue,
                Ok(ev) => {
                    s.version = ev.version;
                    // An event that had no items carries a new epoch (a confirmed
                    // restore): every watcher gets it. Otherwise a delta with nothing
                    // left for this watcher's tenants is not sent.
                    let epoch_only = ev.items.is_empty();
                    let mut ev = scoped(s.scope.as_deref(), &ev);
                    if ev.items.is_empty() && !epoch_only && !ev.snapshot {
                        continue;
                    }
                    if ev.snapshot {
                        // Diverged or not is judged for what this watcher holds: one sent
                        // only some tenants' changes may hold a version both histories share.
                        ev.diverged = judge(&s, &ev).await.unwrap_or(ev.diverged);
                    }
                    s.sent = (ev.epoch, ev.version, ev.chain.clone());
                    return Some((Ok(ev), s));
                }
                Err(RecvError::Lagged(_)) => {
                    let core = s.core.upgrade()?;
                    match core.subscribe().await {
                        Ok((snap, rx)) => {
                            s.rx = rx;
                            s.version = snap.version;
                            let mut snap = scoped(s.scope.as_deref(), &snap);
                            snap.diverged = judge(&s, &snap).await.unwrap_or(false);
                            s.sent = (snap.epoch, snap.version, snap.chain.clone());
                            return Some((Ok(snap), s));
                        }
                        Err(e) => return Some((Err(e.into()), s)),
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

/// The open incidents, then every incident event of the scope (None: every tenant).
fn incident_stream(
    scope: Option<String>,
    existing: Vec<pb::Incident>,
    rx: tokio::sync::broadcast::Receiver<Arc<pb::IncidentEvent>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = Result<pb::IncidentEvent, Status>> + Send {
    use tokio::sync::broadcast::error::RecvError;
    struct S {
        scope: Option<String>,
        existing: std::vec::IntoIter<pb::Incident>,
        rx: tokio::sync::broadcast::Receiver<Arc<pb::IncidentEvent>>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        ended: bool,
    }
    let stop = shutdown.clone();
    let state = S {
        scope,
        existing: existing.into_iter(),
        rx,
        shutdown,
        ended: false,
    };
    futures_stream(state, stop, |mut s| async move {
        if s.ended {
            return None;
        }
        if let Some(i) = s.existing.next() {
            let ev = pb::IncidentEvent {
                event: "existing".into(),
                incident: Some(i),
            };
            return Some((Ok(ev), s));
        }
        loop {
            let received = tokio::select! {
                r = s.rx.recv() => r,
                _ = s.shutdown.wait_for(|stop| *stop) => return None,
            };
            match received {
                Ok(ev) => {
                    let tenant = ev.incident.as_ref().map_or("", |i| i.tenant.as_str());
                    if s.scope.as_deref().is_none_or(|t| t == tenant) {
                        return Some((Ok((*ev).clone()), s));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    s.ended = true;
                    let e = Status::resource_exhausted(format!(
                        "this watcher fell {n} incident events behind and was ended: \
                         list the incidents, then watch again"
                    ));
                    return Some((Err(e), s));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

/// `futures::stream::unfold` without the `futures` dependency; ends when the consumer is
/// gone or the server stops (a stalled consumer never holds shutdown).
fn futures_stream<S, F, Fut, T>(
    init: S,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    f: F,
) -> impl Stream<Item = T> + Send
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<(T, S)>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut state = init;
        loop {
            match f(state).await {
                Some((item, next)) => {
                    tokio::select! {
                        sent = tx.send(item) => if sent.is_err() { return },
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    state = next;
                }
                None => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
