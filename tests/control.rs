//! The control plane of the all-in-one server, through a real tonic client against the
//! real server on loopback, each action checked where an agent sees it (its next Check)
//! and where an auditor does (the signed log).
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
use serde_json::json;
use tonic::Code;

/// The server, an admin of every tenant, and an operator of acme.
async fn setup() -> (TestServer, Ctl, Ctl) {
    setup_with(|_| {}).await
}

async fn setup_with(f: impl FnOnce(&mut aegis::config::Config)) -> (TestServer, Ctl, Ctl) {
    let s = start_with(f).await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    let alice = s
        .control(&s.operator("alice", Role::Operator, "acme"))
        .await;
    (s, root, alice)
}

fn agent_req(tenant: &str, id: &str, reason: &str) -> pb::AgentActionRequest {
    pb::AgentActionRequest {
        tenant: tenant.into(),
        id: id.into(),
        reason: reason.into(),
    }
}

#[tokio::test]
async fn freeze_denies_the_very_next_check_and_unfreeze_restores_it() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "billing-bot").await;
    let (token, _) = alice
        .issue("acme", "billing-bot", &["invoices:read"], "")
        .await;
    assert_eq!(code(&s.read_invoices(&token).await), 0);

    let frozen = alice
        .freeze("acme", "billing-bot", "deny storm - investigating")
        .await
        .expect("frozen");
    assert_eq!(frozen.status, "frozen");
    assert_eq!(frozen.updated_by, "operator:alice");
    // No wait: the all-in-one data plane applied it before the call returned.
    let r = s.read_invoices(&token).await;
    assert_eq!(reason(&r), Some("agent_frozen"));
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(403));

    let got = alice
        .api()
        .get_agent(alice.req(pb::AgentRef {
            tenant: "acme".into(),
            id: "billing-bot".into(),
        }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (got.status.as_str(), got.reason.as_str()),
        ("frozen", "deny storm - investigating")
    );
    assert_eq!(got.live_tokens, 1);

    // Freezing twice is refused, not silently "done".
    let again = alice
        .freeze("acme", "billing-bot", "again")
        .await
        .expect_err("already frozen");
    assert_eq!(again.code(), Code::FailedPrecondition);
    // No token while frozen.
    let refused = alice
        .api()
        .issue_token(alice.req(pb::IssueTokenRequest {
            tenant: "acme".into(),
            agent: "billing-bot".into(),
            ..Default::default()
        }))
        .await
        .expect_err("frozen agents get no token");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // The runbook: rotate the frozen agent's token, then unfreeze it.
    let jti = alice
        .api()
        .list_tokens(alice.req(pb::ListTokensRequest {
            tenant: "acme".into(),
            agent: "billing-bot".into(),
            all: false,
        }))
        .await
        .expect("list")
        .into_inner()
        .tokens[0]
        .jti
        .clone();
    let rotated = alice
        .api()
        .rotate_token(alice.req(pb::RotateTokenRequest {
            tenant: "acme".into(),
            jti,
            reason: "exposed in a log".into(),
            ttl_secs: 0,
        }))
        .await
        .expect("a frozen agent's token can be rotated")
        .into_inner()
        .token;
    assert_eq!(
        reason(&s.read_invoices(&rotated).await),
        Some("agent_frozen")
    );
    alice
        .api()
        .unfreeze_agent(alice.req(agent_req("acme", "billing-bot", "false positive")))
        .await
        .expect("unfrozen");
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("token_revoked")
    );
    assert_eq!(code(&s.read_invoices(&rotated).await), 0);

    s.stop().await;
    let control = s.control_rows();
    let freeze = control
        .iter()
        .find(|r| r.0 == "agent.freeze" && r.4 == "ok")
        .expect("freeze audited");
    assert_eq!(freeze.1, "operator:alice");
    assert_eq!(freeze.2, "acme");
    assert_eq!(freeze.3, "agent:acme/billing-bot");
    assert_eq!(freeze.5, "deny storm - investigating");
    assert!(
        control
            .iter()
            .any(|r| r.0 == "agent.unfreeze" && r.5 == "false positive")
    );
    let reasons: Vec<String> = s
        .rows()
        .into_iter()
        .filter(|r| r.3 == "invoices")
        .map(|r| r.1)
        .collect();
    assert_eq!(
        reasons,
        vec![
            "scope_granted",
            "agent_frozen",
            "agent_frozen",
            "token_revoked",
            "scope_granted"
        ]
    );
    // The control rows are in the same signed chain, and it verifies.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(["audit", "verify", "--data-dir"])
        .arg(s.data_dir())
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn revoked_agents_stay_revoked() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "bot").await;
    let (token, _) = alice.issue("acme", "bot", &["invoices:read"], "").await;
    alice
        .api()
        .revoke_agent(alice.req(agent_req("acme", "bot", "compromised")))
        .await
        .expect("revoked");
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("agent_revoked")
    );
    for e in [
        alice
            .api()
            .unfreeze_agent(alice.req(agent_req("acme", "bot", "undo")))
            .await
            .expect_err("final"),
        alice
            .api()
            .register_agent(alice.req(pb::RegisterAgentRequest {
                tenant: "acme".into(),
                id: "bot".into(),
                risk_tier: String::new(),
            }))
            .await
            .expect_err("no re-registration"),
    ] {
        assert!(
            matches!(e.code(), Code::FailedPrecondition | Code::AlreadyExists),
            "{e:?}"
        );
    }
    let live = alice
        .api()
        .list_tokens(alice.req(pb::ListTokensRequest {
            tenant: "acme".into(),
            agent: "bot".into(),
            all: false,
        }))
        .await
        .expect("list")
        .into_inner();
    assert!(
        live.tokens.is_empty(),
        "revocation kills its tokens: {live:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn rotation_refuses_the_old_token_at_once() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "bot").await;
    let (old, old_jti) = alice.issue("acme", "bot", &["invoices:read"], "").await;
    assert_eq!(code(&s.read_invoices(&old).await), 0);
    let rotated = alice
        .api()
        .rotate_token(alice.req(pb::RotateTokenRequest {
            tenant: "acme".into(),
            jti: old_jti.clone(),
            reason: "credential exposure".into(),
            ttl_secs: 0,
        }))
        .await
        .expect("rotated")
        .into_inner();
    let new_info = rotated.info.expect("info");
    assert_ne!(new_info.jti, old_jti);
    assert_eq!(new_info.scopes, vec!["invoices:read"]);

    let r = s.read_invoices(&old).await;
    assert_eq!(code(&r), Code::Unauthenticated as i32);
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(401));
    assert_eq!(reason(&r), Some("token_revoked"));
    assert_eq!(code(&s.read_invoices(&rotated.token).await), 0);

    let live = alice
        .api()
        .list_tokens(alice.req(pb::ListTokensRequest {
            tenant: "acme".into(),
            agent: "bot".into(),
            all: false,
        }))
        .await
        .expect("list")
        .into_inner();
    let jtis: Vec<&str> = live.tokens.iter().map(|t| t.jti.as_str()).collect();
    assert_eq!(jtis, vec![new_info.jti.as_str()]);
    // Rotating the rotated-out token again is refused.
    let again = alice
        .api()
        .rotate_token(alice.req(pb::RotateTokenRequest {
            tenant: "acme".into(),
            jti: old_jti,
            reason: "again".into(),
            ttl_secs: 0,
        }))
        .await
        .expect_err("already revoked");
    assert_eq!(again.code(), Code::FailedPrecondition);
    s.stop().await;
}

