//! A data plane's view of the control state, read on every Check.
//!
//! Built from the control plane's `Watch` events: a snapshot replaces everything, a delta
//! upserts the items it carries. The all-in-one server applies every change before the
//! control call that made it returns; a fleet sidecar applies them as they arrive. Reads
//! take one short read lock and never await.
//!
//! The state carries the control plane's (epoch, version). A fleet sidecar follows a
//! snapshot only forward ([`admission`]): a lower one is a rollback (a restored backup, a
//! stale replica, someone with the control plane's disk) that would silently undo
//! revocations, kills and freezes, so the sidecar keeps deciding from what it holds until
//! an operator raises the epoch; then it keeps the revocations and kill marks it knew
//! until the tokens they cover expire.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::budget::Limit;
use crate::control::pb::{self, KillScope, state_item::Item};
use crate::identity::{Claims, KillTarget, RevocationEntries, Revocations};
use crate::types::AgentStatus as Status;

/// An agent's status as the data plane enforces it: the control plane's
/// [`crate::types::AgentStatus`] and two only a sidecar knows (unregistered, tenant not
/// served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStatus {
    /// Enforced as the policy decides.
    Active,
    /// Every Check denied until an operator unfreezes the agent.
    Frozen,
    /// Every Check denied, for good.
    Revoked,
    /// State-mutating calls need an approval.
    Restricted,
    /// Not registered with the control plane (a token minted offline): policy decides.
    Unregistered,
    /// Of a tenant this sidecar does not serve: it is sent none of that tenant's state
    /// (freezes, kills), so it denies rather than decide blind.
    NotServed,
}

/// How much an agent status denies, for [`State::apply_restrictive`].
fn strictness(s: AgentStatus) -> u8 {
    match s {
        AgentStatus::Active | AgentStatus::Unregistered | AgentStatus::NotServed => 0,
        AgentStatus::Restricted => 1,
        AgentStatus::Frozen => 2,
        AgentStatus::Revoked => 3,
    }
}

impl AgentStatus {
    /// The status's name in `input.agent.status` and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => Status::Active.as_str(),
            AgentStatus::Frozen => Status::Frozen.as_str(),
            AgentStatus::Revoked => Status::Revoked.as_str(),
            AgentStatus::Restricted => Status::Restricted.as_str(),
            AgentStatus::Unregistered => "unregistered",
            AgentStatus::NotServed => "tenant_not_served",
        }
    }

    /// The control plane's status word (None: not one).
    pub fn parse(s: &str) -> Option<Self> {
        s.parse::<Status>().ok().map(Self::from)
    }
}

impl From<Status> for AgentStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Active => AgentStatus::Active,
            Status::Restricted => AgentStatus::Restricted,
            Status::Frozen => AgentStatus::Frozen,
            Status::Revoked => AgentStatus::Revoked,
        }
    }
}

/// What a Check needs to know about its agent and tenant.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// The agent's status as the control plane last said.
    pub status: AgentStatus,
    /// `low`, `medium`, `high` or `critical`, as registered (`input.agent.risk_tier`).
    pub risk_tier: Arc<str>,
    /// The tenant runs in shadow mode: denies are recorded as `would_deny` and let through.
    pub shadow: bool,
    /// The agent's budget, if one is set.
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

/// What a follower does with a snapshot, by its (epoch, version) against the held one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Nothing held yet, or the same epoch at the same or a later version: replace.
    Follow,
    /// A higher epoch (an operator confirmed a restore), or a forward snapshot after a
    /// rollback was refused: replace, keeping the revocations and kill marks held until
    /// the tokens they cover expire.
    Restore,
    /// A lower epoch, or a lower version of the held epoch: a rollback. Keep the state.
    Refuse,
}

/// What a follower remembers of the rollbacks it refused, for [`admission`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The held epoch at which a rollback was refused (a snapshot of that very epoch, at a
    /// lower version): every later snapshot of it is refused too. Set only by a refusal at
    /// the held epoch, so refusing a stale replica of an older one never replaces it.
    pub epoch: Option<u64>,
    /// A rollback (of any epoch) was refused since the last snapshot followed.
    pub since_followed: bool,
}

