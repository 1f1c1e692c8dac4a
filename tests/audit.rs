//! Audit log tampering: every mutation under `tests/vectors/audit/` (an SQL script named
//! for what it does, with its expected finding in an `-- expect:` line) is applied to a
//! copy of a real six-row log, and the verifier must name the row and the kind.
//!
//! Two more directives: `-- resign: yes` makes the attacker one who holds the audit key
//! (after the SQL, every row hash and checkpoint is recomputed and signed again, as a
//! thief of `audit.key` would), and `-- witness: yes` gives the verifier the checkpoints
//! the writer published as it made them.

mod common;

use std::path::{Path, PathBuf};

use aegis::audit::Record;
use aegis::audit::store::{AuditLog, Durability, StoreOptions};
use aegis::audit::verify::{Tamper, Trust, verify_file_with};
use aegis::audit::witness::{FileSink, Publisher};
use aegis::keys::Signer;

/// Writes six rows, each in its own commit, with the data dir's key, publishing every
/// checkpoint to `witness.jsonl` beside the database.
async fn base_log(dir: &Path) -> Signer {
    let signer = Signer::load_or_create(dir).expect("key");
    let opts = StoreOptions {
        queue_capacity: 16,
        max_batch: 16,
        durability: Durability::Normal,
    };
    let sink = FileSink::open(&dir.join("witness.jsonl")).expect("witness file");
    let publisher = Publisher::start(vec![Box::new(sink)]).expect("publisher");
    let key = [signer.verifying_key()];
    let (log, writer) = AuditLog::open_with(
        &dir.join("audit.db"),
        signer.clone(),
        &opts,
        Trust::keys(&key),
        Some(publisher),
    )
    .expect("open");
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
        if directive(&sql, "resign") == Some("yes") {
            resign(&db, &signer);
        }
        let key = if directive(&sql, "key") == Some("foreign") {
            foreign.verifying_key()
        } else {
            signer.verifying_key()
        };
        let witness = base.path().join("witness.jsonl");
        let witness = (directive(&sql, "witness") == Some("yes")).then_some(witness.as_path());
        let result = verify_file_with(&db, Trust::keys(&[key]), witness).expect("readable");
        // `intact` is six rows; `intact N` a log cut to N rows that still verifies alone.
        let intact_rows = match expect.strip_prefix("intact") {
            Some(n) if n.trim().is_empty() => Some(6),
            Some(n) => Some(n.trim().parse::<u64>().expect("rows")),
            None => None,
        };
        match (intact_rows, result) {
            (Some(rows), Ok(summary)) => {
                assert_eq!(summary.rows, rows, "{name}");
                if witness.is_some() {
                    assert_eq!(
                        summary.witnessed, 6,
                        "{name}: every witnessed checkpoint found"
                    );
                }
            }
            (Some(_), Err(f)) => panic!("{name}: expected intact, got {f}"),
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

/// What a thief of the audit key does after editing rows: recomputes every row's hash and
/// link from its (edited) fields, and signs every checkpoint again over the new chain and
/// tree. Nothing in the database alone can tell.
fn resign(db: &Path, signer: &Signer) {
    use aegis::audit::merkle::root_of;
    use aegis::audit::proof::leaf_hash;
    use aegis::audit::{GENESIS, checkpoint_message_v2, commitments, row_hash_v2};
    let conn = rusqlite::Connection::open(db).expect("open");
    let mut stmt = conn
        .prepare(
            "SELECT seq, time_ns, http_status, kind, decision_id, tenant, agent, session, run_id, \
             tool, action, resource, decision, reason, policy_revision, trust_level, approval_id, \
             actor, trace_id, span_id, salt FROM audit_log ORDER BY seq",
        )
        .expect("select");
    let rows: Vec<(i64, Record, Vec<u8>)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                Record {
                    time_ns: r.get(1)?,
                    http_status: r.get(2)?,
                    kind: r.get(3)?,
                    decision_id: r.get(4)?,
                    tenant: r.get(5)?,
                    agent: r.get(6)?,
                    session: r.get(7)?,
                    run_id: r.get(8)?,
                    tool: r.get(9)?,
                    action: r.get(10)?,
                    resource: r.get(11)?,
                    decision: r.get(12)?,
                    reason: r.get(13)?,
                    policy_revision: r.get(14)?,
                    trust_level: r.get(15)?,
                    approval_id: r.get(16)?,
                    actor: r.get(17)?,
                    trace_id: r.get(18)?,
                    span_id: r.get(19)?,
                },
                r.get(20)?,
            ))
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    drop(stmt);
    let kid = signer.kid();
    let mut prev = GENESIS;
    let mut leaves = Vec::new();
    for (seq, record, salt) in &rows {
        let salt: [u8; 32] = salt.as_slice().try_into().expect("format 2 row");
        let hash = row_hash_v2(*seq as u64, &commitments(record, &salt), kid, &prev);
        conn.execute(
            "UPDATE audit_log SET prev_hash = ?1, hash = ?2, key_id = ?3 WHERE seq = ?4",
            rusqlite::params![&prev[..], &hash[..], kid, seq],
        )
        .expect("rehash");
        prev = hash;
        leaves.push((*seq, hash, leaf_hash(&hash)));
    }
    let cps: Vec<(i64, i64, i64)> = conn
        .prepare("SELECT id, last_seq, time_ns FROM audit_checkpoint")
        .expect("select")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("checkpoints")
        .collect::<Result<_, _>>()
        .expect("checkpoints");
    for (id, last_seq, time_ns) in cps {
        let upto: Vec<_> = leaves.iter().filter(|l| l.0 <= last_seq).collect();
        let Some(head) = upto.last().map(|l| l.1) else {
            continue;
        };
        let root = root_of(&upto.iter().map(|l| l.2).collect::<Vec<_>>());
        let sig = signer.sign(&checkpoint_message_v2(
            last_seq as u64,
            &head,
            &root,
            time_ns,
            kid,
        ));
        conn.execute(
            "UPDATE audit_checkpoint SET head_hash = ?1, root = ?2, signature = ?3, key_id = ?4 \
             WHERE id = ?5",
            rusqlite::params![&head[..], &root[..], &sig[..], kid, id],
        )
        .expect("resign");
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
