//! Aegis behind a real Envoy 1.40 running deploy/envoy.yaml (only its addresses changed,
//! see tests/common/envoy.rs): what the agent sees, what reaches the tool, that every
//! Check Envoy sends is one audit row, that Envoy's spans reach the collector, and that
//! Envoy itself accepts the shipped file.

mod common;

use std::time::Duration;

use aegis::bench::SpanSink;
use common::TestServer;
use common::envoy::{self, Envoy, Upstream};
use opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue;

/// Aegis (exporting its spans to `sink`), the tools, and Envoy in front of both.
struct Stack {
    aegis: TestServer,
    sink: SpanSink,
    upstream: Upstream,
    envoy: Envoy,
}

async fn stack() -> Stack {
    let sink = SpanSink::start_keeping().await.expect("span sink starts");
    let endpoint = format!("http://{}", sink.addr);
    let aegis = common::start_with(|c| c.otlp.endpoint = Some(endpoint)).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(aegis.addr, upstream.addr, sink.addr).await;
    Stack {
        aegis,
        sink,
        upstream,
        envoy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_call_reaches_the_tool_without_the_agent_token() {
    let st = stack().await;
    let token = st.aegis.token("acme", "agent-1", &["invoices:read"]);

    let r = envoy::request(
        st.envoy.listener(),
        "GET",
        "/invoices/1",
        &[("x-aegis-token", &token)],
        b"",
    )
    .await;

    assert_eq!(r.status, 200, "{r:?}\n{}", st.envoy.log());
    assert_eq!(r.text(), r#"{"ok":true}"#);
    let got = st.upstream.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].method.as_str(), got[0].path.as_str()),
        ("GET", "/invoices/1")
    );
    assert_eq!(got[0].header("x-aegis-token"), None, "{:?}", got[0].headers);
    assert!(
        got[0].header("x-request-id").is_some(),
        "{:?}",
        got[0].headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_token_gets_401_and_reaches_nothing() {
    let st = stack().await;

    let r = envoy::request(st.envoy.listener(), "GET", "/invoices/1", &[], b"").await;

    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.header("x-aegis-reason").is_some(), "{r:?}");
    assert!(st.upstream.requests().is_empty());
    let rows = st.aegis.rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "deny", "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_envoy_sends_is_one_audit_row() {
    let st = stack().await;
    let token = st.aegis.token("acme", "agent-1", &["invoices:read"]);
    let listener = st.envoy.listener();
    envoy::request(
        listener,
        "GET",
        "/invoices/1",
        &[("x-aegis-token", &token)],
        b"",
    )
    .await;
    envoy::request(listener, "GET", "/invoices/2", &[], b"").await;

    // The row is written before the answer leaves Aegis, so only Envoy's counter may lag.
    let checks = st.aegis.rows().len() as u64;
    assert_eq!(checks, 2);
    let sent = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = st.envoy.stat("cluster.aegis.upstream_rq_total").await;
            if n >= checks {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("envoy counts its Checks");
    assert_eq!(sent, checks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_exports_its_spans_to_the_collector() {
    let st = stack().await;
    let token = st.aegis.token("acme", "agent-1", &["invoices:read"]);
    // Each call is two spans of Envoy's (its own and its ext_authz client's); its
    // OpenTelemetry tracer exports once 5 are buffered, else every 5 s.
    for _ in 0..3 {
        let r = envoy::request(
            st.envoy.listener(),
            "GET",
            "/invoices/1",
            &[("x-aegis-token", &token)],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    let from_envoy = || {
        let received = st.sink.received.lock().expect("sink lock");
        received
            .iter()
            .flat_map(|req| &req.resource_spans)
            .filter(|rs| {
                rs.resource.as_ref().is_some_and(|res| {
                    res.attributes.iter().any(|kv| {
                        kv.key == "service.name"
                            && matches!(
                                kv.value.as_ref().and_then(|v| v.value.as_ref()),
                                Some(StringValue(name)) if name == "agent-envoy"
                            )
                    })
                })
            })
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum::<usize>()
    };
    assert!(
        common::eventually(Duration::from_secs(15), || from_envoy() > 0).await,
        "no span from Envoy reached the collector:\n{}",
        st.envoy.log()
    );
}

#[test]
fn deploy_envoy_yaml_passes_envoy_validate() {
    let (ok, output) = envoy::validate(&envoy::shipped_config());
    assert!(ok, "{output}");
}
