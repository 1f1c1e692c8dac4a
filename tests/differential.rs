//! The RVM serves Checks; the interpreter is regorus's reference semantics. On the default
//! bundle they must agree on every decision, over a wide spread of inputs. A bundle the RVM
//! cannot compile (it has no `with`) is served by the interpreter.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use aegis::policy::{BundleSource, CompiledBundle, Evaluator};
use common::policy_options;
use serde_json::json;

#[test]
fn rvm_and_interpreter_agree_on_the_default_bundle() {
    let bundle =
        CompiledBundle::load(&BundleSource::Embedded, &policy_options()).expect("default bundle");
    assert_eq!(bundle.evaluator(), Evaluator::Rvm);
    let tools = [
        (
            "invoices",
            vec!["read", "list", "create", "update", "delete_all"],
        ),
        ("payments", vec!["read", "create", "refund"]),
        (
            "github",
            vec!["read_issue", "read_repo", "create_comment", "push"],
        ),
        ("web_fetch", vec!["get"]),
        ("slack", vec!["post_message"]),
        (
            "mcp",
            vec!["initialize", "tools/list", "sampling/createMessage"],
        ),
        ("shell", vec!["exec"]),
        ("", vec![""]),
    ];
    let scope_sets = [
        json!([]),
        json!(["invoices:read"]),
        json!(["invoices:read", "invoices:write", "payments:create"]),
        json!(["github:read", "github:write", "web:fetch", "slack:post"]),
        json!(["payments:read", "payments:create", "web:fetch"]),
    ];
    let argument_sets = [
        json!({}),
        json!({"amount": 5}),
        json!({"amount": 1000}),
        json!({"amount": 1000.5}),
        json!({"amount": "9999"}),
        json!({"url": "https://api.github.com/x"}),
        json!({"url": "https://API.GITHUB.COM:443/x"}),
        json!({"url": "https://api.github.com@evil.example.net/"}),
        json!({"url": "ftp://api.github.com/"}),
        json!({"url": 42}),
    ];
    let trust = ["internal", "untrusted_external", "unspecified"];
    let headers = [
        json!({}),
        json!({"authorization": "Bearer x", "accept": "*/*"}),
        json!({"cookie": "a=b", "x-api-key": "k"}),
    ];
    let queries = [json!({}), json!({"access_token": ["t"], "page": ["1"]})];
    let mut checked = 0;
    for (tool, actions) in &tools {
        for action in actions {
            for scopes in &scope_sets {
                for (i, args) in argument_sets.iter().enumerate() {
                    let t = trust[i % trust.len()];
                    let h = &headers[(i + checked) % headers.len()];
                    let q = &queries[checked % queries.len()];
                    let input = json!({
                        "attributes": {"request": {"http": {"method": "POST", "path": "/mcp", "headers": h}}},
                        "parsed_path": ["mcp"],
                        "parsed_query": q,
                        "parsed_body": null,
                        "truncated_body": checked % 97 == 0,
                        "agent": {"id": "a", "tenant": "t", "scopes": scopes, "session": "s", "status": "active"},
                        "tool": {"name": tool, "action": action, "arguments": args, "resource": ""},
                        "context": {"trust_level": t, "run_id": "", "parent_agent": ""},
                    });
                    let value = regorus::Value::from(input.clone());
                    let rvm = bundle.evaluate_raw(value.clone()).expect("rvm evaluates");
                    let interp = bundle.interpret(value).expect("interpreter evaluates");
                    assert_eq!(rvm, interp, "RVM and interpreter differ on {input}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 900, "{checked} inputs");
}

#[test]
fn a_bundle_the_rvm_cannot_compile_is_served_by_the_interpreter() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("p.rego"),
        "package aegis.authz\nimport rego.v1\n\nclean if not input.a.b == \"s3cret\"\n\n# `with` is not supported by the RVM compiler.\nstill_clean if clean with input.extra as 1\n\ndecision := {\"allowed\": true} if still_clean\n\ndecision := {\"allowed\": false} if not still_clean\n",
    )
    .expect("write");
    let bundle = CompiledBundle::load(
        &BundleSource::Dir(dir.path().to_path_buf()),
        &policy_options(),
    )
    .expect("loads");
    assert_eq!(bundle.evaluator(), Evaluator::Interpreter);
    let leak = bundle
        .evaluate(regorus::Value::from(json!({"a": {"b": "s3cret"}})))
        .expect("decides");
    assert!(!leak.verdict.allows());
    let clean = bundle
        .evaluate(regorus::Value::from(json!({"a": {"b": "fine"}})))
        .expect("decides");
    assert!(clean.verdict.allows());
}
