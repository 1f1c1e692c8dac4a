//! The fuzz corpus (`fuzz/corpus/<target>/`): every file is replayed through its harness
//! on every test run, so an input that once crashed stays fixed. With
//! `AEGIS_REGEN_CORPUS=1` this test first writes the seed files (this is their generator).
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::path::{Path, PathBuf};

use aegis::fuzzing;
use prost::Message;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    // check_input: CheckRequests as Envoy sends them, and NUL-split request parts.
    let signer = fuzzing::corpus_signer();
    let token = aegis::identity::mint(&signer, &fuzzing::corpus_claims()).expect("mint");
    let calls = [
        ("invoices", "read", r#"{"id":"inv-1"}"#, true),
        ("payments", "create", r#"{"amount":5000}"#, true),
        (
            "web_fetch",
            "get",
            r#"{"url":"https://user@evil.example.net/x"}"#,
            false,
        ),
        (
            "github",
            "read_issue",
            r#"{"repo":"acme/app","number":7}"#,
            false,
        ),
    ];
    for (i, (tool, action, args, mcp)) in calls.iter().enumerate() {
        let req = aegis::testkit::request(&token, tool, action, args, *mcp, i % 2 == 0);
        out.push((
            "check_input",
            format!("request-{tool}-{action}"),
            req.encode_to_vec(),
        ));
    }
    let parts: [(&str, &[&str]); 5] = [
        (
            "json-body",
            &[
                "/invoices/read?x=1&x=2",
                "application/json",
                r#"{"a":[1,{"b":null}]}"#,
                "invoices",
            ],
        ),
        (
            "form-body",
            &[
                "/a%2Fb/c?q=%zz",
                "application/x-www-form-urlencoded",
                "a=1&b=%41&c",
                "tool",
            ],
        ),
        (
            "mcp-call",
            &[
                "/mcp",
                "application/json",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"github.read_issue","arguments":{"n":1}}}"#,
                "untrusted_external",
            ],
        ),
        (
            "deep-json",
            &["/", "application/json", &"[".repeat(200), "x"],
        ),
        (
            "bad-utf8-path",
            &["/\u{fffd}/../..//", "text/plain", "", ""],
        ),
    ];
    for (name, p) in parts {
        out.push(("check_input", name.to_owned(), p.join("\0").into_bytes()));
    }
    // token: a valid token and a few broken shapes of it.
    out.push(("token", "valid".into(), token.clone().into_bytes()));
    out.push((
        "token",
        "alg-none".into(),
        format!(
            "eyJhbGciOiJub25lIn0.{}.",
            token.split('.').nth(1).unwrap_or("")
        )
        .into_bytes(),
    ));
    out.push((
        "token",
        "two-parts".into(),
        token
            .rsplit_once('.')
            .map_or("", |p| p.0)
            .as_bytes()
            .to_vec(),
    ));
    // bundle: the default bundle as an OPA .tar.gz, and its policy as one module.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let manifest = br#"{"revision":"fuzz-seed","roots":["aegis"]}"#;
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, ".manifest", &manifest[..])
        .expect("tar");
    for f in ["aegis/authz.rego", "aegis/data.json"] {
        tar.append_path_with_name(root.join(f), f).expect("tar");
    }
    let gz = tar.into_inner().expect("tar").finish().expect("gzip");
    out.push(("bundle", "default-bundle.tar.gz".into(), gz));
    let rego = std::fs::read(root.join("aegis/authz.rego")).expect("policy");
    out.push(("bundle", "default-authz.rego".into(), rego));
    out
}

#[test]
fn the_corpus_replays_through_every_harness() {
    if std::env::var_os("AEGIS_REGEN_CORPUS").is_some() {
        for (target, name, bytes) in seeds() {
            let dir = corpus(target);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let mut f = std::fs::File::create(dir.join(name)).expect("create");
            f.write_all(&bytes).expect("write");
        }
    }
    type Harness = fn(&[u8]);
    let harnesses: [(&str, Harness); 3] = [
        ("check_input", fuzzing::check_input),
        ("token", fuzzing::token),
        ("bundle", fuzzing::bundle),
    ];
    for (target, harness) in harnesses {
        let dir = corpus(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run with AEGIS_REGEN_CORPUS=1)", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.expect("entry").path();
            harness(&std::fs::read(&path).expect("read"));
            n += 1;
        }
        assert!(n > 0, "{target}: empty corpus");
    }
}

/// The modules that once overflowed the stack of regorus's compiler or evaluator (a
/// process abort) are refused by the bundle loader, naming the file and line, before
/// regorus sees them; replaying them above only shows that nothing crashed.
#[test]
fn modules_that_overflowed_the_stack_are_refused_by_name() {
    let dir = corpus("bundle");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !(name.starts_with("regression-") && name.ends_with("-stack-overflow")) {
            continue;
        }
        let files = aegis::policy::BundleFiles::from_files(vec![(
            "aegis/authz.rego".into(),
            std::fs::read(&path).expect("read"),
        )]);
        let err = files.parse().map(|_| ()).expect_err(name).to_string();
        assert!(
            err.starts_with("aegis/authz.rego: line ")
                && (err.contains("nested more than") || err.contains("chains more than")),
            "{name}: {err}"
        );
        n += 1;
    }
    assert_eq!(n, 5, "the five stack-overflow regressions");
}
