//! PostgreSQL rows to records. A stored word that is not one of its vocabulary's (a
//! status, a severity, a mode) or an unknown kill scope is an error naming the value,
//! never a silent default.

use super::*;
use tokio_postgres::types::{FromSql, Type};

/// A stored word of one of [`crate::types`]'s vocabularies.
struct Word<T>(T);

impl<'a, T: std::str::FromStr<Err = crate::types::UnknownWord>> FromSql<'a> for Word<T> {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = <&str as FromSql>::from_sql(ty, raw)?;
        Ok(Word(text.parse()?))
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

/// The word in column `i`.
fn word<T: std::str::FromStr<Err = crate::types::UnknownWord>>(
    r: &Row,
    i: usize,
) -> Result<T, tokio_postgres::Error> {
    r.try_get::<_, Word<T>>(i).map(|w| w.0)
}

/// A stored kill scope code.
struct Code(Scope);

impl<'a> FromSql<'a> for Code {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let code = <i32 as FromSql>::from_sql(ty, raw)?;
        Scope::from_code(code).map(Code).ok_or_else(|| {
            format!("kill scope {code} is not session (2), agent (3), tenant (4) or all (5)").into()
        })
    }

    fn accepts(ty: &Type) -> bool {
        <i32 as FromSql>::accepts(ty)
    }
}

pub(super) fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

pub(super) fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

pub(super) fn agent_row(r: &Row) -> Result<Agent, tokio_postgres::Error> {
    Ok(Agent {
        tenant: r.try_get(0)?,
        id: r.try_get(1)?,
        status: word(r, 2)?,
        risk_tier: r.try_get(3)?,
        reason: r.try_get(4)?,
        created_at: r.try_get(5)?,
        updated_at: r.try_get(6)?,
        updated_by: r.try_get(7)?,
        live_tokens: u32_of(r.try_get(8)?),
    })
}

pub(super) fn token_row(r: &Row) -> Result<Token, tokio_postgres::Error> {
    let scopes: String = r.try_get(4)?;
    let revoked_at: Option<i64> = r.try_get(7)?;
    let revoked = match revoked_at {
        Some(at) => Some(Revocation {
            at,
            reason: r.try_get(8)?,
        }),
        None => None,
    };
    Ok(Token {
        jti: r.try_get(0)?,
        tenant: r.try_get(1)?,
        agent: r.try_get(2)?,
        session: r.try_get(3)?,
        scopes: json_list(&scopes),
        issued_at: r.try_get(5)?,
        expires_at: r.try_get(6)?,
        revoked,
    })
}

pub(super) fn kill_row(r: &Row) -> Result<KillMark, tokio_postgres::Error> {
    Ok(KillMark {
        scope: r.try_get::<_, Code>(0)?.0,
        tenant: r.try_get(1)?,
        target: r.try_get(2)?,
        before: r.try_get(3)?,
    })
}

pub(super) fn tenant_row(r: &Row) -> Result<Tenant, tokio_postgres::Error> {
    Ok(Tenant {
        name: r.try_get(0)?,
        mode: word(r, 1)?,
        autonomy_level: u32_of(r.try_get(2)?),
        updated_at: r.try_get(3)?,
        updated_by: r.try_get(4)?,
    })
}

pub(super) fn budget_row(r: &Row) -> Result<Budget, tokio_postgres::Error> {
    let calls: i64 = r.try_get(2)?;
    let window: i64 = r.try_get(4)?;
    Ok(Budget {
        tenant: r.try_get(0)?,
        agent: r.try_get(1)?,
        max_calls: u64::try_from(calls).unwrap_or(0),
        max_cost: r.try_get(3)?,
        window_secs: u64::try_from(window).unwrap_or(0),
        updated_at: r.try_get(5)?,
        updated_by: r.try_get(6)?,
    })
}

pub(super) fn approval_row(r: &Row) -> Result<Approval, tokio_postgres::Error> {
    Ok(Approval {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        agent: r.try_get(2)?,
        session: r.try_get(3)?,
        run_id: r.try_get(4)?,
        tool: r.try_get(5)?,
        action: r.try_get(6)?,
        resource: r.try_get(7)?,
        arguments: r.try_get(8)?,
        call_hash: r.try_get(9)?,
        policy_reason: r.try_get(10)?,
        decision_id: r.try_get(11)?,
        status: word(r, 12)?,
        created_at: r.try_get(13)?,
        expires_at: r.try_get(14)?,
        decided_by: r.try_get(15)?,
        decided_at: r.try_get(16)?,
        decision_reason: r.try_get(17)?,
        override_expires_at: r.try_get(18)?,
        used_at: r.try_get(19)?,
        used_by_decision: r.try_get(20)?,
    })
}

pub(super) fn revision_row(r: &Row) -> Result<Revision, tokio_postgres::Error> {
    let id: i64 = r.try_get(0)?;
    Ok(Revision {
        id: u64::try_from(id).unwrap_or(0),
        revision: r.try_get(1)?,
        digest: r.try_get(2)?,
        action: r.try_get(3)?,
        actor: r.try_get(4)?,
        reason: r.try_get(5)?,
        activated_at: r.try_get(6)?,
    })
}

pub(super) fn incident_row(r: &Row) -> Result<Incident, tokio_postgres::Error> {
    let evidence: String = r.try_get(8)?;
    let actions: String = r.try_get(17)?;
    let decisions: String = r.try_get(21)?;
    Ok(Incident {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        agent: r.try_get(2)?,
        session: r.try_get(3)?,
        run_id: r.try_get(4)?,
        kind: r.try_get(5)?,
        severity: word(r, 6)?,
        summary: r.try_get(7)?,
        evidence: json_list(&evidence),
        trigger_decision: r.try_get(9)?,
        decided_at_ns: r.try_get(10)?,
        status: word(r, 11)?,
        created_at_ns: r.try_get(12)?,
        updated_at: r.try_get(13)?,
        acknowledged_by: r.try_get(14)?,
        closed_by: r.try_get(15)?,
        close_reason: r.try_get(16)?,
        actions: json_list(&actions),
        autonomy_level: u32_of(r.try_get(18)?),
        reported_by: r.try_get(19)?,
        policy_revision: r.try_get(20)?,
        decisions: serde_json::from_str(&decisions).unwrap_or_default(),
    })
}

pub(super) fn outbox_row(r: &Row) -> Result<Outbox, tokio_postgres::Error> {
    let attempts: i32 = r.try_get(6)?;
    Ok(Outbox {
        id: r.try_get(0)?,
        incident: r.try_get(1)?,
        tenant: r.try_get(2)?,
        url: r.try_get(3)?,
        payload: r.try_get(4)?,
        state: r.try_get(5)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_at_ms: r.try_get(7)?,
        last_error: r.try_get(8)?,
    })
}
