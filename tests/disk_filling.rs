//! Filling the disk through the audit log (issue 14): 10,000 hostile control calls and
//! Checks, sent over a few connections at once, grow the log by a bounded, stated amount,
//! and every Check that was answered still has its row. The calls, 2,500 of each kind:
//! - control calls without a valid credential (none, garbage, or one with a 5 KB `kid`)
//!   naming 16 KiB and 1 MiB tenants, from four loopback addresses;
//! - a viewer's `GetAgent` naming 4 MB and 16 KiB tenants, or another tenant;
//! - Checks with a forged token carrying a 5 KB `kid`;
//! - Checks with a 16 KiB, 200 KiB or 3 MiB `http.path` and no `:path` header.
//!
//! The bound, derived:
//! - an answered Check keeps its row, always (the product's promise): at most
//!   [`MAX_ROW_BYTES`] each, since every text field is cut at `audit::MAX_FIELD_BYTES`;
//! - a CheckRequest over the decoding limit (256 KiB by default) is refused before it is
//!   read: no decision, no row;
//! - a control request with an id that is not an id is refused `INVALID_ARGUMENT` before
//!   anything runs: no row;
//! - refused control calls (no valid credential, or a role or tenant that does not allow
//!   the call) make at most `ROWS_PER_SEC` rows a second overall, whoever sends them;
//!   the rest are counted in `aegis_audit_refusals_unrecorded_total`.
//!
//! So growth ≤ (answered Checks + `ROWS_PER_SEC` × seconds the run spans) × `MAX_ROW_BYTES`.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis::audit::MAX_FIELD_BYTES;
use aegis::control::refusals::{ROWS_PER_REFUSER_PER_SEC, ROWS_PER_SEC};
use common::*;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Calls of each of the four hostile kinds: 10,000 in all.
const CALLS_PER_KIND: usize = 2_500;

/// The largest row: 17 text fields of at most `MAX_FIELD_BYTES`, and 1 KiB for the rest
/// (sequence, time, status, key id, hashes, salt).
const MAX_ROW_BYTES: usize = 17 * MAX_FIELD_BYTES + 1024;

/// No loop runs past this, and no call past [`CALL_TIMEOUT`], whatever happens: the test
/// fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(90);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Peers sending unauthenticated control calls, each from its own loopback address.
const ANONYMOUS_PEERS: [&str; 4] = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];

/// A channel from `local` (a loopback address of its own) to `addr`.
async fn channel_from(addr: SocketAddr, local: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .local_address(Some(local.parse::<IpAddr>().expect("ip")))
        .connect()
        .await
        .expect("connects")
}

/// A token whose header carries a `kid` of `len` bytes (its signature is garbage).
fn forged_token(len: usize) -> String {
    use base64::Engine as _;
    let header = format!(
        r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#,
        "k".repeat(len)
    );
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.as_bytes());
    format!("{b64}.e30.AAAA")
}

/// What the callers of one kind saw.
#[derive(Debug, Default)]
struct Seen {
    /// gRPC code (or OK) → calls.
    codes: std::collections::BTreeMap<String, usize>,
    /// Decision ids of answered Checks.
    decisions: Vec<String>,
    /// Messages of refusals, one of each code (what a user is told).
    messages: std::collections::BTreeMap<String, String>,
    calls: usize,
}

/// One call's outcome: its gRPC code (`Ok` when answered), the message, and the decision
/// id of an answered Check.
type Outcome = (Code, String, Option<String>);

/// The outcome of a control call.
fn control_outcome<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Outcome {
    r.map_or_else(
        |e| (e.code(), e.message().to_owned(), None),
        |_| (Code::Ok, String::new(), None),
    )
}

/// The outcome of a Check.
fn check_outcome(
    r: Result<tonic::Response<envoy_types::ext_authz::v3::pb::CheckResponse>, tonic::Status>,
) -> Outcome {
    match r {
        Ok(r) => (Code::Ok, String::new(), decision_id(r.get_ref())),
        Err(e) => (e.code(), e.message().to_owned(), None),
    }
}

impl Seen {
    fn count(&mut self, (code, message, decision): Outcome) {
        self.decisions.extend(decision);
        let key = format!("{code:?}");
        self.messages.entry(key.clone()).or_insert(message);
        *self.codes.entry(key).or_default() += 1;
        self.calls += 1;
    }

