//! The audit log under failure: a Check is never answered without its durable row.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(addr: std::net::SocketAddr) -> i32 {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .expect("health answers");
    r.into_inner().status
}

#[tokio::test]
async fn fails_closed_when_the_audit_log_cannot_be_written_and_recovers() {
    let mut s = start().await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let req = || Req::read_invoices(&t);
    assert_eq!(code(&s.check(req()).await.expect("decided")), 0);

    // Every insert now fails, as on a full disk: the Check must fail closed with a gRPC
    // error (so Envoy's failure_mode_allow/status_on_error decide), never an allow.
    let conn = rusqlite::Connection::open(s.db()).expect("open");
    conn.execute_batch("CREATE TRIGGER fail BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;")
        .expect("trigger");
    let err = s.check(req()).await.expect_err("fails closed");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("audit") && err.message().contains("disk is full"),
        "{}",
        err.message()
    );
    assert!(
        health_becomes(s.addr, ServingStatus::NotServing).await,
        "health reports NOT_SERVING while writes fail"
    );

    // The fault clears: service resumes by itself and the chain is intact across the gap.
    conn.execute_batch("DROP TRIGGER fail;")
        .expect("drop trigger");
    assert_eq!(code(&s.check(req()).await.expect("decided")), 0);
    assert!(
        health_becomes(s.addr, ServingStatus::Serving).await,
        "health back to SERVING"
    );
    s.stop().await;
    assert_eq!(
        s.rows().len(),
        2,
        "the failed Check has no row, the others do"
    );
    let keys = [common::audit_key(&s.data_dir())];
    assert!(
        aegis::audit::verify::verify_file(&s.db(), &keys)
            .expect("read")
            .is_ok()
    );
}

/// Polls the health service for up to 15 s until it reports `want`.
async fn health_becomes(addr: std::net::SocketAddr, want: ServingStatus) -> bool {
    // 15 s: the status is published every 250 ms, and a loaded machine may starve that.
    for _ in 0..300 {
        if health(addr).await == want as i32 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_locked_database_fails_closed() {
    let mut s = start().await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let conn = rusqlite::Connection::open(s.db()).expect("open");
    conn.execute_batch("BEGIN EXCLUSIVE; INSERT INTO audit_checkpoint (last_seq, head_hash, time_ns, key_id, signature) VALUES (0, x'', 0, '', x'');")
        .expect("lock");
    let err = s
        .check(Req::read_invoices(&t))
        .await
        .expect_err("fails closed");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("locked") || err.message().contains("busy"),
        "{}",
        err.message()
    );
    assert!(
        health_becomes(s.addr, ServingStatus::NotServing).await,
        "NOT_SERVING while the database is locked"
    );
    conn.execute_batch("ROLLBACK;").expect("unlock");
    let r = s.read_invoices(&t).await;
    assert_eq!(code(&r), 0);
    assert!(
        health_becomes(s.addr, ServingStatus::Serving).await,
        "SERVING once the lock is gone"
    );
    s.stop().await;
    let keys = [common::audit_key(&s.data_dir())];
    let verdict = aegis::audit::verify::verify_file(&s.db(), &keys).expect("read");
    assert!(verdict.is_ok(), "chain intact across the gap: {verdict:?}");
}

/// SIGKILL at a random moment under load, 20 rounds on one data directory. After each
/// kill: every Check that got an answer has its row, and the whole log verifies; each
/// restart also re-verifies the tail before writing (a torn tail would stop it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_answered_row() {
    const ROUNDS: u64 = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // Seeded so that a failing run can be replayed; printed with every round.
    let mut seed: u64 = 0x00ae_915e_ed00_0001;
    let mut answered = 0;
    let mut restarts = 0;
    for round in 0..ROUNDS {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let wait = Duration::from_millis(50 + (seed >> 33) % 700);
        let mut child = spawn_serve_at(&data);
        let signer = aegis::keys::Signer::load(&data).expect("key");
        let token = mint(&signer, claims("acme", "bot", &["invoices:read"]));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let driver = tokio::spawn(drive_checks(child.addr, token, stop_rx, 16));
        tokio::time::sleep(wait).await;
        child.child.kill().expect("SIGKILL");
        let _ = child.child.wait();
        // Read before anything opens the log: the last connection to close removes the WAL,
        // so each round starts a new one.
        restarts = restarts.max(wal_restarts(&data.join("audit.db-wal")));
        let _ = stop_tx.send(true);
        let ids = driver.await.expect("driver");
        answered += ids.len();
        let stored = decision_ids(&data.join("audit.db"));
        eprintln!(
            "round {round}: killed after {wait:?}, {} answered, {} rows stored",
            ids.len(),
            stored.len()
        );
        let lost: Vec<&String> = ids.iter().filter(|id| !stored.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} answered Checks have no row, e.g. {:?}",
            lost.len(),
            lost.first()
        );
        let keys = [common::audit_key(&data)];
        let verdict =
            aegis::audit::verify::verify_file(&data.join("audit.db"), &keys).expect("read");
        assert!(verdict.is_ok(), "round {round}: {verdict:?}");
    }
    assert!(
        answered > 1000,
        "only {answered} Checks answered in {ROUNDS} rounds"
    );
    // The server's WAL bound is 64 frames here (spawn_serve_at): the kills landed among
    // the writer's WAL start-overs.
    assert!(restarts > 0, "the WAL never started over");
    eprintln!("the WAL started over up to {restarts} times in one round");
}

