//! Audit log tampering: every mutation under `tests/vectors/audit/` (an SQL script named
//! for what it does, with its expected finding in an `-- expect:` line) is applied to a
//! copy of a real six-row log, and the verifier must name the row and the kind.

mod common;

use std::path::{Path, PathBuf};

use aegis::audit::Record;
use aegis::audit::store::{AuditLog, Durability, StoreOptions};
use aegis::audit::verify::{Tamper, verify_file};
use aegis::keys::Signer;

/// Writes six rows, each in its own commit, with the data dir's key.
async fn base_log(dir: &Path) -> Signer {
    let signer = Signer::load_or_create(dir).expect("key");
    let opts = StoreOptions {
        queue_capacity: 16,
        max_batch: 16,
        durability: Durability::Normal,
    };
    let (log, writer) = AuditLog::open(&dir.join("audit.db"), signer.clone(), &opts).expect("open");
    for (i, decision) in [
        "allow",
        "deny",
        "deny",
        "allow",
        "sanitize",
        "approval_needed",
    ]
    .iter()
    .enumerate()
    {
        let record = Record {
            time_ns: aegis::unix_nanos(),
            kind: "check".into(),
            decision_id: format!("d{i}"),
            tenant: "acme".into(),
            agent: "billing-bot".into(),
            tool: "payments".into(),
            action: "create".into(),
            decision: (*decision).into(),
            reason: format!("reason-{i}"),
            http_status: 200,
            ..Default::default()
        };
        assert_eq!(log.append(record).await.expect("append"), i as u64 + 1);
    }
    drop(log);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .expect("join");
    signer
}

fn vectors() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/audit");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("vectors")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.retain(|p| p.extension().is_some_and(|e| e == "sql"));
    v.sort();
    v
}

fn directive<'a>(sql: &'a str, name: &str) -> Option<&'a str> {
    sql.lines()
        .find_map(|l| l.strip_prefix(&format!("-- {name}:")).map(str::trim))
}

#[tokio::test]
async fn every_tamper_vector_is_named() {
    let base = tempfile::tempdir().expect("tempdir");
    let signer = base_log(base.path()).await;
    let foreign = Signer::generate().expect("key");
    let vectors = vectors();
    assert!(vectors.len() >= 10, "vectors missing: {vectors:?}");
    for path in vectors {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let sql = std::fs::read_to_string(&path).expect("read vector");
        let expect = directive(&sql, "expect").unwrap_or_else(|| panic!("{name}: no expect line"));
        let work = tempfile::tempdir().expect("tempdir");
        let db = work.path().join("audit.db");
        let src = rusqlite::Connection::open(base.path().join("audit.db")).expect("open base");
        src.execute("VACUUM INTO ?1", [db.to_string_lossy()])
            .expect("copy");
        rusqlite::Connection::open(&db)
            .expect("open copy")
            .execute_batch(&sql)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let key = if directive(&sql, "key") == Some("foreign") {
            foreign.verifying_key()
        } else {
            signer.verifying_key()
        };
        let result = verify_file(&db, &[key]).expect("readable");
        match (expect, result) {
            ("intact", Ok(summary)) => assert_eq!(summary.rows, 6, "{name}"),
            ("intact", Err(f)) => panic!("{name}: expected intact, got {f}"),
            (_, Ok(_)) => panic!("{name}: expected {expect}, verifier found nothing"),
            (_, Err(f)) => {
                let (kind, seq) = expect
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("{name}: bad expect {expect:?}"));
                let kind = match kind {
                    "modified" => Tamper::Modified,
                    "deleted" => Tamper::Deleted,
                    "inserted" => Tamper::Inserted,
                    "reordered" => Tamper::Reordered,
                    "bad_signature" => Tamper::BadSignature,
                    other => panic!("{name}: unknown kind {other}"),
                };
                assert_eq!(
                    (f.kind, f.seq),
                    (kind, seq.parse::<u64>().expect("seq")),
                    "{name}: got {f}"
                );
            }
        }
    }
}

#[tokio::test]
async fn aegis_audit_verify_exit_codes_and_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    base_log(dir.path()).await;
    let verify = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_aegis"))
            .args(["audit", "verify", "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("runs")
    };
    let out = verify();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("intact: 6 rows"),
        "{out:?}"
    );

    rusqlite::Connection::open(dir.path().join("audit.db"))
        .expect("open")
        .execute("UPDATE audit_log SET decision = 'allow' WHERE seq = 2", [])
        .expect("tamper");
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("row 2: modified"), "{stdout}");

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(["audit", "verify", "--data-dir", "/nonexistent/aegis"])
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
}

#[tokio::test]
async fn writer_refuses_to_continue_from_a_bad_tail() {
    // (what happened to the end of the log, SQL that does it, what start-up must say)
    let cases = [
        (
            "last commit's checkpoint lost",
            "DELETE FROM audit_checkpoint WHERE last_seq = 6",
            "row 6: inserted",
        ),
        (
            "last row torn or garbled",
            "UPDATE audit_log SET reason = 'garbled' WHERE seq = 6",
            "row 6: modified",
        ),
        (
            "last checkpoint forged",
            "UPDATE audit_checkpoint SET signature = zeroblob(64) WHERE last_seq = 6",
            "bad signature",
        ),
        (
            "last row deleted",
            "DELETE FROM audit_log WHERE seq = 6",
            "deleted",
        ),
    ];
    for (what, sql, expected) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = base_log(dir.path()).await;
        let db = dir.path().join("audit.db");
        rusqlite::Connection::open(&db)
            .expect("open")
            .execute_batch(sql)
            .expect("tamper");
        let opts = StoreOptions {
            queue_capacity: 4,
            max_batch: 4,
            durability: Durability::Normal,
        };
        let err = AuditLog::open(&db, signer, &opts).expect_err(what);
        let msg = err.to_string();
        assert!(
            msg.contains(expected) && msg.contains("refusing to continue"),
            "{what}: {msg}"
        );
    }
}

#[test]
fn a_truncated_database_file_stops_start_up_with_a_message_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let _ = base_log(&data).await;
    });
    // A torn write at the end of the database file: its last page cut in half.
    let db = data.join("audit.db");
    let len = std::fs::metadata(&db).expect("db").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open")
        .set_len(len - 2048)
        .expect("truncate");
    let stderr = common::serve_refuses(&["--data-dir".as_ref(), data.as_os_str()]);
    assert!(
        stderr.contains("audit.db")
            && (stderr.contains("torn or corrupt") || stderr.contains("does not verify")),
        "{stderr}"
    );
}
