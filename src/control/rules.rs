//! The control plane's rules, once, above any backend: each function is one action's unit
//! of work over a [`Txn`] (read the records, judge, write, publish), run by
//! [`super::store::ControlStore::transact`] in one transaction. A backend stores records;
//! it never decides (revoked is final, no restriction over a freeze, what a kill covers,
//! approval caps and duplicates, incident transitions, expiry judged at read time).
//!
//! A unit of work may be run again after a serialization conflict with another replica,
//! so it reads everything it judges inside the transaction and acts nowhere else.

use super::ControlError;
use super::pb;
use super::records::{
    Agent, Approval, Budget, Incident, KillMark, Killed, Revision, Tenant, Token,
};
use super::store::{Change, EXPIRED_SLACK_SECS, Outbox, Txn, next_epoch};
use super::wire::{agent_item, budget_item, kill_item, policy_item, revoked_item, tenant_item};
use crate::types::{AgentStatus, ApprovalStatus, IncidentStatus, TokenStatus};

/// Commits `items` as the next version; the action's value with its position.
fn publish<T>(
    tx: &mut dyn Txn,
    value: T,
    items: Vec<pb::StateItem>,
) -> Result<Change<T>, ControlError> {
    let (epoch, version) = tx.publish(&items, false)?;
    Ok(Change {
        value,
        epoch,
        version,
        items,
    })
}

// --- the watched state ---

/// The whole watched state, as a snapshot event with its history hash.
pub fn snapshot(tx: &mut dyn Txn, now: i64) -> Result<pb::WatchEvent, ControlError> {
    let epoch = tx.epoch()?;
    let version = tx.version()?;
    let chain = tx.chain_at(version)?.unwrap_or_default();
    let mut items: Vec<pb::StateItem> =
        tx.agents(None, None, now)?.iter().map(agent_item).collect();
    items.extend(
        tx.revoked_tokens(now - EXPIRED_SLACK_SECS)?
            .iter()
            .map(revoked_item),
    );
    items.extend(tx.kill_marks()?.iter().map(kill_item));
    items.extend(tx.tenants()?.iter().map(tenant_item));
    items.extend(tx.budgets(None, None)?.iter().map(budget_item));
    if let Some(active) = tx.revisions(1)?.into_iter().next() {
        items.push(policy_item(&active.revision, &active.digest));
    }
    Ok(pb::WatchEvent {
        epoch,
        version,
        snapshot: true,
        items,
        chain,
        diverged: false,
    })
}

/// The watched state's (epoch, version).
pub fn state_version(tx: &mut dyn Txn) -> Result<(u64, u64), ControlError> {
    Ok((tx.epoch()?, tx.version()?))
}

/// Raises the epoch past both its own and the highest a sidecar reported holding
/// ([`next_epoch`]; the report is shared by every replica, so the operator may confirm at
/// any), and the version with it (an operator confirmed that the state held now, restored
/// from a backup, is intended); the feed carries an event with no items at the new epoch.
/// Returns (epoch, version, the reported epoch).
pub fn raise_epoch(tx: &mut dyn Txn) -> Result<(u64, u64, u64), ControlError> {
    let reported = tx.reported_ahead()?.map_or(0, |r| r.0);
    let epoch = next_epoch(tx.epoch()?, reported)?;
    tx.set_epoch(epoch)?;
    let (epoch, version) = tx.publish(&[], true)?;
    Ok((epoch, version, reported))
}

/// Notes the (epoch, version) a watching sidecar says it holds, when ahead of the state's
/// own (the store went back: restored, or failed over to a stale copy): the highest such
/// report is kept for [`raise_epoch`]. Returns the state's own (epoch, version).
pub fn note_reported(
    tx: &mut dyn Txn,
    seen: (u64, u64),
    sidecar: &str,
) -> Result<(u64, u64), ControlError> {
    let own = (tx.epoch()?, tx.version()?);
    if seen > own {
        let highest = tx.reported_ahead()?;
        if highest.is_none_or(|h| (h.0, h.1) < seen) {
            tx.set_reported_ahead(seen.0, seen.1, sidecar)?;
        }
    }
    Ok(own)
}

