//! `aegis bench`: Check throughput and latency of the full pipeline beside a no-op
//! ext_authz server built from the same stack, in the same run.
//!
//! Both servers run as child processes of this one (`aegis serve` with a fresh data
//! directory, and the hidden `aegis noop-server`), so resident memory is the server's own
//! and both pay the same loopback and client costs. Aegis runs its full pipeline: token
//! verification (cached), Rego, a durable signed audit row per Check (group commit, the
//! configured durability), and a span exported over OTLP to a sink in this process.
//!
//! Phases, each against the no-op server and then Aegis:
//! 1. saturated: `concurrency` closed-loop callers for `duration_secs`;
//! 2. fixed rate: `rate` Checks/s for `rate_secs`, open loop; latency is measured from
//!    each request's scheduled send time, so a stall is not hidden (no coordinated
//!    omission). Aegis's resident memory is sampled during this phase.
//!
//! `--propagation` measures something else: how fast a kill reaches a fleet of sidecar
//! processes (see [`propagation`]).
//!
//! Every loop is bounded in time and count, and only talks to 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

use crate::identity::{Audience, Claims};
use crate::keys::Signer;

mod detection;
mod mixes;
mod propagation;
mod verify;

/// The `p` quantile (0..=1) of sorted values (nearest rank); 0 when empty.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

use crate::testkit::*;

/// Benchmark settings.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Seconds of the saturated phase, per server.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Closed-loop callers in the saturated phase.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the callers share (Envoy opens a few per worker).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Offered rate of the fixed-rate phase, Checks per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Seconds of the fixed-rate phase, per server.
    #[arg(long, default_value_t = 10)]
    pub rate_secs: u64,
    /// Distinct agents in the workload.
    #[arg(long, default_value_t = 50)]
    pub agents: usize,
    /// Audit durability passed to `aegis serve` (normal or full).
    #[arg(long, default_value = "normal")]
    pub durability: String,
    /// Do not export spans (they are still created); isolates the export's cost.
    #[arg(long)]
    pub no_otlp: bool,
    /// Soak instead: this many seconds at a fixed fraction of saturation, against one
    /// Aegis, reporting every `--soak-interval-secs` (see `aegis bench --help`).
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// Seconds per soak report line.
    #[arg(long, default_value_t = 30)]
    pub soak_interval_secs: u64,
    /// Soak rate as a fraction of the saturated throughput measured first.
    #[arg(long, default_value_t = 0.5)]
    pub soak_fraction: f64,
    /// Measure kill propagation instead: a control plane and `--sidecars` sidecar
    /// processes, the time from a kill call's return to a denied Check at every sidecar.
    #[arg(long)]
    pub propagation: bool,
    /// Sidecar processes of the propagation benchmark.
    #[arg(long, default_value_t = 10)]
    pub sidecars: usize,
    /// Kills measured by the propagation benchmark.
    #[arg(long, default_value_t = 50)]
    pub rounds: usize,
    /// How often each sidecar is sent a Check while a kill propagates, in µs.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_us: u64,
    /// Measure detection and containment instead: exfiltration patterns through a sidecar
    /// of a tenant at L3, the time to the incident and to the agent being denied.
    #[arg(long)]
    pub detection: bool,
    /// Run Aegis with its correlation engine off (to compare Check latency with it on).
    #[arg(long)]
    pub no_correlation: bool,
    /// Measure `aegis audit verify` instead: write this many rows through the audit writer,
    /// then verify them (alone and against the witness), reporting rows/s and peak memory.
    #[arg(long)]
    pub verify_rows: Option<u64>,
    /// With --verify-rows: write the log into this new directory and keep it (default: a
    /// temporary directory, removed).
    #[arg(long)]
    pub verify_dir: Option<std::path::PathBuf>,
    /// Measure each kind of request separately instead (allow, a new token, deny, MCP,
    /// sanitize, approval, varied), `--duration-secs` each against the no-op and Aegis,
    /// with Aegis's CPU per Check by thread.
    #[arg(long, conflicts_with_all = ["soak_secs", "propagation", "detection", "verify_rows"])]
    pub mixes: bool,
    /// The regression guard instead: the varied mix, five rounds of `--duration-secs`
    /// against the no-op and Aegis; fails when the median ratio of server CPU per Check
    /// exceeds the one FILE records for this build profile by more than its margin.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["soak_secs", "propagation", "detection", "verify_rows", "mixes"]
    )]
    pub guard: Option<std::path::PathBuf>,
}

