//! Each decision kind, each token refusal, bodies and MCP, through a real tonic client
//! against the real server on loopback; each outcome also checked in the audit log.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::json;

#[tokio::test]
async fn allow_removes_the_agent_token_and_carries_metadata() {
    let mut s = start().await;
    let t = s.token("acme", "billing-bot", &["invoices:read"]);
    let r = s
        .check(
            Req::get("/invoices/inv-1")
                .token(&t)
                .tool("invoices", "read")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    let okr = ok(&r);
    assert!(
        okr.headers_to_remove.contains(&"x-aegis-token".to_owned()),
        "{okr:?}"
    );
    let md = r.dynamic_metadata.as_ref().expect("dynamic metadata");
    let field = |k: &str| match md.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => s.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(field("decision"), "allow");
    assert_eq!(field("policy_version"), "default-2026.12.1");
    assert_eq!(field("decision_id").len(), 32);
    s.stop().await;
    assert_eq!(
        s.rows(),
        vec![(
            "allow".into(),
            "scope_granted".into(),
            "billing-bot".into(),
            "invoices".into(),
            "read".into()
        )]
    );
}

#[tokio::test]
async fn deny_is_permission_denied_403_with_reason_and_json_body() {
    let mut s = start().await;
    let t = s.token("acme", "billing-bot", &["invoices:read"]);
    let r = s
        .check(
            Req::get("/invoices")
                .token(&t)
                .tool("invoices", "create")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&r), tonic::Code::PermissionDenied as i32);
    let d = denied(&r);
    assert_eq!(d.status.as_ref().map(|s| s.code), Some(403));
    assert_eq!(header(&d.headers, "x-aegis-reason"), Some("missing_scope"));
    let id = header(&d.headers, "x-aegis-decision-id")
        .expect("decision id")
        .to_owned();
    let body: serde_json::Value = serde_json::from_str(&d.body).expect("json body");
    assert_eq!(body["decision"], "deny");
    assert_eq!(body["reason"], "missing_scope");
    assert_eq!(body["decision_id"], id.as_str());
    s.stop().await;
    assert_eq!(s.rows()[0].0, "deny");
    assert_eq!(s.rows()[0].1, "missing_scope");
}

#[tokio::test]
async fn unknown_tool_is_denied() {
    let mut s = start().await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let r = s
        .check(
            Req::mcp("shell.exec", json!({"cmd": "rm -rf /"}))
                .token(&t)
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(reason(&r), Some("unknown_tool"));
    s.stop().await;
}

#[tokio::test]
async fn sanitize_strips_credentials_on_external_tools() {
    let mut s = start().await;
    let t = s.token("acme", "bot", &["github:read"]);
    let req = Req::get("/repos/acme/app/issues/7?access_token=leak&page=2")
        .token(&t)
        .tool("github", "read_issue")
        .header("authorization", "Bearer upstream-secret")
        .header("cookie", "s=1");
    let r = s.check(req.build()).await.expect("decided");
    assert_eq!(code(&r), 0);
    let okr = ok(&r);
    let mut removed = okr.headers_to_remove.clone();
    removed.sort();
    assert_eq!(removed, vec!["authorization", "cookie", "x-aegis-token"]);
    assert_eq!(okr.query_parameters_to_remove, vec!["access_token"]);
    s.stop().await;
    assert_eq!(s.rows()[0].0, "sanitize");
}

#[tokio::test]
async fn large_payment_needs_approval() {
    let mut s = start().await;
    let t = s.token("acme", "billing-bot", &["payments:create"]);
    let r = s
        .check(
            Req::mcp("payments.create", json!({"amount": 5000, "to": "acct-9"}))
                .token(&t)
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&r), tonic::Code::PermissionDenied as i32);
    let d = denied(&r);
    assert_eq!(d.status.as_ref().map(|s| s.code), Some(403));
    assert_eq!(
        header(&d.headers, "x-aegis-approval-required"),
        Some("true")
    );
    assert_eq!(
        header(&d.headers, "x-aegis-reason"),
        Some("payment_above_threshold")
    );
    let small = s
        .check(
            Req::mcp("payments.create", json!({"amount": 50}))
                .token(&t)
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&small), 0);
    s.stop().await;
    let rows = s.rows();
    assert_eq!(
        (rows[0].0.as_str(), rows[0].3.as_str(), rows[0].4.as_str()),
        ("approval_needed", "payments", "create")
    );
    assert_eq!(rows[1].0, "allow");
}

