//! The audit log against whoever holds its disk and its key: every signed checkpoint leaves
//! the host as it is made (a witness file, and a span to the OTLP collector), and `aegis
//! audit verify --witness` finds what the log alone cannot — here a restored backup that
//! was then written on, as an operator restoring last night's copy (or an attacker rolling
//! back the log) would leave it. The store-level cases (a cut tail, a history rewritten and
//! signed again with the stolen key) are vectors in `tests/vectors/audit/`.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use aegis::audit::witness::SignedCheckpoint;
use common::*;

fn witness_lines(path: &Path) -> Vec<SignedCheckpoint> {
    std::fs::read_to_string(path)
        .expect("witness file")
        .lines()
        .map(|l| SignedCheckpoint::parse_line(l).expect("a witness line"))
        .collect()
}

fn rows(db: &Path) -> u64 {
    rusqlite::Connection::open(db)
        .expect("open")
        .query_row("SELECT count(*) FROM audit_log", [], |r| r.get::<_, i64>(0))
        .expect("count") as u64
}

fn check_rows(db: &Path) -> u64 {
    rusqlite::Connection::open(db)
        .expect("open")
        .query_row(
            "SELECT count(*) FROM audit_log WHERE kind = 'check'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .expect("count") as u64
}

fn verify(data: &Path, witness: Option<&Path>) -> (i32, String) {
    let data = data.to_string_lossy().into_owned();
    let mut args = vec!["audit", "verify", "--data-dir", &data];
    let w;
    if let Some(path) = witness {
        w = path.to_string_lossy().into_owned();
        args.extend(["--witness", &w]);
    }
    let out = aegis_cmd(&args);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_checkpoint_leaves_the_host_signed_by_the_audit_key() {
    let sink = aegis::testkit::SpanSink::start_keeping()
        .await
        .expect("sink");
    let outside = tempfile::tempdir().expect("the witness's host");
    let witness = outside.path().join("checkpoints.jsonl");
    let endpoint = format!("http://{}", sink.addr);
    let w = witness.clone();
    let mut s = start_with(move |c| {
        c.audit.witness_file = Some(w);
        c.otlp.endpoint = Some(endpoint);
    })
    .await;
    let token = s.token("acme", "bot", &["invoices:read"]);
    for _ in 0..20 {
        assert_eq!(code(&s.read_invoices(&token).await), 0);
    }
    assert!(
        eventually(Duration::from_secs(10), || sink
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1)
        .await,
        "a checkpoint span reached the collector"
    );
    let admin = s.running.as_ref().expect("running").admin_addr;
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("aegis_audit_witness_failures_total 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("aegis_audit_witness_published_total 0\n"),
        "{metrics}"
    );
    let data = s.data_dir();
    s.stop().await;

    let audit_key = audit_key(&data);
    let token_key = s.signer.verifying_key();
    let lines = witness_lines(&witness);
    let total = rows(&data.join("audit.db"));
    assert_eq!(check_rows(&data.join("audit.db")), 20, "one row per Check");
    let sizes: Vec<u64> = lines.iter().map(|c| c.tree_size).collect();
    assert!(
        sizes.windows(2).all(|w| w[0] < w[1]),
        "sizes only grow: {sizes:?}"
    );
    assert_eq!(sizes.last(), Some(&total), "the last commit was published");
    for cp in &lines {
        assert!(cp.signed_by(&[audit_key]), "signed by audit.pub: {cp:?}");
        assert!(
            !cp.signed_by(&[token_key]),
            "the token key signs no checkpoint"
        );
    }
    // The collector got the same signed lines.
    for span in sink.received_checkpoint_spans() {
        let line = span
            .attributes
            .iter()
            .find(|kv| kv.key == "aegis.audit.checkpoint")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                    Some(s.clone())
                }
                _ => None,
            })
            .expect("the checkpoint line on the span");
        let cp = SignedCheckpoint::parse_line(&line).expect("parses");
        assert!(cp.signed_by(&[audit_key]));
        assert!(
            lines.contains(&cp),
            "the span carries a witnessed checkpoint"
        );
    }
    let (code, out) = verify(&data, Some(&witness));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "contains and extends all {} witnessed checkpoints",
            lines.len()
        )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_written_on_is_found_only_with_the_witness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");
    let witness = dir.path().join("witness.jsonl");
    let serve = |n: usize| {
        let (data, witness) = (data.clone(), witness.clone());
        async move {
            let mut s = start_with(move |c| {
                c.data_dir = data;
                c.audit.witness_file = Some(witness);
            })
            .await;
            let token = s.token("acme", "bot", &["invoices:read"]);
            for _ in 0..n {
                assert_eq!(code(&s.read_invoices(&token).await), 0);
            }
            s.stop().await;
        }
    };
    let db = data.join("audit.db");
    serve(5).await;
    let backed_up = rows(&db);
    // Last night's backup: the data directory, stopped.
    copy_dir(&data, &backup);
    serve(10).await; // witnessed
    let lost = rows(&db);
    // The backup is restored (the rows after it are gone): Aegis refuses to continue a
    // log its witness saw longer, naming both.
    std::fs::remove_dir_all(&data).expect("remove");
    copy_dir(&backup, &data);
    let mut c = config(dir.path());
    c.data_dir = data.clone();
    c.audit.witness_file = Some(witness.clone());
    let Err(err) = aegis::server::start(c).await else {
        panic!("a log behind its witness must not be continued");
    };
    let err = err.to_string();
    assert!(
        err.contains("audit log contradicts its witness")
            && err.contains(&format!("the log ends at seq {backed_up}"))
            && err.contains(&format!("saw {lost} rows")),
        "{err}"
    );
    // The operator moves the witness aside (keeping it) and runs on from the backup.
    let kept = dir.path().join("witness-before-restore.jsonl");
    std::fs::rename(&witness, &kept).expect("move aside");
    serve(3).await;
    let witness = kept;
    assert!(rows(&db) > backed_up && rows(&db) < lost);

    // The log alone is consistent: nothing in it says the lost rows ever existed.
    let (code, out) = verify(&data, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no witness given"), "{out}");
    // The witness saw them.
    let (code, out) = verify(&data, Some(&witness));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("BROKEN at row {}: modified", backed_up + 1))
            && out.contains("not the rows the witness saw"),
        "{out}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}