#[tokio::test]
async fn kills_are_scoped_and_say_what_they_killed() {
    let (mut s, root, alice) = setup().await;
    for agent in ["a", "b"] {
        alice.register("acme", agent).await;
    }
    root.register("globex", "c").await;
    let scopes = ["invoices:read"];
    let (a1, a1_jti) = alice.issue("acme", "a", &scopes, "s1").await;
    let (a2, _) = alice.issue("acme", "a", &scopes, "s2").await;
    let (b, _) = alice.issue("acme", "b", &scopes, "").await;
    let (c, _) = root.issue("globex", "c", &scopes, "").await;
    let ok = |r: &envoy_types::ext_authz::v3::pb::CheckResponse| code(r) == 0;

    // Token: by jti.
    let k = alice
        .kill(pb::KillScope::Token, "acme", &a1_jti, false)
        .await
        .expect("killed");
    assert_eq!(k.tokens, 1);
    assert_eq!(reason(&s.read_invoices(&a1).await), Some("token_revoked"));
    assert!(ok(&s.read_invoices(&a2).await));

    // Session: only that session's tokens.
    let (a1b, _) = alice.issue("acme", "a", &scopes, "s1").await;
    assert!(ok(&s.read_invoices(&a1b).await));
    let k = alice
        .kill(pb::KillScope::Session, "acme", "s1", false)
        .await
        .expect("killed");
    assert_eq!((k.tokens, k.sessions, k.agents, k.tenants), (1, 1, 1, 1));
    assert_eq!(reason(&s.read_invoices(&a1b).await), Some("token_revoked"));
    assert!(ok(&s.read_invoices(&a2).await));

    // Agent: every token of a, none of b.
    let k = alice
        .kill(pb::KillScope::Agent, "acme", "a", false)
        .await
        .expect("killed");
    assert_eq!((k.tokens, k.sessions, k.agents), (1, 1, 1));
    assert_eq!(reason(&s.read_invoices(&a2).await), Some("token_revoked"));
    assert!(ok(&s.read_invoices(&b).await));

    // A token issued after a kill works (the kill covers tokens issued up to it).
    let (a3, _) = alice.issue("acme", "a", &scopes, "s3").await;
    assert!(ok(&s.read_invoices(&a3).await));

    // Tenant: all of acme, nothing of globex.
    let k = alice
        .kill(pb::KillScope::Tenant, "acme", "", false)
        .await
        .expect("killed");
    assert_eq!((k.tokens, k.agents, k.tenants), (2, 2, 1));
    assert_eq!(reason(&s.read_invoices(&b).await), Some("token_revoked"));
    assert_eq!(reason(&s.read_invoices(&a3).await), Some("token_revoked"));
    assert!(ok(&s.read_invoices(&c).await));

    // Nothing to kill is an error, never success for nothing.
    let none = alice
        .kill(pb::KillScope::Session, "acme", "no-such-session", false)
        .await;
    assert_eq!(none.expect_err("nothing").code(), Code::NotFound);
    let none = alice
        .kill(pb::KillScope::Agent, "acme", "nobody", false)
        .await;
    assert_eq!(none.expect_err("nothing").code(), Code::NotFound);
    // Another tenant's scope is out of reach.
    let other = alice.kill(pb::KillScope::Tenant, "globex", "", false).await;
    assert_eq!(other.expect_err("not hers").code(), Code::PermissionDenied);

    // Everything: never by default, never by a tenant's operator.
    let e = root
        .kill(pb::KillScope::All, "", "", false)
        .await
        .expect_err("needs confirmation");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("confirm"), "{e:?}");
    let e = alice
        .kill(pb::KillScope::All, "", "", true)
        .await
        .expect_err("not a global admin");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(ok(&s.read_invoices(&c).await));
    let k = root
        .kill(pb::KillScope::All, "", "", true)
        .await
        .expect("killed");
    assert_eq!((k.tokens, k.tenants), (1, 1));
    assert_eq!(reason(&s.read_invoices(&c).await), Some("token_revoked"));
    s.stop().await;
    let kills: Vec<String> = s
        .control_rows()
        .into_iter()
        .filter(|r| r.0.starts_with("kill.") && r.4 == "ok")
        .map(|r| r.0)
        .collect();
    assert_eq!(
        kills,
        vec![
            "kill.token",
            "kill.session",
            "kill.agent",
            "kill.tenant",
            "kill.all"
        ]
    );
}

/// A payment over the default bundle's approval threshold.
fn payment(token: &str, amount: u64) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    Req::mcp("payments.create", json!({"amount": amount, "to": "acct-9"}))
        .token(token)
        .build()
}

fn approval_id(r: &envoy_types::ext_authz::v3::pb::CheckResponse) -> String {
    header(&denied(r).headers, "x-aegis-approval-id")
        .expect("an approval id")
        .to_owned()
}

