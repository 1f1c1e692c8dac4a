//! `aegis bench --propagation`: how long after a kill call returns until every sidecar of
//! a fleet denies the killed agent.
//!
//! One `aegis serve --mode control-plane` and `--sidecars` (default 10) `aegis serve
//! --control-plane URL` processes, all children of this one on 127.0.0.1. Each round
//! registers a fresh agent, issues its token, waits until every sidecar allows it, then
//! starts one poller per sidecar (a Check every `--poll-interval-us`, one in flight) and
//! kills the agent over the control plane's API. For each sidecar, the latency is the time
//! from the kill call's return to the first denied Check's answer (0 when a Check sent
//! before the return was already denied: the sidecar had it before the caller did).
//!
//! The floor, measured in the same run: a Check's own round trip at the sidecars while
//! they are polled (a deny can't be seen faster than one round trip plus the poll
//! interval). Bounded: every wait gives up after 10 s.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

use super::{ChildServer, percentile};
use crate::control::auth::{Role, mint_operator};
use crate::control::pb::{self, control_plane_client::ControlPlaneClient};
use crate::keys::Signer;

/// Settings of the propagation benchmark.
#[derive(Debug, Clone)]
pub struct Propagation {
    pub sidecars: usize,
    pub rounds: usize,
    pub poll_interval: Duration,
}

/// The longest any one wait of the benchmark may take.
const WAIT: Duration = Duration::from_secs(10);

pub(super) struct Api {
    pub(super) client: ControlPlaneClient<Channel>,
    pub(super) credential: String,
}

