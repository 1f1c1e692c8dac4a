//! The control store's contract, run against both backends: the embedded SQLite file and a
//! real PostgreSQL server on loopback (started by `tests/common/pg.rs`; `scripts/test`
//! installs it). The rules live once, above the stores (`aegis::control::rules`); what each
//! backend must do is keep records, commit a unit of work whole, hand out the change feed
//! in version order, announce commits, including another replica's, and never lose a
//! write when two replicas act at once.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aegis::control::ControlError;
use aegis::control::pb::{self, state_item::Item};
use aegis::control::postgres::PostgresStore;
use aegis::control::records::{Agent, Approval, KillMark, Revision, Scope, Token};
use aegis::control::rules;
use aegis::control::rules::Reconciled;
use aegis::control::sqlite::SqliteStore;
use aegis::control::store::{ControlStore, Feed, Outbox};
use aegis::types::{AgentStatus, ApprovalStatus, TokenStatus};
use common::pg::Postgres;

/// One backend under test: two handles on the same store (two replicas), kept alive with
/// whatever they need.
struct Backend {
    name: &'static str,
    a: Arc<dyn ControlStore>,
    b: Arc<dyn ControlStore>,
    /// Runs SQL on the store from outside (a careless operator's hand).
    sql: Box<dyn Fn(&str) + Send + Sync>,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("control.db");
    Backend {
        name: "sqlite",
        a: Arc::new(SqliteStore::open(&path).expect("open")),
        b: Arc::new(SqliteStore::open(&path).expect("open again")),
        sql: Box::new(move |sql| {
            let db = rusqlite::Connection::open(&path).expect("open the file");
            db.execute_batch(sql).expect("sql");
        }),
        _keep: Box::new(dir),
    }
}

async fn postgres(server: &Postgres, db: &str) -> Backend {
    let url = server.database(db);
    Backend {
        name: "postgres",
        a: Arc::new(PostgresStore::open(&url).await.expect("open")),
        b: Arc::new(PostgresStore::open(&url).await.expect("open again")),
        sql: {
            let url = url.clone();
            Box::new(move |sql| {
                common::pg::psql(&url, sql);
            })
        },
        _keep: Box::new(()),
    }
}

/// Runs `check` against SQLite and against PostgreSQL.
macro_rules! both {
    ($name:ident, $check:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $check(sqlite().await).await;
            let server = Postgres::start();
            $check(postgres(&server, stringify!($name)).await).await;
        }
    };
}

const NOW: i64 = 1_900_000_000;

fn agent(tenant: &str, id: &str) -> Agent {
    Agent {
        tenant: tenant.into(),
        id: id.into(),
        status: AgentStatus::Active,
        risk_tier: "medium".into(),
        reason: "registered".into(),
        created_at: NOW,
        updated_at: NOW,
        updated_by: "test".into(),
        live_tokens: 0,
    }
}

fn token(jti: &str, agent: &str, session: &str) -> Token {
    Token {
        jti: jti.into(),
        tenant: "acme".into(),
        agent: agent.into(),
        session: session.into(),
        scopes: vec!["invoices:read".into()],
        issued_at: NOW - 10,
        expires_at: NOW + 600,
        revoked: None,
    }
}

async fn register(s: &Arc<dyn ControlStore>, a: Agent) -> Result<u64, ControlError> {
    s.run(move |tx| rules::register_agent(tx, &a).map(|c| c.version))
        .await
}

async fn set_status(
    s: &Arc<dyn ControlStore>,
    id: &str,
    status: AgentStatus,
) -> Result<Agent, ControlError> {
    let id = id.to_owned();
    s.run(move |tx| rules::set_agent_status(tx, "acme", &id, status, "test", "op", NOW))
        .await
        .map(|c| c.value)
}

async fn changes(s: &Arc<dyn ControlStore>, after: u64) -> Vec<pb::WatchEvent> {
    match s.changes_since(after, 10_000).await.expect("feed") {
        Feed::Changes(events) => events,
        Feed::Gap => panic!("a gap after {after}"),
    }
}

