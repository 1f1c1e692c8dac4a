//! `aegis policy build`: a directory to an OPA-compatible bundle archive, optionally signed.
//!
//! The archive is deterministic: entries sorted by path, relative to the directory, each a
//! regular file with mode 0644, mtime 0, uid/gid 0 and no owner names, gzip header mtime 0;
//! building the same directory twice gives the same bytes.

use std::path::Path;

use super::signing::{self, SIGNATURES_FILE};
use super::{BundleError, BundleFiles, BundleSource, CompiledBundle, PolicyOptions};
use crate::keys::Signer;

/// What to build.
#[derive(Debug)]
pub struct BuildOptions {
    /// The revision; else the directory's `.manifest` revision; else derived from the
    /// content digest (`sha256:` and 12 hex digits, as the loader derives it).
    pub revision: Option<String>,
    /// The roots; else the directory's `.manifest` roots; else `[""]` (OPA's default).
    pub roots: Vec<String>,
    /// Sign with this key, writing this key id.
    pub signer: Option<(Signer, String)>,
    /// The bundle must compile with these options (the query must name a rule).
    pub policy: PolicyOptions,
}

/// A built bundle.
#[derive(Debug)]
pub struct Built {
    /// The `.tar.gz` bytes.
    pub archive: Vec<u8>,
    /// The bundle's revision, as its `.manifest` records it.
    pub revision: String,
    /// Every file in the archive, by path.
    pub files: Vec<String>,
}

/// Builds the bundle of `dir`; refuses one that does not compile.
pub fn build(dir: &Path, o: &BuildOptions) -> Result<Built, BundleError> {
    let read = BundleFiles::read(&BundleSource::Dir(dir.to_path_buf()))?;
    let mut manifest = serde_json::Map::new();
    let mut content = Vec::new();
    for (path, bytes) in read.files {
        match path.as_str() {
            ".manifest" => {
                manifest = serde_json::from_slice(&bytes).map_err(|e| BundleError::Invalid {
                    path: ".manifest".into(),
                    message: format!("not a JSON object: {e}"),
                })?;
            }
            // A signature of the directory's old contents is replaced, never carried over.
            SIGNATURES_FILE => {}
            _ => content.push((path, bytes)),
        }
    }
    let content = BundleFiles::from_files(content);
    let revision = match (&o.revision, manifest.get("revision")) {
        (Some(r), _) => r.clone(),
        (None, Some(serde_json::Value::String(r))) if !r.is_empty() => r.clone(),
        _ => content.parse()?.revision,
    };
    let roots = if !o.roots.is_empty() {
        serde_json::json!(o.roots)
    } else {
        manifest
            .get("roots")
            .cloned()
            .unwrap_or_else(|| serde_json::json!([""]))
    };
    manifest.insert("revision".into(), revision.clone().into());
    manifest.insert("roots".into(), roots);
    let mut manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| BundleError::Compile(e.to_string()))?;
    manifest_bytes.push(b'\n');

    let mut files = content.files;
    files.push((".manifest".into(), manifest_bytes));
    let bundle = BundleFiles::from_files(files);
    // The same compile `aegis serve` runs: a bundle that would not load is not built.
    CompiledBundle::compile(bundle.parse()?, &o.policy)?;

    let mut files = bundle.files;
    if let Some((signer, kid)) = &o.signer {
        let sigs = signing::sign(&files, signer, kid).map_err(BundleError::Compile)?;
        files.push((SIGNATURES_FILE.into(), sigs));
        files.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let archive = write_archive(&files).map_err(|source| BundleError::Io {
        path: "archive".into(),
        source,
    })?;
    Ok(Built {
        archive,
        revision,
        files: files.into_iter().map(|(p, _)| p).collect(),
    })
}

/// A deterministic `.tar.gz` of `files` (already sorted).
pub fn write_archive(files: &[(String, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(bytes.len() as u64);
        tar.append_data(&mut header, path, bytes.as_slice())?;
    }
    tar.into_inner()?.finish()
}
