//! The admin listener: a Prometheus scrape parses and its counters move with the Checks
//! and sheds a client sees; the HTTP probes agree with readiness.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;

/// (status code, body) of one raw HTTP/1.1 request.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let out = common::http(addr, method, path).await;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// Parses the Prometheus text format: `name{labels}` → value; every sample line must
/// parse and every metric must have HELP and TYPE.
fn scrape(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split_whitespace().next().expect("name").to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("sample line");
        let name = key.split('{').next().expect("name");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "{name} has no TYPE line");
        samples.insert(key.to_owned(), value.parse().expect("number"));
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_checks_and_sheds_and_probes_agree() {
    // Its burst past saturation takes both cores: the other test waits (see common::CORES).
    let _cores = common::CORES.write().await;
    let mut s = start_with(|c| {
        c.limits.max_inflight = 4;
        c.audit.queue_capacity = 64;
        c.correlation.deny_storm_count = 2;
    })
    .await;
    let admin = s.running.as_ref().expect("running").admin_addr;
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let before = scrape(&body);
    assert_eq!(before["aegis_checks_inflight_limit"], 4.0);
    assert_eq!(before["aegis_audit_queue_capacity"], 64.0);
    assert_eq!(before["aegis_ready"], 1.0);

    let reader = s.token("acme", "reader", &["invoices:read"]);
    let nobody = s.token("acme", "nobody", &[]);
    for _ in 0..3 {
        assert_eq!(code(&s.read_invoices(&reader).await), 0);
    }
    let mut deny_reason = String::new();
    for _ in 0..2 {
        let r = s.read_invoices(&nobody).await;
        assert_ne!(code(&r), 0);
        deny_reason = reason(&r).expect("reason").to_owned();
    }
    // Two denies make a deny storm at this threshold: an incident, counted by kind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        let after = scrape(&http(admin, "GET", "/metrics").await.1);
        if after.get("aegis_incidents_total{kind=\"deny_storm\"}") == Some(&1.0)
            || std::time::Instant::now() > deadline
        {
            break after;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        after.get("aegis_incidents_total{kind=\"deny_storm\"}"),
        Some(&1.0),
        "deny storm counted: {after:?}"
    );
    let moved =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(moved("aegis_checks_total{decision=\"allow\"}"), 3.0);
    assert_eq!(moved("aegis_checks_total{decision=\"deny\"}"), 2.0);
    // By reason: the reason the agent saw, and every allow under some reason.
    assert_eq!(
        moved(&format!(
            "aegis_check_decisions_total{{decision=\"deny\",reason=\"{deny_reason}\"}}"
        )),
        2.0
    );
    let allows: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("aegis_check_decisions_total{decision=\"allow\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(allows, 3.0);
    // Latency: one observation per Check, in a bucket at or under +Inf, and cumulative.
    assert_eq!(moved("aegis_check_duration_seconds_count"), 5.0);
    assert_eq!(
        after["aegis_check_duration_seconds_bucket{le=\"+Inf\"}"],
        after["aegis_check_duration_seconds_count"]
    );
    assert!(
        after["aegis_check_duration_seconds_bucket{le=\"0.00005\"}"]
            <= after["aegis_check_duration_seconds_bucket{le=\"2.5\"}"]
    );
    assert!(moved("aegis_check_duration_seconds_sum") > 0.0);
    // Audit: every row went through a commit; at least one commit was timed.
    assert!(moved("aegis_audit_commit_rows_sum") >= 5.0);
    assert!(moved("aegis_audit_commit_duration_seconds_count") >= 1.0);
    assert_eq!(after["aegis_audit_commit_failures_total"], 0.0);
    // The revision being enforced.
    let current = s.running.as_ref().expect("running").policy.current();
    let info = format!(
        "aegis_policy_revision_info{{revision=\"{}\",digest=\"{}\"}}",
        current.revision(),
        current.digest()
    );
    assert_eq!(after.get(&info), Some(&1.0), "{info} in {after:?}");

    // A revoked token is counted as it is applied.
    let root = s.operator("root", Role::Admin, "*");
    let ctl = s.control(&root).await;
    ctl.register("acme", "temp").await;
    let (_, jti) = ctl.issue("acme", "temp", &["invoices:read"], "").await;
    ctl.api()
        .revoke_token(ctl.req(pb::RevokeTokenRequest {
            tenant: "acme".into(),
            jti,
            reason: "test".into(),
        }))
        .await
        .expect("revoked");
    let revoked = scrape(&http(admin, "GET", "/metrics").await.1);
    assert_eq!(
        revoked["aegis_revocations_applied_total{kind=\"token\"}"]
            - before["aegis_revocations_applied_total{kind=\"token\"}"],
        1.0
    );

    // Past saturation the shed counter moves by what the callers were refused.
    let mut callers = Vec::new();
    for _ in 0..48 {
        let mut c = client(s.addr).await;
        let t = reader.clone();
        callers.push(tokio::spawn(async move {
            let mut shed = 0u64;
            for _ in 0..50 {
                if let Err(e) = c.check(Req::read_invoices(&t)).await {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                    shed += 1;
                }
            }
            shed
        }));
    }
    let mut shed = 0;
    for c in callers {
        shed += c.await.expect("caller");
    }
    let last = scrape(&http(admin, "GET", "/metrics").await.1);
    let counted = last["aegis_checks_shed_total{cause=\"max_inflight\"}"]
        + last["aegis_checks_shed_total{cause=\"audit_queue_full\"}"];
    assert!(shed > 0, "48 callers against 4 places are shed");
    assert_eq!(counted, shed as f64, "every shed Check is counted");
    assert_eq!(last["aegis_checks_inflight"], 0.0);

    assert_eq!(http(admin, "GET", "/healthz").await.0, 200);
    assert_eq!(http(admin, "GET", "/readyz").await.0, 200);
    assert_eq!(http(admin, "POST", "/metrics").await.0, 405);
    assert_eq!(http(admin, "GET", "/nope").await.0, 404);

    // Readiness over HTTP follows the same verdict as gRPC health.
    let key = s.data_dir().join(aegis::keys::SIGNING_KEY_FILE);
    let aside = s.data_dir().join("key.aside");
    std::fs::rename(&key, &aside).expect("move key");
    let (status, body) = http(admin, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("signing key"), "{body}");
    std::fs::rename(&aside, &key).expect("restore");
    assert_eq!(http(admin, "GET", "/readyz").await.0, 200);
    s.stop().await;
}

/// The scrape parsed by the Prometheus project's own Python parser
/// (`prometheus_client.parser`, installed in the tests' venv): every family, its type,
/// and a few values agree with what the Rust reading above sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_parses_with_prometheus_client() {
    let _cores = common::CORES.read().await;
    let mut s = start().await;
    let admin = s.running.as_ref().expect("running").admin_addr;
    let reader = s.token("acme", "reader", &["invoices:read"]);
    assert_eq!(code(&s.read_invoices(&reader).await), 0);
    assert_ne!(code(&s.read_invoices("garbage").await), 0);
    let (_, body) = http(admin, "GET", "/metrics").await;
    let file = s.dir.path().join("scrape.txt");
    std::fs::write(&file, &body).expect("write");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(out))
