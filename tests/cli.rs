//! The README's walkthrough through the real binary: `aegis serve`, `aegis token issue`,
//! `aegis check`, `aegis audit verify`.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;

fn aegis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(args)
        .output()
        .expect("runs")
}

#[test]
fn walkthrough_serve_issue_check_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data").to_string_lossy().into_owned();
    let server = common::spawn_serve(&["--data-dir", &data]);
    let addr = server.addr.to_string();

    let out = aegis(&[
        "token",
        "issue",
        "--data-dir",
        &data,
        "--tenant",
        "acme",
        "--agent",
        "billing-bot",
        "--scopes",
        "invoices:read,payments:create",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let token = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();

    let allowed = aegis(&[
        "check", "--addr", &addr, "--token", &token, "--tool", "invoices", "--action", "read",
    ]);
    assert_eq!(allowed.status.code(), Some(0), "{allowed:?}");
    let v: serde_json::Value = serde_json::from_slice(&allowed.stdout).expect("json");
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["headers_to_remove"], serde_json::json!(["x-aegis-token"]));

    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"payments.create","arguments":{"amount":5000}}}"#;
    let approval = aegis(&[
        "check", "--addr", &addr, "--token", &token, "--method", "POST", "--path", "/mcp",
        "--body", body,
    ]);
    assert_eq!(approval.status.code(), Some(1), "{approval:?}");
    let v: serde_json::Value = serde_json::from_slice(&approval.stdout).expect("json");
    assert_eq!(
        (v["decision"].as_str(), v["http_status"].as_i64()),
        (Some("approval_needed"), Some(403))
    );
    assert!(
        v["approval_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("apr-")),
        "{v}"
    );

    drop(server);
    let verify = aegis(&["audit", "verify", "--data-dir", &data]);
    assert_eq!(verify.status.code(), Some(0), "{verify:?}");
    assert!(
        // The two Checks, the pending approval the second raised, and the start-up
        // activation of the default policy.
        String::from_utf8_lossy(&verify.stdout).contains("intact: 4 rows"),
        "{verify:?}"
    );

    // Nothing listening: a clear error and exit code 2.
    let down = aegis(&["check", "--addr", &addr, "--token", &token]);
    assert_eq!(down.status.code(), Some(2), "{down:?}");
}
