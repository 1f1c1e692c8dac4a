//! What a fleet sidecar remembers of the control state across its own restart: the
//! (epoch, version) it held, the epoch at which it refused a rollback, and the revoked
//! token ids and kill marks it knew.
//!
//! Without it, a sidecar restarted after its control plane was restored from a backup
//! would know no newer state and follow the restored one silently, un-revoking what the
//! backup lacks. With it, the first snapshot is judged against the remembered position:
//! a rollback is refused (the sidecar, with no state to decide from, fails closed until an
//! operator confirms the restore), and a confirmed restore keeps the remembered
//! revocations and kill marks until their tokens expire. Agent statuses, tenants and
//! budgets are not kept: a sidecar never decides from a remembered state, only from a
//! snapshot.
//!
//! The file (`control-state.json` in the data directory, 0600) is rewritten (a synced
//! temporary file renamed over it) after the events applied, by a task of the follower on
//! the blocking pool, a burst coalesced into one write. An unreadable file stops the
//! start: ignoring it would silently forget what it guards.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::{Refused, State};
use crate::identity::{KillTarget, RevocationEntries};

/// File name in the sidecar's data directory.
pub const HELD_FILE: &str = "control-state.json";

/// The remembered position and revocations.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The control plane's epoch of the state held.
    pub epoch: u64,
    /// The version last applied within that epoch.
    pub version: u64,
    /// The held epoch at which a rollback was refused: its later snapshots are refused
    /// too, until an operator confirms a higher one ([`super::state::Refused`]).
    pub refused_epoch: Option<u64>,
    /// A rollback was refused since the last snapshot followed: the next one followed
    /// keeps the revocations and kill marks held. (Absent in files of older versions.)
    #[serde(default)]
    pub refused_since_followed: bool,
    /// Revoked token ids and their tokens' expiry.
    pub revoked: Vec<(String, i64)>,
    /// Kill marks held.
    pub kills: Vec<Kill>,
    /// The history hash at the version held, hex (absent in files of older versions).
    #[serde(default)]
    pub chain: String,
}

/// A kill mark: every token of the scope issued at or before `before` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kill {
    /// `all`, `tenant`, `agent` or `session`.
    pub scope: String,
    /// The tenant of the scope (empty for `all`).
    pub tenant: String,
    /// The agent or session id (empty for `all` and `tenant`).
    pub target: String,
    /// Tokens issued at or before this are refused, Unix seconds.
    pub before: i64,
}

// === impl Held ===

impl Held {
    /// What `state` holds now (None: no snapshot applied yet, nothing to remember).
    pub fn of(state: &State) -> Option<Self> {
        let (epoch, version, chain) = state.held_with_chain()?;
        let (jtis, marks) = state.revocations.entries();
        // Before the first snapshot after a restart this is what was remembered, so a
        // save then keeps the refusal instead of forgetting it.
        let refused = state.refused();
        Some(Self {
            epoch,
            version,
            refused_epoch: refused.epoch,
            refused_since_followed: refused.since_followed,
            revoked: jtis.into_iter().collect(),
            kills: marks.into_iter().map(|(t, b)| Kill::of(t, b)).collect(),
            chain: crate::ids::hex(&chain),
        })
    }

    /// The revoked token ids and kill marks, as the revocation set takes them.
    pub fn revocations(&self) -> RevocationEntries {
        let jtis = self.revoked.iter().cloned().collect();
        let kills = self
            .kills
            .iter()
            .filter_map(|k| Some((k.target()?, k.before)))
            .collect();
        (jtis, kills)
    }

    /// Hands what was remembered to `state` (before its first snapshot).
    pub fn remember_in(&self, state: &State) {
        let refused = Refused {
            epoch: self.refused_epoch,
            // A file written before this flag existed: a remembered refusal implies it.
            since_followed: self.refused_since_followed || self.refused_epoch.is_some(),
        };
        state.remember((self.epoch, self.version), refused, self.revocations());
        // A hash that does not decode is not one: the control plane then cannot tell.
        state.remember_chain(crate::ids::unhex(&self.chain).unwrap_or_default());
    }

