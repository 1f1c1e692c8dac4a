//! Enforce: what the control plane adds to the policy's decision, in one fixed order.
//!
//! [`enforce`] is the only way to an [`Enforced`] outcome, and `record` and `respond` take
//! nothing else: no answer can be built from a decision that skipped these steps.
//!
//! 1. Containment: a frozen or revoked agent is denied (`agent_frozen`, `agent_revoked`),
//!    and so is an agent of a tenant this fleet sidecar does not serve
//!    (`tenant_not_served`: it has none of that tenant's freezes and kills). This is
//!    containment, not policy: the policy is not asked (identify stops the pipeline before
//!    the input is built, see [`containment`]), shadow mode does not soften it, and it
//!    comes before the request's own faults.
//! 2. Restriction: a restricted agent (autonomy L2) gets `approval_needed`
//!    (`agent_restricted`) for a state-mutating call the policy allows; shadow mode does
//!    not soften it.
//! 3. Shadow mode: in a tenant set to `shadow`, a policy deny or `approval_needed` is
//!    recorded as `would_deny` and the request goes on.
//! 4. Approvals: an `approval_needed` call carrying an override token is allowed once if
//!    the control plane redeems the token for this exact call, else denied with the
//!    reason; without a token, a pending approval is raised (or found) for the call and
//!    its id answered in `x-aegis-approval-id`, or the call is denied 429
//!    `approval_cap_reached` when the agent has its cap of pending approvals.
//! 5. Budgets: a call about to go on is charged to the agent's budget; one that would
//!    pass a limit is denied 429 `budget_exhausted` (`would_deny` in shadow mode).
//!
//! Only step 4 leaves the process (to the control plane, bounded by its timeout), and only
//! for `approval_needed` decisions. If the control plane cannot be asked, the policy's
//! answer stands: a deny, 503 `approval_unavailable` (or `override_unverified`), not a
//! gRPC error that Envoy's `failure_mode_allow` could turn into an allow.

use std::sync::Arc;

use tonic::Code;

use super::error::CheckError;
use super::input::Decoded;
use super::{Call, Checker, Outcome};
use crate::control::approvals::{Call as BoundCall, call_hash};
use crate::control::pb;
use crate::dataplane::state::{AgentContext, AgentStatus};
use crate::identity::Claims;
use crate::policy::{CompiledBundle, Decision, Verdict};

/// The reason of a call held for approval because its agent is restricted.
pub(super) use crate::correlate::RESTRICTED_REASON;

/// How far a Check got before enforcement, when the policy did not decide.
#[derive(Debug)]
pub(super) enum Judged {
    /// Aegis answered for itself: a refused request or token, or its own failure.
    Refused(CheckError),
    /// The agent is contained (step 1), for this reason (see [`containment`]): the
    /// policy was not asked.
    Contained(&'static str),
}

/// The policy's decision for an agent that is not contained, with what enforcement needs.
#[derive(Debug)]
pub(super) struct Evaluated<'r> {
    pub decision: Decision,
    pub claims: Arc<Claims>,
    pub agent: AgentContext,
    pub decoded: Decoded<'r>,
    /// The bundle that decided (its mutating words, for step 2).
    pub bundle: Arc<CompiledBundle>,
}

/// A Check's outcome after every enforcement step. Only [`enforce`] makes one (its field
/// is private to this module), and `record` and `respond` take nothing else.
#[derive(Debug)]
pub(super) struct Enforced {
    outcome: Outcome,
}

impl Enforced {
    /// The enforced outcome.
    pub(super) fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    /// The enforced outcome, for the response.
    pub(super) fn into_outcome(self) -> Outcome {
        self.outcome
    }
}

/// What an `approval_needed` call carries into step 4.
#[derive(Debug, Clone)]
struct PendingCall {
    hash: String,
    arguments: String,
    override_token: Option<String>,
    policy_reason: String,
    /// What the policy decided for a call held only because its agent is restricted: an
    /// approved retry gets this decision (its sanitizing, headers, metadata), not a bare allow.
    held: Option<Decision>,
}

/// Steps 1 to 5, in order. `now` is in Unix seconds.
pub(super) async fn enforce(
    checker: &Checker,
    judged: Result<Evaluated<'_>, Judged>,
    call: &mut Call,
    decision_id: &str,
    now: i64,
) -> Enforced {
    let outcome = match judged {
        Err(Judged::Refused(e)) => e.into_outcome(),
        // 1. Containment.
        Err(Judged::Contained(reason)) => deny(reason, 403),
        Ok(evaluated) => enforce_decision(checker, evaluated, call, decision_id, now).await,
    };
    Enforced { outcome }
}