async fn agent_status_rules(b: Backend) {
    let s = &b.a;
    register(s, agent("acme", "bot")).await.expect("registered");
    let again = register(s, agent("acme", "bot")).await.expect_err("twice");
    assert!(
        again.to_string().contains("already registered (active)"),
        "{}: {again}",
        b.name
    );

    assert_eq!(
        set_status(s, "bot", AgentStatus::Frozen)
            .await
            .expect("freeze")
            .status,
        AgentStatus::Frozen
    );
    let loosen = set_status(s, "bot", AgentStatus::Restricted)
        .await
        .expect_err("restrict over freeze");
    assert!(
        loosen.to_string().contains("would loosen"),
        "{}: {loosen}",
        b.name
    );
    let same = set_status(s, "bot", AgentStatus::Frozen)
        .await
        .expect_err("no-op");
    assert!(
        same.to_string().contains("already frozen"),
        "{}: {same}",
        b.name
    );
    set_status(s, "bot", AgentStatus::Revoked)
        .await
        .expect("revoke");
    let back = set_status(s, "bot", AgentStatus::Active)
        .await
        .expect_err("revoked is final");
    assert!(
        back.to_string().contains("which is final"),
        "{}: {back}",
        b.name
    );
    let missing = set_status(s, "ghost", AgentStatus::Frozen)
        .await
        .expect_err("unknown");
    assert!(
        missing.to_string().contains("no agent ghost"),
        "{}: {missing}",
        b.name
    );

    // The other replica reads what this one wrote.
    let seen =
        b.b.run(|tx| tx.agent("acme", "bot", NOW))
            .await
            .expect("read")
            .expect("there");
    assert_eq!(seen.status, AgentStatus::Revoked, "{}", b.name);
}
both!(agent_status_rules_hold_on_both_backends, agent_status_rules);

async fn stored_words(b: Backend) {
    // A status someone wrote by hand that is not one of the words: the read fails naming
    // it, instead of a default that would read as active (and allow).
    register(&b.a, agent("acme", "bot"))
        .await
        .expect("registered");
    (b.sql)("UPDATE agents SET status = 'Frozen' WHERE id = 'bot'");
    let err =
        b.b.run(|tx| tx.agent("acme", "bot", NOW))
            .await
            .expect_err("not a status");
    let text = err.to_string();
    assert!(
        text.contains("agent status \"Frozen\" is not one of active, restricted, frozen, revoked"),
        "{}: {text}",
        b.name
    );
    let refused = set_status(&b.a, "bot", AgentStatus::Active)
        .await
        .expect_err("no rule judges an unreadable record");
    assert!(
        refused.to_string().contains("\"Frozen\""),
        "{}: {refused}",
        b.name
    );
    (b.sql)(
        "INSERT INTO kills (scope, tenant, target, before, reason, actor, at) VALUES (1, 'acme', 'tok', 1, 'r', 'a', 1)",
    );
    let err =
        b.b.run(|tx| tx.kill_marks())
            .await
            .expect_err("not a kill scope");
    assert!(
        err.to_string().contains("kill scope 1 is not"),
        "{}: {err}",
        b.name
    );
}
both!(
    a_stored_word_that_is_not_one_is_named_on_both_backends,
    stored_words
);

