//! Evidence bundles: `aegis audit export` of one tenant from a real two-tenant audit log
//! and control database, checked by `aegis audit verify-bundle` (the real binary); every
//! tampering is refused with a message naming it, redacted and foreign values appear
//! nowhere in the file, and a log written before per-field salts still verifies.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aegis::audit::Record;
use aegis::audit::bundle::Bundle;
use aegis::audit::store::{AuditLog, Durability, StoreOptions};
use aegis::control::pb;
use aegis::control::records::Approval;
use aegis::control::rules;
use aegis::control::sqlite::SqliteStore;
use aegis::control::store::ControlStore;
use aegis::keys::Signer;

const ACME_SECRET: &str = "/vault/acme/payroll-2026.xlsx";
const ACME_IBAN: &str = "DE89370400440532013000";
const GLOBEX_AGENT: &str = "globex-scraper-7";
const GLOBEX_RESOURCE: &str = "/globex/secret/merger-plan.pdf";
const INCIDENT: &str = "INC-0000feedbeef";

fn opts() -> StoreOptions {
    StoreOptions {
        queue_capacity: 16,
        max_batch: 16,
        durability: Durability::Normal,
        gather: aegis::audit::store::GATHER,
        wal_restart_frames: aegis::audit::store::WAL_RESTART_FRAMES,
    }
}

fn row(tenant: &str, agent: &str, i: usize, decision: &str, resource: &str) -> Record {
    Record {
        time_ns: aegis::unix_nanos(),
        kind: "check".into(),
        decision_id: format!("{tenant}-d{i}"),
        tenant: tenant.into(),
        agent: agent.into(),
        session: format!("sess-{agent}"),
        tool: "files".into(),
        action: "read".into(),
        resource: resource.into(),
        decision: decision.into(),
        reason: format!("rule-{i}"),
        http_status: if decision == "allow" { 200 } else { 403 },
        policy_revision: "default-1".into(),
        ..Default::default()
    }
}

/// Appends `records`, each in its own commit (so each has its own checkpoint).
async fn append(data: &Path, signer: &Signer, records: Vec<Record>) {
    let (log, writer) =
        AuditLog::open(&data.join("audit.db"), signer.clone(), &opts()).expect("open");
    for r in records {
        log.append(r).await.expect("append");
    }
    drop(log);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .expect("join");
}