/// Steps 2 to 5 for a decision the policy made.
async fn enforce_decision(
    checker: &Checker,
    e: Evaluated<'_>,
    call: &mut Call,
    decision_id: &str,
    now: i64,
) -> Outcome {
    // 2. Restriction.
    let (decision, held) = restrict(&e.agent, e.decision, &e.bundle, &e.decoded);
    let outcome = match decision.verdict {
        // 3. Shadow mode. A restriction is containment by the response engine: shadow mode
        // does not soften it.
        Verdict::Deny | Verdict::ApprovalNeeded
            if e.agent.shadow && decision.reason != RESTRICTED_REASON =>
        {
            would_deny(decision.reason)
        }
        // 4. Approvals. Boxed: the rare path's future (a gRPC call to the control plane)
        // must not grow every Check's future.
        Verdict::ApprovalNeeded => {
            let mut pending = pending_call(&e.decoded, &e.claims, &decision.reason);
            pending.held = held;
            let policy = decided(decision, Code::PermissionDenied, 403);
            let ctx = Approval {
                checker,
                claims: &e.claims,
                agent: &e.agent,
                cost: e.decoded.cost,
                decision_id,
                now,
            };
            Box::pin(approvals(&ctx, policy, pending, call)).await
        }
        _ => decided(decision, Code::PermissionDenied, 403),
    };
    // 5. Budget.
    match (&outcome, e.agent.budget) {
        (Outcome::Decided { decision, .. }, Some(limit)) if decision.verdict.allows() => {
            let charged = checker.control.meter.charge(
                &e.claims.tenant,
                &e.claims.sub,
                &limit,
                e.decoded.cost,
                now,
            );
            match charged {
                Ok(()) => outcome,
                Err(_) if e.agent.shadow => would_deny("budget_exhausted".into()),
                Err(_) => deny("budget_exhausted", 429),
            }
        }
        _ => outcome,
    }
}

/// Step 1: the reason a contained agent is denied, or `None` for an agent the policy
/// decides for. Identify asks it to stop before the input is built.
pub(super) fn containment(status: AgentStatus) -> Option<&'static str> {
    match status {
        AgentStatus::Frozen => Some("agent_frozen"),
        AgentStatus::Revoked => Some("agent_revoked"),
        AgentStatus::NotServed => Some("tenant_not_served"),
        AgentStatus::Active | AgentStatus::Restricted | AgentStatus::Unregistered => None,
    }
}

/// Step 2: a restricted agent's state-mutating call that the policy allows needs an
/// approval (`approval_needed`, reason `agent_restricted`); its other calls are left as
/// the policy decided. Returns the decision and, for a held call, the policy's own.
///
/// A call is state-mutating when its tool or action matches the mutating words, or, for
/// anything but an MCP call, when its HTTP method is not GET, HEAD or OPTIONS: a route
/// labelled `ledger.read` that takes a POST is held too. An MCP call's tool is the one the
/// server runs, and every MCP message is a POST.
fn restrict(
    agent: &AgentContext,
    decision: Decision,
    bundle: &CompiledBundle,
    d: &Decoded<'_>,
) -> (Decision, Option<Decision>) {
    if agent.status != AgentStatus::Restricted || !decision.verdict.allows() {
        return (decision, None);
    }
    let unsafe_method = !d.mcp
        && !matches!(
            d.http.method.to_ascii_uppercase().as_str(),
            "GET" | "HEAD" | "OPTIONS"
        );
    let words = crate::correlate::words_from(bundle);
    if unsafe_method || crate::correlate::is_mutating(&words, &d.tool.name, &d.tool.action) {
        (
            Decision::simple(Verdict::ApprovalNeeded, RESTRICTED_REASON),
            Some(decision),
        )
    } else {
        (decision, None)
    }
}

/// The fields of a call an approval is bound to, taken while the decoded request is at hand.
fn pending_call(d: &Decoded<'_>, claims: &Claims, policy_reason: &str) -> PendingCall {
    let http = d.http;
    let body: &[u8] = if d.mcp {
        b""
    } else if http.body.is_empty() {
        &http.raw_body
    } else {
        http.body.as_bytes()
    };
    PendingCall {
        hash: call_hash(&BoundCall {
            tenant: &claims.tenant,
            agent: &claims.sub,
            tool: &d.tool.name,
            action: &d.tool.action,
            resource: &d.tool.resource,
            arguments: &d.tool.arguments,
            method: &http.method,
            host: &http.host,
            path: &http.path,
            body,
        }),
        arguments: d.tool.arguments.to_string(),
        override_token: d
            .header(crate::control::approvals::OVERRIDE_HEADER)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
        policy_reason: policy_reason.to_owned(),
        held: None,
    }
}

