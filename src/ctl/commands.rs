//! One handler per `aegis ctl` command group: build the request, call, print.

use super::*;

pub(super) async fn state(c: &Client, cmd: StateCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let v = match cmd {
        StateCommand::Show => api
            .get_state_version(c.req(pb::GetStateVersionRequest {}))
            .await?
            .into_inner(),
        StateCommand::ConfirmRestore { r } => api
            .confirm_restore(c.req(pb::ConfirmRestoreRequest { reason: r.reason }))
            .await?
            .into_inner(),
    };
    c.show(&v, |v| {
        let mut out = format!("epoch:   {}\nversion: {}\n", v.epoch, v.version);
        if (v.highest_seen_epoch, v.highest_seen_version) > (v.epoch, v.version) {
            out.push_str(&format!(
                "warning: sidecar {:?} reported epoch {} version {}, ahead of this control \
                 plane: restored from a backup? Sidecars refuse this state until \
                 `aegis ctl state confirm-restore`\n",
                v.highest_seen_by, v.highest_seen_epoch, v.highest_seen_version
            ));
        }
        out
    })
}

pub(super) async fn agents(c: &Client, cmd: AgentsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let agent = match cmd {
        AgentsCommand::List { status, t } => {
            let r = api
                .list_agents(c.req(pb::ListAgentsRequest {
                    tenant: t.tenant,
                    status,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| agent_table(&r.agents));
        }
        AgentsCommand::Register { id, risk_tier, t } => {
            api.register_agent(c.req(pb::RegisterAgentRequest {
                tenant: t.tenant,
                id,
                risk_tier,
            }))
            .await?
        }
        AgentsCommand::Get { id, t } => {
            api.get_agent(c.req(pb::AgentRef {
                tenant: t.tenant,
                id,
            }))
            .await?
        }
        AgentsCommand::Freeze { id, r, t } => api.freeze_agent(c.req(action(t, id, r))).await?,
        AgentsCommand::Unfreeze { id, r, t } => api.unfreeze_agent(c.req(action(t, id, r))).await?,
        AgentsCommand::Restrict { id, r, t } => api.restrict_agent(c.req(action(t, id, r))).await?,
        AgentsCommand::Revoke { id, r, t } => api.revoke_agent(c.req(action(t, id, r))).await?,
    };
    c.show(&agent.into_inner(), |a| {
        format!(
            "agent:       {}/{}\nstatus:      {}\nrisk tier:   {}\nlive tokens: {}\nreason:      {}\nupdated:     {} by {}\ncreated:     {}\n",
            a.tenant,
            a.id,
            a.status,
            a.risk_tier,
            a.live_tokens,
            a.reason,
            secs_or_dash(a.updated_at),
            a.updated_by,
            secs_or_dash(a.created_at)
        )
    })
}

pub(super) fn action(t: TenantArg, id: String, r: Reason) -> pb::AgentActionRequest {
    pb::AgentActionRequest {
        tenant: t.tenant,
        id,
        reason: r.reason,
    }
}

pub(super) async fn tokens(c: &Client, cmd: TokensCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let issued = match cmd {
        TokensCommand::List { agent, all, t } => {
            let r = api
                .list_tokens(c.req(pb::ListTokensRequest {
                    tenant: t.tenant,
                    agent,
                    all,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| token_table(&r.tokens));
        }
        TokensCommand::Revoke { jti, r, t } => {
            let info = api
                .revoke_token(c.req(pb::RevokeTokenRequest {
                    tenant: t.tenant,
                    jti,
                    reason: r.reason,
                }))
                .await?
                .into_inner();
            return c.show(&info, |i| token_table(std::slice::from_ref(i)));
        }
        TokensCommand::Issue {
            agent,
            scopes,
            ttl_secs,
            session,
            t,
        } => {
            api.issue_token(c.req(pb::IssueTokenRequest {
                tenant: t.tenant,
                agent,
                scopes,
                ttl_secs,
                session,
            }))
            .await?
        }
        TokensCommand::Rotate {
            jti,
            ttl_secs,
            r,
            t,
        } => {
            api.rotate_token(c.req(pb::RotateTokenRequest {
                tenant: t.tenant,
                jti,
                reason: r.reason,
                ttl_secs,
            }))
            .await?
        }
    };
    let issued = issued.into_inner();
    if let Some(info) = &issued.info {
        // The token alone on stdout (for $(...)); what it is on stderr.
        eprintln!(
            "token {} for {}/{} session {} expires {}",
            info.jti,
            info.tenant,
            info.agent,
            info.session,
            secs_or_dash(info.expires_at)
        );
    }
    c.show(&issued, |i| format!("{}\n", i.token))
}

pub(super) async fn kill(c: &Client, cmd: KillCommand) -> Result<(), CtlError> {
    use pb::KillScope;
    let (scope, tenant, target, reason, confirm_all) = match cmd {
        KillCommand::Token { jti, r, t } => (KillScope::Token, t.tenant, jti, r.reason, false),
        KillCommand::Session { session, r, t } => {
            (KillScope::Session, t.tenant, session, r.reason, false)
        }
        KillCommand::Agent { id, r, t } => (KillScope::Agent, t.tenant, id, r.reason, false),
        KillCommand::Tenant { r, t } => {
            (KillScope::Tenant, t.tenant, String::new(), r.reason, false)
        }
        KillCommand::All {
            confirm_kill_all,
            r,
        } => (
            KillScope::All,
            String::new(),
            String::new(),
            r.reason,
            confirm_kill_all,
        ),
    };
    let mut api = c.inner.clone();
    let k = api
        .kill(c.req(pb::KillRequest {
            scope: scope as i32,
            tenant,
            target,
            reason,
            confirm_all,
        }))
        .await?
        .into_inner();
    c.show(&k, |k| {
        let scope = KillScope::try_from(k.scope).map_or("?", |s| s.as_str_name());
        format!(
            "killed {} {}{}: {} live tokens in {} sessions of {} agents in {} tenants; every token of the scope issued at or before {} is refused\n",
            scope.trim_start_matches("KILL_SCOPE_").to_ascii_lowercase(),
            if k.tenant.is_empty() { "*" } else { &k.tenant },
            if k.target.is_empty() { String::new() } else { format!("/{}", k.target) },
            k.tokens,
            k.sessions,
            k.agents,
            k.tenants,
            secs_or_dash(k.before)
        )
    })
}

pub(super) async fn approvals(c: &Client, cmd: ApprovalsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    match cmd {
        ApprovalsCommand::List { status, agent, t } => {
            let r = api
                .list_approvals(c.req(pb::ListApprovalsRequest {
                    tenant: t.tenant,
                    status,
                    agent,
                }))
                .await?
                .into_inner();
            c.show(&r, |r| approval_table(&r.approvals))
        }
        ApprovalsCommand::Show { id, t } => {
            let a = api
                .get_approval(c.req(pb::ApprovalRef {
                    tenant: t.tenant,
                    id,
                }))
                .await?
                .into_inner();
            c.show(&a, approval_text)
        }
        ApprovalsCommand::Approve {
            id,
            override_ttl_secs,
            r,
            t,
        } => {
            let d = api
                .approve_approval(c.req(pb::DecideApprovalRequest {
                    tenant: t.tenant,
                    id,
                    reason: r.reason,
                    override_ttl_secs,
                }))
                .await?
                .into_inner();
            if let Some(a) = &d.approval {
                eprintln!(
                    "approved {} ({}.{} for {}/{}); override token valid until {}, once",
                    a.id,
                    a.tool,
                    a.action,
                    a.tenant,
                    a.agent,
                    secs_or_dash(a.override_expires_at)
                );
            }
            c.show(&d, |d| format!("{}\n", d.override_token))
        }
        ApprovalsCommand::Deny { id, r, t } => {
            let d = api
                .deny_approval(c.req(pb::DecideApprovalRequest {
                    tenant: t.tenant,
                    id,
                    reason: r.reason,
                    override_ttl_secs: 0,
                }))
                .await?
                .into_inner();
            c.show(&d, |d| {
                d.approval.as_ref().map(approval_text).unwrap_or_default()
            })
        }
    }
}

pub(super) async fn tenants(c: &Client, cmd: TenantsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let t = match cmd {
        TenantsCommand::Get { tenant } => api.get_tenant(c.req(pb::TenantRef { tenant })).await?,
        TenantsCommand::Set {
            tenant,
            mode,
            autonomy,
            r,
        } => {
            let autonomy_level = autonomy
                .map(|a| {
                    a.trim_start_matches(['L', 'l'])
                        .parse::<u32>()
                        .map_err(|_| CtlError {
                            code: 5,
                            message: format!("--autonomy {a:?} is not 1-4 or L1-L4"),
                        })
                })
                .transpose()?;
            api.update_tenant(c.req(pb::UpdateTenantRequest {
                tenant,
                mode,
                autonomy_level,
                reason: r.reason,
            }))
            .await?
        }
    };
    c.show(&t.into_inner(), |t| {
        format!(
            "tenant:   {}\nmode:     {}\nautonomy: L{}\nupdated:  {}{}\n",
            t.name,
            t.mode,
            t.autonomy_level,
            if t.updated_at == 0 {
                "never (defaults)".into()
            } else {
                secs_or_dash(t.updated_at)
            },
            if t.updated_by.is_empty() {
                String::new()
            } else {
                format!(" by {}", t.updated_by)
            }
        )
    })
}

pub(super) async fn budgets(c: &Client, cmd: BudgetsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let req = match cmd {
        BudgetsCommand::List { agent, t } => {
            let r = api
                .list_budgets(c.req(pb::ListBudgetsRequest {
                    tenant: t.tenant,
                    agent,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| budget_table(&r.budgets));
        }
        BudgetsCommand::Set {
            agent,
            max_calls,
            max_cost,
            window_secs,
            r,
            t,
        } => pb::SetBudgetRequest {
            tenant: t.tenant,
            agent,
            max_calls,
            max_cost,
            window_secs,
            reason: r.reason,
        },
        BudgetsCommand::Remove { agent, r, t } => pb::SetBudgetRequest {
            tenant: t.tenant,
            agent,
            reason: r.reason,
            ..Default::default()
        },
    };
    let b = api.set_budget(c.req(req)).await?.into_inner();
    c.show(&b, |b| budget_table(std::slice::from_ref(b)))
}

pub(super) async fn policy(c: &Client, cmd: PolicyCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let rev = match cmd {
        PolicyCommand::History { limit } => {
            let r = api
                .list_policy_revisions(c.req(pb::ListPolicyRevisionsRequest { limit }))
                .await?
                .into_inner();
            return c.show(&r, |r| revision_table(&r.revisions));
        }
        PolicyCommand::Push { bundle, r } => {
            let source = crate::policy::BundleSource::from_path(&bundle);
            let files = crate::policy::BundleFiles::read(&source)
                .map_err(|e| CtlError::local(format!("bundle {}: {e}", bundle.display())))?;
            let bundle = pb::Bundle::from(&files);
            api.activate_policy(c.req(pb::ActivatePolicyRequest {
                bundle: Some(bundle),
                reason: r.reason,
            }))
            .await?
        }
        PolicyCommand::Rollback { to, r } => {
            api.rollback_policy(c.req(pb::RollbackPolicyRequest {
                to,
                reason: r.reason,
            }))
            .await?
        }
    };
    c.show(&rev.into_inner(), |r| {
        revision_table(std::slice::from_ref(r))
    })
}

pub(super) async fn incidents(c: &Client, cmd: IncidentsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let incident = match cmd {
        IncidentsCommand::List { status, agent, t } => {
            let r = api
                .list_incidents(c.req(pb::ListIncidentsRequest {
                    tenant: t.tenant,
                    status,
                    agent,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| incident_table(&r.incidents));
        }
        IncidentsCommand::DryRun { id, level, t } => {
            let autonomy_level = match level {
                None => 0,
                Some(l) => l
                    .trim_start_matches(['L', 'l'])
                    .parse::<u32>()
                    .map_err(|_| CtlError {
                        code: 5,
                        message: format!("--level {l:?} is not 1-4 or L1-L4"),
                    })?,
            };
            let p = api
                .plan_response(c.req(pb::PlanResponseRequest {
                    tenant: t.tenant,
                    id,
                    autonomy_level,
                }))
                .await?
                .into_inner();
            return c.show(&p, |p| {
                format!("at L{}: {}\n", p.autonomy_level, p.actions.join(", "))
            });
        }
        IncidentsCommand::Graph { id, format, t } => {
            let g = api
                .get_incident_graph(c.req(pb::IncidentRef {
                    tenant: t.tenant,
                    id,
                }))
                .await?
                .into_inner();
            let text = match format {
                GraphFormat::Json => {
                    serde_json::to_string_pretty(&g).map_err(|e| CtlError::local(e.to_string()))?
                        + "\n"
                }
                GraphFormat::Dot => crate::control::graph::dot(&g),
                GraphFormat::Mermaid => crate::control::graph::mermaid(&g),
            };
            print!("{text}");
            return Ok(());
        }
        IncidentsCommand::Watch { new_only, t } => {
            let mut stream = api
                .watch_incidents(c.req(pb::WatchIncidentsRequest {
                    tenant: t.tenant,
                    new_only,
                }))
                .await?
                .into_inner();
            while let Some(ev) = stream.message().await? {
                let line = if c.json {
                    serde_json::to_string(&ev).map_err(|e| CtlError::local(e.to_string()))?
                } else {
                    let i = ev.incident.unwrap_or_default();
                    format!(
                        "{} {} {} {} ({}) {}/{} status={} actions=[{}] {}",
                        secs_or_dash(i.updated_at.max(i.created_at_ns / 1_000_000_000)),
                        ev.event,
                        i.id,
                        i.kind,
                        i.severity,
                        i.tenant,
                        i.agent,
                        i.status,
                        i.actions.join("; "),
                        i.summary
                    )
                };
                let line = printable(&line).replace('\n', " ");
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                // A closed pipe (`| head`) ends the watch quietly.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
            return Err(CtlError {
                code: 6,
                message: "the control plane ended the watch".into(),
            });
        }
        IncidentsCommand::Show { id, t } => {
            api.get_incident(c.req(pb::IncidentRef {
                tenant: t.tenant,
                id,
            }))
            .await?
        }
        IncidentsCommand::Ack { id, reason, t } => {
            api.acknowledge_incident(c.req(pb::IncidentActionRequest {
                tenant: t.tenant,
                id,
                reason,
            }))
            .await?
        }
        IncidentsCommand::Close { id, r, t } => {
            api.close_incident(c.req(pb::IncidentActionRequest {
                tenant: t.tenant,
                id,
                reason: r.reason,
            }))
            .await?
        }
    };
    c.show(&incident.into_inner(), incident_text)
}
