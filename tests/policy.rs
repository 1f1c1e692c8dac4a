//! Policy bundles: hot reload (file watch and SIGHUP), broken bundles, archives,
//! OPA-Envoy-style policies, the evaluation time limit, and the policy CLI.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A bundle directory holding `files` (path, contents) under a fresh temp dir.
fn bundle(files: &[(&str, &str)]) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = tmp.path().join("bundle");
    for (path, text) in files {
        let p = b.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
    (tmp, b)
}

fn set_revision(dir: &Path, rev: &str) {
    std::fs::write(
        dir.join(".manifest"),
        format!("{{\"revision\": \"{rev}\", \"roots\": [\"aegis\"]}}"),
    )
    .expect("manifest");
}

/// Rewrites the scope `invoices.read` requires.
fn set_read_scope(dir: &Path, scope: &str) {
    let path = dir.join("aegis/data.json");
    let mut data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    data["tools"]["invoices"]["actions"]["read"]["scope"] = serde_json::json!(scope);
    std::fs::write(&path, data.to_string()).expect("write");
}

#[tokio::test]
async fn file_change_reloads_and_a_broken_bundle_keeps_the_last_good_one() {
    let bundle = tempfile::tempdir().expect("tempdir");
    copy_default_bundle(bundle.path());
    set_revision(bundle.path(), "v1");
    let dir = bundle.path().to_path_buf();
    let mut s = start_with(|c| c.policy.bundle = Some(dir.clone())).await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let r = s.read_invoices(&t).await;
    assert_eq!((code(&r), policy_version(&r)), (0, "v1".to_owned()));

    set_read_scope(bundle.path(), "invoices:admin");
    set_revision(bundle.path(), "v2");
    let mut reloaded = false;
    for _ in 0..100 {
        let r = s.read_invoices(&t).await;
        if policy_version(&r) == "v2" {
            assert_eq!(reason(&r), Some("missing_scope"));
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the changed bundle is served within 5 s");

    // A broken module: refused, v2 keeps serving.
    std::fs::write(
        bundle.path().join("aegis/broken.rego"),
        "package aegis.authz\nimport rego.v1\nx := if {\n",
    )
    .expect("write");
    set_revision(bundle.path(), "v3-broken");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = s.read_invoices(&t).await;
    assert_eq!(
        policy_version(&r),
        "v2",
        "a broken bundle never replaces the good one"
    );
    let err = aegis::policy::CompiledBundle::load(
        &aegis::policy::BundleSource::Dir(bundle.path().to_path_buf()),
        &aegis::policy::PolicyOptions {
            query: "data.aegis.authz.decision".into(),
            eval_timeout: Duration::from_secs(1),
            eval_threads: 0,
            verification_keys: Vec::new(),
        },
    )
    .expect_err("broken");
    assert!(
        err.to_string().contains("aegis/broken.rego:3"),
        "error names file and line: {err}"
    );

    // Fixed: served again.
    std::fs::remove_file(bundle.path().join("aegis/broken.rego")).expect("rm");
    set_revision(bundle.path(), "v4");
    let mut fixed = false;
    for _ in 0..100 {
        if policy_version(&s.read_invoices(&t).await) == "v4" {
            fixed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fixed);
    s.stop().await;
    let conn = rusqlite::Connection::open(s.db()).expect("db");
    let revisions: Vec<String> = conn
        .prepare("SELECT DISTINCT policy_revision FROM audit_log WHERE kind = 'check' ORDER BY seq")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        revisions,
        vec!["v1", "v2", "v4"],
        "each row records the revision that decided it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bundle = tmp.path().join("bundle");
    copy_default_bundle(&bundle);
    set_revision(&bundle, "before-hup");
    let data = tmp.path().join("data");
    let (b, d) = (
        bundle.to_string_lossy().into_owned(),
        data.to_string_lossy().into_owned(),
    );
    // Polling effectively off: only SIGHUP can make it reload.
    let child = spawn_serve(&[
        "--bundle",
        &b,
        "--data-dir",
        &d,
        "--watch-interval-ms",
        "3600000",
    ]);
    let signer = aegis::keys::Signer::load(&data).expect("key");
    let t = mint(&signer, claims("acme", "bot", &["invoices:read"]));
    let mut c = client(child.addr).await;
    let req = || Req::read_invoices(&t);
    assert_eq!(
        policy_version(&c.check(req()).await.expect("ok").into_inner()),
        "before-hup"
    );
    set_revision(&bundle, "after-hup");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        policy_version(&c.check(req()).await.expect("ok").into_inner()),
        "before-hup",
        "no reload without SIGHUP"
    );
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let mut seen = false;
    for _ in 0..100 {
        if policy_version(&c.check(req()).await.expect("ok").into_inner()) == "after-hup" {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "SIGHUP reloads the bundle");
}

#[test]
fn a_broken_bundle_at_start_up_exits_non_zero_naming_the_file_and_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bundle = tmp.path().join("bundle");
    copy_default_bundle(&bundle);
    std::fs::write(
        bundle.join("aegis/authz.rego"),
        "package aegis.authz\n\nimport rego.v1\n\ndecision := {\n",
    )
    .expect("write");
    let data = tmp.path().join("data");
    let stderr = serve_refuses(&[
        "--bundle".as_ref(),
        bundle.as_os_str(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ]);
    assert!(
        stderr.contains("aegis/authz.rego:") && stderr.contains("policy bundle"),
        "{stderr}"
    );
}

fn tar_gz(dir: &Path, out: &Path, extra: Option<(&str, &[u8])>) {
    let file = std::fs::File::create(out).expect("create");
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(".", dir).expect("append");
    if let Some((name, bytes)) = extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Bypass the tar crate's own path checks to write a hostile name.
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, bytes).expect("append raw");
    }
    tar.into_inner()
        .expect("finish")
        .finish()
        .expect("gz")
        .flush()
        .expect("flush");
}

#[tokio::test]
async fn opa_bundle_archives_load_and_hostile_paths_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    copy_default_bundle(&src);
    set_revision(&src, "archive-7");
    let archive = tmp.path().join("bundle.tar.gz");
    tar_gz(&src, &archive, None);
    let a = archive.clone();
    let mut s = start_with(|c| c.policy.bundle = Some(a)).await;
    let t = s.token("acme", "bot", &["invoices:read"]);
    let r = s.read_invoices(&t).await;
    assert_eq!((code(&r), policy_version(&r)), (0, "archive-7".to_owned()));
    s.stop().await;

    let evil = tmp.path().join("evil.tar.gz");
    tar_gz(&src, &evil, Some(("../escape.rego", b"package x\n")));
    let err = aegis::policy::CompiledBundle::load(
        &aegis::policy::BundleSource::Archive(evil),
        &aegis::policy::PolicyOptions {
            query: "data.aegis.authz.decision".into(),
            eval_timeout: Duration::from_secs(1),
            eval_threads: 0,
            verification_keys: Vec::new(),
        },
    )
    .expect_err("refused");
    assert!(err.to_string().contains("leaves the bundle"), "{err}");
}

