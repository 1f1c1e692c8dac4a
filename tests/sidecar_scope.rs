//! Least-privilege sidecars: a sidecar credential names the tenants it serves, and with it
//! a hostile agent pod (which holds its sidecar's credential) can neither watch, nor raise
//! approvals against, nor report incidents for any other tenant, nor flood the control
//! plane. Every attack goes through the real control plane of the all-in-one server on
//! loopback with a real tonic client; the credential rules also through the `aegis` binary.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use aegis::control::auth::{OPERATOR_AUDIENCE, OperatorClaims};
use common::*;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::Code;

/// A sidecar credential for `tenants` (comma-separated), its claims written directly (as
/// `aegis operator issue` writes them): the control plane must enforce what it names.
fn sidecar_credential(s: &TestServer, name: &str, tenants: &str) -> String {
    let now = now();
    let claims = OperatorClaims {
        iss: "aegis".into(),
        aud: OPERATOR_AUDIENCE.into(),
        sub: name.into(),
        role: "sidecar".into(),
        tenant: tenants.into(),
        jti: format!("op-{name}"),
        iat: now,
        exp: now + 3600,
    };
    aegis::identity::mint(&s.signer, &claims).expect("mint")
}

/// The tenant an item is about (`None`: shared by every tenant).
fn tenant_of(item: &pb::StateItem) -> Option<String> {
    use pb::state_item::Item;
    match item.item.as_ref()? {
        Item::Agent(a) => Some(a.tenant.clone()),
        Item::RevokedToken(t) => Some(t.tenant.clone()),
        Item::Kill(k) if k.scope == pb::KillScope::All as i32 => None,
        Item::Kill(k) => Some(k.tenant.clone()),
        Item::Tenant(t) => Some(t.name.clone()),
        Item::Budget(b) => Some(b.tenant.clone()),
        Item::Policy(_) => None,
    }
}

/// Every jti and agent id an event carries (to look for another tenant's, whatever field).
fn names_in(ev: &pb::WatchEvent) -> Vec<String> {
    use pb::state_item::Item;
    ev.items
        .iter()
        .filter_map(|i| match i.item.as_ref()? {
            Item::Agent(a) => Some(a.id.clone()),
            Item::RevokedToken(t) => Some(t.jti.clone()),
            Item::Kill(k) => Some(k.target.clone()),
            Item::Budget(b) => Some(b.agent.clone()),
            _ => None,
        })
        .collect()
}

fn evidence(ids: &[&str]) -> (Vec<String>, Vec<pb::EvidenceDecision>) {
    let decisions = ids
        .iter()
        .enumerate()
        .map(|(n, id)| pb::EvidenceDecision {
            decision_id: (*id).into(),
            time_ns: 1,
            decision: "deny".into(),
            row_hash: format!("{:064x}", n + 1),
            audit_seq: n as u64 + 1,
            ..Default::default()
        })
        .collect();
    (ids.iter().map(|i| (*i).to_owned()).collect(), decisions)
}

fn incident(tenant: &str, agent: &str, ids: &[&str]) -> pb::ReportIncidentRequest {
    let (evidence, decisions) = evidence(ids);
    pb::ReportIncidentRequest {
        tenant: tenant.into(),
        agent: agent.into(),
        session: "sess-1".into(),
        kind: "deny_storm".into(),
        severity: "critical".into(),
        summary: "fabricated".into(),
        trigger_decision: ids.last().map(|s| (*s).to_owned()).unwrap_or_default(),
        evidence,
        decisions,
        decided_at_ns: 1,
        ..Default::default()
    }
}

fn approval(tenant: &str, agent: &str, n: u64) -> pb::RequestApprovalRequest {
    pb::RequestApprovalRequest {
        tenant: tenant.into(),
        agent: agent.into(),
        tool: "payments".into(),
        action: "create".into(),
        call_hash: format!("{n:064x}"),
        ..Default::default()
    }
}