#[tokio::test]
async fn untrusted_content_cannot_trigger_mutation_but_egress_is_allowlisted() {
    let mut s = start().await;
    let t = s.token("acme", "bot", &["github:write", "web:fetch"]);
    let r = s
        .check(
            Req::mcp("github.create_comment", json!({"body": "x"}))
                .token(&t)
                .header("x-aegis-trust-level", "untrusted_external")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(reason(&r), Some("untrusted_content_mutation"));
    let ok_fetch = s
        .check(
            Req::mcp(
                "web_fetch.get",
                json!({"url": "https://docs.example.com/a"}),
            )
            .token(&t)
            .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&ok_fetch), 0);
    let bad_fetch = s
        .check(
            Req::mcp(
                "web_fetch.get",
                json!({"url": "https://attacker.example.net/a"}),
            )
            .token(&t)
            .build(),
        )
        .await
        .expect("decided");
    assert_eq!(reason(&bad_fetch), Some("egress_not_allowed"));
    s.stop().await;
}

/// Expects a 401 deny with `reason`, audited.
async fn expect_401(s: &TestServer, token: Option<&str>, reason: &str) {
    let mut req = Req::get("/invoices").tool("invoices", "read");
    if let Some(t) = token {
        req = req.token(t);
    }
    let r = s.check(req.build()).await.expect("decided, not an error");
    assert_eq!(
        code(&r),
        tonic::Code::Unauthenticated as i32,
        "{reason}: {r:?}"
    );
    let d = denied(&r);
    assert_eq!(d.status.as_ref().map(|s| s.code), Some(401), "{reason}");
    assert_eq!(header(&d.headers, "x-aegis-reason"), Some(reason));
    let body: serde_json::Value = serde_json::from_str(&d.body).expect("json body");
    assert_eq!(body["reason"], reason);
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_audited() {
    let mut s = start().await;
    let good = claims("acme", "bot", &["invoices:read"]);
    let kid = s.signer.kid().to_owned();
    let payload = b64(&serde_json::to_value(&good).expect("claims json"));

    let with = |c: aegis::identity::Claims| Some(mint(&s.signer, c));
    let other = aegis::keys::Signer::generate().expect("key");
    // Another key's token under our key id: the signature does not verify.
    let forged_sig = mint(&other, good.clone());
    let (_, rest) = forged_sig.split_once('.').expect("jwt");
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "token_missing"),
        (Some("not-a-jwt".into()), "token_malformed"),
        (
            with(aegis::identity::Claims {
                exp: now() - 60,
                ..good.clone()
            }),
            "token_expired",
        ),
        (
            with(aegis::identity::Claims {
                nbf: now() + 600,
                ..good.clone()
            }),
            "token_not_yet_valid",
        ),
        (
            with(aegis::identity::Claims {
                aud: aegis::identity::Audience::One("someone-else".into()),
                ..good.clone()
            }),
            "token_wrong_audience",
        ),
        (
            with(aegis::identity::Claims {
                iss: "evil".into(),
                ..good.clone()
            }),
            "token_wrong_issuer",
        ),
        (Some(mint(&other, good.clone())), "token_unknown_key"),
        (
            Some(format!(
                "{}.{rest}",
                b64(&json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}))
            )),
            "token_bad_signature",
        ),
        // alg none, and HS256 "keyed" with the public key.
        (
            Some(format!(
                "{}.{payload}.",
                b64(&json!({"alg": "none", "kid": kid}))
            )),
            "token_bad_algorithm",
        ),
        (
            Some(format!(
                "{}.{payload}.AAAA",
                b64(&json!({"alg": "HS256", "kid": kid}))
            )),
            "token_bad_algorithm",
        ),
    ];
    for (token, reason) in &cases {
        expect_401(&s, token.as_deref(), reason).await;
    }

    // Revocation by jti is checked on every call, even for a cached token.
    let t = mint(&s.signer, good.clone());
    let r = s.read_invoices(&t).await;
    assert_eq!(code(&r), 0);
    s.running
        .as_ref()
        .expect("running")
        .revocations
        .revoke_token(&good.jti);
    expect_401(&s, Some(&t), "token_revoked").await;

    s.stop().await;
    let rows = s.rows();
    let reasons: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        reasons,
        vec![
            "token_missing",
            "token_malformed",
            "token_expired",
            "token_not_yet_valid",
            "token_wrong_audience",
            "token_wrong_issuer",
            "token_unknown_key",
            "token_bad_signature",
            "token_bad_algorithm",
            "token_bad_algorithm",
            "scope_granted",
            "token_revoked",
        ]
    );
    // A token whose signature verified names its agent even when refused; a forged one does not.
    let agent_of = |reason: &str| {
        rows.iter()
            .find(|r| r.1 == reason)
            .map(|r| r.2.clone())
            .unwrap_or_default()
    };
    assert_eq!(agent_of("token_expired"), "bot");
    assert_eq!(agent_of("token_revoked"), "bot");
    assert_eq!(agent_of("token_bad_signature"), "");
    assert_eq!(agent_of("token_unknown_key"), "");
}