// --- agents ---

/// Registers a new agent; an existing one is refused, naming its status.
pub fn register_agent(tx: &mut dyn Txn, agent: &Agent) -> Result<Change<Agent>, ControlError> {
    if let Some(existing) = tx.agent(&agent.tenant, &agent.id, agent.created_at)? {
        return Err(ControlError::AlreadyExists(format!(
            "agent {}/{} is already registered ({})",
            agent.tenant, agent.id, existing.status
        )));
    }
    tx.insert_agent(agent)?;
    publish(tx, agent.clone(), vec![agent_item(agent)])
}

/// Moves an agent to `status`. Refused: an unknown agent, a revoked one (revoked is
/// final), a move to the status it has, and a restriction of a frozen agent (it would
/// loosen the freeze; judged in the transaction, so a restriction racing a freeze never
/// wins).
pub fn set_agent_status(
    tx: &mut dyn Txn,
    tenant: &str,
    id: &str,
    status: AgentStatus,
    reason: &str,
    actor: &str,
    now: i64,
) -> Result<Change<Agent>, ControlError> {
    let mut agent = tx
        .agent(tenant, id, now)?
        .ok_or_else(|| ControlError::not_found(format!("no agent {id} in tenant {tenant}")))?;
    let current = agent.status;
    if current == AgentStatus::Revoked {
        return Err(ControlError::precondition(format!(
            "agent {tenant}/{id} is revoked, which is final"
        )));
    }
    if current == status {
        return Err(ControlError::precondition(format!(
            "agent {tenant}/{id} is already {status}"
        )));
    }
    if status == AgentStatus::Restricted && current == AgentStatus::Frozen {
        return Err(ControlError::precondition(format!(
            "agent {tenant}/{id} is frozen; a restriction would loosen that (unfreeze it first)"
        )));
    }
    agent.status = status;
    agent.reason = reason.to_owned();
    agent.updated_at = now;
    agent.updated_by = actor.to_owned();
    tx.update_agent(&agent)?;
    let items = vec![agent_item(&agent)];
    publish(tx, agent, items)
}

// --- tokens ---

/// A tenant's tokens (of one agent), live ones only unless `all`.
pub fn tokens(
    tx: &mut dyn Txn,
    tenant: &str,
    agent: Option<&str>,
    all: bool,
    now: i64,
) -> Result<Vec<Token>, ControlError> {
    let live = (!all).then_some(now);
    tx.tokens(tenant, agent, live)
}

/// Revokes a live token (or one expired inside the slack: data planes accept it up to
/// their leeway past `exp`); refuses an unknown, revoked or long-expired one.
fn revoke_live(tx: &mut dyn Txn, jti: &str, reason: &str, now: i64) -> Result<Token, ControlError> {
    let mut token = tx.token(jti)?.ok_or_else(|| {
        ControlError::not_found(format!(
            "no token {jti} was issued by this control plane (kill its session or agent instead)"
        ))
    })?;
    let status = token.status(now);
    let revocable = status == TokenStatus::Live
        || (status == TokenStatus::Expired && token.expires_at > now - EXPIRED_SLACK_SECS);
    if !revocable {
        return Err(ControlError::precondition(format!(
            "token {jti} is already {status}"
        )));
    }
    tx.revoke_token(jti, now, reason)?;
    token.revoked = Some(super::records::Revocation {
        at: now,
        reason: reason.to_owned(),
    });
    Ok(token)
}

/// Revokes a live token; returns it as revoked.
pub fn revoke_token(
    tx: &mut dyn Txn,
    jti: &str,
    reason: &str,
    now: i64,
) -> Result<Change<Token>, ControlError> {
    let token = revoke_live(tx, jti, reason, now)?;
    let items = vec![revoked_item(&token)];
    publish(tx, token, items)
}

