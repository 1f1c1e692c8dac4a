//! `aegis bench --detection`: how long from the decision that completes an attack pattern
//! to the incident being stored, and (the tenant at autonomy L3) to the agent being denied
//! at its sidecar.
//!
//! One control plane and one sidecar process on 127.0.0.1. Each round registers a fresh
//! agent, then sends the two calls of an exfiltration pattern through the sidecar
//! (`github.read_repo`, then `slack.post_message`) and polls the sidecar every
//! `--poll-interval-us` until the agent is denied. Two figures per round:
//! - detection: the incident's `created_at` minus its decision's time (both clocks are this
//!   machine's), as the control plane stored them;
//! - containment: from the answer to the pattern's last call to the first denied Check.
//!
//! The floor in the same run: a Check's round trip at the polled sidecar.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::percentile;
use super::propagation::{BenchFleet, allowed, latency_line, poll_until_denied};
use crate::control::pb;

/// Runs the benchmark and prints the report.
pub async fn run(rounds: usize, poll: Duration) -> anyhow::Result<()> {
    let fleet = BenchFleet::start("aegis-detection-", 1).await?;
    let api = &fleet.api;
    let Some(client) = fleet.clients.first() else {
        bail!("no sidecar");
    };
    let mut c = api.client.clone();
    c.update_tenant(api.req(pb::UpdateTenantRequest {
        tenant: "bench".into(),
        mode: None,
        autonomy_level: Some(3),
        reason: "detection benchmark".into(),
    }))
    .await?;

    println!(
        "detection: 1 control plane + 1 sidecar (processes on 127.0.0.1), tenant at L3, {rounds} \
         exfiltration patterns, the sidecar polled every {} µs",
        poll.as_micros()
    );
    let (mut detect_us, mut contain_us, mut rtt_us) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let agent = format!("agent-{round}");
        c.register_agent(api.req(pb::RegisterAgentRequest {
            tenant: "bench".into(),
            id: agent.clone(),
            risk_tier: String::new(),
        }))
        .await?;
        let token = c
            .issue_token(api.req(pb::IssueTokenRequest {
                tenant: "bench".into(),
                agent: agent.clone(),
                scopes: vec![
                    "github:read".into(),
                    "slack:post".into(),
                    "invoices:read".into(),
                ],
                ttl_secs: 600,
                session: String::new(),
            }))
            .await?
            .into_inner()
            .token;
        let check =
            |tool: &str, action: &str| super::request(&token, tool, action, "{}", false, false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !allowed(client, &check("invoices", "read")).await? {
            if Instant::now() > deadline {
                bail!("round {round}: the sidecar never allowed the new agent");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !allowed(client, &check("github", "read_repo")).await? {
            bail!("round {round}: github.read_repo was not allowed");
        }
        if !allowed(client, &check("slack", "post_message")).await? {
            bail!("round {round}: slack.post_message was not allowed");
        }
        let completed = Instant::now();
        let poller = poll_until_denied(
            client.clone(),
            std::sync::Arc::new(check("invoices", "read")),
            poll,
        );
        let (denied_at, rtts) = poller.await.context("containment")?;
        contain_us.push(denied_at.duration_since(completed).as_micros() as u64);
        rtt_us.extend(rtts);
        let incidents = c
            .list_incidents(api.req(pb::ListIncidentsRequest {
                tenant: "bench".into(),
                status: String::new(),
                agent: agent.clone(),
            }))
            .await?
            .into_inner()
            .incidents;
        let Some(i) = incidents.iter().find(|i| i.kind == "data_exfil_pattern") else {
            bail!("round {round}: no data_exfil_pattern incident for {agent}");
        };
        detect_us.push(u64::try_from((i.created_at_ns - i.decided_at_ns) / 1000).unwrap_or(0));
    }
    let line = |name: &str, v: &mut Vec<u64>| latency_line(name, 58, v);
    line(
        "decision completing the pattern -> incident stored",
        &mut detect_us,
    );
    line(
        "answer to the pattern's last call -> agent denied (L3)",
        &mut contain_us,
    );
    line(
        "floor: one Check round trip at the polled sidecar",
        &mut rtt_us,
    );
    let p99 = percentile(&contain_us, 0.99).max(percentile(&detect_us, 0.99)) as f64 / 1000.0;
    println!(
        "  target: p99 <= 250 ms for both: {p99:.2} ms {}",
        if p99 <= 250.0 { "MET" } else { "NOT MET" }
    );
    drop(fleet);
    Ok(())
}
