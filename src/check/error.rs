//! Every way a Check ends other than by the policy's own decision, and what Envoy gets.
//!
//! One enum and one mapping, so that no stage builds a gRPC status or a denial by hand:
//! - Aegis's own failures (no control state yet, a misconfigured route, a policy that
//!   failed, an audit log that cannot take the row, overload) are gRPC errors, never a
//!   non-OK CheckResponse: Envoy's `failure_mode_allow` / `status_on_error` decide, so the
//!   operator chooses what a failed Aegis means. [`CheckError::status`] is that error.
//! - What the design answers with a denial instead (a request that cannot be parsed, a
//!   refused token, a control plane that cannot be asked about an approval) is a deny the
//!   agent sees, with a reason and an HTTP status: [`CheckError::denial`]. An approval the
//!   control plane cannot check is a deny (503), never a gRPC error, because
//!   `failure_mode_allow` could turn an error into an allow.

use tonic::{Code, Status};

use super::Outcome;
use super::input::InputError;
use crate::audit::store::AuditError;
use crate::identity::TokenError;
use crate::policy::routes::RouteError;
use crate::policy::{Decision, EvalError, Verdict};

/// Why a Check ended without the policy's decision.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Over `limits.max_inflight`: shed at the door, with no decision and no row.
    #[error("overloaded: {0} Checks in flight (limits.max_inflight); shed without a decision")]
    Overloaded(usize),
    /// A fleet sidecar that has never had the control plane's state cannot know which
    /// tokens are revoked or agents frozen.
    #[error("no control-plane state yet (waiting for the first snapshot)")]
    ControlUnsynced,
    /// The platform's route labels are wrong, not the agent's request.
    #[error("{0}")]
    Route(RouteError),
    /// The policy failed, timed out or was refused an evaluation thread.
    #[error("{0}")]
    Policy(EvalError),
    /// The audit row could not be written: nothing is answered without it.
    #[error("{0}")]
    Audit(AuditError),
    /// The request cannot be parsed as its route says (a denial).
    #[error("{0}")]
    Input(InputError),
    /// The agent token was refused (a denial, 401).
    #[error("{0}")]
    Token(TokenError),
    /// An `approval_needed` call's approval could not be raised (a denial, 503).
    #[error("cannot raise the approval: {0}")]
    ApprovalUnavailable(String),
    /// An override token could not be redeemed (a denial, 503).
    #[error("cannot redeem the override token: {0}")]
    OverrideUnverified(String),
}

/// A denial Aegis answers for itself: the decision, the CheckResponse's gRPC code, and
/// the HTTP status the agent gets.
#[derive(Debug)]
pub struct Denial {
    /// The decision recorded and answered (its reason names the denial).
    pub decision: Decision,
    /// The CheckResponse's gRPC status code.
    pub code: Code,
    /// The HTTP status the agent gets.
    pub http_status: u32,
}

// === impl CheckError ===

impl CheckError {
    /// The gRPC code: of the error Envoy gets, or, for a denial, of its CheckResponse.
    pub fn code(&self) -> Code {
        match self {
            CheckError::Overloaded(_) => Code::ResourceExhausted,
            CheckError::ControlUnsynced => Code::Unavailable,
            CheckError::Route(_) => Code::FailedPrecondition,
            CheckError::Policy(EvalError::Timeout(_)) => Code::DeadlineExceeded,
            CheckError::Policy(EvalError::Bounded(_) | EvalError::Overloaded(_)) => {
                Code::ResourceExhausted
            }
            CheckError::Policy(_) => Code::Internal,
            CheckError::Audit(AuditError::Overloaded(_)) => Code::ResourceExhausted,
            CheckError::Audit(_) => Code::Unavailable,
            CheckError::Input(_) => Code::InvalidArgument,
            CheckError::Token(_) => Code::Unauthenticated,
            CheckError::ApprovalUnavailable(_) | CheckError::OverrideUnverified(_) => {
                Code::PermissionDenied
            }
        }
    }

