//! The data plane's side of the seam: what a server that decides Checks holds of the
//! control plane's state, and how it reaches the control plane.
//!
//! The Check path ([`crate::check`]) and the correlation engine read and act through this
//! module and [`crate::seam`] only; nothing here names the control plane's core or store.
//! In the all-in-one server the control core calls the data plane back through
//! [`crate::seam::LocalDataPlane`], implemented here by [`InProcess`]; a fleet sidecar
//! follows the control plane's `Watch` stream instead ([`follow`]).
//!
//! # Layout
//! - [`state`]: the data plane's view of the control state (agent status, revocations and
//!   kills, tenant modes, budgets, policy revision), read on every Check.
//! - [`held`]: the state position a sidecar keeps across restarts (`control-state.json`).
//! - [`follow`]: a fleet sidecar following the control plane's `Watch` stream.
//! - [`budget`]: per-agent call and cost budgets, counted by the data plane.
//! - [`link`]: the gRPC client of [`crate::seam::ControlPlane`], with the sidecar's
//!   credential.

pub mod budget;
pub mod follow;
pub mod held;
pub mod link;
pub mod state;

use std::sync::Arc;

use crate::control::pb;
use crate::policy::{CompiledBundle, Policy};
use crate::seam::{BudgetUsage, LocalDataPlane};

/// The data plane of the all-in-one server, as the control core in the same process sees
/// it: changes apply to it synchronously, before the control action answers.
///
/// A snapshot is judged as a sidecar judges one ([`state::admission`]): one behind the
/// state held (the store went back: a restored file, a failover to a stale copy) is
/// refused, keeping what is held and adding only what denies more, until an operator
/// confirms the restore (a higher epoch, followed keeping the revocations and kill marks
/// held until their tokens expire).
#[derive(Debug)]
pub struct InProcess {
    /// The state every Check reads.
    pub state: Arc<state::State>,
    /// The policy every Check evaluates.
    pub policy: Arc<Policy>,
    /// The budget counters every Check charges.
    pub meter: Arc<budget::Meter>,
    /// Seconds past `exp` a token is still accepted (clock skew), plus a margin.
    pub token_slack_secs: i64,
    /// The longest token lifetime (`control.max_token_ttl_secs`).
    pub max_token_ttl_secs: i64,
    /// A rollback snapshot was refused: deltas apply only where they deny more, until a
    /// snapshot is followed again.
    pub refusing: std::sync::atomic::AtomicBool,
}

impl LocalDataPlane for InProcess {
    fn apply(&self, event: &pb::WatchEvent) {
        use state::Admission;
        use std::sync::atomic::Ordering;
        if !event.snapshot {
            if self.refusing.load(Ordering::Acquire) {
                self.state.apply_restrictive(&event.items, true);
            } else {
                self.state.apply(event);
            }
            return;
        }
        match self.state.admit(event) {
            Admission::Follow => {
                self.refusing.store(false, Ordering::Release);
                self.state.apply(event);
            }
            Admission::Restore => {
                self.refusing.store(false, Ordering::Release);
                let held = self.state.held().unwrap_or_default();
                let (_, (tokens, kills)) = self.state.restore(
                    event,
                    crate::control::now_secs(),
                    self.token_slack_secs,
                    self.max_token_ttl_secs,
                );
                crate::log!(
                    warn,
                    "data plane: following epoch {} version {} (held epoch {} version {}), \
                     keeping {tokens} revoked tokens and {kills} kill marks it lacks until \
                     their tokens expire",
                    event.epoch,
                    event.version,
                    held.0,
                    held.1
                );
            }
            Admission::Refuse => {
                let rollback = self.state.refuse(event);
                self.refusing.store(true, Ordering::Release);
                crate::log!(error, "data plane: {rollback}");
            }
        }
    }

    fn policy_digest(&self) -> String {
        self.policy.current().digest().to_owned()
    }

    fn install_policy(&self, compiled: CompiledBundle) {
        self.policy.install(Arc::new(compiled));
    }

    fn usage(&self, budget: &pb::Budget, now: i64) -> BudgetUsage {
        let limit = budget::Limit {
            max_calls: budget.max_calls,
            max_cost: budget.max_cost,
            window_secs: budget.window_secs,
        };
        let u = self.meter.usage(&budget.tenant, &budget.agent, &limit, now);
        BudgetUsage {
            calls: u.calls,
            cost: u.cost,
        }
    }
}
