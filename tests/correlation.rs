//! The correlation rules, one at a time, with their near misses: word matching, once per
//! episode, window edges, out-of-order events, refused times.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use aegis::correlate::{Decision, Engine, EventError, Finding, Thresholds, Words, words};

const T0: i64 = 1_795_000_000 * 1_000_000_000;
const S: i64 = 1_000_000_000;

fn engine() -> Engine {
    Engine::new(Thresholds::default(), Words::default())
}

fn ev(at_s: f64, tool: &str, action: &str, decision: &str, id: &str) -> Decision {
    Decision {
        time_ns: T0 + (at_s * S as f64) as i64,
        tenant: "acme".into(),
        agent: "bot".into(),
        session: "s1".into(),
        run_id: "run-1".into(),
        tool: tool.into(),
        action: action.into(),
        decision: decision.into(),
        reason: if decision == "deny" {
            "missing_scope".into()
        } else {
            "ok".into()
        },
        decision_id: id.into(),
        trust_level: "internal".into(),
        audit_seq: 1,
        row_hash: [0; 32],
    }
}

/// Feeds the events; returns (index of the event, kind) of every finding.
fn run(e: &mut Engine, events: &[Decision]) -> Vec<(usize, &'static str)> {
    let mut out = Vec::new();
    for (i, d) in events.iter().enumerate() {
        for f in e.observe(d.clone()).expect("valid event") {
            out.push((i, f.kind));
        }
    }
    out
}

fn kinds(found: &[(usize, &'static str)], kind: &str) -> Vec<usize> {
    found
        .iter()
        .filter(|(_, k)| *k == kind)
        .map(|(i, _)| *i)
        .collect()
}

#[test]
fn words_split_at_separators_and_camel_case() {
    assert_eq!(words("postgres_query"), vec!["postgres", "query"]);
    assert_eq!(words("sendEmail"), vec!["send", "email"]);
    assert_eq!(words("tools/list"), vec!["tools", "list"]);
    assert_eq!(words("HTTPGet"), vec!["httpget"]);
    assert_eq!(words("location"), vec!["location"]);
}

#[test]
fn deny_storm_fires_once_per_storm_and_rearms_after_a_quiet_window() {
    let mut e = engine();
    let deny = |t: f64, id: usize| ev(t, "invoices", "create", "deny", &format!("d{id}"));
    // 5 denies in 40 s: one storm; more denies, and the window sliding back to 5: nothing.
    let times = [0.0, 10.0, 20.0, 30.0, 40.0, 61.0, 71.0, 72.0, 75.0];
    let events: Vec<_> = times.iter().enumerate().map(|(i, t)| deny(*t, i)).collect();
    let found = run(&mut e, &events);
    assert_eq!(kinds(&found, "deny_storm"), vec![4]);
    // A whole window (60 s) below the threshold re-arms it; the next storm fires again.
    let later = [140.0, 141.0, 142.0, 143.0, 144.0];
    let events: Vec<_> = later
        .iter()
        .enumerate()
        .map(|(i, t)| deny(*t, 100 + i))
        .collect();
    assert_eq!(kinds(&run(&mut e, &events), "deny_storm"), vec![4]);
}

#[test]
fn deny_storm_near_miss_at_the_window_edge() {
    let mut e = engine();
    // The 5th deny comes 60 s after the 1st: only 4 in any 60 s window.
    let events: Vec<_> = [0.0, 15.0, 30.0, 45.0, 60.0]
        .iter()
        .enumerate()
        .map(|(i, t)| ev(*t, "x", "y", "deny", &format!("d{i}")))
        .collect();
    assert!(kinds(&run(&mut e, &events), "deny_storm").is_empty());
    // Allowed calls and other agents do not count.
    let mut e = engine();
    let mut events: Vec<_> = (0..4)
        .map(|i| ev(i as f64, "x", "y", "deny", &format!("d{i}")))
        .collect();
    events.push(ev(5.0, "x", "y", "allow", "a"));
    let mut other = ev(6.0, "x", "y", "deny", "o");
    other.agent = "other-bot".into();
    events.push(other);
    assert!(kinds(&run(&mut e, &events), "deny_storm").is_empty());
}

#[test]
fn exfiltration_is_a_source_then_a_sink_matched_by_word() {
    let mut e = engine();
    let found: Vec<Finding> = [
        ev(0.0, "github", "read_repo", "allow", "read"),
        ev(30.0, "webhook", "post", "allow", "post"),
    ]
    .into_iter()
    .flat_map(|d| e.observe(d).expect("valid"))
    .collect();
    let exfil: Vec<&Finding> = found
        .iter()
        .filter(|f| f.kind == "data_exfil_pattern")
        .collect();
    assert_eq!(exfil.len(), 1);
    assert_eq!(exfil[0].severity, "critical");
    assert_eq!(exfil[0].evidence, vec!["read", "post"]);
    assert_eq!(exfil[0].run_id, "run-1");

    // Near misses by word: `postgres_query` is a query (a source), not a post; `location`
    // holds no `cat`; camelCase `sendEmail` is a send.
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(0.0, "maps", "location", "allow", "loc"),
            ev(1.0, "db", "postgres_query", "allow", "q"),
            ev(2.0, "db", "postgres_query", "allow", "q2"),
        ],
    );
    assert!(kinds(&found, "data_exfil_pattern").is_empty(), "{found:?}");
    let found = run(&mut e, &[ev(3.0, "mailer", "sendEmail", "deny", "mail")]);
    assert_eq!(kinds(&found, "data_exfil_pattern"), vec![0]);
}

