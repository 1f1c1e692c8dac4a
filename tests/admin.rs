//! The admin listener: a Prometheus scrape parses and its counters move with the Checks
//! and sheds a client sees; the HTTP probes agree with readiness.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (status code, body) of one raw HTTP/1.1 request.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: aegis\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
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
        assert!(typed.contains(name), "{name} has no TYPE line");
        samples.insert(key.to_owned(), value.parse().expect("number"));
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_checks_and_sheds_and_probes_agree() {
    let mut s = start_with(|c| {
        c.limits.max_inflight = 4;
        c.audit.queue_capacity = 64;
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
    for _ in 0..2 {
        assert_ne!(code(&s.read_invoices(&nobody).await), 0);
    }
    let after = scrape(&http(admin, "GET", "/metrics").await.1);
    let moved = |k: &str| after[k] - before[k];
    assert_eq!(moved("aegis_checks_total{decision=\"allow\"}"), 3.0);
    assert_eq!(moved("aegis_checks_total{decision=\"deny\"}"), 2.0);

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
