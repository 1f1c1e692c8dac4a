//! Agents, their tokens and kills: register, freeze, restrict, revoke, issue, rotate,
//! revoke tokens, kill by session, agent, tenant or everything.

use super::*;
use crate::control::records::{self, Agent, Token};
use crate::control::wire;
use crate::types::AgentStatus;

impl ControlCore {
    // --- agents ---

    /// Registers an agent in a tenant (`agent.register`).
    pub async fn register_agent(
        &self,
        op: &Operator,
        req: pb::RegisterAgentRequest,
    ) -> Result<pb::Agent, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        valid_id("tenant", &tenant)?;
        valid_id("agent id", &req.id)?;
        let risk_tier = if req.risk_tier.is_empty() {
            "medium".to_owned()
        } else {
            req.risk_tier
        };
        if !["low", "medium", "high", "critical"].contains(&risk_tier.as_str()) {
            return Err(ControlError::invalid(format!(
                "risk tier {risk_tier:?} is not one of low, medium, high, critical"
            )));
        }
        let now = now_secs();
        let actor = op.actor();
        let agent = Agent {
            tenant: tenant.clone(),
            id: req.id.clone(),
            status: AgentStatus::Active,
            risk_tier,
            reason: "registered".into(),
            created_at: now,
            updated_at: now,
            updated_by: actor.clone(),
            live_tokens: 0,
        };
        let a = agent.clone();
        let agent = self
            .publish(move |tx| rules::register_agent(tx, &a))
            .await?;
        let mut act = Act::new(&actor, "agent.register", &tenant);
        act.agent = &agent.id;
        act.target = format!("agent:{tenant}/{}", agent.id);
        act.reason = &agent.risk_tier;
        self.record(act, None).await?;
        Ok(wire::agent(agent))
    }

    /// One agent of a tenant the caller may read.
    pub async fn get_agent(
        &self,
        op: &Operator,
        req: pb::AgentRef,
    ) -> Result<pb::Agent, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        let now = now_secs();
        let id = req.id.clone();
        let t = tenant.clone();
        self.run(move |tx| tx.agent(&t, &id, now))
            .await?
            .map(wire::agent)
            .ok_or_else(|| {
                ControlError::not_found(format!("no agent {} in tenant {tenant}", req.id))
            })
    }

    /// The agents of the tenants the caller may read, optionally by status.
    pub async fn list_agents(
        &self,
        op: &Operator,
        req: pb::ListAgentsRequest,
    ) -> Result<Vec<pb::Agent>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let status: Option<AgentStatus> = wire::filter(&req.status)?;
        let now = now_secs();
        let agents = self
            .run(move |tx| tx.agents(scope.as_deref(), status, now))
            .await?;
        Ok(agents.into_iter().map(wire::agent).collect())
    }

    /// Freeze (`frozen`), unfreeze (`active`) or revoke (`revoked`) an agent.
    pub async fn set_agent_status(
        &self,
        op: &Operator,
        req: pb::AgentActionRequest,
        status: AgentStatus,
    ) -> Result<pb::Agent, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        let action = match status {
            AgentStatus::Frozen => "agent.freeze",
            AgentStatus::Revoked => "agent.revoke",
            AgentStatus::Restricted => "agent.restrict",
            AgentStatus::Active => "agent.unfreeze",
        };
        required_reason(&req.reason, action)?;
        let now = now_secs();
        let actor = op.actor();
        let (t, id, reason, who) = (
            tenant.clone(),
            req.id.clone(),
            req.reason.clone(),
            actor.clone(),
        );
        let agent = self
            .publish(move |tx| rules::set_agent_status(tx, &t, &id, status, &reason, &who, now))
            .await?;
        let mut act = Act::new(&actor, action, &tenant);
        act.agent = &agent.id;
        act.target = format!("agent:{tenant}/{}", agent.id);
        act.reason = &req.reason;
        self.record(act, None).await?;
        if status == AgentStatus::Revoked {
            // Revocation is final: its tokens are killed too, so lists show them dead (the
            // status alone already denies every call; the kill is audited as its own row).
            self.kill(
                op,
                pb::KillRequest {
                    scope: pb::KillScope::Agent as i32,
                    tenant: tenant.clone(),
                    target: req.id.clone(),
                    reason: format!("agent revoked: {}", req.reason),
                    confirm_all: false,
                },
            )
            .await?;
        }
        Ok(wire::agent(agent))
    }

    // --- tokens ---

    /// Mints an agent token for a registered, active or restricted agent (`token.issue`).
    pub async fn issue_token(
        &self,
        op: &Operator,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssuedToken, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        let agent = self.agent_for_token(&tenant, &req.agent, false).await?;
        let session = if req.session.is_empty() {
            random_id("sess-")
        } else {
            valid_id("session", &req.session)?;
            req.session
        };
        let (token, info) = self
            .mint_agent_token(&agent, &session, req.scopes, req.ttl_secs)
            .await?;
        let i = info.clone();
        self.run(move |tx| tx.insert_token(&i)).await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "token.issue", &tenant);
        act.agent = &info.agent;
        act.session = &info.session;
        act.target = format!("token:{}", info.jti);
        self.record(act, None).await?;
        Ok(pb::IssuedToken {
            token,
            info: Some(wire::token(info, now_secs())),
        })
    }

    /// Mints a new token for the same agent and session and revokes the old one (`token.rotate`).
    pub async fn rotate_token(
        &self,
        op: &Operator,
        req: pb::RotateTokenRequest,
    ) -> Result<pb::IssuedToken, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        required_reason(&req.reason, "token.rotate")?;
        let old = self.token_in(&tenant, &req.jti).await?;
        // A frozen agent's token may be rotated (an exposed credential is replaced while
        // the agent is contained); the new token works once the agent is unfrozen.
        let agent = self.agent_for_token(&tenant, &old.agent, true).await?;
        let (token, info) = self
            .mint_agent_token(&agent, &old.session, old.scopes.clone(), req.ttl_secs)
            .await?;
        let (jti, new, reason) = (
            req.jti.clone(),
            info.clone(),
            format!("rotated: {}", req.reason),
        );
        let now = now_secs();
        self.publish(move |tx| rules::rotate_token(tx, &jti, &new, &reason, now))
            .await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "token.rotate", &tenant);
        act.agent = &info.agent;
        act.session = &info.session;
        act.target = format!("token:{} -> token:{}", req.jti, info.jti);
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(pb::IssuedToken {
            token,
            info: Some(wire::token(info, now)),
        })
    }

    /// Revokes one token (`token.revoke`).
    pub async fn revoke_token(
        &self,
        op: &Operator,
        req: pb::RevokeTokenRequest,
    ) -> Result<pb::TokenInfo, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        required_reason(&req.reason, "token.revoke")?;
        self.token_in(&tenant, &req.jti).await?;
        let (jti, reason) = (req.jti.clone(), req.reason.clone());
        let now = now_secs();
        let info = self
            .publish(move |tx| rules::revoke_token(tx, &jti, &reason, now))
            .await?;
        let actor = op.actor();
        let mut act = Act::new(&actor, "token.revoke", &tenant);
        act.agent = &info.agent;
        act.session = &info.session;
        act.target = format!("token:{}", info.jti);
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(wire::token(info, now))
    }

    /// The tokens of a tenant (of one agent), live ones unless all are asked for.
    pub async fn list_tokens(
        &self,
        op: &Operator,
        req: pb::ListTokensRequest,
    ) -> Result<Vec<pb::TokenInfo>, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        let now = now_secs();
        let tokens = self
            .run(move |tx| rules::tokens(tx, &tenant, agent.as_deref(), req.all, now))
            .await?;
        Ok(tokens.into_iter().map(|t| wire::token(t, now)).collect())
    }

    /// A token of `tenant` by jti; NOT_FOUND for another tenant's, as for none.
    async fn token_in(&self, tenant: &str, jti: &str) -> Result<Token, ControlError> {
        let j = jti.to_owned();
        match self.run(move |tx| tx.token(&j)).await? {
            Some(t) if t.tenant == tenant => Ok(t),
            _ => Err(ControlError::not_found(format!(
                "no token {jti} in tenant {tenant} was issued by this control plane"
            ))),
        }
    }

    /// The agent a token is minted for: registered, and active (or frozen, when
    /// `frozen_ok`); never revoked.
    async fn agent_for_token(
        &self,
        tenant: &str,
        id: &str,
        frozen_ok: bool,
    ) -> Result<Agent, ControlError> {
        let now = now_secs();
        let (t, i) = (tenant.to_owned(), id.to_owned());
        let agent = self.run(move |tx| tx.agent(&t, &i, now))
            .await?
            .ok_or_else(|| {
                ControlError::not_found(format!(
                    "no agent {id} in tenant {tenant} (register it first: aegis ctl agents register)"
                ))
            })?;
        let usable = matches!(agent.status, AgentStatus::Active | AgentStatus::Restricted);
        if !(usable || (frozen_ok && agent.status == AgentStatus::Frozen)) {
            return Err(ControlError::precondition(format!(
                "agent {tenant}/{id} is {}: no token can be issued",
                agent.status
            )));
        }
        Ok(agent)
    }

    /// Mints an agent token. Its `iat` is after every kill mark covering it, so a kill in
    /// this same second does not catch a token minted after it.
    async fn mint_agent_token(
        &self,
        agent: &Agent,
        session: &str,
        scopes: Vec<String>,
        ttl_secs: u64,
    ) -> Result<(String, Token), ControlError> {
        let ttl = if ttl_secs == 0 {
            self.settings.token_ttl_secs
        } else {
            ttl_secs
        };
        if ttl > self.settings.max_token_ttl_secs {
            return Err(ControlError::invalid(format!(
                "ttl {ttl} s is over the {} s limit (control.max_token_ttl_secs)",
                self.settings.max_token_ttl_secs
            )));
        }
        for s in &scopes {
            if s.is_empty() || s.len() > 128 || s.chars().any(char::is_whitespace) {
                return Err(ControlError::invalid(format!(
                    "scope {s:?} is not a scope name"
                )));
            }
        }
        let (t, a, sid) = (agent.tenant.clone(), agent.id.clone(), session.to_owned());
        let floor = self
            .run(move |tx| rules::kill_floor(tx, &t, &a, &sid))
            .await?;
        let now = now_secs();
        let iat = now.max(floor.saturating_add(1));
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            aud: Audience::One(self.settings.audience.clone()),
            sub: agent.id.clone(),
            tenant: agent.tenant.clone(),
            scopes: scopes.clone(),
            sid: session.to_owned(),
            jti: random_id("tok-"),
            iat,
            nbf: now,
            exp: now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)),
        };
        let token =
            mint(&self.signer, &claims).map_err(|e| ControlError::invalid(format!("mint: {e}")))?;
        let info = Token {
            jti: claims.jti,
            tenant: claims.tenant,
            agent: claims.sub,
            session: claims.sid,
            scopes,
            issued_at: claims.iat,
            expires_at: claims.exp,
            revoked: None,
        };
        Ok((token, info))
    }

    // --- kills ---

    /// Kills by session, agent, tenant or everything: a kill mark, and the tokens it covers revoked (`kill.*`).
    pub async fn kill(
        &self,
        op: &Operator,
        req: pb::KillRequest,
    ) -> Result<pb::KillResponse, ControlError> {
        use pb::KillScope;
        let scope = KillScope::try_from(req.scope).unwrap_or(KillScope::Unspecified);
        required_reason(&req.reason, "a kill")?;
        let tenant = match scope {
            KillScope::All => {
                op.require(Need::Global, "")?;
                if !req.confirm_all {
                    return Err(ControlError::precondition(
                        "a kill of every token of every tenant needs confirm_all \
                         (--all --confirm-kill-all); it is never the default",
                    ));
                }
                String::new()
            }
            KillScope::Unspecified => {
                return Err(ControlError::invalid(
                    "name what to kill: a token, session, agent, tenant, or all",
                ));
            }
            _ => {
                let tenant = op.tenant_for(&req.tenant)?;
                op.require(Need::Operate, &tenant)?;
                tenant
            }
        };
        if matches!(
            scope,
            KillScope::Token | KillScope::Session | KillScope::Agent
        ) && req.target.is_empty()
        {
            return Err(ControlError::invalid(
                "name the token, session or agent to kill",
            ));
        }
        let actor = op.actor();
        let response = if scope == KillScope::Token {
            let info = self
                .revoke_token(
                    op,
                    pb::RevokeTokenRequest {
                        tenant: tenant.clone(),
                        jti: req.target.clone(),
                        reason: format!("killed: {}", req.reason),
                    },
                )
                .await?;
            pb::KillResponse {
                scope: req.scope,
                tenant: tenant.clone(),
                target: req.target.clone(),
                before: info.revoked_at,
                tokens: 1,
                sessions: 1,
                agents: 1,
                tenants: 1,
            }
        } else {
            let now = now_secs();
            let target = match scope {
                KillScope::Session | KillScope::Agent => req.target.clone(),
                _ => String::new(),
            };
            let mark = records::KillMark {
                scope: wire::scope(req.scope)?,
                tenant: tenant.clone(),
                target,
                before: now,
            };
            let (reason, who) = (req.reason.clone(), actor.clone());
            let killed = self
                .publish(move |tx| rules::kill(tx, &mark, &reason, &who, now))
                .await?;
            wire::killed(&killed)
        };
        let action = match scope {
            KillScope::Token => "kill.token",
            KillScope::Session => "kill.session",
            KillScope::Agent => "kill.agent",
            KillScope::Tenant => "kill.tenant",
            _ => "kill.all",
        };
        let mut act = Act::new(&actor, action, &tenant);
        if scope == KillScope::Agent {
            act.agent = &req.target;
        }
        if scope == KillScope::Session {
            act.session = &req.target;
        }
        act.target = format!(
            "{action}:{}{} ({} tokens, {} sessions, {} agents, {} tenants)",
            if tenant.is_empty() { "*" } else { &tenant },
            if req.target.is_empty() {
                String::new()
            } else {
                format!("/{}", req.target)
            },
            response.tokens,
            response.sessions,
            response.agents,
            response.tenants
        );
        act.reason = &req.reason;
        self.record(act, None).await?;
        Ok(response)
    }
}
