//! Approvals: list, decide, raise from a Check, redeem an override.

use super::*;
use crate::control::records::Approval;
use crate::control::wire;
use crate::types::ApprovalStatus;

impl ControlCore {
    // --- approvals ---

    /// The approvals of the tenants the caller may read, by status and agent.
    pub async fn list_approvals(
        &self,
        op: &Operator,
        req: pb::ListApprovalsRequest,
    ) -> Result<Vec<pb::Approval>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let status = match req.status.as_str() {
            "" => Some(ApprovalStatus::Pending),
            "all" => None,
            s => Some(
                s.parse::<ApprovalStatus>()
                    .map_err(|e| ControlError::invalid(format!("{e} (or all)")))?,
            ),
        };
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        let now = now_secs();
        let approvals = self
            .run(move |tx| rules::approvals(tx, scope.as_deref(), status, agent.as_deref(), now))
            .await?;
        Ok(approvals.into_iter().map(wire::approval).collect())
    }

    /// One approval of a tenant the caller may read.
    pub async fn get_approval(
        &self,
        op: &Operator,
        req: pb::ApprovalRef,
    ) -> Result<pb::Approval, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        Ok(wire::approval(self.approval_in(&tenant, &req.id).await?))
    }

    async fn approval_in(&self, tenant: &str, id: &str) -> Result<Approval, ControlError> {
        let now = now_secs();
        let (t, i) = (tenant.to_owned(), id.to_owned());
        self.run(move |tx| rules::approval(tx, &t, &i, now))
            .await?
            .ok_or_else(|| ControlError::not_found(format!("no approval {id} in tenant {tenant}")))
    }

    /// Approves (minting the override token) or denies a pending approval.
    pub async fn decide_approval(
        &self,
        op: &Operator,
        req: pb::DecideApprovalRequest,
        approve: bool,
    ) -> Result<pb::ApprovalDecision, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Approve, &tenant)?;
        let action = if approve {
            "approval.approve"
        } else {
            "approval.deny"
        };
        required_reason(&req.reason, action)?;
        let before = self.approval_in(&tenant, &req.id).await?;
        if before.status != ApprovalStatus::Pending {
            return Err(ControlError::precondition(format!(
                "approval {} is {}, not pending",
                req.id, before.status
            )));
        }
        let ttl = if req.override_ttl_secs == 0 {
            self.settings.override_ttl_secs
        } else {
            req.override_ttl_secs.min(
                self.settings
                    .approval_ttl_secs
                    .max(self.settings.override_ttl_secs),
            )
        };
        let now = now_secs();
        let override_exp = if approve {
            now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))
        } else {
            0
        };
        let actor = op.actor();
        let (t, i, who, reason) = (
            tenant.clone(),
            req.id.clone(),
            actor.clone(),
            req.reason.clone(),
        );
        let approval = self
            .run(move |tx| {
                rules::decide_approval(tx, &t, &i, approve, &who, &reason, override_exp, now)
            })
            .await?
            .ok_or_else(|| {
                ControlError::precondition(format!("approval {} is no longer pending", req.id))
            })?;
        let override_token = if approve {
            let claims = OverrideClaims {
                iss: self.settings.issuer.clone(),
                aud: OVERRIDE_AUDIENCE.into(),
                sub: approval.agent.clone(),
                tenant: approval.tenant.clone(),
                apr: approval.id.clone(),
                call: approval.call_hash.clone(),
                jti: random_id("ovr-"),
                iat: now,
                exp: override_exp,
            };
            mint(&self.signer, &claims).map_err(|e| ControlError::invalid(format!("mint: {e}")))?
        } else {
            String::new()
        };
        let mut act = Act::new(&actor, action, &tenant);
        act.agent = &approval.agent;
        act.session = &approval.session;
        act.target = format!(
            "approval:{} ({}.{})",
            approval.id, approval.tool, approval.action
        );
        act.reason = &req.reason;
        act.approval_id = &approval.id;
        self.record(act, None).await?;
        Ok(pb::ApprovalDecision {
            approval: Some(wire::approval(approval)),
            override_token,
        })
    }

    /// Raises (or finds) the pending approval for a call (a data plane's request).
    pub async fn request_approval(
        &self,
        op: &Operator,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, ControlError> {
        if req.tenant.is_empty() || req.agent.is_empty() || req.call_hash.len() != 64 {
            op.require(Need::Fleet, "")?;
            return Err(ControlError::invalid(
                "an approval needs a tenant, an agent and a 64-digit call hash",
            ));
        }
        // Only for the tenants the sidecar serves: another tenant's agents' caps of pending
        // approvals are not its to fill.
        op.require(Need::Fleet, &req.tenant)?;
        let now = now_secs();
        let approval = Approval {
            id: random_id("apr-"),
            tenant: req.tenant.clone(),
            agent: req.agent.clone(),
            session: req.session,
            run_id: req.run_id,
            tool: req.tool,
            action: req.action,
            resource: req.resource,
            arguments: req.arguments,
            call_hash: req.call_hash,
            policy_reason: req.policy_reason,
            decision_id: req.decision_id,
            status: ApprovalStatus::Pending,
            created_at: now,
            expires_at: now
                .saturating_add(i64::try_from(self.settings.approval_ttl_secs).unwrap_or(i64::MAX)),
            decided_by: String::new(),
            decided_at: 0,
            decision_reason: String::new(),
            override_expires_at: 0,
            used_at: 0,
            used_by_decision: String::new(),
        };
        let cap = self.settings.max_pending_approvals;
        let same_session =
            self.settings.override_binding == crate::config::OverrideBinding::Session;
        let a = approval.clone();
        let response = self
            .run(move |tx| rules::request_approval(tx, &a, cap, same_session, now))
            .await?;
        if response.created {
            let actor = op.actor();
            let mut act = Act::new(&actor, "approval.request", &approval.tenant);
            act.agent = &approval.agent;
            act.session = &approval.session;
            act.target = format!(
                "approval:{} ({}.{})",
                approval.id, approval.tool, approval.action
            );
            act.reason = &approval.policy_reason;
            act.approval_id = &approval.id;
            self.record(act, None).await?;
        }
        Ok(response)
    }

    /// Redeems an override token for a call (a data plane's request): accepted once.
    pub async fn redeem_override(
        &self,
        op: &Operator,
        req: pb::RedeemOverrideRequest,
    ) -> Result<pb::RedeemOverrideResponse, ControlError> {
        // Only for the sidecar's tenants (the token must be of the tenant asked for): a
        // sidecar cannot burn another tenant's override before its agent uses it.
        op.require(Need::Fleet, &req.tenant)?;
        let refuse = |reason: &str, approval_id: &str| pb::RedeemOverrideResponse {
            accepted: false,
            reason: reason.into(),
            approval_id: approval_id.into(),
        };
        let Ok(claims) = parse_and_verify::<OverrideClaims>(&req.override_token, &self.own_key)
        else {
            return Ok(refuse("override_invalid", ""));
        };
        if claims.aud != OVERRIDE_AUDIENCE || claims.iss != self.settings.issuer {
            return Ok(refuse("override_invalid", ""));
        }
        let now = now_secs();
        if now >= claims.exp {
            return Ok(refuse("override_expired", &claims.apr));
        }
        if claims.tenant != req.tenant || claims.sub != req.agent || claims.call != req.call_hash {
            return Ok(refuse("override_mismatch", &claims.apr));
        }
        if self.settings.override_binding == crate::config::OverrideBinding::Session {
            // The approver approved the call of the session that asked, not the same call
            // from the agent's other sessions (another run, another user's conversation).
            let approval = self.approval_in(&claims.tenant, &claims.apr).await?;
            if approval.session != req.session {
                return Ok(refuse("override_wrong_session", &claims.apr));
            }
        }
        let (t, i, d) = (
            claims.tenant.clone(),
            claims.apr.clone(),
            req.decision_id.clone(),
        );
        let used = self
            .run(move |tx| rules::use_approval(tx, &t, &i, &d, now))
            .await?;
        if !used {
            let current = self.approval_in(&claims.tenant, &claims.apr).await?;
            let reason = match current.status {
                ApprovalStatus::Expired => "override_expired",
                ApprovalStatus::Used => "override_used",
                _ => "override_invalid",
            };
            return Ok(refuse(reason, &claims.apr));
        }
        let actor = op.actor();
        let mut act = Act::new(&actor, "approval.redeem", &claims.tenant);
        act.agent = &claims.sub;
        act.target = format!("approval:{} by decision {}", claims.apr, req.decision_id);
        act.approval_id = &claims.apr;
        self.record(act, None).await?;
        Ok(pb::RedeemOverrideResponse {
            accepted: true,
            reason: "approved_override".into(),
            approval_id: claims.apr,
        })
    }
}