fn payment(token: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    Req::mcp("payments.create", json!({"amount": 5000, "to": "acct-9"}))
        .token(token)
        .build()
}

/// The next event of the stream within 5 s.
async fn next_event(stream: &mut tonic::Streaming<pb::WatchEvent>) -> Option<pb::WatchEvent> {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .ok()
        .flatten()
        .map(|r| r.expect("event"))
}

#[tokio::test]
async fn a_sidecar_watches_only_its_own_tenants_state() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    // globex: an agent, a revoked token, a killed session, a budget, tenant settings.
    root.register("globex", "g-bot").await;
    let (_, g_live) = root
        .issue("globex", "g-bot", &["invoices:read"], "g-s1")
        .await;
    let (_, g_revoked) = root.issue("globex", "g-bot", &["invoices:read"], "").await;
    root.api()
        .revoke_token(root.req(pb::RevokeTokenRequest {
            tenant: "globex".into(),
            jti: g_revoked.clone(),
            reason: "test".into(),
        }))
        .await
        .expect("revoked");
    root.kill(pb::KillScope::Session, "globex", "g-s1", false)
        .await
        .expect("killed");
    root.set_tenant("globex", None, Some(3))
        .await
        .expect("tenant");
    root.api()
        .set_budget(root.req(pb::SetBudgetRequest {
            tenant: "globex".into(),
            agent: "g-bot".into(),
            max_calls: 10,
            window_secs: 60,
            reason: "test".into(),
            ..Default::default()
        }))
        .await
        .expect("budget");
    // acme: an agent of its own.
    root.register("acme", "a-bot").await;
    root.set_tenant("acme", None, Some(2))
        .await
        .expect("tenant");
    let globex_names: HashSet<String> = ["g-bot", "g-s1", g_live.as_str(), g_revoked.as_str()]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let leaked = |ev: &pb::WatchEvent| -> Vec<String> {
        let mut out: Vec<String> = ev
            .items
            .iter()
            .filter_map(tenant_of)
            .filter(|t| t != "acme")
            .collect();
        out.extend(
            names_in(ev)
                .into_iter()
                .filter(|n| globex_names.contains(n)),
        );
        out
    };

    let sc = s.control(&sidecar_credential(&s, "sc-acme", "acme")).await;
    let mut stream = sc
        .api()
        .watch(sc.req(pb::WatchRequest {
            sidecar: "pod-1".into(),
            ..Default::default()
        }))
        .await
        .expect("watch")
        .into_inner();
    let snapshot = next_event(&mut stream).await.expect("a snapshot");
    assert!(snapshot.snapshot);
    assert_eq!(leaked(&snapshot), Vec::<String>::new(), "{snapshot:?}");
    // Its own tenant's state is all there.
    assert!(
        names_in(&snapshot).contains(&"a-bot".to_owned()),
        "{snapshot:?}"
    );
    assert!(
        snapshot
            .items
            .iter()
            .any(|i| matches!(&i.item, Some(pb::state_item::Item::Tenant(t)) if t.name == "acme")),
        "{snapshot:?}"
    );

    // Live changes to globex, of every kind, then one to acme as a marker.
    root.freeze("globex", "g-bot", "x").await.expect("frozen");
    root.kill(pb::KillScope::Agent, "globex", "g-bot", false)
        .await
        .expect("killed");
    root.set_tenant("globex", Some("shadow"), None)
        .await
        .expect("tenant");
    root.api()
        .set_budget(root.req(pb::SetBudgetRequest {
            tenant: "globex".into(),
            agent: "g-bot".into(),
            max_calls: 20,
            window_secs: 60,
            reason: "test".into(),
            ..Default::default()
        }))
        .await
        .expect("budget");
    root.freeze("acme", "a-bot", "marker")
        .await
        .expect("frozen");
    let mut seen_marker = false;
    for _ in 0..20 {
        let Some(ev) = next_event(&mut stream).await else {
            break;
        };
        assert!(!ev.snapshot, "{ev:?}");
        assert_eq!(leaked(&ev), Vec::<String>::new(), "{ev:?}");
        if names_in(&ev).contains(&"a-bot".to_owned()) {
            seen_marker = true;
            break;
        }
    }
    assert!(seen_marker, "acme's own change reached its sidecar");

    // What every tenant shares still reaches it: a kill of everything.
    root.kill(pb::KillScope::All, "", "", true)
        .await
        .expect("kill all");
    let ev = next_event(&mut stream).await.expect("the global kill");
    assert_eq!(leaked(&ev), Vec::<String>::new(), "{ev:?}");
    assert!(
        ev.items.iter().any(|i| matches!(
            &i.item,
            Some(pb::state_item::Item::Kill(k)) if k.scope == pb::KillScope::All as i32
        )),
        "{ev:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_sidecar_cannot_report_an_incident_for_another_tenant() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.set_tenant("globex", None, Some(4)).await.expect("L4");
    root.register("globex", "g-bot").await;
    let (token, _) = root
        .issue("globex", "g-bot", &["invoices:read"], "sess-1")
        .await;
    assert_eq!(code(&s.read_invoices(&token).await), 0);

    let sc = s.control(&sidecar_credential(&s, "sc-acme", "acme")).await;
    let e = sc
        .api()
        .report_incident(sc.req(incident("globex", "g-bot", &["d-fake"])))
        .await
        .expect_err("another tenant's incident");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("globex"), "{e:?}");

    // globex's agent is untouched: not frozen, its token alive, no incident.
    let agent = root
        .api()
        .get_agent(root.req(pb::AgentRef {
            tenant: "globex".into(),
            id: "g-bot".into(),
        }))
        .await
        .expect("agent")
        .into_inner();
    assert_eq!(agent.status, "active");
    assert_eq!(agent.live_tokens, 1);
    assert_eq!(
        code(&s.read_invoices(&token).await),
        0,
        "the token still works"
    );
    assert!(root.incidents("globex").await.is_empty());

    // The refusal is audited with the sidecar's identity.
    s.stop().await;
    assert!(
        s.control_rows()
            .iter()
            .any(
                |(action, actor, tenant, _, decision, _)| action == "incident.raise"
                    && actor == "sidecar:sc-acme"
                    && tenant == "globex"
                    && decision == "refused"
            ),
        "{:?}",
        s.control_rows()
    );
}