/// A data directory with interleaved acme and globex rows (seq 1..=8), a control row
/// naming the acme incident, and in control.db: an incident, an approval and a policy
/// revision for each side.
async fn two_tenants() -> (tempfile::TempDir, PathBuf, Signer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let signer = Signer::load_or_create_audit(&data).expect("key");
    let mut deny_with_secret = row("acme", "billing-bot", 3, "deny", ACME_SECRET);
    deny_with_secret.reason = format!("denied: {ACME_SECRET} is restricted");
    let records = vec![
        row("acme", "billing-bot", 1, "allow", ACME_SECRET),
        row("globex", GLOBEX_AGENT, 1, "allow", GLOBEX_RESOURCE),
        row("acme", "billing-bot", 2, "deny", ACME_SECRET),
        row("globex", GLOBEX_AGENT, 2, "deny", GLOBEX_RESOURCE),
        deny_with_secret,
        Record {
            time_ns: aegis::unix_nanos(),
            kind: "control".into(),
            decision_id: "ctl-1".into(),
            tenant: "acme".into(),
            agent: "billing-bot".into(),
            action: "incident.acknowledge".into(),
            decision: "ok".into(),
            reason: format!("incident {INCIDENT} acknowledged"),
            actor: "operator:alice".into(),
            ..Default::default()
        },
        row("acme", "report-bot", 4, "allow", "/reports/q1"),
        row("globex", GLOBEX_AGENT, 3, "allow", GLOBEX_RESOURCE),
    ];
    append(&data, &signer, records).await;

    let store: std::sync::Arc<dyn ControlStore> =
        std::sync::Arc::new(SqliteStore::open(&data.join("control.db")).expect("control.db"));
    let now = aegis::unix_nanos();
    let incident = |id: &str, tenant: &str, agent: &str, summary: &str, evidence: &[&str]| {
        aegis::control::wire::incident_record(pb::Incident {
            id: id.into(),
            tenant: tenant.into(),
            agent: agent.into(),
            kind: "deny_storm".into(),
            severity: "high".into(),
            summary: summary.into(),
            evidence: evidence.iter().map(|s| (*s).to_owned()).collect(),
            trigger_decision: evidence.last().map(|s| (*s).to_owned()).unwrap_or_default(),
            decided_at_ns: now,
            status: "open".into(),
            created_at_ns: now,
            updated_at: now / 1_000_000_000,
            reported_by: "sidecar:a".into(),
            ..Default::default()
        })
        .expect("an incident record")
    };
    let i = incident(
        INCIDENT,
        "acme",
        "billing-bot",
        &format!("two denials reading {ACME_SECRET}"),
        &["acme-d2", "acme-d3"],
    );
    store
        .run(move |tx| rules::insert_incident(tx, &i, &[]))
        .await
        .expect("incident");
    let i = incident(
        "INC-00000000globex",
        "globex",
        GLOBEX_AGENT,
        &format!("denials reading {GLOBEX_RESOURCE}"),
        &["globex-d2"],
    );
    store
        .run(move |tx| rules::insert_incident(tx, &i, &[]))
        .await
        .expect("incident");
    let approval = |id: &str, tenant: &str, agent: &str, resource: &str, args: &str| Approval {
        id: id.into(),
        tenant: tenant.into(),
        agent: agent.into(),
        tool: "payments".into(),
        action: "create".into(),
        resource: resource.into(),
        arguments: args.into(),
        call_hash: format!("hash-of-{id}"),
        decision_id: format!("{tenant}-d9"),
        created_at: now / 1_000_000_000,
        expires_at: now / 1_000_000_000 + 600,
        ..Default::default()
    };
    let a = approval(
        "apr-acme",
        "acme",
        "billing-bot",
        ACME_SECRET,
        &format!(r#"{{"iban":"{ACME_IBAN}"}}"#),
    );
    let at = now / 1_000_000_000;
    store
        .run(move |tx| rules::request_approval(tx, &a, 10, true, at))
        .await
        .expect("approval");
    let a = approval("apr-globex", "globex", GLOBEX_AGENT, GLOBEX_RESOURCE, "{}");
    let at = now / 1_000_000_000;
    store
        .run(move |tx| rules::request_approval(tx, &a, 10, true, at))
        .await
        .expect("approval");
    drop(store);
    (dir, data, signer)
}

fn aegis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(args)
        .output()
        .expect("runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn export(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "audit",
        "export",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "-o",
        out.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    aegis(&args)
}

fn verify(file: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["audit", "verify-bundle", file.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    aegis(&args)
}

/// `verify-bundle` pinned to the data directory's audit key (its token key for a data
/// directory from before the audit key), as an auditor who holds it runs it.
fn verify_pinned(file: &Path, data: &Path) -> Output {
    let key = Some(data.join("audit.pub"))
        .filter(|k| k.exists())
        .unwrap_or_else(|| data.join("signing.pub"));
    verify(file, &["--public-key", key.to_str().expect("utf-8")])
}

fn unhex32(h: &str) -> [u8; 32] {
    aegis::unhex(h)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .expect("64 hex digits")
}

fn load(file: &Path) -> Bundle {
    serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("a bundle")
}

fn save(file: &Path, b: &Bundle) {
    std::fs::write(file, serde_json::to_vec_pretty(b).expect("json")).expect("write");
}

#[tokio::test]
async fn one_tenants_bundle_verifies_and_reveals_nothing_else() {
    let (dir, data, _) = two_tenants().await;
    let file = dir.path().join("acme.json");
    let out = export(
        &data,
        &file,
        &["--tenant", "acme", "--redact", "resource,arguments"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Without a key to pin it to, an intact bundle is still not trusted: anyone could
    // have made it with a key of their own. Accepting that takes saying so.
    let out = verify(&file, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("bundle intact"), "{said}");
    assert!(said.contains("signer NOT pinned"), "{said}");
    let out = verify(&file, &["--allow-unpinned"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("not pinned (accepted with --allow-unpinned)"),
        "{}",
        text(&out)
    );
    let pub_key = data.join("audit.pub");
    let out = verify(&file, &["--public-key", pub_key.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("signer pinned"), "{}", text(&out));

    let raw = std::fs::read_to_string(&file).expect("read");
    for absent in [
        "globex",
        GLOBEX_AGENT,
        GLOBEX_RESOURCE,
        ACME_SECRET,
        ACME_IBAN,
        "hash-of-apr-acme",
    ] {
        assert!(!raw.contains(absent), "{absent:?} leaked into the bundle");
    }
    for present in ["billing-bot", "report-bot", INCIDENT, "apr-acme", "rule-1"] {
        assert!(raw.contains(present), "{present:?} missing from the bundle");
    }

    let b = load(&file);
    assert_eq!(b.schema, "aegis-evidence-bundle/2");
    let signer = Signer::load_audit(&data).expect("the data directory's audit key");
    assert_eq!(
        b.signature.key_id,
        signer.kid(),
        "signed by the exporter's key"
    );
    assert_eq!(b.redaction, vec!["arguments", "resource"]);
    // Rows 1..=7 (the last acme row is 7); 2 and 4 are globex's, commitments only.
    let seqs: Vec<(u64, bool)> = b.rows.iter().map(|r| (r.seq, r.selected)).collect();
    assert_eq!(
        seqs,
        vec![
            (1, true),
            (2, false),
            (3, true),
            (4, false),
            (5, true),
            (6, true),
            (7, true)
        ]
    );
    assert!(
        b.rows[1].fields.values().all(|f| f.value.is_none()),
        "{:?}",
        b.rows[1]
    );
    // The row whose reason quotes the redacted resource has its reason redacted too.
    assert!(b.rows[4].fields["reason"].value.is_none());
    assert_eq!(b.rows[4].text("decision"), Some("deny"));
    assert_eq!(b.counts.rows_selected, 5);
    assert_eq!(b.counts.rows_included, 7);
    assert_eq!(b.counts.by_decision.get("deny"), Some(&2));
    assert_eq!(b.counts.by_kind.get("control"), Some(&1));
    assert_eq!((b.incidents.len(), b.approvals.len()), (1, 1));
    assert!(
        b.incidents[0].redacted.contains(&"summary".to_owned()),
        "{:?}",
        b.incidents[0]
    );
    assert!(b.approvals[0].redacted.contains(&"arguments".to_owned()));
}

#[tokio::test]
async fn tampered_bundles_are_refused_naming_the_problem() {
    let (dir, data, _) = two_tenants().await;
    let file = dir.path().join("acme.json");
    let out = export(&data, &file, &["--tenant", "acme", "--redact", "resource"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let good = load(&file);
    let foreign = Signer::generate().expect("key");
    let foreign_hex = aegis::hex(foreign.verifying_key().as_bytes());

    type Tamper = Box<dyn Fn(&mut Bundle)>;
    // (what, the change, recompute bundle_hash afterwards, what the verifier must say)
    let cases: Vec<(&str, Tamper, bool, &str)> = vec![
        (
            "a disclosed value changed",
            Box::new(|b| {
                b.rows[0].fields.get_mut("decision").expect("field").value = Some("deny".into());
            }),
            true,
            "row 1: hash does not match its fields",
        ),
        (
            "another tenant's commitment changed",
            Box::new(|b| {
                b.rows[1].fields.get_mut("agent").expect("field").commitment =
                    Some("00".repeat(32));
            }),
            true,
            "row 2: hash does not match its fields",
        ),
        (
            "a row dropped",
            Box::new(|b| {
                b.rows.remove(1);
            }),
            true,
            "row 3 follows row 1: rows 2..=2 are missing",
        ),
        (
            "counts changed",
            Box::new(|b| b.counts.rows_selected += 1),
            true,
            "counts: rows_selected says 6 but the bundle holds 5",
        ),
        (
            "schema version changed",
            Box::new(|b| b.schema = "aegis-evidence-bundle/1".into()),
            true,
            "schema",
        ),
        (
            "bundle_hash altered",
            Box::new(|b| b.bundle_hash = "ab".repeat(32)),
            false,
            "bundle_hash does not match",
        ),
        (
            "contents changed without a new bundle_hash",
            Box::new(|b| b.counts.approvals = 7),
            false,
            "bundle_hash does not match",
        ),
        (
            "key swapped, key id kept",
            Box::new({
                let k = foreign_hex.clone();
                move |b| b.keys[0].public_key = k.clone()
            }),
            true,
            "the key id does not match its public key",
        ),
        (
            "key swapped with its id",
            Box::new({
                let (k, id) = (foreign_hex.clone(), foreign.kid().to_owned());
                move |b| {
                    b.keys[0].public_key = k.clone();
                    b.keys[0].key_id = id.clone();
                    for cp in &mut b.checkpoints {
                        cp.key_id = id.clone();
                    }
                }
            }),
            true,
            "signature does not verify",
        ),
        (
            "the covering checkpoint removed",
            Box::new(|b| {
                b.checkpoints.pop();
                b.counts.checkpoints -= 1;
            }),
            true,
            "row 7: the last row is not covered by a signed checkpoint",
        ),
        (
            "a redacted field given a value",
            Box::new(|b| {
                let f = b.rows[0].fields.get_mut("resource").expect("field");
                f.commitment = None;
                f.value = Some("/public/readme".into());
                f.salt = Some("00".repeat(32));
            }),
            true,
            "row 1: field resource is redacted by the bundle's policy but discloses a value",
        ),
        (
            "another tenant's row marked selected",
            Box::new(|b| b.rows[1].selected = true),
            true,
            "row 2: selected, but its tenant is not disclosed",
        ),
        (
            "a selected row marked unselected",
            Box::new(|b| b.rows[0].selected = false),
            true,
            "row 1: not selected, yet discloses",
        ),
        (
            "an approval moved to another tenant",
            Box::new(|b| {
                b.approvals[0]
                    .fields
                    .insert("tenant".into(), "globex".into());
            }),
            true,
            "approvals \"apr-acme\": belongs to tenant \"globex\"",
        ),
    ];
    for (what, tamper, reseal, expected) in cases {
        let mut b = good.clone();
        tamper(&mut b);
        if reseal {
            b.seal();
        }
        let bad = dir.path().join("bad.json");
        save(&bad, &b);
        let out = verify(&bad, &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {said}");
        assert!(
            said.contains(expected),
            "{what}: expected {expected:?} in:\n{said}"
        );
    }

    // What the exporter's signature adds: the records beside the rows (incidents,
    // approvals, policy revisions) edited and the bundle re-sealed, or re-signed with a
    // key of the forger's own, are refused; only the checkpoint-signed rows were proven
    // before.
    let pinned = data.join("audit.pub");
    let pinned = ["--public-key", pinned.to_str().expect("utf-8")];
    let forgeries: Vec<(&str, Tamper)> = vec![
        (
            "an incident's severity lowered",
            Box::new(|b| {
                b.incidents[0]
                    .fields
                    .insert("severity".into(), "low".into());
            }),
        ),
        (
            "the approver replaced",
            Box::new(|b| {
                b.approvals[0]
                    .fields
                    .insert("decided_by".into(), "approver:mallory".into());
            }),
        ),
        (
            "a fake approval added",
            Box::new(|b| {
                let mut fake = b.approvals[0].clone();
                fake.fields.insert("id".into(), "apr-fake".into());
                b.approvals.push(fake);
                b.counts.approvals += 1;
            }),
        ),
    ];
    for (what, forge) in forgeries {
        let mut b = good.clone();
        forge(&mut b);
        b.seal();
        let bad = dir.path().join("forged.json");
        save(&bad, &b);
        let out = verify(&bad, &pinned);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
        assert!(
            text(&out).contains("signature: the bundle is not signed"),
            "{what}: {}",
            text(&out)
        );
        // Re-signed by the forger: the signature holds, but not with a trusted key.
        b.keys.push(aegis::audit::bundle::BundleKey {
            key_id: foreign.kid().to_owned(),
            public_key: foreign_hex.clone(),
        });
        b.sign(&foreign);
        save(&bad, &b);
        let out = verify(&bad, &pinned);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
        assert!(
            text(&out).contains(&format!(
                "signature: signed by key {}, which is not among the trusted keys",
                foreign.kid()
            )),
            "{what}: {}",
            text(&out)
        );
        // ... and without --public-key it is not accepted either.
        let out = verify(&bad, &[]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
        assert!(
            text(&out).contains("signer NOT pinned"),
            "{what}: {}",
            text(&out)
        );
    }

    // One decision checked alone, as a SIEM would: its row's hash, its audit path and the
    // tree head the last checkpoint signs; none of the bundle's other rows.
    let last = good
        .checkpoints
        .iter()
        .max_by_key(|c| c.last_seq)
        .expect("a checkpoint");
    let root = unhex32(last.root.as_deref().expect("a signed tree head"));
    let selected: Vec<_> = good.rows.iter().filter(|r| r.selected).collect();
    assert!(!selected.is_empty());
    for row in &selected {
        let path: Vec<[u8; 32]> = row
            .inclusion
            .as_ref()
            .expect("every selected row has its inclusion proof")
            .iter()
            .map(|h| unhex32(h))
            .collect();
        let leaf = aegis::audit::proof::leaf_hash(&unhex32(&row.hash));
        assert!(
            aegis::audit::proof::verify_inclusion(row.seq - 1, last.last_seq, &leaf, &path, &root),
            "row {}",
            row.seq
        );
    }
    // A proof edited, the bundle re-sealed and re-signed with the exporter's own key:
    // the signature holds, the proof does not.
    let signer = Signer::load_audit(&data).expect("the exporter's key");
    let mut b = good.clone();
    let row = b
        .rows
        .iter_mut()
        .find(|r| r.inclusion.as_ref().is_some_and(|p| !p.is_empty()))
        .expect("a row with a non-empty proof");
    let seq = row.seq;
    if let Some(path) = row.inclusion.as_mut() {
        path[0] = "00".repeat(32);
    }
    b.sign(&signer);
    let bad = dir.path().join("forged-proof.json");
    save(&bad, &b);
    let out = verify(&bad, &pinned);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("row {seq}: its inclusion proof does not lead")),
        "{}",
        text(&out)
    );

    // Self-consistent, but not signed by the key the auditor trusts.
    let other_pub = dir.path().join("other.pub");
    std::fs::write(&other_pub, &foreign_hex).expect("write");
    let out = verify(&file, &["--public-key", other_pub.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not among the trusted keys"),
        "{}",
        text(&out)
    );

    // Unreadable is a usage error, not a bad bundle.
    let out = verify(&dir.path().join("missing.json"), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "not json").expect("write");
    let out = verify(&junk, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[tokio::test]
async fn an_incident_bundle_holds_its_evidence_and_the_actions_naming_it() {
    let (dir, data, _) = two_tenants().await;
    let file = dir.path().join("inc.json");
    let out = export(&data, &file, &["--tenant", "acme", "--incident", INCIDENT]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = verify_pinned(&file, &data);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let b = load(&file);
    let selected: Vec<u64> = b
        .rows
        .iter()
        .filter(|r| r.selected)
        .map(|r| r.seq)
        .collect();
    // acme-d2 (3), acme-d3 (5) and the control row naming the incident (6).
    assert_eq!(selected, vec![3, 5, 6]);
    assert_eq!(b.incidents.len(), 1);
    assert_eq!(b.filters.incident.as_deref(), Some(INCIDENT));

    // In a fleet the incidents are in the control plane's database, not the sidecar's.
    let elsewhere = dir.path().join("control-plane.db");
    rusqlite::Connection::open(data.join("control.db"))
        .expect("open")
        .execute("VACUUM INTO ?1", [elsewhere.to_str().expect("utf-8")])
        .expect("copy");
    std::fs::remove_file(data.join("control.db")).expect("remove");
    let out = export(&data, &file, &["--tenant", "acme", "--incident", INCIDENT]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--control-db"), "{}", text(&out));
    let control_db = elsewhere.to_str().expect("utf-8");
    let args = [
        "--tenant",
        "acme",
        "--incident",
        INCIDENT,
        "--control-db",
        control_db,
    ];
    let out = export(&data, &file, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let again = load(&file);
    let seqs: Vec<u64> = again
        .rows
        .iter()
        .filter(|r| r.selected)
        .map(|r| r.seq)
        .collect();
    assert_eq!((seqs, again.incidents.len()), (vec![3, 5, 6], 1));
    std::fs::rename(&elsewhere, data.join("control.db")).expect("restore");

    // Another tenant's incident is not found for acme.
    let out = export(
        &data,
        &file,
        &["--tenant", "acme", "--incident", "INC-00000000globex"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no such incident"), "{}", text(&out));
    // A tenant is required; a protected field cannot be redacted.
    let out = export(&data, &file, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = export(&data, &file, &["--tenant", "acme", "--redact", "tenant"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("cannot be redacted"), "{}", text(&out));
}

#[tokio::test]
async fn filters_select_rows_incidents_and_approvals() {
    let (dir, data, _) = two_tenants().await;
    let file = dir.path().join("f.json");
    let selected = |b: &Bundle| -> Vec<u64> {
        b.rows
            .iter()
            .filter(|r| r.selected)
            .map(|r| r.seq)
            .collect()
    };

    let out = export(&data, &file, &["--tenant", "acme", "--kind", "control"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(selected(&load(&file)), vec![6]);

    let out = export(&data, &file, &["--tenant", "acme", "--agent", "report-bot"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let b = load(&file);
    assert_eq!(selected(&b), vec![7]);
    // billing-bot's incident and approval are not report-bot's.
    assert_eq!((b.incidents.len(), b.approvals.len()), (0, 0));

    // A window that ends before anything was written selects nothing: refused, not empty.
    let out = export(
        &data,
        &file,
        &["--tenant", "acme", "--until", "2001-01-01T00:00:00Z"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no audit rows"), "{}", text(&out));
    let out = export(
        &data,
        &file,
        &["--tenant", "acme", "--since", "next tuesday"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("RFC 3339"), "{}", text(&out));

    // The acme incident is high: kept at --min-severity high, left out at critical.
    let out = export(
        &data,
        &file,
        &["--tenant", "acme", "--min-severity", "high"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(load(&file).incidents.len(), 1);
    let out = export(
        &data,
        &file,
        &["--tenant", "acme", "--min-severity", "critical"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let b = load(&file);
    assert_eq!((b.incidents.len(), b.counts.incidents), (0, 0));
    assert_eq!(b.filters.min_severity.as_deref(), Some("critical"));
    assert_eq!(verify_pinned(&file, &data).status.code(), Some(0));

    // An admin's bundle of every tenant discloses both.
    let out = export(&data, &file, &["--tenant", "*"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let b = load(&file);
    assert_eq!(selected(&b), (1..=8).collect::<Vec<u64>>());
    assert_eq!((b.incidents.len(), b.approvals.len()), (2, 2));
    assert_eq!(verify_pinned(&file, &data).status.code(), Some(0));
}

/// The audit_log schema before per-field salts, and rows written the old way.
fn write_v1_log(data: &Path, signer: &Signer, records: &[Record]) {
    let conn = rusqlite::Connection::open(data.join("audit.db")).expect("open");
    conn.execute_batch(
        "CREATE TABLE audit_log (seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL,
            http_status INTEGER NOT NULL, kind TEXT NOT NULL, decision_id TEXT NOT NULL,
            tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
            run_id TEXT NOT NULL, tool TEXT NOT NULL, action TEXT NOT NULL,
            resource TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
            policy_revision TEXT NOT NULL, trust_level TEXT NOT NULL,
            approval_id TEXT NOT NULL, actor TEXT NOT NULL, trace_id TEXT NOT NULL,
            span_id TEXT NOT NULL, key_id TEXT NOT NULL, prev_hash BLOB NOT NULL,
            hash BLOB NOT NULL);
         CREATE TABLE audit_checkpoint (id INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,
            head_hash BLOB NOT NULL, time_ns INTEGER NOT NULL, key_id TEXT NOT NULL,
            signature BLOB NOT NULL);",
    )
    .expect("v1 schema");
    let kid = signer.kid().to_owned();
    let mut prev = aegis::audit::GENESIS;
    for (i, r) in records.iter().enumerate() {
        let seq = i as u64 + 1;
        let hash = aegis::audit::row_hash(seq, r, &kid, &prev);
        conn.execute(
            "INSERT INTO audit_log VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
             ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            rusqlite::params![
                seq as i64,
                r.time_ns,
                r.http_status,
                r.kind,
                r.decision_id,
                r.tenant,
                r.agent,
                r.session,
                r.run_id,
                r.tool,
                r.action,
                r.resource,
                r.decision,
                r.reason,
                r.policy_revision,
                r.trust_level,
                r.approval_id,
                r.actor,
                r.trace_id,
                r.span_id,
                kid,
                &prev[..],
                &hash[..]
            ],
        )
        .expect("v1 row");
        let sig = signer.sign(&aegis::audit::checkpoint_message(
            seq, &hash, r.time_ns, &kid,
        ));
        conn.execute(
            "INSERT INTO audit_checkpoint (last_seq, head_hash, time_ns, key_id, signature) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![seq as i64, &hash[..], r.time_ns, kid, &sig[..]],
        )
        .expect("v1 checkpoint");
        prev = hash;
    }
}

#[tokio::test]
async fn a_log_from_before_salts_still_verifies_and_is_never_partially_disclosed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let signer = Signer::load_or_create(&data).expect("key");
    write_v1_log(
        &data,
        &signer,
        &[
            row("acme", "billing-bot", 1, "allow", ACME_SECRET),
            row("globex", GLOBEX_AGENT, 1, "deny", GLOBEX_RESOURCE),
            row("acme", "billing-bot", 2, "allow", ACME_SECRET),
        ],
    );
    let d = data.to_str().expect("utf-8");
    let out = aegis(&["audit", "verify", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A whole second later, so that `--since <this second>` excludes the old rows.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let since = aegis::unix_nanos();
    // The writer upgrades the schema and continues the chain with salted rows.
    append(
        &data,
        &signer,
        vec![
            row("acme", "billing-bot", 3, "deny", ACME_SECRET),
            row("globex", GLOBEX_AGENT, 2, "deny", GLOBEX_RESOURCE),
            row("acme", "billing-bot", 4, "allow", ACME_SECRET),
        ],
    )
    .await;
    let out = aegis(&["audit", "verify", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("intact: 6 rows"), "{}", text(&out));
    let salts: Vec<bool> = {
        let conn = rusqlite::Connection::open(data.join("audit.db")).expect("open");
        let mut stmt = conn
            .prepare("SELECT salt IS NOT NULL FROM audit_log ORDER BY seq")
            .expect("salt column");
        stmt.query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    assert_eq!(salts, vec![false, false, false, true, true, true]);

    // This log's one key is the data directory's token key (it wrote the format 2 rows
    // above through the writer directly): the export is told to sign with it.
    let key = data.join("signing.key");
    let key = key.to_str().expect("utf-8");
    // Old rows of another tenant in the range: refused, naming the rows.
    let file = dir.path().join("acme.json");
    let out = export(&data, &file, &["--audit-key", key, "--tenant", "acme"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("rows 1..=3") && text(&out).contains("format 1"),
        "{}",
        text(&out)
    );
    // Old rows, all selected (every tenant), without redaction: exported whole.
    let out = export(&data, &file, &["--audit-key", key, "--tenant", "*"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(verify_pinned(&file, &data).status.code(), Some(0));
    assert_eq!(load(&file).rows[0].format, 1);
    // ... but not redacted.
    let out = export(
        &data,
        &file,
        &["--audit-key", key, "--tenant", "*", "--redact", "resource"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("cannot be redacted"), "{}", text(&out));
    // From the salted rows on, a redacted single-tenant bundle is fine.
    let since = format!("{}", since / 1_000_000_000);
    let out = export(
        &data,
        &file,
        &[
            "--audit-key",
            key,
            "--tenant",
            "acme",
            "--since",
            &since,
            "--redact",
            "resource",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = verify_pinned(&file, &data);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let raw = std::fs::read_to_string(&file).expect("read");
    assert!(!raw.contains(ACME_SECRET) && !raw.contains(GLOBEX_AGENT));
}