    fn merge(&mut self, other: Seen) {
        for (k, n) in other.codes {
            *self.codes.entry(k).or_default() += n;
        }
        for (k, m) in other.messages {
            self.messages.entry(k).or_insert(m);
        }
        self.decisions.extend(other.decisions);
        self.calls += other.calls;
    }

    fn code(&self, code: Code) -> usize {
        self.codes.get(&format!("{code:?}")).copied().unwrap_or(0)
    }
}

/// Runs `calls` calls of one kind over `workers` tasks, call `i` made by `call(i)`; a
/// call unanswered after [`CALL_TIMEOUT`] is counted as `timeout`.
async fn run<F, Fut>(calls: usize, workers: usize, started: Instant, call: F) -> Seen
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    let call = Arc::new(call);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            for i in (w..calls).step_by(workers) {
                if started.elapsed() > DEADLINE {
                    break;
                }
                match tokio::time::timeout(CALL_TIMEOUT, call(i)).await {
                    Ok(outcome) => seen.count(outcome),
                    Err(_) => {
                        *seen.codes.entry("timeout".into()).or_default() += 1;
                        seen.calls += 1;
                    }
                }
            }
            seen
        }));
    }
    let mut all = Seen::default();
    for t in tasks {
        all.merge(t.await.expect("worker"));
    }
    all
}