#[tokio::test]
async fn approval_flow_allows_the_approved_call_exactly_once() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "payments-bot").await;
    let (token, _) = alice
        .issue("acme", "payments-bot", &["payments:create"], "")
        .await;
    let approver = s.control(&s.operator("bob", Role::Approver, "acme")).await;

    let r = s.check(payment(&token, 5000)).await.expect("decided");
    assert_eq!(reason(&r), Some("payment_above_threshold"));
    let id = approval_id(&r);
    let body: serde_json::Value = serde_json::from_str(&denied(&r).body).expect("json");
    assert_eq!(body["approval_id"], id.as_str());
    // The same call again finds the same pending approval.
    assert_eq!(
        approval_id(&s.check(payment(&token, 5000)).await.expect("decided")),
        id
    );

    let pending = approver
        .api()
        .list_approvals(approver.req(pb::ListApprovalsRequest {
            tenant: "acme".into(),
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner()
        .approvals;
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].tool.as_str(), pending[0].action.as_str()),
        ("payments", "create")
    );
    assert_eq!(pending[0].arguments, r#"{"amount":5000,"to":"acct-9"}"#);

    // A viewer cannot approve.
    let viewer = s.control(&s.operator("val", Role::Viewer, "acme")).await;
    let decide = |c: &Ctl, id: &str| {
        c.req(pb::DecideApprovalRequest {
            tenant: "acme".into(),
            id: id.into(),
            reason: "invoice 118 confirmed by phone".into(),
            override_ttl_secs: 0,
        })
    };
    let e = viewer
        .api()
        .approve_approval(decide(&viewer, &id))
        .await
        .expect_err("viewer");
    assert_eq!(e.code(), Code::PermissionDenied);
    let d = approver
        .api()
        .approve_approval(decide(&approver, &id))
        .await
        .expect("approved")
        .into_inner();
    assert_eq!(
        d.approval.as_ref().map(|a| a.decided_by.as_str()),
        Some("approver:bob")
    );
    let ovr = d.override_token;

    // The retry with the override token goes through, once, with the token stripped.
    let retry = |amount| {
        Req::mcp("payments.create", json!({"amount": amount, "to": "acct-9"}))
            .token(&token)
            .header("x-aegis-override", &ovr)
            .build()
    };
    let r = s.check(retry(5000)).await.expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    assert!(
        ok(&r)
            .headers_to_remove
            .contains(&"x-aegis-override".to_owned())
    );
    let r = s.check(retry(5000)).await.expect("decided");
    assert_eq!(reason(&r), Some("override_used"));
    // Another call (another amount) with a valid token for a different call.
    let r = s.check(retry(9000)).await.expect("decided");
    assert_eq!(reason(&r), Some("override_mismatch"));
    // A forged override token.
    let forged = Req::mcp("payments.create", json!({"amount": 5000, "to": "acct-9"}))
        .token(&token)
        .header("x-aegis-override", "e30.e30.AAAA")
        .build();
    assert_eq!(
        reason(&s.check(forged).await.expect("decided")),
        Some("override_invalid")
    );

    let used = approver
        .api()
        .get_approval(approver.req(pb::ApprovalRef {
            tenant: "acme".into(),
            id: id.clone(),
        }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(used.status, "used");
    assert!(!used.used_by_decision.is_empty());

    // Deny: the approval is closed; the agent's next try raises a new one.
    let r = s.check(payment(&token, 7000)).await.expect("decided");
    let second = approval_id(&r);
    approver
        .api()
        .deny_approval(decide(&approver, &second))
        .await
        .expect("denied");
    let e = approver
        .api()
        .approve_approval(decide(&approver, &second))
        .await
        .expect_err("closed");
    assert_eq!(e.code(), Code::FailedPrecondition);
    s.stop().await;

    let rows = s.control_rows();
    let approve = rows
        .iter()
        .find(|r| r.0 == "approval.approve" && r.4 == "ok")
        .expect("audited");
    assert_eq!(
        (approve.1.as_str(), approve.5.as_str()),
        ("approver:bob", "invoice 118 confirmed by phone")
    );
    assert!(rows.iter().any(|r| r.0 == "approval.redeem"));
    assert!(
        rows.iter()
            .any(|r| r.0 == "approval.approve" && r.4 == "refused" && r.1 == "viewer:val")
    );
    // The Check rows carry the approval id.
    let conn = rusqlite::Connection::open(s.db()).expect("db");
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit_log WHERE kind = 'check' AND approval_id = ?1 AND reason = 'approved_override'",
            [&id],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn approvals_expire_and_are_capped() {
    let (mut s, _root, alice) = setup_with(|c| {
        // Whole seconds: a 2 s approval lives at least 1 s, time enough to approve it.
        c.control.approval_ttl_secs = 2;
        c.control.override_ttl_secs = 1;
        c.control.max_pending_approvals = 2;
    })
    .await;
    alice.register("acme", "bot").await;
    let (token, _) = alice.issue("acme", "bot", &["payments:create"], "").await;
    let first = approval_id(&s.check(payment(&token, 2000)).await.expect("decided"));
    approval_id(&s.check(payment(&token, 3000)).await.expect("decided"));
    let r = s.check(payment(&token, 4000)).await.expect("decided");
    assert_eq!(reason(&r), Some("approval_cap_reached"));
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(429));

    // Nobody answers: they expire, to deny, and the cap frees up.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let decide = alice.req(pb::DecideApprovalRequest {
        tenant: "acme".into(),
        id: first.clone(),
        reason: "too late".into(),
        override_ttl_secs: 0,
    });
    let e = alice
        .api()
        .approve_approval(decide)
        .await
        .expect_err("expired");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("expired"), "{e:?}");
    let third = approval_id(&s.check(payment(&token, 4000)).await.expect("decided"));

    // An override nobody uses in time expires too.
    let d = alice
        .api()
        .approve_approval(alice.req(pb::DecideApprovalRequest {
            tenant: "acme".into(),
            id: third,
            reason: "ok".into(),
            override_ttl_secs: 0,
        }))
        .await
        .expect("approved")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let late = Req::mcp("payments.create", json!({"amount": 4000, "to": "acct-9"}))
        .token(&token)
        .header("x-aegis-override", &d.override_token)
        .build();
    assert_eq!(
        reason(&s.check(late).await.expect("decided")),
        Some("override_expired")
    );
    s.stop().await;
}

#[tokio::test]
async fn shadow_mode_records_would_deny_and_lets_the_call_through() {
    let (mut s, root, alice) = setup().await;
    alice.register("acme", "bot").await;
    let (token, _) = alice.issue("acme", "bot", &["invoices:read"], "").await;
    let write = || {
        Req::get("/invoices")
            .token(&token)
            .tool("invoices", "create")
            .build()
    };
    assert_eq!(
        reason(&s.check(write()).await.expect("decided")),
        Some("missing_scope")
    );

    // A tenant's operator cannot switch enforcement off; its admin can.
    let e = alice
        .set_tenant("acme", Some("shadow"), None)
        .await
        .expect_err("operator");
    assert_eq!(e.code(), Code::PermissionDenied);
    let t = root
        .set_tenant("acme", Some("shadow"), None)
        .await
        .expect("shadow");
    assert_eq!(t.mode, "shadow");

    let r = s.check(write()).await.expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    let md = r.dynamic_metadata.as_ref().expect("metadata");
    assert_eq!(
        md.fields.get("decision").and_then(|v| v.kind.clone()),
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
            "would_deny".into()
        ))
    );
    // Containment is not policy: a frozen agent stays denied in shadow mode.
    alice
        .freeze("acme", "bot", "contain")
        .await
        .expect("frozen");
    assert_eq!(
        reason(&s.check(write()).await.expect("decided")),
        Some("agent_frozen")
    );
    alice
        .api()
        .unfreeze_agent(alice.req(agent_req("acme", "bot", "done")))
        .await
        .expect("unfrozen");
    root.set_tenant("acme", Some("enforce"), None)
        .await
        .expect("enforce");
    assert_eq!(
        reason(&s.check(write()).await.expect("decided")),
        Some("missing_scope")
    );

    let metrics = http_get(s.running.as_ref().expect("running").admin_addr, "/metrics").await;
    assert!(
        metrics.contains("aegis_checks_total{decision=\"would_deny\"} 1"),
        "{metrics}"
    );
    s.stop().await;
    let decisions: Vec<(String, String)> = s
        .rows()
        .into_iter()
        .filter(|r| r.4 == "create")
        .map(|r| (r.0, r.1))
        .collect();
    let expect = |d: &str, r: &str| (d.to_owned(), r.to_owned());
    assert_eq!(
        decisions,
        vec![
            expect("deny", "missing_scope"),
            expect("would_deny", "missing_scope"),
            expect("deny", "agent_frozen"),
            expect("deny", "missing_scope"),
        ]
    );
}