/// Results of one phase against one server.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// Checks sent.
    pub requests: u64,
    /// Checks that got no answer: a gRPC error or a timeout.
    pub errors: u64,
    /// How long the phase ran.
    pub elapsed: Duration,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
    /// Slowest Check, microseconds.
    pub max_us: u64,
    /// Checks allowed (no denial status).
    pub allowed: u64,
    /// Checks answered with a denial.
    pub denied: u64,
}

impl PhaseResult {
    /// Checks per second over the phase.
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the whole benchmark and prints the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(rows) = args.verify_rows {
        return verify::run(rows, args.verify_dir.as_deref()).await;
    }
    if let Some(secs) = args.soak_secs {
        return soak(&args, secs).await;
    }
    if let Some(file) = &args.guard {
        return mixes::guard(&args, file).await;
    }
    if args.mixes {
        return mixes::run(&args).await;
    }
    if args.detection {
        return detection::run(
            args.rounds.max(1),
            Duration::from_micros(args.poll_interval_us.max(100)),
        )
        .await;
    }
    if args.propagation {
        return propagation::run(&propagation::Propagation {
            sidecars: args.sidecars.max(1),
            rounds: args.rounds.max(1),
            poll_interval: Duration::from_micros(args.poll_interval_us.max(100)),
        })
        .await;
    }
    let setup = Setup::new("aegis-bench-", args.agents).await?;
    let (workload, sink) = (&setup.workload, &setup.sink);
    let mut noop = ChildServer::spawn(
        &["noop-server", "--listen", "127.0.0.1:0"],
        "noop ext_authz listening on ",
    )?;
    let noop_clients = clients(noop.addr, args.connections).await?;
    println!(
        "aegis bench: {} agents, {} request shapes, audit durability {}, spans {}",
        args.agents,
        workload.len(),
        args.durability,
        if args.no_otlp {
            "not exported"
        } else {
            "exported over OTLP to a sink on loopback"
        }
    );

    // Phase 1, fixed rate, first and against a fresh Aegis: steady state at the offered
    // rate. Run after the saturated phase it measured that phase's aftermath instead (tens
    // of MB of WAL being checkpointed and written back by the kernel).
    let warm = Duration::from_secs(1);
    let rated = Duration::from_secs(args.rate_secs);
    fixed_rate(&noop_clients, workload, args.rate, warm, None).await;
    let noop_rate_cpu = CpuSample::take(&[("no-op", noop.child.id())]);
    let noop_rate = fixed_rate(&noop_clients, workload, args.rate, rated, None).await;
    let noop_rate_cpu = noop_rate_cpu.since();
    let mut aegis = setup.aegis("fixed-rate", &args)?;
    let aegis_clients = clients(aegis.child.addr, args.connections).await?;
    fixed_rate(&aegis_clients, workload, args.rate, warm, None).await;
    let rss = Arc::new(AtomicU64::new(0));
    let pid = aegis.child.child.id();
    let aegis_rate_cpu = CpuSample::take(&[("aegis", pid)]);
    let aegis_rate = fixed_rate(
        &aegis_clients,
        workload,
        args.rate,
        rated,
        Some((pid, rss.clone())),
    )
    .await;
    let aegis_rate_cpu = aegis_rate_cpu.since();
    drop(aegis_clients);
    let rate_log = aegis.stop_and_verify()?;
    // Phase 2, saturated, against another fresh Aegis. One-second warm-ups (connections,
    // caches, pools).
    let sat = Duration::from_secs(args.duration_secs);
    saturate(&noop_clients, workload, args.concurrency, warm).await;
    let noop_cpu = CpuSample::take(&[("no-op", noop.child.id()), ("bench", std::process::id())]);
    let noop_sat = saturate(&noop_clients, workload, args.concurrency, sat).await;
    let noop_cpu = noop_cpu.since();
    let mut aegis = setup.aegis("saturated", &args)?;
    let aegis_clients = clients(aegis.child.addr, args.connections).await?;
    saturate(&aegis_clients, workload, args.concurrency, warm).await;
    let aegis_cpu = CpuSample::take(&[
        ("aegis", aegis.child.child.id()),
        ("bench", std::process::id()),
    ]);
    let aegis_sat = saturate(&aegis_clients, workload, args.concurrency, sat).await;
    let aegis_cpu = aegis_cpu.since();
    drop(aegis_clients);
    let sat_log = aegis.stop_and_verify()?;

