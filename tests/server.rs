//! Health, reflection and tracing, against the real server.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

#[tokio::test]
async fn health_and_reflection_describe_ext_authz() {
    let mut s = start().await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let r = tonic_health::pb::health_client::HealthClient::new(ch.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health");
        assert_eq!(
            r.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut client = ServerReflectionClient::new(ch);
    let reqs = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "envoy.service.auth.v3.Authorization".into(),
        )),
    ];
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .expect("reflection")
        .into_inner();
    let first = stream.message().await.expect("answer").expect("some");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("{first:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"envoy.service.auth.v3.Authorization".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    let second = stream.message().await.expect("answer").expect("some");
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("{second:?}")
    };
    assert!(!files.file_descriptor_proto.is_empty());
    s.stop().await;
}

fn attr(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_span_per_check_child_of_traceparent_received_over_otlp() {
    let sink = aegis::testkit::SpanSink::start_keeping()
        .await
        .expect("sink");
    let endpoint = format!("http://{}", sink.addr);
    let mut s = start_with(|c| c.otlp.endpoint = Some(endpoint)).await;
    let t = s.token("acme", "billing-bot", &["invoices:read"]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let req = Req::get("/invoices")
        .token(&t)
        .tool("invoices", "read")
        .header("traceparent", &format!("00-{trace}-{parent}-01"));
    assert_eq!(code(&s.check(req.build()).await.expect("decided")), 0);
    let deny = Req::get("/invoices").token(&t).tool("invoices", "create");
    assert_eq!(
        code(&s.check(deny.build()).await.expect("decided")),
        tonic::Code::PermissionDenied as i32
    );

    let spans_arrived = eventually(Duration::from_secs(10), || {
        sink.spans.load(std::sync::atomic::Ordering::Acquire) >= 2
    })
    .await;
    assert!(spans_arrived, "two spans exported");
    let received = sink.received.lock().expect("lock").clone();
    let rs = &received[0].resource_spans[0];
    let service = rs
        .resource
        .as_ref()
        .expect("resource")
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone());
    assert_eq!(
        service.and_then(|v| v.value),
        Some(AnyValue::StringValue("aegis".into()))
    );
    let spans = sink.received_spans();
    assert_eq!(spans.len(), 2, "one span per Check");
    let allowed = spans
        .iter()
        .find(|sp| attr(sp, "aegis.decision") == Some(AnyValue::StringValue("allow".into())))
        .expect("allow span");
    assert_eq!(allowed.name, "ext_authz.check");
    assert_eq!(
        aegis::hex(&allowed.trace_id),
        trace,
        "joins the agent's trace"
    );
    assert_eq!(
        aegis::hex(&allowed.parent_span_id),
        parent,
        "child of the caller's span"
    );
    assert_eq!(
        attr(allowed, "aegis.tenant"),
        Some(AnyValue::StringValue("acme".into()))
    );
    assert_eq!(
        attr(allowed, "aegis.agent"),
        Some(AnyValue::StringValue("billing-bot".into()))
    );
    assert_eq!(
        attr(allowed, "aegis.tool"),
        Some(AnyValue::StringValue("invoices".into()))
    );
    assert_eq!(
        attr(allowed, "aegis.action"),
        Some(AnyValue::StringValue("read".into()))
    );
    assert_eq!(
        attr(allowed, "aegis.policy_version"),
        Some(AnyValue::StringValue("default-2026.12.1".into()))
    );
    assert!(
        matches!(attr(allowed, "aegis.decision_id"), Some(AnyValue::StringValue(id)) if id.len() == 32)
    );
    let denied_span = spans
        .iter()
        .find(|sp| attr(sp, "aegis.decision") == Some(AnyValue::StringValue("deny".into())))
        .expect("deny span");
    assert_eq!(
        attr(denied_span, "aegis.reason"),
        Some(AnyValue::StringValue("missing_scope".into()))
    );
    assert!(
        denied_span.parent_span_id.is_empty(),
        "no traceparent: a root span"
    );
    s.stop().await;

    // The audit row carries the same trace and span ids.
    let conn = rusqlite::Connection::open(s.db()).expect("db");
    let (seq, tid, sid): (i64, String, String) = conn
        .query_row(
            "SELECT seq, trace_id, span_id FROM audit_log WHERE kind = 'check' ORDER BY seq LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("row");
    assert_eq!(tid, trace);
    assert_eq!(sid, aegis::hex(&allowed.span_id));
    assert_eq!(
        attr(allowed, "aegis.audit_seq"),
        Some(AnyValue::IntValue(seq))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_never_fails_a_check() {
    // Nothing listens on this port: bind it, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut s = start_with(|c| {
        c.otlp.endpoint = Some(endpoint);
        c.otlp.queue_size = 64;
    })
    .await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let started = std::time::Instant::now();
    for _ in 0..300 {
        let r = s.read_invoices(&t).await;
        assert_eq!(code(&r), 0);
    }
    // Export retries happen on the exporter's own thread; 300 Checks never wait on them.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    s.stop().await;
    assert_eq!(s.rows().len(), 300);
}

/// Envoy cancels (RST_STREAM) every Check that passes its ext_authz timeout, and all of a
/// pod's Checks share one HTTP/2 connection. A burst of cancellations, arriving before the
/// server has accepted the streams, made h2's rapid-reset guard (20 by default) close that
/// connection with GOAWAY `too_many_resets`, failing unrelated Checks. Here 500 Checks are
/// sent and reset in one burst on one connection, then a Check on the same connection must
/// be answered and the connection must still be open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_cancelled_checks_does_not_close_envoys_connection() {
    use prost::Message as _;
    let mut s = start().await;
    let t = s.token("acme", "billing-bot", &["invoices:read"]);
    let message = Req::read_invoices(&t).encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&message);
    let framed = bytes::Bytes::from(framed);
    let request = || {
        http::Request::post(format!(
            "http://{}/envoy.service.auth.v3.Authorization/Check",
            s.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
    };

    let tcp = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let connection = tokio::spawn(connection);
    for _ in 0..500 {
        let mut client = client.clone().ready().await.expect("stream capacity");
        let (response, mut stream) = client.send_request(request(), false).expect("send");
        stream.send_data(framed.clone(), false).expect("data");
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
    }

    let mut client = client
        .ready()
        .await
        .expect("the connection takes new streams");
    let (response, mut stream) = client.send_request(request(), false).expect("send");
    stream.send_data(framed, true).expect("data");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered within 10 s")
        .expect("answered, not refused by a GOAWAY");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").expect("some");
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0"),
        "the Check was decided: {trailers:?}"
    );
    assert!(!connection.is_finished(), "the connection is still open");
    s.stop().await;
}

/// A hostile call's text reaches the SIEM bounded as the audit row is: a 30 KB MCP tool
/// name is cut to `audit::MAX_FIELD_BYTES` in the span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_attributes_are_bounded_like_the_row() {
    let sink = aegis::testkit::SpanSink::start_keeping()
        .await
        .expect("sink");
    let endpoint = format!("http://{}", sink.addr);
    let mut s = start_with(|c| c.otlp.endpoint = Some(endpoint)).await;
    let t = s.token("acme", "billing-bot", &["invoices:read"]);
    let name = format!("{}.read", "x".repeat(30_000));
    let req = Req::mcp(&name, serde_json::json!({"resource": "r".repeat(20_000)})).token(&t);
    let r = s.check(req.build()).await.expect("decided");
    assert_eq!(reason(&r), Some("unknown_tool"));
    assert!(
        eventually(Duration::from_secs(10), || {
            sink.spans.load(std::sync::atomic::Ordering::Acquire) >= 1
        })
        .await,
        "the span arrived"
    );
    let span = sink.received_spans().into_iter().next().expect("one span");
    let Some(AnyValue::StringValue(tool)) = attr(&span, "aegis.tool") else {
        panic!("no aegis.tool: {span:?}")
    };
    assert!(
        tool.len() <= aegis::audit::MAX_FIELD_BYTES,
        "{}",
        tool.len()
    );
    assert!(tool.contains("[truncated: 30000 bytes"), "{tool}");
    s.stop().await;
}