#[tokio::test]
async fn opa_envoy_policies_run_unchanged() {
    // A policy as written for OPA-Envoy: boolean `allow`, v0 syntax (OPA 0.x), reading
    // input.attributes with protojson names and parsed_path.
    let (_tmp, b) = bundle(&[
        (
            ".manifest",
            r#"{"revision": "opa-envoy-1", "roots": ["envoy"], "rego_version": 0}"#,
        ),
        (
            "policy.rego",
            r#"package envoy.authz

default allow = false

allow {
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] == "public"
    input.attributes.source.address.socketAddress.address == "10.0.0.7"
    input.version.ext_authz == "v3"
}
"#,
        ),
    ]);
    let dir = b.clone();
    let mut s = start_with(|c| {
        c.policy.bundle = Some(dir);
        c.policy.query = "data.envoy.authz.allow".into();
    })
    .await;
    let t = s.token("acme", "bot", &[]);
    let with_source = |path: &str| {
        let mut req = Req::get(path).token(&t).build();
        let attrs = req.attributes.as_mut().expect("attrs");
        attrs.source = Some(envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer {
            address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                address: Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                    envoy_types::pb::envoy::config::core::v3::SocketAddress {
                        address: "10.0.0.7".into(),
                        port_specifier: Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(4711)),
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        });
        req
    };
    assert_eq!(
        code(
            &s.check(with_source("/public/readme"))
                .await
                .expect("decided")
        ),
        0
    );
    let r = s
        .check(with_source("/private/keys"))
        .await
        .expect("decided");
    assert_eq!(code(&r), tonic::Code::PermissionDenied as i32);
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(403));
    s.stop().await;
}

