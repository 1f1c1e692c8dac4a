//! Detection and response in the all-in-one server: real Checks build a pattern, the
//! correlation engine raises the incident, the response engine contains the agent as the
//! tenant's autonomy level says, and every step is in the signed log.
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
use envoy_types::ext_authz::v3::pb::CheckResponse;
use tonic::Code;

async fn setup(level: Option<u32>) -> (TestServer, Ctl) {
    let s = start().await;
    let root = s.control(&s.operator("root", Role::Admin, "*")).await;
    if let Some(l) = level {
        root.set_tenant("acme", None, Some(l))
            .await
            .expect("autonomy");
    }
    root.register("acme", "bot").await;
    (s, root)
}

fn id_of(r: &CheckResponse) -> String {
    decision_id(r).expect("decision id")
}

#[tokio::test]
async fn exfiltration_at_l3_freezes_the_agent_everywhere() {
    let (mut s, root) = setup(Some(3)).await;
    let (token, _) = root
        .issue("acme", "bot", &["github:read", "slack:post"], "sess-1")
        .await;
    let read = s
        .check(
            Req::get("/repos/acme/private")
                .token(&token)
                .tool("github", "read_repo")
                .header("x-aegis-run-id", "run-7")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&read), 0);
    let post = s
        .check(
            Req::get("/hooks/x")
                .token(&token)
                .tool("slack", "post_message")
                .header("x-aegis-run-id", "run-7")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&post), 0);

    let incident = root.contained_incident("acme", "data_exfil_pattern").await;
    assert_eq!(incident.severity, "critical");
    assert_eq!(incident.evidence, vec![id_of(&read), id_of(&post)]);
    assert_eq!(
        (incident.run_id.as_str(), incident.session.as_str()),
        ("run-7", "sess-1")
    );
    assert_eq!(incident.autonomy_level, 3);
    assert_eq!(incident.policy_revision, "default-2026.12.1");
    assert_eq!(
        incident.actions,
        vec![
            "notify: logged (no webhook for this tenant)",
            "freeze_agent: frozen"
        ]
    );
    // Contained: the agent's next call is denied.
    let r = s.read_invoices(&token).await;
    assert_eq!(reason(&r), Some("agent_frozen"));

    s.stop().await;
    let rows = s.control_rows();
    let raise = rows
        .iter()
        .find(|r| r.0 == "incident.raise")
        .expect("raised");
    assert_eq!(raise.1, "sidecar:data-plane");
    let freeze = rows.iter().find(|r| r.0 == "agent.freeze").expect("frozen");
    assert_eq!(freeze.1, "admin:response-engine");
    assert_eq!(
        freeze.5,
        format!("incident {} (data_exfil_pattern)", incident.id)
    );
}

#[tokio::test]
async fn at_l1_a_deny_storm_is_raised_and_nothing_else() {
    let (mut s, root) = setup(None).await;
    let (token, _) = root.issue("acme", "bot", &["invoices:read"], "").await;
    for _ in 0..7 {
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
    assert_eq!(
        (incident.severity.as_str(), incident.autonomy_level),
        ("high", 1)
    );
    assert_eq!(incident.evidence.len(), 5);
    assert_eq!(
        incident.actions,
        vec!["notify: logged (no webhook for this tenant)"]
    );
    // Once per storm: the two denies after the fifth raised nothing more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(root.incidents("acme").await.len(), 1);
    assert_eq!(
        code(&s.read_invoices(&token).await),
        0,
        "L1 does not contain"
    );

    // The dry run says what each level would do.
    let plan = |level| {
        root.req(pb::PlanResponseRequest {
            tenant: "acme".into(),
            id: incident.id.clone(),
            autonomy_level: level,
        })
    };
    let at = |p: pb::ResponsePlan| p.actions;
    assert_eq!(
        at(root
            .api()
            .plan_response(plan(0))
            .await
            .expect("plan")
            .into_inner()),
        vec!["notify"]
    );
    assert_eq!(
        at(root
            .api()
            .plan_response(plan(4))
            .await
            .expect("plan")
            .into_inner()),
        vec![
            "notify",
            "freeze_agent",
            "kill_agent_tokens",
            "kill_session"
        ]
    );

    // Triage: acknowledge, close with a reason, no second close.
    let action = |reason: &str| {
        root.req(pb::IncidentActionRequest {
            tenant: "acme".into(),
            id: incident.id.clone(),
            reason: reason.into(),
        })
    };
    let acked = root
        .api()
        .acknowledge_incident(action(""))
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(
        (acked.status.as_str(), acked.acknowledged_by.as_str()),
        ("acknowledged", "admin:root")
    );
    let e = root
        .api()
        .close_incident(action(""))
        .await
        .expect_err("no reason");
    assert_eq!(e.code(), Code::InvalidArgument);
    let closed = root
        .api()
        .close_incident(action("scope misconfiguration, fixed"))
        .await
        .expect("closed")
        .into_inner();
    assert_eq!(
        (closed.status.as_str(), closed.close_reason.as_str()),
        ("closed", "scope misconfiguration, fixed")
    );
    let e = root
        .api()
        .close_incident(action("again"))
        .await
        .expect_err("closed");
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Another tenant's operator sees none of it.
    let other = s
        .control(&s.operator("gina", Role::Operator, "globex"))
        .await;
    let e = other
        .api()
        .get_incident(other.req(pb::IncidentRef {
            tenant: "acme".into(),
            id: incident.id.clone(),
        }))
        .await
        .expect_err("other tenant");
    assert_eq!(e.code(), Code::PermissionDenied);
    let mine = other
        .api()
        .list_incidents(other.req(pb::ListIncidentsRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .incidents;
    assert!(mine.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn at_l4_the_agent_is_frozen_its_tokens_revoked_and_its_session_killed() {
    let (mut s, root) = setup(Some(4)).await;
    let (token, _) = root
        .issue("acme", "bot", &["invoices:read"], "sess-9")
        .await;
    for _ in 0..5 {
        s.check(
            Req::get("/invoices")
                .token(&token)
                .tool("invoices", "create")
                .build(),
        )
        .await
        .expect("decided");
    }
    let incident = root.contained_incident("acme", "deny_storm").await;
    assert_eq!(
        incident.actions,
        vec![
            "notify: logged (no webhook for this tenant)",
            "freeze_agent: frozen",
            "kill_agent_tokens: 1 tokens",
            "kill_session: session sess-9: 0 tokens"
        ]
    );
    let live = root
        .api()
        .list_tokens(root.req(pb::ListTokensRequest {
            tenant: "acme".into(),
            agent: "bot".into(),
            all: false,
        }))
        .await
        .expect("tokens")
        .into_inner()
        .tokens;
    assert!(live.is_empty());
    assert_eq!(reason(&s.read_invoices(&token).await), Some("agent_frozen"));
    s.stop().await;
    let kills: Vec<String> = s
        .control_rows()
        .into_iter()
        .filter(|r| r.0.starts_with("kill.") && r.1 == "admin:response-engine")
        .map(|r| r.0)
        .collect();
    assert_eq!(kills, vec!["kill.agent", "kill.session"]);
}