    /// Reads the file; None when there is none (a first start). A symbolic link is
    /// refused, not followed: someone who can write the data directory but not the file
    /// must not point it at another state.
    pub fn load(path: &Path) -> Result<Option<Self>, String> {
        let bytes = match crate::files::read_bytes_in_dir(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let bad = |e: String| {
            format!(
                "{}: {e}; it holds the control state this sidecar last saw (to refuse a \
                 rolled-back control plane): fix it or remove it",
                path.display()
            )
        };
        let held: Self = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if let Some(k) = held.kills.iter().find(|k| k.target().is_none()) {
            return Err(bad(format!("unknown kill scope {:?}", k.scope)));
        }
        Ok(Some(held))
    }

    /// Writes the file (0600, like the rest of the data directory): a temporary file
    /// beside it, synced, renamed over it, then the directory synced, so a crash leaves
    /// the old or the new one. The temporary file is created afresh (any old one removed
    /// first, then `O_EXCL`): a link planted in its place is removed, never written
    /// through.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        crate::files::write_atomic(path, &bytes, 0o600)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

// === impl Kill ===

impl Kill {
    fn of(target: KillTarget, before: i64) -> Self {
        let (scope, tenant, target) = match target {
            KillTarget::All => ("all", String::new(), String::new()),
            KillTarget::Tenant(t) => ("tenant", t, String::new()),
            KillTarget::Agent { tenant, agent } => ("agent", tenant, agent),
            KillTarget::Session { tenant, session } => ("session", tenant, session),
        };
        Self {
            scope: scope.to_owned(),
            tenant,
            target,
            before,
        }
    }

    fn target(&self) -> Option<KillTarget> {
        let (tenant, target) = (self.tenant.clone(), self.target.clone());
        Some(match self.scope.as_str() {
            "all" => KillTarget::All,
            "tenant" => KillTarget::Tenant(tenant),
            "agent" => KillTarget::Agent {
                tenant,
                agent: target,
            },
            "session" => KillTarget::Session {
                tenant,
                session: target,
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_saved_is_loaded_and_a_torn_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HELD_FILE);
        assert_eq!(Held::load(&path), Ok(None));
        let held = Held {
            epoch: 2,
            version: 9,
            refused_epoch: Some(2),
            refused_since_followed: true,
            revoked: vec![("jti-1".into(), 1_900_000_000)],
            kills: vec![Kill::of(
                KillTarget::Agent {
                    tenant: "acme".into(),
                    agent: "bot".into(),
                },
                1_800_000_000,
            )],
            chain: "ab".repeat(32),
        };
        held.save(&path).expect("save");
        assert_eq!(Held::load(&path), Ok(Some(held.clone())));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (jtis, kills) = held.revocations();
        assert_eq!(jtis.get("jti-1"), Some(&1_900_000_000));
        assert_eq!(kills.len(), 1);
        std::fs::write(&path, b"{\"epoch\": 2, \"vers").expect("tear");
        let err = Held::load(&path).expect_err("a torn file");
        assert!(
            err.contains(HELD_FILE) && err.contains("remove it"),
            "{err}"
        );
    }

    /// Finding B(a): a sidecar that refused a rollback of its epoch and restarts must keep
    /// refusing: what it saves before its first snapshot (its shutdown save, or one after a
    /// refused stale replica) still names the refused epoch.
    #[test]
    fn a_restart_before_the_first_snapshot_keeps_the_refused_epoch() {
        use crate::dataplane::state::Admission;
        use crate::identity::Revocations;
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HELD_FILE);
        // Written by the sidecar before its restart: it held (1, 5) and refused (1, 3).
        std::fs::write(
            &path,
            br#"{"epoch":1,"version":5,"refused_epoch":1,"revoked":[],"kills":[]}"#,
        )
        .expect("write");
        let held = Held::load(&path).expect("load").expect("a file");
        let state = State::new(Arc::new(Revocations::default()), false);
        held.remember_in(&state);
        let saved = Held::of(&state).expect("a position to save");
        assert_eq!(saved.refused_epoch, Some(1), "{saved:?}");
        saved.save(&path).expect("save");
        // Started again: the restored control plane counting past 5 is still refused.
        let state = State::new(Arc::new(Revocations::default()), false);
        Held::load(&path)
            .expect("load")
            .expect("a file")
            .remember_in(&state);
        let counted_up = crate::control::pb::WatchEvent {
            epoch: 1,
            version: 7,
            snapshot: true,
            ..Default::default()
        };
        assert_eq!(state.admit(&counted_up), Admission::Refuse);
    }

    /// Finding C: someone who can write the data directory (not the file) plants a link
    /// in the file's place: the state is not read through it.
    #[test]
    fn a_link_planted_in_place_of_the_file_is_not_read_through() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HELD_FILE);
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::write(
            &elsewhere,
            br#"{"epoch":0,"version":0,"refused_epoch":null,"revoked":[],"kills":[]}"#,
        )
        .expect("write");
        symlink(&elsewhere, &path).expect("symlink");
        let err = Held::load(&path).expect_err("a link is refused");
        assert!(
            err.contains(HELD_FILE) && err.contains("symbolic link"),
            "{err}"
        );
    }

    /// Finding C: a link planted in place of the temporary file is not written through
    /// (it would truncate and overwrite whatever it points at).
    #[test]
    fn a_link_planted_in_place_of_the_temporary_file_is_not_written_through() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HELD_FILE);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"do not touch").expect("write");
        symlink(&victim, path.with_extension("json.tmp")).expect("symlink");
        let held = Held {
            epoch: 3,
            version: 4,
            ..Held::default()
        };
        held.save(&path).expect("save");
        assert_eq!(std::fs::read(&victim).expect("read"), b"do not touch");
        assert_eq!(Held::load(&path), Ok(Some(held)));
        assert!(
            std::fs::symlink_metadata(&path)
                .expect("stat")
                .file_type()
                .is_file()
        );
    }
}
