//! Signed OPA-compatible bundles: `aegis policy build` / `keygen`, verification at start,
//! on reload and through the control plane, and `opa build`'s archive layout.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use aegis::policy::build::write_archive;
use aegis::policy::signing::SIGNATURES_FILE;
use aegis::policy::{BundleFiles, BundleSource, Policy, PolicyOptions};
use base64::Engine as _;
use common::*;

type Files = Vec<(String, Vec<u8>)>;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = aegis_cmd(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `aegis policy keygen -o dir/name`: (seed file, public key file).
fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(name);
    let (code, out, err) = run(&["policy", "keygen", "-o", &s(&key)]);
    assert_eq!(code, 0, "{out}{err}");
    (key.clone(), dir.join(format!("{name}.pub")))
}

/// `aegis policy build src -o out <extra>`, which must succeed.
fn build(src: &Path, out: &Path, extra: &[&str]) {
    let (src_s, out_s) = (s(src), s(out));
    let mut args = vec!["policy", "build", &src_s, "-o", &out_s];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

fn archive_files(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read archive");
    BundleFiles::from_archive(path, bytes.as_slice())
        .expect("archive reads")
        .files
}

fn write(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut files = files.to_vec();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, write_archive(&files).expect("archive")).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn opts(keys: &[&Path]) -> PolicyOptions {
    PolicyOptions {
        query: "data.aegis.authz.decision".into(),
        eval_timeout: Duration::from_secs(2),
        eval_threads: 0,
        verification_keys: keys
            .iter()
            .map(|k| aegis::keys::read_public_key(k).expect("public key"))
            .collect(),
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    key: PathBuf,
    public: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_default_bundle(&dir.path().join("src"));
        let (key, public) = keygen(dir.path(), "bundle.key");
        Self { dir, key, public }
    }

    fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A bundle of the default policy signed with the fixture's key.
    fn signed(&self, name: &str, revision: &str) -> PathBuf {
        let out = self.path(name);
        build(
            &self.src(),
            &out,
            &["--revision", revision, "--signing-key", &s(&self.key)],
        );
        out
    }
}

#[test]
fn keygen_writes_a_private_seed_and_its_public_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(dir.path(), "k");
    let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let signer = aegis::keys::Signer::load_file(&key).expect("seed loads");
    let public = aegis::keys::read_public_key(&public).expect("public key loads");
    assert_eq!(signer.verifying_key(), public);
    // Never overwrites a key.
    let (code, _, err) = run(&["policy", "keygen", "-o", &s(&key)]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn build_is_deterministic_and_writes_an_opa_manifest_and_signature() {
    let f = Fixture::new();
    let a = f.signed("a.tar.gz", "r1");
    std::thread::sleep(Duration::from_millis(1100));
    let b = f.signed("b.tar.gz", "r1");
    let bytes = std::fs::read(&a).expect("a");
    assert_eq!(bytes, std::fs::read(&b).expect("b"), "identical bytes");

    // Entries: sorted, relative, regular files with fixed metadata.
    let gz = flate2::read::GzDecoder::new(bytes.as_slice());
    let mut tar = tar::Archive::new(gz);
    let mut names = Vec::new();
    for e in tar.entries().expect("entries") {
        let e = e.expect("entry");
        let h = e.header();
        assert_eq!(
            (h.mode().ok(), h.mtime().ok(), h.uid().ok(), h.gid().ok()),
            (Some(0o644), Some(0), Some(0), Some(0))
        );
        names.push(e.path().expect("path").to_string_lossy().into_owned());
    }
    assert_eq!(
        names,
        [
            ".manifest",
            SIGNATURES_FILE,
            "aegis/authz.rego",
            "aegis/authz_test.rego",
            "aegis/data.json"
        ]
    );
    let files = archive_files(&a);
    let manifest: serde_json::Value =
        serde_json::from_slice(&files[0].1).expect("manifest is JSON");
    assert_eq!(manifest["revision"], "r1");
    assert_eq!(
        manifest["roots"],
        serde_json::json!(["aegis"]),
        "kept from src"
    );

    // The signature: one EdDSA JWS listing every other file, the manifest included.
    let sigs: serde_json::Value = serde_json::from_slice(&files[1].1).expect("json");
    let jws = sigs["signatures"][0].as_str().expect("one JWS");
    let parts: Vec<&str> = jws.split('.').collect();
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(parts[0]).expect("b64")).expect("json");
    let signer = aegis::keys::Signer::load_file(&f.key).expect("key");
    assert_eq!(
        header,
        serde_json::json!({"alg": "EdDSA", "kid": signer.kid()})
    );
    let payload: serde_json::Value =
        serde_json::from_slice(&B64.decode(parts[1]).expect("b64")).expect("json");
    let listed: Vec<&str> = payload["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        listed,
        [
            ".manifest",
            "aegis/authz.rego",
            "aegis/authz_test.rego",
            "aegis/data.json"
        ]
    );
    assert_eq!(payload["keyid"], signer.kid());
    assert!(
        payload["files"]
            .as_array()
            .expect("files")
            .iter()
            .all(|f| f["algorithm"] == "SHA-256")
    );

    // Without a revision or roots anywhere: the digest-derived revision and OPA's [""].
    std::fs::remove_file(f.src().join(".manifest")).expect("rm manifest");
    let c = f.path("c.tar.gz");
    build(&f.src(), &c, &[]);
    let files = archive_files(&c);
    let manifest: serde_json::Value = serde_json::from_slice(&files[0].1).expect("json");
    assert_eq!(manifest["roots"], serde_json::json!([""]));
    let revision = manifest["revision"].as_str().expect("revision");
    assert!(
        revision.starts_with("sha256:") && revision.len() == 19,
        "{revision}"
    );
    assert!(!files.iter().any(|(p, _)| p == SIGNATURES_FILE), "unsigned");

    // --key-id names the key in the header and the payload.
    let d = f.path("d.tar.gz");
    build(
        &f.src(),
        &d,
        &["--signing-key", &s(&f.key), "--key-id", "release-2026"],
    );
    let sigs: serde_json::Value = serde_json::from_slice(
        &archive_files(&d)
            .into_iter()
            .find(|(p, _)| p == SIGNATURES_FILE)
            .expect("signed")
            .1,
    )
    .expect("json");
    let jws = sigs["signatures"][0].as_str().expect("jws");
    let part = |i: usize| -> serde_json::Value {
        let b = B64
            .decode(jws.split('.').nth(i).expect("part"))
            .expect("b64");
        serde_json::from_slice(&b).expect("json")
    };
    assert_eq!(
        (part(0)["kid"].clone(), part(1)["keyid"].clone()),
        ("release-2026".into(), "release-2026".into())
    );
}

#[test]
fn build_refuses_a_policy_that_does_not_compile() {
    let f = Fixture::new();
    std::fs::write(
        f.src().join("aegis/broken.rego"),
        "package aegis.authz\nx := if {\n",
    )
    .expect("write");
    let out = f.path("x.tar.gz");
    let (code, _, err) = run(&["policy", "build", &s(&f.src()), "-o", &s(&out)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broken.rego"), "{err}");
    assert!(!out.exists(), "nothing written");
}

/// The bundle served with the verification key decides with the bundle's revision; an
/// unsigned one keeps the server from starting.
#[tokio::test]
async fn a_signed_bundle_serves_and_an_unsigned_one_is_refused_at_start() {
    let f = Fixture::new();
    let signed = f.signed("signed.tar.gz", "signed-r1");
    let public = f.public.clone();
    let mut server = start_with(|c| {
        c.policy.bundle = Some(signed.clone());
        c.policy.verification_key = vec![public.clone()];
    })
    .await;
    let t = server.token("acme", "bot", &["invoices:read"]);
    let r = server.read_invoices(&t).await;
    assert_eq!((code(&r), policy_version(&r)), (0, "signed-r1".to_owned()));
    server.stop().await;

    // The real binary, with the flag: refuses to start, naming the problem.
    let unsigned = f.path("unsigned.tar.gz");
    build(&f.src(), &unsigned, &[]);
    let data = f.path("data");
    let err = serve_refuses(&[
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--bundle".as_ref(),
        unsigned.as_os_str(),
        "--bundle-verification-key".as_ref(),
        f.public.as_os_str(),
    ]);
    assert!(
        err.contains("bundle is not signed (no .signatures.json)"),
        "{err}"
    );
    // The real binary starts with the signed one (the key from the environment) and
    // decides with its revision.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_aegis"));
    cmd.env("AEGIS_BUNDLE_VERIFICATION_KEY", &f.public);
    let child = spawn_serve_cmd(
        cmd,
        &["--data-dir", &s(&data), "--bundle", &s(&signed)],
        aegis::server::ANNOUNCE,
    );
    let signer = aegis::keys::Signer::load(&data).expect("server key");
    let token = mint(&signer, claims("acme", "bot", &["invoices:read"]));
    let r = client(child.addr)
        .await
        .check(Req::read_invoices(&token))
        .await
        .expect("decided")
        .into_inner();
    assert_eq!((code(&r), policy_version(&r)), (0, "signed-r1".to_owned()));
}

/// Replaces `path`'s contents in `files`.
fn replace(files: &mut [(String, Vec<u8>)], path: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let (_, bytes) = files
        .iter_mut()
        .find(|(p, _)| p == path)
        .unwrap_or_else(|| panic!("no {path}"));
    f(bytes);
}

/// The signatures file with its JWS header replaced by `{"alg":"none"}` and no signature.
fn alg_none(files: &mut [(String, Vec<u8>)]) {
    replace(files, SIGNATURES_FILE, |b| {
        let doc: serde_json::Value = serde_json::from_slice(b).expect("json");
        let jws = doc["signatures"][0].as_str().expect("jws");
        let payload = jws.split('.').nth(1).expect("payload");
        let forged = format!("{}.{payload}.", B64.encode(r#"{"alg":"none"}"#));
        *b = serde_json::to_vec(&serde_json::json!({ "signatures": [forged] })).expect("json");
    });
}

#[test]
fn tampered_bundles_are_refused_at_start_each_with_its_message() {
    let f = Fixture::new();
    let good = archive_files(&f.signed("good.tar.gz", "r1"));
    let (other_key, _) = keygen(f.dir.path(), "other.key");
    let other = f.path("other.tar.gz");
    build(
        &f.src(),
        &other,
        &["--revision", "r1", "--signing-key", &s(&other_key)],
    );

    let mut changed = good.clone();
    replace(&mut changed, "aegis/authz.rego", |b| {
        let last = b.len() - 1;
        b[last] = b' ';
    });
    let mut added = good.clone();
    added.push(("aegis/extra.rego".into(), b"package aegis.extra\n".to_vec()));
    let removed: Vec<_> = good
        .iter()
        .filter(|(p, _)| p != "aegis/authz_test.rego")
        .cloned()
        .collect();
    let mut none = good.clone();
    alg_none(&mut none);
    let unsigned: Vec<_> = good
        .iter()
        .filter(|(p, _)| p != SIGNATURES_FILE)
        .cloned()
        .collect();

    let cases: Vec<(&str, Files, &str)> = vec![
        ("changed", changed, "file aegis/authz.rego: hash mismatch"),
        (
            "added",
            added,
            "file aegis/extra.rego is not covered by the signature",
        ),
        (
            "removed",
            removed,
            "file aegis/authz_test.rego listed in the signature is missing",
        ),
        (
            "other-key",
            archive_files(&other),
            "signature does not verify with the verification key",
        ),
        ("alg-none", none, "signature algorithm \"none\" is refused"),
        (
            "unsigned",
            unsigned,
            "bundle is not signed (no .signatures.json)",
        ),
    ];
    for (name, files, message) in cases {
        let path = f.path(&format!("{name}.tar.gz"));
        write(&path, &files);
        let data = f.path(&format!("data-{name}"));
        let err = serve_refuses(&[
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--bundle".as_ref(),
            path.as_os_str(),
            "--bundle-verification-key".as_ref(),
            f.public.as_os_str(),
        ]);
        assert!(err.contains(message), "{name}: {err}");
        // Without a verification key the same bundle loads (the signature is ignored,
        // and .signatures.json is never data), except the one another key signed,
        // which is sound, and the tampered ones, which still compile.
        let p = Policy::load(BundleSource::Archive(path.clone()), opts(&[]))
            .unwrap_or_else(|e| panic!("{name} loads without a key: {e}"));
        assert!(
            p.current()
                .data()
                .to_json_str()
                .expect("json")
                .find("signatures")
                .is_none(),
            "{name}"
        );
    }

    // The good one verifies, as an archive and unpacked as a directory; a data.json
    // reformatted (same JSON, other whitespace) still verifies: OPA's canonical-JSON rule.
    let ok = f.path("ok.tar.gz");
    write(&ok, &good);
    Policy::load(BundleSource::Archive(ok), opts(&[&f.public])).expect("archive verifies");
    let dir = f.path("unpacked");
    for (p, b) in &good {
        let target = dir.join(p);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::write(&target, b).expect("write");
    }
    let data = dir.join("aegis/data.json");
    let value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&data).expect("read")).expect("json");
    std::fs::write(&data, serde_json::to_vec_pretty(&value).expect("json")).expect("write");
    let p = Policy::load(BundleSource::Dir(dir.clone()), opts(&[&f.public]))
        .expect("directory verifies");
    assert_eq!(p.revision(), "r1");
    std::fs::write(dir.join("aegis/data.json"), br#"{"changed": true}"#).expect("write");
    let e = Policy::load(BundleSource::Dir(dir), opts(&[&f.public])).expect_err("tampered");
    assert_eq!(e.to_string(), "file aegis/data.json: hash mismatch");
}

#[tokio::test]
async fn reload_keeps_the_last_good_bundle_on_a_tampered_one_then_takes_a_signed_one() {
    let f = Fixture::new();
    let live = f.path("live.tar.gz");
    std::fs::copy(f.signed("r1.tar.gz", "r1"), &live).expect("copy");
    let (bundle, public) = (live.clone(), f.public.clone());
    let mut server = start_with(|c| {
        c.policy.bundle = Some(bundle);
        c.policy.verification_key = vec![public];
    })
    .await;
    let policy = server.running.as_ref().expect("running").policy.clone();
    let t = server.token("acme", "bot", &["invoices:read"]);
    assert_eq!(policy_version(&server.read_invoices(&t).await), "r1");
    assert_eq!(policy.reload_failures(), 0);

    // r2, signed, then one byte changed: refused; r1 keeps serving; the failure counted.
    let mut tampered = archive_files(&f.signed("r2.tar.gz", "r2"));
    replace(&mut tampered, "aegis/authz.rego", |b| {
        let last = b.len() - 1;
        b[last] = b' ';
    });
    write(&live, &tampered);
    assert!(
        eventually(Duration::from_secs(5), || policy.reload_failures() >= 1).await,
        "the tampered bundle is seen and refused"
    );
    assert_eq!(policy.revision(), "r1");
    assert_eq!(policy_version(&server.read_invoices(&t).await), "r1");
    // What a scrape shows: the refusal counted, r1 still the revision.
    let admin = server.running.as_ref().expect("running").admin_addr;
    let scrape = http_get(admin, "/metrics").await;
    assert!(
        scrape.contains("\naegis_policy_reload_failures_total 1\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("aegis_policy_revision_info{revision=\"r1\","),
        "{scrape}"
    );

    // The correctly signed r2 is picked up.
    std::fs::copy(f.path("r2.tar.gz"), f.path("r2-copy.tar.gz")).expect("copy");
    std::fs::rename(f.path("r2-copy.tar.gz"), &live).expect("rename");
    assert!(
        eventually(Duration::from_secs(5), || policy.revision() == "r2").await,
        "the signed r2 is served"
    );
    assert_eq!(policy_version(&server.read_invoices(&t).await), "r2");
    server.stop().await;
}

#[tokio::test]
async fn control_plane_activation_verifies_pushed_bundles() {
    let f = Fixture::new();
    let signed = f.signed("r1.tar.gz", "r1");
    let (bundle, public) = (signed.clone(), f.public.clone());
    let mut server = start_with(|c| {
        c.policy.bundle = Some(bundle);
        c.policy.verification_key = vec![public];
    })
    .await;
    let root = server
        .control(&server.operator("root", Role::Admin, "*"))
        .await;
    let push = |files: Vec<(String, Vec<u8>)>| {
        root.req(pb::ActivatePolicyRequest {
            bundle: Some(pb::Bundle::from(&BundleFiles::from_files(files))),
            reason: "ship".into(),
        })
    };
    let mut tampered = archive_files(&f.signed("r2.tar.gz", "r2"));
    replace(&mut tampered, "aegis/data.json", |b| {
        *b = br#"{"changed": true}"#.to_vec()
    });
    let e = root
        .api()
        .activate_policy(push(tampered))
        .await
        .expect_err("refused");
    assert!(
        e.message().contains("file aegis/data.json: hash mismatch"),
        "{}",
        e.message()
    );
    let rev = root
        .api()
        .activate_policy(push(archive_files(&f.path("r2.tar.gz"))))
        .await
        .expect("a signed bundle activates")
        .into_inner();
    assert_eq!(rev.revision, "r2");
    server.stop().await;
}

/// An archive laid out as `opa build` writes it (OPA's `bundle.Writer` and
/// `archive.TarGzWriter`): `/data.json` first (all data merged, Go's JSON encoder, a
/// trailing newline), then each module at `/<path>`, then `/.manifest` last; every entry
/// a USTAR regular file, mode 0600, mtime 0, uid/gid 0, name with a leading `/`.
fn opa_build_archive(
    files: &[(String, Vec<u8>)],
    manifest: &serde_json::Value,
    signatures: Option<&[u8]>,
) -> Vec<u8> {
    let mut data = serde_json::Map::new();
    let mut modules = Vec::new();
    for (path, bytes) in files {
        if path.ends_with(".rego") {
            modules.push((format!("/{path}"), bytes.clone()));
        } else if path.ends_with("data.json") {
            let mut value: serde_json::Value = serde_json::from_slice(bytes).expect("json");
            let dir: Vec<&str> = path.split('/').collect();
            for key in dir[..dir.len() - 1].iter().rev() {
                value = serde_json::json!({ *key: value });
            }
            for (k, v) in value.as_object().expect("object") {
                data.insert(k.clone(), v.clone());
            }
        }
    }
    let mut entries = vec![(
        "/data.json".to_owned(),
        format!("{}\n", serde_json::Value::Object(data)).into_bytes(),
    )];
    entries.extend(modules);
    // `writeSignatures` comes after the modules (and wasm), before the manifest.
    if let Some(sigs) = signatures {
        entries.push(("/.signatures.json".into(), sigs.to_vec()));
    }
    entries.push(("/.manifest".into(), format!("{manifest}\n").into_bytes()));

    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in &entries {
        let mut h = tar::Header::new_ustar();
        // tar-rs refuses to set an absolute path; Go's archive/tar writes it as given.
        h.as_ustar_mut().expect("ustar").name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(bytes.len() as u64);
        h.set_cksum();
        tar.append(&h, bytes.as_slice()).expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

#[test]
fn bundles_in_opa_build_layout_load_and_decide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = BundleFiles::read(&BundleSource::Embedded)
        .expect("embedded")
        .files;
    let reference = Policy::load(BundleSource::Embedded, opts(&[])).expect("embedded");
    let input = regorus::Value::from_json_str(
        r#"{"attributes": {"request": {"http": {"method": "GET", "path": "/invoices"}}}}"#,
    )
    .expect("input");
    let expected = reference
        .current()
        .evaluate(input.clone())
        .expect("decides");

    for (name, manifest) in [
        (
            "plain",
            serde_json::json!({"revision": "opa-1", "roots": [""]}),
        ),
        (
            "v1-metadata",
            serde_json::json!({"revision": "opa-2", "roots": ["aegis"], "rego_version": 1,
                "metadata": {"built_by": "opa build"}}),
        ),
    ] {
        let path = dir.path().join(format!("{name}.tar.gz"));
        std::fs::write(&path, opa_build_archive(&files, &manifest, None)).expect("write");
        let names: Vec<String> = {
            let bytes = std::fs::read(&path).expect("read");
            let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
            tar.entries()
                .expect("entries")
                .map(|e| {
                    e.expect("entry")
                        .path()
                        .expect("path")
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        assert_eq!(names.first().map(String::as_str), Some("/data.json"));
        assert_eq!(names.last().map(String::as_str), Some("/.manifest"));
        let p = Policy::load(BundleSource::Archive(path.clone()), opts(&[]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            p.revision(),
            manifest["revision"].as_str().expect("revision")
        );
        let got = p.current().evaluate(input.clone()).expect("decides");
        assert_eq!(
            (got.verdict, &got.reason),
            (expected.verdict, &expected.reason),
            "{name}"
        );
    }

    // Signed, OPA-style: names listed without the leading `/` (OPA trims it when it
    // hashes and when it verifies), the archive's entries with it.
    let manifest = serde_json::json!({"revision": "opa-signed", "roots": [""]});
    let unsigned = opa_build_archive(&files, &manifest, None);
    let read = BundleFiles::from_archive(Path::new("opa.tar.gz"), unsigned.as_slice())
        .expect("reads")
        .files;
    let key = dir.path().join("k");
    let signer = aegis::keys::write_keypair(&key).expect("key");
    let sigs = aegis::policy::signing::sign(&read, &signer, "opa-key").expect("sign");
    let path = dir.path().join("signed.tar.gz");
    std::fs::write(&path, opa_build_archive(&files, &manifest, Some(&sigs))).expect("write");
    let public = dir.path().join("k.pub");
    let p = Policy::load(BundleSource::Archive(path.clone()), opts(&[&public]))
        .expect("a signed opa-layout bundle verifies");
    assert_eq!(p.revision(), "opa-signed");
    let wrong = opts(&[&f_public_other(dir.path())]);
    let e = Policy::load(BundleSource::Archive(path), wrong).expect_err("other key");
    assert_eq!(
        e.to_string(),
        "signature does not verify with the verification key"
    );
}

fn f_public_other(dir: &Path) -> PathBuf {
    let key = dir.join("other");
    aegis::keys::write_keypair(&key).expect("key");
    dir.join("other.pub")
}

/// A fleet sidecar verifies the bundles it fetches from its control plane by digest: a
/// signed push is taken, an unsigned one is refused while the sidecar keeps deciding
/// with the last good revision, and the next signed one is taken again.
#[tokio::test]
async fn a_fleet_sidecar_verifies_the_bundles_it_fetches() {
    let f = Fixture::new();
    let cp_data = f.path("cp");
    let cp = spawn_control_plane(&cp_data, "127.0.0.1:0", &[]);
    let root = operator_cmd(&cp_data, "root", "admin", "*");
    let sidecar_token = f.path("sidecar.token");
    aegis::files::write_secret(
        &sidecar_token,
        &operator_cmd(&cp_data, "fleet", "sidecar", "acme"),
    )
    .expect("write");
    let local = f.signed("local.tar.gz", "local-r1");
    let sidecar = spawn_serve(&[
        "--data-dir",
        &s(&f.path("sidecar")),
        "--control-plane",
        &format!("http://{}", cp.addr),
        "--control-plane-token-file",
        &s(&sidecar_token),
        "--trusted-key",
        &s(&cp_data.join("signing.pub")),
        "--bundle",
        &s(&local),
        "--bundle-verification-key",
        &s(&f.public),
    ]);
    let ok = |args: &[&str]| {
        let (code, out, err) = ctl(cp.addr, &root, args);
        assert_eq!(code, 0, "aegis ctl {args:?}: {err}");
        out
    };
    ok(&["agents", "register", "bot", "--tenant", "acme"]);
    let token = ok(&[
        "tokens",
        "issue",
        "--agent",
        "bot",
        "--tenant",
        "acme",
        "--scopes",
        "invoices:read",
    ])
    .trim()
    .to_owned();
    let c = client(sidecar.addr).await;
    let version = || {
        let (mut c, t) = (c.clone(), token.clone());
        async move {
            c.check(Req::read_invoices(&t))
                .await
                .ok()
                .map(|r| policy_version(&r.into_inner()))
                .unwrap_or_default()
        }
    };
    let serves = |want: &'static str| {
        let version = &version;
        async move {
            eventually_async(Duration::from_secs(10), || async move {
                version().await == want
            })
            .await
        }
    };

    let push = |path: &Path| ok(&["policy", "push", &s(path), "--reason", "ship"]);
    push(&f.signed("r2.tar.gz", "fleet-r2"));
    assert!(
        serves("fleet-r2").await,
        "a signed push reaches the sidecar"
    );

    let unsigned = f.path("unsigned.tar.gz");
    build(&f.src(), &unsigned, &["--revision", "fleet-unsigned"]);
    push(&unsigned);
    assert!(
        ok(&["policy", "history"]).contains("fleet-unsigned"),
        "the control plane (no key) took it"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(version().await, "fleet-r2", "the sidecar refused it");

    push(&f.signed("r3.tar.gz", "fleet-r3"));
    assert!(serves("fleet-r3").await, "and still follows signed pushes");
}