#[tokio::test]
async fn bearer_tokens_when_configured() {
    let mut s = start_with(|c| c.token.header = "authorization".into()).await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let r = s
        .check(
            Req::get("/invoices")
                .header("authorization", &format!("Bearer {t}"))
                .tool("invoices", "read")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&r), 0);
    assert!(
        ok(&r)
            .headers_to_remove
            .contains(&"authorization".to_owned())
    );
    let r = s
        .check(
            Req::get("/invoices")
                .header("authorization", &format!("Basic {t}"))
                .tool("invoices", "read")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(reason(&r), Some("token_malformed"));
    s.stop().await;
}

#[tokio::test]
async fn bodies_json_form_malformed_and_oversized() {
    let mut s = start_with(|c| c.limits.max_body_bytes = 4096).await;
    let t = s.token("acme", "bot", &["invoices:write"]);
    // Form body: parsed, and the tool from headers.
    let form = Req::post(
        "/invoices",
        "application/x-www-form-urlencoded",
        "amount=10&memo=a+b",
    )
    .token(&t)
    .tool("invoices", "create");
    assert_eq!(code(&s.check(form.build()).await.expect("decided")), 0);
    // Malformed JSON: a client error, 400 with a reason, never a gRPC error.
    let bad = Req::post("/mcp", "application/json", "{\"jsonrpc\": \"2.0\", ").token(&t);
    let r = s
        .check(bad.build())
        .await
        .expect("decided, not an internal error");
    assert_eq!(code(&r), tonic::Code::InvalidArgument as i32);
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(400));
    assert_eq!(reason(&r), Some("malformed_body"));
    // MCP request without a tool name.
    let no_name = Req::post(
        "/mcp",
        "application/json",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#,
    )
    .token(&t);
    let r = s.check(no_name.build()).await.expect("decided");
    assert_eq!(reason(&r), Some("malformed_mcp_request"));
    // Too deep JSON.
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let r = s
        .check(Req::post("/x", "application/json", &deep).token(&t).build())
        .await
        .expect("decided");
    assert_eq!(reason(&r), Some("body_too_deep"));
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(400));
    // Oversized body: 413.
    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(5000));
    let r = s
        .check(Req::post("/x", "application/json", &big).token(&t).build())
        .await
        .expect("decided");
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(413));
    // Truncated body (Envoy's allow_partial_message): the default policy refuses to guess.
    let cut = Req::post("/mcp", "application/json", "{\"jsonrpc\":\"2.0\",\"meth")
        .token(&t)
        .header("x-envoy-auth-partial-body", "true");
    let r = s.check(cut.build()).await.expect("decided");
    assert_eq!(reason(&r), Some("body_truncated"));
    // No HTTP attributes at all.
    let empty = envoy_types::ext_authz::v3::pb::CheckRequest::default();
    let r = s.check(empty).await.expect("decided");
    assert_eq!(reason(&r), Some("malformed_request"));
    s.stop().await;
    let rows = s.rows();
    assert_eq!(rows.len(), 7);
    assert_eq!(rows[0].0, "allow");
    // The agent is known even when its request is malformed: it is in the row.
    assert_eq!(rows[1].2, "bot");
}