#[tokio::test]
async fn incident_evidence_must_carry_the_signed_row_of_each_decision() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.set_tenant("acme", None, Some(4)).await.expect("L4");
    root.register("acme", "bot").await;
    let (token, _) = root
        .issue("acme", "bot", &["invoices:read"], "sess-1")
        .await;
    let sc = s.control(&sidecar_credential(&s, "sc-acme", "acme")).await;

    // The reported attack: evidence `d-fake`, no decision behind it.
    let mut bare = incident("acme", "bot", &["d-fake"]);
    bare.decisions.clear();
    // Decisions without the hash of their audit row.
    let mut unhashed = incident("acme", "bot", &["d-1", "d-2"]);
    for d in &mut unhashed.decisions {
        d.row_hash.clear();
    }
    // A hash that is not one.
    let mut short = incident("acme", "bot", &["d-1"]);
    short.decisions[0].row_hash = "abc".into();
    // Evidence naming a decision the decisions do not carry.
    let mut unknown = incident("acme", "bot", &["d-1", "d-2"]);
    unknown.evidence[1] = "d-9".into();
    // A trigger that is not among the evidence.
    let mut trigger = incident("acme", "bot", &["d-1"]);
    trigger.trigger_decision = "d-7".into();
    for (what, req, needle) in [
        ("no decisions", bare, "each evidence id needs"),
        ("no row hashes", unhashed, "row hash"),
        ("a short hash", short, "row hash"),
        ("an unknown decision", unknown, "d-9"),
        ("a foreign trigger", trigger, "trigger"),
    ] {
        let e = sc.api().report_incident(sc.req(req)).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(needle), "{what}: {e:?}");
    }
    // Nothing was raised or contained.
    assert!(root.incidents("acme").await.is_empty());
    assert_eq!(code(&s.read_invoices(&token).await), 0);

    // Well-formed evidence is stored with its row hashes and the reporting sidecar.
    let raised = sc
        .api()
        .report_incident(sc.req(incident("acme", "bot", &["d-1", "d-2"])))
        .await
        .expect("raised")
        .into_inner();
    assert_eq!(raised.reported_by, "sidecar:sc-acme");
    let stored = root
        .api()
        .get_incident(root.req(pb::IncidentRef {
            tenant: "acme".into(),
            id: raised.id.clone(),
        }))
        .await
        .expect("stored")
        .into_inner();
    let rows: Vec<(String, String, u64)> = stored
        .decisions
        .iter()
        .map(|d| (d.decision_id.clone(), d.row_hash.clone(), d.audit_seq))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("d-1".to_owned(), format!("{:064x}", 1), 1),
            ("d-2".to_owned(), format!("{:064x}", 2), 2)
        ]
    );
    s.stop().await;
}

