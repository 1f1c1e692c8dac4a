//! Tenant settings (shadow mode, autonomy level) and agent budgets.

use super::*;
use crate::control::records::{Budget, Tenant};
use crate::control::wire;
use crate::types::TenantMode;

impl ControlCore {
    // --- tenants ---

    /// A tenant's settings (mode, autonomy level), defaults if never set.
    pub async fn get_tenant(
        &self,
        op: &Operator,
        req: pb::TenantRef,
    ) -> Result<pb::Tenant, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        Ok(wire::tenant(self.tenant_settings(tenant).await?))
    }

    /// A tenant's stored settings, or the defaults.
    async fn tenant_settings(&self, tenant: String) -> Result<Tenant, ControlError> {
        let t = tenant.clone();
        let stored = self.run(move |tx| tx.tenant(&t)).await?;
        Ok(stored.unwrap_or(Tenant {
            name: tenant,
            mode: TenantMode::Enforce,
            autonomy_level: self.settings.default_autonomy,
            updated_at: 0,
            updated_by: String::new(),
        }))
    }

    /// Sets a tenant's mode and autonomy level (`tenant.update`).
    pub async fn update_tenant(
        &self,
        op: &Operator,
        req: pb::UpdateTenantRequest,
    ) -> Result<pb::Tenant, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Administer, &tenant)?;
        valid_id("tenant", &tenant)?;
        required_reason(&req.reason, "tenant.update")?;
        let mut t = self.tenant_settings(tenant.clone()).await?;
        if let Some(mode) = req.mode {
            t.mode = mode.parse().map_err(|_| {
                ControlError::invalid(format!("mode {mode:?} is not enforce or shadow"))
            })?;
        }
        if let Some(level) = req.autonomy_level {
            if !(1..=4).contains(&level) {
                return Err(ControlError::invalid(format!(
                    "autonomy level {level} is not 1-4 (L1 notify only ... L4 contain automatically)"
                )));
            }
            t.autonomy_level = level;
        }
        t.updated_at = now_secs();
        t.updated_by = op.actor();
        let stored = t.clone();
        let t = self
            .publish(move |tx| rules::put_tenant(tx, &stored))
            .await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "tenant.update", &tenant);
        act.target = format!(
            "tenant:{tenant} mode={} autonomy=L{}",
            t.mode, t.autonomy_level
        );
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(wire::tenant(t))
    }

    // --- budgets ---

    /// Sets or removes an agent's budget (`budget.set`).
    pub async fn set_budget(
        &self,
        op: &Operator,
        req: pb::SetBudgetRequest,
    ) -> Result<pb::Budget, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        valid_id("agent id", &req.agent)?;
        required_reason(&req.reason, "budget.set")?;
        if !req.max_cost.is_finite() || req.max_cost < 0.0 {
            return Err(ControlError::invalid(
                "max cost must be a finite number ≥ 0",
            ));
        }
        let removing = req.max_calls == 0 && req.max_cost == 0.0;
        if !removing && req.window_secs == 0 {
            return Err(ControlError::invalid(
                "a budget needs a window (window_secs > 0)",
            ));
        }
        let budget = Budget {
            tenant: tenant.clone(),
            agent: req.agent.clone(),
            max_calls: req.max_calls,
            max_cost: req.max_cost,
            window_secs: req.window_secs,
            updated_at: now_secs(),
            updated_by: op.actor(),
        };
        let b = budget.clone();
        let budget = self.publish(move |tx| rules::put_budget(tx, &b)).await?;
        let actor = op.actor();
        let mut act = Act::new(
            &actor,
            if removing {
                "budget.remove"
            } else {
                "budget.set"
            },
            &tenant,
        );
        act.agent = &budget.agent;
        act.target = format!(
            "budget:{tenant}/{} calls={} cost={} window={}s",
            budget.agent, budget.max_calls, budget.max_cost, budget.window_secs
        );
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(self.with_usage(budget))
    }

    /// Budgets of the tenants the caller may read, with their use where known.
    pub async fn list_budgets(
        &self,
        op: &Operator,
        req: pb::ListBudgetsRequest,
    ) -> Result<Vec<pb::Budget>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        let budgets = self
            .run(move |tx| tx.budgets(scope.as_deref(), agent.as_deref()))
            .await?;
        Ok(budgets.into_iter().map(|b| self.with_usage(b)).collect())
    }

    fn with_usage(&self, b: Budget) -> pb::Budget {
        let mut b = wire::budget(b);
        if let Some(local) = &self.local {
            let u = local.usage(&b, now_secs());
            b.usage_known = true;
            b.used_calls = u.calls;
            b.used_cost = u.cost;
        }
        b
    }
}