#[tokio::test]
async fn policy_object_results_drive_headers_status_and_metadata() {
    let (_tmp, b) = bundle(&[(
        "policy.rego",
        r#"package aegis.authz
import rego.v1

decision := {"allowed": true, "headers": {"x-tenant": input.agent.tenant}, "response_headers_to_add": {"x-seen": "1"},
  "query_parameters_to_set": {"limit": "10"}, "dynamic_metadata": {"risk": 3, "decision": "forged"}} if input.tool.name == "ok"

decision := {"allowed": false, "http_status": 429, "body": "slow down", "headers": {"retry-after": "5"}, "reason": "rate"} if input.tool.name == "slow"

decision := {"decision": "allow", "allowed": false} if input.tool.name == "contradiction"
"#,
    )]);
    let dir = b.clone();
    let mut s = start_with(|c| c.policy.bundle = Some(dir)).await;
    let t = s.token("acme", "bot", &[]);
    let r = s
        .check(Req::get("/ok").token(&t).tool("ok", "read").build())
        .await
        .expect("decided");
    let okr = ok(&r);
    assert_eq!(header(&okr.headers, "x-tenant"), Some("acme"));
    assert_eq!(header(&okr.response_headers_to_add, "x-seen"), Some("1"));
    assert_eq!(
        okr.query_parameters_to_set
            .first()
            .map(|q| (q.key.as_str(), q.value.as_str())),
        Some(("limit", "10"))
    );
    let md = r.dynamic_metadata.as_ref().expect("metadata");
    assert!(md.fields.contains_key("risk"));
    // Aegis's own keys cannot be forged by a policy.
    assert!(
        matches!(md.fields.get("decision").and_then(|v| v.kind.as_ref()),
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(d)) if d == "allow")
    );

    let r = s
        .check(Req::get("/slow").token(&t).tool("slow", "read").build())
        .await
        .expect("decided");
    let d = denied(&r);
    assert_eq!(d.status.as_ref().map(|s| s.code), Some(429));
    assert_eq!(d.body, "slow down");
    assert_eq!(header(&d.headers, "retry-after"), Some("5"));

    // A contradictory decision is a policy bug: Aegis fails closed with a gRPC error.
    let err = s
        .check(
            Req::get("/contradiction")
                .token(&t)
                .tool("contradiction", "read")
                .build(),
        )
        .await
        .expect_err("error");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(err.message().contains("contradicts"), "{}", err.message());
    s.stop().await;
    let rows = s.rows();
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        vec!["allow", "deny", "error"]
    );
}

#[tokio::test]
async fn evaluation_is_bounded_in_time() {
    let (_tmp, b) = bundle(&[(
        "policy.rego",
        r#"package aegis.authz
import rego.v1

spin := count([1 | some i in numbers.range(1, 4000); some j in numbers.range(1, 4000); i == j + 100000])

decision := {"allowed": spin == 0} if input.tool.name == "spin"
decision := {"allowed": true} if input.tool.name == "fast"
"#,
    )]);
    let dir = b.clone();
    let mut s = start_with(|c| {
        c.policy.bundle = Some(dir);
        c.policy.eval_timeout_ms = 30;
    })
    .await;
    let t = s.token("acme", "bot", &[]);
    let started = std::time::Instant::now();
    let err = s
        .check(Req::get("/spin").token(&t).tool("spin", "read").build())
        .await
        .expect_err("times out");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stopped near its limit: {:?}",
        started.elapsed()
    );
    // The engine that timed out is reusable: the next Check is decided normally.
    assert_eq!(
        code(
            &s.check(Req::get("/fast").token(&t).tool("fast", "read").build())
                .await
                .expect("decided")
        ),
        0
    );
    s.stop().await;
    assert_eq!(s.rows()[0].0, "error");
}

#[test]
fn policy_test_and_eval_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(["policy", "test"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PASS: 20/20"),
        "{out:?}"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let b = tmp.path().join("bundle");
    copy_default_bundle(&b);
    // Break one expectation: the test must now fail and the command exit 1.
    let data = b.join("aegis/data.json");
    let text = std::fs::read_to_string(&data).expect("read").replace(
        "\"approval_threshold\": 1000",
        "\"approval_threshold\": 100000",
    );
    std::fs::write(&data, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(["policy", "test"])
        .arg(&b)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("FAIL data.aegis.authz_test.test_large_payment_needs_approval"),
        "{out:?}"
    );

    let input = tmp.path().join("input.json");
    std::fs::write(
        &input,
        r#"{"agent": {"scopes": ["payments:create"]}, "tool": {"name": "payments", "action": "create", "arguments": {"amount": 5000}}, "context": {}}"#,
    )
    .expect("input");
    let out = Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(["policy", "eval", "--input"])
        .arg(&input)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["decision"], "approval_needed");
    assert_eq!(v["reason"], "payment_above_threshold");
}

#[tokio::test]
async fn yaml_data_files_are_loaded_at_their_directory_path() {
    let (_tmp, b) = bundle(&[
        (
            "limits/tenants/data.yaml",
            "acme:\n  allowed_tools: [invoices]\n",
        ),
        (
            "policy.rego",
            "package aegis.authz\nimport rego.v1\n\ndecision := {\"allowed\": input.tool.name in data.limits.tenants[input.agent.tenant].allowed_tools}\n",
        ),
    ]);
    let dir = b.clone();
    let mut s = start_with(|c| c.policy.bundle = Some(dir)).await;
    let t = s.token("acme", "bot", &[]);
    assert_eq!(
        code(
            &s.check(
                Req::get("/invoices")
                    .token(&t)
                    .tool("invoices", "read")
                    .build()
            )
            .await
            .expect("decided")
        ),
        0
    );
    let r = s
        .check(
            Req::get("/payments")
                .token(&t)
                .tool("payments", "read")
                .build(),
        )
        .await
        .expect("decided");
    assert_eq!(code(&r), tonic::Code::PermissionDenied as i32);
    // No manifest: the revision is derived from the bundle's digest.
    assert!(
        policy_version(&r).starts_with("sha256:"),
        "{}",
        policy_version(&r)
    );
    s.stop().await;
}