#[tokio::test]
async fn budgets_deny_past_their_limit() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "bot").await;
    let (token, _) = alice.issue("acme", "bot", &["invoices:read"], "").await;
    let set = |calls: u64, cost: f64| {
        alice.req(pb::SetBudgetRequest {
            tenant: "acme".into(),
            agent: "bot".into(),
            max_calls: calls,
            max_cost: cost,
            window_secs: 3600,
            reason: "test".into(),
        })
    };
    alice.api().set_budget(set(2, 0.0)).await.expect("set");
    assert_eq!(code(&s.read_invoices(&token).await), 0);
    assert_eq!(code(&s.read_invoices(&token).await), 0);
    let r = s.read_invoices(&token).await;
    assert_eq!(reason(&r), Some("budget_exhausted"));
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(429));
    let listed = alice
        .api()
        .list_budgets(alice.req(pb::ListBudgetsRequest {
            tenant: "acme".into(),
            agent: String::new(),
        }))
        .await
        .expect("list")
        .into_inner()
        .budgets;
    assert_eq!((listed[0].used_calls, listed[0].usage_known), (2, true));

    // Cost: from x-aegis-cost; a call that would pass the limit costs nothing.
    alice.api().set_budget(set(0, 10.0)).await.expect("set");
    let costly = |c: &str| {
        Req::get("/invoices")
            .token(&token)
            .tool("invoices", "read")
            .header("x-aegis-cost", c)
            .build()
    };
    assert_eq!(code(&s.check(costly("7.5")).await.expect("decided")), 0);
    assert_eq!(
        reason(&s.check(costly("3")).await.expect("decided")),
        Some("budget_exhausted")
    );
    assert_eq!(code(&s.check(costly("2.5")).await.expect("decided")), 0);
    assert_eq!(
        reason(&s.check(costly("lots")).await.expect("decided")),
        Some("malformed_cost")
    );
    // Removing the budget lifts it.
    alice.api().set_budget(set(0, 0.0)).await.expect("removed");
    assert_eq!(code(&s.check(costly("100")).await.expect("decided")), 0);
    s.stop().await;
}

