//! The response side of detection: autonomy L2 (approval for mutating calls), thresholds
//! from configuration, the live incident watch, the evidence graph, and webhook
//! notifications through the durable outbox, across a SIGKILL and restart with the
//! receiver down and back up.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::sync::mpsc;
use tonic::Code;

/// Denies of one agent: `invoices.create` without the scope (missing_scope).
fn denied_call(token: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    Req::get("/invoices")
        .token(token)
        .tool("invoices", "create")
        .header("x-aegis-run-id", "run-42")
        .build()
}

fn payment(token: &str, amount: u64) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    Req::mcp("payments.create", json!({"amount": amount, "to": "acct-9"}))
        .token(token)
        .build()
}

#[tokio::test]
async fn at_l2_a_restricted_agents_mutating_calls_wait_for_an_approval() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.set_tenant("acme", None, Some(2)).await.expect("L2");
    root.register("acme", "bot").await;
    let (token, _) = root
        .issue("acme", "bot", &["invoices:read", "payments:create"], "")
        .await;
    let r = s.check(payment(&token, 10)).await.expect("decided");
    assert_eq!(code(&r), 0, "a small payment goes through before: {r:?}");

    for _ in 0..5 {
        let r = s.check(denied_call(&token)).await.expect("decided");
        assert_eq!(reason(&r), Some("missing_scope"));
    }
    let incident = root.contained_incident("acme", "deny_storm").await;
    assert_eq!(
        incident.actions,
        vec![
            "notify: logged (no webhook for this tenant)",
            "require_approval: restricted"
        ]
    );
    let agent = root
        .api()
        .get_agent(root.req(pb::AgentRef {
            tenant: "acme".into(),
            id: "bot".into(),
        }))
        .await
        .expect("agent")
        .into_inner();
    assert_eq!(agent.status, "restricted");

    // Reading still works; the same small payment now waits for a human.
    assert_eq!(code(&s.read_invoices(&token).await), 0);
    let r = s.check(payment(&token, 10)).await.expect("decided");
    assert_eq!(reason(&r), Some("agent_restricted"));
    let d = approve_held(&root, &r, "checked with the payee").await;
    let retry = Req::mcp("payments.create", json!({"amount": 10, "to": "acct-9"}))
        .token(&token)
        .header("x-aegis-override", &d.override_token)
        .build();
    assert_eq!(code(&s.check(retry).await.expect("decided")), 0);
    // Another mutating call needs its own approval.
    let r = s.check(payment(&token, 11)).await.expect("decided");
    assert_eq!(reason(&r), Some("agent_restricted"));

    // A plain HTTP call's tool and action are labels the agent sets: a POST labelled as a
    // read is held too.
    let disguised = Req::post("/payments", "application/json", r#"{"amount":10}"#)
        .token(&token)
        .tool("invoices", "read")
        .build();
    assert_eq!(
        reason(&s.check(disguised).await.expect("decided")),
        Some("agent_restricted")
    );

    // An approved retry keeps what the policy asked for: here, slack is external and the
    // credential header is stripped (sanitize), approval or not.
    let (slack_token, _) = root.issue("acme", "bot", &["slack:post"], "").await;
    let post = |ovr: Option<&str>| {
        let r = Req::get("/api/chat.postMessage")
            .token(&slack_token)
            .tool("slack", "post_message")
            .header("x-api-key", "sk-live-1");
        match ovr {
            Some(o) => r.header("x-aegis-override", o),
            None => r,
        }
        .build()
    };
    let r = s.check(post(None)).await.expect("decided");
    assert_eq!(reason(&r), Some("agent_restricted"));
    let d = approve_held(&root, &r, "expected status post").await;
    let r = s
        .check(post(Some(&d.override_token)))
        .await
        .expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    assert!(
        ok(&r).headers_to_remove.contains(&"x-api-key".to_owned()),
        "the policy's sanitizing survives the approval: {r:?}"
    );

    // A restriction never loosens a freeze (manual or automatic), and unfreeze lifts either.
    root.freeze("acme", "bot", "investigating")
        .await
        .expect("frozen");
    let e = root
        .api()
        .restrict_agent(root.req(pb::AgentActionRequest {
            tenant: "acme".into(),
            id: "bot".into(),
            reason: "downgrade".into(),
        }))
        .await
        .expect_err("frozen stays frozen");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        reason(&s.check(payment(&token, 12)).await.expect("decided")),
        Some("agent_frozen")
    );
    root.api()
        .unfreeze_agent(root.req(pb::AgentActionRequest {
            tenant: "acme".into(),
            id: "bot".into(),
            reason: "incident reviewed".into(),
        }))
        .await
        .expect("unfrozen");
    assert_eq!(
        code(&s.check(payment(&token, 12)).await.expect("decided")),
        0
    );
    s.stop().await;
}

