//! The evidence graph of an incident, and the incident watch.
//!
//! incident → its decisions → the agent (and session, run) → the agent's tokens and
//! approvals → the policy revision the decisions were made under; plus what the response
//! engine did. Built by the control plane from what it stores (the decisions as the data
//! plane reported them), rendered by `aegis ctl incidents graph` as JSON, Graphviz DOT or
//! Mermaid.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::auth::Operator;
use super::core::ControlCore;
use super::rules;
use super::{ControlError, now_secs, pb};
use crate::types::Action;

/// Most tokens and approvals of the agent drawn (the newest).
const MAX_RELATED: usize = 20;

struct Builder {
    nodes: Vec<pb::GraphNode>,
    edges: Vec<pb::GraphEdge>,
}

impl Builder {
    fn node(&mut self, id: String, kind: &str, label: String, attrs: &[(&str, String)]) {
        if self.nodes.iter().any(|n| n.id == id) {
            return;
        }
        self.nodes.push(pb::GraphNode {
            id,
            kind: kind.into(),
            label,
            attributes: attrs
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        });
    }

    fn edge(&mut self, from: &str, to: &str, label: &str) {
        self.edges.push(pb::GraphEdge {
            from: from.into(),
            to: to.into(),
            label: label.into(),
        });
    }
}

fn time(secs: i64) -> String {
    if secs == 0 {
        String::new()
    } else {
        crate::time::rfc3339(secs, 0)
    }
}

impl ControlCore {
    /// The evidence graph of one incident (tenant-scoped like the incident).
    pub async fn incident_graph(
        &self,
        op: &Operator,
        req: pb::IncidentRef,
    ) -> Result<pb::IncidentGraph, ControlError> {
        // get_incident checks the caller may read the incident's tenant.
        let incident = self.get_incident(op, req).await?;
        let (t, a, rev) = (
            incident.tenant.clone(),
            incident.agent.clone(),
            incident.policy_revision.clone(),
        );
        let now = now_secs();
        let (agent, tokens, approvals, revisions) = self
            .run(move |tx| {
                Ok((
                    tx.agent(&t, &a, now)?,
                    rules::tokens(tx, &t, Some(&a), true, now)?,
                    rules::approvals(tx, Some(&t), None, Some(&a), now)?,
                    rules::policy_history(tx, 1000)?
                        .into_iter()
                        .enumerate()
                        .filter(|(_, r)| r.revision == rev)
                        .collect::<Vec<_>>(),
                ))
            })
            .await?;
        use crate::control::wire;
        let agent = agent.map(wire::agent);
        let tokens: Vec<_> = tokens.into_iter().map(|t| wire::token(t, now)).collect();
        let approvals: Vec<_> = approvals.into_iter().map(wire::approval).collect();
        let revisions: Vec<_> = revisions
            .into_iter()
            .map(|(i, r)| wire::revision(r, i == 0))
            .collect();
        Ok(build(
            &incident,
            agent.as_ref(),
            &tokens,
            &approvals,
            &revisions,
        ))
    }
}