#[tokio::test]
async fn tenants_are_isolated_and_roles_enforced() {
    let (mut s, root, alice) = setup().await;
    alice.register("acme", "a").await;
    root.register("globex", "g").await;

    let listed = alice
        .api()
        .list_agents(alice.req(pb::ListAgentsRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(
        listed.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        vec!["a"]
    );
    let all = root
        .api()
        .list_agents(root.req(pb::ListAgentsRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(all.len(), 2);

    let get = alice
        .api()
        .get_agent(alice.req(pb::AgentRef {
            tenant: "globex".into(),
            id: "g".into(),
        }))
        .await
        .expect_err("other tenant");
    assert_eq!(get.code(), Code::PermissionDenied);
    assert!(get.message().contains("scoped to tenant acme"), "{get:?}");
    let e = alice
        .freeze("globex", "g", "x")
        .await
        .expect_err("other tenant");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = alice
        .api()
        .list_approvals(alice.req(pb::ListApprovalsRequest {
            tenant: "globex".into(),
            ..Default::default()
        }))
        .await
        .expect_err("other tenant");
    assert_eq!(e.code(), Code::PermissionDenied);

    let viewer = s.control(&s.operator("val", Role::Viewer, "acme")).await;
    let e = viewer.freeze("acme", "a", "x").await.expect_err("viewer");
    assert_eq!(e.code(), Code::PermissionDenied);
    // An agent token is no operator credential, and no credential is no call.
    let agent_token = s.token("acme", "a", &["invoices:read"]);
    let e = s
        .control(&agent_token)
        .await
        .freeze("acme", "a", "x")
        .await
        .expect_err("agent token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut bare = s.control("x").await.api();
    let e = bare
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect_err("no credential");
    assert_eq!(e.code(), Code::Unauthenticated);
    // A credential from another control plane's key.
    let other = aegis::keys::Signer::generate().expect("rng");
    let forged =
        aegis::control::auth::mint_operator(&other, "aegis", "mallory", Role::Admin, "*", 60)
            .expect("mint");
    let e = s
        .control(&forged)
        .await
        .freeze("acme", "a", "x")
        .await
        .expect_err("forged");
    assert_eq!(e.code(), Code::Unauthenticated);
    // A sidecar credential does the fleet calls only.
    let sidecar = s.control(&s.operator("sc", Role::Sidecar, "acme")).await;
    let e = sidecar
        .api()
        .list_agents(sidecar.req(pb::ListAgentsRequest::default()))
        .await
        .expect_err("sidecar");
    assert_eq!(e.code(), Code::PermissionDenied);

    s.stop().await;
    let refused: Vec<(String, String)> = s
        .control_rows()
        .into_iter()
        .filter(|r| r.4 == "refused")
        .map(|r| (r.0, r.1))
        .collect();
    assert!(
        refused.contains(&("agent.freeze".into(), "operator:alice".into())),
        "{refused:?}"
    );
    assert!(
        refused.contains(&("agent.freeze".into(), "viewer:val".into())),
        "{refused:?}"
    );
    assert!(
        refused.contains(&("agent.freeze".into(), "unauthenticated".into())),
        "{refused:?}"
    );
}

/// A copy of the default bundle with another revision and a rule that denies invoices.
fn variant_bundle(dir: &std::path::Path, revision: &str) -> pb::Bundle {
    copy_default_bundle(dir);
    std::fs::write(
        dir.join(".manifest"),
        format!(r#"{{"revision": "{revision}", "roots": ["aegis"]}}"#),
    )
    .expect("manifest");
    let data = dir.join("aegis/data.json");
    let text = std::fs::read_to_string(&data).expect("data");
    std::fs::write(
        &data,
        text.replace(
            "\"scope\": \"invoices:read\"",
            "\"scope\": \"invoices:audit\"",
        ),
    )
    .expect("data");
    let files =
        aegis::policy::BundleFiles::read(&aegis::policy::BundleSource::Dir(dir.to_path_buf()))
            .expect("bundle");
    pb::Bundle::from(&files)
}

#[tokio::test]
async fn policy_push_history_and_rollback() {
    let (mut s, root, alice) = setup().await;
    let (token, _) = (s.token("acme", "bot", &["invoices:read"]), ());
    let before = s.read_invoices(&token).await;
    assert_eq!(policy_version(&before), "default-2026.12.1");

    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = variant_bundle(dir.path(), "tightened-1");
    let push = |c: &Ctl, b: pb::Bundle| {
        c.req(pb::ActivatePolicyRequest {
            bundle: Some(b),
            reason: "tighten invoices".into(),
        })
    };
    // Only an admin of every tenant changes what every tenant shares.
    let e = alice
        .api()
        .activate_policy(push(&alice, bundle.clone()))
        .await
        .expect_err("operator");
    assert_eq!(e.code(), Code::PermissionDenied);
    let rev = root
        .api()
        .activate_policy(push(&root, bundle))
        .await
        .expect("pushed")
        .into_inner();
    assert_eq!(rev.revision, "tightened-1");
    let r = s.read_invoices(&token).await;
    assert_eq!(policy_version(&r), "tightened-1");
    assert_eq!(reason(&r), Some("missing_scope"));

    // A broken bundle is refused and the active one keeps serving.
    let broken = pb::Bundle {
        files: vec![pb::BundleFile {
            path: "x.rego".into(),
            content: b"package x\nallow if {".to_vec(),
        }],
    };
    let e = root
        .api()
        .activate_policy(push(&root, broken))
        .await
        .expect_err("broken");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("x.rego"), "{e:?}");
    assert_eq!(
        policy_version(&s.read_invoices(&token).await),
        "tightened-1"
    );

    let rolled = root
        .api()
        .rollback_policy(root.req(pb::RollbackPolicyRequest {
            to: String::new(),
            reason: "tightening broke billing".into(),
        }))
        .await
        .expect("rolled back")
        .into_inner();
    assert_eq!(
        (rolled.revision.as_str(), rolled.action.as_str()),
        ("default-2026.12.1", "rollback")
    );
    let r = s.read_invoices(&token).await;
    assert_eq!(
        (policy_version(&r), code(&r)),
        ("default-2026.12.1".to_owned(), 0)
    );

    let history = root
        .api()
        .list_policy_revisions(root.req(pb::ListPolicyRevisionsRequest { limit: 10 }))
        .await
        .expect("history")
        .into_inner()
        .revisions;
    let rows: Vec<(&str, &str, &str, bool)> = history
        .iter()
        .map(|r| {
            (
                r.revision.as_str(),
                r.action.as_str(),
                r.actor.as_str(),
                r.active,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("default-2026.12.1", "rollback", "admin:root", true),
            ("tightened-1", "push", "admin:root", false),
            ("default-2026.12.1", "startup", "system:startup", false),
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn a_rollback_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.policy.watch_interval_ms = 100;
    let running = aegis::server::start(c.clone()).await.expect("starts");
    let signer = aegis::keys::Signer::load(&c.data_dir).expect("key");
    let root_token =
        aegis::control::auth::mint_operator(&signer, "aegis", "root", Role::Admin, "*", 600)
            .expect("mint");
    let root = Ctl::connect(running.control_addr.expect("control"), &root_token).await;
    let bdir = tempfile::tempdir().expect("tempdir");
    root.api()
        .activate_policy(root.req(pb::ActivatePolicyRequest {
            bundle: Some(variant_bundle(bdir.path(), "pushed-1")),
            reason: "test".into(),
        }))
        .await
        .expect("pushed");
    running.shutdown().await;
    // Same configuration (the embedded bundle, unchanged): the pushed revision is restored.
    let running = aegis::server::start(c).await.expect("restarts");
    assert_eq!(running.policy.current().revision(), "pushed-1");
    running.shutdown().await;
}

#[tokio::test]
async fn the_control_plane_has_health_and_reflection() {
    let mut s = start().await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.control_addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let r = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "aegis.control.v1.ControlPlane".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "aegis.control.v1.ControlPlane".into(),
        )),
    ];
    let mut stream = ServerReflectionClient::new(ch)
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
        names.contains(&"aegis.control.v1.ControlPlane".to_owned()),
        "{names:?}"
    );
    let second = stream.message().await.expect("answer").expect("some");
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("{second:?}")
    };
    use prost::Message as _;
    let file = prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
        .expect("descriptor");
    let methods: Vec<String> = file.service[0]
        .method
        .iter()
        .filter_map(|m| m.name.clone())
        .collect();
    for m in [
        "FreezeAgent",
        "Kill",
        "ApproveApproval",
        "RollbackPolicy",
        "Watch",
    ] {
        assert!(methods.contains(&m.to_owned()), "{methods:?}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_would_deny_is_marked_on_its_span() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    let sink = aegis::testkit::SpanSink::start_keeping()
        .await
        .expect("sink");
    let endpoint = format!("http://{}", sink.addr);
    let (mut s, root, _alice) = setup_with(|c| c.otlp.endpoint = Some(endpoint)).await;
    root.set_tenant("acme", Some("shadow"), None)
        .await
        .expect("shadow");
    let t = s.token("acme", "bot", &["invoices:read"]);
    let r = s
        .check(
            Req::get("/invoices")
                .token(&t)
                .tool("invoices", "create")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&r), 0);
    assert!(
        eventually(Duration::from_secs(10), || sink
            .spans
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1)
        .await,
        "span exported"
    );
    let span = sink.received_spans().into_iter().next().expect("a span");
    let attr = |k: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.clone())
    };
    assert_eq!(
        attr("aegis.decision"),
        Some(AnyValue::StringValue("would_deny".into()))
    );
    assert_eq!(
        attr("aegis.reason"),
        Some(AnyValue::StringValue("missing_scope".into()))
    );
    assert_eq!(attr("aegis.shadow"), Some(AnyValue::BoolValue(true)));
    s.stop().await;
}

#[tokio::test]
async fn the_default_autonomy_level_comes_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = {
        // The variable reaches only the child process.
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_aegis"));
        cmd.env("AEGIS_SOC_AUTONOMY_LEVEL", "3");
        let data = data.to_string_lossy().into_owned();
        spawn_serve_cmd(cmd, &["--data-dir", &data], aegis::server::ANNOUNCE)
    };
    let addr = server
        .announced(aegis::server::CONTROL_ANNOUNCE)
        .expect("control");
    let root = operator_cmd(&data, "root", "admin", "*");
    let (code, out, err) = ctl(addr, &root, &["tenants", "get", "acme", "--json"]);
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (t["mode"].as_str(), t["autonomy_level"].as_u64()),
        (Some("enforce"), Some(3))
    );
    let (code, out, err) = ctl(
        addr,
        &root,
        &[
            "tenants",
            "set",
            "acme",
            "--autonomy",
            "L4",
            "--reason",
            "24/7 SOC",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("autonomy: L4"), "{out}");
    let (code, _, err) = ctl(
        addr,
        &root,
        &[
            "tenants",
            "set",
            "acme",
            "--autonomy",
            "L5",
            "--reason",
            "x",
        ],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("1-4"), "{err}");
}

#[tokio::test]
async fn a_changed_bundle_file_is_recorded_as_an_activation() {
    let bundle = tempfile::tempdir().expect("tempdir");
    copy_default_bundle(bundle.path());
    let dir = bundle.path().to_path_buf();
    let (mut s, root, _alice) = setup_with(move |c| c.policy.bundle = Some(dir)).await;
    std::fs::write(
        bundle.path().join(".manifest"),
        r#"{"revision": "edited-on-disk", "roots": ["aegis"]}"#,
    )
    .expect("write");
    let history = || async {
        root.api()
            .list_policy_revisions(root.req(pb::ListPolicyRevisionsRequest { limit: 5 }))
            .await
            .expect("history")
            .into_inner()
            .revisions
    };
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            history()
                .await
                .first()
                .map(|r| (r.revision.clone(), r.action.clone()))
                == Some(("edited-on-disk".into(), "file".into()))
        })
        .await,
        "{:?}",
        history().await
    );
    s.stop().await;
}

#[test]
fn a_corrupt_control_database_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("control.db"), vec![0x5a; 8192]).expect("garbage");
    let err = serve_refuses(&[std::ffi::OsStr::new("--data-dir"), data.as_os_str()]);
    assert!(err.contains("control.db"), "{err}");
    // Nothing was overwritten: the file is as it was, for whoever investigates.
    assert_eq!(
        std::fs::read(data.join("control.db")).expect("read"),
        vec![0x5a; 8192]
    );
}