#[tokio::test]
async fn mcp_session_plumbing_is_allowed_without_scopes() {
    let mut s = start().await;
    let t = s.token("acme", "bot", &[]);
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let r = s
        .check(
            Req::post("/mcp", "application/json", body)
                .token(&t)
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&r), 0);
    s.stop().await;
    assert_eq!(s.rows()[0].3, "mcp");
    assert_eq!(s.rows()[0].4, "tools/list");
}

/// The bypasses an agent found with a real Envoy in front, sent straight over ext_authz as
/// a proxy that labels nothing and normalizes nothing would: each is refused with a
/// reason that names it, while the legitimate calls still pass.
#[tokio::test]
async fn the_agent_cannot_choose_what_the_policy_sees() {
    let mut s = start().await;
    let nobody = s.token("acme", "agent-0", &[]);
    let reader = s.token("acme", "agent-1", &["invoices:read"]);
    let outcome = |r: &envoy_types::ext_authz::v3::pb::CheckResponse| -> String {
        if code(r) == 0 {
            "allow".into()
        } else {
            reason(r).unwrap_or("?").to_owned()
        }
    };
    let check = async |req: Req| outcome(&s.check(req.build()).await.expect("decided"));
    let labelled = |r: Req| {
        r.header("x-aegis-tool", "mcp")
            .header("x-aegis-action", "ping")
    };
    let pay = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"payments.create","arguments":{"amount":5000,"to":"acct-9"}}}"#;

    let cases: Vec<(&str, Req, &str)> = vec![
        (
            "agent labels on a payment",
            labelled(Req::post("/payments/create", "application/json", "{}").token(&nobody)),
            "missing_scope",
        ),
        (
            "agent labels on an unknown route",
            labelled(Req::get("/invoices/42").token(&nobody)).method("DELETE"),
            "unknown_route",
        ),
        (
            "invoices labels on a payment",
            Req::post("/payments/create", "application/json", r#"{"amount":5000}"#)
                .token(&reader)
                .header("x-aegis-tool", "invoices")
                .header("x-aegis-action", "read"),
            "missing_scope",
        ),
        (
            "a JSON-RPC ping body off the MCP route",
            Req::post(
                "/payments/create",
                "application/json",
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","amount":5000}"#,
            )
            .token(&nobody),
            "missing_scope",
        ),
        (
            "a JSON-RPC batch",
            Req::post("/mcp", "application/json", &format!("[{pay}]")).token(&nobody),
            "jsonrpc_batch_refused",
        ),
        (
            "a mixed-case content type",
            Req::post("/mcp", "Application/JSON", pay)
                .token(&reader)
                .header("x-aegis-tool", "invoices")
                .header("x-aegis-action", "read"),
            "missing_scope",
        ),
        (
            "text/plain",
            Req::post("/mcp", "text/plain", pay).token(&reader),
            "unsupported_media_type",
        ),
        (
            "a JSON body sent as a form to a JSON route",
            Req::post(
                "/payments/create",
                "application/x-www-form-urlencoded",
                r#"{"memo":"&amount=5000&x=","amount":5}"#,
            )
            .token(&nobody),
            "unsupported_media_type",
        ),
        (
            "keys equal under Unicode case folding",
            Req::post(
                "/mcp",
                "application/json",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"invoices.read"},"paramſ":{"name":"payments.create"}}"#,
            )
            .token(&reader),
            "malformed_body",
        ),
        (
            "a path parameter on a dot segment",
            Req::get("/invoices/..;/payments/1").token(&reader),
            "path_not_normalized",
        ),
        (
            "a double-encoded dot segment",
            Req::get("/invoices/%252e%252e/payments/1").token(&reader),
            "path_not_normalized",
        ),
        (
            "a method override",
            Req::post("/invoices", "application/json", "{}")
                .token(&reader)
                .header("x-http-method-override", "DELETE"),
            "method_override_refused",
        ),
        (
            "a tools/call of the MCP plumbing",
            Req::post(
                "/mcp",
                "application/json",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"mcp.ping"}}"#,
            )
            .token(&nobody),
            "malformed_mcp_request",
        ),
        (
            "duplicate method keys",
            Req::post(
                "/mcp",
                "application/json",
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"payments.create"}}"#,
            )
            .token(&reader),
            "malformed_body",
        ),
        (
            "dot segments",
            Req::get("/invoices/../payments/1").token(&reader),
            "path_not_normalized",
        ),
        (
            "encoded dot segments",
            Req::get("/invoices/%2e%2e/payments/1").token(&reader),
            "path_not_normalized",
        ),
        (
            "an encoded slash",
            Req::get("/invoices/..%2Fpayments/1").token(&reader),
            "path_not_normalized",
        ),
        (
            "a body of exactly Envoy's limit, marked whole, no content-length",
            Req::post(
                "/payments/create",
                "application/json",
                &format!(r#"{{"amount":5,"memo":"{}"}}"#, "x".repeat(65536 - 22)),
            )
            .token(&nobody)
            .header("x-envoy-auth-partial-body", "false"),
            "body_truncated",
        ),
        (
            "an MCP call whose tool the route does not serve",
            Req::post("/tools/invoices", "application/json", pay)
                .token(&reader)
                .label("aegis.protocol", "mcp")
                .label("aegis.tool", "invoices"),
            "mcp_tool_mismatch",
        ),
        (
            "agent labels that disagree on a verify route",
            Req::get("/invoices/1")
                .token(&reader)
                .label("aegis.labels", "verify")
                .header("x-aegis-action", "list"),
            "action_label_mismatch",
        ),
    ];
    let mut got = Vec::new();
    for (what, req, want) in cases {
        got.push((what, check(req).await, want));
    }
    for (what, got, want) in &got {
        assert_eq!(got, want, "{what}");
    }
    // The legitimate calls still pass.
    assert_eq!(
        check(Req::get("/invoices/42").token(&reader)).await,
        "allow"
    );
    let read = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"invoices.read","arguments":{"id":"42"}}}"#;
    assert_eq!(
        check(Req::post("/mcp", "application/json", read).token(&reader)).await,
        "allow"
    );
    s.stop().await;
}

/// A route label Aegis does not know, or a bad value, is the platform's mistake: the Check
/// fails (Envoy's status_on_error answers), naming the label, and is audited as an error.
#[tokio::test]
async fn a_misconfigured_route_label_fails_the_check_naming_it() {
    let mut s = start().await;
    let t = s.token("acme", "agent-1", &["invoices:read"]);
    for (k, v) in [("aegis.tol", "invoices"), ("aegis.protocol", "grpc")] {
        let err = s
            .check(Req::get("/invoices/1").token(&t).label(k, v).build())
            .await
            .expect_err("a gRPC error");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains(k), "{}", err.message());
    }
    s.stop().await;
    assert!(s.rows().iter().all(|r| r.0 == "error"), "{:?}", s.rows());
}