    drop(noop_clients);
    noop.stop()?;

    println!();
    println!(
        "{:<7} {:<13} {:>9} {:>12} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7}",
        "server",
        "phase",
        "checks",
        "checks/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "errors",
        "allowed",
        "denied"
    );
    let sat_name = format!("saturated c{}", args.concurrency);
    let rate_name = format!("{}/s fixed", args.rate);
    for (server, phase, r) in [
        ("no-op", &sat_name, &noop_sat),
        ("aegis", &sat_name, &aegis_sat),
        ("no-op", &rate_name, &noop_rate),
        ("aegis", &rate_name, &aegis_rate),
    ] {
        println!(
            "{server:<7} {phase:<13} {:>9} {:>12.0} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7}",
            r.requests,
            r.throughput(),
            r.p50_us,
            r.p99_us,
            r.max_us,
            r.errors,
            r.allowed,
            r.denied
        );
    }
    println!();
    println!(
        "saturated throughput ratio aegis/no-op: {:.2}",
        aegis_sat.throughput() / noop_sat.throughput().max(1e-9)
    );
    println!(
        "p99 at {}/s: aegis {:.2} ms, no-op {:.2} ms",
        args.rate,
        aegis_rate.p99_us as f64 / 1000.0,
        noop_rate.p99_us as f64 / 1000.0
    );
    println!(
        "aegis resident memory, max during the fixed-rate phase: {:.1} MiB",
        rss.load(Ordering::Relaxed) as f64 / 1024.0 / 1024.0
    );
    println!();
    let phases = [
        (
            "the saturated phase".to_owned(),
            [&noop_cpu, &aegis_cpu],
            [&noop_sat, &aegis_sat],
        ),
        (
            format!("the fixed-rate phase ({}/s)", args.rate),
            [&noop_rate_cpu, &aegis_rate_cpu],
            [&noop_rate, &aegis_rate],
        ),
    ];
    for (phase, cpus, results) in phases {
        println!("CPU per Check in {phase}, by process and thread (µs):");
        for ((name, cpu), r) in ["no-op", "aegis"].into_iter().zip(cpus).zip(results) {
            println!("  {name}:");
            for (thread, us) in cpu.per_check(r.requests) {
                println!("    {thread:<40} {us:>7.1}");
            }
        }
    }
    println!("audit log after the saturated phase: {sat_log}");
    println!("audit log after the fixed-rate phase: {rate_log}");
    println!(
        "spans received by the OTLP sink: {}",
        sink.spans.load(Ordering::Relaxed)
    );
    Ok(())
}