/// Stores `new` and revokes `old_jti` in one transaction; returns the old token.
pub fn rotate_token(
    tx: &mut dyn Txn,
    old_jti: &str,
    new: &Token,
    reason: &str,
    now: i64,
) -> Result<Change<Token>, ControlError> {
    let old = revoke_live(tx, old_jti, reason, now)?;
    tx.insert_token(new)?;
    let items = vec![revoked_item(&old)];
    publish(tx, old, items)
}

/// Records a kill mark (a later `before` than a stored one wins) and revokes, by id, the
/// tokens it covers that data planes may still accept: a token minted in the kill's own
/// second after an earlier kill carries a later `iat` than the mark. Counts what it hit.
/// Refused: a scope nothing was ever known in.
pub fn kill(
    tx: &mut dyn Txn,
    mark: &KillMark,
    reason: &str,
    actor: &str,
    now: i64,
) -> Result<Change<Killed>, ControlError> {
    use super::records::Scope;
    let scope = mark.scope;
    if !tx.scope_known(scope, &mark.tenant, &mark.target)? {
        let what = match scope {
            Scope::Session => format!(
                "no token was ever issued in session {} of tenant {}",
                mark.target, mark.tenant
            ),
            Scope::Agent => format!("no agent {} in tenant {}", mark.target, mark.tenant),
            Scope::Tenant | Scope::All => {
                format!("tenant {} has no agents, tokens or settings", mark.tenant)
            }
        };
        return Err(ControlError::not_found(format!("nothing to kill: {what}")));
    }
    let covered =
        tx.tokens_in_scope(scope, &mark.tenant, &mark.target, now - EXPIRED_SLACK_SECS)?;
    let mut items = vec![kill_item(mark)];
    items.extend(covered.iter().map(revoked_item));
    // Counted among the live ones only (an expired token inside the slack is revoked too,
    // but it was not a live session of the agent).
    let live: Vec<&Token> = covered.iter().filter(|t| t.expires_at > now).collect();
    let distinct = |key: &dyn Fn(&Token) -> String| {
        let mut keys: Vec<String> = live.iter().map(|t| key(t)).collect();
        keys.sort_unstable();
        keys.dedup();
        keys.len()
    };
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let value = Killed {
        mark: mark.clone(),
        tokens: n(live.len()),
        sessions: n(distinct(&|t| format!("{}/{}", t.tenant, t.session))),
        agents: n(distinct(&|t| format!("{}/{}", t.tenant, t.agent))),
        tenants: n(distinct(&|t| t.tenant.clone())),
    };
    let killed = format!("killed: {reason}");
    for t in &covered {
        tx.revoke_token(&t.jti, now, &killed)?;
    }
    let stored = tx.kill_mark(scope, &mark.tenant, &mark.target)?;
    let mut kept = mark.clone();
    kept.before = stored.map_or(mark.before, |s| s.before.max(mark.before));
    tx.put_kill_mark(&kept, reason, actor, now)?;
    publish(tx, value, items)
}

/// The latest kill mark covering a token of (tenant, agent, session), or `i64::MIN`.
pub fn kill_floor(
    tx: &mut dyn Txn,
    tenant: &str,
    agent: &str,
    session: &str,
) -> Result<i64, ControlError> {
    Ok(tx
        .kill_marks()?
        .iter()
        .filter(|k| k.covers(tenant, agent, session))
        .map(|k| k.before)
        .max()
        .unwrap_or(i64::MIN))
}

// --- tenants and budgets ---

/// Stores a tenant's settings.
pub fn put_tenant(tx: &mut dyn Txn, t: &Tenant) -> Result<Change<Tenant>, ControlError> {
    tx.put_tenant(t)?;
    publish(tx, t.clone(), vec![tenant_item(t)])
}