#[tokio::test]
async fn thresholds_come_from_the_configuration() {
    let s = start_with(|c| {
        c.correlation.deny_storm_count = 2;
        c.correlation.deny_storm_window_secs = 30;
    })
    .await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.register("acme", "bot").await;
    let (token, _) = root.issue("acme", "bot", &["invoices:read"], "").await;
    for _ in 0..2 {
        s.check(denied_call(&token)).await.expect("decided");
    }
    let incident = root.contained_incident("acme", "deny_storm").await;
    assert_eq!(incident.evidence.len(), 2);
    assert!(
        incident.summary.contains("2 denies within 30 s"),
        "{}",
        incident.summary
    );

    // Nonsense thresholds are refused at start-up, naming the setting.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("aegis.toml");
    std::fs::write(&cfg, "[correlation]\ndeny_storm_count = 0\n").expect("write");
    let err = serve_refuses(&["--config".as_ref(), cfg.as_os_str()]);
    assert!(err.contains("correlation.deny_storm_count"), "{err}");
}

// Multi-threaded: `aegis ctl` runs as a blocking child process against the in-process server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_streams_incidents_and_the_graph_links_their_evidence() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.register("acme", "bot").await;
    let (token, jti) = root
        .issue("acme", "bot", &["invoices:read"], "sess-3")
        .await;
    let viewer = s.control(&s.operator("vic", Role::Viewer, "acme")).await;
    let mut watch = viewer
        .api()
        .watch_incidents(viewer.req(pb::WatchIncidentsRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    // Another tenant's watcher sees nothing of acme.
    let outsider = s.control(&s.operator("gus", Role::Viewer, "globex")).await;
    let mut other = outsider
        .api()
        .watch_incidents(outsider.req(pb::WatchIncidentsRequest::default()))
        .await
        .expect("watch")
        .into_inner();

    for _ in 0..5 {
        s.check(denied_call(&token)).await.expect("decided");
    }
    let raised = next_message(&mut watch).await;
    let incident = raised.incident.expect("incident");
    assert_eq!(
        (raised.event.as_str(), incident.kind.as_str()),
        ("raised", "deny_storm")
    );
    assert_eq!(incident.decisions.len(), 5);
    assert!(
        incident
            .decisions
            .iter()
            .all(|d| d.tool == "invoices" && d.decision == "deny" && d.run_id == "run-42")
    );
    root.api()
        .acknowledge_incident(root.req(pb::IncidentActionRequest {
            tenant: "acme".into(),
            id: incident.id.clone(),
            reason: String::new(),
        }))
        .await
        .expect("ack");
    let acked = next_message(&mut watch).await;
    assert_eq!(acked.event, "acknowledged");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.message())
            .await
            .is_err(),
        "globex's watcher got acme's incident"
    );
    // A new watcher gets the open incidents first (acknowledged is not open: none here).
    let mut late = viewer
        .api()
        .watch_incidents(viewer.req(pb::WatchIncidentsRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), late.message())
            .await
            .is_err()
    );

    // The graph: incident -> 5 decisions -> agent, run, session; token; policy revision.
    let g = viewer
        .api()
        .get_incident_graph(viewer.req(pb::IncidentRef {
            tenant: "acme".into(),
            id: incident.id.clone(),
        }))
        .await
        .expect("graph")
        .into_inner();
    let kinds = |k: &str| g.nodes.iter().filter(|n| n.kind == k).count();
    assert_eq!(
        (
            kinds("incident"),
            kinds("decision"),
            kinds("agent"),
            kinds("run"),
            kinds("session"),
            kinds("token"),
            kinds("policy"),
        ),
        (1, 5, 1, 1, 1, 1, 1)
    );
    let inc = format!("incident:{}", incident.id);
    let edge = |from: &str, to: &str| g.edges.iter().any(|e| e.from == from && e.to == to);
    for id in &incident.evidence {
        let d = format!("decision:{id}");
        assert!(edge(&inc, &d), "incident -> {d}");
        assert!(edge(&d, "agent:acme/bot"));
        assert!(edge(&d, "run:run-42"));
        assert!(edge(&d, "policy:default-2026.12.1"));
    }
    assert!(edge("agent:acme/bot", &format!("token:{jti}")));
    assert!(edge(&format!("token:{jti}"), "session:sess-3"));

    // Through `aegis ctl`: DOT, Mermaid and JSON.
    let cred = s.operator("vic", Role::Viewer, "acme");
    let (code, dot, err) = ctl(
        s.control_addr(),
        &cred,
        &["incidents", "graph", &incident.id, "--tenant", "acme"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(dot.starts_with("digraph incident {"), "{dot}");
    assert!(
        dot.contains(&format!(
            "\"{inc}\" -> \"decision:{}\"",
            incident.evidence[0]
        )),
        "{dot}"
    );
    assert_eq!(dot.matches(" -> ").count(), g.edges.len());
    let (code, mermaid, _) = ctl(
        s.control_addr(),
        &cred,
        &[
            "incidents",
            "graph",
            &incident.id,
            "--tenant",
            "acme",
            "--format",
            "mermaid",
        ],
    );
    assert_eq!(code, 0);
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert_eq!(mermaid.matches(" -->|").count(), g.edges.len());
    let (code, json, _) = ctl(
        s.control_addr(),
        &cred,
        &[
            "incidents",
            "graph",
            &incident.id,
            "--tenant",
            "acme",
            "--format",
            "json",
        ],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        v["nodes"].as_array().map(Vec::len),
        Some(g.nodes.len()),
        "{json}"
    );
    // Another tenant's viewer cannot draw it.
    let e = outsider
        .api()
        .get_incident_graph(outsider.req(pb::IncidentRef {
            tenant: "acme".into(),
            id: incident.id.clone(),
        }))
        .await
        .expect_err("other tenant");
    assert_eq!(e.code(), Code::PermissionDenied);
    s.stop().await;
}

fn spawn_all_in_one(data: &Path, config: &Path, control: &str) -> ChildServer {
    let data = data.to_string_lossy().into_owned();
    let config = config.to_string_lossy().into_owned();
    let args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--control-listen",
        control,
        "--data-dir",
        &data,
        "--config",
        &config,
    ];
    ChildServer::spawn_exe(
        Path::new(env!("CARGO_BIN_EXE_aegis")),
        &args,
        aegis::server::ANNOUNCE,
    )
    .expect("aegis serve starts")
}