fn decided(decision: Decision, code: Code, default_status: u32) -> Outcome {
    Outcome::Decided {
        decision,
        code,
        default_status,
    }
}

fn deny(reason: &str, status: u32) -> Outcome {
    let mut decision = Decision::simple(Verdict::Deny, reason);
    decision.http_status = Some(status);
    decided(decision, Code::PermissionDenied, status)
}

fn would_deny(reason: String) -> Outcome {
    decided(Decision::simple(Verdict::WouldDeny, reason), Code::Ok, 200)
}

/// What step 4 knows of the call besides its pending approval.
struct Approval<'a> {
    checker: &'a Checker,
    claims: &'a Claims,
    agent: &'a AgentContext,
    cost: f64,
    decision_id: &'a str,
    now: i64,
}

/// Step 4: redeem an override token, or raise an approval. `policy` is the
/// `approval_needed` outcome, answered when an approval is raised.
async fn approvals(
    ctx: &Approval<'_>,
    policy: Outcome,
    pending: PendingCall,
    call: &mut Call,
) -> Outcome {
    let (checker, claims) = (ctx.checker, ctx.claims);
    let link = &checker.control.link;
    if let Some(token) = pending.override_token {
        // A call its budget would refuse anyway must not use up the approval.
        if let Some(limit) = ctx.agent.budget
            && checker
                .control
                .meter
                .check(&claims.tenant, &claims.sub, &limit, ctx.cost, ctx.now)
                .is_err()
        {
            return deny("budget_exhausted", 429);
        }
        let req = pb::RedeemOverrideRequest {
            override_token: token,
            tenant: claims.tenant.clone(),
            agent: claims.sub.clone(),
            call_hash: pending.hash,
            decision_id: ctx.decision_id.to_owned(),
            session: claims.sid.clone(),
        };
        let redeemed = quiet(checker, call, link.redeem_override(req)).await;
        return match redeemed {
            Ok(r) => {
                call.approval_id = r.approval_id;
                if r.accepted {
                    let decision = match pending.held {
                        Some(mut d) => {
                            d.reason = "approved_override".into();
                            d
                        }
                        None => Decision::simple(Verdict::Allow, "approved_override"),
                    };
                    decided(decision, Code::Ok, 200)
                } else {
                    deny(&r.reason, 403)
                }
            }
            Err(e) => unavailable(CheckError::OverrideUnverified(e.to_string())),
        };
    }
    let req = pb::RequestApprovalRequest {
        tenant: claims.tenant.clone(),
        agent: claims.sub.clone(),
        session: claims.sid.clone(),
        run_id: call.run_id.clone(),
        tool: call.tool.clone(),
        action: call.action.clone(),
        resource: call.resource.clone(),
        arguments: pending.arguments,
        call_hash: pending.hash,
        policy_reason: pending.policy_reason,
        decision_id: ctx.decision_id.to_owned(),
    };
    match quiet(checker, call, link.request_approval(req)).await {
        Ok(r) if r.cap_reached => deny("approval_cap_reached", 429),
        Ok(r) => {
            call.approval_id = r.approval_id;
            policy
        }
        Err(e) => unavailable(CheckError::ApprovalUnavailable(e.to_string())),
    }
}

/// The policy asked for an approval and the control plane cannot be asked: the policy's
/// answer stands (not without approval), so this is a deny, 503, never a gRPC error that
/// `failure_mode_allow` could turn into an allow.
fn unavailable(e: CheckError) -> Outcome {
    e.into_outcome()
}

/// Awaits a control-plane call with the Check's audit row withdrawn: the control plane may
/// append a row of its own (an approval raised or redeemed) before it answers, and the
/// audit writer must not hold that row open for this Check's, which cannot come before
/// the answer. The row is announced again afterwards.
async fn quiet<T>(checker: &Checker, call: &mut Call, work: impl Future<Output = T>) -> T {
    let announced = call.coming.take().is_some();
    let out = work.await;
    if announced {
        call.coming = Some(checker.audit.expect_row());
    }
    out
}