async fn policy_reconcile(b: Backend) {
    // Replica A starts with bundle X, then B (a rolling update) with Y; A restarts, still
    // configured with X: Y stays active. A bundle never seen is activated.
    let rev = |digest: &str| Revision {
        id: 0,
        revision: format!("rev-{digest}"),
        digest: digest.into(),
        action: "startup".into(),
        actor: "system:startup".into(),
        reason: "startup: configured bundle".into(),
        activated_at: NOW,
    };
    let reconcile = |s: &Arc<dyn ControlStore>, digest: &'static str| {
        let s = s.clone();
        async move {
            let r = rev(digest);
            s.run(move |tx| rules::reconcile_policy(tx, &r, b"files"))
                .await
                .expect("reconcile")
        }
    };
    assert!(
        matches!(reconcile(&b.a, "x").await, Reconciled::Activated(_)),
        "{}",
        b.name
    );
    assert!(
        matches!(reconcile(&b.b, "y").await, Reconciled::Activated(_)),
        "{}",
        b.name
    );
    match reconcile(&b.a, "x").await {
        Reconciled::Superseded(active) => assert_eq!(active.digest, "y", "{}", b.name),
        other => panic!("{}: an older configuration took over: {other:?}", b.name),
    }
    assert!(
        matches!(reconcile(&b.b, "y").await, Reconciled::Active),
        "{}",
        b.name
    );
    assert!(
        matches!(reconcile(&b.a, "z").await, Reconciled::Activated(_)),
        "{}",
        b.name
    );
    let active =
        b.b.run(|tx| rules::policy_history(tx, 10))
            .await
            .expect("history");
    let digests: Vec<&str> = active.iter().map(|r| r.digest.as_str()).collect();
    assert_eq!(digests, ["z", "y", "x"], "{}", b.name);
}
both!(
    a_replica_with_an_older_bundle_does_not_take_the_fleet_back_on_both_backends,
    policy_reconcile
);

async fn reported_ahead(b: Backend) {
    // A sidecar told replica A it holds epoch 7 (the store went back); the operator
    // confirms the restore at replica B: the new epoch is past 7 all the same.
    let own =
        b.a.run(|tx| rules::note_reported(tx, (7, 40), "sidecar-1"))
            .await
            .expect("note");
    assert_eq!(own, (0, 0), "{}", b.name);
    // A lower report does not replace it; one at or below the state's own is not kept.
    b.a.run(|tx| rules::note_reported(tx, (7, 39), "sidecar-2"))
        .await
        .expect("note");
    b.b.run(|tx| rules::note_reported(tx, (0, 0), "sidecar-3"))
        .await
        .expect("note");
    let (epoch, _, reported) = b.b.run(rules::raise_epoch).await.expect("raise");
    assert_eq!((reported, epoch), (7, 8), "{}", b.name);
    let kept = b.b.run(|tx| tx.reported_ahead()).await.expect("read");
    assert_eq!(kept, Some((7, 40, "sidecar-1".to_owned())), "{}", b.name);
}
both!(
    a_sidecars_report_reaches_every_replica_on_both_backends,
    reported_ahead
);