/// The rule: `held` is the (epoch, version) held (None: no snapshot yet), `offered` the
/// snapshot's. Once a rollback of the held epoch has been refused (`refused.epoch`), every
/// later snapshot of that epoch is refused too, even at a higher version: the
/// rolled-back control plane counts up again from its old version, and reaching the held
/// number does not bring back what it lost. Only a higher epoch is followed then. (A
/// refused snapshot of an older epoch, a stale replica, does not stop the sidecar from
/// following the held epoch forward when the primary is back.)
///
/// After any refusal (`refused.since_followed`) the next snapshot followed is taken as a
/// restore, keeping the revocations and kill marks held: a control plane restored from an
/// older epoch and then confirmed can land on an epoch this sidecar already held (one the
/// control plane never saw), and its snapshot would otherwise silently replace the lost
/// history's revocations and kills.
///
/// `diverged`: the control plane says the snapshot is not of the history held (its store
/// holds another at the held version: a restored backup that moved on past it, a
/// failover that lost commits). Within the held epoch that is a rollback, whatever the
/// version; only a higher epoch (a confirmed restore) is followed.
pub fn admission(
    held: Option<(u64, u64)>,
    refused: Refused,
    offered: (u64, u64),
    diverged: bool,
) -> Admission {
    let Some(held) = held else {
        return Admission::Follow;
    };
    if offered.0 > held.0 {
        Admission::Restore
    } else if diverged {
        Admission::Refuse
    } else if offered.0 == held.0 && refused.epoch != Some(held.0) && offered.1 >= held.1 {
        if refused.since_followed {
            Admission::Restore
        } else {
            Admission::Follow
        }
    } else {
        Admission::Refuse
    }
}

/// A refused rollback: the (epoch, version) held and the lower one offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollback {
    /// The (epoch, version) this data plane holds.
    pub held: (u64, u64),
    /// The lower (epoch, version) it was offered and refused.
    pub offered: (u64, u64),
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "control plane rollback refused: it offers state epoch {} version {}, which does \
             not follow epoch {} version {} held here (an older epoch or version, or the same \
             epoch counting again after a refused rollback: restored from a backup? a stale \
             replica?); deciding from the state held (with none since a restart: failing \
             closed) until an operator runs `aegis ctl state confirm-restore`",
            self.offered.0, self.offered.1, self.held.0, self.held.1
        )
    }
}

/// The rollbacks refused, kept together under one lock.
#[derive(Debug, Default)]
struct Refusal {
    /// The rollback being refused now, if any (for readiness and metrics): cleared when a
    /// snapshot is followed.
    now: Option<Rollback>,
    /// For [`admission`]; also remembered across a restart ([`super::held`]).
    refused: Refused,
}

/// The control state a data plane enforces.
#[derive(Debug)]
pub struct State {
    /// Revoked tokens and kill marks (checked when the token is verified).
    pub revocations: Arc<Revocations>,
    view: RwLock<View>,
    version: AtomicU64,
    /// Raised only by an operator's confirmation of a restore.
    epoch: AtomicU64,
    /// Whether a snapshot has been applied: a fleet sidecar without one fails closed.
    synced: AtomicBool,
    unregistered_tier: Arc<str>,
    /// A fleet sidecar's tenants (its credential's); unset: every tenant (all-in-one).
    served: std::sync::OnceLock<Vec<String>>,
    /// The rollback refused now and what [`admission`] must remember of refusals.
    refusal: RwLock<Refusal>,
    /// The (epoch, version) held before this process started ([`super::held`]), until
    /// a snapshot is applied.
    remembered: RwLock<Option<(u64, u64)>>,
    /// The history hash at the version held ([`pb::WatchEvent::chain`]); before the first
    /// snapshot, the one remembered from before a restart.
    chain: RwLock<Vec<u8>>,
    /// Rollback snapshots refused since start.
    rollbacks_refused: AtomicU64,
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
            epoch: AtomicU64::new(0),
            synced: AtomicBool::new(synced),
            unregistered_tier: Arc::from("unspecified"),
            served: std::sync::OnceLock::new(),
            refusal: RwLock::new(Refusal::default()),
            remembered: RwLock::new(None),
            chain: RwLock::new(Vec::new()),
            rollbacks_refused: AtomicU64::new(0),
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

