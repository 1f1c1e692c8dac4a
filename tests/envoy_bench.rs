//! Benchmark, not a test the suite runs: the latency Aegis adds to a tool call behind a
//! real Envoy 1.40, at a fixed rate. Envoy + Aegis (the shipped deploy/envoy.yaml, only its
//! addresses changed) against Envoy alone (the same file without its ext_authz filter: the
//! no-op baseline) and against the same Envoy calling a no-op ext_authz server (the hidden
//! `aegis noop-server`, which answers OK at once: what the ext_authz hop itself costs), in
//! rotating rounds of one run, over keep-alive connections. The
//! calls are open loop (each is sent when due, on its own task, whatever the earlier ones
//! are doing); a call's latency runs from the moment it is sent to its whole response.
//! The pacing timer's own lateness (tokio's timer has a 1 ms resolution) is reported
//! beside it, not added to it.
//!
//! ```sh
//! cargo test --release --test envoy_bench -- --ignored --nocapture
//! ```
//!
//! `AEGIS_BENCH_RATE` (calls/s, default 1000), `AEGIS_BENCH_SECS` (per round, default 5),
//! `AEGIS_BENCH_ROUNDS` (rounds of each, default 6: each order of the three once). Aegis
//! runs as `aegis serve` (the binary of this build) with its full pipeline: token
//! verification, the default bundle, a durable audit row per call, spans exported over
//! OTLP.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aegis::testkit::SpanSink;
use bytes::Bytes;
use common::envoy::{Envoy, Upstream};
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo test --release --test envoy_bench -- --ignored --nocapture"]
async fn latency_added_by_aegis_behind_envoy() {
    let rate = env_or("AEGIS_BENCH_RATE", 1000).max(1);
    let secs = env_or("AEGIS_BENCH_SECS", 5).max(1);
    let rounds = env_or("AEGIS_BENCH_ROUNDS", 6).max(1);

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let sink = SpanSink::start().await.expect("span sink");
    let otlp = format!("http://{}", sink.addr);
    let data_arg = data.to_string_lossy().into_owned();
    let _aegis = common::spawn_serve(&["--data-dir", &data_arg, "--otlp-endpoint", &otlp]);
    let aegis_addr = _aegis.addr;
    let signer = aegis::keys::Signer::load(&data).expect("the server's key");
    let token = common::mint(
        &signer,
        common::claims("acme", "billing-bot", &["invoices:read"]),
    );
    let noop = aegis::testkit::ChildServer::spawn_exe(
        std::path::Path::new(env!("CARGO_BIN_EXE_aegis")),
        &["noop-server", "--listen", "127.0.0.1:0"],
        "noop ext_authz listening on ",
    )
    .expect("the no-op ext_authz server starts");
    let upstream = Upstream::start().await;
    let with = Envoy::start(aegis_addr, upstream.addr, sink.addr).await;
    let alone = Envoy::start_with(
        aegis_addr,
        upstream.addr,
        sink.addr,
        serde_json::json!({"without_ext_authz": true}),
    )
    .await;
    let with_noop = Envoy::start(noop.addr, upstream.addr, sink.addr).await;
    let modes = [
        ("envoy + aegis", with.listener()),
        ("envoy alone", alone.listener()),
        ("envoy + no-op", with_noop.listener()),
    ];

    // Warm-up: connections, caches, the policy's engines.
    for (_, addr) in modes {
        let r = run(addr, &token, 200, Duration::from_secs(1)).await;
        assert_eq!(r.errors, 0, "warm-up failed");
    }
    upstream.clear();

    let mut all: [Vec<u32>; 3] = Default::default();
    let mut errors = [0u64; 3];
    let mut took = [Duration::ZERO; 3];
    let mut late = [Duration::ZERO; 3];
    for round in 0..rounds {
        // Each of the six orders in turn: over six rounds every mode runs first, second
        // and last twice, and right after each of the others twice within a round.
        const ORDERS: [[usize; 3]; 6] = [
            [0, 1, 2],
            [1, 2, 0],
            [2, 0, 1],
            [0, 2, 1],
            [2, 1, 0],
            [1, 0, 2],
        ];
        for i in ORDERS[round as usize % 6] {
            let r = run(modes[i].1, &token, rate * secs, Duration::from_secs(secs)).await;
            all[i].extend(r.latencies_us);
            errors[i] += r.errors;
            took[i] += r.took;
            late[i] += r.late;
        }
    }
    println!(
        "\n{rate} calls/s for {rounds} × {secs} s each, GET /invoices/1 allowed (keep-alive, open loop)"
    );
    println!(
        "{:<15} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>14}",
        "", "calls", "errors", "calls/s", "p50 ms", "p99 ms", "p99.9 ms", "timer late ms"
    );
    let mut p = [[0f64; 3]; 3];
    for i in 0..3 {
        let l = &mut all[i];
        l.sort_unstable();
        p[i] = [pct(l, 0.50), pct(l, 0.99), pct(l, 0.999)];
        println!(
            "{:<15} {:>8} {:>7} {:>9.0} {:>9.3} {:>9.3} {:>9.3} {:>14.3}",
            modes[i].0,
            l.len(),
            errors[i],
            l.len() as f64 / took[i].as_secs_f64(),
            p[i][0],
            p[i][1],
            p[i][2],
            late[i].as_secs_f64() * 1000.0 / l.len().max(1) as f64
        );
    }
    println!(
        "added by aegis: p50 {:+.3} ms, p99 {:+.3} ms (ratio to envoy alone: p50 {:.2}×, p99 {:.2}×)",
        p[0][0] - p[1][0],
        p[0][1] - p[1][1],
        p[0][0] / p[1][0].max(1e-9),
        p[0][1] / p[1][1].max(1e-9)
    );
    println!(
        "added by the ext_authz hop with a no-op server: p50 {:+.3} ms, p99 {:+.3} ms; \
         aegis over that: p50 {:+.3} ms, p99 {:+.3} ms",
        p[2][0] - p[1][0],
        p[2][1] - p[1][1],
        p[0][0] - p[2][0],
        p[0][1] - p[2][1]
    );
    // Envoy's own view of the Checks: how long Aegis took to answer, as Envoy measured it.
    let stats = with
        .admin_get("/stats?filter=^cluster%5C.aegis%5C.upstream_rq_time$")
        .await
        .text();
    println!(
        "envoy's histogram of aegis's answers (ms): {}",
        stats.trim()
    );
    assert_eq!(errors, [0, 0, 0], "every call answered 200");
}

