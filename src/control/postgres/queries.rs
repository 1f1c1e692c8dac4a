//! A unit of work over one SERIALIZABLE transaction, run again after a conflict, and its
//! reads and writes.

use super::*;

/// Runs `work` in a SERIALIZABLE transaction on `client`, again after a conflict; the
/// version it published, if any.
pub(super) fn run_work(
    runtime: &Handle,
    client: &mut Client,
    work: &Work<'_>,
    kept: u64,
    read_only: bool,
) -> Result<Option<u64>, ControlError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tx = runtime
            .block_on(
                client
                    .build_transaction()
                    .isolation_level(IsolationLevel::Serializable)
                    .read_only(read_only)
                    .start(),
            )
            .map_err(pg_err)?;
        let mut t = PgTxn {
            runtime,
            tx: &tx,
            kept,
            published: None,
            conflict: false,
        };
        let done = work(&mut t);
        let (published, conflict) = (t.published, t.conflict);
        let committed = match done {
            Ok(()) => runtime.block_on(tx.commit()),
            Err(_) if conflict && attempt < MAX_ATTEMPTS => {
                let _ = runtime.block_on(tx.rollback());
                backoff(attempt);
                continue;
            }
            Err(e) => {
                let _ = runtime.block_on(tx.rollback());
                return Err(e);
            }
        };
        match committed {
            Ok(()) => return Ok(published),
            Err(e) if is_conflict(&e) && attempt < MAX_ATTEMPTS => backoff(attempt),
            Err(e) => return Err(pg_err(e)),
        }
    }
}

/// A short, growing, jittered pause before running a conflicting unit of work again.
pub(super) fn backoff(attempt: u32) {
    let mut jitter = [0u8; 1];
    let _ = getrandom::fill(&mut jitter);
    let ms = u64::from(attempt.min(10)) * 2 + u64::from(jitter[0] % 5);
    std::thread::sleep(Duration::from_millis(ms));
}

/// A unit of work's view of one PostgreSQL transaction.
pub(super) struct PgTxn<'a> {
    pub(super) runtime: &'a Handle,
    pub(super) tx: &'a tokio_postgres::Transaction<'a>,
    pub(super) kept: u64,
    /// The version this transaction published.
    pub(super) published: Option<u64>,
    /// A statement failed with a serialization conflict: run the work again.
    pub(super) conflict: bool,
}

pub(super) type Params<'p> = [&'p (dyn ToSql + Sync)];

impl PgTxn<'_> {
    fn err(&mut self, e: tokio_postgres::Error) -> ControlError {
        if is_conflict(&e) {
            self.conflict = true;
        }
        pg_err(e)
    }

    fn all<T>(
        &mut self,
        sql: &str,
        params: &Params<'_>,
        row: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Vec<T>, ControlError> {
        let rows = self.runtime.block_on(self.tx.query(sql, params));
        let rows = rows.map_err(|e| self.err(e))?;
        rows.iter().map(|r| row(r).map_err(pg_err)).collect()
    }

    fn one<T>(
        &mut self,
        sql: &str,
        params: &Params<'_>,
        row: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Option<T>, ControlError> {
        let found = self.runtime.block_on(self.tx.query_opt(sql, params));
        let found = found.map_err(|e| self.err(e))?;
        found.map(|r| row(&r).map_err(pg_err)).transpose()
    }

    fn exec(&mut self, sql: &str, params: &Params<'_>) -> Result<u64, ControlError> {
        let n = self.runtime.block_on(self.tx.execute(sql, params));
        n.map_err(|e| self.err(e))
    }

    fn meta(&mut self, key: &str) -> Result<u64, ControlError> {
        let v = self.one("SELECT value FROM meta WHERE key = $1", &[&key], |r| {
            r.try_get::<_, i64>(0)
        })?;
        Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
    }
}

/// `AND col = $n` filters for the optional values, numbered from `first`.
pub(super) fn filters<'a>(
    first: usize,
    pairs: &[(&str, Option<&'a str>)],
) -> (String, Vec<&'a str>) {
    let mut sql = String::new();
    let mut values = Vec::new();
    for (col, v) in pairs {
        if let Some(v) = v {
            values.push(*v);
            sql.push_str(&format!(" AND {col} = ${}", first + values.len() - 1));
        }
    }
    (sql, values)
}

pub(super) fn bound<'a>(
    head: Vec<&'a (dyn ToSql + Sync)>,
    values: &'a [&'a str],
) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut all = head;
    all.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
    all
}

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ControlError> {
    serde_json::to_string(v).map_err(|e| ControlError::Store(e.to_string()))
}