async fn kills(b: Backend) {
    let s = &b.a;
    register(s, agent("acme", "bot")).await.expect("registered");
    for (jti, agent, session) in [
        ("t1", "bot", "s1"),
        ("t2", "bot", "s1"),
        ("t3", "bot", "s2"),
        ("t4", "other", "s3"),
    ] {
        let t = token(jti, agent, session);
        s.run(move |tx| tx.insert_token(&t)).await.expect("token");
    }
    let mark = |before| KillMark {
        scope: Scope::Agent,
        tenant: "acme".into(),
        target: "bot".into(),
        before,
    };
    let m = mark(NOW);
    let killed = s
        .run(move |tx| rules::kill(tx, &m, "compromised", "op", NOW))
        .await
        .expect("kill");
    let hit = &killed.value;
    assert_eq!(
        (hit.tokens, hit.sessions, hit.agents, hit.tenants),
        (3, 2, 1, 1),
        "{}",
        b.name
    );
    let revoked: Vec<String> = killed
        .items
        .iter()
        .filter_map(|i| match &i.item {
            Some(Item::RevokedToken(t)) => Some(t.jti.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(revoked, ["t1", "t2", "t3"], "{}", b.name);
    let t4 = s.run(|tx| tx.token("t4")).await.expect("read").expect("t4");
    assert_eq!(
        t4.status(NOW),
        TokenStatus::Live,
        "{}: another agent's token is untouched",
        b.name
    );

    // An earlier mark never lowers a later one; the floor covers the agent's sessions.
    let older = mark(NOW - 100);
    s.run(move |tx| rules::kill(tx, &older, "again", "op", NOW))
        .await
        .expect("kill again");
    let floor = s
        .run(|tx| rules::kill_floor(tx, "acme", "bot", "s9"))
        .await
        .expect("floor");
    assert_eq!(floor, NOW, "{}", b.name);
    let nothing = KillMark {
        scope: Scope::Session,
        tenant: "acme".into(),
        target: "never".into(),
        before: NOW,
    };
    let err = s
        .run(move |tx| rules::kill(tx, &nothing, "x", "op", NOW))
        .await
        .expect_err("unknown session");
    assert!(
        err.to_string().contains("nothing to kill"),
        "{}: {err}",
        b.name
    );
}
both!(
    kills_cover_count_and_never_lower_a_mark_on_both_backends,
    kills
);

async fn approvals(b: Backend) {
    let s = &b.a;
    let approval = |id: &str, hash: &str, session: &str| Approval {
        id: id.into(),
        tenant: "acme".into(),
        agent: "bot".into(),
        session: session.into(),
        call_hash: hash.into(),
        created_at: NOW,
        expires_at: NOW + 300,
        ..Default::default()
    };
    let ask = |a: Approval| async move {
        s.run(move |tx| rules::request_approval(tx, &a, 2, true, NOW))
            .await
            .expect("request")
    };
    let first = ask(approval("ap1", "h1", "s1")).await;
    assert!(first.created, "{}", b.name);
    let same = ask(approval("ap1b", "h1", "s1")).await;
    assert_eq!(
        (same.created, same.approval_id.as_str()),
        (false, "ap1"),
        "{}",
        b.name
    );
    let other_session = ask(approval("ap2", "h1", "s2")).await;
    assert!(
        other_session.created,
        "{}: another session asks anew",
        b.name
    );
    let capped = ask(approval("ap3", "h3", "s1")).await;
    assert!(capped.cap_reached && !capped.created, "{}", b.name);

    let decided = s
        .run(|tx| rules::decide_approval(tx, "acme", "ap1", true, "op", "ok", NOW + 600, NOW))
        .await
        .expect("decide")
        .expect("pending");
    assert_eq!(decided.status, ApprovalStatus::Approved, "{}", b.name);
    let twice = s
        .run(|tx| rules::decide_approval(tx, "acme", "ap1", false, "op", "no", 0, NOW))
        .await
        .expect("decide again");
    assert!(
        twice.is_none(),
        "{}: a decided approval is not decided again",
        b.name
    );
    let used = |d: &'static str| s.run(move |tx| rules::use_approval(tx, "acme", "ap1", d, NOW));
    assert!(used("d1").await.expect("use"), "{}", b.name);
    assert!(
        !used("d2").await.expect("use again"),
        "{}: an override is used once",
        b.name
    );
    // A pending approval nobody answered in time reads as expired.
    let late = s
        .run(|tx| rules::approval(tx, "acme", "ap2", NOW + 301))
        .await
        .expect("read")
        .expect("there");
    assert_eq!(late.status, ApprovalStatus::Expired, "{}", b.name);
}
both!(approvals_dedup_cap_and_use_once_on_both_backends, approvals);

async fn feed(b: Backend) {
    let (s, other) = (&b.a, &b.b);
    let mut announced = s.subscribe();
    let first = register(s, agent("acme", "one")).await.expect("one");
    // The other replica's commit is announced to this one and is in its feed.
    let second = register(other, agent("acme", "two")).await.expect("two");
    tokio::time::timeout(Duration::from_secs(5), announced.wait_for(|v| *v >= second))
        .await
        .unwrap_or_else(|_| panic!("{}: another replica's commit announced within 5 s", b.name))
        .expect("store alive");
    let (epoch, raised, _) = s.run(rules::raise_epoch).await.expect("raise");
    let all = changes(s, 0).await;
    let versions: Vec<u64> = all.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![first, second, raised], "{}", b.name);
    assert!(
        all[2].items.is_empty() && all[2].epoch == epoch,
        "{}",
        b.name
    );
    assert_eq!(changes(other, first).await.len(), 2, "{}", b.name);
    let snapshot = s
        .run(|tx| rules::snapshot(tx, NOW))
        .await
        .expect("snapshot");
    assert_eq!(
        (snapshot.epoch, snapshot.version),
        (epoch, raised),
        "{}",
        b.name
    );

    // Each change carries the history hash at its version: over the previous one and the
    // change itself, the same at every replica, and the snapshot's is its version's.
    use prost::Message;
    let mut previous = Vec::new();
    for event in &all {
        let bare = pb::WatchEvent {
            chain: Vec::new(),
            ..event.clone()
        };
        let want = aegis::control::store::next_chain(&previous, &bare.encode_to_vec());
        assert_eq!(event.chain, want, "{}: version {}", b.name, event.version);
        previous = event.chain.clone();
    }
    let at_b = other
        .run(move |tx| tx.chain_at(raised))
        .await
        .expect("chain");
    assert_eq!(
        at_b.as_deref(),
        Some(snapshot.chain.as_slice()),
        "{}",
        b.name
    );
    assert_eq!(snapshot.chain, all[2].chain, "{}", b.name);
}
both!(the_feed_is_ordered_and_shared_on_both_backends, feed);

async fn concurrent(b: Backend) {
    // Two replicas revoke and freeze at once: every write lands, each at its own version,
    // and the feed holds every one of them in order.
    for i in 0..20 {
        register(&b.a, agent("acme", &format!("bot{i}")))
            .await
            .expect("register");
        let t = token(&format!("jti{i}"), &format!("bot{i}"), "s");
        b.a.run(move |tx| tx.insert_token(&t)).await.expect("token");
    }
    let start = b.a.run(rules::state_version).await.expect("version").1;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { b.a.clone() } else { b.b.clone() };
        tasks.push(tokio::spawn(async move {
            let jti = format!("jti{i}");
            let id = format!("bot{i}");
            store
                .run(move |tx| rules::revoke_token(tx, &jti, "leaked", NOW).map(|c| c.version))
                .await?;
            store
                .run(move |tx| {
                    rules::set_agent_status(tx, "acme", &id, AgentStatus::Frozen, "x", "op", NOW)
                        .map(|c| c.version)
                })
                .await
        }));
    }
    for t in tasks {
        t.await
            .expect("join")
            .unwrap_or_else(|e| panic!("{}: {e}", b.name));
    }
    let feed = changes(&b.a, start).await;
    let versions: Vec<u64> = feed.iter().map(|e| e.version).collect();
    let expected: Vec<u64> = (start + 1..=start + 40).collect();
    assert_eq!(
        versions, expected,
        "{}: 40 changes, no version lost or repeated",
        b.name
    );
    let frozen =
        b.b.run(|tx| tx.agents(Some("acme"), Some(AgentStatus::Frozen), NOW))
            .await
            .expect("agents");
    assert_eq!(frozen.len(), 20, "{}", b.name);
    let live =
        b.b.run(|tx| rules::tokens(tx, "acme", None, false, NOW))
            .await
            .expect("tokens");
    assert!(
        live.is_empty(),
        "{}: every revocation landed: {live:?}",
        b.name
    );
}
both!(
    two_replicas_writing_at_once_lose_nothing_on_both_backends,
    concurrent
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_reconnects_after_a_database_restart() {
    let server = Postgres::start();
    let url = server.database("restart");
    let store: Arc<dyn ControlStore> = Arc::new(PostgresStore::open(&url).await.expect("open"));
    register(&store, agent("acme", "before"))
        .await
        .expect("before");
    server.restart();
    // The first unit of work after the restart may find its connection gone; the store
    // opens a new one for the next, and nothing committed is lost.
    let mut after = Err(ControlError::Store("not tried".into()));
    for _ in 0..50 {
        after = register(&store, agent("acme", "after")).await;
        if after.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    after.expect("a unit of work succeeds after the restart");
    let agents = store
        .run(|tx| tx.agents(Some("acme"), None, NOW))
        .await
        .expect("agents");
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["after", "before"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_is_refused_naming_it_without_its_password() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let url = format!("postgres://aegis:hunter2@127.0.0.1:{port}/aegis");
    let err = PostgresStore::open(&url)
        .await
        .expect_err("nothing listens");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(
        !text.contains("hunter2"),
        "the password is never shown: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_reads_postgres_without_writing_to_it() {
    let server = Postgres::start();
    // A database that holds no control store: refused, and left without tables.
    let empty = server.database("empty");
    let err = PostgresStore::open_read_only(&empty)
        .await
        .expect_err("no store there");
    assert!(err.to_string().contains("no Aegis control store"), "{err}");
    let tables = common::pg::psql(
        &empty,
        "select count(*) from pg_tables where schemaname = 'public'",
    );
    assert_eq!(tables.trim(), "0", "nothing created in the wrong database");

    // A store: read, and a write through the read-only handle is refused by the server.
    let url = server.database("store");
    let writer: Arc<dyn ControlStore> = Arc::new(PostgresStore::open(&url).await.expect("open"));
    register(&writer, agent("acme", "bot"))
        .await
        .expect("register");
    let reader: Arc<dyn ControlStore> = Arc::new(
        PostgresStore::open_read_only(&url)
            .await
            .expect("read-only"),
    );
    let agents = reader
        .run(|tx| tx.agents(Some("acme"), None, NOW))
        .await
        .expect("read");
    assert_eq!(agents.len(), 1);
    let write = register(&reader, agent("acme", "other"))
        .await
        .expect_err("read-only");
    assert!(write.to_string().contains("read-only"), "{write}");
}

async fn notifications(b: Backend) {
    // Two replicas' notifiers take the due notifications at once: each is taken by one.
    let incident = aegis::control::wire::incident_record(pb::Incident {
        id: "INC-1".into(),
        tenant: "acme".into(),
        agent: "bot".into(),
        kind: "deny_storm".into(),
        severity: "high".into(),
        status: "open".into(),
        created_at_ns: NOW * 1_000_000_000,
        ..Default::default()
    })
    .expect("an incident record");
    let notes: Vec<(String, String)> = (0..6)
        .map(|i| (format!("https://hooks.example/{i}"), "{}".to_owned()))
        .collect();
    b.a.run(move |tx| rules::insert_incident(tx, &incident, &notes))
        .await
        .expect("incident");
    let now_ms = NOW * 1000 + 1;
    let claim = |s: Arc<dyn ControlStore>| {
        tokio::spawn(async move {
            s.run(move |tx| rules::claim_due_notifications(tx, now_ms, 16, 1000, 60_000))
                .await
                .expect("claim")
        })
    };
    let (x, y) = (claim(b.a.clone()), claim(b.b.clone()));
    let (x, y) = (x.await.expect("join"), y.await.expect("join"));
    let mut ids: Vec<i64> = x.iter().chain(&y).map(|n| n.id).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(
        (before, ids.len()),
        (6, 6),
        "{}: each taken once: {x:?} {y:?}",
        b.name
    );
    // Claimed ones are not due again until the lease ends: the last one claimed (6th in
    // its claimer's turn, at most) is leased 6 turns of 1 s past the 60 s margin.
    let again =
        b.a.run(move |tx| rules::claim_due_notifications(tx, now_ms + 60_500, 16, 1000, 60_000))
            .await
            .expect("claim again");
    assert!(again.is_empty(), "{}: {again:?}", b.name);
    let later =
        b.b.run(move |tx| rules::claim_due_notifications(tx, now_ms + 66_001, 16, 1000, 60_000))
            .await
            .expect("after the lease");
    assert_eq!(later.len(), 6, "{}: a dead replica's claims expire", b.name);

    // A replica's lease ended and another took the row over: the first one's late
    // answer ("failed, retry") records nothing, before or after the second records its
    // delivery, so the row is never sent a third time nor its attempts counted twice.
    let mine = x.first().or(y.first()).expect("a claimed row").clone();
    let theirs = later
        .iter()
        .find(|n| n.id == mine.id)
        .expect("taken over")
        .clone();
    let at = now_ms + 66_002;
    let late = |row: Outbox| {
        let s = if x.iter().any(|n| n.id == row.id) {
            b.a.clone()
        } else {
            b.b.clone()
        };
        async move {
            s.run(move |tx| {
                rules::notification_attempted(tx, &row, false, Some(at + 5000), "timeout", at)
            })
            .await
            .expect("late")
        }
    };
    assert!(
        !late(mine.clone()).await,
        "{}: a lost claim records nothing",
        b.name
    );
    let delivered = theirs.clone();
    assert!(
        b.b.run(move |tx| rules::notification_attempted(tx, &delivered, true, None, "", at))
            .await
            .expect("recorded"),
        "{}",
        b.name
    );
    assert!(
        !late(mine.clone()).await,
        "{}: nor after the delivery",
        b.name
    );
    let incident = mine.incident.clone();
    let stored =
        b.a.run(move |tx| tx.notifications(&incident))
            .await
            .expect("rows")
            .into_iter()
            .find(|n| n.id == mine.id)
            .expect("row");
    assert_eq!(
        (stored.state.as_str(), stored.attempts),
        ("delivered", 1),
        "{}",
        b.name
    );
}
both!(
    two_replicas_never_send_one_notification_twice_on_both_backends,
    notifications
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_postgres_connection_is_cut_and_the_next_action_reconnects() {
    use std::sync::atomic::Ordering;
    let server = Postgres::start();
    let (direct, url, silent) = server.database_behind_silent_front("silent").await;
    let bound = Duration::from_secs(1);
    let store: Arc<dyn ControlStore> =
        Arc::new(PostgresStore::open_with(&url, bound).await.expect("open"));
    register(&store, agent("acme", "before"))
        .await
        .expect("register");

    // The connection goes silent mid-flight: the action fails within the bound, naming
    // why, instead of holding this replica's every action behind it for good.
    silent.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        register(&store, agent("acme", "during")),
    )
    .await
    .expect("a silent connection holds the action past 10 s");
    let err = waited.expect_err("no answer");
    assert!(
        err.to_string().contains("no answer in 1000 ms"),
        "named: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // The network comes back: the next action reconnects and lands.
    silent.store(false, Ordering::SeqCst);
    register(&store, agent("acme", "after"))
        .await
        .expect("a new connection after the silence");
    let reader: Arc<dyn ControlStore> = Arc::new(PostgresStore::open(&direct).await.expect("open"));
    let agents = reader
        .run(|tx| tx.agents(Some("acme"), None, NOW))
        .await
        .expect("agents");
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    assert!(ids.contains(&"before") && ids.contains(&"after"), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_speaks_tls_and_checks_whom_it_speaks_to() {
    // A server that admits TCP connections over TLS only (pg_hba hostssl / hostnossl reject).
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = common::TestCa::new(dir.path(), "pg");
    let (cert, key) = ca.leaf("server", "serverAuth");
    let server = Postgres::start_tls(&cert, &key);
    let url = server.database("tls");

    let plain = PostgresStore::open(&url)
        .await
        .expect_err("a plain connection");
    assert!(plain.to_string().contains("pg_hba.conf"), "{plain}");

    let tls = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.ca.display());
    let store: Arc<dyn ControlStore> = Arc::new(PostgresStore::open(&tls).await.expect("over TLS"));
    register(&store, agent("acme", "bot"))
        .await
        .expect("a unit of work over TLS");
    // The listening connection is TLS too: another handle's commit is announced.
    let mut announced = store.subscribe();
    let other: Arc<dyn ControlStore> = Arc::new(PostgresStore::open(&tls).await.expect("over TLS"));
    let v = register(&other, agent("acme", "other"))
        .await
        .expect("another replica");
    tokio::time::timeout(Duration::from_secs(5), announced.wait_for(|n| *n >= v))
        .await
        .expect("announced over the TLS listening connection")
        .expect("store alive");

    // A server whose certificate another authority signed is refused, named.
    let stranger = common::TestCa::new(dir.path(), "stranger");
    let untrusted = format!(
        "{url}?sslmode=require&sslrootcert={}",
        stranger.ca.display()
    );
    let err = PostgresStore::open(&untrusted)
        .await
        .expect_err("an untrusted certificate");
    let text = err.to_string();
    assert!(
        text.contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
}
