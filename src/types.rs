//! The domain's words as types: an agent's status, an incident's severity and the
//! response actions an incident's plan names.
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

// === AgentStatus ===

/// An agent's status as the control plane keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentStatus {
    /// Policy decides.
    Active,
    /// State-mutating calls need an approval (autonomy L2's containment).
    Restricted,
    /// Every call denied until unfrozen.
    Frozen,
    /// Every call denied, for good: revoked is final.
    Revoked,
}

impl AgentStatus {
    /// Every status.
    pub const ALL: [AgentStatus; 4] = [
        AgentStatus::Active,
        AgentStatus::Restricted,
        AgentStatus::Frozen,
        AgentStatus::Revoked,
    ];

    /// The status as the protobuf messages and the store spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Restricted => "restricted",
            AgentStatus::Frozen => "frozen",
            AgentStatus::Revoked => "revoked",
        }
    }
}

impl FromStr for AgentStatus {
    type Err = UnknownWord;

    fn from_str(s: &str) -> Result<Self, UnknownWord> {
        let expected = "active, restricted, frozen, revoked";
        parse_word("agent status", expected, &Self::ALL, Self::as_str, s)
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Severity ===

/// An incident's severity, ordered: low < medium < high < critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Worth a look; no containment.
    Low,
    /// Worth a response; a restriction at autonomy level 2 and above.
    Medium,
    /// Serious: contained (frozen) at autonomy level 3 and above.
    High,
    /// Serious: contained, and its tokens and session killed at level 4.
    Critical,
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    /// The severity as the protobuf messages, the store and the evidence bundles spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

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

impl FromStr for Severity {
    type Err = UnknownWord;

    fn from_str(s: &str) -> Result<Self, UnknownWord> {
        let expected = "low, medium, high, critical";
        parse_word("severity", expected, &Self::ALL, Self::as_str, s)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Action ===

/// A response action in an incident's plan (what the control plane's `plan` returns and
/// an incident's `actions` record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Tell the tenant's webhooks; applied to no agent.
    Notify,
    /// Freeze the agent.
    FreezeAgent,
    /// Restrict the agent: its state-mutating calls need an approval.
    RequireApproval,
    /// Kill the agent's tokens.
    KillAgentTokens,
    /// Kill the session the incident happened in.
    KillSession,
}

impl Action {
    /// Every action, in the order a plan lists them.
    pub const ALL: [Action; 5] = [
        Action::Notify,
        Action::FreezeAgent,
        Action::RequireApproval,
        Action::KillAgentTokens,
        Action::KillSession,
    ];

    /// The action as the protobuf messages and the store spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Notify => "notify",
            Action::FreezeAgent => "freeze_agent",
            Action::RequireApproval => "require_approval",
            Action::KillAgentTokens => "kill_agent_tokens",
            Action::KillSession => "kill_session",
        }
    }

    /// Whether the action is applied to the incident's agent (all but `notify`).
    pub const fn applies_to_agent(self) -> bool {
        !matches!(self, Action::Notify)
    }
}

impl FromStr for Action {
    type Err = UnknownWord;

    fn from_str(s: &str) -> Result<Self, UnknownWord> {
        let expected = "notify, freeze_agent, require_approval, kill_agent_tokens, kill_session";
        parse_word("response action", expected, &Self::ALL, Self::as_str, s)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips_and_a_bad_one_is_named() {
        for s in AgentStatus::ALL {
            assert_eq!(s.as_str().parse::<AgentStatus>(), Ok(s));
        }
        for s in Severity::ALL {
            assert_eq!(s.as_str().parse::<Severity>(), Ok(s));
        }
        for a in Action::ALL {
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