impl Api {
    pub(super) fn req<T>(&self, body: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(body);
        if let Ok(v) = format!("Bearer {}", self.credential).parse() {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }
}

/// A control plane and sidecar processes in a temporary directory, an admin client of
/// the control plane and an ext_authz client per sidecar. Dropping it stops the sidecars,
/// then the control plane, then removes the directory.
pub(super) struct BenchFleet {
    pub(super) api: Api,
    pub(super) clients: Vec<AuthorizationClient<Channel>>,
    _sidecars: Vec<ChildServer>,
    _cp: ChildServer,
    _dir: tempfile::TempDir,
}

impl BenchFleet {
    /// Starts `--mode control-plane` and `sidecars` sidecars following it.
    pub(super) async fn start(prefix: &str, sidecars: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let cp_data = dir.path().join("cp");
        let cp_data_s = cp_data.to_string_lossy().into_owned();
        let cp = ChildServer::spawn(
            &[
                "serve",
                "--mode",
                "control-plane",
                "--data-dir",
                &cp_data_s,
                "--control-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            crate::server::CONTROL_ANNOUNCE,
        )?;
        let signer = Signer::load(&cp_data)?;
        let sidecar_credential = dir.path().join("sidecar.token");
        crate::files::write_secret(
            &sidecar_credential,
            &mint_operator(&signer, "aegis", "fleet", Role::Sidecar, "bench", 3600)?,
        )?;
        let mut children = Vec::new();
        let mut clients = Vec::new();
        for i in 0..sidecars {
            let s = spawn_sidecar(dir.path(), i, cp.addr, &cp_data, &sidecar_credential)?;
            clients.push(AuthorizationClient::new(connect(s.addr).await?));
            children.push(s);
        }
        let api = Api {
            client: ControlPlaneClient::new(connect(cp.addr).await?),
            credential: mint_operator(&signer, "aegis", "bench", Role::Admin, "*", 3600)?,
        };
        Ok(Self {
            api,
            clients,
            _sidecars: children,
            _cp: cp,
            _dir: dir,
        })
    }
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Prints one latency line: `name`, padded to `width`, then n, p50, p99 and max of the
/// samples (microseconds, printed in ms); sorts them.
pub fn latency_line(name: &str, width: usize, v: &mut [u64]) {
    v.sort_unstable();
    println!(
        "  {name:<width$} n={:<5} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        v.len(),
        percentile(v, 0.50) as f64 / 1000.0,
        percentile(v, 0.99) as f64 / 1000.0,
        v.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
}

/// Runs the benchmark and prints the report.
pub async fn run(p: &Propagation) -> anyhow::Result<()> {
    let fleet = BenchFleet::start("aegis-propagation-", p.sidecars).await?;
    let (api, clients) = (&fleet.api, &fleet.clients);
    println!(
        "propagation: 1 control plane + {} sidecars (processes on 127.0.0.1), {} kills (agent scope), \
         each sidecar polled every {} µs",
        p.sidecars,
        p.rounds,
        p.poll_interval.as_micros()
    );
    let mut per_sidecar_us = Vec::new();
    let mut every_sidecar_us = Vec::new();
    let mut kill_call_us = Vec::new();
    let mut rtt_us = Vec::new();
    let mut early = 0usize;
    for round in 0..p.rounds {
        let r = one_round(api, clients, round, p.poll_interval).await?;
        kill_call_us.push(r.kill_call_us);
        early += r.after_return_us.iter().filter(|v| v.is_none()).count();
        let lat: Vec<u64> = r.after_return_us.iter().map(|v| v.unwrap_or(0)).collect();
        every_sidecar_us.push(lat.iter().copied().max().unwrap_or(0));
        per_sidecar_us.extend(lat);
        rtt_us.extend(r.rtt_us);
    }
    let line = |name: &str, v: &mut Vec<u64>| latency_line(name, 52, v);
    line(
        "kill call (request to response, client side)",
        &mut kill_call_us,
    );
    line(
        "kill return -> first denied Check, per sidecar",
        &mut per_sidecar_us,
    );
    line(
        "kill return -> denied at every sidecar, per kill",
        &mut every_sidecar_us,
    );
    line(
        "floor: one Check round trip at a polled sidecar",
        &mut rtt_us,
    );
    println!(
        "  {early} of {} sidecar samples were denied by a Check answered before the kill call returned (counted as 0)",
        p.rounds * p.sidecars
    );
    let p99 = percentile(&every_sidecar_us, 0.99) as f64 / 1000.0;
    println!(
        "  target: p99 kill return -> denied at every sidecar <= 100 ms: {p99:.2} ms {}",
        if p99 <= 100.0 { "MET" } else { "NOT MET" }
    );
    drop(fleet);
    Ok(())
}

fn spawn_sidecar(
    root: &Path,
    i: usize,
    cp: std::net::SocketAddr,
    cp_data: &Path,
    credential: &Path,
) -> anyhow::Result<ChildServer> {
    let data = root
        .join(format!("sidecar-{i}"))
        .to_string_lossy()
        .into_owned();
    let url = format!("http://{cp}");
    let credential = credential.to_string_lossy().into_owned();
    let trusted = cp_data
        .join(crate::keys::PUBLIC_KEY_FILE)
        .to_string_lossy()
        .into_owned();
    let name = format!("sidecar-{i}");
    ChildServer::spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--control-plane",
            &url,
            "--control-plane-token-file",
            &credential,
            "--trusted-key",
            &trusted,
            "--sidecar-name",
            &name,
        ],
        crate::server::ANNOUNCE,
    )
    .with_context(|| format!("sidecar {i}"))
}

struct Round {
    kill_call_us: u64,
    /// Per sidecar: µs from the kill's return to the first denied answer; `None` when a
    /// Check answered before the return was already denied.
    after_return_us: Vec<Option<u64>>,
    rtt_us: Vec<u64>,
}

async fn one_round(
    api: &Api,
    clients: &[AuthorizationClient<Channel>],
    round: usize,
    poll: Duration,
) -> anyhow::Result<Round> {
    let agent = format!("agent-{round}");
    let mut c = api.client.clone();
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
            scopes: vec!["invoices:read".into()],
            ttl_secs: 600,
            session: String::new(),
        }))
        .await?
        .into_inner()
        .token;
    let req = Arc::new(super::request(
        &token, "invoices", "read", "{}", false, false,
    ));
    // Every sidecar knows the agent and has verified its token once.
    for client in clients {
        let deadline = Instant::now() + WAIT;
        while !allowed(client, &req).await? {
            if Instant::now() > deadline {
                bail!("round {round}: a sidecar never allowed the new agent");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let start = Instant::now();
    let pollers: Vec<_> = clients
        .iter()
        .map(|client| tokio::spawn(poll_until_denied(client.clone(), req.clone(), poll)))
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let sent = Instant::now();
    c.kill(api.req(pb::KillRequest {
        scope: pb::KillScope::Agent as i32,
        tenant: "bench".into(),
        target: agent,
        reason: "propagation benchmark".into(),
        confirm_all: false,
    }))
    .await?;
    let returned = Instant::now();
    let mut after_return_us = Vec::new();
    let mut rtt_us = Vec::new();
    for p in pollers {
        let (denied_at, rtts) = p.await.map_err(|e| anyhow!("poller: {e}"))??;
        after_return_us.push(
            denied_at
                .checked_duration_since(returned)
                .filter(|d| !d.is_zero())
                .map(|d| d.as_micros() as u64),
        );
        rtt_us.extend(rtts);
    }
    let _ = start;
    Ok(Round {
        kill_call_us: returned.duration_since(sent).as_micros() as u64,
        after_return_us,
        rtt_us,
    })
}

pub(super) async fn allowed(
    client: &AuthorizationClient<Channel>,
    req: &CheckRequest,
) -> anyhow::Result<bool> {
    let r = client.clone().check(req.clone()).await?.into_inner();
    Ok(r.status.as_ref().is_none_or(|s| s.code == 0))
}

/// Sends the Check every `poll` until one is denied; returns when that answer arrived and
/// the round trips seen.
pub(super) async fn poll_until_denied(
    client: AuthorizationClient<Channel>,
    req: Arc<CheckRequest>,
    poll: Duration,
) -> anyhow::Result<(Instant, Vec<u64>)> {
    let deadline = Instant::now() + WAIT;
    let mut rtts = Vec::new();
    let mut next = Instant::now();
    loop {
        let sent = Instant::now();
        let ok = allowed(&client, &req).await?;
        let answered = Instant::now();
        rtts.push(answered.duration_since(sent).as_micros() as u64);
        if !ok {
            return Ok((answered, rtts));
        }
        if answered > deadline {
            bail!("a sidecar still allowed the killed agent after {WAIT:?}");
        }
        next += poll;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        } else {
            next = Instant::now();
        }
    }
}
