//! Records to the gRPC messages and back: the one edge where typed statuses become the
//! words the protobuf carries, and where a message from outside (a data plane's incident,
//! an operator's kill scope) is checked into a record, naming what is wrong.

use super::ControlError;
use super::pb::{self, state_item::Item};
use super::records::{
    Agent, Approval, Budget, EvidenceDecision, Incident, KillMark, Killed, Revision, Scope, Tenant,
    Token,
};

/// A list's filter on a word (a status): none when empty, else the word, or a refusal
/// naming the value and the words it could be.
pub fn filter<T: std::str::FromStr<Err = crate::types::UnknownWord>>(
    wire: &str,
) -> Result<Option<T>, ControlError> {
    if wire.is_empty() {
        return Ok(None);
    }
    wire.parse()
        .map(Some)
        .map_err(|e: crate::types::UnknownWord| ControlError::invalid(e.to_string()))
}

/// A kill scope from the wire. A token scope is refused (that is a revocation), as is an
/// unknown one.
pub fn scope(wire: i32) -> Result<Scope, ControlError> {
    match pb::KillScope::try_from(wire) {
        Ok(pb::KillScope::Session) => Ok(Scope::Session),
        Ok(pb::KillScope::Agent) => Ok(Scope::Agent),
        Ok(pb::KillScope::Tenant) => Ok(Scope::Tenant),
        Ok(pb::KillScope::All) => Ok(Scope::All),
        Ok(pb::KillScope::Token | pb::KillScope::Unspecified) => Err(ControlError::invalid(
            "a token kill is a token revocation; scope must be session, agent, tenant or all",
        )),
        Err(_) => Err(ControlError::invalid(format!("unknown kill scope {wire}"))),
    }
}

/// A kill scope on the wire.
pub fn scope_wire(scope: Scope) -> pb::KillScope {
    match scope {
        Scope::Session => pb::KillScope::Session,
        Scope::Agent => pb::KillScope::Agent,
        Scope::Tenant => pb::KillScope::Tenant,
        Scope::All => pb::KillScope::All,
    }
}

/// An agent as a reply carries it.
pub fn agent(a: Agent) -> pb::Agent {
    pb::Agent {
        tenant: a.tenant,
        id: a.id,
        status: a.status.as_str().to_owned(),
        risk_tier: a.risk_tier,
        reason: a.reason,
        created_at: a.created_at,
        updated_at: a.updated_at,
        updated_by: a.updated_by,
        live_tokens: a.live_tokens,
    }
}

/// A token as a reply carries it, its status judged at `now`.
pub fn token(t: Token, now: i64) -> pb::TokenInfo {
    let status = t.status(now).as_str().to_owned();
    let (revoked_at, revoked_reason) = t.revoked.map_or((0, String::new()), |r| (r.at, r.reason));
    pb::TokenInfo {
        jti: t.jti,
        tenant: t.tenant,
        agent: t.agent,
        session: t.session,
        scopes: t.scopes,
        issued_at: t.issued_at,
        expires_at: t.expires_at,
        status,
        revoked_at,
        revoked_reason,
    }
}

/// A kill mark on the wire.
pub fn kill_mark(k: &KillMark) -> pb::KillMark {
    pb::KillMark {
        scope: scope_wire(k.scope) as i32,
        tenant: k.tenant.clone(),
        target: k.target.clone(),
        before: k.before,
    }
}

/// What a kill hit, as its reply.
pub fn killed(k: &Killed) -> pb::KillResponse {
    pb::KillResponse {
        scope: scope_wire(k.mark.scope) as i32,
        tenant: k.mark.tenant.clone(),
        target: k.mark.target.clone(),
        before: k.mark.before,
        tokens: k.tokens,
        sessions: k.sessions,
        agents: k.agents,
        tenants: k.tenants,
    }
}

/// A tenant's settings as a reply carries them.
pub fn tenant(t: Tenant) -> pb::Tenant {
    pb::Tenant {
        name: t.name,
        mode: t.mode.as_str().to_owned(),
        autonomy_level: t.autonomy_level,
        updated_at: t.updated_at,
        updated_by: t.updated_by,
    }
}

/// A budget as a reply carries it (usage left unknown; the caller fills it).
pub fn budget(b: Budget) -> pb::Budget {
    pb::Budget {
        tenant: b.tenant,
        agent: b.agent,
        max_calls: b.max_calls,
        max_cost: b.max_cost,
        window_secs: b.window_secs,
        updated_at: b.updated_at,
        updated_by: b.updated_by,
        ..Default::default()
    }
}

/// An approval as a reply carries it.
pub fn approval(a: Approval) -> pb::Approval {
    pb::Approval {
        id: a.id,
        tenant: a.tenant,
        agent: a.agent,
        session: a.session,
        run_id: a.run_id,
        tool: a.tool,
        action: a.action,
        resource: a.resource,
        arguments: a.arguments,
        call_hash: a.call_hash,
        policy_reason: a.policy_reason,
        decision_id: a.decision_id,
        status: a.status.as_str().to_owned(),
        created_at: a.created_at,
        expires_at: a.expires_at,
        decided_by: a.decided_by,
        decided_at: a.decided_at,
        decision_reason: a.decision_reason,
        override_expires_at: a.override_expires_at,
        used_at: a.used_at,
        used_by_decision: a.used_by_decision,
    }
}

