//! What the control plane stores, as plain records: the rules ([`super::rules`]) judge
//! them and the backends ([`super::sqlite`], [`super::postgres`]) keep them. Statuses are
//! typed ([`crate::types`]); nothing here knows the wire. The gRPC messages are made from
//! these at the edge ([`super::wire`]), with the fields only a reply carries (a token's
//! judged status, whether a revision is the active one, an incident's notifications).
//!
//! Times are Unix seconds unless named otherwise (`_ns`, `_ms`); 0 means "not yet".

use crate::types::{
    AgentStatus, ApprovalStatus, IncidentStatus, Severity, TenantMode, TokenStatus,
};

/// A registered agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    /// Its tenant.
    pub tenant: String,
    /// Its id in the tenant.
    pub id: String,
    /// What the data planes enforce for it.
    pub status: AgentStatus,
    /// low, medium, high or critical (the tenant's label, for policies and lists).
    pub risk_tier: String,
    /// Why it has its status.
    pub reason: String,
    /// When it was registered.
    pub created_at: i64,
    /// When its status last changed.
    pub updated_at: i64,
    /// Who changed it.
    pub updated_by: String,
    /// Its live tokens, counted when read (not stored).
    pub live_tokens: u32,
}

/// A revocation: when and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// When it was revoked.
    pub at: i64,
    /// Why ("rotated: …", "killed: …", the operator's reason).
    pub reason: String,
}

/// A token this control plane issued (its id; never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Its id (`jti`).
    pub jti: String,
    /// Its tenant.
    pub tenant: String,
    /// Its agent.
    pub agent: String,
    /// Its session.
    pub session: String,
    /// The scopes it carries.
    pub scopes: Vec<String>,
    /// Its `iat`.
    pub issued_at: i64,
    /// Its `exp`.
    pub expires_at: i64,
    /// Its revocation, if revoked.
    pub revoked: Option<Revocation>,
}

impl Token {
    /// Its status at `now`: revoked, else expired, else live.
    pub fn status(&self, now: i64) -> TokenStatus {
        if self.revoked.is_some() {
            TokenStatus::Revoked
        } else if self.expires_at <= now {
            TokenStatus::Expired
        } else {
            TokenStatus::Live
        }
    }
}

/// What a kill covers. A single token is not a kill (it is a revocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One session of a tenant.
    Session,
    /// One agent of a tenant.
    Agent,
    /// A whole tenant.
    Tenant,
    /// Every tenant.
    All,
}

impl Scope {
    /// The number it is stored as: the protobuf `KillScope`'s, so a store written before
    /// these records reads the same.
    pub const fn code(self) -> i32 {
        match self {
            Scope::Session => 2,
            Scope::Agent => 3,
            Scope::Tenant => 4,
            Scope::All => 5,
        }
    }

    /// The scope stored as `code`, if it is one.
    pub const fn from_code(code: i32) -> Option<Scope> {
        match code {
            2 => Some(Scope::Session),
            3 => Some(Scope::Agent),
            4 => Some(Scope::Tenant),
            5 => Some(Scope::All),
            _ => None,
        }
    }
}

/// A kill: tokens in its scope issued at or before `before` are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillMark {
    /// What it covers.
    pub scope: Scope,
    /// The tenant (empty for `All`).
    pub tenant: String,
    /// The session or agent (empty for `Tenant` and `All`).
    pub target: String,
    /// Tokens issued at or before this time are refused.
    pub before: i64,
}

impl KillMark {
    /// Whether it covers a token of (tenant, agent, session).
    pub fn covers(&self, tenant: &str, agent: &str, session: &str) -> bool {
        match self.scope {
            Scope::All => true,
            Scope::Tenant => self.tenant == tenant,
            Scope::Agent => self.tenant == tenant && self.target == agent,
            Scope::Session => self.tenant == tenant && self.target == session,
        }
    }
}

/// What a kill hit among the live tokens the control plane knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Killed {
    /// The kill as stored (its `before` never lowered by an older one).
    pub mark: KillMark,
    /// Live tokens revoked.
    pub tokens: u32,
    /// Distinct sessions among them.
    pub sessions: u32,
    /// Distinct agents among them.
    pub agents: u32,
    /// Distinct tenants among them.
    pub tenants: u32,
}

/// A tenant's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// Enforce or shadow.
    pub mode: TenantMode,
    /// The SOC autonomy level, 0–4.
    pub autonomy_level: u32,
    /// When it was last set.
    pub updated_at: i64,
    /// Who set it.
    pub updated_by: String,
}

/// An agent's budget: calls and cost per window.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Its tenant.
    pub tenant: String,
    /// Its agent.
    pub agent: String,
    /// Calls allowed per window (0: no call limit).
    pub max_calls: u64,
    /// Cost allowed per window (0: no cost limit).
    pub max_cost: f64,
    /// The window.
    pub window_secs: u64,
    /// When it was set.
    pub updated_at: i64,
    /// Who set it.
    pub updated_by: String,
}

impl Budget {
    /// Neither limit set: the budget is removed.
    pub fn is_unlimited(&self) -> bool {
        self.max_calls == 0 && self.max_cost <= 0.0
    }
}

