//! Overload and cancellation: past saturation Aegis sheds with a gRPC error and never
//! answers a decision it has not recorded; a client that gives up mid-Check leaves
//! nothing half-done.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What a caller saw: decisions answered (id → allowed) and gRPC errors by code.
#[derive(Default)]
struct Seen {
    answered: HashMap<String, bool>,
    errors: HashMap<tonic::Code, u64>,
}

/// Asserts the audit invariant against what callers saw: every answered decision has
/// exactly one row, with the decision the caller got; no row is duplicated; the chain
/// verifies.
fn assert_every_answer_recorded(s: &TestServer, seen: &Seen) {
    let rows = decisions(&s.db());
    let mut by_id: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, decision) in &rows {
        by_id.entry(id).or_default().push(decision);
    }
    let dupes: Vec<_> = by_id.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(dupes.is_empty(), "duplicated rows: {dupes:?}");
    for (id, allowed) in &seen.answered {
        let Some(found) = by_id.get(id.as_str()) else {
            panic!("answered decision {id} (allowed: {allowed}) has no audit row");
        };
        let row_allows = matches!(found[0], "allow" | "sanitize");
        assert_eq!(row_allows, *allowed, "row of {id} says {}", found[0]);
    }
    let keys = [common::audit_key(&s.data_dir())];
    let verdict = aegis::audit::verify::verify_file(&s.db(), &keys).expect("read");
    assert!(verdict.is_ok(), "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_saturation_sheds_with_grpc_errors_and_records_every_answer() {
    let mut s = start_with(|c| {
        c.limits.max_inflight = 8;
        c.audit.queue_capacity = 4;
        c.audit.max_batch = 2;
    })
    .await;
    let allowed = s.token("acme", "reader", &["invoices:read"]);
    let refused = s.token("acme", "nobody", &[]);
    let mut callers = Vec::new();
    // 96 closed-loop callers against 8 places: far past saturation, bounded in time. The
    // two seconds start once every caller is connected (connecting is slow when loaded).
    let mut clients = Vec::new();
    for _ in 0..96 {
        clients.push(client(s.addr).await);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for (i, mut c) in clients.into_iter().enumerate() {
        let t = if i % 3 == 0 { &refused } else { &allowed }.clone();
        callers.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            for _ in 0..5_000 {
                if Instant::now() > deadline {
                    break;
                }
                match c.check(Req::read_invoices(&t)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let id = decision_id(&r).expect("every decision carries its id");
                        seen.answered.insert(id, code(&r) == 0);
                    }
                    Err(e) => *seen.errors.entry(e.code()).or_default() += 1,
                }
            }
            seen
        }));
    }
    let mut seen = Seen::default();
    for c in callers {
        let part = c.await.expect("caller");
        seen.answered.extend(part.answered);
        for (k, v) in part.errors {
            *seen.errors.entry(k).or_default() += v;
        }
    }
    let shed = seen
        .errors
        .get(&tonic::Code::ResourceExhausted)
        .copied()
        .unwrap_or(0);
    eprintln!("answered {}, errors {:?}", seen.answered.len(), seen.errors);
    assert!(shed > 0, "96 callers against 8 places must be shed");
    assert_eq!(
        seen.errors.len(),
        1,
        "overload is only ever RESOURCE_EXHAUSTED: {:?}",
        seen.errors
    );
    assert!(seen.answered.len() > 100, "it kept deciding while shedding");
    assert!(seen.answered.values().any(|a| *a) && seen.answered.values().any(|a| !*a));
    let admission = s
        .running
        .as_ref()
        .and_then(|r| r.admission.clone())
        .expect("a data plane");
    assert_eq!(admission.inflight(), 0, "every admitted Check left");
    assert!(admission.shed().0 + admission.shed().1 >= shed);
    s.stop().await;
    assert_every_answer_recorded(&s, &seen);
    assert_eq!(
        decisions(&s.db()).len(),
        seen.answered.len(),
        "no row without an answered decision: shed Checks leave none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_cancelled_checks_leave_nothing_half_done() {
    let mut s = start().await;
    let t = s.token("acme", "reader", &["invoices:read"]);
    let mut rng = Rng(0x5eed_ae61_9e37_79b9);
    let clients: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(client(s.addr).await);
        }
        v
    };
    let mut seen = Seen::default();
    let (mut cancelled, mut aborted) = (0, 0);
    // 3,000 Checks in waves of 64; each is given up after a random 0–12 ms (a timeout, as
    // Envoy's; about half finish first), or its task is aborted at a random point.
    for wave in 0..47 {
        let mut tasks = Vec::new();
        for i in 0..64 {
            let mut c = clients[(wave + i) % clients.len()].clone();
            let req = Req::read_invoices(&t);
            let limit = Duration::from_micros(rng.next() % 12_000);
            let abort_after = rng
                .next()
                .is_multiple_of(3)
                .then(|| Duration::from_micros(rng.next() % 2_000));
            let task = tokio::spawn(async move { tokio::time::timeout(limit, c.check(req)).await });
            tasks.push((task, abort_after));
        }
        for (task, abort_after) in tasks {
            if let Some(after) = abort_after {
                tokio::time::sleep(after / 64).await;
                task.abort();
            }
            match task.await {
                Ok(Ok(Ok(r))) => {
                    let r = r.into_inner();
                    seen.answered
                        .insert(decision_id(&r).expect("id"), code(&r) == 0);
                }
                Ok(Ok(Err(e))) => *seen.errors.entry(e.code()).or_default() += 1,
                Ok(Err(_elapsed)) => cancelled += 1,
                Err(_) => aborted += 1,
            }
        }
    }
    eprintln!(
        "answered {}, timed out {cancelled}, aborted {aborted}, errors {:?}",
        seen.answered.len(),
        seen.errors
    );
    assert!(cancelled > 100, "the run must really cancel Checks mid-way");
    // The server still decides, writes and verifies.
    let r = s.read_invoices(&t).await;
    assert_eq!(code(&r), 0);
    seen.answered.insert(decision_id(&r).expect("id"), true);
    let admission = s
        .running
        .as_ref()
        .and_then(|r| r.admission.clone())
        .expect("a data plane");
    assert!(
        eventually(Duration::from_secs(15), || admission.inflight() == 0).await,
        "a cancelled Check still holds its place: {} in flight",
        admission.inflight()
    );
    // No write lock is left held: another connection can take one at once.
    let conn = rusqlite::Connection::open(s.db()).expect("open");
    conn.busy_timeout(Duration::from_secs(2)).expect("timeout");
    conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
        .expect("no stuck write lock");
    drop(conn);
    s.stop().await;
    assert_every_answer_recorded(&s, &seen);
    // Some callers gave up while their row was being committed: the row stands (a
    // decision was made and recorded), the caller just never heard it.
    let unique: HashSet<_> = decisions(&s.db()).into_iter().map(|(id, _)| id).collect();
    eprintln!("{} rows for {} answers", unique.len(), seen.answered.len());
    assert!(
        unique.len() > seen.answered.len(),
        "some Checks must be cancelled after their row was queued"
    );
}