/// Lays the graph out from what the store holds.
pub fn build(
    i: &pb::Incident,
    agent: Option<&pb::Agent>,
    tokens: &[pb::TokenInfo],
    approvals: &[pb::Approval],
    revisions: &[pb::PolicyRevision],
) -> pb::IncidentGraph {
    let mut g = Builder {
        nodes: Vec::new(),
        edges: Vec::new(),
    };
    let inc = format!("incident:{}", i.id);
    g.node(
        inc.clone(),
        "incident",
        format!("{} {} ({})", i.id, i.kind, i.severity),
        &[
            ("status", i.status.clone()),
            ("summary", i.summary.clone()),
            ("autonomy_level", format!("L{}", i.autonomy_level)),
            ("reported_by", i.reported_by.clone()),
        ],
    );
    let agent_id = format!("agent:{}/{}", i.tenant, i.agent);
    g.node(
        agent_id.clone(),
        "agent",
        format!("{}/{}", i.tenant, i.agent),
        &[
            (
                "status",
                agent.map(|a| a.status.clone()).unwrap_or_default(),
            ),
            (
                "risk_tier",
                agent.map(|a| a.risk_tier.clone()).unwrap_or_default(),
            ),
        ],
    );
    g.edge(&inc, &agent_id, "concerns");
    // The decisions, with details when the data plane reported them.
    let details: BTreeMap<&str, &pb::EvidenceDecision> = i
        .decisions
        .iter()
        .map(|d| (d.decision_id.as_str(), d))
        .collect();
    for id in &i.evidence {
        let node = format!("decision:{id}");
        let (label, attrs) = match details.get(id.as_str()) {
            Some(d) => (
                format!("{}.{} → {}", d.tool, d.action, d.decision),
                vec![
                    ("decision_id", id.clone()),
                    ("reason", d.reason.clone()),
                    ("trust_level", d.trust_level.clone()),
                    ("time", time(d.time_ns / 1_000_000_000)),
                ],
            ),
            None => (id.clone(), vec![("decision_id", id.clone())]),
        };
        g.node(node.clone(), "decision", label, &attrs);
        let label = if *id == i.trigger_decision {
            "evidence (completed the pattern)"
        } else {
            "evidence"
        };
        g.edge(&inc, &node, label);
        g.edge(&node, &agent_id, "made by");
        let (session, run) = details
            .get(id.as_str())
            .map_or((i.session.as_str(), i.run_id.as_str()), |d| {
                (d.session.as_str(), d.run_id.as_str())
            });
        if !run.is_empty() {
            let run_node = format!("run:{run}");
            g.node(run_node.clone(), "run", format!("run {run}"), &[]);
            g.edge(&node, &run_node, "in run");
        }
        if !session.is_empty() {
            let s = format!("session:{session}");
            g.node(s.clone(), "session", format!("session {session}"), &[]);
            g.edge(&node, &s, "in session");
        }
    }
    let mut tokens: Vec<&pb::TokenInfo> = tokens.iter().collect();
    tokens.sort_by_key(|t| std::cmp::Reverse(t.issued_at));
    for t in tokens.into_iter().take(MAX_RELATED) {
        let node = format!("token:{}", t.jti);
        g.node(
            node.clone(),
            "token",
            format!("token {} ({})", t.jti, t.status),
            &[
                ("session", t.session.clone()),
                ("issued_at", time(t.issued_at)),
                ("revoked_reason", t.revoked_reason.clone()),
            ],
        );
        g.edge(&agent_id, &node, "holds");
        if !t.session.is_empty()
            && g.nodes
                .iter()
                .any(|n| n.id == format!("session:{}", t.session))
        {
            g.edge(&node, &format!("session:{}", t.session), "for session");
        }
    }
    let mut approvals: Vec<&pb::Approval> = approvals.iter().collect();
    approvals.sort_by_key(|a| std::cmp::Reverse(a.created_at));
    for a in approvals.into_iter().take(MAX_RELATED) {
        let node = format!("approval:{}", a.id);
        g.node(
            node.clone(),
            "approval",
            format!("approval {} {}.{} ({})", a.id, a.tool, a.action, a.status),
            &[
                ("decided_by", a.decided_by.clone()),
                ("created_at", time(a.created_at)),
            ],
        );
        g.edge(&agent_id, &node, "requested");
        let from_decision = format!("decision:{}", a.decision_id);
        if g.nodes.iter().any(|n| n.id == from_decision) {
            g.edge(&from_decision, &node, "raised");
        }
    }
    if !i.policy_revision.is_empty() {
        let node = format!("policy:{}", i.policy_revision);
        let digest = revisions
            .first()
            .map(|r| r.digest.clone())
            .unwrap_or_default();
        let activated = revisions
            .iter()
            .map(|r| format!("{} by {} at {}", r.action, r.actor, time(r.activated_at)))
            .collect::<Vec<_>>()
            .join("; ");
        g.node(
            node.clone(),
            "policy",
            format!("policy {}", i.policy_revision),
            &[("digest", digest), ("activations", activated)],
        );
        for id in &i.evidence {
            g.edge(&format!("decision:{id}"), &node, "decided under");
        }
    }
    for (n, action) in i.actions.iter().enumerate() {
        let node = format!("action:{}:{n}", i.id);
        g.node(node.clone(), "action", action.clone(), &[]);
        g.edge(&inc, &node, "response");
        // An incident's action line is `word: outcome`; all but `notify` act on the agent.
        let word = action.split(':').next().unwrap_or_default();
        if word
            .parse::<Action>()
            .map_or(true, Action::applies_to_agent)
        {
            g.edge(&node, &agent_id, "applied to");
        }
    }
    pb::IncidentGraph {
        nodes: g.nodes,
        edges: g.edges,
    }
}

fn dot_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' | '\r' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Graphviz DOT (`dot -Tsvg`).
pub fn dot(g: &pb::IncidentGraph) -> String {
    let mut out = String::from(
        "digraph incident {\n  rankdir=LR;\n  node [fontname=\"Helvetica\", fontsize=10];\n  edge [fontname=\"Helvetica\", fontsize=9];\n",
    );
    for n in &g.nodes {
        let shape = match n.kind.as_str() {
            "incident" => "doubleoctagon",
            "decision" => "box",
            "agent" => "ellipse",
            "token" | "approval" => "note",
            "policy" => "folder",
            "action" => "cds",
            _ => "oval",
        };
        let _ = writeln!(
            out,
            "  {} [label={}, shape={shape}];",
            dot_quote(&n.id),
            dot_quote(&n.label)
        );
    }
    for e in &g.edges {
        let _ = writeln!(
            out,
            "  {} -> {} [label={}];",
            dot_quote(&e.from),
            dot_quote(&e.to),
            dot_quote(&e.label)
        );
    }
    out.push_str("}\n");
    out
}

/// A Mermaid flowchart. Node ids are numbered (Mermaid ids allow few characters); labels
/// are quoted with `"` replaced by `#quot;`.
pub fn mermaid(g: &pb::IncidentGraph) -> String {
    let ids: BTreeMap<&str, String> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(k, n)| (n.id.as_str(), format!("n{k}")))
        .collect();
    let label = |s: &str| s.replace('"', "#quot;").replace(['\n', '\r'], " ");
    let mut out = String::from("flowchart LR\n");
    for n in &g.nodes {
        // Every node's id is in `ids` (built from these nodes just above).
        let Some(id) = ids.get(n.id.as_str()) else {
            continue;
        };
        let text = label(&n.label);
        let _ = match n.kind.as_str() {
            "incident" => writeln!(out, "  {id}{{{{\"{text}\"}}}}"),
            "agent" => writeln!(out, "  {id}([\"{text}\"])"),
            "policy" => writeln!(out, "  {id}[/\"{text}\"/]"),
            _ => writeln!(out, "  {id}[\"{text}\"]"),
        };
    }
    for e in &g.edges {
        if let (Some(a), Some(b)) = (ids.get(e.from.as_str()), ids.get(e.to.as_str())) {
            let _ = writeln!(out, "  {a} -->|\"{}\"| {b}", label(&e.label));
        }
    }
    out
}
