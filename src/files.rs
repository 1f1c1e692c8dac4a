//! Who else can change or read Aegis's secrets: checked before `aegis serve` loads a key.
//!
//! Whoever can write the data directory can replace `signing.key` and mint credentials the
//! next start trusts (an admin of `*`); whoever can write a trusted public key can add
//! their own key; whoever can read a private key can sign as Aegis. So, as sshd's
//! `StrictModes` does, `aegis serve` refuses to start when
//! - the data directory is writable by group or others, or owned by another user;
//! - a private key (`signing.key`, `audit.key`, `signing_key_file`,
//!   `audit.signing_key_file`, the TLS keys, the sidecar credential `control.token_file`)
//!   is writable by group or others, readable by others, or owned by another user;
//! - a trusted public key (`token.trusted_keys`, `audit.trusted_keys`,
//!   `policy.verification_key`) is writable by group or others, or owned by another user.
//!
//! "Another user" is anyone but the process's effective user and root (root can read and
//! write everything anyway; Kubernetes mounts Secrets owned by root, group `fsGroup`, mode
//! `defaultMode`). Group-readable keys are accepted, for that `fsGroup` case.
//!
//! Paths the operator configured are checked where they lead (a Secret's file is a
//! symbolic link into `..data/`); the keys Aegis keeps in its data directory are opened
//! without following symbolic links ([`read_private_in_dir`]).
//!
//! `allow_insecure_files = true` turns each refusal into a warning, for volumes that
//! cannot have narrower modes; it is an explicit choice, never the default.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::{AUDIT_KEY_FILE, Config, SIGNING_KEY_FILE};

/// A file or directory whose permissions let someone else change (or read) a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {path} {problem} (mode {mode:04o}, owner uid {uid}): {fix}, or set \
     allow_insecure_files = true (AEGIS_ALLOW_INSECURE_FILES) if the volume cannot be \
     narrowed"
)]
pub struct InsecureFile {
    pub what: String,
    pub path: PathBuf,
    pub problem: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub fix: String,
}

/// What a path holds, and so what is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The data directory: nobody else may write it.
    Dir,
    /// A private key or secret: nobody else may write it, others may not read it.
    Private,
    /// A trusted public key: nobody else may write it.
    Public,
}

/// The process's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The problem with `meta` for a file of `kind`, if any.
fn problem(kind: Kind, meta: &std::fs::Metadata, me: u32) -> Option<(&'static str, String)> {
    let mode = meta.mode() & 0o7777;
    let uid = meta.uid();
    if uid != me && uid != 0 {
        return Some((
            "is owned by another user",
            format!("chown it to uid {me} (the user Aegis runs as)"),
        ));
    }
    if mode & 0o022 != 0 {
        let fix = match kind {
            Kind::Dir => "chmod 700 it",
            Kind::Private => "chmod 600 it",
            Kind::Public => "chmod 644 it",
        };
        return Some(("is writable by group or others", fix.to_owned()));
    }
    if kind == Kind::Private && mode & 0o004 != 0 {
        return Some(("is readable by others", "chmod 600 it (or 640)".to_owned()));
    }
    None
}

/// The paths of `config` to check, with what each holds. Files that do not exist yet are
/// left out (Aegis creates its own 0600; a missing configured file fails where it is read).
fn paths(config: &Config) -> Vec<(String, PathBuf, Kind)> {
    let mut out = vec![(
        "data directory".to_owned(),
        config.data_dir.clone(),
        Kind::Dir,
    )];
    for name in [SIGNING_KEY_FILE, AUDIT_KEY_FILE] {
        out.push((
            format!("data directory key {name}"),
            config.data_dir.join(name),
            Kind::Private,
        ));
    }
    let private = [
        ("signing_key_file", config.signing_key_file.as_ref()),
        (
            "audit.signing_key_file",
            config.audit.signing_key_file.as_ref(),
        ),
        ("tls.key_file", config.tls.key_file.as_ref()),
        ("control_tls.key_file", config.control_tls.key_file.as_ref()),
        ("control.key_file", config.control.key_file.as_ref()),
        ("control.token_file", config.control.token_file.as_ref()),
    ];
    for (setting, path) in private {
        if let Some(p) = path {
            out.push((setting.to_owned(), p.clone(), Kind::Private));
        }
    }
    let public = [
        ("token.trusted_keys", &config.token.trusted_keys),
        ("audit.trusted_keys", &config.audit.trusted_keys),
        ("policy.verification_key", &config.policy.verification_key),
    ];
    for (setting, paths) in public {
        for p in paths {
            out.push((setting.to_owned(), p.clone(), Kind::Public));
        }
    }
    out
}

/// Every permission problem of `config`'s data directory and key files.
pub fn insecure_files(config: &Config) -> Vec<InsecureFile> {
    let me = euid();
    let mut found = Vec::new();
    for (what, path, kind) in paths(config) {
        // A configured path is checked where it leads; an existing key in the data
        // directory that is a symbolic link is refused where it is read.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if let Some((problem, fix)) = problem(kind, &meta, me) {
            found.push(InsecureFile {
                what,
                path,
                problem,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                fix,
            });
        }
    }
    found
}

