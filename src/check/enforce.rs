//! Enforce: what the control plane adds to the policy's decision, in a fixed order.
//!
//! 1. Before policy (in `decide`): a frozen or revoked agent is denied (`agent_frozen`,
//!    `agent_revoked`); these are containment, not policy, and shadow mode does not soften
//!    them. So is an agent of a tenant this fleet sidecar does not serve
//!    (`tenant_not_served`): it has none of that tenant's freezes and kills.
//!    A restricted agent (autonomy L2) gets `approval_needed` (`agent_restricted`) for a
//!    state-mutating call the policy allows, after policy; shadow mode does not soften it.
//! 2. Shadow mode: in a tenant set to `shadow`, a policy deny or `approval_needed` is
//!    recorded as `would_deny` and the request goes on.
//! 3. Approvals: an `approval_needed` call carrying an override token is allowed once if
//!    the control plane redeems the token for this exact call, else denied with the
//!    reason; without a token, a pending approval is raised (or found) for the call and
//!    its id answered in `x-aegis-approval-id`, or the call is denied 429
//!    `approval_cap_reached` when the agent has its cap of pending approvals.
//! 4. Budgets: a call about to go on is charged to the agent's budget; one that would
//!    pass a limit is denied 429 `budget_exhausted` (`would_deny` in shadow mode).
//!
//! Only step 3 leaves the process (to the control plane, bounded by its timeout), and only
//! for `approval_needed` decisions. If the control plane cannot be asked, the policy's
//! answer stands: a deny, 503 `approval_unavailable` (or `override_unverified`), not a
//! gRPC error that Envoy's `failure_mode_allow` could turn into an allow.

use tonic::Code;

use super::{Call, Checker, Outcome};
use crate::control::approvals::{Call as BoundCall, call_hash};
use crate::control::pb;
use crate::dataplane::state::AgentContext;
use crate::policy::{Decision, Verdict};

/// What an `approval_needed` call carries into step 3.
#[derive(Debug, Clone)]
pub(super) struct PendingCall {
    pub hash: String,
    pub arguments: String,
    pub override_token: Option<String>,
    pub policy_reason: String,
    /// What the policy decided for a call held only because its agent is restricted: an
    /// approved retry gets this decision (its sanitizing, headers, metadata), not a bare allow.
    pub held: Option<Decision>,
}

/// The reason of a call held for approval because its agent is restricted.
pub(super) use crate::correlate::RESTRICTED_REASON;

