//! A data plane's view of the control state, read on every Check.
//!
//! Built from the control plane's `Watch` events: a snapshot replaces everything, a delta
//! upserts the items it carries. The all-in-one server applies every change before the
//! control call that made it returns; a fleet sidecar applies them as they arrive. Reads
//! take one short read lock and never await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::budget::Limit;
use super::pb::{self, KillScope, state_item::Item};
use crate::identity::{Claims, KillTarget, Revocations};

/// An agent's status as the data plane enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStatus {
    Active,
    Frozen,
    Revoked,
    /// State-mutating calls need an approval.
    Restricted,
    /// Not registered with the control plane (a token minted offline): policy decides.
    Unregistered,
    /// Of a tenant this sidecar does not serve: it is sent none of that tenant's state
    /// (freezes, kills), so it denies rather than decide blind.
    NotServed,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => super::ACTIVE,
            AgentStatus::Frozen => super::FROZEN,
            AgentStatus::Revoked => super::REVOKED,
            AgentStatus::Restricted => super::RESTRICTED,
            AgentStatus::Unregistered => "unregistered",
            AgentStatus::NotServed => "tenant_not_served",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            super::ACTIVE => AgentStatus::Active,
            super::FROZEN => AgentStatus::Frozen,
            super::REVOKED => AgentStatus::Revoked,
            super::RESTRICTED => AgentStatus::Restricted,
            _ => return None,
        })
    }
}

/// What a Check needs to know about its agent and tenant.
#[derive(Debug, Clone)]
pub struct AgentContext {
    pub status: AgentStatus,
    pub risk_tier: Arc<str>,
    /// The tenant runs in shadow mode: denies are recorded as `would_deny` and let through.
    pub shadow: bool,
    pub budget: Option<Limit>,
}

impl AgentContext {
    /// An agent the control plane does not know, in an enforcing tenant, without a budget.
    pub fn unregistered() -> Self {
        Self {
            status: AgentStatus::Unregistered,
            risk_tier: Arc::from("unspecified"),
            shadow: false,
            budget: None,
        }
    }
}

#[derive(Debug, Clone)]
struct AgentEntry {
    status: AgentStatus,
    risk_tier: Arc<str>,
}

#[derive(Debug, Clone, Copy)]
struct TenantEntry {
    shadow: bool,
    autonomy_level: u32,
}

#[derive(Debug, Default)]
struct View {
    /// tenant → agent id → entry.
    agents: HashMap<String, HashMap<String, AgentEntry>>,
    tenants: HashMap<String, TenantEntry>,
    budgets: HashMap<String, HashMap<String, Limit>>,
    policy: Option<pb::PolicyRef>,
}

/// The control state a data plane enforces.
#[derive(Debug)]
pub struct State {
    /// Revoked tokens and kill marks (checked when the token is verified).
    pub revocations: Arc<Revocations>,
    view: RwLock<View>,
    version: AtomicU64,
    /// Whether a snapshot has been applied: a fleet sidecar without one fails closed.
    synced: AtomicBool,
    unregistered_tier: Arc<str>,
    /// A fleet sidecar's tenants (its credential's); unset: every tenant (all-in-one).
    served: std::sync::OnceLock<Vec<String>>,
}

// === impl State ===

impl State {
    /// An empty state; `synced` says whether Checks may be decided before a snapshot
    /// arrives (true for the all-in-one server, which loads its own).
    pub fn new(revocations: Arc<Revocations>, synced: bool) -> Self {
        Self {
            revocations,
            view: RwLock::new(View::default()),
            version: AtomicU64::new(0),
            synced: AtomicBool::new(synced),
            unregistered_tier: Arc::from("unspecified"),
            served: std::sync::OnceLock::new(),
        }
    }

    /// Decide only for `tenants` (a fleet sidecar's, set once at start).
    pub fn serve_only(&self, tenants: Vec<String>) {
        let _ = self.served.set(tenants);
    }

    /// Whether a snapshot has been applied.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The version of the last event applied.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The active policy revision, as the control plane last said.
    pub fn policy(&self) -> Option<pb::PolicyRef> {
        self.read().policy.clone()
    }

