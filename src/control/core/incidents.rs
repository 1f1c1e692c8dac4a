//! Incidents: reported by the correlation engine, stored with their notifications,
//! contained according to the tenant's autonomy level, acknowledged and closed.

use super::*;
use crate::control::records::Incident;
use crate::control::wire;
use crate::types::{Action, AgentStatus, IncidentStatus, Severity};

/// The kinds of incident the correlation engine raises.
pub const INCIDENT_KINDS: &[&str] = &[
    "deny_storm",
    "data_exfil_pattern",
    "approval_flood",
    "runaway",
    "budget_exhausted",
    "trust_escalation",
    "untrusted_mutation",
];

/// What the response engine does for an incident of `severity` at autonomy `level`:
/// L1 notify only; L2 also require approval for the agent's state-mutating calls
/// (restrict it); L3 freeze the agent instead on high and critical incidents; L4 also
/// revoke its tokens and kill its session.
pub fn plan(level: u32, severity: Severity) -> Vec<Action> {
    let serious = severity.is_serious();
    let mut actions = vec![Action::Notify];
    if level >= 3 && serious {
        actions.push(Action::FreezeAgent);
    } else if level >= 2 {
        actions.push(Action::RequireApproval);
    }
    if level >= 4 && serious {
        actions.push(Action::KillAgentTokens);
        actions.push(Action::KillSession);
    }
    actions
}

/// Most decisions behind one incident.
pub const MAX_EVIDENCE: usize = 1024;