fn incident_show(cp: std::net::SocketAddr, root: &str, id: &str) -> serde_json::Value {
    let (code, out, err) = ctl(
        cp,
        root,
        &["incidents", "show", id, "--tenant", "acme", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("json")
}

#[tokio::test]
async fn webhook_notifications_survive_a_restart_with_the_receiver_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A port with nobody listening yet: the receiver is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config = dir.path().join("aegis.toml");
    std::fs::write(
        &config,
        format!(
            "[notify]\nretry_initial_ms = 100\nretry_max_ms = 300\n\n\
             [[notify.webhooks]]\ntenant = \"acme\"\nurl = \"http://127.0.0.1:{port}/services/T0/B0/secret\"\nmin_severity = \"high\"\n\n\
             [[notify.webhooks]]\ntenant = \"globex\"\nurl = \"http://127.0.0.1:{port}/globex\"\n"
        ),
    )
    .expect("config");
    let mut server = spawn_all_in_one(&data, &config, "127.0.0.1:0");
    let cp = server
        .announced(aegis::server::CONTROL_ANNOUNCE)
        .expect("control address");
    let root = operator_cmd(&data, "root", "admin", "*");
    let (code, _, err) = ctl(
        cp,
        &root,
        &["agents", "register", "bot", "--tenant", "acme"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, token, err) = ctl(
        cp,
        &root,
        &[
            "tokens",
            "issue",
            "--agent",
            "bot",
            "--tenant",
            "acme",
            "--scopes",
            "invoices:read",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_owned();
    let mut authz = client(server.addr).await;
    for _ in 0..5 {
        authz.check(denied_call(&token)).await.expect("decided");
    }
    // Raised; its notification fails while the receiver is down, and is retried.
    let mut id = String::new();
    let failing = eventually(Duration::from_secs(10), || {
        let (_, out, _) = ctl(
            cp,
            &root,
            &["incidents", "list", "--tenant", "acme", "--json"],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let Some(i) = v["incidents"].get(0) else {
            return false;
        };
        id = i["id"].as_str().unwrap_or_default().to_owned();
        let shown = incident_show(cp, &root, &id);
        shown["notifications"][0]
            .as_str()
            .is_some_and(|n| n.contains("pending") && !n.contains("(0 attempts)"))
    })
    .await;
    assert!(failing, "no failed attempt recorded for {id}");
    let shown = incident_show(cp, &root, &id);
    let note = shown["notifications"][0].as_str().unwrap_or_default();
    assert!(
        note.starts_with(&format!("127.0.0.1:{port} pending")),
        "{note}"
    );
    assert!(note.contains("connect"), "{note}");
    assert!(
        !note.contains("secret"),
        "the webhook path is a secret: {note}"
    );

    // The control plane dies with the notification undelivered ...
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    // ... the receiver comes up, then the control plane, which delivers it.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the receiver's port");
    let mut got = webhook_receiver(listener, vec![503]);
    let server = spawn_all_in_one(&data, &config, &cp.to_string());
    let body = tokio::time::timeout(Duration::from_secs(15), got.recv())
        .await
        .expect("delivered within 15 s of the restart")
        .expect("a body");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Slack JSON");
    let text = v["text"].as_str().unwrap_or_default();
    assert!(text.contains(&id) && text.contains("deny_storm"), "{text}");
    assert!(text.contains("[HIGH]"), "{text}");
    assert_eq!(v["blocks"][0]["type"], "header");
    assert!(
        v["blocks"][2]["fields"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x["text"] == "*Agent*\nbot")),
        "{v}"
    );
    let delivered = eventually(Duration::from_secs(5), || {
        incident_show(cp, &root, &id)["notifications"][0]
            .as_str()
            .is_some_and(|n| n.contains("delivered"))
    })
    .await;
    assert!(delivered, "{:?}", incident_show(cp, &root, &id));
    // Exactly once here: nothing more arrives, and globex's webhook never saw acme's incident.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), got.recv())
            .await
            .is_err()
    );
    drop(server);
}

/// [`webhook_receiver`] behind TLS with `cert` and `key`; returns its port.
async fn tls_receiver(cert: &Path, key: &Path) -> (u16, mpsc::Receiver<String>) {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = plain.local_addr().expect("addr").port();
    // Terminate TLS, then hand the plain bytes to the HTTP receiver over a loopback pipe.
    let inner = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let inner_addr = inner.local_addr().expect("addr");
    let rx = webhook_receiver(inner, vec![]);
    tokio::spawn(async move {
        while let Ok((conn, _)) = plain.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(conn).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(inner_addr).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_check_the_receivers_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (trusted_ca, cert, key) = certificates(dir.path(), "soc");
    let (_, rogue_cert, rogue_key) = certificates(dir.path(), "rogue");
    let (port, mut got) = tls_receiver(&cert, &key).await;
    let (rogue_port, mut rogue_got) = tls_receiver(&rogue_cert, &rogue_key).await;
    let s = start_with(|c| {
        c.notify.ca_file = Some(trusted_ca.clone());
        c.notify.webhooks = vec![
            aegis::config::WebhookConfig {
                tenant: "acme".into(),
                url: format!("https://127.0.0.1:{port}/services/T0/B0/secret"),
                min_severity: "low".into(),
                format: "slack".into(),
            },
            aegis::config::WebhookConfig {
                tenant: "globex".into(),
                url: format!("https://127.0.0.1:{rogue_port}/hook"),
                min_severity: "low".into(),
                format: "json".into(),
            },
        ];
    })
    .await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    for tenant in ["acme", "globex"] {
        root.register(tenant, "bot").await;
        let (token, _) = root.issue(tenant, "bot", &["invoices:read"], "").await;
        for _ in 0..5 {
            s.check(denied_call(&token)).await.expect("decided");
        }
    }
    let body = tokio::time::timeout(Duration::from_secs(10), got.recv())
        .await
        .expect("delivered over TLS")
        .expect("a body");
    assert!(body.contains("deny_storm"), "{body}");
    // A receiver whose certificate no trusted CA signed gets nothing: the attempt fails.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let note = loop {
        let globex = root.incidents("globex").await;
        let mut note = String::new();
        if let Some(i) = globex.first() {
            let shown = root
                .api()
                .get_incident(root.req(pb::IncidentRef {
                    tenant: "globex".into(),
                    id: i.id.clone(),
                }))
                .await
                .expect("get")
                .into_inner();
            note = shown.notifications.join("; ");
            if note.contains("pending") && !note.contains("(0 attempts)") {
                break note;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed attempt: {note}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        note.contains("TLS") && note.contains("certificate"),
        "{note}"
    );
    assert!(
        rogue_got.try_recv().is_err(),
        "the rogue receiver got a notification"
    );
}

/// Approves, as `root`, the acme approval a held answer `r` names: the decision, with its
/// override token.
async fn approve_held(
    root: &Ctl,
    r: &envoy_types::ext_authz::v3::pb::CheckResponse,
    reason: &str,
) -> pb::ApprovalDecision {
    let id = header(&denied(r).headers, "x-aegis-approval-id")
        .expect("an approval id")
        .to_owned();
    root.api()
        .approve_approval(root.req(pb::DecideApprovalRequest {
            tenant: "acme".into(),
            id,
            reason: reason.into(),
            override_ttl_secs: 0,
        }))
        .await
        .expect("approved")
        .into_inner()
}

/// The run id is the agent's to choose (`x-aegis-run-id`): a 20,006-character one reaches
/// the SOC's Slack cut to 128 characters and marked, inside Slack's block limits, while the
/// incident keeps what the audit keeps of it (reported: the whole run id went out).
#[tokio::test]
async fn an_agent_chosen_run_id_reaches_slack_cut_and_marked() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut got = webhook_receiver(listener, vec![]);
    let s = start_with(|c| {
        c.correlation.deny_storm_count = 2;
        c.notify.webhooks = vec![aegis::config::WebhookConfig {
            tenant: "acme".into(),
            url: format!("http://127.0.0.1:{port}/slack"),
            min_severity: "low".into(),
            format: "slack".into(),
        }];
    })
    .await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.register("acme", "bot").await;
    let (token, _) = root.issue("acme", "bot", &["invoices:read"], "").await;
    let run_id = "r".repeat(20_006);
    for _ in 0..2 {
        let call = Req::get("/invoices")
            .token(&token)
            .tool("invoices", "create")
            .header("x-aegis-run-id", &run_id)
            .build();
        s.check(call).await.expect("decided");
    }
    // The incident keeps what the audit row keeps of a field (1024 bytes).
    let incident = root.contained_incident("acme", "deny_storm").await;
    let stored = incident.run_id.chars().count();
    assert!(
        stored > 128 && incident.run_id.starts_with("rrrr"),
        "{stored}"
    );

    let body = tokio::time::timeout(Duration::from_secs(15), got.recv())
        .await
        .expect("notified within 15 s")
        .expect("a body");
    assert!(body.len() < 16 * 1024, "{} bytes", body.len());
    let v: serde_json::Value = serde_json::from_str(&body).expect("Slack JSON");
    let fields = v["blocks"][2]["fields"].as_array().expect("fields");
    let run = fields
        .iter()
        .filter_map(|f| f["text"].as_str())
        .find(|t| t.starts_with("*Run*"))
        .expect("a Run field");
    assert_eq!(
        run,
        format!("*Run*\n{}… [cut: {stored} characters]", "r".repeat(128))
    );
    for f in fields {
        assert!(f["text"].as_str().unwrap_or_default().chars().count() <= 2000);
    }
}