/// Tokens a key holder forged with sane signatures but insane claims: each would outlive
/// or dodge a kill. Through the real server, as the agent sees it: refused, with the reason.
#[tokio::test]
async fn claims_that_dodge_a_kill_are_refused() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "bot").await;
    // iat a day ahead: kill marks cover tokens issued before the kill, so this one would
    // survive `kill agent` (the reported attack).
    let future = mint(
        &s.signer,
        aegis::identity::Claims {
            iat: now() + 86_400,
            exp: now() + 86_400 + 900,
            ..claims("acme", "bot", &["invoices:read"])
        },
    );
    // exp = i64::MAX: never expires.
    let forever = mint(
        &s.signer,
        aegis::identity::Claims {
            exp: i64::MAX,
            ..claims("acme", "bot", &["invoices:read"])
        },
    );
    // "acme " is another tenant byte for byte: out of reach of acme's kills and budgets.
    let spaced = mint(&s.signer, claims("acme ", "bot", &["invoices:read"]));
    alice
        .kill(pb::KillScope::Agent, "acme", "bot", false)
        .await
        .expect("killed");
    for (token, want) in [
        (&future, "token_issued_in_future"),
        (&forever, "token_lifetime_too_long"),
        (&spaced, "token_bad_claim"),
    ] {
        let r = s.read_invoices(token).await;
        assert_eq!(denied(&r).status.as_ref().map(|st| st.code), Some(401));
        assert_eq!(reason(&r), Some(want));
    }
    s.stop().await;
    let reasons: Vec<String> = s.rows().into_iter().map(|r| r.1).collect();
    assert_eq!(
        reasons,
        [
            "token_issued_in_future",
            "token_lifetime_too_long",
            "token_bad_claim"
        ]
    );
}

/// Approves the payment `token` asks for and returns the override token.
async fn approved_override(s: &TestServer, approver: &Ctl, token: &str) -> String {
    let r = s.check(payment(token, 5000)).await.expect("decided");
    assert_eq!(reason(&r), Some("payment_above_threshold"));
    approver
        .api()
        .approve_approval(approver.req(pb::DecideApprovalRequest {
            tenant: "acme".into(),
            id: approval_id(&r),
            reason: "confirmed".into(),
            override_ttl_secs: 0,
        }))
        .await
        .expect("approved")
        .into_inner()
        .override_token
}

fn with_override(token: &str, ovr: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    Req::mcp("payments.create", json!({"amount": 5000, "to": "acct-9"}))
        .token(token)
        .header("x-aegis-override", ovr)
        .build()
}

/// An approver approved the call one session asked for: the same agent's token of another
/// session (another run, another user's conversation) cannot redeem it, unless the operator
/// chose `control.override_binding = "agent"`.
#[tokio::test]
async fn an_override_is_redeemed_only_in_the_session_that_asked() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "payments-bot").await;
    let scopes = ["payments:create"];
    let (s1, _) = alice.issue("acme", "payments-bot", &scopes, "s1").await;
    let (s2, _) = alice.issue("acme", "payments-bot", &scopes, "s2").await;
    let ovr = approved_override(&s, &alice, &s1).await;

    let r = s.check(with_override(&s2, &ovr)).await.expect("decided");
    assert_eq!(reason(&r), Some("override_wrong_session"));
    assert_eq!(denied(&r).status.as_ref().map(|st| st.code), Some(403));
    // Refused without being used up: the session that asked still gets its call.
    let r = s.check(with_override(&s1, &ovr)).await.expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    // The same call from two sessions raises two approvals (one session's pending
    // approval is of no use to the other), and each session redeems its own.
    let first = approval_id(&s.check(payment(&s1, 5000)).await.expect("decided"));
    let second = approval_id(&s.check(payment(&s2, 5000)).await.expect("decided"));
    assert_ne!(first, second);
    let ovr2 = approved_override(&s, &alice, &s2).await;
    let r = s.check(with_override(&s2, &ovr2)).await.expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    s.stop().await;

    let (mut s, _root, alice) =
        setup_with(|c| c.control.override_binding = aegis::config::OverrideBinding::Agent).await;
    alice.register("acme", "payments-bot").await;
    let (s1, _) = alice.issue("acme", "payments-bot", &scopes, "s1").await;
    let (s2, _) = alice.issue("acme", "payments-bot", &scopes, "s2").await;
    let ovr = approved_override(&s, &alice, &s1).await;
    let r = s.check(with_override(&s2, &ovr)).await.expect("decided");
    assert_eq!(code(&r), 0, "agent-wide binding: {r:?}");
    s.stop().await;
}

/// Enforcement runs in one order: containment before an approved override and before the
/// budget; the budget before the override is used up (a call its budget refuses keeps the
/// approval for later).
#[tokio::test]
async fn a_frozen_agent_gets_its_containment_reason_before_its_override_and_budget() {
    let (mut s, _root, alice) = setup().await;
    alice.register("acme", "payments-bot").await;
    let (token, _) = alice
        .issue("acme", "payments-bot", &["payments:create"], "")
        .await;
    let ovr = approved_override(&s, &alice, &token).await;
    let budget = |calls: u64| {
        alice.req(pb::SetBudgetRequest {
            tenant: "acme".into(),
            agent: "payments-bot".into(),
            max_calls: calls,
            max_cost: 0.0,
            window_secs: 3600,
            reason: "test".into(),
        })
    };
    // A budget of one call, used up by a payment the policy allows.
    alice.api().set_budget(budget(1)).await.expect("set");
    assert_eq!(
        code(&s.check(payment(&token, 10)).await.expect("decided")),
        0
    );
    alice
        .freeze("acme", "payments-bot", "investigating")
        .await
        .expect("frozen");

    let r = s.check(with_override(&token, &ovr)).await.expect("decided");
    assert_eq!(reason(&r), Some("agent_frozen"));
    assert_eq!(denied(&r).status.as_ref().map(|st| st.code), Some(403));

    alice
        .api()
        .unfreeze_agent(alice.req(agent_req("acme", "payments-bot", "cleared")))
        .await
        .expect("unfrozen");
    let r = s.check(with_override(&token, &ovr)).await.expect("decided");
    assert_eq!(reason(&r), Some("budget_exhausted"));
    assert_eq!(denied(&r).status.as_ref().map(|st| st.code), Some(429));

    alice.api().set_budget(budget(10)).await.expect("raised");
    let r = s.check(with_override(&token, &ovr)).await.expect("decided");
    assert_eq!(code(&r), 0, "{r:?}");
    s.stop().await;
}

/// Shadow mode softens the policy's deny and the budget's (`would_deny`, the call goes
/// on), never a restriction: the restricted agent's mutating call still waits for an
/// approval.
#[tokio::test]
async fn shadow_mode_softens_the_budget_but_not_a_restriction() {
    let (mut s, root, alice) = setup().await;
    alice.register("acme", "payments-bot").await;
    let (token, _) = alice
        .issue("acme", "payments-bot", &["payments:create"], "")
        .await;
    root.set_tenant("acme", Some("shadow"), None)
        .await
        .expect("shadow");
    alice
        .api()
        .set_budget(alice.req(pb::SetBudgetRequest {
            tenant: "acme".into(),
            agent: "payments-bot".into(),
            max_calls: 1,
            max_cost: 0.0,
            window_secs: 3600,
            reason: "test".into(),
        }))
        .await
        .expect("set");
    assert_eq!(
        code(&s.check(payment(&token, 10)).await.expect("decided")),
        0
    );
    let over = s.check(payment(&token, 10)).await.expect("decided");
    assert_eq!(code(&over), 0, "over budget in shadow mode: {over:?}");

    root.api()
        .restrict_agent(root.req(agent_req("acme", "payments-bot", "downgrade")))
        .await
        .expect("restricted");
    let r = s.check(payment(&token, 10)).await.expect("decided");
    assert_eq!(reason(&r), Some("agent_restricted"));
    s.stop().await;
    let decisions: Vec<(String, String)> = s
        .rows()
        .into_iter()
        .filter(|r| r.4 == "create")
        .map(|r| (r.0, r.1))
        .collect();
    let expect = |d: &str, r: &str| (d.to_owned(), r.to_owned());
    assert_eq!(
        decisions,
        vec![
            expect("allow", "scope_granted"),
            expect("would_deny", "budget_exhausted"),
            expect("approval_needed", "agent_restricted"),
        ]
    );
}