/// The `q` quantile of sorted microseconds, in milliseconds.
fn pct(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

struct Run {
    latencies_us: Vec<u32>,
    errors: u64,
    took: Duration,
    /// The pacing timer's lateness, summed over the calls.
    late: Duration,
}

type Conn = SendRequest<Empty<Bytes>>;

/// `n` calls spread evenly over `over`, each on an idle keep-alive connection (a new one
/// when none is idle); latency from each call's due time to its whole response.
async fn run(addr: SocketAddr, token: &str, n: u64, over: Duration) -> Run {
    let idle: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let interval = over.div_f64(n as f64);
    let start = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let idle = idle.clone();
        let token = token.to_owned();
        calls.spawn(async move {
            let sent = tokio::time::Instant::now();
            let ok = call(addr, &token, &idle).await;
            (ok, sent.elapsed(), sent.duration_since(due))
        });
    }
    let mut out = Run {
        latencies_us: Vec::with_capacity(n as usize),
        errors: 0,
        took: Duration::ZERO,
        late: Duration::ZERO,
    };
    while let Some(done) = calls.join_next().await {
        match done {
            Ok((true, latency, late)) => {
                out.latencies_us
                    .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                out.late += late;
            }
            _ => out.errors += 1,
        }
    }
    out.took = Instant::now().duration_since(start.into_std());
    out
}

async fn call(addr: SocketAddr, token: &str, idle: &Mutex<Vec<Conn>>) -> bool {
    let pooled = idle.lock().ok().and_then(|mut v| v.pop());
    let mut conn = match pooled {
        Some(c) => c,
        None => match connect(addr).await {
            Some(c) => c,
            None => return false,
        },
    };
    let Ok(req) = hyper::Request::get("/invoices/1")
        .header("host", "tools.internal")
        .header("x-aegis-token", token)
        .body(Empty::<Bytes>::new())
    else {
        return false;
    };
    if conn.ready().await.is_err() {
        return false;
    }
    let ok = match conn.send_request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body()).await;
            status == 200 && body.is_ok()
        }
        Err(_) => false,
    };
    if ok && let Ok(mut v) = idle.lock() {
        v.push(conn);
    }
    ok
}

async fn connect(addr: SocketAddr) -> Option<Conn> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .ok()?;
    tokio::spawn(connection);
    Some(sender)
}