/// Sets an agent's budget; both limits 0 removes it.
pub fn put_budget(tx: &mut dyn Txn, b: &Budget) -> Result<Change<Budget>, ControlError> {
    if b.is_unlimited() {
        tx.delete_budget(&b.tenant, &b.agent)?;
    } else {
        tx.put_budget(b)?;
    }
    publish(tx, b.clone(), vec![budget_item(b)])
}

// --- approvals ---

/// Approvals, with their status judged at `now` and filtered on it.
pub fn approvals(
    tx: &mut dyn Txn,
    tenant: Option<&str>,
    status: Option<ApprovalStatus>,
    agent: Option<&str>,
    now: i64,
) -> Result<Vec<Approval>, ControlError> {
    Ok(tx
        .approvals(tenant, agent)?
        .into_iter()
        .map(|a| a.judged(now))
        .filter(|a| status.is_none_or(|s| a.status == s))
        .collect())
}

/// One approval, its status judged at `now`.
pub fn approval(
    tx: &mut dyn Txn,
    tenant: &str,
    id: &str,
    now: i64,
) -> Result<Option<Approval>, ControlError> {
    Ok(tx.approval(tenant, id)?.map(|a| a.judged(now)))
}

/// Raises a pending approval, or returns the pending one for the same call (and, with
/// `same_session`, the same session: an override is redeemed only in the session that
/// raised it, so another session's pending approval is of no use), or refuses when the
/// agent already has `max_pending` pending.
pub fn request_approval(
    tx: &mut dyn Txn,
    a: &Approval,
    max_pending: u32,
    same_session: bool,
    now: i64,
) -> Result<pb::RequestApprovalResponse, ControlError> {
    let pending: Vec<Approval> = approvals(
        tx,
        Some(&a.tenant),
        Some(ApprovalStatus::Pending),
        Some(&a.agent),
        now,
    )?;
    if let Some(same) = pending
        .iter()
        .find(|p| p.call_hash == a.call_hash && (!same_session || p.session == a.session))
    {
        return Ok(pb::RequestApprovalResponse {
            approval_id: same.id.clone(),
            created: false,
            cap_reached: false,
        });
    }
    if pending.len() >= usize::try_from(max_pending).unwrap_or(usize::MAX) {
        return Ok(pb::RequestApprovalResponse {
            approval_id: String::new(),
            created: false,
            cap_reached: true,
        });
    }
    let mut stored = a.clone();
    stored.status = ApprovalStatus::Pending;
    stored.decided_by.clear();
    stored.decided_at = 0;
    stored.decision_reason.clear();
    stored.override_expires_at = 0;
    stored.used_at = 0;
    stored.used_by_decision.clear();
    tx.insert_approval(&stored)?;
    Ok(pb::RequestApprovalResponse {
        approval_id: a.id.clone(),
        created: true,
        cap_reached: false,
    })
}

/// Approves or denies a pending, unexpired approval; `None` if it is not one.
#[allow(clippy::too_many_arguments)]
pub fn decide_approval(
    tx: &mut dyn Txn,
    tenant: &str,
    id: &str,
    approve: bool,
    actor: &str,
    reason: &str,
    override_expires_at: i64,
    now: i64,
) -> Result<Option<Approval>, ControlError> {
    let Some(mut a) = approval(tx, tenant, id, now)? else {
        return Ok(None);
    };
    if a.status != ApprovalStatus::Pending {
        return Ok(None);
    }
    a.status = if approve {
        ApprovalStatus::Approved
    } else {
        ApprovalStatus::Denied
    };
    a.decided_by = actor.to_owned();
    a.decided_at = now;
    a.decision_reason = reason.to_owned();
    a.override_expires_at = override_expires_at;
    tx.update_approval(&a)?;
    Ok(Some(a.judged(now)))
}

/// Marks an approved approval with an unexpired override used; false if it is not one.
pub fn use_approval(
    tx: &mut dyn Txn,
    tenant: &str,
    id: &str,
    decision_id: &str,
    now: i64,
) -> Result<bool, ControlError> {
    let Some(mut a) = approval(tx, tenant, id, now)? else {
        return Ok(false);
    };
    if a.status != ApprovalStatus::Approved {
        return Ok(false);
    }
    a.status = ApprovalStatus::Used;
    a.used_at = now;
    a.used_by_decision = decision_id.to_owned();
    tx.update_approval(&a)?;
    Ok(true)
}