    /// The agent's status, risk tier, tenant mode and budget.
    pub fn agent(&self, claims: &Claims) -> AgentContext {
        if let Some(served) = self.served.get()
            && !served.contains(&claims.tenant)
        {
            return AgentContext {
                status: AgentStatus::NotServed,
                ..AgentContext::unregistered()
            };
        }
        let v = self.read();
        let agent = v
            .agents
            .get(&claims.tenant)
            .and_then(|m| m.get(&claims.sub));
        AgentContext {
            status: agent.map_or(AgentStatus::Unregistered, |a| a.status),
            risk_tier: agent
                .map_or_else(|| self.unregistered_tier.clone(), |a| a.risk_tier.clone()),
            shadow: v.tenants.get(&claims.tenant).is_some_and(|t| t.shadow),
            budget: v
                .budgets
                .get(&claims.tenant)
                .and_then(|m| m.get(&claims.sub))
                .copied(),
        }
    }

    /// The tenant's SOC autonomy level, if the control plane has set one.
    pub fn autonomy_level(&self, tenant: &str) -> Option<u32> {
        self.read().tenants.get(tenant).map(|t| t.autonomy_level)
    }

    /// Applies one event. Returns the policy reference when the event changed it (the
    /// caller fetches and installs that bundle).
    pub fn apply(&self, event: &pb::WatchEvent) -> Option<pb::PolicyRef> {
        let policy_before = self.policy();
        if event.snapshot {
            self.replace(&event.items);
        } else {
            self.upsert(&event.items);
        }
        self.version.store(event.version, Ordering::Release);
        if event.snapshot {
            self.synced.store(true, Ordering::Release);
        }
        let after = self.policy();
        (after != policy_before || event.snapshot)
            .then_some(after)
            .flatten()
    }

    fn replace(&self, items: &[pb::StateItem]) {
        let mut view = View::default();
        let mut jtis = HashMap::new();
        let mut kills = Vec::new();
        for item in items.iter().filter_map(|i| i.item.as_ref()) {
            match item {
                Item::RevokedToken(t) => {
                    jtis.insert(t.jti.clone(), t.expires_at);
                }
                Item::Kill(k) => kills.extend(kill_target(k).map(|t| (t, k.before))),
                other => view.upsert(other),
            }
        }
        self.revocations.replace(jtis, kills);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
    }

    fn upsert(&self, items: &[pb::StateItem]) {
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        for item in items.iter().filter_map(|i| i.item.as_ref()) {
            match item {
                Item::RevokedToken(t) => self.revocations.revoke_token_until(&t.jti, t.expires_at),
                Item::Kill(k) => {
                    if let Some(target) = kill_target(k) {
                        self.revocations.kill(target, k.before);
                    }
                }
                other => view.upsert(other),
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }
}

// === impl View ===

impl View {
    fn upsert(&mut self, item: &Item) {
        match item {
            Item::Agent(a) => {
                let entry = AgentEntry {
                    // An unknown status from a newer control plane is enforced as frozen:
                    // fail closed rather than let an agent through on a word we don't know.
                    status: AgentStatus::parse(&a.status).unwrap_or(AgentStatus::Frozen),
                    risk_tier: Arc::from(a.risk_tier.as_str()),
                };
                self.agents
                    .entry(a.tenant.clone())
                    .or_default()
                    .insert(a.id.clone(), entry);
            }
            Item::Tenant(t) => {
                self.tenants.insert(
                    t.name.clone(),
                    TenantEntry {
                        shadow: t.mode == super::SHADOW,
                        autonomy_level: t.autonomy_level,
                    },
                );
            }
            Item::Budget(b) => {
                let per_tenant = self.budgets.entry(b.tenant.clone()).or_default();
                if b.max_calls == 0 && b.max_cost <= 0.0 {
                    per_tenant.remove(&b.agent);
                } else {
                    per_tenant.insert(
                        b.agent.clone(),
                        Limit {
                            max_calls: b.max_calls,
                            max_cost: b.max_cost,
                            window_secs: b.window_secs,
                        },
                    );
                }
            }
            Item::Policy(p) => self.policy = Some(p.clone()),
            Item::RevokedToken(_) | Item::Kill(_) => {}
        }
    }
}

/// The revocation-set key of a kill mark (token kills travel as revoked tokens).
pub fn kill_target(k: &pb::KillMark) -> Option<KillTarget> {
    match KillScope::try_from(k.scope).ok()? {
        KillScope::Session => Some(KillTarget::Session {
            tenant: k.tenant.clone(),
            session: k.target.clone(),
        }),
        KillScope::Agent => Some(KillTarget::Agent {
            tenant: k.tenant.clone(),
            agent: k.target.clone(),
        }),
        KillScope::Tenant => Some(KillTarget::Tenant(k.tenant.clone())),
        KillScope::All => Some(KillTarget::All),
        KillScope::Token | KillScope::Unspecified => None,
    }
}