/// How many times the WAL at `wal` has started over: its header's checkpoint sequence
/// number (bytes 12..16, big-endian); 0 when there is no WAL.
fn wal_restarts(wal: &std::path::Path) -> u32 {
    let header = std::fs::read(wal).unwrap_or_default();
    header
        .get(12..16)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut child = spawn_serve_at(&data);
    let signer = aegis::keys::Signer::load(&data).expect("key");
    let token = mint(&signer, claims("acme", "bot", &["invoices:read"]));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let driver = tokio::spawn(drive_checks(child.addr, token, stop_rx, 16));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "aegis serve exits 0 on SIGTERM");
    let _ = stop_tx.send(true);
    let ids = driver.await.expect("driver");
    let stored = decision_ids(&data.join("audit.db"));
    assert!(!ids.is_empty());
    assert!(
        ids.iter().all(|id| stored.contains(id)),
        "every answered Check has its row after SIGTERM"
    );
}

#[tokio::test]
async fn a_deleted_or_replaced_database_fails_closed_until_the_original_is_back() {
    let mut s = start().await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let db = s.db();
    let aside = s.data_dir().join("audit.db.aside");
    assert_eq!(code(&s.read_invoices(&t).await), 0);

    // (what happens to the file, how to undo it, what the Check's error must say)
    type Fault = fn(&std::path::Path, &std::path::Path);
    let faults: [(&str, Fault, &str); 2] = [
        (
            "deleted",
            |db, aside| std::fs::rename(db, aside).expect("move away"),
            "was deleted",
        ),
        (
            "replaced",
            |db, aside| {
                std::fs::rename(db, aside).expect("move away");
                std::fs::write(db, b"not the audit log").expect("write impostor");
            },
            "was replaced by another file",
        ),
    ];
    for (what, fault, expected) in faults {
        fault(&db, &aside);
        let err = s
            .check(Req::read_invoices(&t))
            .await
            .expect_err("a Check must fail closed while its row cannot be kept");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{what}: {err:?}");
        assert!(
            err.message().contains(expected),
            "{what}: {}",
            err.message()
        );
        assert!(
            health_becomes(s.addr, ServingStatus::NotServing).await,
            "{what}: health reports NOT_SERVING"
        );
        // The original comes back: service resumes by itself.
        std::fs::rename(&aside, &db).expect("put back");
        assert_eq!(code(&s.read_invoices(&t).await), 0, "{what}: resumes");
        assert!(
            health_becomes(s.addr, ServingStatus::Serving).await,
            "{what}: health back to SERVING"
        );
    }
    s.stop().await;
    assert_eq!(
        s.rows().len(),
        3,
        "one row per answered Check, none for the refused"
    );
    let keys = [common::audit_key(&s.data_dir())];
    let verdict = aegis::audit::verify::verify_file(&db, &keys).expect("read");
    assert!(verdict.is_ok(), "{verdict:?}");
}

