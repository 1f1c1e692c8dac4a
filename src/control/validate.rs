//! The strings of every control request, checked before the call runs, so that nothing a
//! caller sends reaches an audit row, a stored object or an answer unchecked.
//!
//! The service checks a request right after its credential (a caller without one learns
//! only that) and before the core acts or any refusal is recorded; a request that fails
//! is answered `INVALID_ARGUMENT` naming the field, and is not recorded (nothing was
//! tried). Two rules:
//! - **ids** the control plane names itself (tenants, agent ids, token, approval and
//!   incident ids, sessions it issues) must be valid ids ([`super::valid_id`]: 1-128
//!   characters of `[A-Za-z0-9._:@-]`); empty means "not given" and is left to the call.
//!   Nothing else can name a stored object, so refusing it loses nothing.
//! - **texts** (reasons, revisions, digests, filters, and the ids a fleet sidecar copies
//!   from agent tokens, which Aegis may not have minted) are at most [`MAX_TEXT_BYTES`]:
//!   the size an audit row keeps of a field, so a reason is recorded whole or refused,
//!   never cut.
//!
//! What is left to the audit row's own bound ([`crate::audit::Record::bounded`]) is what
//! the fleet reports on behalf of agents (tool, resource, arguments, the policy's reason,
//! an incident's summary): refusing those would fail the agent's call, not the caller's.

use super::{ControlError, pb, valid_id};

/// The longest text field a control request may carry: what an audit row keeps of a field
/// ([`crate::audit::MAX_FIELD_BYTES`]).
pub const MAX_TEXT_BYTES: usize = crate::audit::MAX_FIELD_BYTES;

/// The longest override token a sidecar may redeem (as an operator credential).
pub const MAX_TOKEN_BYTES: usize = 8192;

/// A request whose strings can be checked before the call runs.
pub trait Validate {
    /// `INVALID_ARGUMENT` naming the first field that is not acceptable.
    fn validate(&self) -> Result<(), ControlError>;
}

/// An id, if given.
fn id(what: &str, value: &str) -> Result<(), ControlError> {
    if value.is_empty() {
        Ok(())
    } else {
        valid_id(what, value)
    }
}

fn at_most(what: &str, value: &str, max: usize) -> Result<(), ControlError> {
    if value.len() <= max {
        Ok(())
    } else {
        Err(ControlError::invalid(format!(
            "{what} is {} bytes; at most {max} are accepted",
            value.len()
        )))
    }
}

/// A text of at most [`MAX_TEXT_BYTES`].
fn text(what: &str, value: &str) -> Result<(), ControlError> {
    at_most(what, value, MAX_TEXT_BYTES)
}

fn opt_text(what: &str, value: &Option<String>) -> Result<(), ControlError> {
    value.as_deref().map_or(Ok(()), |v| text(what, v))
}

fn token(what: &str, value: &str) -> Result<(), ControlError> {
    at_most(what, value, MAX_TOKEN_BYTES)
}

/// `Validate` for each request: `rule field "name the caller sees"`, checked in order.
macro_rules! fields {
    ($($t:ty { $($rule:ident $field:ident $what:literal),* $(,)? })*) => {
        $(impl Validate for $t {
            fn validate(&self) -> Result<(), ControlError> {
                $( $rule($what, &self.$field)?; )*
                Ok(())
            }
        })*
    };
}