/// The condition selecting a kill scope's tokens (`$1` tenant, `$2` target when used).
pub(super) fn scope_condition(scope: Scope) -> (&'static str, bool, bool) {
    match scope {
        Scope::Session => ("tenant = $1 AND session = $2", true, true),
        Scope::Agent => ("tenant = $1 AND agent = $2", true, true),
        Scope::Tenant => ("tenant = $1", true, false),
        Scope::All => ("TRUE", false, false),
    }
}

impl Txn for PgTxn<'_> {
    fn epoch(&mut self) -> Result<u64, ControlError> {
        self.meta("epoch")
    }

    fn version(&mut self) -> Result<u64, ControlError> {
        self.meta("version")
    }

    fn publish(
        &mut self,
        items: &[pb::StateItem],
        epoch_event: bool,
    ) -> Result<(u64, u64), ControlError> {
        use prost::Message;
        let version = self
            .one(
                "UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value",
                &[],
                |r| r.try_get::<_, i64>(0),
            )?
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| ControlError::Store("the state version row is missing".into()))?;
        let epoch = self.meta("epoch")?;
        let mut event = pb::WatchEvent {
            epoch,
            version,
            items: items.to_vec(),
            ..Default::default()
        };
        let previous = match version.checked_sub(1) {
            Some(v) => self.chain_at(v)?.unwrap_or_default(),
            None => Vec::new(),
        };
        event.chain = next_chain(&previous, &event.encode_to_vec());
        let (v, e) = (stored("version", version)?, stored("epoch", epoch)?);
        self.exec(
            "INSERT INTO chains (version, chain) VALUES ($1, $2) \
             ON CONFLICT (version) DO UPDATE SET chain = excluded.chain",
            &[&v, &event.chain],
        )?;
        if !items.is_empty() || epoch_event {
            let bytes = event.encode_to_vec();
            self.exec(
                "INSERT INTO changes (version, epoch, event) VALUES ($1, $2, $3)",
                &[&v, &e, &bytes],
            )?;
            if let Some(floor) = version.checked_sub(self.kept).filter(|f| f % 100 == 0) {
                let floor = stored("version", floor)?;
                self.exec("DELETE FROM chains WHERE version <= $1", &[&floor])?;
                let pruned = self.exec("DELETE FROM changes WHERE version <= $1", &[&floor])?;
                if pruned > 0 {
                    self.exec(
                        "UPDATE meta SET value = GREATEST(value, $1) WHERE key = 'feed_floor'",
                        &[&floor],
                    )?;
                }
            }
        }
        let payload = version.to_string();
        self.exec("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])?;
        self.published = Some(version);
        Ok((epoch, version))
    }

    fn set_epoch(&mut self, epoch: u64) -> Result<(), ControlError> {
        let epoch = stored("state epoch", epoch)?;
        self.exec("UPDATE meta SET value = $1 WHERE key = 'epoch'", &[&epoch])
            .map(|_| ())
    }

    fn chain_at(&mut self, version: u64) -> Result<Option<Vec<u8>>, ControlError> {
        let v = stored("version", version)?;
        self.one("SELECT chain FROM chains WHERE version = $1", &[&v], |r| {
            r.try_get::<_, Vec<u8>>(0)
        })
    }

    fn reported_ahead(&mut self) -> Result<Option<(u64, u64, String)>, ControlError> {
        let row = self.one(
            "SELECT epoch, version, sidecar FROM reported WHERE id = 1",
            &[],
            |r| {
                Ok((
                    r.try_get::<_, i64>(0)?,
                    r.try_get::<_, i64>(1)?,
                    r.try_get::<_, String>(2)?,
                ))
            },
        )?;
        Ok(row.map(|(e, v, s)| {
            (
                u64::try_from(e).unwrap_or(0),
                u64::try_from(v).unwrap_or(0),
                s,
            )
        }))
    }

    fn set_reported_ahead(
        &mut self,
        epoch: u64,
        version: u64,
        sidecar: &str,
    ) -> Result<(), ControlError> {
        // A report past what the store holds (a forged one) is kept as the largest it
        // holds: the epoch is raised past it by a bounded step only (`next_epoch`).
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let (e, v) = (clamp(epoch), clamp(version));
        self.exec(
            "INSERT INTO reported (id, epoch, version, sidecar) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, \
             version = excluded.version, sidecar = excluded.sidecar",
            &[&e, &v, &sidecar],
        )
        .map(|_| ())
    }

    fn agent(&mut self, tenant: &str, id: &str, now: i64) -> Result<Option<Agent>, ControlError> {
        self.one(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE tenant = $2 AND id = $3"),
            &[&now, &tenant, &id],
            agent_row,
        )
    }

    fn agents(
        &mut self,
        tenant: Option<&str>,
        status: Option<AgentStatus>,
        now: i64,
    ) -> Result<Vec<Agent>, ControlError> {
        let status = status.map(AgentStatus::as_str);
        let (cond, values) = filters(2, &[("tenant", tenant), ("status", status)]);
        let params = bound(vec![&now], &values);
        self.all(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE TRUE{cond} ORDER BY tenant, id"),
            &params,
            agent_row,
        )
    }

    fn insert_agent(&mut self, a: &Agent) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO agents (tenant, id, status, risk_tier, reason, created_at, updated_at, \
             updated_by) VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
            &[
                &a.tenant,
                &a.id,
                &a.status.as_str(),
                &a.risk_tier,
                &a.reason,
                &a.created_at,
                &a.updated_by,
            ],
        )
        .map(|_| ())
    }

    fn update_agent(&mut self, a: &Agent) -> Result<(), ControlError> {
        self.exec(
            "UPDATE agents SET status = $3, reason = $4, updated_at = $5, updated_by = $6 \
             WHERE tenant = $1 AND id = $2",
            &[
                &a.tenant,
                &a.id,
                &a.status.as_str(),
                &a.reason,
                &a.updated_at,
                &a.updated_by,
            ],
        )
        .map(|_| ())
    }

    fn token(&mut self, jti: &str) -> Result<Option<Token>, ControlError> {
        self.one(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = $1"),
            &[&jti],
            token_row,
        )
    }

    fn tokens(
        &mut self,
        tenant: &str,
        agent: Option<&str>,
        unrevoked_expiring_after: Option<i64>,
    ) -> Result<Vec<Token>, ControlError> {
        let after = unrevoked_expiring_after.unwrap_or(i64::MIN);
        let live = if unrevoked_expiring_after.is_some() {
            " AND revoked_at IS NULL AND expires_at > $2"
        } else {
            " AND $2::BIGINT IS NOT NULL"
        };
        let (cond, values) = filters(3, &[("agent", agent)]);
        let params = bound(vec![&tenant, &after], &values);
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant = $1{live}{cond} \
                 ORDER BY issued_at, jti"
            ),
            &params,
            token_row,
        )
    }

    fn tokens_in_scope(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
        expiring_after: i64,
    ) -> Result<Vec<Token>, ControlError> {
        let (cond, with_tenant, with_target) = scope_condition(scope);
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if with_tenant {
            params.push(&tenant);
        }
        if with_target {
            params.push(&target);
        }
        params.push(&expiring_after);
        let n = params.len();
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE {cond} AND revoked_at IS NULL \
                 AND expires_at > ${n} ORDER BY issued_at, jti"
            ),
            &params,
            token_row,
        )
    }

    fn revoked_tokens(&mut self, expiring_after: i64) -> Result<Vec<Token>, ControlError> {
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE revoked_at IS NOT NULL \
                 AND expires_at > $1 ORDER BY jti"
            ),
            &[&expiring_after],
            token_row,
        )
    }

    fn insert_token(&mut self, t: &Token) -> Result<(), ControlError> {
        let scopes = to_json(&t.scopes)?;
        self.exec(
            "INSERT INTO tokens (jti, tenant, agent, session, scopes, issued_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &t.jti,
                &t.tenant,
                &t.agent,
                &t.session,
                &scopes,
                &t.issued_at,
                &t.expires_at,
            ],
        )
        .map(|_| ())
    }

    fn revoke_token(&mut self, jti: &str, at: i64, reason: &str) -> Result<(), ControlError> {
        self.exec(
            "UPDATE tokens SET revoked_at = $2, revoked_reason = $3 WHERE jti = $1",
            &[&jti, &at, &reason],
        )
        .map(|_| ())
    }

    fn scope_known(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
    ) -> Result<bool, ControlError> {
        let count = |r: &Row| r.try_get::<_, i64>(0);
        let n = match scope {
            Scope::Session => self.one(
                "SELECT count(*) FROM tokens WHERE tenant = $1 AND session = $2",
                &[&tenant, &target],
                count,
            )?,
            Scope::Agent => self.one(
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = $1 AND agent = $2) + \
                 (SELECT count(*) FROM agents WHERE tenant = $1 AND id = $2)",
                &[&tenant, &target],
                count,
            )?,
            Scope::Tenant => self.one(
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = $1) + \
                 (SELECT count(*) FROM agents WHERE tenant = $1) + \
                 (SELECT count(*) FROM tenants WHERE name = $1)",
                &[&tenant],
                count,
            )?,
            Scope::All => Some(1),
        };
        Ok(n.unwrap_or(0) > 0)
    }

    fn kill_mark(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
    ) -> Result<Option<KillMark>, ControlError> {
        self.one(
            "SELECT scope, tenant, target, before FROM kills \
             WHERE scope = $1 AND tenant = $2 AND target = $3",
            &[&scope.code(), &tenant, &target],
            kill_row,
        )
    }

    fn kill_marks(&mut self) -> Result<Vec<KillMark>, ControlError> {
        self.all(
            "SELECT scope, tenant, target, before FROM kills ORDER BY scope, tenant, target",
            &[],
            kill_row,
        )
    }

    fn put_kill_mark(
        &mut self,
        mark: &KillMark,
        reason: &str,
        actor: &str,
        at: i64,
    ) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO kills (scope, tenant, target, before, reason, actor, at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (scope, tenant, target) DO UPDATE SET before = excluded.before, \
             reason = excluded.reason, actor = excluded.actor, at = excluded.at",
            &[
                &mark.scope.code(),
                &mark.tenant,
                &mark.target,
                &mark.before,
                &reason,
                &actor,
                &at,
            ],
        )
        .map(|_| ())
    }

    fn tenant(&mut self, name: &str) -> Result<Option<Tenant>, ControlError> {
        self.one(
            "SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants WHERE name = $1",
            &[&name],
            tenant_row,
        )
    }

    fn tenants(&mut self) -> Result<Vec<Tenant>, ControlError> {
        self.all(
            "SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants ORDER BY name",
            &[],
            tenant_row,
        )
    }

    fn put_tenant(&mut self, t: &Tenant) -> Result<(), ControlError> {
        let level = i64::from(t.autonomy_level);
        self.exec(
            "INSERT INTO tenants (name, mode, autonomy_level, updated_at, updated_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, \
             autonomy_level = excluded.autonomy_level, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            &[
                &t.name,
                &t.mode.as_str(),
                &level,
                &t.updated_at,
                &t.updated_by,
            ],
        )
        .map(|_| ())
    }

    fn budgets(
        &mut self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<Budget>, ControlError> {
        let (cond, values) = filters(1, &[("tenant", tenant), ("agent", agent)]);
        let params = bound(Vec::new(), &values);
        self.all(
            &format!(
                "SELECT {BUDGET_COLUMNS} FROM budgets WHERE TRUE{cond} ORDER BY tenant, agent"
            ),
            &params,
            budget_row,
        )
    }

    fn put_budget(&mut self, b: &Budget) -> Result<(), ControlError> {
        let calls = i64::try_from(b.max_calls).unwrap_or(i64::MAX);
        let window = i64::try_from(b.window_secs).unwrap_or(i64::MAX);
        self.exec(
            "INSERT INTO budgets (tenant, agent, max_calls, max_cost, window_secs, updated_at, \
             updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, agent) DO UPDATE \
             SET max_calls = excluded.max_calls, max_cost = excluded.max_cost, \
             window_secs = excluded.window_secs, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            &[
                &b.tenant,
                &b.agent,
                &calls,
                &b.max_cost,
                &window,
                &b.updated_at,
                &b.updated_by,
            ],
        )
        .map(|_| ())
    }

    fn delete_budget(&mut self, tenant: &str, agent: &str) -> Result<(), ControlError> {
        self.exec(
            "DELETE FROM budgets WHERE tenant = $1 AND agent = $2",
            &[&tenant, &agent],
        )
        .map(|_| ())
    }

    fn approvals(
        &mut self,
        tenant: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<Approval>, ControlError> {
        let (cond, values) = filters(1, &[("tenant", tenant), ("agent", agent)]);
        let params = bound(Vec::new(), &values);
        self.all(
            &format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE TRUE{cond} ORDER BY created_at, id"
            ),
            &params,
            approval_row,
        )
    }

    fn approval(&mut self, tenant: &str, id: &str) -> Result<Option<Approval>, ControlError> {
        self.one(
            &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = $1 AND id = $2"),
            &[&tenant, &id],
            approval_row,
        )
    }

    fn insert_approval(&mut self, a: &Approval) -> Result<(), ControlError> {
        self.exec(
            &format!(
                "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, \
                 $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"
            ),
            &[
                &a.id,
                &a.tenant,
                &a.agent,
                &a.session,
                &a.run_id,
                &a.tool,
                &a.action,
                &a.resource,
                &a.arguments,
                &a.call_hash,
                &a.policy_reason,
                &a.decision_id,
                &a.status.as_str(),
                &a.created_at,
                &a.expires_at,
                &a.decided_by,
                &a.decided_at,
                &a.decision_reason,
                &a.override_expires_at,
                &a.used_at,
                &a.used_by_decision,
            ],
        )
        .map(|_| ())
    }

    fn update_approval(&mut self, a: &Approval) -> Result<(), ControlError> {
        self.exec(
            "UPDATE approvals SET status = $3, decided_by = $4, decided_at = $5, \
             decision_reason = $6, override_expires_at = $7, used_at = $8, used_by_decision = $9 \
             WHERE tenant = $1 AND id = $2",
            &[
                &a.tenant,
                &a.id,
                &a.status.as_str(),
                &a.decided_by,
                &a.decided_at,
                &a.decision_reason,
                &a.override_expires_at,
                &a.used_at,
                &a.used_by_decision,
            ],
        )
        .map(|_| ())
    }

    fn store_bundle(
        &mut self,
        digest: &str,
        revision: &str,
        files: &[u8],
        at: i64,
    ) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO policy_bundles (digest, revision, files, stored_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO NOTHING",
            &[&digest, &revision, &files, &at],
        )
        .map(|_| ())
    }

    fn bundle(&mut self, digest: &str) -> Result<Option<Vec<u8>>, ControlError> {
        self.one(
            "SELECT files FROM policy_bundles WHERE digest = $1",
            &[&digest],
            |r| r.try_get(0),
        )
    }

    fn append_revision(&mut self, rev: &Revision) -> Result<u64, ControlError> {
        let id = self.one(
            "INSERT INTO policy_history (revision, digest, action, actor, reason, at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            &[
                &rev.revision,
                &rev.digest,
                &rev.action,
                &rev.actor,
                &rev.reason,
                &rev.activated_at,
            ],
            |r| r.try_get::<_, i64>(0),
        )?;
        Ok(id.and_then(|id| u64::try_from(id).ok()).unwrap_or(0))
    }

    fn revisions(&mut self, limit: u32) -> Result<Vec<Revision>, ControlError> {
        let limit = i64::from(limit);
        self.all(
            "SELECT id, revision, digest, action, actor, reason, at FROM policy_history \
             ORDER BY id DESC LIMIT $1",
            &[&limit],
            revision_row,
        )
    }

    fn insert_incident(&mut self, i: &Incident) -> Result<(), ControlError> {
        let evidence = to_json(&i.evidence)?;
        let actions = to_json(&i.actions)?;
        let decisions = to_json(&i.decisions)?;
        let level = i64::from(i.autonomy_level);
        self.exec(
            &format!(
                "INSERT INTO incidents ({INCIDENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, \
                 $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)"
            ),
            &[
                &i.id,
                &i.tenant,
                &i.agent,
                &i.session,
                &i.run_id,
                &i.kind,
                &i.severity.as_str(),
                &i.summary,
                &evidence,
                &i.trigger_decision,
                &i.decided_at_ns,
                &i.status.as_str(),
                &i.created_at_ns,
                &i.updated_at,
                &i.acknowledged_by,
                &i.closed_by,
                &i.close_reason,
                &actions,
                &level,
                &i.reported_by,
                &i.policy_revision,
                &decisions,
            ],
        )
        .map(|_| ())
    }

    fn incident(&mut self, tenant: &str, id: &str) -> Result<Option<Incident>, ControlError> {
        self.one(
            &format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE tenant = $1 AND id = $2"),
            &[&tenant, &id],
            incident_row,
        )
    }

    fn incidents(
        &mut self,
        tenant: Option<&str>,
        status: Option<IncidentStatus>,
        agent: Option<&str>,
    ) -> Result<Vec<Incident>, ControlError> {
        let status = status.map(IncidentStatus::as_str);
        let (cond, values) = filters(
            1,
            &[("tenant", tenant), ("status", status), ("agent", agent)],
        );
        let params = bound(Vec::new(), &values);
        self.all(
            &format!(
                "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE TRUE{cond} \
                 ORDER BY created_at_ns, id"
            ),
            &params,
            incident_row,
        )
    }

    fn update_incident(&mut self, i: &Incident) -> Result<(), ControlError> {
        let actions = to_json(&i.actions)?;
        self.exec(
            "UPDATE incidents SET status = $3, acknowledged_by = $4, closed_by = $5, \
             close_reason = $6, updated_at = $7, actions = $8 WHERE tenant = $1 AND id = $2",
            &[
                &i.tenant,
                &i.id,
                &i.status.as_str(),
                &i.acknowledged_by,
                &i.closed_by,
                &i.close_reason,
                &i.updated_at,
                &actions,
            ],
        )
        .map(|_| ())
    }

    fn insert_notification(
        &mut self,
        incident: &Incident,
        url: &str,
        payload: &str,
        at_ms: i64,
    ) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO outbox (incident, tenant, url, payload, state, attempts, next_at_ms, \
             last_error, created_at_ms, done_at_ms) \
             VALUES ($1, $2, $3, $4, 'pending', 0, $5, '', $5, 0)",
            &[&incident.id, &incident.tenant, &url, &payload, &at_ms],
        )
        .map(|_| ())
    }

    fn due_notifications(
        &mut self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Outbox>, ControlError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.all(
            &format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' \
                 AND next_at_ms <= $1 ORDER BY next_at_ms, id LIMIT $2"
            ),
            &[&now_ms, &limit],
            outbox_row,
        )
    }

    fn next_notification_at(&mut self) -> Result<Option<i64>, ControlError> {
        Ok(self
            .one(
                "SELECT min(next_at_ms) FROM outbox WHERE state = 'pending'",
                &[],
                |r| r.try_get::<_, Option<i64>>(0),
            )?
            .flatten())
    }

    fn notifications(&mut self, incident: &str) -> Result<Vec<Outbox>, ControlError> {
        self.all(
            &format!("SELECT {OUTBOX_COLUMNS} FROM outbox WHERE incident = $1 ORDER BY id"),
            &[&incident],
            outbox_row,
        )
    }

    fn update_notification(&mut self, n: &Outbox, done_at_ms: i64) -> Result<(), ControlError> {
        let attempts = i32::try_from(n.attempts).unwrap_or(i32::MAX);
        self.exec(
            "UPDATE outbox SET payload = $2, state = $3, attempts = $4, next_at_ms = $5, \
             last_error = $6, done_at_ms = $7 WHERE id = $1",
            &[
                &n.id,
                &n.payload,
                &n.state,
                &attempts,
                &n.next_at_ms,
                &n.last_error,
                &done_at_ms,
            ],
        )
        .map(|_| ())
    }

    fn delete_finished_notifications(&mut self, before_ms: i64) -> Result<usize, ControlError> {
        let n = self.exec(
            "DELETE FROM outbox WHERE state <> 'pending' AND done_at_ms < $1",
            &[&before_ms],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn append_incident_event(
        &mut self,
        event: &str,
        tenant: &str,
        incident: &str,
    ) -> Result<u64, ControlError> {
        let seq = self
            .one(
                "UPDATE meta SET value = value + 1 WHERE key = 'incident_seq' RETURNING value",
                &[],
                |r| r.try_get::<_, i64>(0),
            )?
            .ok_or_else(|| ControlError::Store("the incident_seq row is missing".into()))?;
        self.exec(
            "INSERT INTO incident_events (seq, event, tenant, incident) VALUES ($1, $2, $3, $4)",
            &[&seq, &event, &tenant, &incident],
        )?;
        let kept = stored("feed size", self.kept)?;
        if seq % 100 == 0 {
            self.exec(
                "DELETE FROM incident_events WHERE seq <= $1",
                &[&seq.saturating_sub(kept)],
            )?;
        }
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    fn incident_events(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<IncidentEvent>, ControlError> {
        let (after, limit) = (
            stored("incident event", after)?,
            i64::try_from(limit).unwrap_or(i64::MAX),
        );
        self.all(
            "SELECT seq, event, tenant, incident FROM incident_events WHERE seq > $1 \
             ORDER BY seq LIMIT $2",
            &[&after, &limit],
            |r| {
                Ok(IncidentEvent {
                    seq: u64::try_from(r.try_get::<_, i64>(0)?).unwrap_or(0),
                    event: r.try_get(1)?,
                    tenant: r.try_get(2)?,
                    incident: r.try_get(3)?,
                })
            },
        )
    }

    fn last_incident_event(&mut self) -> Result<u64, ControlError> {
        self.meta("incident_seq")
    }
}