/// A small tmpfs mounted for one test, unmounted when dropped. Needs root (as the test
/// command runs in CI and on the development machines); anything else fails the test
/// with that reason rather than skipping it.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs failed: the storage-fault tests need root to make a \
             small file system"
        );
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn remount(&self, opts: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(self.dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {opts}");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system holding `dir` with one file; returns its path.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test]
async fn a_full_disk_fails_closed_and_service_resumes_when_space_returns() {
    let fs = SmallFs::mount("4m");
    let data = fs.path().join("data");
    let mut s = start_with(|c| c.data_dir = data.clone()).await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let mut answered = std::collections::HashSet::new();
    for _ in 0..20 {
        let r = s.read_invoices(&t).await;
        answered.insert(decision_id(&r).expect("id"));
    }
    let filler = fill(fs.path());
    // SQLite may still reuse space its WAL already holds; keep calling until a commit
    // needs a page the disk no longer has. Every Check either fails closed or was
    // recorded (checked below).
    let mut failure = None;
    for _ in 0..5_000 {
        match s.check(Req::read_invoices(&t)).await {
            Ok(r) => {
                answered.insert(decision_id(&r).expect("id"));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let err = failure.expect("a full disk must make a commit fail");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("full"),
        "the error names the fault: {}",
        err.message()
    );
    assert!(
        health_becomes(s.addr, ServingStatus::NotServing).await,
        "NOT_SERVING while the disk is full"
    );
    std::fs::remove_file(&filler).expect("free space");
    let r = s.read_invoices(&t).await;
    assert_eq!(code(&r), 0, "resumes by itself once space returns");
    answered.insert(decision_id(&r).expect("id"));
    assert!(
        health_becomes(s.addr, ServingStatus::Serving).await,
        "SERVING again"
    );
    s.stop().await;
    let stored: std::collections::HashSet<String> = decisions(&data.join("audit.db"))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(stored, answered, "exactly the answered Checks have rows");
    let keys = [common::audit_key(&data)];
    let verdict = aegis::audit::verify::verify_file(&data.join("audit.db"), &keys).expect("read");
    assert!(verdict.is_ok(), "chain intact across the gap: {verdict:?}");
}

#[test]
fn a_read_only_file_system_stops_start_up_with_a_message_naming_it() {
    // The kernel refuses to remount a file system read-only while a process holds a
    // file on it open for writing, so a running Aegis cannot meet this fault; it meets
    // it at start-up and must say so, not serve.
    let fs = SmallFs::mount("4m");
    let data = fs.path().join("data");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut s = start_with(|c| c.data_dir = data.clone()).await;
        s.stop().await;
    });
    fs.remount("ro");
    let stderr = serve_refuses(&["--data-dir".as_ref(), data.as_os_str()]);
    assert!(
        stderr.contains("audit.db") && stderr.to_lowercase().contains("read-only"),
        "names the file and the fault: {stderr}"
    );
}

#[tokio::test]
async fn readiness_tells_the_truth_about_the_policy_and_the_signing_key() {
    let bundle = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(bundle.path().join("aegis")).expect("mkdir");
    std::fs::write(
        bundle.path().join("aegis/authz.rego"),
        r#"package aegis.authz

import rego.v1

spin := count([1 | some i in numbers.range(1, 4000); some j in numbers.range(1, 4000); i == j + 100000])

decision := {"allowed": spin == 0} if input.tool.name == "spin"
decision := {"allowed": true} if input.tool.name == "fast"
"#,
    )
    .expect("policy");
    let dir = bundle.path().to_path_buf();
    let mut s = start_with(|c| {
        c.policy.bundle = Some(dir);
        c.policy.eval_timeout_ms = 20;
    })
    .await;
    let t = s.token("acme", "bot", &[]);
    assert_eq!(health(s.addr).await, ServingStatus::Serving as i32);

    // Policy: one failed evaluation is a bad input; every one failing is a bad policy.
    let spin = || Req::get("/spin").token(&t).tool("spin", "read").build();
    s.check(spin()).await.expect_err("times out");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        health(s.addr).await,
        ServingStatus::Serving as i32,
        "one failure"
    );
    for _ in 1..aegis::policy::UNUSABLE_AFTER_FAILURES {
        s.check(spin()).await.expect_err("times out");
    }
    assert!(
        health_becomes(s.addr, ServingStatus::NotServing).await,
        "NOT_SERVING after every recent evaluation failed"
    );
    let fast = s
        .check(Req::get("/fast").token(&t).tool("fast", "read").build())
        .await
        .expect("decided");
    assert_eq!(code(&fast), 0);
    assert!(
        health_becomes(s.addr, ServingStatus::Serving).await,
        "SERVING once evaluations succeed again"
    );

    // Signing key: its file gone, or another key in its place.
    let key = s.data_dir().join(aegis::keys::SIGNING_KEY_FILE);
    let aside = s.data_dir().join("signing.key.aside");
    std::fs::rename(&key, &aside).expect("move key");
    assert!(
        health_becomes(s.addr, ServingStatus::NotServing).await,
        "NOT_SERVING without the key file"
    );
    std::fs::write(&key, "00".repeat(32)).expect("another key");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        health(s.addr).await,
        ServingStatus::NotServing as i32,
        "another key in the file is not the key in use"
    );
    std::fs::rename(&aside, &key).expect("restore key");
    assert!(
        health_becomes(s.addr, ServingStatus::Serving).await,
        "SERVING once the key file is back"
    );

    // The audit key likewise: another key in its file would sign the log after a restart.
    let audit_key = s.data_dir().join(aegis::keys::AUDIT_KEY_FILE);
    let kept = std::fs::read(&audit_key).expect("audit key");
    std::fs::write(&audit_key, "11".repeat(32)).expect("another audit key");
    assert!(
        health_becomes(s.addr, ServingStatus::NotServing).await,
        "NOT_SERVING with another audit key in its file"
    );
    let admin = s.running.as_ref().expect("running").admin_addr;
    let ready = http_get(admin, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("audit key: the file now holds key"),
        "{ready}"
    );
    std::fs::write(&audit_key, kept).expect("restore audit key");
    assert!(
        health_becomes(s.addr, ServingStatus::Serving).await,
        "SERVING once the audit key file is back"
    );
    s.stop().await;
}
