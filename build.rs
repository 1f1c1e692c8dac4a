//! Build-time code generation, all in pure Rust (no system `protoc`):
//! - the ext_authz file descriptor set, compiled by protox from the vendored Envoy protos in
//!   `proto/vendor/` (copied from envoy-types, which ships no descriptor set), so gRPC
//!   reflection can describe `envoy.service.auth.v3.Authorization`;
//! - the control-plane service (`proto/aegis/control/v1/control.proto`): protox compiles it to
//!   a descriptor set, tonic-prost-build generates the messages, server and client from that
//!   set, and the same set feeds reflection;
//! - the list of files of the default policy bundle (`policies/`), embedded in the binary.

use std::{env, fs, io, path::Path, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=policies");

    let fds = protox::compile(
        ["envoy/service/auth/v3/external_auth.proto"],
        ["proto/vendor"],
    )?;
    fs::write(out.join("ext_authz_descriptor.bin"), fds.encode_to_vec())?;

    let control = protox::compile(["aegis/control/v1/control.proto"], ["proto"])?;
    fs::write(out.join("control_descriptor.bin"), control.encode_to_vec())?;
    tonic_prost_build::configure()
        // `aegis ctl --json` prints the messages as they are.
        .type_attribute(".aegis.control.v1", "#[derive(serde::Serialize)]")
        // Stored in the incidents table as JSON.
        .type_attribute(
            ".aegis.control.v1.EvidenceDecision",
            "#[derive(serde::Deserialize)] #[serde(default)]",
        )
        .build_server(true)
        .build_client(true)
        .compile_fds(control)?;

    write_default_bundle(Path::new("policies"), &out.join("default_bundle.rs"))?;
    Ok(())
}

/// Writes `&[(relative_path, bytes)]` for every file under `root`, sorted, so the embedded
/// bundle and its digest do not depend on directory iteration order.
fn write_default_bundle(root: &Path, dest: &Path) -> io::Result<()> {
    let mut files = Vec::new();
    collect(root, root, &mut files)?;
    files.sort();
    let mut code = String::from("&[\n");
    for (rel, abs) in files {
        code.push_str(&format!(
            "    ({rel:?}, include_bytes!({abs:?}) as &[u8]),\n"
        ));
    }
    code.push(']');
    fs::write(dest, code)
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, String)>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, files)?;
        } else {
            let rel = path.strip_prefix(root).map_err(io::Error::other)?;
            let abs = fs::canonicalize(&path)?;
            files.push((
                rel.to_string_lossy().replace('\\', "/"),
                abs.to_string_lossy().into_owned(),
            ));
        }
    }
    Ok(())
}
