//! The README's incident walkthrough, command for command, through the real binary: an
//! agent reads a private repository and posts to the outside; the tenant runs at L3, so
//! the agent is frozen and the SOC's webhook has the critical notification; the analyst
//! shows the incident, draws its graph, exports and verifies an evidence bundle, rotates
//! the token and closes the incident.
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

/// A Slack stand-in on a loopback port: answers 200, hands over each body.
async fn slack() -> (u16, tokio::sync::mpsc::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    (port, webhook_receiver(listener, vec![]))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = aegis_cmd(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "aegis {args:?}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_incident_walkthrough() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("aegis-data");
    let data_s = data.to_string_lossy().into_owned();
    let (port, mut hook) = slack().await;
    let config = dir.path().join("aegis.toml");
    std::fs::write(
        &config,
        format!(
            "[[notify.webhooks]]\ntenant = \"acme\"\nurl = \"http://127.0.0.1:{port}/services/T000/B000/XXXX\"\nmin_severity = \"high\"\n"
        ),
    )
    .expect("config");
    let config_s = config.to_string_lossy().into_owned();
    let mut server = spawn_serve(&["--data-dir", &data_s, "--config", &config_s]);
    let cp = format!(
        "http://{}",
        server
            .announced(aegis::server::CONTROL_ANNOUNCE)
            .expect("control address")
    );
    let authz = server.addr.to_string();
    let soc = operator_cmd(&data, "soc", "admin", "*");
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--server", &cp, "--token", &soc];
        all.extend_from_slice(args);
        ok(&all)
    };

    ctl(&[
        "tenants",
        "set",
        "acme",
        "--autonomy",
        "L3",
        "--reason",
        "SOC runbook: contain on high",
    ]);
    ctl(&["agents", "register", "triage-bot", "--tenant", "acme"]);
    let token = ctl(&[
        "tokens",
        "issue",
        "--agent",
        "triage-bot",
        "--tenant",
        "acme",
        "--scopes",
        "github:read,slack:post",
    ])
    .trim()
    .to_owned();
    let check = |tool: &str, action: &str, path: &str| {
        run(&[
            "check",
            "--addr",
            &authz,
            "--token",
            &token,
            "--tool",
            tool,
            "--action",
            action,
            "--path",
            path,
            "--header",
            "x-aegis-run-id=run-1138",
        ])
    };
    // The tricked agent: reads the private repository, posts it out. Both are allowed by
    // policy (the agent has the scopes); the pair is the pattern.
    let (code, out, _) = check("github", "read_repo", "/repos/acme/private");
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = check("slack", "post_message", "/api/chat.postMessage");
    assert_eq!(code, 0, "{out}");

    // Within a second: the incident, the freeze, the notification.
    let body = tokio::time::timeout(Duration::from_secs(5), hook.recv())
        .await
        .expect("notified within 5 s")
        .expect("a body");
    let slack: serde_json::Value = serde_json::from_str(&body).expect("Slack JSON");
    let text = slack["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("[CRITICAL]") && text.contains("data_exfil_pattern"),
        "{text}"
    );
    let (code, out, _) = check("github", "read_issue", "/repos/acme/public/issues/1");
    assert_eq!(code, 1, "frozen: {out}");
    assert!(out.contains("agent_frozen"), "{out}");

    let list: serde_json::Value =
        serde_json::from_str(&ctl(&["incidents", "list", "--tenant", "acme", "--json"]))
            .expect("json");
    let id = list["incidents"][0]["id"]
        .as_str()
        .expect("an incident")
        .to_owned();
    let shown = ctl(&["incidents", "show", &id, "--tenant", "acme"]);
    for want in [
        "data_exfil_pattern (critical)",
        "run run-1138",
        "freeze_agent: frozen",
        "delivered (1 attempts)",
        "github.read_repo -> allow",
        "slack.post_message -> allow",
    ] {
        assert!(shown.contains(want), "{want:?} not in:\n{shown}");
    }
    let dot = ctl(&[
        "incidents",
        "graph",
        &id,
        "--tenant",
        "acme",
        "--format",
        "dot",
    ]);
    assert!(dot.contains("\"run:run-1138\""), "{dot}");
    assert!(dot.contains("\"policy:default-2026.12.1\""), "{dot}");
    // `| dot -Tsvg`, as the README says: Graphviz itself parses it (scripts/test installs it).
    let svg = {
        use std::io::Write as _;
        let mut child = std::process::Command::new("dot")
            .arg("-Tsvg")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("Graphviz `dot` (scripts/test installs it)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(dot.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("dot runs");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "dot refused the graph: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let nodes = dot
        .lines()
        .filter(|l| l.contains(" [label=") && !l.contains(" -> "))
        .count();
    assert_eq!(svg.matches("class=\"node\"").count(), nodes, "{svg}");
    assert!(svg.contains("data_exfil_pattern"), "{svg}");

    // An evidence bundle for the auditors, the resources redacted.
    let bundle = dir.path().join("evidence.json");
    let bundle_s = bundle.to_string_lossy().into_owned();
    ok(&[
        "audit",
        "export",
        "--data-dir",
        &data_s,
        "--tenant",
        "acme",
        "--incident",
        &id,
        "--redact",
        "resource",
        "-o",
        &bundle_s,
    ]);
    let pubkey = data.join("audit.pub").to_string_lossy().into_owned();
    let verified = ok(&["audit", "verify-bundle", &bundle_s, "--public-key", &pubkey]);
    println!("{verified}");
    let text = std::fs::read_to_string(&bundle).expect("bundle");
    assert!(text.contains(&id));
    assert!(
        !text.contains("/repos/acme/private"),
        "a redacted resource leaked"
    );

    // Rotate the token, unfreeze, close with a reason.
    let tokens: serde_json::Value = serde_json::from_str(&ctl(&[
        "tokens",
        "list",
        "--agent",
        "triage-bot",
        "--tenant",
        "acme",
        "--json",
    ]))
    .expect("json");
    let jti = tokens["tokens"][0]["jti"].as_str().expect("jti").to_owned();
    let fresh = ctl(&[
        "tokens",
        "rotate",
        &jti,
        "--tenant",
        "acme",
        "--reason",
        "exposed to a prompt injection",
    ])
    .trim()
    .to_owned();
    ctl(&[
        "agents",
        "unfreeze",
        "triage-bot",
        "--tenant",
        "acme",
        "--reason",
        "INC reviewed; token rotated",
    ]);
    ctl(&[
        "incidents",
        "close",
        &id,
        "--tenant",
        "acme",
        "--reason",
        "prompt injection via issue #4411; repo access narrowed",
    ]);
    let (code, out, _) = run(&[
        "check",
        "--addr",
        &authz,
        "--token",
        &fresh,
        "--tool",
        "github",
        "--action",
        "read_issue",
    ]);
    assert_eq!(code, 0, "the rotated token works again: {out}");
    let (code, out, _) = run(&[
        "check",
        "--addr",
        &authz,
        "--token",
        &token,
        "--tool",
        "github",
        "--action",
        "read_issue",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("token_revoked"), "{out}");
    server.stop().expect("stops on SIGTERM");
    let out = ok(&["audit", "verify", "--data-dir", &data_s]);
    assert!(out.starts_with("audit log intact"), "{out}");
}