/// All-in-one: the epoch is raised only by an admin of every tenant, with a reason; each
/// confirmation moves the epoch and the version up, and the in-process data plane follows.
#[tokio::test]
async fn only_a_global_admin_raises_the_state_epoch_and_it_only_goes_up() {
    let (s, root, alice) = setup().await;
    let version = |v: &pb::StateVersion| (v.epoch, v.version);
    let before = root
        .api()
        .get_state_version(root.req(pb::GetStateVersionRequest {}))
        .await
        .expect("state version")
        .into_inner();
    assert_eq!(before.epoch, 0);

    let refused = alice
        .api()
        .confirm_restore(alice.req(pb::ConfirmRestoreRequest {
            reason: "undo a kill".into(),
        }))
        .await
        .expect_err("an operator of one tenant cannot");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let no_reason = root
        .api()
        .confirm_restore(root.req(pb::ConfirmRestoreRequest { reason: " ".into() }))
        .await
        .expect_err("a reason is required");
    assert_eq!(no_reason.code(), Code::InvalidArgument, "{no_reason:?}");

    let after = root
        .api()
        .confirm_restore(root.req(pb::ConfirmRestoreRequest {
            reason: "restored a backup".into(),
        }))
        .await
        .expect("confirmed")
        .into_inner();
    assert_eq!(after.epoch, 1);
    assert!(after.version > before.version, "{before:?} → {after:?}");
    let admin = s.running.as_ref().expect("running").admin_addr;
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("aegis_control_state_epoch 1")
            && metrics.contains(&format!("aegis_control_state_version {}", after.version)),
        "{metrics}"
    );
    let again = root
        .api()
        .get_state_version(root.req(pb::GetStateVersionRequest {}))
        .await
        .expect("state version")
        .into_inner();
    assert_eq!(version(&again), version(&after));
    let rows = s.control_rows();
    assert!(
        rows.iter()
            .any(|r| r.0 == "state.confirm_restore" && r.4 == "ok" && r.5 == "restored a backup"),
        "{rows:?}"
    );
}

/// A restored database can be behind the epoch its fleet holds (the backup was taken before
/// an earlier confirmation). The confirmation must move past the highest epoch a sidecar
/// reported, or sidecars would take the confirmed state for the history they already
/// followed at that epoch. A sidecar credential can forge its report: an absurd one moves
/// the epoch by a bounded step, not to the end of the range.
#[tokio::test]
async fn a_confirmed_restore_moves_past_the_epoch_the_fleet_reported() {
    let (s, root, _) = setup().await;
    let pod = s.control(&s.operator("pod", Role::Sidecar, "acme")).await;
    let confirm = || async {
        root.api()
            .confirm_restore(root.req(pb::ConfirmRestoreRequest {
                reason: "restored a backup".into(),
            }))
            .await
            .expect("confirmed")
            .into_inner()
    };
    // A sidecar that followed epoch 1 before this database (at epoch 0) was restored.
    pod.api()
        .watch(pod.req(pb::WatchRequest {
            sidecar: "pod-1".into(),
            seen_epoch: 1,
            seen_version: 300,
            ..Default::default()
        }))
        .await
        .expect("watch");
    let confirmed = confirm().await;
    assert_eq!(confirmed.epoch, 2, "{confirmed:?}");

    // A forged report: believed at most a million epochs above the control plane's own.
    pod.api()
        .watch(pod.req(pb::WatchRequest {
            sidecar: "pod-1".into(),
            seen_epoch: u64::MAX,
            seen_version: u64::MAX,
            ..Default::default()
        }))
        .await
        .expect("watch");
    let confirmed = confirm().await;
    assert_eq!(confirmed.epoch, 2 + 1_000_000 + 1, "{confirmed:?}");
    let shown = root
        .api()
        .get_state_version(root.req(pb::GetStateVersionRequest {}))
        .await
        .expect("state version")
        .into_inner();
    assert_eq!(shown.epoch, confirmed.epoch);
}

/// The store goes back under a running control plane (a restored file, a failover to a
/// standby that had not caught up): the versions it hands out next were delivered before,
/// for other changes. A freeze committed then must still reach the data plane; before, it
/// was skipped as already delivered and the frozen agent's calls were allowed.
#[tokio::test]
async fn a_store_that_went_back_in_version_still_delivers_the_next_freeze() {
    let (s, _root, alice) = setup().await;
    alice.register("acme", "billing-bot").await;
    let (token, _) = alice
        .issue("acme", "billing-bot", &["invoices:read"], "")
        .await;
    for reason in ["one", "two", "three"] {
        alice
            .freeze("acme", "billing-bot", reason)
            .await
            .expect("frozen");
        alice
            .api()
            .unfreeze_agent(alice.req(agent_req("acme", "billing-bot", reason)))
            .await
            .expect("unfrozen");
    }
    assert_eq!(code(&s.read_invoices(&token).await), 0);

    // Back to version 2, as a stale copy of the store would be.
    let db = rusqlite::Connection::open(s.data_dir().join("control.db")).expect("open");
    db.busy_timeout(Duration::from_secs(5)).expect("timeout");
    db.execute_batch(
        "BEGIN IMMEDIATE; UPDATE meta SET value = 2 WHERE key = 'version'; \
         DELETE FROM changes WHERE version > 2; COMMIT;",
    )
    .expect("rolled back");
    drop(db);

    alice
        .freeze("acme", "billing-bot", "after the rollback")
        .await
        .expect("frozen");
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("agent_frozen"),
        "the freeze reached the data plane"
    );
}

