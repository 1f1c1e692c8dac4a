//! Who else can change Aegis's keys: `aegis serve` (the real binary) refuses a data
//! directory or key another local user could write, a private key others could read, and
//! a key planted as a symbolic link, naming the path; `allow_insecure_files` is the
//! explicit way past it.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use aegis::control::auth::{Role, mint_operator};
use common::*;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn data_arg(data: &Path) -> Vec<&OsStr> {
    vec![OsStr::new("--data-dir"), data.as_os_str()]
}

/// A data directory made by a first start (keys and databases in it), then stopped.
fn started_once(root: &Path) -> std::path::PathBuf {
    let data = root.join("data");
    let s = spawn_serve(&["--data-dir", &data.to_string_lossy()]);
    drop(s);
    assert!(data.join(aegis::keys::SIGNING_KEY_FILE).exists());
    data
}

/// The reported attack: in a 0777 data directory another local user swaps `signing.key`
/// for their own and mints an admin-of-`*` credential offline; the restart must not trust
/// it. Before the fix the server started with the swapped key and the credential worked.
#[test]
fn a_world_writable_data_directory_with_a_swapped_key_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = started_once(root.path());
    chmod(&data, 0o777);
    // Another user's key, written over ours (any user may, in a 0777 directory).
    let theirs = root.path().join("mallory.key");
    let mallory = aegis::keys::write_keypair(&theirs).expect("keypair");
    std::fs::remove_file(data.join("signing.key")).expect("rm");
    std::fs::copy(&theirs, data.join("signing.key")).expect("swap");
    let forged = mint_operator(&mallory, "aegis", "mallory", Role::Admin, "*", 3600).expect("mint");
    assert!(!forged.is_empty());

    let err = serve_refuses(&data_arg(&data));
    assert!(
        err.contains(&data.display().to_string()) && err.contains("writable by group or others"),
        "{err}"
    );
    assert!(err.contains("mode 0777"), "{err}");
    assert!(err.contains("allow_insecure_files"), "{err}");
}

/// A private key others can read (a careless `cp` under umask 022) or write is refused,
/// naming the file; so is a trusted public key others can write (they would add a key).
#[test]
fn keys_others_can_read_or_write_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = started_once(root.path());
    let key = data.join("signing.key");
    chmod(&key, 0o644);
    let err = serve_refuses(&data_arg(&data));
    assert!(
        err.contains(&key.display().to_string()) && err.contains("readable by others"),
        "{err}"
    );
    chmod(&key, 0o660);
    let err = serve_refuses(&data_arg(&data));
    assert!(err.contains("writable by group or others"), "{err}");
    chmod(&key, 0o600);

    // A configured key file (a mounted Secret written 0666).
    let file = root.path().join("secret.key");
    aegis::keys::write_keypair(&file).expect("keypair");
    chmod(&file, 0o666);
    let mut args = data_arg(&data);
    args.extend([OsStr::new("--signing-key-file"), file.as_os_str()]);
    let err = serve_refuses(&args);
    assert!(
        err.contains("signing_key_file") && err.contains(&file.display().to_string()),
        "{err}"
    );

    // A trusted public key others can write.
    let public = root.path().join("secret.key.pub");
    chmod(&public, 0o646);
    let config = root.path().join("aegis.toml");
    std::fs::write(
        &config,
        format!(
            "[token]\ntrusted_keys = [{:?}]\n",
            public.display().to_string()
        ),
    )
    .expect("config");
    let err = serve_refuses(&[
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--config"),
        config.as_os_str(),
    ]);
    assert!(
        err.contains("token.trusted_keys") && err.contains("writable by group or others"),
        "{err}"
    );
}

/// A link planted in place of `signing.key` (pointing at a key the planter controls) or
/// of the audit database is not followed: the start fails naming the file.
#[test]
fn links_planted_in_the_data_directory_are_not_followed() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = started_once(root.path());
    let theirs = root.path().join("theirs.key");
    aegis::keys::write_keypair(&theirs).expect("keypair");
    let key = data.join("signing.key");
    std::fs::remove_file(&key).expect("rm");
    std::os::unix::fs::symlink(&theirs, &key).expect("link");
    let err = serve_refuses(&data_arg(&data));
    assert!(
        err.contains(&key.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );

    let data = started_once(&root.path().join("second"));
    let db = data.join("audit.db");
    let elsewhere = root.path().join("elsewhere.db");
    std::fs::rename(&db, &elsewhere).expect("move");
    std::os::unix::fs::symlink(&elsewhere, &db).expect("link");
    let err = serve_refuses(&data_arg(&data));
    assert!(
        err.contains(&db.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );
}

/// The explicit way past, for volumes that cannot be narrowed: it starts, and says why
/// it should not have.
#[test]
fn allow_insecure_files_starts_with_a_warning() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = started_once(root.path());
    chmod(&data, 0o777);
    let s = spawn_serve(&[
        "--data-dir",
        &data.to_string_lossy(),
        "--allow-insecure-files",
        "true",
    ]);
    let said = s.lines.join("\n");
    assert!(
        said.contains("writable by group or others")
            && said.contains("allowed by allow_insecure_files"),
        "{said}"
    );
}
