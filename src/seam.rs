//! The one seam between the planes.
//!
//! The data plane (the Check path, the correlation engine, a fleet sidecar) asks the
//! control plane for what only it can do through [`ControlPlane`]: raise an approval,
//! redeem an override, report an incident. The same trait is implemented in-process by the
//! control core (the all-in-one server) and over gRPC with the sidecar's credential
//! ([`crate::dataplane::link::Remote`]), so the Check path cannot tell them apart.
//!
//! The other way, the control core hands its changes to a data plane in the same process
//! through [`LocalDataPlane`]; it never holds the data plane's state itself. A fleet
//! sidecar gets the same changes from the `Watch` stream.

use crate::control::{ControlError, pb};
use crate::policy::CompiledBundle;

/// What a data plane asks of the control plane. Only `approval_needed` decisions, calls
/// carrying an override token and raised incidents take this path; every other Check
/// decides from the data plane's own state.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + std::fmt::Debug {
    /// Raises (or finds the pending) approval of a call.
    async fn request_approval(
        &self,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, ControlError>;

    /// Reports an incident the correlation engine raised; the control plane stores it and
    /// contains it according to the tenant's autonomy level.
    async fn report_incident(
        &self,
        req: pb::ReportIncidentRequest,
    ) -> Result<pb::Incident, ControlError>;

    /// Redeems an override token for the call it was minted for.
    async fn redeem_override(
        &self,
        req: pb::RedeemOverrideRequest,
    ) -> Result<pb::RedeemOverrideResponse, ControlError>;
}

/// A budget's use in its current window, as the data plane counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetUsage {
    /// Calls charged in the window.
    pub calls: u64,
    /// Cost charged in the window (from `x-aegis-cost`).
    pub cost: f64,
}

/// A data plane in the control core's own process (the all-in-one server).
pub trait LocalDataPlane: Send + Sync + std::fmt::Debug {
    /// Applies a change (or a snapshot) of the watched state, before the action answers.
    fn apply(&self, event: &pb::WatchEvent);
    /// The digest of the policy bundle the data plane evaluates now.
    fn policy_digest(&self) -> String;
    /// Installs a compiled bundle (activation, rollback, restore at start-up).
    fn install_policy(&self, compiled: CompiledBundle);
    /// How much of `budget` the agent used in the current window, at Unix time `now`.
    fn usage(&self, budget: &pb::Budget, now: i64) -> BudgetUsage;
}