/// The soak: saturation measured for a few seconds, then `soak_fraction` of it offered at
/// a fixed rate for `secs` to one Aegis, one report line per interval. Fails on any error,
/// a broken audit log, or resident memory that keeps growing after the first interval
/// (least-squares slope over the run above 1 MiB per 10 minutes, or 5% of the start).
async fn soak(args: &BenchArgs, secs: u64) -> anyhow::Result<()> {
    let setup = Setup::new("aegis-soak-", args.agents).await?;
    let workload = &setup.workload;
    let mut aegis = setup.aegis("soak", args)?;
    let clients = clients(aegis.child.addr, args.connections).await?;
    let probe = saturate(&clients, workload, args.concurrency, Duration::from_secs(5)).await;
    let rate = ((probe.throughput() * args.soak_fraction) as u64).max(1);
    println!(
        "aegis soak: saturated at {:.0} Checks/s over 5 s; offering {rate}/s ({:.0}%) for {secs} s",
        probe.throughput(),
        args.soak_fraction * 100.0
    );
    println!(
        "{:>6} {:>9} {:>10} {:>8} {:>8} {:>7} {:>9}",
        "t s", "checks", "checks/s", "p50 µs", "p99 µs", "errors", "RSS MiB"
    );
    let pid = aegis.child.child.id();
    let step = args.soak_interval_secs.clamp(1, secs.max(1));
    let (mut t, mut errors, mut points) = (0, 0, Vec::new());
    while t < secs {
        let len = step.min(secs - t);
        let rss = Arc::new(AtomicU64::new(0));
        let r = fixed_rate(
            &clients,
            workload,
            rate,
            Duration::from_secs(len),
            Some((pid, rss.clone())),
        )
        .await;
        t += len;
        errors += r.errors;
        let mib = rss.load(Ordering::Relaxed) as f64 / 1024.0 / 1024.0;
        points.push((t as f64, mib));
        println!(
            "{t:>6} {:>9} {:>10.0} {:>8} {:>8} {:>7} {mib:>9.1}",
            r.requests,
            r.throughput(),
            r.p50_us,
            r.p99_us,
            r.errors
        );
    }
    drop(clients);
    let log = aegis.stop_and_verify()?;
    println!("audit log: {log}");
    // Memory trend after warm-up (the first interval): least-squares slope.
    let after: Vec<(f64, f64)> = points.iter().skip(1).copied().collect();
    let slope = slope(&after);
    let start = after.first().map_or(0.0, |p| p.1);
    let grown = slope * (after.last().map_or(0.0, |p| p.0) - after.first().map_or(0.0, |p| p.0));
    println!(
        "resident memory after warm-up: {start:.1} MiB, trend {:+.3} MiB/min ({grown:+.2} MiB over the run)",
        slope * 60.0
    );
    if errors > 0 {
        bail!("{errors} Checks failed during the soak");
    }
    if log.starts_with("BROKEN") {
        bail!("the audit log does not verify after the soak");
    }
    let limit = (start * 0.05).max(secs as f64 / 600.0);
    if after.len() >= 3 && grown > limit {
        bail!("resident memory grew {grown:.2} MiB over the soak (limit {limit:.2} MiB)");
    }
    println!("soak passed: no errors, log intact, memory flat");
    Ok(())
}

/// Least-squares slope of y over x (0 with fewer than two points).
/// The `n`th item of `items`, counting round and round: the phases spread their requests
/// over the connections and the workload this way. `None` only when `items` is empty.
fn nth_wrapping<T>(items: &[T], n: usize) -> Option<&T> {
    items.get(n.checked_rem(items.len())?)
}

fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), p| {
        (a + (p.0 - mx) * (p.1 - my), b + (p.0 - mx) * (p.0 - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// What every benchmark run starts from: a throwaway directory, the benchmark's signing
/// key in it, the workload signed with that key, and the OTLP sink Aegis exports to.
struct Setup {
    dir: tempfile::TempDir,
    key_dir: std::path::PathBuf,
    workload: Arc<Vec<CheckRequest>>,
    sink: SpanSink,
}

impl Setup {
    async fn new(prefix: &str, agents: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let key_dir = dir.path().join("key");
        let signer = Signer::load_or_create(&key_dir)?;
        let workload = Arc::new(workload(&signer, agents)?);
        let sink = SpanSink::start().await?;
        Ok(Self {
            dir,
            key_dir,
            workload,
            sink,
        })
    }

    /// A fresh `aegis serve` child named `name`, with the benchmark's key and sink.
    fn aegis(&self, name: &str, args: &BenchArgs) -> anyhow::Result<AegisServer> {
        AegisServer::spawn(self.dir.path(), name, &self.key_dir, args, self.sink.addr)
    }
}

/// An `aegis serve` child with its own data directory (and the benchmark's signing key).
struct AegisServer {
    child: ChildServer,
    data_dir: std::path::PathBuf,
    witness: std::path::PathBuf,
}

impl AegisServer {
    fn spawn(
        root: &std::path::Path,
        name: &str,
        key_dir: &std::path::Path,
        args: &BenchArgs,
        sink: SocketAddr,
    ) -> anyhow::Result<Self> {
        let data_dir = root.join(name);
        crate::keys::ensure_data_dir(&data_dir)?;
        for f in [crate::keys::SIGNING_KEY_FILE, crate::keys::PUBLIC_KEY_FILE] {
            std::fs::copy(key_dir.join(f), data_dir.join(f))?;
        }
        let data = data_dir.to_string_lossy().into_owned();
        let endpoint = format!("http://{sink}");
        // Every checkpoint published to a witness file, checked at the end.
        let witness = root.join(format!("{name}-witness.jsonl"));
        let witness_arg = witness.to_string_lossy().into_owned();
        let mut serve_args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--audit-durability",
            &args.durability,
            "--audit-witness-file",
            &witness_arg,
        ];
        if !args.no_otlp {
            serve_args.extend(["--otlp-endpoint", &endpoint]);
        }
        if args.no_correlation {
            serve_args.extend(["--correlation", "false"]);
        }
        let child = ChildServer::spawn(&serve_args, crate::server::ANNOUNCE)?;
        Ok(Self {
            child,
            data_dir,
            witness,
        })
    }

    /// SIGTERM, wait, then verify its audit log (with its audit key, against its witness).
    fn stop_and_verify(&mut self) -> anyhow::Result<String> {
        self.child.stop()?;
        let db = self.data_dir.join(crate::audit::store::AUDIT_DB_FILE);
        let key =
            crate::keys::read_public_key(&self.data_dir.join(crate::keys::AUDIT_PUBLIC_KEY_FILE))?;
        let trust = crate::audit::verify::Trust::keys(std::slice::from_ref(&key));
        Ok(
            match crate::audit::verify::verify_file_with(&db, trust, Some(&self.witness))? {
                Ok(s) => format!(
                    "intact, {} rows, {} signed checkpoints ({:.1} rows per commit), all {} \
                     witnessed",
                    s.rows,
                    s.checkpoints,
                    s.rows as f64 / s.checkpoints.max(1) as f64,
                    s.witnessed
                ),
                Err(f) => format!("BROKEN at {f}"),
            },
        )
    }
}

/// The scopes of agent `a`'s token: four sets, in turn.
const SCOPE_SETS: [&[&str]; 4] = [
    &["invoices:read", "payments:create"],
    &["invoices:read", "invoices:write", "github:read"],
    &["web:fetch", "github:read", "slack:post"],
    &["payments:read"],
];

/// A token for agent `a` (tenant `a % 5`, scopes [`SCOPE_SETS`]`[a % 4]`) with its own
/// `jti`, valid for an hour.
fn agent_token(signer: &Signer, a: usize, jti: &str) -> anyhow::Result<String> {
    let now = crate::unix_nanos() / 1_000_000_000;
    let claims = Claims {
        iss: "aegis".into(),
        aud: Audience::One("aegis-sidecar".into()),
        sub: format!("agent-{a}"),
        tenant: format!("tenant-{}", a % 5),
        scopes: nth_wrapping(&SCOPE_SETS, a)
            .copied()
            .unwrap_or_default()
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        sid: format!("sess-{a}"),
        jti: jti.to_owned(),
        iat: now,
        nbf: now,
        exp: now + 3600,
    };
    Ok(crate::identity::mint(signer, &claims)?)
}

/// Varied requests: agents with different scopes calling five tools through MCP bodies
/// and Envoy route labels; roughly a third are denied (missing scope, unknown tool,
/// egress, approval needed), some are sanitized.
fn workload(signer: &Signer, agents: usize) -> anyhow::Result<Vec<CheckRequest>> {
    let calls: [(&str, &str, &str); 10] = [
        ("invoices", "read", r#"{"id":"inv-1"}"#),
        ("invoices", "create", r#"{"amount":10}"#),
        ("payments", "create", r#"{"amount":250}"#),
        ("payments", "create", r#"{"amount":5000}"#),
        ("github", "read_issue", r#"{"repo":"acme/app","number":7}"#),
        (
            "web_fetch",
            "get",
            r#"{"url":"https://api.github.com/repos/acme/app"}"#,
        ),
        (
            "web_fetch",
            "get",
            r#"{"url":"https://evil.example.net/x"}"#,
        ),
        (
            "slack",
            "post_message",
            r##"{"channel":"#ops","text":"hi"}"##,
        ),
        ("shell", "exec", r#"{"cmd":"ls"}"#),
        ("invoices", "list", r#"{}"#),
    ];
    let mut out = Vec::new();
    for a in 0..agents.max(1) {
        let token = agent_token(signer, a, &format!("jti-{a}"))?;
        for (i, (tool, action, args)) in calls.iter().enumerate() {
            let mcp = (a + i) % 2 == 0;
            out.push(request(&token, tool, action, args, mcp, i % 3 == 0));
        }
    }
    Ok(out)
}

async fn clients(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<AuthorizationClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let ch = Channel::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        out.push(AuthorizationClient::new(ch));
    }
    Ok(out)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    allowed: u64,
    denied: u64,
}

impl Tally {
    fn add(
        &mut self,
        latency: Duration,
        result: Result<tonic::Response<CheckResponse>, tonic::Status>,
    ) {
        self.latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        match result {
            Ok(r) if r.get_ref().status.as_ref().is_none_or(|s| s.code == 0) => self.allowed += 1,
            Ok(_) => self.denied += 1,
            Err(_) => self.errors += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.allowed += other.allowed;
        self.denied += other.denied;
    }

    fn finish(mut self, elapsed: Duration) -> PhaseResult {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> u64 {
            if self.latencies_us.is_empty() {
                return 0;
            }
            let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
            u64::from(self.latencies_us.get(i).copied().unwrap_or(0))
        };
        PhaseResult {
            requests: self.latencies_us.len() as u64,
            errors: self.errors,
            elapsed,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: u64::from(self.latencies_us.last().copied().unwrap_or(0)),
            allowed: self.allowed,
            denied: self.denied,
        }
    }
}

/// `concurrency` callers, each sending its next request when the last is answered, taking
/// the workload's requests in turn, round and round.
async fn saturate(
    clients: &[AuthorizationClient<Channel>],
    work: &Arc<Vec<CheckRequest>>,
    concurrency: usize,
    dur: Duration,
) -> PhaseResult {
    saturate_feed(clients, work, concurrency, dur, true).await
}

/// [`saturate`], or with `wrap` false, each request sent once: the phase ends when the
/// workload is used up or at `dur`, whichever comes first (the token cache-miss mix, where
/// every token must be new to the server).
async fn saturate_feed(
    clients: &[AuthorizationClient<Channel>],
    work: &Arc<Vec<CheckRequest>>,
    concurrency: usize,
    dur: Duration,
    wrap: bool,
) -> PhaseResult {
    let start = Instant::now();
    let deadline = start + dur;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..concurrency.max(1) {
        let Some(mut client) = nth_wrapping(clients, c).cloned() else {
            break;
        };
        let (work, next) = (work.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let req = if wrap {
                    nth_wrapping(&work, i)
                } else {
                    work.get(i)
                };
                let Some(req) = req.cloned() else {
                    break;
                };
                let t = Instant::now();
                let r = client.check(req).await;
                tally.add(t.elapsed(), r);
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for t in tasks {
        if let Ok(tally) = t.await {
            total.merge(tally);
        }
    }
    total.finish(start.elapsed())
}

/// Open loop at `rate`/s; latency from each request's scheduled time. Samples RSS of `pid`.
async fn fixed_rate(
    clients: &[AuthorizationClient<Channel>],
    work: &Arc<Vec<CheckRequest>>,
    rate: u64,
    dur: Duration,
    rss: Option<(u32, Arc<AtomicU64>)>,
) -> PhaseResult {
    let total = rate.max(1) * dur.as_secs().max(1);
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    let sampler = rss.map(|(pid, max)| {
        tokio::spawn(async move {
            while start.elapsed() < dur + Duration::from_millis(500) {
                if let Some(bytes) = resident_bytes(pid) {
                    max.fetch_max(bytes, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Pace from a plain thread: tokio's timer has 1 ms granularity, which would add up to a
    // millisecond of the harness's own lag to every request; thread sleeps are precise.
    let runtime = tokio::runtime::Handle::current();
    let clients = clients.to_vec();
    let work = work.clone();
    let pacer = std::thread::spawn(move || {
        for n in 0..total {
            let scheduled = start + interval * u32::try_from(n).unwrap_or(u32::MAX);
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (Some(mut client), Some(req)) = (
                nth_wrapping(&clients, n as usize).cloned(),
                nth_wrapping(&work, n as usize * 31).cloned(),
            ) else {
                break;
            };
            let tx = tx.clone();
            runtime.spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(5), client.check(req)).await;
                let r =
                    r.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("bench timeout")));
                // Latency from the scheduled send time, taken when the answer arrives.
                let _ = tx.send((scheduled.elapsed(), r));
            });
        }
    });
    let mut tally = Tally::default();
    while let Some((latency, r)) = rx.recv().await {
        tally.add(latency, r);
    }
    let elapsed = start.elapsed();
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    if let Some(s) = sampler {
        let _ = s.await;
    }
    tally.finish(elapsed)
}

/// CPU time of every thread of some processes, to tell where a phase's CPU went.
struct CpuSample {
    pids: Vec<(&'static str, u32)>,
    /// Ticks by (process, thread name, thread id): a thread is compared with itself only.
    threads: BTreeMap<(String, String, u32), u64>,
    /// Ticks by process, from `/proc/<pid>/stat`: these include threads that have ended.
    totals: BTreeMap<String, u64>,
}

/// CPU spent over an interval: by (process, thread name), and by process.
struct CpuSpent {
    threads: BTreeMap<(String, String), u64>,
    totals: BTreeMap<String, u64>,
}

impl CpuSample {
    fn take(pids: &[(&'static str, u32)]) -> Self {
        let mut threads = BTreeMap::new();
        let mut totals = BTreeMap::new();
        for (name, pid) in pids {
            for (thread, tid, t) in thread_ticks(*pid) {
                threads.insert(((*name).to_owned(), thread, tid), t);
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            totals.insert((*name).to_owned(), stat.as_deref().map_or(0, stat_ticks));
        }
        Self {
            pids: pids.to_vec(),
            threads,
            totals,
        }
    }

    /// CPU ticks spent since this sample. A thread that ended meanwhile is missing from
    /// the threads (its time is in its process's total); one that began is counted whole.
    fn since(self) -> CpuSpent {
        let now = Self::take(&self.pids);
        let mut threads = BTreeMap::new();
        for ((process, thread, tid), t) in now.threads {
            let before = self
                .threads
                .get(&(process.clone(), thread.clone(), tid))
                .copied()
                .unwrap_or(0);
            *threads.entry((process, thread)).or_insert(0) += t.saturating_sub(before);
        }
        threads.retain(|_, t| *t > 0);
        let totals = now
            .totals
            .into_iter()
            .map(|(p, t)| {
                let before = self.totals.get(&p).copied().unwrap_or(0);
                (p, t.saturating_sub(before))
            })
            .collect();
        CpuSpent { threads, totals }
    }
}

impl CpuSpent {
    /// µs of CPU per Check by `process/thread`, then each process's total (as
    /// `process total`), which also holds the time of threads that ended.
    fn per_check(&self, checks: u64) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .threads
            .iter()
            .map(|((process, thread), t)| (format!("{process}/{thread}"), us_per(*t, checks)))
            .collect();
        for (process, t) in &self.totals {
            out.push((format!("{process} total"), us_per(*t, checks)));
        }
        out
    }

    /// µs of CPU per Check of `process` as a whole; `None` if it was not sampled or spent
    /// nothing measurable (a sampling failure, not a free server).
    fn total_per_check(&self, process: &str, checks: u64) -> Option<f64> {
        let t = *self.totals.get(process)?;
        (t > 0 && checks > 0).then(|| us_per(t, checks))
    }
}

/// `ticks` of CPU (clock ticks of 10 ms: USER_HZ = 100 on Linux) per Check, in µs.
fn us_per(ticks: u64, checks: u64) -> f64 {
    ticks as f64 * 10_000.0 / checks.max(1) as f64
}

/// utime + stime of a `/proc/.../stat` line. `pid (comm) state ...`: comm may hold
/// spaces, so the fields are counted after the last ')'; utime and stime are fields 14
/// and 15 of stat(5), 12 and 13 after the comm.
fn stat_ticks(stat: &str) -> u64 {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    t(11) + t(12)
}

/// (thread name, thread id, utime + stime ticks) of every thread of `pid`.
fn thread_ticks(pid: u32) -> Vec<(String, u32, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("?", |(c, _)| c)
            .to_owned();
        out.push((comm, tid, stat_ticks(&stat)));
    }
    out
}

/// VmRSS of a process, in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