    /// The reason recorded and counted (and, for a denial, answered).
    pub fn reason(&self) -> &'static str {
        match self {
            CheckError::Overloaded(_) => "overloaded",
            CheckError::ControlUnsynced => "control_unsynced",
            CheckError::Route(_) => "route_misconfigured",
            CheckError::Policy(_) => "policy_error",
            CheckError::Audit(_) => "audit_failed",
            CheckError::Input(e) => e.status_and_reason().1,
            CheckError::Token(e) => e.reason(),
            CheckError::ApprovalUnavailable(_) => "approval_unavailable",
            CheckError::OverrideUnverified(_) => "override_unverified",
        }
    }

    /// The HTTP status of a denial; `None` for a failure (answered as a gRPC error).
    pub fn http_status(&self) -> Option<u32> {
        match self {
            CheckError::Input(e) => Some(e.status_and_reason().0),
            CheckError::Token(_) => Some(401),
            CheckError::ApprovalUnavailable(_) | CheckError::OverrideUnverified(_) => Some(503),
            CheckError::Overloaded(_)
            | CheckError::ControlUnsynced
            | CheckError::Route(_)
            | CheckError::Policy(_)
            | CheckError::Audit(_) => None,
        }
    }

    /// The gRPC error Envoy gets for a failure (`aegis: ` and the error).
    pub fn status(&self) -> Status {
        Status::new(self.code(), format!("aegis: {self}"))
    }

    /// The denial Aegis answers for this error, or `None` when it is a failure.
    pub fn denial(&self) -> Option<Denial> {
        let http_status = self.http_status()?;
        let mut decision = Decision::simple(Verdict::Deny, self.reason());
        decision.http_status = Some(http_status);
        if let CheckError::Token(e) = self {
            decision.headers.push((
                "www-authenticate".into(),
                format!("Bearer error=\"invalid_token\", error_description=\"{e}\""),
            ));
        }
        Some(Denial {
            decision,
            code: self.code(),
            http_status,
        })
    }

    /// Logs what an operator must see. Overload is counted and summarised by the server's
    /// health loop rather than logged per Check: a line per shed Check would add to the
    /// overload it reports. A refused request or token is the agent's, not worth a line.
    pub fn log(&self) {
        match self {
            CheckError::Route(e) => crate::log!(error, "check failed: {e}"),
            CheckError::Policy(e) => crate::log!(error, "policy evaluation failed: {e}"),
            CheckError::Audit(AuditError::Overloaded(_)) => {}
            CheckError::Audit(e) => crate::log!(error, "check failed closed: {e}"),
            CheckError::ApprovalUnavailable(_) | CheckError::OverrideUnverified(_) => {
                crate::log!(error, "{}: {self}", self.reason())
            }
            CheckError::Overloaded(_)
            | CheckError::ControlUnsynced
            | CheckError::Input(_)
            | CheckError::Token(_) => {}
        }
    }

    /// How the Check ends: the denial, or the failure with its gRPC error (logged here,
    /// see [`Self::log`]).
    pub(super) fn into_outcome(self) -> Outcome {
        self.log();
        match self.denial() {
            Some(Denial {
                decision,
                code,
                http_status,
            }) => Outcome::Decided {
                decision,
                code,
                default_status: http_status,
            },
            None => Outcome::Failed {
                reason: self.reason(),
                status: self.status(),
            },
        }
    }
}