"#;
    let out = std::process::Command::new(venv_python())
        .args(["-c", script])
        .arg(&file)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "prometheus_client refused the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let kind = |f: &str| families[f]["type"].as_str().unwrap_or("missing").to_owned();
    // prometheus_client names counter families without `_total`.
    assert_eq!(kind("aegis_checks"), "counter");
    assert_eq!(kind("aegis_check_decisions"), "counter");
    assert_eq!(kind("aegis_check_duration_seconds"), "histogram");
    assert_eq!(kind("aegis_audit_commit_duration_seconds"), "histogram");
    assert_eq!(kind("aegis_audit_commit_rows"), "histogram");
    assert_eq!(kind("aegis_policy_revision_info"), "gauge");
    assert_eq!(kind("aegis_incidents"), "counter");
    assert_eq!(kind("aegis_revocations_applied"), "counter");
    assert_eq!(kind("aegis_ready"), "gauge");
    let value = |family: &str, sample: &str, labels: serde_json::Value| {
        families[family]["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .find(|x| x[0] == sample && x[1] == labels)
            .and_then(|x| x[2].as_f64())
    };
    assert_eq!(
        value(
            "aegis_checks",
            "aegis_checks_total",
            serde_json::json!({"decision": "allow"})
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "aegis_check_decisions",
            "aegis_check_decisions_total",
            serde_json::json!({"decision": "deny", "reason": "token_malformed"})
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "aegis_check_duration_seconds",
            "aegis_check_duration_seconds_count",
            serde_json::json!({})
        ),
        Some(2.0)
    );
    s.stop().await;
}

/// A collector that takes the connection and never answers (a SIEM pipeline stuck behind
/// a full disk): the Checks keep their pace, and what the span queue could not hold is
/// counted in the scrape, not only lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_a_stalled_collector_cannot_take_are_counted_and_checks_keep_their_pace() {
    let _cores = common::CORES.read().await;
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", collector.local_addr().expect("addr"));
    // Accepts every connection and holds it without a byte in reply.
    let stalled = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = collector.accept().await {
            held.push(socket);
        }
    });
    const CAPACITY: u64 = 64;
    const CHECKS: u64 = 300;
    let s = start_with(|c| {
        c.otlp.endpoint = Some(endpoint);
        c.otlp.queue_size = CAPACITY as usize;
    })
    .await;
    let admin = s.running.as_ref().expect("running").admin_addr;
    let reader = s.token("acme", "reader", &["invoices:read"]);
    let started = std::time::Instant::now();
    for _ in 0..CHECKS {
        assert_eq!(code(&s.read_invoices(&reader).await), 0);
    }
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");

    let m = scrape(&http(admin, "GET", "/metrics").await.1);
    let spans = |outcome: &str| m[&format!("aegis_spans_total{{outcome=\"{outcome}\"}}")];
    assert_eq!(
        spans("exported"),
        0.0,
        "nothing reached a collector that never answers"
    );
    let held = m["aegis_span_queue_depth"];
    assert!(
        held <= CAPACITY as f64,
        "held {held} past the capacity {CAPACITY}"
    );
    // Each export waits out its 5 s timeout: while the first does, at most CAPACITY spans
    // are held and the rest of the Checks' spans are dropped.
    let failed_exports = spans("failed") / CAPACITY as f64;
    let at_least = CHECKS as f64 - CAPACITY as f64 * (1.0 + failed_exports);
    assert!(
        spans("dropped") >= at_least && spans("dropped") > 0.0,
        "dropped {} (failed {}, held {held}) after {took:?}",
        spans("dropped"),
        spans("failed")
    );
    // Every Check's span is accounted for (checkpoint spans come on top).
    assert!(
        spans("dropped") + spans("failed") + held >= CHECKS as f64,
        "{m:?}"
    );
    stalled.abort();
}
