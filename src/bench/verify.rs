//! `aegis bench --verify-rows N`: the cost of `aegis audit verify` on a large log.
//!
//! Writes `N` rows through the real writer (group commits, signed format 2 checkpoints,
//! every checkpoint published to a witness file), then verifies the log in this process
//! and reports rows per second and the process's peak resident memory during the verify
//! (the kernel's high-water mark, reset just before it through `/proc/self/clear_refs`),
//! beside the resident memory before it.

use std::time::Instant;

use crate::audit::Record;
use crate::audit::store::{AuditLog, Durability, StoreOptions};
use crate::audit::verify::{Trust, verify_file_with};
use crate::audit::witness::{FileSink, Publisher};
use crate::keys::Signer;

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub async fn run(rows: u64, keep: Option<&std::path::Path>) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new()
        .prefix("aegis-verify-bench-")
        .tempdir()?;
    let dir = match keep {
        Some(d) => {
            std::fs::create_dir(d)?;
            d.to_path_buf()
        }
        None => temp.path().to_path_buf(),
    };
    let db = dir.join("audit.db");
    let witness = dir.join("witness.jsonl");
    // Kept as the data directory's audit key, so `aegis audit verify --data-dir` can run.
    let signer = Signer::load_or_create_audit(&dir)?;
    let key = [signer.verifying_key()];
    let publisher = Publisher::start(
        vec![Box::new(FileSink::open(&witness)?)],
        crate::audit::witness::DEFAULT_INTERVAL,
    )?;
    let opts = StoreOptions {
        queue_capacity: 65_536,
        max_batch: 512,
        durability: Durability::Normal,
        gather: crate::audit::store::GATHER,
        wal_restart_frames: crate::audit::store::WAL_RESTART_FRAMES,
    };
    let (log, writer) =
        AuditLog::open_with(&db, signer, &opts, Trust::keys(&key), Some(publisher), None)?;
    let started = Instant::now();
    let workers = 256u64;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let log = log.clone();
        let n = rows / workers + u64::from(w < rows % workers);
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                let record = Record {
                    time_ns: crate::unix_nanos(),
                    http_status: 200,
                    kind: "check".into(),
                    decision_id: format!("d-{w}-{i}"),
                    tenant: "acme".into(),
                    agent: format!("agent-{}", i % 50),
                    session: format!("s-{w}"),
                    tool: "invoices".into(),
                    action: "read".into(),
                    resource: format!("/invoices/{i}"),
                    decision: "allow".into(),
                    reason: "ok".into(),
                    policy_revision: "default-2026.12.1".into(),
                    trust_level: "unspecified".into(),
                    ..Record::default()
                };
                log.append(record).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    drop(log);
    tokio::task::spawn_blocking(move || writer.join()).await?;
    let written = started.elapsed();
    let db_bytes = std::fs::metadata(&db)?.len();
    let witness_lines = std::fs::read_to_string(&witness)?.lines().count();
    println!(
        "wrote {rows} rows in {:.1} s ({:.0} rows/s), {witness_lines} checkpoints, audit.db {:.0} MiB",
        written.as_secs_f64(),
        rows as f64 / written.as_secs_f64(),
        db_bytes as f64 / 1048576.0
    );

    for (label, w) in [("alone", None), ("with --witness", Some(witness.as_path()))] {
        // Reset the high-water mark so that it measures the verify alone.
        std::fs::write("/proc/self/clear_refs", "5")?;
        let (before, _) = memory_kib();
        let started = Instant::now();
        let db = db.clone();
        let w = w.map(std::path::Path::to_path_buf);
        let verdict = tokio::task::spawn_blocking(move || {
            verify_file_with(&db, Trust::keys(&key), w.as_deref())
        })
        .await??;
        let took = started.elapsed();
        let (_, peak) = memory_kib();
        let summary = verdict.map_err(|f| anyhow::anyhow!("the log does not verify: {f}"))?;
        println!(
            "verify {label}: {} rows, {} checkpoints, {} witnessed in {:.1} s = {:.0} rows/s; \
             RSS before {:.1} MiB, peak during verify {:.1} MiB",
            summary.rows,
            summary.checkpoints,
            summary.witnessed,
            took.as_secs_f64(),
            summary.rows as f64 / took.as_secs_f64(),
            before as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    Ok(())
}