/// Step 1b, after policy: a restricted agent's state-mutating call that the policy allows
/// needs an approval (`approval_needed`, reason `agent_restricted`); its other calls are
/// left as the policy decided. Returns the decision and, for a held call, the policy's own.
///
/// A call is state-mutating when its tool or action matches the mutating words, or, for
/// anything but an MCP call, when its HTTP method is not GET, HEAD or OPTIONS: a route
/// labelled `ledger.read` that takes a POST is held too. An MCP call's tool is the one the
/// server runs, and every MCP message is a POST.
pub(super) fn restrict(
    agent: &AgentContext,
    decision: Decision,
    bundle: &crate::policy::CompiledBundle,
    d: &super::input::Decoded<'_>,
) -> (Decision, Option<Decision>) {
    use crate::dataplane::state::AgentStatus;
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

/// Step 1: containment by agent status, before policy.
pub(super) fn contained(agent: &AgentContext) -> Option<Outcome> {
    use crate::dataplane::state::AgentStatus;
    let reason = match agent.status {
        AgentStatus::Frozen => "agent_frozen",
        AgentStatus::Revoked => "agent_revoked",
        AgentStatus::NotServed => "tenant_not_served",
        AgentStatus::Active | AgentStatus::Restricted | AgentStatus::Unregistered => return None,
    };
    Some(deny(reason, 403))
}

/// The fields of a call an approval is bound to, taken while the decoded request is at hand.
pub(super) fn pending_call(
    d: &super::input::Decoded<'_>,
    claims: &crate::identity::Claims,
    policy_reason: &str,
) -> PendingCall {
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

fn deny(reason: &str, status: u32) -> Outcome {
    let mut decision = Decision::simple(Verdict::Deny, reason);
    decision.http_status = Some(status);
    Outcome::Decided {
        decision,
        code: Code::PermissionDenied,
        default_status: status,
    }
}

fn would_deny(reason: String) -> Outcome {
    Outcome::Decided {
        decision: Decision::simple(Verdict::WouldDeny, reason),
        code: Code::Ok,
        default_status: 200,
    }
}

/// Steps 2-4 for a decision the policy made.
pub(super) async fn apply(
    checker: &Checker,
    outcome: Outcome,
    call: &mut Call,
    decision_id: &str,
    now: i64,
) -> Outcome {
    let Some(agent) = call.policy_agent.take() else {
        return outcome;
    };
    let Outcome::Decided {
        decision,
        code,
        default_status,
    } = outcome
    else {
        return outcome;
    };
    let outcome = match decision.verdict {
        // A restriction is containment by the response engine: shadow mode does not soften it.
        Verdict::Deny | Verdict::ApprovalNeeded
            if agent.shadow && decision.reason != RESTRICTED_REASON =>
        {
            would_deny(decision.reason)
        }
        verdict => {
            let outcome = Outcome::Decided {
                decision,
                code,
                default_status,
            };
            if verdict == Verdict::ApprovalNeeded {
                // Boxed: the rare path's future (a gRPC call to the control plane) must not
                // grow every Check's future.
                Box::pin(approvals(checker, outcome, call, decision_id, &agent, now)).await
            } else {
                outcome
            }
        }
    };
    match (&outcome, agent.budget) {
        (Outcome::Decided { decision, .. }, Some(limit)) if decision.verdict.allows() => {
            let Some(claims) = call.claims.as_deref() else {
                return outcome;
            };
            let charged =
                checker
                    .control
                    .meter
                    .charge(&claims.tenant, &claims.sub, &limit, call.cost, now);
            match charged {
                Ok(()) => outcome,
                Err(_) if agent.shadow => would_deny("budget_exhausted".into()),
                Err(_) => deny("budget_exhausted", 429),
            }
        }
        _ => outcome,
    }
}

/// Step 3: redeem an override token, or raise an approval.
async fn approvals(
    checker: &Checker,
    outcome: Outcome,
    call: &mut Call,
    decision_id: &str,
    agent: &AgentContext,
    now: i64,
) -> Outcome {
    let (Some(pending), Some(claims)) = (call.pending.take(), call.claims.clone()) else {
        return outcome;
    };
    let link = &checker.control.link;
    if let Some(token) = pending.override_token {
        // A call its budget would refuse anyway must not use up the approval.
        if let Some(limit) = agent.budget
            && checker
                .control
                .meter
                .check(&claims.tenant, &claims.sub, &limit, call.cost, now)
                .is_err()
        {
            return deny("budget_exhausted", 429);
        }
        let req = pb::RedeemOverrideRequest {
            override_token: token,
            tenant: claims.tenant.clone(),
            agent: claims.sub.clone(),
            call_hash: pending.hash,
            decision_id: decision_id.to_owned(),
            session: claims.sid.clone(),
        };
        return match link.redeem_override(req).await {
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
                    Outcome::Decided {
                        decision,
                        code: Code::Ok,
                        default_status: 200,
                    }
                } else {
                    deny(&r.reason, 403)
                }
            }
            Err(e) => unavailable(
                "override_unverified",
                &format!("cannot redeem the override token: {e}"),
            ),
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
        decision_id: decision_id.to_owned(),
    };
    match link.request_approval(req).await {
        Ok(r) if r.cap_reached => deny("approval_cap_reached", 429),
        Ok(r) => {
            call.approval_id = r.approval_id;
            outcome
        }
        Err(e) => unavailable(
            "approval_unavailable",
            &format!("cannot raise the approval: {e}"),
        ),
    }
}

/// The policy asked for an approval and the control plane cannot be asked: the policy's
/// answer stands (not without approval), so this is a deny, 503, never a gRPC error that
/// `failure_mode_allow` could turn into an allow.
fn unavailable(reason: &str, message: &str) -> Outcome {
    crate::log!(error, "{reason}: {message}");
    deny(reason, 503)
}