/// A policy activation as a reply carries it.
pub fn revision(r: Revision, active: bool) -> pb::PolicyRevision {
    pb::PolicyRevision {
        id: r.id,
        revision: r.revision,
        digest: r.digest,
        action: r.action,
        actor: r.actor,
        reason: r.reason,
        activated_at: r.activated_at,
        active,
    }
}

/// An incident as a reply carries it (its notifications left for the caller).
pub fn incident(i: Incident) -> pb::Incident {
    pb::Incident {
        id: i.id,
        tenant: i.tenant,
        agent: i.agent,
        session: i.session,
        run_id: i.run_id,
        kind: i.kind,
        severity: i.severity.as_str().to_owned(),
        summary: i.summary,
        evidence: i.evidence,
        trigger_decision: i.trigger_decision,
        decided_at_ns: i.decided_at_ns,
        status: i.status.as_str().to_owned(),
        created_at_ns: i.created_at_ns,
        updated_at: i.updated_at,
        acknowledged_by: i.acknowledged_by,
        closed_by: i.closed_by,
        close_reason: i.close_reason,
        actions: i.actions,
        autonomy_level: i.autonomy_level,
        reported_by: i.reported_by,
        policy_revision: i.policy_revision,
        decisions: i.decisions.into_iter().map(evidence).collect(),
        notifications: Vec::new(),
    }
}

/// An incident from the wire (a data plane's report): its severity and status must be
/// words of their vocabularies.
pub fn incident_record(i: pb::Incident) -> Result<Incident, ControlError> {
    let bad =
        |e: crate::types::UnknownWord| ControlError::invalid(format!("incident {}: {e}", i.id));
    let severity = i.severity.parse().map_err(bad)?;
    let status = if i.status.is_empty() {
        crate::types::IncidentStatus::Open
    } else {
        i.status.parse().map_err(bad)?
    };
    Ok(Incident {
        id: i.id,
        tenant: i.tenant,
        agent: i.agent,
        session: i.session,
        run_id: i.run_id,
        kind: i.kind,
        severity,
        summary: i.summary,
        evidence: i.evidence,
        trigger_decision: i.trigger_decision,
        decided_at_ns: i.decided_at_ns,
        status,
        created_at_ns: i.created_at_ns,
        updated_at: i.updated_at,
        acknowledged_by: i.acknowledged_by,
        closed_by: i.closed_by,
        close_reason: i.close_reason,
        actions: i.actions,
        autonomy_level: i.autonomy_level,
        reported_by: i.reported_by,
        policy_revision: i.policy_revision,
        decisions: i.decisions.into_iter().map(evidence_record).collect(),
    })
}

/// One decision behind an incident, on the wire.
pub fn evidence(d: EvidenceDecision) -> pb::EvidenceDecision {
    pb::EvidenceDecision {
        decision_id: d.decision_id,
        time_ns: d.time_ns,
        tool: d.tool,
        action: d.action,
        decision: d.decision,
        reason: d.reason,
        trust_level: d.trust_level,
        session: d.session,
        run_id: d.run_id,
        row_hash: d.row_hash,
        audit_seq: d.audit_seq,
    }
}

/// One decision behind an incident, from the wire.
pub fn evidence_record(d: pb::EvidenceDecision) -> EvidenceDecision {
    EvidenceDecision {
        decision_id: d.decision_id,
        time_ns: d.time_ns,
        tool: d.tool,
        action: d.action,
        decision: d.decision,
        reason: d.reason,
        trust_level: d.trust_level,
        session: d.session,
        run_id: d.run_id,
        row_hash: d.row_hash,
        audit_seq: d.audit_seq,
    }
}

// --- the watched state's items (what the change feed carries to the data planes) ---

fn item(i: Item) -> pb::StateItem {
    pb::StateItem { item: Some(i) }
}

/// An agent's status, for the data planes.
pub fn agent_item(a: &Agent) -> pb::StateItem {
    item(Item::Agent(pb::AgentState {
        tenant: a.tenant.clone(),
        id: a.id.clone(),
        status: a.status.as_str().to_owned(),
        risk_tier: a.risk_tier.clone(),
    }))
}

/// A tenant's mode and autonomy level, for the data planes.
pub fn tenant_item(t: &Tenant) -> pb::StateItem {
    item(Item::Tenant(pb::TenantState {
        name: t.name.clone(),
        mode: t.mode.as_str().to_owned(),
        autonomy_level: t.autonomy_level,
    }))
}

/// An agent's budget (limits only), for the data planes.
pub fn budget_item(b: &Budget) -> pb::StateItem {
    item(Item::Budget(pb::BudgetState {
        tenant: b.tenant.clone(),
        agent: b.agent.clone(),
        max_calls: b.max_calls,
        max_cost: b.max_cost,
        window_secs: b.window_secs,
    }))
}

/// A revoked token's id and expiry, for the data planes.
pub fn revoked_item(t: &Token) -> pb::StateItem {
    item(Item::RevokedToken(pb::RevokedToken {
        jti: t.jti.clone(),
        expires_at: t.expires_at,
        tenant: t.tenant.clone(),
    }))
}

/// A kill mark, for the data planes.
pub fn kill_item(k: &KillMark) -> pb::StateItem {
    item(Item::Kill(kill_mark(k)))
}

/// The active policy, for the data planes.
pub fn policy_item(revision: &str, digest: &str) -> pb::StateItem {
    item(Item::Policy(pb::PolicyRef {
        revision: revision.to_owned(),
        digest: digest.to_owned(),
    }))
}