impl From<InputError> for CheckError {
    /// A route error is the platform's and fails the Check; every other one is a denial.
    fn from(e: InputError) -> Self {
        match e {
            InputError::Route(e) => CheckError::Route(e),
            e => CheckError::Input(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Every variant: the gRPC code, the message, the reason, and whether it is a denial
    /// (with its HTTP status) or a failure.
    #[test]
    fn every_check_error_maps_to_one_status_and_reason() {
        let route = RouteError::UnknownLabel("colour".into());
        let cases: Vec<(CheckError, Code, String, &str, Option<u32>)> = vec![
            (
                CheckError::Overloaded(8),
                Code::ResourceExhausted,
                "aegis: overloaded: 8 Checks in flight (limits.max_inflight); shed without a decision".into(),
                "overloaded",
                None,
            ),
            (
                CheckError::ControlUnsynced,
                Code::Unavailable,
                "aegis: no control-plane state yet (waiting for the first snapshot)".into(),
                "control_unsynced",
                None,
            ),
            (
                CheckError::Route(route.clone()),
                Code::FailedPrecondition,
                format!("aegis: {route}"),
                "route_misconfigured",
                None,
            ),
            (
                CheckError::Policy(EvalError::Timeout(Duration::from_millis(5))),
                Code::DeadlineExceeded,
                "aegis: policy evaluation exceeded its 5ms time limit".into(),
                "policy_error",
                None,
            ),
            (
                CheckError::Policy(EvalError::Bounded("too big".into())),
                Code::ResourceExhausted,
                "aegis: policy evaluation refused: too big".into(),
                "policy_error",
                None,
            ),
            (
                CheckError::Policy(EvalError::Overloaded(3)),
                Code::ResourceExhausted,
                "aegis: policy evaluation queue full (3 waiting)".into(),
                "policy_error",
                None,
            ),
            (
                CheckError::Policy(EvalError::Panicked("boom".into())),
                Code::Internal,
                "aegis: policy evaluation panicked: boom".into(),
                "policy_error",
                None,
            ),
            (
                CheckError::Audit(AuditError::Overloaded(4)),
                Code::ResourceExhausted,
                format!("aegis: {}", AuditError::Overloaded(4)),
                "audit_failed",
                None,
            ),
            (
                CheckError::Audit(AuditError::Write("disk is full".into())),
                Code::Unavailable,
                "aegis: audit write failed: disk is full".into(),
                "audit_failed",
                None,
            ),
            (
                CheckError::Input(InputError::BodyTruncated),
                Code::InvalidArgument,
                format!("aegis: {}", InputError::BodyTruncated),
                "body_truncated",
                Some(413),
            ),
            (
                CheckError::Token(TokenError::Missing),
                Code::Unauthenticated,
                "aegis: no agent token in the request".into(),
                "token_missing",
                Some(401),
            ),
            (
                CheckError::ApprovalUnavailable("down".into()),
                Code::PermissionDenied,
                "aegis: cannot raise the approval: down".into(),
                "approval_unavailable",
                Some(503),
            ),
            (
                CheckError::OverrideUnverified("down".into()),
                Code::PermissionDenied,
                "aegis: cannot redeem the override token: down".into(),
                "override_unverified",
                Some(503),
            ),
        ];
        for (error, code, message, reason, http) in cases {
            let status = error.status();
            assert_eq!(status.code(), code, "{error:?}");
            assert_eq!(status.message(), message.as_str(), "{error:?}");
            assert_eq!(error.reason(), reason, "{error:?}");
            assert_eq!(error.http_status(), http, "{error:?}");
            match (error.denial(), http) {
                (Some(d), Some(http)) => {
                    assert_eq!(d.code, code);
                    assert_eq!(d.http_status, http);
                    assert_eq!(d.decision.verdict, Verdict::Deny);
                    assert_eq!(d.decision.reason, reason);
                    assert_eq!(d.decision.http_status, Some(http));
                }
                (None, None) => {}
                (d, http) => panic!("{error:?}: denial {d:?} for http status {http:?}"),
            }
        }
    }

    #[test]
    fn a_route_error_fails_the_check_and_other_input_errors_deny() {
        assert!(matches!(
            CheckError::from(InputError::MalformedPath),
            CheckError::Input(InputError::MalformedPath)
        ));
        let route = RouteError::UnknownLabel("colour".into());
        assert!(matches!(
            CheckError::from(InputError::Route(route)),
            CheckError::Route(_)
        ));
    }

    #[test]
    fn a_refused_token_is_answered_with_its_challenge() {
        let Some(d) = CheckError::Token(TokenError::Missing).denial() else {
            panic!("a token refusal is a denial");
        };
        assert_eq!(
            d.decision.headers,
            vec![(
                "www-authenticate".to_owned(),
                "Bearer error=\"invalid_token\", error_description=\"no agent token in the request\""
                    .to_owned()
            )]
        );
    }
}