/// An incident's evidence must name decisions the reporting data plane recorded: each
/// evidence id once, with its decision (same order) carrying the sequence number and the
/// hash of the audit row the data plane signed for it, and the trigger among them. The
/// control plane cannot read that log; it stores the hashes (with the reporter) so the
/// evidence can be checked later against the data plane's exported log
/// (`aegis audit check-evidence`). Refused before anything is stored or contained.
fn check_evidence(req: &pb::ReportIncidentRequest) -> Result<(), ControlError> {
    let bad = |m: String| Err(ControlError::invalid(format!("incident evidence: {m}")));
    if req.evidence.is_empty() {
        return bad("names no decision".into());
    }
    if req.evidence.len() > MAX_EVIDENCE {
        return bad(format!("over {MAX_EVIDENCE} decisions"));
    }
    if req.decisions.len() != req.evidence.len() {
        return bad(format!(
            "{} decision id(s) but {} decision(s) with their audit rows: each evidence id \
             needs its decision, row hash and sequence number",
            req.evidence.len(),
            req.decisions.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (id, d) in req.evidence.iter().zip(&req.decisions) {
        valid_id("evidence decision id", id)?;
        if d.decision_id != *id {
            return bad(format!(
                "decision {} is listed where evidence names {}",
                crate::control::shown(&d.decision_id),
                crate::control::shown(id)
            ));
        }
        if !seen.insert(id.as_str()) {
            return bad(format!("decision {id} is named twice"));
        }
        let hex = d.row_hash.len() == 64
            && d.row_hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return bad(format!(
                "decision {id} has no row hash (64 lower-case hex digits of the audit row \
                 the data plane signed for it)"
            ));
        }
        if d.audit_seq == 0 {
            return bad(format!("decision {id} has no audit row sequence number"));
        }
    }
    if !seen.contains(req.trigger_decision.as_str()) {
        return bad(format!(
            "the trigger decision {} is not among the evidence",
            crate::control::shown(&req.trigger_decision)
        ));
    }
    Ok(())
}

impl ControlCore {
    /// The identity the response engine acts under.
    fn response_engine() -> Operator {
        Operator {
            name: "response-engine".into(),
            role: Role::Admin,
            tenant: crate::control::auth::ALL_TENANTS.into(),
            expires_at: i64::MAX,
        }
    }

    /// A data plane's finding: stored, audited, and contained as the tenant's autonomy
    /// level says; every automatic action is audited with the incident id and listed in
    /// the incident.
    ///
    /// Runs to its end on a task of its own: a caller that gives up (a sidecar's request
    /// deadline, under load) never leaves an incident stored but not contained.
    pub async fn report_incident(
        self: &Arc<Self>,
        op: &Operator,
        req: pb::ReportIncidentRequest,
    ) -> Result<pb::Incident, ControlError> {
        let (core, op) = (self.clone(), op.clone());
        tokio::spawn(async move { core.raise_incident(&op, req).await })
            .await
            .map_err(|e| ControlError::Store(format!("incident task failed: {e}")))?
    }

    async fn raise_incident(
        &self,
        op: &Operator,
        req: pb::ReportIncidentRequest,
    ) -> Result<pb::Incident, ControlError> {
        valid_id("tenant", &req.tenant)?;
        // Only for the tenants the sidecar serves: what the response engine does next
        // (restrict, freeze, kill tokens) stays inside them.
        op.require(Need::Fleet, &req.tenant)?;
        valid_id("agent id", &req.agent)?;
        check_evidence(&req)?;
        if !INCIDENT_KINDS.contains(&req.kind.as_str()) {
            return Err(ControlError::invalid(format!(
                "unknown incident kind {:?}",
                req.kind
            )));
        }
        let severity: Severity = req
            .severity
            .parse()
            .map_err(|_| ControlError::invalid(format!("unknown severity {:?}", req.severity)))?;
        if req.decided_at_ns <= 0 {
            return Err(ControlError::invalid(
                "an incident needs the time of its decision",
            ));
        }
        let level = self
            .get_tenant(
                &Self::response_engine(),
                pb::TenantRef {
                    tenant: req.tenant.clone(),
                },
            )
            .await?
            .autonomy_level;
        let now_ns = crate::unix_nanos();
        let incident = Incident {
            id: random_id("INC-"),
            tenant: req.tenant,
            agent: req.agent,
            session: req.session,
            run_id: req.run_id,
            kind: req.kind,
            severity,
            summary: req.summary,
            evidence: req.evidence,
            trigger_decision: req.trigger_decision,
            decided_at_ns: req.decided_at_ns,
            status: IncidentStatus::Open,
            created_at_ns: now_ns,
            updated_at: now_ns / 1_000_000_000,
            acknowledged_by: String::new(),
            closed_by: String::new(),
            close_reason: String::new(),
            actions: Vec::new(),
            autonomy_level: level,
            reported_by: op.actor(),
            policy_revision: req.policy_revision,
            decisions: req
                .decisions
                .into_iter()
                .map(wire::evidence_record)
                .collect(),
        };
        let notes = crate::control::notify::notifications(
            &wire::incident(incident.clone()),
            &self.settings.webhooks,
        );
        let queued = notes.len();
        let i = incident.clone();
        self.run(move |tx| rules::insert_incident(tx, &i, &notes))
            .await?;
        if let Some(n) = INCIDENT_KINDS
            .iter()
            .position(|k| *k == incident.kind)
            .and_then(|i| self.incidents_raised.get(i))
        {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let actor = op.actor();
        let mut act = Act::new(&actor, "incident.raise", &incident.tenant);
        act.agent = &incident.agent;
        act.session = &incident.session;
        act.target = format!(
            "incident:{} {} {}",
            incident.id, incident.kind, incident.severity
        );
        act.reason = &incident.summary;
        act.revision = &incident.policy_revision;
        self.record(act, None).await?;
        let done = self.contain(&incident, queued).await;
        let (t, id, d) = (incident.tenant.clone(), incident.id.clone(), done.clone());
        self.run(move |tx| rules::add_incident_actions(tx, &t, &id, &d))
            .await?;
        crate::log!(
            warn,
            "incident {} {} ({}) for {}/{} at L{level}: {}; actions: {}",
            incident.id,
            incident.kind,
            incident.severity,
            incident.tenant,
            incident.agent,
            incident.summary,
            done.join(", ")
        );
        let incident = wire::incident(Incident {
            actions: done,
            ..incident
        });
        if queued > 0 {
            // The notifications were stored with the incident (durable from the start);
            // now that the response engine has acted, they say what it did.
            let notes = crate::control::notify::notifications(&incident, &self.settings.webhooks);
            let id = incident.id.clone();
            if let Err(e) = self
                .run(move |tx| rules::refresh_notifications(tx, &id, &notes))
                .await
            {
                crate::log!(
                    warn,
                    "incident {}: notifications keep their first payload: {e}",
                    incident.id
                );
            }
            if let Some(n) = self.notifier.get() {
                n.wake.notify_one();
            }
        }
        self.tell_incident_watchers().await;
        Ok(incident)
    }

    /// Reads where the incident feed stands, so that watchers are told what happens from
    /// now on (start-up).
    pub async fn init_incident_feed(&self) -> Result<(), ControlError> {
        let last = self.run(|tx| tx.last_incident_event()).await?;
        *self.incidents_told.lock().await = Some(last);
        Ok(())
    }

    /// Hands the incident events committed since the last told, this replica's and other
    /// replicas', to this replica's incident watchers, in commit order. A failure is
    /// logged; the next call (after an action, or every second) tries again.
    pub(crate) async fn tell_incident_watchers(&self) {
        const BATCH: usize = 256;
        let mut told = self.incidents_told.lock().await;
        let Some(after) = *told else {
            return;
        };
        let read = self
            .run(move |tx| {
                let mut events = Vec::new();
                for e in tx.incident_events(after, BATCH)? {
                    let incident = tx.incident(&e.tenant, &e.incident)?;
                    events.push((e, incident));
                }
                Ok(events)
            })
            .await;
        let events = match read {
            Ok(events) => events,
            Err(e) => {
                crate::log!(warn, "incidents: cannot read the incident feed: {e}");
                return;
            }
        };
        for (event, incident) in events {
            *told = Some(event.seq);
            if let Some(incident) = incident {
                let _ = self.incident_events.send(Arc::new(pb::IncidentEvent {
                    event: event.event,
                    incident: Some(wire::incident(incident)),
                }));
            }
        }
    }

    /// Carries out the plan for `incident`; returns what was done, one line per action.
    async fn contain(&self, incident: &Incident, webhooks: usize) -> Vec<String> {
        let engine = Self::response_engine();
        let reason = format!("incident {} ({})", incident.id, incident.kind);
        let mut done = Vec::new();
        for action in plan(incident.autonomy_level, incident.severity) {
            let outcome = match action {
                Action::Notify if webhooks == 0 => {
                    Ok("logged (no webhook for this tenant)".to_owned())
                }
                Action::Notify => Ok(format!("logged, {webhooks} webhook(s) queued")),
                Action::FreezeAgent => {
                    self.contain_agent(&engine, incident, &reason, AgentStatus::Frozen)
                        .await
                }
                Action::RequireApproval => {
                    self.contain_agent(&engine, incident, &reason, AgentStatus::Restricted)
                        .await
                }
                Action::KillAgentTokens => self
                    .kill(
                        &engine,
                        pb::KillRequest {
                            scope: pb::KillScope::Agent as i32,
                            tenant: incident.tenant.clone(),
                            target: incident.agent.clone(),
                            reason: reason.clone(),
                            confirm_all: false,
                        },
                    )
                    .await
                    .map(|k| format!("{} tokens", k.tokens)),
                Action::KillSession if incident.session.is_empty() => Ok("no session".into()),
                Action::KillSession => self
                    .kill(
                        &engine,
                        pb::KillRequest {
                            scope: pb::KillScope::Session as i32,
                            tenant: incident.tenant.clone(),
                            target: incident.session.clone(),
                            reason: reason.clone(),
                            confirm_all: false,
                        },
                    )
                    .await
                    .map(|k| format!("session {}: {} tokens", incident.session, k.tokens)),
            };
            let action = action.as_str();
            done.push(match outcome {
                Ok(detail) => format!("{action}: {detail}"),
                Err(e) => format!("{action}: failed: {e}"),
            });
        }
        done
    }

    /// Freezes or restricts the incident's agent, registering it first if the control plane
    /// did not know it (a token minted offline). A restriction never loosens a freeze.
    async fn contain_agent(
        &self,
        engine: &Operator,
        incident: &Incident,
        reason: &str,
        status: AgentStatus,
    ) -> Result<String, ControlError> {
        let done = if status == AgentStatus::Frozen {
            "frozen"
        } else {
            "restricted"
        };
        let req = pb::AgentActionRequest {
            tenant: incident.tenant.clone(),
            id: incident.agent.clone(),
            reason: reason.to_owned(),
        };
        match self.set_agent_status(engine, req.clone(), status).await {
            Ok(_) => Ok(done.into()),
            Err(ControlError::Precondition(m)) => Ok(format!("unchanged ({m})")),
            Err(ControlError::NotFound(_)) => {
                self.register_agent(
                    engine,
                    pb::RegisterAgentRequest {
                        tenant: incident.tenant.clone(),
                        id: incident.agent.clone(),
                        risk_tier: "high".into(),
                    },
                )
                .await?;
                self.set_agent_status(engine, req, status).await?;
                Ok(format!("registered and {done}"))
            }
            Err(e) => Err(e),
        }
    }

    /// The incidents of the tenants the caller may read, by status and agent.
    pub async fn list_incidents(
        &self,
        op: &Operator,
        req: pb::ListIncidentsRequest,
    ) -> Result<Vec<pb::Incident>, ControlError> {
        let scope = op.list_scope(&req.tenant)?;
        op.require(Need::Read, scope.as_deref().unwrap_or(""))?;
        let status: Option<IncidentStatus> = wire::filter(&req.status)?;
        let agent = (!req.agent.is_empty()).then_some(req.agent);
        let incidents = self
            .run(move |tx| tx.incidents(scope.as_deref(), status, agent.as_deref()))
            .await?;
        Ok(incidents.into_iter().map(wire::incident).collect())
    }

    /// One incident, with the state of its notifications.
    pub async fn get_incident(
        &self,
        op: &Operator,
        req: pb::IncidentRef,
    ) -> Result<pb::Incident, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Read, &tenant)?;
        let (t, i) = (tenant.clone(), req.id.clone());
        let (incident, notes) = self
            .run(move |tx| {
                let notes = tx.notifications(&i)?;
                Ok((tx.incident(&t, &i)?, notes))
            })
            .await?;
        let incident = incident.ok_or_else(|| {
            ControlError::not_found(format!("no incident {} in tenant {tenant}", req.id))
        })?;
        let mut incident = wire::incident(incident);
        incident.notifications = notes
            .iter()
            .map(|n| {
                let mut line = format!(
                    "{} {} ({} attempts)",
                    crate::control::notify::host_of(&n.url),
                    n.state,
                    n.attempts
                );
                if n.state != "delivered" && !n.last_error.is_empty() {
                    line.push_str(&format!(": {}", n.last_error));
                }
                line
            })
            .collect();
        Ok(incident)
    }

    /// Acknowledges (`acknowledged`) or closes (`closed`, with a reason) an incident.
    pub async fn set_incident_status(
        &self,
        op: &Operator,
        req: pb::IncidentActionRequest,
        status: IncidentStatus,
    ) -> Result<pb::Incident, ControlError> {
        let tenant = op.tenant_for(&req.tenant)?;
        op.require(Need::Operate, &tenant)?;
        let action = match status {
            IncidentStatus::Closed => "incident.close",
            IncidentStatus::Acknowledged => "incident.acknowledge",
            IncidentStatus::Open => {
                return Err(ControlError::invalid("an incident is never reopened"));
            }
        };
        if status == IncidentStatus::Closed {
            required_reason(&req.reason, action)?;
        }
        let current = self
            .get_incident(
                op,
                pb::IncidentRef {
                    tenant: tenant.clone(),
                    id: req.id.clone(),
                },
            )
            .await?;
        let actor = op.actor();
        let (t, i, who, why) = (
            tenant.clone(),
            req.id.clone(),
            actor.clone(),
            req.reason.clone(),
        );
        let now = now_secs();
        let updated = self
            .run(move |tx| rules::set_incident_status(tx, &t, &i, status, &who, &why, now))
            .await?
            .ok_or_else(|| {
                ControlError::precondition(format!("incident {} is {}", req.id, current.status))
            })?;
        let mut act = Act::new(&actor, action, &tenant);
        act.agent = &updated.agent;
        act.target = format!("incident:{}", updated.id);
        act.reason = &req.reason;
        self.record(act, None).await?;
        self.tell_incident_watchers().await;
        Ok(wire::incident(updated))
    }

    /// The dry run: what the response engine would do at `level` (0: the tenant's).
    pub async fn plan_response(
        &self,
        op: &Operator,
        req: pb::PlanResponseRequest,
    ) -> Result<pb::ResponsePlan, ControlError> {
        let incident = self
            .get_incident(
                op,
                pb::IncidentRef {
                    tenant: req.tenant.clone(),
                    id: req.id.clone(),
                },
            )
            .await?;
        let level = match req.autonomy_level {
            0 => {
                self.get_tenant(
                    op,
                    pb::TenantRef {
                        tenant: incident.tenant.clone(),
                    },
                )
                .await?
                .autonomy_level
            }
            l @ 1..=4 => l,
            l => {
                return Err(ControlError::invalid(format!(
                    "autonomy level {l} is not 1-4"
                )));
            }
        };
        let severity: Severity = incident
            .severity
            .parse()
            .map_err(|e| ControlError::Store(format!("incident {}: {e}", incident.id)))?;
        Ok(pb::ResponsePlan {
            autonomy_level: level,
            actions: plan(level, severity)
                .into_iter()
                .map(|a| a.as_str().to_owned())
                .collect(),
        })
    }
}