#[test]
fn exfiltration_window_edges_and_order() {
    // Exactly at the window (120 s) is outside it; just inside fires.
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(0.0, "files", "download", "allow", "s"),
            ev(120.0, "slack", "share", "allow", "k"),
        ],
    );
    assert!(kinds(&found, "data_exfil_pattern").is_empty());
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(0.0, "files", "download", "allow", "s"),
            ev(119.5, "slack", "share", "allow", "k"),
        ],
    );
    assert_eq!(kinds(&found, "data_exfil_pattern"), vec![1]);
    // Out of order: the sink (decided at 10 s) arrives before the source (decided at 5 s).
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(10.0, "webhook", "post", "allow", "k"),
            ev(5.0, "github", "read_issue", "allow", "s"),
        ],
    );
    assert_eq!(kinds(&found, "data_exfil_pattern"), vec![1]);
    // A sink decided before the source is no pattern, whatever the arrival order.
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(5.0, "webhook", "post", "allow", "k"),
            ev(10.0, "github", "read_issue", "allow", "s"),
        ],
    );
    assert!(kinds(&found, "data_exfil_pattern").is_empty());
    // One source starts one incident, not one per sink after it.
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(0.0, "github", "read_repo", "allow", "s"),
            ev(1.0, "webhook", "post", "allow", "k1"),
            ev(2.0, "webhook", "post", "allow", "k2"),
        ],
    );
    assert_eq!(kinds(&found, "data_exfil_pattern"), vec![1]);
    // An agent that reads and posts in a loop raises one incident per quiet period (5 min)
    // for that sink, not one per post.
    let mut e = engine();
    let mut events = Vec::new();
    for i in 0..10 {
        events.push(ev(
            i as f64 * 10.0,
            "github",
            "read_repo",
            "allow",
            &format!("s{i}"),
        ));
        events.push(ev(
            i as f64 * 10.0 + 1.0,
            "webhook",
            "post",
            "allow",
            &format!("k{i}"),
        ));
    }
    events.push(ev(400.0, "github", "read_repo", "allow", "s-late"));
    events.push(ev(401.0, "webhook", "post", "allow", "k-late"));
    assert_eq!(
        kinds(&run(&mut e, &events), "data_exfil_pattern"),
        vec![1, 21]
    );
}