/// An incident the data plane raises itself carries, for each decision, the hash and
/// sequence number of the very row it wrote for it.
#[tokio::test]
async fn a_data_planes_incident_names_the_rows_it_signed() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.register("acme", "bot").await;
    let (token, _) = root.issue("acme", "bot", &["invoices:read"], "").await;
    for _ in 0..5 {
        let r = s
            .check(
                Req::get("/invoices")
                    .token(&token)
                    .tool("invoices", "create")
                    .build(),
            )
            .await
            .expect("decided");
        assert_eq!(reason(&r), Some("missing_scope"));
    }
    let incident = root.contained_incident("acme", "deny_storm").await;
    assert_eq!(incident.decisions.len(), 5);
    s.stop().await;
    let conn = rusqlite::Connection::open(s.db()).expect("db");
    for d in &incident.decisions {
        let (seq, hash): (i64, Vec<u8>) = conn
            .query_row(
                "SELECT seq, hash FROM audit_log WHERE decision_id = ?1",
                [&d.decision_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("the decision's row");
        assert_eq!(d.audit_seq, seq as u64, "{d:?}");
        assert_eq!(d.row_hash, aegis::hex(&hash), "{d:?}");
    }
}

#[tokio::test]
async fn a_sidecar_cannot_fill_another_tenants_approval_cap() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.register("globex", "pay-bot").await;
    let (token, _) = root
        .issue("globex", "pay-bot", &["payments:create"], "")
        .await;

    let sc = s.control(&sidecar_credential(&s, "sc-acme", "acme")).await;
    // The reported attack: five approvals with random hashes, the default cap.
    for n in 1..=5 {
        let e = sc
            .api()
            .request_approval(sc.req(approval("globex", "pay-bot", n)))
            .await
            .expect_err("another tenant's approval");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("globex"), "{e:?}");
    }
    // globex's legitimate payment still gets its approval flow, not 429.
    let r = s.check(payment(&token)).await.expect("decided");
    assert_eq!(reason(&r), Some("payment_above_threshold"), "{r:?}");
    assert!(header(&denied(&r).headers, "x-aegis-approval-id").is_some());
    let pending = root
        .api()
        .list_approvals(root.req(pb::ListApprovalsRequest {
            tenant: "globex".into(),
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner()
        .approvals;
    assert_eq!(pending.len(), 1, "{pending:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_sidecar_cannot_burn_another_tenants_override() {
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.register("globex", "pay-bot").await;
    let (token, _) = root
        .issue("globex", "pay-bot", &["payments:create"], "")
        .await;
    let r = s.check(payment(&token)).await.expect("decided");
    let id = header(&denied(&r).headers, "x-aegis-approval-id")
        .expect("approval id")
        .to_owned();
    let approved = root
        .api()
        .approve_approval(root.req(pb::DecideApprovalRequest {
            tenant: "globex".into(),
            id: id.clone(),
            reason: "ok".into(),
            override_ttl_secs: 0,
        }))
        .await
        .expect("approved")
        .into_inner();
    let call_hash = approved.approval.expect("approval").call_hash;

    // A hostile acme pod that got hold of the override token tries to use it up first.
    let sc = s.control(&sidecar_credential(&s, "sc-acme", "acme")).await;
    let e = sc
        .api()
        .redeem_override(sc.req(pb::RedeemOverrideRequest {
            override_token: approved.override_token.clone(),
            tenant: "globex".into(),
            agent: "pay-bot".into(),
            call_hash,
            decision_id: "d-hostile".into(),
            ..Default::default()
        }))
        .await
        .expect_err("another tenant's override");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("globex"), "{e:?}");

    // globex's agent still gets its approved call through, once.
    let with_override = || {
        Req::mcp("payments.create", json!({"amount": 5000, "to": "acct-9"}))
            .token(&token)
            .header("x-aegis-override", &approved.override_token)
            .build()
    };
    let r = s.check(with_override()).await.expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    let r = s.check(with_override()).await.expect("decided");
    assert_eq!(reason(&r), Some("override_used"));
    s.stop().await;
}

#[tokio::test]
async fn a_sidecar_credential_is_rate_limited() {
    // The defaults: 10 a second after a burst of 50.
    let mut s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.register("acme", "bot").await;
    let sc = s.control(&sidecar_credential(&s, "sc-1", "acme")).await;
    let mut accepted = 0;
    let mut refused = None;
    let started = std::time::Instant::now();
    // Until refused: on a slow machine the refill keeps pace with more than 30 calls.
    for n in 1..=2_000 {
        match sc
            .api()
            .request_approval(sc.req(approval("acme", "bot", n)))
            .await
        {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the credential is rationed");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("control.sidecar_calls_per_sec"),
        "{e:?}"
    );
    // The burst, plus what refilled while the calls ran.
    let refill = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        (50..=50 + refill).contains(&accepted),
        "{accepted} accepted in {:?}",
        started.elapsed()
    );
    // The bucket is the agent's approvals only: the same credential still reports an
    // incident about that agent (an agent flooding approvals must not silence the report
    // of its own exfiltration), and raises another agent's approvals; another tenant is
    // PERMISSION_DENIED (and audited), never an unaudited RESOURCE_EXHAUSTED.
    root.register("acme", "other-bot").await;
    sc.api()
        .report_incident(sc.req(incident("acme", "bot", &["d-1"])))
        .await
        .expect("incidents have their own bucket");
    sc.api()
        .request_approval(sc.req(approval("acme", "other-bot", 1)))
        .await
        .expect("another agent's approvals have their own bucket");
    let e = sc
        .api()
        .request_approval(sc.req(approval("globex", "bot", 1)))
        .await
        .expect_err("another tenant");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let admin = s.running.as_ref().expect("running").admin_addr;
    let metrics = http(admin, "GET", "/metrics").await;
    assert!(
        metrics.contains("\naegis_control_sidecar_calls_refused_total 1\n"),
        "{metrics}"
    );
    // Another credential has its own bucket; the data plane in this process is not
    // rationed (its payment still raises its approval).
    let other = s.control(&sidecar_credential(&s, "sc-2", "acme")).await;
    other
        .api()
        .request_approval(other.req(approval("acme", "bot", 1000)))
        .await
        .expect("own bucket");
    let (token, _) = root.issue("acme", "bot", &["payments:create"], "").await;
    let r = s.check(payment(&token)).await.expect("decided");
    assert_ne!(reason(&r), Some("approval_unavailable"), "{r:?}");
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sc.api()
        .request_approval(sc.req(approval("acme", "bot", 2000)))
        .await
        .expect("refilled");
    s.stop().await;
}

#[tokio::test]
async fn all_tenant_sidecar_credentials_are_refused_with_the_way_out() {
    let mut s = start().await;
    // One minted before the rule: refused on every fleet call, naming the migration.
    let old = s.control(&sidecar_credential(&s, "old", "*")).await;
    let e = old
        .api()
        .watch(old.req(pb::WatchRequest::default()))
        .await
        .expect_err("all-tenant sidecar");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("--role sidecar --tenant <tenant>"),
        "{e:?}"
    );
    let e = old
        .api()
        .report_incident(old.req(incident("acme", "bot", &["d-1"])))
        .await
        .expect_err("all-tenant sidecar");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // `aegis operator issue` refuses to mint one, and mints one for several tenants.
    let data = s.data_dir();
    let data = data.to_string_lossy();
    let issue = |tenants: &[&str]| {
        let mut args = vec![
            "operator",
            "issue",
            "--data-dir",
            &data,
            "--name",
            "fleet",
            "--role",
            "sidecar",
        ];
        for t in tenants {
            args.extend(["--tenant", t]);
        }
        aegis_cmd(&args)
    };
    let out = issue(&["*"]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no longer accepted"), "{stderr}");
    let out = issue(&["acme", "globex"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let two = String::from_utf8(out.stdout).expect("utf-8");
    let sc = s.control(two.trim()).await;
    let me = sc
        .api()
        .who_am_i(sc.req(pb::WhoAmIRequest {}))
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!(
        (me.role.as_str(), me.tenant.as_str()),
        ("sidecar", "acme,globex")
    );
    // Both of its tenants, and no third.
    for (tenant, allowed) in [("acme", true), ("globex", true), ("initech", false)] {
        let r = sc
            .api()
            .request_approval(sc.req(approval(tenant, "bot", 7)))
            .await;
        assert_eq!(r.is_ok(), allowed, "{tenant}: {r:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn an_incident_whose_reporter_gives_up_is_still_contained() {
    // A sidecar reports under a deadline (control.request_timeout_ms, 1 s by default; under
    // a deny storm the control plane may take longer). The server drops a handler whose
    // deadline passed: the incident must not be left stored but its agent never frozen.
    let s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    root.set_tenant("acme", None, Some(4))
        .await
        .expect("autonomy L4");
    let sidecar = s.control(&sidecar_credential(&s, "sc-1", "acme")).await;
    let mut gave_up = 0;
    for i in 0..16u64 {
        let id = format!("d{i}");
        let mut req = sidecar.req(incident("acme", &format!("bot{i}"), &[&id]));
        // 0.25 ms to 4 ms: every caller gives up mid-way, at a different step.
        req.set_timeout(Duration::from_micros(250 * (i + 1)));
        if sidecar.api().report_incident(req).await.is_err() {
            gave_up += 1;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (stored, uncontained) = loop {
        let incidents = root.incidents("acme").await;
        let mut uncontained = Vec::new();
        for i in &incidents {
            let agent = root
                .api()
                .get_agent(root.req(pb::AgentRef {
                    tenant: "acme".into(),
                    id: i.agent.clone(),
                }))
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or_default();
            if agent != "frozen" || i.actions.is_empty() {
                uncontained.push(format!("{} ({agent}, actions {:?})", i.agent, i.actions));
            }
        }
        if uncontained.is_empty() || tokio::time::Instant::now() > deadline {
            break (incidents.len(), uncontained);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        uncontained.is_empty(),
        "{stored} incidents stored, {gave_up} reporters gave up; not contained: {uncontained:?}"
    );
    assert!(
        stored > 0,
        "some incidents were stored ({gave_up} of 16 gave up)"
    );
    println!("{stored} incidents stored, {gave_up} of 16 reporters gave up, every one contained");
}