// --- policy ---

/// Stores the bundle (if new) and appends an activation to the history.
pub fn activate_policy(
    tx: &mut dyn Txn,
    rev: &Revision,
    bundle: &[u8],
) -> Result<Change<Revision>, ControlError> {
    tx.store_bundle(&rev.digest, &rev.revision, bundle, rev.activated_at)?;
    let mut value = rev.clone();
    value.id = tx.append_revision(rev)?;
    let items = vec![policy_item(&rev.revision, &rev.digest)];
    publish(tx, value, items)
}

/// What a starting replica's configured bundle is, judged against the shared history.
#[derive(Debug)]
pub enum Reconciled {
    /// It is the active revision.
    Active,
    /// It was never activated: it is now (the change, to publish).
    Activated(Change<Revision>),
    /// It was activated before and something else since (a push, a rollback, another
    /// replica's newer configuration): the active revision stays, and is the one to run.
    Superseded(Revision),
}

/// Reconciles a starting replica's configured bundle with the history, in one
/// transaction (two replicas starting at once, or one starting while an operator pushes,
/// judge what is committed). Only a bundle the history never saw is activated: a replica
/// restarted with an older configuration (a rolling update's old pod) must not take every
/// replica back to it; going back is an explicit rollback.
pub fn reconcile_policy(
    tx: &mut dyn Txn,
    configured: &Revision,
    bundle: &[u8],
) -> Result<Reconciled, ControlError> {
    let history = tx.revisions(u32::MAX)?;
    match history.first() {
        Some(active) if active.digest == configured.digest => Ok(Reconciled::Active),
        Some(active) if history.iter().any(|r| r.digest == configured.digest) => {
            Ok(Reconciled::Superseded(active.clone()))
        }
        _ => activate_policy(tx, configured, bundle).map(Reconciled::Activated),
    }
}

/// The newest `limit` activations, newest first; the newest is the active one.
pub fn policy_history(tx: &mut dyn Txn, limit: u32) -> Result<Vec<Revision>, ControlError> {
    tx.revisions(limit)
}

// --- incidents ---

/// Stores an incident and, in the same transaction, its webhook notifications (url,
/// payload) in the outbox: none is lost if the process stops right after.
pub fn insert_incident(
    tx: &mut dyn Txn,
    incident: &Incident,
    notifications: &[(String, String)],
) -> Result<(), ControlError> {
    tx.insert_incident(incident)?;
    let now_ms = incident.created_at_ns / 1_000_000;
    for (url, payload) in notifications {
        tx.insert_notification(incident, url, payload, now_ms)?;
    }
    Ok(())
}

/// Acknowledges (from open) or closes (from open or acknowledged) an incident; `None`
/// if it is not in a state that allows it.
pub fn set_incident_status(
    tx: &mut dyn Txn,
    tenant: &str,
    id: &str,
    status: IncidentStatus,
    actor: &str,
    reason: &str,
    now: i64,
) -> Result<Option<Incident>, ControlError> {
    let Some(mut i) = tx.incident(tenant, id)? else {
        return Ok(None);
    };
    match (i.status, status) {
        (IncidentStatus::Open, IncidentStatus::Acknowledged) => {
            i.acknowledged_by = actor.to_owned();
        }
        (IncidentStatus::Open | IncidentStatus::Acknowledged, IncidentStatus::Closed) => {
            i.closed_by = actor.to_owned();
            i.close_reason = reason.to_owned();
        }
        _ => return Ok(None),
    }
    i.status = status;
    i.updated_at = now;
    tx.update_incident(&i)?;
    tx.append_incident_event(status.as_str(), tenant, id)?;
    Ok(Some(i))
}

