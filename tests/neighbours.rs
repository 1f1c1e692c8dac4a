//! Aegis next to other processes on its live audit database, as operators and log shippers
//! use it: the real `sqlite3` CLI (and `aegis audit verify`) reading it while Checks are
//! answered, and holding its write lock. Neither may cost an answered row, and an outside
//! writer must stop Checks (fail closed) however many readers came and went before. And
//! what hostile callers send cannot make a row larger than the stated bound.
//!
//! The `sqlite3` CLI comes from Debian's package (scripts/test installs it when missing).
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// `sqlite3 <db> <sql>` as an operator runs it: its output.
fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 CLI (scripts/test installs it: apt-get install sqlite3)");
    assert!(out.status.success(), "sqlite3 {sql}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An outside `sqlite3` holding the database's write lock until dropped.
struct WriteLock(std::process::Child);

impl WriteLock {
    fn take(db: &Path) -> Self {
        let mut child = Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the sqlite3 CLI");
        let stdin = child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(b"BEGIN IMMEDIATE;\n.print locked\n")
            .expect("write");
        stdin.flush().expect("flush");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "locked", "the outside writer holds the lock");
        Self(child)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Readers come and go while Checks are answered; then SIGKILL: every answered decision
/// is in the log. Before the fix, the store's second open of the file dropped the POSIX
/// locks SQLite held for Aegis, and the first reader to close deleted the WAL under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_readers_never_cost_an_answered_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let db = data.join("audit.db");
    let mut child = spawn_serve_at(&data);
    let signer = aegis::keys::Signer::load(&data).expect("key");
    let token = mint(&signer, claims("acme", "bot", &["invoices:read"]));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let driver = tokio::spawn(drive_checks(child.addr, token, stop_rx, 8));

    let mut counts = Vec::new();
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let n: u64 = sqlite3(&db, "SELECT count(*) FROM audit_log")
            .parse()
            .expect("a count");
        counts.push(n);
        if i == 2 {
            // `aegis audit verify` while serving is one more reader.
            let data_arg = data.to_string_lossy().into_owned();
            let out = aegis_cmd(&["audit", "verify", "--data-dir", &data_arg]);
            assert!(out.status.code().is_some(), "verify ran: {out:?}");
        }
    }
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]) && counts[4] > 0,
        "the readers saw the log grow: {counts:?}"
    );
    assert!(
        data.join("audit.db-wal").exists(),
        "no reader deleted the WAL from under Aegis"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.child.kill().expect("SIGKILL");
    let _ = child.child.wait();
    let _ = stop_tx.send(true);
    let ids = driver.await.expect("driver");
    let stored = decision_ids(&db);
    let lost: Vec<&String> = ids.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(ids.len() > 100, "only {} Checks answered", ids.len());
    assert!(
        lost.is_empty(),
        "{} of {} answered Checks have no row, e.g. {:?}",
        lost.len(),
        ids.len(),
        lost.first()
    );
    let verdict =
        aegis::audit::verify::verify_file(&db, &[common::audit_key(&data)]).expect("read");
    assert!(verdict.is_ok(), "{verdict:?}");
}

/// An outside process holding the write lock makes Checks fail UNAVAILABLE (Envoy's
/// status_on_error answers), before readers have come and gone and after; once the lock
/// is gone, Checks are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_writer_stops_checks_before_and_after_readers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let db = data.join("audit.db");
    let child = spawn_serve_at(&data);
    let signer = aegis::keys::Signer::load(&data).expect("key");
    let token = mint(&signer, claims("acme", "bot", &["invoices:read"]));
    let mut c = client(child.addr).await;
    let allowed = c.check(Req::read_invoices(&token)).await.expect("answered");
    assert_eq!(code(allowed.get_ref()), 0);

    for phase in ["before readers", "after readers"] {
        if phase == "after readers" {
            for _ in 0..3 {
                sqlite3(&db, "SELECT count(*) FROM audit_log");
            }
        }
        let lock = WriteLock::take(&db);
        let err = c
            .check(Req::read_invoices(&token))
            .await
            .expect_err("fails closed while another process writes");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{phase}: {err:?}");
        drop(lock);
        let r = c
            .check(Req::read_invoices(&token))
            .await
            .expect("answered once the lock is gone");
        assert_eq!(code(r.get_ref()), 0, "{phase}");
    }
    drop(child);
}

/// What hostile callers send can make rows no larger than the stated bound: a Check with
/// a 200 KiB path (no `:path` header to catch it; a longer CheckRequest is refused before
/// it is decoded, see `tests/disk_filling.rs`), a viewer's control call with a 2 MiB
/// tenant, a token with a 6 KiB `kid`. Each text field of a row keeps at most
/// `MAX_FIELD_BYTES`, marked with the whole value's length and SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_make_rows_no_larger_than_the_bound() {
    use aegis::audit::MAX_FIELD_BYTES;
    let mut s = start().await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let path = format!("/{}", "a".repeat(200 << 10));
    let r = s
        .check(Req::get(&path).token(&t).build())
        .await
        .expect("decided");
    assert_ne!(code(&r), 0);
    let viewer = s.control(&s.operator("val", Role::Viewer, "acme")).await;
    let tenant = "t".repeat(2 << 20);
    let _ = viewer
        .api()
        .get_agent(viewer.req(pb::AgentRef {
            tenant: tenant.clone(),
            id: "bot".into(),
        }))
        .await;
    let header = format!(
        r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#,
        "k".repeat(6 << 10)
    );
    let forged = format!(
        "{}.e30.AAAA",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            header.as_bytes()
        )
    );
    let r = s
        .check(Req::get("/invoices/1").token(&forged).build())
        .await
        .expect("decided");
    assert_ne!(code(&r), 0);
    s.stop().await;

    let conn = rusqlite::Connection::open(s.db()).expect("open");
    // The widest text field of any row, in bytes.
    let widest = aegis::audit::FIELD_NAMES[2..]
        .iter()
        .map(|col| {
            conn.query_row(
                &format!("SELECT coalesce(max(length(CAST({col} AS BLOB))), 0) FROM audit_log"),
                [],
                |r| r.get::<_, i64>(0),
            )
            .expect("column width")
        })
        .max()
        .unwrap_or(0);
    assert!(
        widest <= MAX_FIELD_BYTES as i64,
        "a field of {widest} bytes"
    );
    let resource: String = conn
        .query_row(
            "SELECT resource FROM audit_log WHERE kind = 'check' ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("the long path's row");
    assert!(
        resource.contains(&format!("[truncated: {} bytes, sha256:", path.len())),
        "{resource}"
    );
    let total: i64 = conn
        .query_row("SELECT sum(length(CAST(resource AS BLOB)) + length(CAST(tenant AS BLOB)) + length(CAST(reason AS BLOB))) FROM audit_log", [], |r| r.get(0))
        .expect("total");
    assert!(total < 64 * 1024, "{total} bytes for three hostile calls");
    let verdict = aegis::audit::verify::verify_file(&s.db(), &[common::audit_key(&s.data_dir())])
        .expect("read");
    assert!(verdict.is_ok(), "{verdict:?}");
}