fields! {
    pb::WhoAmIRequest {}
    pb::RegisterAgentRequest { id tenant "tenant", id id "agent id", text risk_tier "risk tier" }
    pb::AgentRef { id tenant "tenant", id id "agent id" }
    pb::ListAgentsRequest { id tenant "tenant", text status "status" }
    pb::AgentActionRequest { id tenant "tenant", id id "agent id", text reason "reason" }
    pb::IssueTokenRequest { id tenant "tenant", id agent "agent id", id session "session" }
    pb::RotateTokenRequest { id tenant "tenant", id jti "token id", text reason "reason" }
    pb::RevokeTokenRequest { id tenant "tenant", id jti "token id", text reason "reason" }
    pb::ListTokensRequest { id tenant "tenant", id agent "agent id" }
    pb::KillRequest { id tenant "tenant", text target "kill target", text reason "reason" }
    pb::ListApprovalsRequest { id tenant "tenant", id agent "agent id", text status "status" }
    pb::ApprovalRef { id tenant "tenant", id id "approval id" }
    pb::DecideApprovalRequest { id tenant "tenant", id id "approval id", text reason "reason" }
    pb::TenantRef { id tenant "tenant" }
    pb::UpdateTenantRequest { id tenant "tenant", opt_text mode "mode", text reason "reason" }
    pb::SetBudgetRequest { id tenant "tenant", id agent "agent id", text reason "reason" }
    pb::ListBudgetsRequest { id tenant "tenant", id agent "agent id" }
    pb::ActivatePolicyRequest { text reason "reason" }
    pb::ListPolicyRevisionsRequest {}
    pb::RollbackPolicyRequest { text to "revision", text reason "reason" }
    pb::GetBundleRequest { text digest "digest" }
    pb::WatchRequest { text sidecar "sidecar name" }
    pb::GetStateVersionRequest {}
    pb::ConfirmRestoreRequest { text reason "reason" }
    pb::RequestApprovalRequest {
        text tenant "tenant", text agent "agent id", text session "session",
        text run_id "run id", text call_hash "call hash", text decision_id "decision id",
    }
    pb::RedeemOverrideRequest {
        token override_token "override token", text tenant "tenant", text agent "agent id",
        text call_hash "call hash", text decision_id "decision id", text session "session",
    }
    pb::ReportIncidentRequest {
        id tenant "tenant", id agent "agent id", text session "session", text run_id "run id",
        text kind "kind", text severity "severity", text trigger_decision "trigger decision",
        text policy_revision "policy revision",
    }
    pb::ListIncidentsRequest { id tenant "tenant", id agent "agent id", text status "status" }
    pb::IncidentRef { id tenant "tenant", id id "incident id" }
    pb::IncidentActionRequest { id tenant "tenant", id id "incident id", text reason "reason" }
    pb::PlanResponseRequest { id tenant "tenant", id id "incident id" }
    pb::WatchIncidentsRequest { id tenant "tenant" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_or_foreign_id_is_refused_naming_the_field_without_echoing_it() {
        let req = pb::AgentRef {
            tenant: "t".repeat(4 << 20),
            id: "bot".into(),
        };
        let e = req.validate().expect_err("refused");
        let msg = e.to_string();
        assert!(matches!(e, ControlError::Invalid(_)), "{e:?}");
        assert!(msg.starts_with("tenant \"ttt"), "{msg}");
        assert!(msg.contains("(4194304 bytes)"), "{msg}");
        assert!(msg.len() < 256, "{} bytes of message", msg.len());
        let req = pb::AgentRef {
            tenant: "acme".into(),
            id: "bot/../x".into(),
        };
        assert!(
            req.validate()
                .expect_err("refused")
                .to_string()
                .starts_with("agent id")
        );
    }

    #[test]
    fn empty_ids_are_left_to_the_call_and_texts_are_bounded() {
        assert!(pb::AgentRef::default().validate().is_ok());
        let ok = pb::AgentActionRequest {
            tenant: "acme".into(),
            id: "bot".into(),
            reason: "r".repeat(MAX_TEXT_BYTES),
        };
        assert!(ok.validate().is_ok());
        let long = pb::AgentActionRequest {
            reason: "r".repeat(MAX_TEXT_BYTES + 1),
            ..ok
        };
        assert_eq!(
            long.validate().expect_err("refused").to_string(),
            "reason is 1025 bytes; at most 1024 are accepted"
        );
        // A fleet sidecar's ids come from agent tokens: bounded, any characters.
        let fleet = pb::RequestApprovalRequest {
            tenant: "acme corp".into(),
            agent: "bot #1".into(),
            ..Default::default()
        };
        assert!(fleet.validate().is_ok());
    }
}