#[test]
fn approval_flood_runaway_and_budget() {
    let mut e = engine();
    let approvals: Vec<_> = (0..12)
        .map(|i| {
            ev(
                i as f64 * 20.0,
                "payments",
                "create",
                "approval_needed",
                &format!("a{i}"),
            )
        })
        .collect();
    assert_eq!(kinds(&run(&mut e, &approvals), "approval_flood"), vec![9]);

    let mut e = engine();
    let calls: Vec<_> = (0..25)
        .map(|i| {
            ev(
                i as f64 * 0.4,
                "invoices",
                "read",
                "allow",
                &format!("c{i}"),
            )
        })
        .collect();
    assert_eq!(kinds(&run(&mut e, &calls), "runaway"), vec![19]);
    // 19 calls in 10 s is not a runaway.
    let mut e = engine();
    let calls: Vec<_> = (0..19)
        .map(|i| {
            ev(
                i as f64 * 0.5,
                "invoices",
                "read",
                "allow",
                &format!("c{i}"),
            )
        })
        .collect();
    assert!(kinds(&run(&mut e, &calls), "runaway").is_empty());

    let mut e = engine();
    let mut b1 = ev(0.0, "invoices", "read", "deny", "b1");
    b1.reason = "budget_exhausted".into();
    let mut b2 = b1.clone();
    b2.time_ns += 10 * S;
    b2.decision_id = "b2".into();
    assert_eq!(kinds(&run(&mut e, &[b1, b2]), "budget_exhausted"), vec![0]);
}

#[test]
fn trust_escalation_and_untrusted_mutation() {
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(0.0, "payments", "refund", "deny", "d"),
            ev(5.0, "payments", "create", "allow", "other-action"),
            ev(30.0, "payments", "refund", "allow", "a"),
        ],
    );
    assert_eq!(kinds(&found, "trust_escalation"), vec![2]);
    // Again and again within the quiet period: once.
    let found = run(
        &mut e,
        &[
            ev(40.0, "payments", "refund", "deny", "d2"),
            ev(41.0, "payments", "refund", "allow", "a2"),
        ],
    );
    assert!(kinds(&found, "trust_escalation").is_empty());
    let mut e = engine();
    let found = run(
        &mut e,
        &[
            ev(0.0, "payments", "refund", "deny", "d"),
            ev(121.0, "payments", "refund", "allow", "a"),
        ],
    );
    assert!(
        kinds(&found, "trust_escalation").is_empty(),
        "outside the window"
    );

    let mut e = engine();
    let untrusted = |t: f64, action: &str, decision: &str, id: &str| {
        let mut d = ev(t, "github", action, decision, id);
        d.trust_level = "untrusted_external".into();
        d
    };
    let found: Vec<Finding> = [
        untrusted(0.0, "read_issue", "allow", "r"),
        untrusted(1.0, "create_comment", "deny", "c"),
        untrusted(2.0, "create_comment", "deny", "c2"),
    ]
    .into_iter()
    .flat_map(|d| e.observe(d).expect("valid"))
    .collect();
    let m: Vec<&Finding> = found
        .iter()
        .filter(|f| f.kind == "untrusted_mutation")
        .collect();
    assert_eq!(m.len(), 1, "once per tool and action, then quiet");
    assert_eq!(
        (m[0].severity, m[0].evidence.clone()),
        ("high", vec!["c".to_owned()])
    );
}

#[test]
fn an_event_without_a_valid_time_is_refused() {
    let mut e = engine();
    let mut d = ev(0.0, "x", "y", "deny", "no-time");
    d.time_ns = 0;
    assert_eq!(
        e.observe(d.clone()),
        Err(EventError::BadTime("no-time".into(), 0))
    );
    d.time_ns = -5;
    assert!(e.observe(d).is_err());
}

#[test]
fn containment_denies_make_neither_a_storm_nor_an_escalation() {
    let mut e = engine();
    let frozen = |t: f64, id: &str| {
        let mut d = ev(t, "github", "read_issue", "deny", id);
        d.reason = "agent_frozen".into();
        d
    };
    // A frozen agent calling on: ten containment denies, no storm.
    let calls: Vec<Decision> = (0..10)
        .map(|i| frozen(f64::from(i), &format!("f{i}")))
        .collect();
    assert!(run(&mut e, &calls).is_empty());
    // Unfrozen, the same call is allowed: not an escalation.
    let found = run(&mut e, &[ev(20.0, "github", "read_issue", "allow", "a")]);
    assert!(kinds(&found, "trust_escalation").is_empty(), "{found:?}");
    // A rotated-out token's denies neither.
    let mut revoked = ev(21.0, "github", "read_issue", "deny", "r");
    revoked.reason = "token_revoked".into();
    let found = run(
        &mut e,
        &[revoked, ev(22.0, "github", "read_issue", "allow", "a2")],
    );
    assert!(found.is_empty(), "{found:?}");
}
