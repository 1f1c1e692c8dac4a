//! The in-memory revocation set, checked on every Check.
//!
//! Filled from the control plane's state: revoked token ids, and kill marks. A kill of a
//! session, an agent, a tenant or everything is a mark "every token of this scope issued at
//! or before `before` is refused": tokens issued later (a rotation after the kill, say) are
//! not affected, tokens the control plane never saw (minted offline) are caught all the
//! same. A lookup is a few hash probes under one read lock.

use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;

use super::Claims;

/// Revoked token ids (with their tokens' expiry) and kill marks (target, `before`).
pub type RevocationEntries = (HashMap<String, i64>, Vec<(KillTarget, i64)>);

/// Which entry of the revocation set matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedBy {
    /// The token's own id (`jti`) is revoked.
    Token,
    /// A kill of the token's session.
    Session,
    /// A kill of the token's agent.
    Agent,
    /// A kill of the token's tenant.
    Tenant,
    /// A kill of every token.
    All,
}

impl fmt::Display for RevokedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevokedBy::Token => "token",
            RevokedBy::Session => "session killed",
            RevokedBy::Agent => "agent killed",
            RevokedBy::Tenant => "tenant killed",
            RevokedBy::All => "every token killed",
        })
    }
}

/// A kill's scope, as kept in the set. Sessions and agents are keyed by tenant too: ids
/// are only unique within a tenant, and one tenant's kill must never reach another's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KillTarget {
    /// Every token of one session of a tenant.
    Session {
        /// The session's tenant.
        tenant: String,
        /// The session id (token `sid`).
        session: String,
    },
    /// Every token of one agent of a tenant.
    Agent {
        /// The agent's tenant.
        tenant: String,
        /// The agent id (token `sub`).
        agent: String,
    },
    /// Every token of the tenant named.
    Tenant(String),
    /// Every token of every tenant.
    All,
}

#[derive(Debug, Default)]
struct Sets {
    /// Revoked token ids and their expiry (an entry is useless once the token has expired).
    jtis: HashMap<String, i64>,
    /// Kill marks (tokens of the scope with `iat <= mark` are refused), nested by tenant so
    /// a lookup borrows the claims' strings instead of building keys.
    all: Option<i64>,
    tenants: HashMap<String, i64>,
    agents: HashMap<String, HashMap<String, i64>>,
    sessions: HashMap<String, HashMap<String, i64>>,
}

impl Sets {
    fn mark(&mut self, target: KillTarget, before: i64) {
        let slot = match target {
            KillTarget::All => self.all.get_or_insert(before),
            KillTarget::Tenant(t) => self.tenants.entry(t).or_insert(before),
            KillTarget::Agent { tenant, agent } => self
                .agents
                .entry(tenant)
                .or_default()
                .entry(agent)
                .or_insert(before),
            KillTarget::Session { tenant, session } => self
                .sessions
                .entry(tenant)
                .or_default()
                .entry(session)
                .or_insert(before),
        };
        *slot = (*slot).max(before);
    }

    /// The mark held for `target`, if any.
    fn get(&self, target: &KillTarget) -> Option<i64> {
        match target {
            KillTarget::All => self.all,
            KillTarget::Tenant(t) => self.tenants.get(t).copied(),
            KillTarget::Agent { tenant, agent } => {
                self.agents.get(tenant).and_then(|m| m.get(agent)).copied()
            }
            KillTarget::Session { tenant, session } => self
                .sessions
                .get(tenant)
                .and_then(|m| m.get(session))
                .copied(),
        }
    }

    /// Every kill mark held.
    fn marks(&self) -> Vec<(KillTarget, i64)> {
        let mut out: Vec<(KillTarget, i64)> =
            self.all.map(|b| (KillTarget::All, b)).into_iter().collect();
        out.extend(
            self.tenants
                .iter()
                .map(|(t, b)| (KillTarget::Tenant(t.clone()), *b)),
        );
        for (tenant, m) in &self.agents {
            out.extend(m.iter().map(|(agent, b)| {
                let target = KillTarget::Agent {
                    tenant: tenant.clone(),
                    agent: agent.clone(),
                };
                (target, *b)
            }));
        }
        for (tenant, m) in &self.sessions {
            out.extend(m.iter().map(|(session, b)| {
                let target = KillTarget::Session {
                    tenant: tenant.clone(),
                    session: session.clone(),
                };
                (target, *b)
            }));
        }
        out
    }

    fn has_kills(&self) -> bool {
        self.all.is_some()
            || !self.tenants.is_empty()
            || !self.agents.is_empty()
            || !self.sessions.is_empty()
    }
}

/// Revoked token ids and kill marks.
#[derive(Debug, Default)]
pub struct Revocations {
    sets: RwLock<Sets>,
    /// Token revocations and kill marks applied one by one since start (pushed deltas
    /// and local actions; a snapshot that replaces the set is not counted).
    applied_tokens: std::sync::atomic::AtomicU64,
    applied_kills: std::sync::atomic::AtomicU64,
}

