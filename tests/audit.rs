//! Audit log tampering: every mutation under `tests/vectors/audit/` (an SQL script named
//! for what it does, with its expected finding in an `-- expect:` line) is applied to a
//! copy of a real six-row log, and the verifier must name the row and the kind.
//!
//! Two more directives: `-- resign: yes` makes the attacker one who holds the audit key
//! (after the SQL, every row hash and checkpoint is recomputed and signed again, as a
//! thief of `audit.key` would), and `-- witness: yes` gives the verifier the checkpoints
//! the writer published as it made them.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

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
        gather: aegis::audit::store::GATHER,
        wal_restart_frames: aegis::audit::store::WAL_RESTART_FRAMES,
    };
    let sink = FileSink::open(&dir.join("witness.jsonl")).expect("witness file");
    // Every checkpoint, so that the vectors can name each commit's range.
    let publisher =
        Publisher::start(vec![Box::new(sink)], std::time::Duration::ZERO).expect("publisher");
    let key = [signer.verifying_key()];
    let (log, writer) = AuditLog::open_with(
        &dir.join("audit.db"),
        signer.clone(),
        &opts,
        Trust::keys(&key),
        Some(publisher),
        None,
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

/// The witness file is an input too: an edited line is refused naming it, never taken as
/// evidence against (or for) the log; lines out of order mean the log went back.
#[tokio::test]
async fn an_edited_witness_is_named_not_believed() {
    use aegis::audit::verify::VerifyError;
    let base = tempfile::tempdir().expect("tempdir");
    let signer = base_log(base.path()).await;
    let key = [signer.verifying_key()];
    let db = base.path().join("audit.db");
    let lines: Vec<String> = std::fs::read_to_string(base.path().join("witness.jsonl"))
        .expect("witness")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 6, "one checkpoint per commit");
    let edit = |f: &dyn Fn(&mut Vec<String>)| {
        let mut l = lines.clone();
        f(&mut l);
        let path = base.path().join("edited.jsonl");
        std::fs::write(&path, l.join("\n") + "\n").expect("write");
        verify_file_with(&db, Trust::keys(&key), Some(&path))
    };
    // (what, the edit, what the verifier must say)
    type Edit = Box<dyn Fn(&mut Vec<String>)>;
    let refused: Vec<(&str, Edit, &str)> = vec![
        (
            "a line's tree head replaced",
            Box::new(|l| {
                let mut cp =
                    aegis::audit::witness::SignedCheckpoint::parse_line(&l[2]).expect("parses");
                cp.root = [7; 32];
                l[2] = cp.to_line();
            }),
            "line 3: the checkpoint at tree size 3 is not signed by a trusted key",
        ),
        (
            "a line that is not a checkpoint",
            Box::new(|l| l[1] = "{\"hello\": 1}".into()),
            "line 2: unknown field",
        ),
    ];
    for (what, f, expected) in refused {
        match edit(&*f) {
            Err(VerifyError::Witness(msg)) => assert!(msg.contains(expected), "{what}: {msg}"),
            other => panic!("{what}: expected a witness error, got {other:?}"),
        }
    }
    let foreign = Signer::generate().expect("key");
    let foreign_key = [foreign.verifying_key()];
    match verify_file_with(
        &db,
        Trust::keys(&foreign_key),
        Some(&base.path().join("witness.jsonl")),
    ) {
        Err(VerifyError::Witness(msg)) => assert!(msg.contains("line 1"), "{msg}"),
        other => panic!("a witness of another key: {other:?}"),
    }
    // Sizes 1, 2, 4, 3, 5, 6: the witness saw the log at 4 rows, then at 3.
    let finding = edit(&|l| l.swap(2, 3))
        .expect("readable")
        .expect_err("the log went back");
    assert_eq!(
        (finding.kind, finding.seq),
        (Tamper::Deleted, 4),
        "{finding}"
    );
    assert!(finding.detail.contains("shrink from 4 rows"), "{finding}");
    // A witness that saw less (its last lines lost) still checks what it saw.
    let summary = edit(&|l| l.truncate(3)).expect("readable").expect("intact");
    assert_eq!(summary.witnessed, 3);
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
            gather: aegis::audit::store::GATHER,
            wal_restart_frames: aegis::audit::store::WAL_RESTART_FRAMES,
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

/// One decision proven to someone without the log (a SIEM): its row, its audit path to the
/// newest signed tree head, and that the log extends a tree head they saw earlier. Every
/// edit of the proof is refused naming what broke; and after a thief of the audit key
/// rewrote history, a fresh proof checked against the tree head the SIEM kept fails.
#[tokio::test]
async fn one_decision_is_proven_without_the_log() {
    use aegis::audit::prove::Proof;
    let base = tempfile::tempdir().expect("tempdir");
    let signer = base_log(base.path()).await;
    let data = base.path().to_string_lossy().into_owned();
    let key = base
        .path()
        .join("signing.pub")
        .to_string_lossy()
        .into_owned();
    let file = base.path().join("d2.json");
    let file_s = file.to_string_lossy().into_owned();
    let aegis = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aegis"))
            .args(args)
            .output()
            .expect("runs");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let prove = |from: &str| {
        aegis(&[
            "audit",
            "prove",
            "--data-dir",
            &data,
            "--decision",
            "d2",
            "--from-size",
            from,
            "-o",
            &file_s,
        ])
    };
    let (code, out) = prove("3");
    assert_eq!(code, 0, "{out}");
    // The SIEM holds the checkpoints the writer published (its witness file).
    let held = base
        .path()
        .join("witness.jsonl")
        .to_string_lossy()
        .into_owned();
    let (code, out) = aegis(&["audit", "verify-proof", &file_s, "--public-key", &key]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("decision d2 is row 3 of the log of 6 rows")
            && out.contains("unchecked without --witness"),
        "{out}"
    );
    let (code, out) = aegis(&[
        "audit",
        "verify-proof",
        &file_s,
        "--public-key",
        &key,
        "--witness",
        &held,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("it extends the log of 3 rows")
            && out.contains("one of the checkpoints you hold"),
        "{out}"
    );
    let good: Proof =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("a proof");

    type Edit = Box<dyn Fn(&mut Proof)>;
    let flip = |h: &mut String| {
        let c = if h.starts_with('0') { "1" } else { "0" };
        h.replace_range(0..1, c);
    };
    let edits: Vec<(&str, Edit, &str)> = vec![
        (
            "the decision turned into an allow",
            Box::new(|p| {
                p.row.fields.get_mut("decision").expect("field").value = Some("allow".into());
            }),
            "row 3: its fields do not give its hash",
        ),
        (
            "a sibling of the audit path changed",
            Box::new(move |p| flip(&mut p.inclusion[0])),
            "row 3: its inclusion proof does not lead to the tree head of 6 rows",
        ),
        (
            "the signed tree head changed",
            Box::new(|p| {
                let mut cp = aegis::audit::witness::SignedCheckpoint::parse_line(&p.checkpoint)
                    .expect("parses");
                cp.root[0] ^= 1;
                p.checkpoint = cp.to_line();
            }),
            "checkpoint: not signed by a pinned key",
        ),
        (
            "the consistency proof changed",
            Box::new(move |p| {
                if let Some(c) = p.consistency.as_mut() {
                    flip(&mut c.proof[0]);
                }
            }),
            "consistency: the log of 6 rows is not shown to extend the log of 3 rows",
        ),
    ];
    let edited = base.path().join("edited.json");
    let edited_s = edited.to_string_lossy().into_owned();
    for (what, edit, expected) in edits {
        let mut p = good.clone();
        edit(&mut p);
        std::fs::write(&edited, serde_json::to_string(&p).expect("json")).expect("write");
        let (code, out) = aegis(&["audit", "verify-proof", &edited_s, "--public-key", &key]);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains(expected), "{what}: {out}");
    }
    // Pinned to another key: nothing is proven.
    let other = base.path().join("other.pub");
    let foreign = Signer::generate().expect("key");
    std::fs::write(&other, aegis::hex(foreign.verifying_key().as_bytes())).expect("write");
    let (code, out) = aegis(&[
        "audit",
        "verify-proof",
        &file_s,
        "--public-key",
        &other.to_string_lossy(),
    ]);
    assert_eq!(code, 1, "{out}");

    // The SIEM kept the tree head of 3 rows. A thief of the audit key rewrites row 2 and
    // signs everything again; a fresh proof is self-consistent, but not with what the SIEM
    // holds.
    let held_line = good.consistency.as_ref().expect("consistency").from.clone();
    rusqlite::Connection::open(base.path().join("audit.db"))
        .expect("open")
        .execute("UPDATE audit_log SET decision = 'allow' WHERE seq = 2", [])
        .expect("tamper");
    resign(&base.path().join("audit.db"), &signer);
    let (code, out) = prove("3");
    assert_eq!(code, 0, "{out}");
    let (code, out) = aegis(&["audit", "verify-proof", &file_s, "--public-key", &key]);
    assert_eq!(
        code, 0,
        "the rewritten log is consistent with itself: {out}"
    );
    let (code, out) = aegis(&[
        "audit",
        "verify-proof",
        &file_s,
        "--public-key",
        &key,
        "--witness",
        &held,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is not one of the checkpoints you hold"),
        "{out}"
    );
    let mut fresh: Proof =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("a proof");
    if let Some(c) = fresh.consistency.as_mut() {
        c.from = held_line;
    }
    std::fs::write(&edited, serde_json::to_string(&fresh).expect("json")).expect("write");
    let (code, out) = aegis(&["audit", "verify-proof", &edited_s, "--public-key", &key]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is not shown to extend the log of 3 rows"),
        "{out}"
    );

    // Asked for what does not exist: a clear error, exit 2.
    let (code, out) = aegis(&["audit", "prove", "--data-dir", &data, "--decision", "nope"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no row with decision id \"nope\""), "{out}");
}

/// A writer does not continue a log that contradicts its witness: cut (rows and their
/// checkpoints deleted together) or rewritten and signed again with the audit key.
#[tokio::test]
async fn the_writer_refuses_a_log_its_witness_contradicts() {
    let cases: [(&str, &str, bool, &str); 3] = [
        ("untouched", "SELECT 1", false, ""),
        (
            "tail cut with its checkpoints",
            "DELETE FROM audit_log WHERE seq > 4; DELETE FROM audit_checkpoint WHERE last_seq > 4",
            false,
            "the log ends at seq 4, but",
        ),
        (
            "row 3 rewritten and re-signed",
            "UPDATE audit_log SET decision = 'allow' WHERE seq = 3",
            true,
            "the log's first 6 rows are not the ones",
        ),
    ];
    for (what, sql, resign_all, expected) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = base_log(dir.path()).await;
        let db = dir.path().join("audit.db");
        rusqlite::Connection::open(&db)
            .expect("open")
            .execute_batch(sql)
            .expect("tamper");
        if resign_all {
            resign(&db, &signer);
        }
        let opts = StoreOptions {
            queue_capacity: 4,
            max_batch: 4,
            durability: Durability::Normal,
            gather: aegis::audit::store::GATHER,
            wal_restart_frames: aegis::audit::store::WAL_RESTART_FRAMES,
        };
        let key = [signer.verifying_key()];
        let witness = dir.path().join("witness.jsonl");
        let opened = AuditLog::open_with(
            &db,
            signer.clone(),
            &opts,
            Trust::keys(&key),
            None,
            Some(&witness),
        );
        match (expected.is_empty(), opened) {
            (true, Ok((log, writer))) => {
                drop(log);
                tokio::task::spawn_blocking(move || writer.join())
                    .await
                    .expect("join");
            }
            (false, Err(e)) => {
                let e = e.to_string();
                assert!(
                    e.contains("contradicts its witness") && e.contains(expected),
                    "{what}: {e}"
                );
            }
            (_, Err(e)) => panic!("{what}: {e}"),
            (_, Ok(_)) => panic!("{what}: opened a log its witness contradicts"),
        }
    }
}

/// A thief of the token key alone cannot pass for the audit key: checkpoints it signs are
/// refused, even when the verifier is told the log began under the token key.
#[tokio::test]
async fn the_token_key_cannot_sign_the_log() {
    let base = tempfile::tempdir().expect("tempdir");
    let audit = base_log(base.path()).await;
    let token = Signer::generate().expect("the token key");
    let db = base.path().join("audit.db");
    rusqlite::Connection::open(&db)
        .expect("open")
        .execute("UPDATE audit_log SET decision = 'allow' WHERE seq = 3", [])
        .expect("tamper");
    resign(&db, &token);
    let keys = [audit.verifying_key()];
    let legacy = [token.verifying_key()];
    for (what, trust) in [
        ("audit key only", Trust::keys(&keys)),
        (
            "the token key as legacy",
            Trust {
                keys: &keys,
                legacy: &legacy,
            },
        ),
    ] {
        let finding = verify_file_with(&db, trust, None)
            .expect("readable")
            .expect_err(what);
        assert_eq!(finding.kind, Tamper::BadSignature, "{what}: {finding}");
    }
    let finding = verify_file_with(
        &db,
        Trust {
            keys: &keys,
            legacy: &legacy,
        },
        None,
    )
    .expect("readable")
    .expect_err("forged");
    assert!(
        finding
            .detail
            .contains("format 2 checkpoint signed by the token-signing key"),
        "{finding}"
    );
}

/// The start-up check reads the rows, not a checkpoint row anyone can insert: a log cut,
/// run on past the witnessed size without the witness, with the witnessed values planted
/// in the checkpoint table, is still refused.
#[tokio::test]
async fn the_writer_checks_the_witnessed_rows_not_a_planted_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let signer = base_log(dir.path()).await;
    let db = dir.path().join("audit.db");
    let witness = dir.path().join("witness.jsonl");
    let seen = aegis::audit::witness::last_in_file(&witness)
        .expect("readable")
        .expect("a witnessed checkpoint");
    assert_eq!(seen.tree_size, 6);
    rusqlite::Connection::open(&db)
        .expect("open")
        .execute_batch(
            "DELETE FROM audit_log WHERE seq > 4; DELETE FROM audit_checkpoint WHERE last_seq > 4",
        )
        .expect("cut");
    let opts = StoreOptions {
        queue_capacity: 4,
        max_batch: 4,
        durability: Durability::Normal,
        gather: aegis::audit::store::GATHER,
        wal_restart_frames: aegis::audit::store::WAL_RESTART_FRAMES,
    };
    // Run on without the witness, past the witnessed size.
    let (log, writer) = AuditLog::open(&db, signer.clone(), &opts).expect("opens without it");
    for i in 0..3 {
        let record = Record {
            time_ns: aegis::unix_nanos(),
            kind: "check".into(),
            decision_id: format!("new-{i}"),
            tenant: "acme".into(),
            decision: "allow".into(),
            ..Default::default()
        };
        log.append(record).await.expect("append");
    }
    drop(log);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .expect("join");
    // The witnessed values planted in the checkpoint table, first by id.
    rusqlite::Connection::open(&db)
        .expect("open")
        .execute(
            "INSERT INTO audit_checkpoint (id, last_seq, head_hash, time_ns, key_id, signature, root) \
             VALUES (-1, ?1, ?2, ?3, ?4, zeroblob(64), ?5)",
            rusqlite::params![
                seen.tree_size as i64,
                &seen.head[..],
                seen.time_ns,
                seen.key_id,
                &seen.root[..]
            ],
        )
        .expect("plant");
    let key = [signer.verifying_key()];
    let err = match AuditLog::open_with(&db, signer, &opts, Trust::keys(&key), None, Some(&witness))
    {
        Ok(_) => panic!("continued a log its witness contradicts"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("contradicts its witness") && err.contains("first 6 rows are not the ones"),
        "{err}"
    );
}