    /// The epoch of the last event applied.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The rollback refused now, if any (for readiness and metrics).
    pub fn rollback(&self) -> Option<Rollback> {
        self.refusal.read().unwrap_or_else(|p| p.into_inner()).now
    }

    /// What is remembered of the rollbacks refused (also across a restart).
    pub fn refused(&self) -> Refused {
        self.refusal
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .refused
    }

    /// Rollback snapshots refused since start.
    pub fn rollbacks_refused(&self) -> u64 {
        self.rollbacks_refused.load(Ordering::Relaxed)
    }

    /// The (epoch, version) held: the last applied, or before the first snapshot, the
    /// one remembered from before a restart (None: neither).
    pub fn held(&self) -> Option<(u64, u64)> {
        if self.synced() {
            return Some((self.epoch(), self.version()));
        }
        *self.remembered.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The (epoch, version) held and the history hash at it, read together (a save never
    /// pairs a new version with an old hash).
    pub fn held_with_chain(&self) -> Option<(u64, u64, Vec<u8>)> {
        let chain = self.chain.read().unwrap_or_else(|p| p.into_inner());
        let (epoch, version) = self.held()?;
        Some((epoch, version, chain.clone()))
    }

    /// Takes the history hash a sidecar remembered with its position across a restart.
    pub fn remember_chain(&self, chain: Vec<u8>) {
        *self.chain.write().unwrap_or_else(|p| p.into_inner()) = chain;
    }

    /// Takes what a sidecar remembered across its restart (see `held.rs`): the position
    /// its first snapshot is judged against, the refusal it had made, and the revocations
    /// a confirmed restore keeps. The state stays unsynced (Checks fail closed) until a
    /// snapshot is applied.
    pub fn remember(&self, position: (u64, u64), refused: Refused, revocations: RevocationEntries) {
        let (jtis, kills) = revocations;
        self.revocations.replace(jtis, kills);
        *self.remembered.write().unwrap_or_else(|p| p.into_inner()) = Some(position);
        self.refusal
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .refused = refused;
    }

    /// What to do with a snapshot ([`admission`]).
    pub fn admit(&self, snapshot: &pb::WatchEvent) -> Admission {
        admission(
            self.held(),
            self.refused(),
            (snapshot.epoch, snapshot.version),
            snapshot.diverged,
        )
    }

    /// Refuses a rollback snapshot: the state held stays, but its revocations and kill
    /// marks are added (a union: they only ever deny more), and its agent statuses where
    /// stricter than held: a freeze committed after the store went back reaches the data
    /// plane only in this snapshot, and an old status that is stricter errs on denial
    /// until an operator confirms the restore. Returns the rollback.
    pub fn refuse(&self, snapshot: &pb::WatchEvent) -> Rollback {
        let held = self.held().unwrap_or_default();
        let rollback = Rollback {
            held,
            offered: (snapshot.epoch, snapshot.version),
        };
        {
            let mut refusal = self.refusal.write().unwrap_or_else(|p| p.into_inner());
            refusal.now = Some(rollback);
            refusal.refused.since_followed = true;
            if snapshot.epoch == held.0 {
                refusal.refused.epoch = Some(held.0);
            }
        }
        self.rollbacks_refused.fetch_add(1, Ordering::Relaxed);
        self.apply_restrictive(&snapshot.items, true);
        rollback
    }

    /// Applies, from a refused control plane's events, only what denies more: revoked
    /// tokens and kill marks, and (`statuses`) agent statuses other than active.
    /// An agent status is taken only when it is stricter than the one held (active <
    /// restricted < frozen < revoked): a refused control plane restricting an agent the
    /// sidecar holds frozen must not thaw it to restricted.
    pub fn apply_restrictive(&self, items: &[pb::StateItem], statuses: bool) {
        let held = |a: &pb::AgentState| {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            view.agents
                .get(&a.tenant)
                .and_then(|m| m.get(&a.id))
                .map_or(AgentStatus::Active, |e| e.status)
        };
        let restrictive: Vec<pb::StateItem> = items
            .iter()
            .filter(|i| match &i.item {
                Some(Item::RevokedToken(_) | Item::Kill(_)) => true,
                Some(Item::Agent(a)) => {
                    statuses
                        && AgentStatus::parse(&a.status)
                            .is_some_and(|s| strictness(s) > strictness(held(a)))
                }
                _ => false,
            })
            .cloned()
            .collect();
        self.upsert(&restrictive);
    }

    /// Follows the snapshot of a higher epoch (an operator confirmed a restore), or the
    /// first one followed after a refused rollback: replaces the state, keeping the revocations and kill marks held that can still cover an
    /// unexpired token ([`Revocations::replace_keeping`]). Returns the policy reference
    /// and (token ids, kill marks) kept.
    pub fn restore(
        &self,
        snapshot: &pb::WatchEvent,
        now: i64,
        slack: i64,
        max_token_ttl: i64,
    ) -> (Option<pb::PolicyRef>, (usize, usize)) {
        let (view, (jtis, kills)) = build(&snapshot.items);
        let kept = self
            .revocations
            .replace_keeping(jtis, kills, now, slack, max_token_ttl);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        self.set_position(snapshot);
        (self.policy(), kept)
    }

    /// Moves to the event's (epoch, version). A snapshot is only applied once admitted
    /// (followed forward or restored), so it ends any refusal: the warning and gauge go,
    /// and the refused epoch, now below the one held, can never be offered again.
    fn set_position(&self, event: &pb::WatchEvent) {
        // Under the hash's lock: a reader of the three together sees one position.
        let mut chain = self.chain.write().unwrap_or_else(|p| p.into_inner());
        self.version.store(event.version, Ordering::Release);
        self.epoch.store(event.epoch, Ordering::Release);
        *chain = event.chain.clone();
        drop(chain);
        if event.snapshot {
            self.synced.store(true, Ordering::Release);
            *self.remembered.write().unwrap_or_else(|p| p.into_inner()) = None;
            *self.refusal.write().unwrap_or_else(|p| p.into_inner()) = Refusal::default();
        }
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
        self.set_position(event);
        let after = self.policy();
        (after != policy_before || event.snapshot)
            .then_some(after)
            .flatten()
    }

    fn replace(&self, items: &[pb::StateItem]) {
        let (view, (jtis, kills)) = build(items);
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

/// A snapshot's items as a view, revoked token ids and kill marks.
fn build(items: &[pb::StateItem]) -> (View, RevocationEntries) {
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
    (view, (jtis, kills))
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
                        shadow: t.mode == crate::control::SHADOW,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(agent: &str, jti: &str, iat: i64) -> Claims {
        serde_json::from_value(serde_json::json!({
            "iss": "aegis", "aud": "aegis", "sub": agent, "tenant": "acme",
            "scopes": [], "sid": "s1", "jti": jti, "iat": iat, "nbf": iat, "exp": iat + 3600,
        }))
        .expect("claims")
    }

    fn agent(id: &str, status: &str) -> pb::StateItem {
        pb::StateItem {
            item: Some(Item::Agent(pb::AgentState {
                tenant: "acme".into(),
                id: id.into(),
                status: status.into(),
                risk_tier: "low".into(),
            })),
        }
    }

    fn revoked(jti: &str, expires_at: i64) -> pb::StateItem {
        pb::StateItem {
            item: Some(Item::RevokedToken(pb::RevokedToken {
                jti: jti.into(),
                expires_at,
                tenant: "acme".into(),
            })),
        }
    }

    fn agent_kill(id: &str, before: i64) -> pb::StateItem {
        pb::StateItem {
            item: Some(Item::Kill(pb::KillMark {
                scope: KillScope::Agent as i32,
                tenant: "acme".into(),
                target: id.into(),
                before,
            })),
        }
    }

    fn snapshot(epoch: u64, version: u64, items: Vec<pb::StateItem>) -> pb::WatchEvent {
        pb::WatchEvent {
            epoch,
            version,
            snapshot: true,
            items,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_forward_snapshot_is_followed() {
        use Admission::*;
        let none = Refused::default();
        let at = |epoch| Refused {
            epoch: Some(epoch),
            since_followed: true,
        };
        let older = Refused {
            epoch: None,
            since_followed: true,
        };
        // (held, refused, offered) → what the follower does.
        let cases = [
            (None, none, (0, 3), Follow),
            (Some((0, 5)), none, (0, 5), Follow),
            (Some((0, 5)), none, (0, 9), Follow),
            (Some((0, 5)), none, (0, 3), Refuse),
            (Some((2, 5)), none, (1, 90), Refuse),
            (Some((0, 5)), none, (1, 1), Restore),
            // A restored control plane counting past the held version is still the lost
            // history: once refused at an epoch, only a higher epoch is followed.
            (Some((0, 5)), at(0), (0, 6), Refuse),
            (Some((0, 5)), at(0), (1, 7), Restore),
            // A stale replica of an older epoch was refused; the primary is back: followed,
            // keeping the revocations held (a restore).
            (Some((1, 5)), older, (1, 7), Restore),
            (Some((1, 5)), older, (0, 9), Refuse),
        ];
        for (held, refused, offered, want) in cases {
            assert_eq!(
                admission(held, refused, offered, false),
                want,
                "held {held:?} refused {refused:?} offered {offered:?}"
            );
        }
        // Another history at the held version: refused however far it counted, until a
        // higher epoch.
        assert_eq!(admission(Some((0, 5)), none, (0, 9), true), Refuse);
        assert_eq!(admission(Some((0, 5)), none, (0, 5), true), Refuse);
        assert_eq!(admission(Some((0, 5)), none, (1, 9), true), Restore);
        assert_eq!(admission(None, none, (0, 9), true), Follow);
    }

    #[test]
    fn a_refused_rollback_keeps_the_state_and_adds_only_what_denies_more() {
        let state = State::new(Arc::new(Revocations::default()), false);
        let now = now();
        state.apply(&snapshot(
            0,
            5,
            vec![
                agent("frozen-bot", crate::control::FROZEN),
                agent("bot", crate::control::ACTIVE),
                revoked("jti-late", now + 3600),
            ],
        ));
        // The restored copy: taken before the freeze and the revocation, with one
        // revocation of its own made since the restore.
        let old = snapshot(
            0,
            3,
            vec![
                agent("frozen-bot", crate::control::ACTIVE),
                agent("bot", crate::control::ACTIVE),
                revoked("jti-new", now + 3600),
            ],
        );
        assert_eq!(state.admit(&old), Admission::Refuse);
        let rollback = state.refuse(&old);
        assert_eq!(rollback.held, (0, 5));
        assert_eq!(rollback.offered, (0, 3));
        assert_eq!(state.version(), 5);
        let frozen = state.agent(&claims("frozen-bot", "a", now));
        assert_eq!(frozen.status, AgentStatus::Frozen);
        for jti in ["jti-late", "jti-new"] {
            assert!(
                state.revocations.check(&claims("bot", jti, now)).is_some(),
                "{jti} is denied"
            );
        }
        let text = rollback.to_string();
        assert!(
            text.contains("epoch 0 version 3") && text.contains("epoch 0 version 5"),
            "{text}"
        );
        // A delta from the refused control plane: a new freeze applies, an unfreeze not.
        state.apply_restrictive(
            &[
                agent("bot", crate::control::FROZEN),
                agent("frozen-bot", crate::control::ACTIVE),
            ],
            true,
        );
        assert_eq!(
            state.agent(&claims("bot", "b", now)).status,
            AgentStatus::Frozen
        );
        assert_eq!(
            state.agent(&claims("frozen-bot", "b", now)).status,
            AgentStatus::Frozen
        );
        // Nor does a restriction thaw a held freeze (restricted is weaker than frozen);
        // a revocation, stricter, applies.
        state.apply_restrictive(&[agent("frozen-bot", crate::control::RESTRICTED)], true);
        assert_eq!(
            state.agent(&claims("frozen-bot", "b", now)).status,
            AgentStatus::Frozen
        );
        state.apply_restrictive(&[agent("frozen-bot", crate::control::REVOKED)], true);
        assert_eq!(
            state.agent(&claims("frozen-bot", "b", now)).status,
            AgentStatus::Revoked
        );
    }

    #[test]
    fn a_confirmed_restore_keeps_revocations_and_kills_until_their_tokens_expire() {
        let state = State::new(Arc::new(Revocations::default()), false);
        let now = now();
        let (slack, ttl) = (65, 86_400);
        state.apply(&snapshot(
            0,
            5,
            vec![
                revoked("live", now + 600),
                // Expired longer ago than the leeway: nothing can present it any more.
                revoked("expired", now - 600),
                agent_kill("killed-bot", now - 60),
                // A kill so old that every token it covers has expired.
                agent_kill("ancient-bot", now - ttl - slack - 10),
            ],
        ));
        let restored = snapshot(1, 4, vec![agent("bot", crate::control::ACTIVE)]);
        assert_eq!(state.admit(&restored), Admission::Restore);
        let (_, kept) = state.restore(&restored, now, slack, ttl);
        assert_eq!(kept, (1, 1));
        assert_eq!((state.epoch(), state.version()), (1, 4));
        assert!(state.rollback().is_none());
        assert_eq!(
            state.revocations.check(&claims("bot", "live", now)),
            Some(crate::identity::RevokedBy::Token)
        );
        assert_eq!(
            state
                .revocations
                .check(&claims("killed-bot", "old", now - 120)),
            Some(crate::identity::RevokedBy::Agent)
        );
        // A token issued after the kill is not covered.
        assert_eq!(
            state.revocations.check(&claims("killed-bot", "new", now)),
            None
        );
        assert_eq!(state.revocations.revoked_tokens(), 1);
        assert_eq!(
            state
                .revocations
                .check(&claims("ancient-bot", "x", now - ttl - slack - 20)),
            None
        );
    }

    #[test]
    fn a_refused_stale_replica_does_not_stop_following_the_primary() {
        let state = State::new(Arc::new(Revocations::default()), false);
        state.apply(&snapshot(1, 5, vec![]));
        // A replica left at the epoch before the last confirmation is refused ...
        let stale = snapshot(0, 9, vec![]);
        assert_eq!(state.admit(&stale), Admission::Refuse);
        state.refuse(&stale);
        // ... and the primary, back, is followed forward (keeping the revocations held,
        // as after any refusal); the replica still is not.
        assert_eq!(state.admit(&snapshot(1, 7, vec![])), Admission::Restore);
        assert_eq!(state.admit(&snapshot(0, 12, vec![])), Admission::Refuse);
        // Whereas after a refused rollback of the held epoch, its later versions are too.
        let state = State::new(Arc::new(Revocations::default()), false);
        state.apply(&snapshot(1, 5, vec![]));
        state.refuse(&snapshot(1, 3, vec![]));
        assert_eq!(state.admit(&snapshot(1, 7, vec![])), Admission::Refuse);
        assert_eq!(state.admit(&snapshot(2, 8, vec![])), Admission::Restore);
    }

    /// What the follower does with a snapshot ([`super::super::follow`]).
    fn offer(state: &State, snapshot: &pb::WatchEvent) -> Admission {
        let admission = state.admit(snapshot);
        match admission {
            Admission::Follow => {
                state.apply(snapshot);
            }
            Admission::Restore => {
                state.restore(snapshot, now(), 65, 86_400);
            }
            Admission::Refuse => {
                state.refuse(snapshot);
            }
        }
        admission
    }

    /// Finding A: the fleet held (1, 300) after an earlier confirmation; the control plane
    /// is restored from a backup of epoch 0, changes are re-applied and the restore is
    /// confirmed, landing on epoch 1 again at a version past 300. The sidecar that refused
    /// (0, x) must not take (1, 351) for the epoch-1 history it followed and replace away
    /// the revocation and kill of the lost (1, 201..300).
    #[test]
    fn a_forward_snapshot_after_a_refused_rollback_keeps_the_lost_revocations_and_kills() {
        let state = State::new(Arc::new(Revocations::default()), false);
        let now = now();
        offer(
            &state,
            &snapshot(
                1,
                300,
                vec![
                    agent("bot", crate::control::ACTIVE),
                    revoked("jti-lost", now + 3600),
                    agent_kill("killed-bot", now - 60),
                ],
            ),
        );
        let restored = snapshot(0, 250, vec![agent("bot", crate::control::ACTIVE)]);
        assert_eq!(offer(&state, &restored), Admission::Refuse);
        assert!(state.rollback().is_some());
        let confirmed = snapshot(1, 351, vec![agent("bot", crate::control::ACTIVE)]);
        offer(&state, &confirmed);
        assert_eq!((state.epoch(), state.version()), (1, 351));
        assert_eq!(
            state.revocations.check(&claims("bot", "jti-lost", now)),
            Some(crate::identity::RevokedBy::Token),
            "the revocation of the lost history still denies"
        );
        assert_eq!(
            state
                .revocations
                .check(&claims("killed-bot", "old", now - 120)),
            Some(crate::identity::RevokedBy::Agent),
            "the kill of the lost history still denies"
        );
        assert!(state.rollback().is_none(), "following ends the warning");
    }

    /// Finding B(b): refusing a stale replica of an older epoch must not replace the
    /// refusal of the held epoch: the restored primary counting past the held version is
    /// still the lost history.
    #[test]
    fn a_stale_replica_refused_after_a_rollback_does_not_unstick_the_refused_epoch() {
        let state = State::new(Arc::new(Revocations::default()), false);
        offer(&state, &snapshot(1, 5, vec![]));
        assert_eq!(offer(&state, &snapshot(1, 3, vec![])), Admission::Refuse);
        assert_eq!(offer(&state, &snapshot(0, 9, vec![])), Admission::Refuse);
        assert_eq!(offer(&state, &snapshot(1, 7, vec![])), Admission::Refuse);
        assert_eq!((state.epoch(), state.version()), (1, 5));
        assert_eq!(offer(&state, &snapshot(2, 8, vec![])), Admission::Restore);
        assert_eq!((state.epoch(), state.version()), (2, 8));
    }

    /// Finding B(c): once the sidecar follows the primary forward after refusing a stale
    /// replica, the refusal is over: /readyz and the gauge must not say it forever.
    #[test]
    fn following_forward_after_a_stale_replica_clears_the_refusal_warning() {
        let state = State::new(Arc::new(Revocations::default()), false);
        offer(&state, &snapshot(1, 5, vec![]));
        assert_eq!(offer(&state, &snapshot(0, 9, vec![])), Admission::Refuse);
        assert!(state.rollback().is_some());
        assert_ne!(offer(&state, &snapshot(1, 7, vec![])), Admission::Refuse);
        assert_eq!((state.epoch(), state.version()), (1, 7));
        assert_eq!(state.rollback(), None);
        assert_eq!(state.admit(&snapshot(1, 8, vec![])), Admission::Follow);
    }

    fn now() -> i64 {
        crate::control::now_secs()
    }
}
