//! The domain's words as types: an agent's status, an incident's severity and status,
//! the response actions an incident's plan names, an approval's and a token's status, a
//! tenant's mode.
//!
//! A bottom module (it imports nothing from the crate). The protobuf messages and the
//! stores keep these as strings; code converts at that edge with `as_str()` and
//! `FromStr`, whose error names the bad value, so a typo is a refusal, not a silent
//! fallback.

use std::fmt;
use std::str::FromStr;
/// A value that is not one of a vocabulary's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not one of {expected}")]
pub struct UnknownWord {
    /// The vocabulary: "agent status", "severity", "response action".
    pub what: &'static str,
    /// The value given.
    pub value: String,
    /// The words it could have been.
    pub expected: &'static str,
}

/// The word among `all` spelled `s`, else an [`UnknownWord`] naming `s`.
fn parse_word<T: Copy>(
    what: &'static str,
    expected: &'static str,
    all: &[T],
    as_str: fn(T) -> &'static str,
    s: &str,
) -> Result<T, UnknownWord> {
    all.iter()
        .copied()
        .find(|w| as_str(*w) == s)
        .ok_or_else(|| UnknownWord {
            what,
            value: s.to_owned(),
            expected,
        })
}

/// One vocabulary: the enum, `ALL` (in declaration order), `as_str`, `FromStr` (an
/// [`UnknownWord`] naming the value) and `Display`.
macro_rules! words {
    (
        $(#[$meta:meta])*
        $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every word, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word as the protobuf messages and the stores spell it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $word, )+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                let expected = concat!($($word, ", ",)+);
                let expected = expected.trim_end_matches(", ");
                parse_word($what, expected, Self::ALL, Self::as_str, s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words! {
    /// An agent's status as the control plane keeps it.
    AgentStatus ("agent status") {
        /// Policy decides.
        Active => "active",
        /// State-mutating calls need an approval (autonomy L2's containment).
        Restricted => "restricted",
        /// Every call denied until unfrozen.
        Frozen => "frozen",
        /// Every call denied, for good: revoked is final.
        Revoked => "revoked",
    }
}

words! {
    /// An incident's severity, ordered: low < medium < high < critical.
    Severity ("severity") {
        /// Worth a look; no containment.
        Low => "low",
        /// Worth a response; a restriction at autonomy level 2 and above.
        Medium => "medium",
        /// Serious: contained (frozen) at autonomy level 3 and above.
        High => "high",
        /// Serious: contained, and its tokens and session killed at level 4.
        Critical => "critical",
    }
}

impl PartialOrd for Severity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Severity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl Severity {
    /// `low` 0 … `critical` 3: how a threshold (`min_severity`) compares.
    pub const fn rank(self) -> u8 {
        match self {
            Severity::Low => 0,
            Severity::Medium => 1,
            Severity::High => 2,
            Severity::Critical => 3,
        }
    }

    /// High or critical: serious enough for the containing responses.
    pub const fn is_serious(self) -> bool {
        matches!(self, Severity::High | Severity::Critical)
    }
}

words! {
    /// A response action in an incident's plan (what the control plane's `plan` returns
    /// and an incident's `actions` record).
    Action ("response action") {
        /// Tell the tenant's webhooks; applied to no agent.
        Notify => "notify",
        /// Freeze the agent.
        FreezeAgent => "freeze_agent",
        /// Restrict the agent: its state-mutating calls need an approval.
        RequireApproval => "require_approval",
        /// Kill the agent's tokens.
        KillAgentTokens => "kill_agent_tokens",
        /// Kill the session the incident happened in.
        KillSession => "kill_session",
    }
}

impl Action {
    /// Whether the action is applied to the incident's agent (all but `notify`).
    pub const fn applies_to_agent(self) -> bool {
        !matches!(self, Action::Notify)
    }
}

words! {
    /// An incident's place in its life: open, then acknowledged, then closed.
    IncidentStatus ("incident status") {
        /// Raised; nobody has looked yet.
        Open => "open",
        /// An operator has taken it.
        Acknowledged => "acknowledged",
        /// Done with, for good.
        Closed => "closed",
    }
}

words! {
    /// An approval's status. `expired` is never stored: a pending approval nobody answered
    /// in time, or an override nobody used in time, is judged expired when read.
    ApprovalStatus ("approval status") {
        /// Waiting for an operator.
        Pending => "pending",
        /// Approved: an override the agent may redeem once, until it expires.
        Approved => "approved",
        /// Denied by an operator.
        Denied => "denied",
        /// Not answered, or not used, in time (judged at read).
        Expired => "expired",
        /// Approved and redeemed by one call.
        Used => "used",
    }
}

impl Default for ApprovalStatus {
    /// A new approval is pending.
    fn default() -> Self {
        ApprovalStatus::Pending
    }
}

words! {
    /// A token's status at a moment (judged at read from its expiry and revocation).
    TokenStatus ("token status") {
        /// Neither revoked nor expired.
        Live => "live",
        /// Past its expiry.
        Expired => "expired",
        /// Revoked (by id, by rotation or by a kill).
        Revoked => "revoked",
    }
}

words! {
    /// A tenant's mode: policy decisions enforced, or only recorded (shadow).
    TenantMode ("tenant mode") {
        /// Decisions are enforced.
        Enforce => "enforce",
        /// Decisions are recorded and every call is allowed.
        Shadow => "shadow",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips_and_a_bad_one_is_named() {
        for &s in AgentStatus::ALL {
            assert_eq!(s.as_str().parse::<AgentStatus>(), Ok(s));
        }
        for &s in Severity::ALL {
            assert_eq!(s.as_str().parse::<Severity>(), Ok(s));
        }
        for &a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        let err = "Frozen".parse::<AgentStatus>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent status \"Frozen\" is not one of active, restricted, frozen, revoked"
        );
        assert!(
            "urgent"
                .parse::<Severity>()
                .unwrap_err()
                .to_string()
                .contains("\"urgent\"")
        );
        assert!("freeze".parse::<Action>().is_err());
    }

    #[test]
    fn severities_rank_low_to_critical() {
        let ranks: Vec<u8> = Severity::ALL.iter().map(|s| s.rank()).collect();
        assert_eq!(ranks, vec![0, 1, 2, 3]);
        assert!(Severity::Low < Severity::Critical);
        assert!(Severity::High.is_serious() && !Severity::Medium.is_serious());
    }
}
