//! How `aegis ctl` prints what the control plane answers: tables and texts.

use super::*;

/// Control characters (terminal escapes in a tool name an agent chose) shown as `?`.
pub(super) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

pub(super) fn incident_text(i: &pb::Incident) -> String {
    printable(&format!(
        "incident:  {}\nkind:      {} ({})\nagent:     {}/{} (session {}, run {})\nsummary:   {}\nevidence:  {}\nstatus:    {}{}{}\nraised:    {} at L{} by {} (policy {})\nactions:   {}\nnotified:  {}\n{}",
        i.id,
        i.kind,
        i.severity,
        i.tenant,
        i.agent,
        i.session,
        i.run_id,
        i.summary,
        i.evidence.join(", "),
        i.status,
        if i.acknowledged_by.is_empty() {
            String::new()
        } else {
            format!(", acknowledged by {}", i.acknowledged_by)
        },
        if i.closed_by.is_empty() {
            String::new()
        } else {
            format!(", closed by {}: {}", i.closed_by, i.close_reason)
        },
        secs_or_dash(i.created_at_ns / 1_000_000_000),
        i.autonomy_level,
        i.reported_by,
        i.policy_revision,
        i.actions.join("; "),
        if i.notifications.is_empty() {
            "-".to_owned()
        } else {
            i.notifications.join("; ")
        },
        i.decisions
            .iter()
            .map(|d| format!(
                "  {} {} {}.{} -> {} ({}{})\n",
                secs_or_dash(d.time_ns / 1_000_000_000),
                d.decision_id,
                d.tool,
                d.action,
                d.decision,
                d.reason,
                if d.trust_level.is_empty() {
                    String::new()
                } else {
                    format!(", {}", d.trust_level)
                }
            ))
            .collect::<String>()
    ))
}

pub(super) fn incident_table(incidents: &[pb::Incident]) -> String {
    table(
        &[
            "ID", "KIND", "SEVERITY", "AGENT", "STATUS", "RAISED", "ACTIONS", "SUMMARY",
        ],
        incidents
            .iter()
            .map(|i| {
                vec![
                    i.id.clone(),
                    i.kind.clone(),
                    i.severity.clone(),
                    format!("{}/{}", i.tenant, i.agent),
                    i.status.clone(),
                    secs_or_dash(i.created_at_ns / 1_000_000_000),
                    i.actions.join("; "),
                    i.summary.clone(),
                ]
            })
            .collect(),
    )
}

// === tables ===

pub(super) fn agent_table(agents: &[pb::Agent]) -> String {
    table(
        &[
            "TENANT", "AGENT", "STATUS", "RISK", "TOKENS", "UPDATED", "BY", "REASON",
        ],
        agents
            .iter()
            .map(|a| {
                vec![
                    a.tenant.clone(),
                    a.id.clone(),
                    a.status.clone(),
                    a.risk_tier.clone(),
                    a.live_tokens.to_string(),
                    secs_or_dash(a.updated_at),
                    a.updated_by.clone(),
                    a.reason.clone(),
                ]
            })
            .collect(),
    )
}

pub(super) fn token_table(tokens: &[pb::TokenInfo]) -> String {
    table(
        &[
            "JTI", "AGENT", "SESSION", "STATUS", "SCOPES", "ISSUED", "EXPIRES", "REVOKED",
        ],
        tokens
            .iter()
            .map(|t| {
                vec![
                    t.jti.clone(),
                    format!("{}/{}", t.tenant, t.agent),
                    t.session.clone(),
                    t.status.clone(),
                    t.scopes.join(","),
                    secs_or_dash(t.issued_at),
                    secs_or_dash(t.expires_at),
                    if t.revoked_at == 0 {
                        String::new()
                    } else {
                        format!("{} ({})", secs_or_dash(t.revoked_at), t.revoked_reason)
                    },
                ]
            })
            .collect(),
    )
}

pub(super) fn approval_table(approvals: &[pb::Approval]) -> String {
    table(
        &[
            "ID",
            "AGENT",
            "CALL",
            "STATUS",
            "REASON",
            "CREATED",
            "EXPIRES",
            "DECIDED BY",
        ],
        approvals
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    format!("{}/{}", a.tenant, a.agent),
                    format!("{}.{} {}", a.tool, a.action, a.resource),
                    a.status.clone(),
                    a.policy_reason.clone(),
                    secs_or_dash(a.created_at),
                    secs_or_dash(a.expires_at),
                    a.decided_by.clone(),
                ]
            })
            .collect(),
    )
}

pub(super) fn approval_text(a: &pb::Approval) -> String {
    format!(
        "approval:  {}\nagent:     {}/{} (session {}, run {})\ncall:      {}.{} {}\narguments: {}\ncall hash: {}\nreason:    {}\nstatus:    {}\ncreated:   {} (decision {})\nexpires:   {}\ndecided:   {}\n{}",
        a.id,
        a.tenant,
        a.agent,
        a.session,
        a.run_id,
        a.tool,
        a.action,
        a.resource,
        a.arguments,
        a.call_hash,
        a.policy_reason,
        a.status,
        secs_or_dash(a.created_at),
        a.decision_id,
        secs_or_dash(a.expires_at),
        if a.decided_by.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} by {}: {}",
                secs_or_dash(a.decided_at),
                a.decided_by,
                a.decision_reason
            )
        },
        if a.used_at == 0 {
            String::new()
        } else {
            format!(
                "used:      {} by decision {}\n",
                secs_or_dash(a.used_at),
                a.used_by_decision
            )
        }
    )
}

pub(super) fn budget_table(budgets: &[pb::Budget]) -> String {
    table(
        &[
            "AGENT",
            "MAX CALLS",
            "MAX COST",
            "WINDOW",
            "USED CALLS",
            "USED COST",
            "UPDATED BY",
        ],
        budgets
            .iter()
            .map(|b| {
                let used = |v: String| if b.usage_known { v } else { "-".into() };
                vec![
                    format!("{}/{}", b.tenant, b.agent),
                    if b.max_calls == 0 {
                        "-".into()
                    } else {
                        b.max_calls.to_string()
                    },
                    if b.max_cost == 0.0 {
                        "-".into()
                    } else {
                        b.max_cost.to_string()
                    },
                    format!("{}s", b.window_secs),
                    used(b.used_calls.to_string()),
                    used(b.used_cost.to_string()),
                    b.updated_by.clone(),
                ]
            })
            .collect(),
    )
}

pub(super) fn revision_table(revisions: &[pb::PolicyRevision]) -> String {
    table(
        &[
            "ID", "", "REVISION", "DIGEST", "ACTION", "BY", "AT", "REASON",
        ],
        revisions
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    if r.active { "*".into() } else { String::new() },
                    r.revision.clone(),
                    r.digest.chars().take(19).collect(),
                    r.action.clone(),
                    r.actor.clone(),
                    secs_or_dash(r.activated_at),
                    r.reason.clone(),
                ]
            })
            .collect(),
    )
}

/// Left-aligned columns, two spaces apart.
pub(super) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::time::secs_or_dash as time;

    #[test]
    fn times_print_as_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1), "1970-01-01T00:00:01Z");
        assert_eq!(time(1_795_965_739), "2026-11-29T15:22:19Z");
        assert_eq!(time(951_782_400), "2000-02-29T00:00:00Z");
    }
}
