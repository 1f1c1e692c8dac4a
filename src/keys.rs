//! The Ed25519 signing key in the data directory.
//!
//! `aegis serve` creates `signing.key` (the 32-byte seed, hex, mode 0600) and `signing.pub`
//! (the public key, hex) on first start, in a data directory created 0700. It signs agent
//! tokens and credentials. Audit checkpoints and evidence bundles are signed by a key of
//! their own, `audit.key` / `audit.pub` (or `audit.signing_key_file`): whoever can mint
//! tokens cannot also sign the log. Every message format carries its own prefix, so a
//! signature made for one can never be replayed as another.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// The key files' names inside the data directory (plain settings, kept by the config).
pub use crate::config::{AUDIT_KEY_FILE, AUDIT_PUBLIC_KEY_FILE, PUBLIC_KEY_FILE, SIGNING_KEY_FILE};

/// A failure to load or create the signing key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The data directory could not be created or checked.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key file could not be read or written.
    #[error("signing key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A private key file does not hold 64 hex digits.
    #[error("signing key {path} is not a 64-digit hex Ed25519 seed")]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
    /// A public key file does not hold 64 hex digits.
    #[error("public key {path} is not a 64-digit hex Ed25519 public key")]
    MalformedPublic {
        /// The key file.
        path: PathBuf,
    },
    /// A new key could not be drawn (the OS's error).
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// The process's signing key and its key id.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    kid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

// === impl Signer ===

impl Signer {
    /// Wraps a key; the key id is derived from the public key.
    pub fn new(key: SigningKey) -> Self {
        let kid = key_id(&key.verifying_key());
        Self { key, kid }
    }

    /// A fresh random key (tests and benchmarks).
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::new(SigningKey::from_bytes(&seed)))
    }

    /// Loads `signing.key` from `data_dir`, creating the directory and the key on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, KeyError> {
        Self::load_or_create_named(data_dir, SIGNING_KEY_FILE, PUBLIC_KEY_FILE)
    }

    fn load_or_create_named(data_dir: &Path, key: &str, public: &str) -> Result<Self, KeyError> {
        ensure_data_dir(data_dir)?;
        match Self::load_in_dir(&data_dir.join(key)) {
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let signer = Self::generate()?;
                write_private(&data_dir.join(key), &crate::hex(signer.key.as_bytes()))?;
                write_private(
                    &data_dir.join(public),
                    &crate::hex(signer.verifying_key().as_bytes()),
                )?;
                Ok(signer)
            }
            other => other,
        }
    }

    /// The key a configuration signs audit checkpoints with: `audit.signing_key_file` when
    /// set, else `data_dir/audit.key`, created on first use.
    pub fn for_audit(config: &crate::config::Config) -> Result<Self, KeyError> {
        match &config.audit.signing_key_file {
            Some(path) => {
                ensure_data_dir(&config.data_dir)?;
                Self::load_file(path)
            }
            None => Self::load_or_create_audit(&config.data_dir),
        }
    }

    /// Loads `audit.key` from `data_dir`, creating the directory and the key on first use.
    pub fn load_or_create_audit(data_dir: &Path) -> Result<Self, KeyError> {
        Self::load_or_create_named(data_dir, AUDIT_KEY_FILE, AUDIT_PUBLIC_KEY_FILE)
    }

    /// The audit key of a data directory, for commands that only read (`aegis audit
    /// export`): `audit.key`, or `signing.key` for a directory from before the split.
    pub fn load_audit(data_dir: &Path) -> Result<Self, KeyError> {
        let audit = data_dir.join(AUDIT_KEY_FILE);
        if audit.exists() {
            Self::load_in_dir(&audit)
        } else {
            Self::load(data_dir)
        }
    }

    /// The key a configuration signs with: `signing_key_file` when set (read as is; the
    /// data directory is still created, for the databases), else `data_dir/signing.key`,
    /// created on first use.
    pub fn for_config(config: &crate::config::Config) -> Result<Self, KeyError> {
        match &config.signing_key_file {
            Some(path) => {
                ensure_data_dir(&config.data_dir)?;
                Self::load_file(path)
            }
            None => Self::load_or_create(&config.data_dir),
        }
    }

    /// Loads an existing key without creating anything (CLI commands that only read).
    pub fn load(data_dir: &Path) -> Result<Self, KeyError> {
        Self::load_in_dir(&data_dir.join(SIGNING_KEY_FILE))
    }

    /// Loads a key Aegis keeps in its data directory, without following a symbolic link:
    /// a link planted in place of the key is refused, not read.
    fn load_in_dir(path: &Path) -> Result<Self, KeyError> {
        let text = crate::files::read_private_in_dir(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_seed_text(&text, path)
    }

    /// Loads the seed (64 hex digits, the format of `signing.key`) from `path`, e.g. a
    /// mounted Secret (`signing_key_file`) or a bundle signing key.
    pub fn load_file(path: &Path) -> Result<Self, KeyError> {
        let path = path.to_path_buf();
        let text = fs::read_to_string(&path).map_err(|source| KeyError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_seed_text(&text, &path)
    }

    fn from_seed_text(text: &str, path: &Path) -> Result<Self, KeyError> {
        let seed = crate::unhex(text.trim())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| KeyError::Malformed {
                path: path.to_path_buf(),
            })?;
        Ok(Self::new(SigningKey::from_bytes(&seed)))
    }

    /// The key id written into token headers and audit rows.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs `msg` (the caller prefixes it with its own domain tag).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.key.sign(msg).to_bytes()
    }
}

/// Writes a fresh key pair: the seed to `path` (0600, refusing to overwrite) and the
/// public key to `path` + `.pub`, in the formats of `signing.key` and `signing.pub`.
pub fn write_keypair(path: &Path) -> Result<Signer, KeyError> {
    let signer = Signer::generate()?;
    let mut public = path.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    write_private(path, &crate::hex(signer.key.as_bytes()))?;
    let io = |source| KeyError::Io {
        path: public.clone(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&public)
        .map_err(io)?;
    writeln!(f, "{}", crate::hex(signer.verifying_key().as_bytes())).map_err(io)?;
    Ok(signer)
}

/// The key id of a public key: `ed25519:` and the first 16 hex digits of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    format!("ed25519:{}", crate::hex(&digest[..8]))
}

/// Reads a public key file (64 hex digits).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    crate::unhex(text.trim())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| KeyError::MalformedPublic {
            path: path.to_path_buf(),
        })
}

/// Creates the data directory (0700) if it does not exist.
pub fn ensure_data_dir(dir: &Path) -> Result<(), KeyError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::DataDir {
            path: dir.to_path_buf(),
            source,
        })
}

fn write_private(path: &Path, text: &str) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)?;
    f.sync_all().map_err(io)?;
    // The umask may have narrowed the mode further, never widened it; make it exact.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)
}