/// A call held for a human, and what became of it. The default is a new, pending one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Approval {
    /// APR-… id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// The agent that made the call.
    pub agent: String,
    /// The session it was made in (an override is redeemed only there).
    pub session: String,
    /// The agent's run.
    pub run_id: String,
    /// The tool called.
    pub tool: String,
    /// The action.
    pub action: String,
    /// The resource.
    pub resource: String,
    /// The call's arguments, bounded.
    pub arguments: String,
    /// What identifies the same call again.
    pub call_hash: String,
    /// The policy's reason to hold it.
    pub policy_reason: String,
    /// The decision that held it.
    pub decision_id: String,
    /// Where it stands (as stored; `expired` is judged at read).
    pub status: ApprovalStatus,
    /// When it was raised.
    pub created_at: i64,
    /// When a pending one expires.
    pub expires_at: i64,
    /// Who approved or denied it.
    pub decided_by: String,
    /// When.
    pub decided_at: i64,
    /// Why.
    pub decision_reason: String,
    /// Until when an approved one's override may be redeemed.
    pub override_expires_at: i64,
    /// When the override was redeemed.
    pub used_at: i64,
    /// The decision that redeemed it.
    pub used_by_decision: String,
}

impl Approval {
    /// Judged at `now`: a pending approval nobody answered in time, or an override nobody
    /// used in time, is expired (and denies).
    pub fn judged(mut self, now: i64) -> Approval {
        let expired = match self.status {
            ApprovalStatus::Pending => self.expires_at <= now,
            ApprovalStatus::Approved => self.override_expires_at <= now,
            _ => false,
        };
        if expired {
            self.status = ApprovalStatus::Expired;
        }
        self
    }
}

/// One policy activation in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// Its position in the history (set when appended).
    pub id: u64,
    /// The bundle's revision label.
    pub revision: String,
    /// The bundle's digest.
    pub digest: String,
    /// activate or rollback.
    pub action: String,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When.
    pub activated_at: i64,
}

/// One decision behind an incident, as the data plane saw it. Stored as JSON with these
/// field names.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EvidenceDecision {
    /// Its id.
    pub decision_id: String,
    /// Its time, Unix nanoseconds.
    pub time_ns: i64,
    /// The tool.
    pub tool: String,
    /// The action.
    pub action: String,
    /// allow, deny, sanitize, approval_needed, would_deny.
    pub decision: String,
    /// The policy's reason.
    pub reason: String,
    /// The trust level of the call's input.
    pub trust_level: String,
    /// Its session.
    pub session: String,
    /// Its run.
    pub run_id: String,
    /// The hash (64 lower-case hex digits) of the audit row the reporting data plane
    /// wrote and signed for it.
    pub row_hash: String,
    /// That row's sequence number.
    pub audit_seq: u64,
}

/// A pattern the correlation engine saw, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incident {
    /// INC-… id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// The agent.
    pub agent: String,
    /// The session.
    pub session: String,
    /// The agent's run.
    pub run_id: String,
    /// deny_storm, data_exfil_pattern, …
    pub kind: String,
    /// How serious.
    pub severity: Severity,
    /// One line for a human.
    pub summary: String,
    /// The decision ids behind it, oldest first.
    pub evidence: Vec<String>,
    /// The decision that completed the pattern.
    pub trigger_decision: String,
    /// Its time, Unix nanoseconds.
    pub decided_at_ns: i64,
    /// Open, acknowledged or closed.
    pub status: IncidentStatus,
    /// When it was raised, Unix nanoseconds.
    pub created_at_ns: i64,
    /// When its status last changed.
    pub updated_at: i64,
    /// Who acknowledged it.
    pub acknowledged_by: String,
    /// Who closed it.
    pub closed_by: String,
    /// Why.
    pub close_reason: String,
    /// What the response engine did, in order.
    pub actions: Vec<String>,
    /// The tenant's autonomy level when it was raised.
    pub autonomy_level: u32,
    /// role:name of the data plane that reported it.
    pub reported_by: String,
    /// The active policy revision when it was raised.
    pub policy_revision: String,
    /// The decisions behind it as the data plane saw them.
    pub decisions: Vec<EvidenceDecision>,
}

/// What happened to an incident, in the order the store committed it: every replica hands
/// these to its `WatchIncidents` watchers, whichever replica acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentEvent {
    /// Its place in the incident feed (commit order).
    pub seq: u64,
    /// raised, acknowledged or closed.
    pub event: String,
    /// The incident's tenant.
    pub tenant: String,
    /// The incident's id.
    pub incident: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_revoked_before_it_is_expired() {
        let mut t = Token {
            jti: "j".into(),
            tenant: "t".into(),
            agent: "a".into(),
            session: "s".into(),
            scopes: vec![],
            issued_at: 0,
            expires_at: 100,
            revoked: None,
        };
        assert_eq!(t.status(99), TokenStatus::Live);
        assert_eq!(t.status(100), TokenStatus::Expired);
        t.revoked = Some(Revocation {
            at: 50,
            reason: "r".into(),
        });
        assert_eq!(t.status(99), TokenStatus::Revoked);
    }

    #[test]
    fn a_kill_covers_only_its_scope() {
        let mark = |scope, tenant: &str, target: &str| KillMark {
            scope,
            tenant: tenant.into(),
            target: target.into(),
            before: 0,
        };
        assert!(mark(Scope::All, "", "").covers("t", "a", "s"));
        assert!(mark(Scope::Tenant, "t", "").covers("t", "a", "s"));
        assert!(!mark(Scope::Tenant, "u", "").covers("t", "a", "s"));
        assert!(mark(Scope::Agent, "t", "a").covers("t", "a", "s"));
        assert!(!mark(Scope::Agent, "u", "a").covers("t", "a", "s"));
        assert!(mark(Scope::Session, "t", "s").covers("t", "a", "s"));
        assert!(!mark(Scope::Session, "t", "a").covers("t", "a", "s"));
    }
}
