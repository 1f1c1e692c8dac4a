//! The in-memory revocation set, checked on every Check.
//!
//! Filled by the control plane (token revocation, session/agent/tenant kills); a lookup is
//! four hash probes under one read lock.

use std::collections::HashSet;
use std::fmt;
use std::sync::RwLock;

use super::Claims;

/// Which entry of the revocation set matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedBy {
    Token,
    Session,
    Agent,
    Tenant,
}

impl fmt::Display for RevokedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevokedBy::Token => "token",
            RevokedBy::Session => "session",
            RevokedBy::Agent => "agent",
            RevokedBy::Tenant => "tenant",
        })
    }
}

#[derive(Debug, Default)]
struct Sets {
    jtis: HashSet<String>,
    sessions: HashSet<String>,
    /// `tenant/agent`, since agent ids are only unique within a tenant.
    agents: HashSet<String>,
    tenants: HashSet<String>,
}

/// Revoked token ids, sessions, agents and tenants.
#[derive(Debug, Default)]
pub struct Revocations {
    sets: RwLock<Sets>,
}

impl Revocations {
    /// Revokes one token by `jti`.
    pub fn revoke_token(&self, jti: &str) {
        self.write(|s| s.jtis.insert(jti.to_owned()));
    }

    /// Revokes every token of a session.
    pub fn revoke_session(&self, sid: &str) {
        self.write(|s| s.sessions.insert(sid.to_owned()));
    }

    /// Revokes every token of an agent.
    pub fn revoke_agent(&self, tenant: &str, agent: &str) {
        self.write(|s| s.agents.insert(format!("{tenant}/{agent}")));
    }

    /// Revokes every token of a tenant.
    pub fn revoke_tenant(&self, tenant: &str) {
        self.write(|s| s.tenants.insert(tenant.to_owned()));
    }

    /// The first entry that revokes `claims`, if any.
    pub fn check(&self, claims: &Claims) -> Option<RevokedBy> {
        // A poisoned lock means a writer panicked mid-update: refuse rather than guess.
        let Ok(s) = self.sets.read() else {
            return Some(RevokedBy::Tenant);
        };
        if s.jtis.contains(&claims.jti) {
            Some(RevokedBy::Token)
        } else if s.sessions.contains(&claims.sid) {
            Some(RevokedBy::Session)
        } else if s.tenants.contains(&claims.tenant) {
            Some(RevokedBy::Tenant)
        } else if !s.agents.is_empty()
            && s.agents
                .contains(&format!("{}/{}", claims.tenant, claims.sub))
        {
            Some(RevokedBy::Agent)
        } else {
            None
        }
    }

    fn write(&self, f: impl FnOnce(&mut Sets) -> bool) {
        let mut guard = self.sets.write().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }
}