/// Refuses (or, with `allow_insecure_files`, warns about) every permission problem.
pub fn check(config: &Config) -> Result<(), InsecureFile> {
    for problem in insecure_files(config) {
        if config.allow_insecure_files {
            crate::log!(warn, "{problem} (allowed by allow_insecure_files)");
        } else {
            return Err(problem);
        }
    }
    Ok(())
}

/// Writes a secret (a credential, a key) readable and writable by its owner only, as
/// `aegis serve` requires of the files it is given.
pub fn write_secret(path: &Path, contents: &str) -> std::io::Result<()> {
    write_atomic(path, contents.as_bytes(), 0o600)
}

/// Replaces `path` with `bytes` so that a reader (or a crash) sees the old file or the
/// new one whole: written to `<path>.tmp` (any old one removed first, then created with
/// `O_EXCL` and `mode`, so a link planted there is neither followed nor written through),
/// synced, renamed into place, and the directory synced so the rename survives a power
/// loss. The temporary file is removed if a step fails.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Reads a key file Aegis keeps in its data directory without following a symbolic link
/// at its last component: a link planted there (to a file the attacker controls) fails
/// with `ELOOP` instead of being read.
pub fn read_private_in_dir(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_bytes_in_dir(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// [`read_private_in_dir`] for a file that is not necessarily text: refuses a symbolic
/// link rather than follow it.
pub fn read_bytes_in_dir(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other(
                "is a symbolic link; Aegis does not follow links in its data directory",
            ),
            _ => e,
        })?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

// === SQLite database files (the audit log's and the control store's) ===

/// Creates the database file 0600 if there is none yet, before SQLite does: its WAL and
/// shm files copy the database file's mode, so they start private too.
///
/// An existing file is never opened here. POSIX advisory locks belong to the process and
/// any close of any descriptor of the file releases them all: opening and closing the
/// database outside SQLite while a connection holds it (the checkpointer's connection
/// used to be opened this way) silently dropped the locks SQLite held for Aegis. Another
/// process's connection (an operator's `sqlite3`, a log shipper) then believed it was the
/// last one, deleted the WAL on close with answered rows in it, and could take the write
/// lock under a running Aegis.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let create = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
    };
    match create(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A link planted in place of the database is refused, not followed (SQLite
            // is told so too: `open_nofollow`).
            if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
                return Err(std::io::Error::other(
                    "is a symbolic link; Aegis does not follow links in its data directory",
                ));
            }
            // The database is there: say now if its directory cannot be written (a
            // read-only file system), which SQLite would only report as "unable to open
            // database file". Probed with another file, never the database itself.
            let probe = path.with_extension("write-probe");
            let _ = std::fs::remove_file(&probe); // left by a crash between these lines
            create(&probe)?;
            std::fs::remove_file(&probe)
        }
        Err(e) => Err(e),
    }
}

/// Opens a database read-write (created if missing) without following a symbolic link.
pub fn open_nofollow(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::default() | rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn meta_with(dir: &Path, name: &str, mode: u32) -> std::fs::Metadata {
        let p = dir.join(name);
        std::fs::write(&p, "x").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::fs::metadata(&p).expect("meta")
    }

    #[test]
    fn modes_each_kind_refuses() {
        let d = tempfile::tempdir().expect("tempdir");
        let me = euid();
        let cases = [
            (Kind::Private, 0o600, None),
            (Kind::Private, 0o640, None),
            (Kind::Private, 0o400, None),
            (Kind::Private, 0o644, Some("is readable by others")),
            (Kind::Private, 0o620, Some("is writable by group or others")),
            (Kind::Private, 0o602, Some("is writable by group or others")),
            (Kind::Public, 0o644, None),
            (Kind::Public, 0o664, Some("is writable by group or others")),
            (Kind::Dir, 0o700, None),
            (Kind::Dir, 0o755, None),
            (Kind::Dir, 0o777, Some("is writable by group or others")),
            (Kind::Dir, 0o770, Some("is writable by group or others")),
        ];
        for (i, (kind, mode, want)) in cases.into_iter().enumerate() {
            let meta = meta_with(d.path(), &format!("f{i}"), mode);
            assert_eq!(
                problem(kind, &meta, me).map(|p| p.0),
                want,
                "{kind:?} {mode:o}"
            );
        }
        // Owned by someone else (as seen by a process of another uid): refused, unless
        // that someone is root.
        let meta = meta_with(d.path(), "mine", 0o600);
        let other = if me == 4242 { 4243 } else { 4242 };
        if meta.uid() != 0 {
            assert_eq!(
                problem(Kind::Private, &meta, other).map(|p| p.0),
                Some("is owned by another user")
            );
        }
    }

    #[test]
    fn a_planted_link_in_the_data_directory_is_not_followed() {
        let d = tempfile::tempdir().expect("tempdir");
        let target = d.path().join("attacker.key");
        std::fs::write(&target, "00").expect("write");
        let link = d.path().join("signing.key");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let e = read_private_in_dir(&link).expect_err("a link");
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert_eq!(read_private_in_dir(&target).expect("file"), "00");
    }
}
