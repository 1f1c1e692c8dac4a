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

use super::state::State;
use crate::identity::{KillTarget, RevocationEntries};

/// File name in the sidecar's data directory.
pub const HELD_FILE: &str = "control-state.json";

/// The remembered position and revocations.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub epoch: u64,
    pub version: u64,
    /// The epoch of a refused rollback snapshot, not yet confirmed.
    pub refused_epoch: Option<u64>,
    /// Revoked token ids and their tokens' expiry.
    pub revoked: Vec<(String, i64)>,
    pub kills: Vec<Kill>,
}

/// A kill mark: every token of the scope issued at or before `before` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kill {
    /// `all`, `tenant`, `agent` or `session`.
    pub scope: String,
    pub tenant: String,
    pub target: String,
    pub before: i64,
}

// === impl Held ===

impl Held {
    /// What `state` holds now (None: no snapshot applied yet, nothing to remember).
    pub fn of(state: &State) -> Option<Self> {
        let (epoch, version) = state.held()?;
        let (jtis, marks) = state.revocations.entries();
        Some(Self {
            epoch,
            version,
            refused_epoch: state.rollback().map(|r| r.offered.0),
            revoked: jtis.into_iter().collect(),
            kills: marks.into_iter().map(|(t, b)| Kill::of(t, b)).collect(),
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

    /// Reads the file; None when there is none (a first start).
    pub fn load(path: &Path) -> Result<Option<Self>, String> {
        let bytes = match std::fs::read(path) {
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
    /// beside it, synced, then renamed over it, so a crash leaves the old or the new one.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, path))
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
            revoked: vec![("jti-1".into(), 1_900_000_000)],
            kills: vec![Kill::of(
                KillTarget::Agent {
                    tenant: "acme".into(),
                    agent: "bot".into(),
                },
                1_800_000_000,
            )],
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
}
