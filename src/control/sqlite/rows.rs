//! SQLite rows to records. A stored word that is not one of its vocabulary's (a status,
//! a severity, a mode) or an unknown kill scope is an error naming the column and value,
//! never a silent default.

use super::*;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};

/// A stored word of one of [`crate::types`]'s vocabularies.
struct Word<T>(T);

impl<T: std::str::FromStr<Err = crate::types::UnknownWord>> FromSql for Word<T> {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        text.parse()
            .map(Word)
            .map_err(|e: crate::types::UnknownWord| FromSqlError::Other(Box::new(e)))
    }
}

/// The word in column `i`.
fn word<T: std::str::FromStr<Err = crate::types::UnknownWord>>(
    r: &Row<'_>,
    i: usize,
) -> rusqlite::Result<T> {
    r.get::<_, Word<T>>(i).map(|w| w.0)
}

pub(super) fn outbox_row(r: &Row<'_>) -> rusqlite::Result<Outbox> {
    Ok(Outbox {
        id: r.get(0)?,
        incident: r.get(1)?,
        tenant: r.get(2)?,
        url: r.get(3)?,
        payload: r.get(4)?,
        state: r.get(5)?,
        attempts: r.get(6)?,
        next_at_ms: r.get(7)?,
        last_error: r.get(8)?,
    })
}

pub(super) fn agent_row(r: &Row<'_>) -> rusqlite::Result<Agent> {
    Ok(Agent {
        tenant: r.get(0)?,
        id: r.get(1)?,
        status: word(r, 2)?,
        risk_tier: r.get(3)?,
        reason: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        updated_by: r.get(7)?,
        live_tokens: r
            .get::<_, i64>(8)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))?,
    })
}

pub(super) fn token_row(r: &Row<'_>) -> rusqlite::Result<Token> {
    let scopes: String = r.get(4)?;
    let revoked_at: Option<i64> = r.get(7)?;
    let revoked = match revoked_at {
        Some(at) => Some(Revocation {
            at,
            reason: r.get(8)?,
        }),
        None => None,
    };
    Ok(Token {
        jti: r.get(0)?,
        tenant: r.get(1)?,
        agent: r.get(2)?,
        session: r.get(3)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        issued_at: r.get(5)?,
        expires_at: r.get(6)?,
        revoked,
    })
}

pub(super) fn approval_row(r: &Row<'_>) -> rusqlite::Result<Approval> {
    Ok(Approval {
        id: r.get(0)?,
        tenant: r.get(1)?,
        agent: r.get(2)?,
        session: r.get(3)?,
        run_id: r.get(4)?,
        tool: r.get(5)?,
        action: r.get(6)?,
        resource: r.get(7)?,
        arguments: r.get(8)?,
        call_hash: r.get(9)?,
        policy_reason: r.get(10)?,
        decision_id: r.get(11)?,
        status: word(r, 12)?,
        created_at: r.get(13)?,
        expires_at: r.get(14)?,
        decided_by: r.get(15)?,
        decided_at: r.get(16)?,
        decision_reason: r.get(17)?,
        override_expires_at: r.get(18)?,
        used_at: r.get(19)?,
        used_by_decision: r.get(20)?,
    })
}

pub(super) fn revision_row(r: &Row<'_>) -> rusqlite::Result<Revision> {
    let id: i64 = r.get(0)?;
    Ok(Revision {
        id: u64::try_from(id).unwrap_or(0),
        revision: r.get(1)?,
        digest: r.get(2)?,
        action: r.get(3)?,
        actor: r.get(4)?,
        reason: r.get(5)?,
        activated_at: r.get(6)?,
    })
}

pub(super) fn collect<T>(
    rows: rusqlite::MappedRows<'_, impl FnMut(&Row<'_>) -> rusqlite::Result<T>>,
) -> Result<Vec<T>, ControlError> {
    rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
}

pub(super) fn incident_row(r: &Row<'_>) -> rusqlite::Result<Incident> {
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let text: String = r.get(i)?;
        Ok(serde_json::from_str(&text).unwrap_or_default())
    };
    Ok(Incident {
        id: r.get(0)?,
        tenant: r.get(1)?,
        agent: r.get(2)?,
        session: r.get(3)?,
        run_id: r.get(4)?,
        kind: r.get(5)?,
        severity: word(r, 6)?,
        summary: r.get(7)?,
        evidence: list(8)?,
        trigger_decision: r.get(9)?,
        decided_at_ns: r.get(10)?,
        status: word(r, 11)?,
        created_at_ns: r.get(12)?,
        updated_at: r.get(13)?,
        acknowledged_by: r.get(14)?,
        closed_by: r.get(15)?,
        close_reason: r.get(16)?,
        actions: list(17)?,
        autonomy_level: r.get(18)?,
        reported_by: r.get(19)?,
        policy_revision: r.get(20)?,
        decisions: {
            let text: String = r.get(21)?;
            serde_json::from_str(&text).unwrap_or_default()
        },
    })
}

pub(super) fn budget_row(r: &Row<'_>) -> rusqlite::Result<Budget> {
    let calls: i64 = r.get(2)?;
    let window: i64 = r.get(4)?;
    Ok(Budget {
        tenant: r.get(0)?,
        agent: r.get(1)?,
        max_calls: u64::try_from(calls).unwrap_or(0),
        max_cost: r.get(3)?,
        window_secs: u64::try_from(window).unwrap_or(0),
        updated_at: r.get(5)?,
        updated_by: r.get(6)?,
    })
}

pub(super) fn tenant_row(r: &Row<'_>) -> rusqlite::Result<Tenant> {
    Ok(Tenant {
        name: r.get(0)?,
        mode: word(r, 1)?,
        autonomy_level: r.get(2)?,
        updated_at: r.get(3)?,
        updated_by: r.get(4)?,
    })
}

pub(super) fn kill_row(r: &Row<'_>) -> rusqlite::Result<KillMark> {
    let code: i32 = r.get(0)?;
    let scope = Scope::from_code(code).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Integer,
            format!("kill scope {code} is not session (2), agent (3), tenant (4) or all (5)")
                .into(),
        )
    })?;
    Ok(KillMark {
        scope,
        tenant: r.get(1)?,
        target: r.get(2)?,
        before: r.get(3)?,
    })
}