/// All-in-one: the control database goes back under the running server (a restored file,
/// a failover to a stale copy): the in-process data plane refuses the older state as a
/// sidecar does, so a revoked token and a frozen agent stay denied, until an operator
/// confirms the restore, after which the revocation it held is still kept.
#[tokio::test]
async fn the_in_process_data_plane_refuses_a_store_that_went_back() {
    let (mut s, root, _alice) = setup().await;
    root.register("acme", "bot").await;
    let (token, jti) = root.issue("acme", "bot", &["invoices:read"], "").await;
    root.register("acme", "other").await;
    let (other, _) = root.issue("acme", "other", &["invoices:read"], "").await;
    assert_eq!(code(&s.read_invoices(&token).await), 0);
    root.api()
        .revoke_token(root.req(pb::RevokeTokenRequest {
            tenant: "acme".into(),
            jti: jti.clone(),
            reason: "leaked".into(),
        }))
        .await
        .expect("revoked");
    root.freeze("acme", "other", "compromised")
        .await
        .expect("frozen");
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("token_revoked")
    );
    assert_eq!(reason(&s.read_invoices(&other).await), Some("agent_frozen"));

    // The store loses both changes and its version goes back, as a restored copy would.
    let db = rusqlite::Connection::open(s.data_dir().join("control.db")).expect("open");
    // The running server takes the write lock now and then: wait for it, and change all
    // or nothing.
    db.busy_timeout(Duration::from_secs(5)).expect("timeout");
    db.execute_batch(
        "BEGIN IMMEDIATE; \
         UPDATE tokens SET revoked_at = NULL, revoked_reason = ''; \
         UPDATE agents SET status = 'active' WHERE id = 'other'; \
         UPDATE meta SET value = value - 2 WHERE key = 'version'; \
         DELETE FROM changes WHERE version > (SELECT value FROM meta WHERE key = 'version'); \
         COMMIT;",
    )
    .expect("roll back");
    drop(db);
    // The replica notices within its feed's second and resends a snapshot.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("token_revoked"),
        "a rolled-back store must not revive a revoked token"
    );
    assert_eq!(
        reason(&s.read_invoices(&other).await),
        Some("agent_frozen"),
        "nor unfreeze an agent"
    );

    // The operator confirms the restore: the state at the new epoch is followed, and the
    // revocation held is kept until its token expires.
    root.api()
        .confirm_restore(root.req(pb::ConfirmRestoreRequest {
            reason: "restored a backup".into(),
        }))
        .await
        .expect("confirmed");
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("token_revoked")
    );
    assert_eq!(
        code(&s.read_invoices(&other).await),
        0,
        "the confirmed state is followed (the freeze was lost with it)"
    );
    s.stop().await;
}

/// All-in-one: the store is replaced by another history that reached the same version (a
/// backup restored and moved on, a failover to a copy that lost commits): versions alone
/// do not tell, the history hash does. The data plane refuses the other history as a
/// rollback, keeping the revocation the store lost, and still applies the freeze the other
/// history holds (it denies more).
#[tokio::test]
async fn another_history_at_the_same_version_is_refused_as_a_rollback() {
    let (mut s, root, _alice) = setup().await;
    root.register("acme", "bot").await;
    let (token, jti) = root.issue("acme", "bot", &["invoices:read"], "").await;
    root.register("acme", "other").await;
    let (other, _) = root.issue("acme", "other", &["invoices:read"], "").await;
    root.api()
        .revoke_token(root.req(pb::RevokeTokenRequest {
            tenant: "acme".into(),
            jti: jti.clone(),
            reason: "leaked".into(),
        }))
        .await
        .expect("revoked");
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("token_revoked")
    );
    assert_eq!(code(&s.read_invoices(&other).await), 0);

    // At the same version, the store now holds another history: the revocation never
    // happened, and `other` was frozen instead.
    let db = rusqlite::Connection::open(s.data_dir().join("control.db")).expect("open");
    db.busy_timeout(Duration::from_secs(5)).expect("timeout");
    db.execute_batch(
        "BEGIN IMMEDIATE; \
         UPDATE tokens SET revoked_at = NULL, revoked_reason = ''; \
         UPDATE agents SET status = 'frozen' WHERE id = 'other'; \
         UPDATE chains SET chain = zeroblob(32) \
             WHERE version = (SELECT value FROM meta WHERE key = 'version'); \
         COMMIT;",
    )
    .expect("another history");
    drop(db);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while code(&s.read_invoices(&other).await) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the other history's freeze reached the data plane within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reason(&s.read_invoices(&other).await), Some("agent_frozen"));
    assert_eq!(
        reason(&s.read_invoices(&token).await),
        Some("token_revoked"),
        "the revocation the store lost stays"
    );
    s.stop().await;
}

/// A sidecar says which history it holds (the hash at its version); a control plane whose
/// store holds another there marks the snapshot it sends diverged (refused), and one that
/// holds the same does not.
#[tokio::test]
async fn a_watch_from_another_history_gets_a_diverged_snapshot() {
    let (s, root, _) = setup().await;
    root.register("acme", "bot").await;
    let pod = s.control(&s.operator("pod", Role::Sidecar, "acme")).await;
    let first = |seen: pb::WatchRequest| {
        let pod = &pod;
        async move {
            let mut stream = pod
                .api()
                .watch(pod.req(seen))
                .await
                .expect("watch")
                .into_inner();
            stream.message().await.expect("event").expect("a snapshot")
        }
    };
    let now = first(pb::WatchRequest {
        sidecar: "pod-1".into(),
        ..Default::default()
    })
    .await;
    assert!(!now.chain.is_empty() && !now.diverged, "{now:?}");
    let same = first(pb::WatchRequest {
        sidecar: "pod-1".into(),
        seen_epoch: now.epoch,
        seen_version: now.version,
        seen_chain: now.chain.clone(),
    })
    .await;
    assert!(!same.diverged, "the same history");
    let other = first(pb::WatchRequest {
        sidecar: "pod-1".into(),
        seen_epoch: now.epoch,
        seen_version: now.version,
        seen_chain: vec![7; 32],
    })
    .await;
    assert!(other.diverged, "another history at that version");
}

/// When the store turns out to hold another history, each watcher is judged on what it
/// holds: one scoped to a tenant that was sent nothing since the histories parted keeps
/// following; one that was sent the lost change is told the snapshot diverged.
#[tokio::test]
async fn a_diverged_snapshot_is_judged_for_each_watcher() {
    let (s, root, _) = setup().await;
    root.register("globex", "g-bot").await;
    let watch = |tenant: &'static str, name: &'static str| {
        let cred = s.operator(name, Role::Sidecar, tenant);
        let s = &s;
        async move {
            let pod = s.control(&cred).await;
            let mut stream = pod
                .api()
                .watch(pod.req(pb::WatchRequest {
                    sidecar: name.into(),
                    ..Default::default()
                }))
                .await
                .expect("watch")
                .into_inner();
            let first = stream.message().await.expect("event").expect("snapshot");
            assert!(first.snapshot && !first.diverged);
            stream
        }
    };
    let mut globex = watch("globex", "pod-globex").await;
    let mut acme = watch("acme", "pod-acme").await;
    // acme changes: sent to the acme watcher only.
    root.register("acme", "bot").await;
    let delta = acme.message().await.expect("event").expect("delta");
    assert!(!delta.snapshot);

    // The store's last version now holds another history.
    let db = rusqlite::Connection::open(s.data_dir().join("control.db")).expect("open");
    db.busy_timeout(Duration::from_secs(5)).expect("timeout");
    db.execute_batch(
        "UPDATE chains SET chain = zeroblob(32) \
         WHERE version = (SELECT value FROM meta WHERE key = 'version');",
    )
    .expect("another history");
    drop(db);
    let to_acme = next_message(&mut acme).await;
    assert!(to_acme.snapshot && to_acme.diverged, "{to_acme:?}");
    let to_globex = next_message(&mut globex).await;
    assert!(
        to_globex.snapshot && !to_globex.diverged,
        "the globex watcher holds a version both histories share: {to_globex:?}"
    );
}