/// Bytes stored in the `audit_log` rows after `seq` (every column), and their count.
fn stored_after(conn: &rusqlite::Connection, seq: i64) -> (i64, i64) {
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('audit_log')")
        .expect("columns")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("names");
    let width = columns
        .iter()
        .map(|c| format!("coalesce(length(CAST({c} AS BLOB)), 0)"))
        .collect::<Vec<_>>()
        .join(" + ");
    conn.query_row(
        &format!("SELECT coalesce(sum({width}), 0), count(*) FROM audit_log WHERE seq > ?1"),
        [seq],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .expect("sum")
}

/// `audit.db` + `audit.db-wal`, in bytes.
fn files(db: &std::path::Path) -> u64 {
    let wal = db.with_extension("db-wal");
    [db, wal.as_path()]
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// A Prometheus sample of the admin scrape.
fn sample(scrape: &str, key: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{key} in the scrape:\n{scrape}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_calls_grow_the_log_by_a_bounded_stated_amount() {
    let mut s = start().await;
    let db = s.db();
    let admin = s.running.as_ref().expect("running").admin_addr;
    let control = s.control_addr();
    let token = s.token("acme", "bot", &["invoices:read"]);
    let viewer = s.operator("val", Role::Viewer, "acme");
    let (seq0, files0) = {
        let conn = rusqlite::Connection::open(&db).expect("open");
        let seq: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) FROM audit_log", [], |r| {
                r.get(0)
            })
            .expect("seq");
        (seq, files(&db))
    };
    let limits = aegis::config::Config::default().limits;
    let max_check = aegis::check::input::Limits {
        max_body_bytes: limits.max_body_bytes,
        max_headers: limits.max_headers,
        max_header_bytes: limits.max_header_bytes,
        envoy_max_request_bytes: limits.envoy_max_request_bytes,
    }
    .max_check_request_bytes();
    assert_eq!(max_check, 256 << 10, "the documented default");

    let started = Instant::now();
    // 1. Control calls without a valid credential, from four peers: huge tenants, and no
    //    credential, a garbage one, or one with a 5 KB `kid`.
    let forged_credential = forged_token(5000);
    let mut anonymous = Vec::new();
    for peer in ANONYMOUS_PEERS {
        let api =
            pb::control_plane_client::ControlPlaneClient::new(channel_from(control, peer).await);
        let credential = forged_credential.clone();
        anonymous.push(tokio::spawn(run(
            CALLS_PER_KIND / ANONYMOUS_PEERS.len(),
            4,
            started,
            move |i| {
                let mut api = api.clone();
                let credential = credential.clone();
                async move {
                    let tenant = "t".repeat(if i % 100 == 0 { 1 << 20 } else { 16 << 10 });
                    let mut req = tonic::Request::new(pb::AgentActionRequest {
                        tenant,
                        id: "bot".into(),
                        reason: "r".repeat(16 << 10),
                    });
                    let value = match i % 3 {
                        0 => None,
                        1 => Some("Bearer garbage".to_owned()),
                        _ => Some(format!("Bearer {credential}")),
                    };
                    if let Some(v) = value {
                        req.metadata_mut()
                            .insert("authorization", v.parse().expect("ascii"));
                    }
                    control_outcome(api.freeze_agent(req).await)
                }
            },
        )));
    }
    // 2. A viewer's GetAgent: ten 4 MB tenants (the issue's case), then 16 KiB tenants
    //    and another tenant's agent (a permission refusal), in turn.
    let viewer_ctl = Ctl::connect(control, &viewer).await;
    let viewer_calls = tokio::spawn(run(CALLS_PER_KIND, 4, started, move |i| {
        let ctl = viewer_ctl.clone();
        async move {
            let tenant = match i {
                _ if i % 2 == 1 => "globex".to_owned(),
                0..20 => "t".repeat(4_000_000),
                _ => "t".repeat(16 << 10),
            };
            let req = ctl.req(pb::AgentRef {
                tenant,
                id: "bot".into(),
            });
            control_outcome(ctl.api().get_agent(req).await)
        }
    }));
    // 3. Checks with a forged token carrying a 5 KB `kid`.
    let checks = client(s.addr).await;
    let forged = forged_token(5000);
    let c = checks.clone();
    let forged_checks = tokio::spawn(run(CALLS_PER_KIND, 4, started, move |_| {
        let mut c = c.clone();
        let req = Req::get("/invoices/1").token(&forged).build();
        async move { check_outcome(c.check(req).await) }
    }));
    // 4. Checks with a long `http.path` and no `:path` header: 16 KiB, every 100th
    //    200 KiB (answered, the row bounded), and every 100th 3 MiB (over the decoding
    //    limit: refused unread).
    let paths = Arc::new([16 << 10, 200 << 10, 3 << 20].map(|n| format!("/{}", "a".repeat(n))));
    let path_checks = tokio::spawn(run(CALLS_PER_KIND, 4, started, move |i| {
        let mut c = checks.clone();
        let [long, longer, huge] = &*paths;
        let path = match i % 100 {
            0 => huge,
            50 => longer,
            _ => long,
        };
        let req = Req::get(path).token(&token).build();
        async move { check_outcome(c.check(req).await) }
    }));

    let mut anonymous_seen = Seen::default();
    for t in anonymous {
        anonymous_seen.merge(t.await.expect("anonymous callers"));
    }
    let viewer_seen = viewer_calls.await.expect("viewer");
    let forged_seen = forged_checks.await.expect("forged checks");
    let path_seen = path_checks.await.expect("path checks");
    let elapsed = started.elapsed();
    let scrape = http_get(admin, "/metrics").await;
    s.stop().await;

    for (kind, seen) in [
        ("anonymous", &anonymous_seen),
        ("viewer", &viewer_seen),
        ("forged", &forged_seen),
        ("path", &path_seen),
    ] {
        eprintln!("{kind}: {:?}", seen.codes);
        assert_eq!(
            seen.calls, CALLS_PER_KIND,
            "{kind}: every call made within {DEADLINE:?}"
        );
    }
    // What the callers were told.
    assert_eq!(anonymous_seen.code(Code::Unauthenticated), CALLS_PER_KIND);
    let refused_viewer = viewer_seen.code(Code::PermissionDenied);
    assert_eq!(refused_viewer, CALLS_PER_KIND / 2, "globex: not hers");
    assert_eq!(
        viewer_seen.code(Code::InvalidArgument),
        CALLS_PER_KIND / 2,
        "a 16 KiB or 4 MB tenant is not a tenant"
    );
    let invalid = &viewer_seen.messages["InvalidArgument"];
    assert!(
        invalid.starts_with("tenant \"ttt") && invalid.len() < 256,
        "the field named, the value not echoed: {invalid}"
    );
    assert_eq!(
        forged_seen.code(Code::Ok),
        CALLS_PER_KIND,
        "answered (denied)"
    );
    let too_large = CALLS_PER_KIND / 100;
    assert_eq!(path_seen.code(Code::Ok), CALLS_PER_KIND - too_large);
    assert_eq!(path_seen.code(Code::OutOfRange), too_large);
    let limit_message = &path_seen.messages["OutOfRange"];
    assert!(
        limit_message.contains(&format!("the limit is: {max_check} bytes")),
        "{limit_message}"
    );

    // Every answered Check has its row, and no other Check row was written.
    let answered: Vec<String> = forged_seen
        .decisions
        .iter()
        .chain(&path_seen.decisions)
        .cloned()
        .collect();
    assert_eq!(
        answered.len(),
        forged_seen.code(Code::Ok) + path_seen.code(Code::Ok)
    );
    let recorded = decision_ids(&db);
    let missing = answered.iter().filter(|d| !recorded.contains(*d)).count();
    assert_eq!(missing, 0, "answered Checks without a row");
    let conn = rusqlite::Connection::open(&db).expect("open");
    let count = |sql: &str| -> i64 { conn.query_row(sql, [seq0], |r| r.get(0)).expect("count") };
    let check_rows = count("SELECT count(*) FROM audit_log WHERE seq > ?1 AND kind = 'check'");
    assert_eq!(
        check_rows,
        answered.len() as i64,
        "one row per answered Check"
    );

    // Refusal rows: within the rates; every refusal a row or counted.
    let seconds = elapsed.as_secs() + 2; // the whole seconds the run can touch
    let allowed = ROWS_PER_SEC * seconds;
    let refusal_rows = count(
        "SELECT count(*) FROM audit_log WHERE seq > ?1 AND kind = 'control' AND decision = 'refused'",
    );
    assert!(
        refusal_rows as u64 <= allowed,
        "{refusal_rows} refusal rows over {elapsed:?}: at most {ROWS_PER_SEC}/s"
    );
    let per_refuser = u64::from(ROWS_PER_REFUSER_PER_SEC) * seconds;
    let viewer_rows = count(
        "SELECT count(*) FROM audit_log WHERE seq > ?1 AND kind = 'control' AND actor = 'viewer:val'",
    );
    assert!(
        viewer_rows as u64 <= per_refuser,
        "{viewer_rows} rows for one actor"
    );
    for peer in ANONYMOUS_PEERS {
        let rows: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit_log WHERE seq > ?1 AND actor = 'unauthenticated' \
                 AND resource = ?2",
                rusqlite::params![seq0, format!("peer:{peer}")],
                |r| r.get(0),
            )
            .expect("count");
        assert!(
            rows > 0 && rows as u64 <= per_refuser,
            "{rows} rows for peer {peer}"
        );
    }
    let unrecorded = |reason: &str| {
        sample(
            &scrape,
            &format!("aegis_audit_refusals_unrecorded_total{{reason=\"{reason}\"}}"),
        )
    };
    let (per_actor, per_peer, global) = (
        unrecorded("rate_per_actor"),
        unrecorded("rate_per_peer"),
        unrecorded("rate_global"),
    );
    assert!(per_actor > 0 && per_peer > 0, "{scrape}");
    assert_eq!(
        refusal_rows as u64 + per_actor + per_peer + global,
        (CALLS_PER_KIND + refused_viewer) as u64,
        "every refusal is recorded or counted"
    );

    // The stated bound, in bytes.
    let (bytes, rows) = stored_after(&conn, seq0);
    let bound = (answered.len() as u64 + allowed) * MAX_ROW_BYTES as u64;
    let grown = files(&db).saturating_sub(files0);
    eprintln!(
        "10,000 hostile calls in {elapsed:.1?}: {rows} rows ({check_rows} Checks, \
         {refusal_rows} refusals; {per_actor} + {per_peer} + {global} refusals counted, not \
         recorded), {bytes} bytes of rows (bound {bound}), audit.db + WAL grew {grown} bytes"
    );
    assert!(
        bytes as u64 <= bound,
        "{bytes} bytes of rows over the bound {bound}"
    );
    assert!(
        grown <= bound,
        "the files grew {grown} bytes, over the bound {bound}"
    );
    let widest: i64 = conn
        .query_row(
            "SELECT max(length(CAST(resource AS BLOB))) FROM audit_log WHERE seq > ?1",
            [seq0],
            |r| r.get(0),
        )
        .expect("widest");
    assert!(widest <= MAX_FIELD_BYTES as i64, "a {widest}-byte path");
}