impl Revocations {
    /// Revokes one token by `jti` (`exp`: its expiry, when known; 0 keeps it forever).
    pub fn revoke_token(&self, jti: &str) {
        self.revoke_token_until(jti, i64::MAX);
    }

    /// Revokes one token by `jti`, remembered until `exp`.
    pub fn revoke_token_until(&self, jti: &str, exp: i64) {
        let mut fresh = false;
        self.write(|s| {
            fresh = s.jtis.insert(jti.to_owned(), exp).is_none();
        });
        if fresh {
            self.applied_tokens
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Refuses every token of `target` issued at or before `before` (Unix seconds). A later
    /// mark for the same target only ever moves it forward.
    pub fn kill(&self, target: KillTarget, before: i64) {
        self.write(|s| s.mark(target, before));
        self.applied_kills
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the whole set (a control-plane snapshot).
    pub fn replace(&self, jtis: HashMap<String, i64>, kills: Vec<(KillTarget, i64)>) {
        let mut fresh = Sets {
            jtis,
            ..Sets::default()
        };
        for (target, before) in kills {
            fresh.mark(target, before);
        }
        self.write(|s| *s = fresh);
    }

    /// Replaces the whole set with the snapshot of a new control-state epoch (an operator
    /// confirmed a restored control plane), keeping what is held now and can still matter:
    /// a restored backup lacks the revocations and kills made after it was taken, and
    /// forgetting them would let those tokens in again. Kept: revoked token ids whose
    /// token has not expired (`exp + slack > now`), and kill marks that may still cover an
    /// unexpired token (`before + max_token_ttl + slack > now`: every token such a mark
    /// covers was issued at or before `before`). Returns (token ids, kill marks) kept that
    /// the snapshot lacked.
    pub fn replace_keeping(
        &self,
        jtis: HashMap<String, i64>,
        kills: Vec<(KillTarget, i64)>,
        now: i64,
        slack: i64,
        max_token_ttl: i64,
    ) -> (usize, usize) {
        let mut fresh = Sets {
            jtis,
            ..Sets::default()
        };
        for (target, before) in kills {
            fresh.mark(target, before);
        }
        let mut kept = (0, 0);
        self.write(|held| {
            for (jti, exp) in &held.jtis {
                if exp.saturating_add(slack) > now && !fresh.jtis.contains_key(jti) {
                    fresh.jtis.insert(jti.clone(), *exp);
                    kept.0 += 1;
                }
            }
            for (target, before) in held.marks() {
                let live = before.saturating_add(max_token_ttl).saturating_add(slack) > now;
                if live && fresh.get(&target).is_none_or(|b| b < before) {
                    fresh.mark(target, before);
                    kept.1 += 1;
                }
            }
            *held = fresh;
        });
        kept
    }

    /// Every revoked token id (with its expiry) and kill mark held.
    pub fn entries(&self) -> RevocationEntries {
        let s = self.sets.read().unwrap_or_else(|p| p.into_inner());
        (s.jtis.clone(), s.marks())
    }

    /// Drops revoked token ids whose token expired before `now - leeway`.
    pub fn prune(&self, now: i64, leeway: i64) {
        self.write(|s| s.jtis.retain(|_, exp| exp.saturating_add(leeway) > now));
    }

    /// (token revocations, kill marks) applied one by one since start.
    pub fn applied(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.applied_tokens.load(Relaxed),
            self.applied_kills.load(Relaxed),
        )
    }

    /// Revoked token ids held now.
    pub fn revoked_tokens(&self) -> usize {
        self.sets.read().map_or(0, |s| s.jtis.len())
    }

    /// The first entry that revokes `claims`, if any.
    pub fn check(&self, claims: &Claims) -> Option<RevokedBy> {
        // A poisoned lock means a writer panicked mid-update: refuse rather than guess.
        let Ok(s) = self.sets.read() else {
            return Some(RevokedBy::All);
        };
        if s.jtis.contains_key(&claims.jti) {
            return Some(RevokedBy::Token);
        }
        if !s.has_kills() {
            return None;
        }
        let killed = |mark: Option<&i64>| mark.is_some_and(|b| claims.iat <= *b);
        if killed(s.all.as_ref()) {
            Some(RevokedBy::All)
        } else if killed(s.tenants.get(&claims.tenant)) {
            Some(RevokedBy::Tenant)
        } else if killed(
            s.agents
                .get(&claims.tenant)
                .and_then(|m| m.get(&claims.sub)),
        ) {
            Some(RevokedBy::Agent)
        } else if killed(
            s.sessions
                .get(&claims.tenant)
                .and_then(|m| m.get(&claims.sid)),
        ) {
            Some(RevokedBy::Session)
        } else {
            None
        }
    }

    fn write(&self, f: impl FnOnce(&mut Sets)) {
        let mut guard = self.sets.write().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }
}