/// Appends what the response engine did to an incident, and tells the incident feed it
/// was raised.
pub fn add_incident_actions(
    tx: &mut dyn Txn,
    tenant: &str,
    id: &str,
    actions: &[String],
) -> Result<(), ControlError> {
    let mut i = tx
        .incident(tenant, id)?
        .ok_or_else(|| ControlError::not_found(format!("no incident {id} in tenant {tenant}")))?;
    i.actions.extend(actions.iter().cloned());
    tx.update_incident(&i)?;
    // Raised, with what was done: now every replica's incident watchers are told.
    tx.append_incident_event("raised", tenant, id).map(|_| ())
}

/// Takes the notifications due at `now_ms` (at most `limit`) for delivery by this
/// replica: each is pushed into the future in the same transaction, so another replica's
/// notifier does not send it too; if this one dies before recording the attempt, another
/// sends it when the lease ends. The claimer posts them one after another, each allowed
/// `per_row_ms`: the `i`th (from 0) is leased `(i + 1) * per_row_ms + margin_ms`, so the
/// last is still this replica's when its turn comes. Returns the rows as claimed (their
/// `next_at_ms` is the lease, which [`notification_attempted`] checks).
pub fn claim_due_notifications(
    tx: &mut dyn Txn,
    now_ms: i64,
    limit: usize,
    per_row_ms: i64,
    margin_ms: i64,
) -> Result<Vec<Outbox>, ControlError> {
    let due = tx.due_notifications(now_ms, limit)?;
    let mut claimed = Vec::with_capacity(due.len());
    for (i, n) in due.into_iter().enumerate() {
        let turn = i64::try_from(i).unwrap_or(i64::MAX).saturating_add(1);
        let mut row = n;
        row.next_at_ms = now_ms
            .saturating_add(turn.saturating_mul(per_row_ms))
            .saturating_add(margin_ms);
        tx.update_notification(&row, 0)?;
        claimed.push(row);
    }
    Ok(claimed)
}

/// Records a delivery attempt of a row this replica claimed (`n` as claimed): delivered,
/// retry at `next_at_ms`, or given up (`next_at_ms` None and not delivered). Returns false,
/// recording nothing, when the claim was lost meanwhile (its lease ended and another
/// replica took the row, or recorded it): a late answer never undoes another's delivery
/// or counts an attempt twice. The stored row is read again, so a payload refreshed
/// meanwhile is kept.
pub fn notification_attempted(
    tx: &mut dyn Txn,
    n: &Outbox,
    delivered: bool,
    next_at_ms: Option<i64>,
    error: &str,
    now_ms: i64,
) -> Result<bool, ControlError> {
    let (state, next, done) = match (delivered, next_at_ms) {
        (true, _) => ("delivered", now_ms, now_ms),
        (false, Some(at)) => ("pending", at, 0),
        (false, None) => ("failed", now_ms, now_ms),
    };
    let Some(mut stored) = tx
        .notifications(&n.incident)?
        .into_iter()
        .find(|stored| stored.id == n.id)
    else {
        return Ok(false);
    };
    if stored.state != "pending" || stored.next_at_ms != n.next_at_ms {
        return Ok(false);
    }
    stored.state = state.into();
    stored.attempts = stored.attempts.saturating_add(1);
    stored.next_at_ms = next;
    stored.last_error = error.to_owned();
    tx.update_notification(&stored, done)?;
    Ok(true)
}

/// Replaces the payloads of an incident's notifications not yet attempted (after the
/// response engine acted, so they say what it did).
pub fn refresh_notifications(
    tx: &mut dyn Txn,
    incident: &str,
    notifications: &[(String, String)],
) -> Result<(), ControlError> {
    for mut n in tx.notifications(incident)? {
        if n.state != "pending" || n.attempts != 0 {
            continue;
        }
        if let Some((_, payload)) = notifications.iter().find(|(url, _)| *url == n.url) {
            n.payload.clone_from(payload);
            tx.update_notification(&n, 0)?;
        }
    }
    Ok(())
}
