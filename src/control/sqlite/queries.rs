//! A unit of work's reads and writes over one SQLite transaction ([`Txn`]), and the
//! version bump and change feed every published change goes through.

use super::*;

/// Bumps and returns the watched-state version (inside the caller's transaction).
pub(super) fn bump(tx: &Connection) -> Result<u64, ControlError> {
    let v: i64 = tx
        .query_row(
            "UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// A counter of the `meta` table (`version`, `epoch`, `feed_floor`).
pub(super) fn meta(tx: &Connection, key: &str) -> Result<u64, ControlError> {
    let v: i64 = tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .map_err(db_err)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// A stored integer from a u64 (versions, epochs, limits), or an error naming it.
pub(super) fn stored(what: &str, v: u64) -> Result<i64, ControlError> {
    i64::try_from(v).map_err(|_| db_err(format!("{what} {v} is past what SQLite stores")))
}

/// Appends a committed change (its event carries its history hash) to the feed, inside
/// the caller's transaction, and prunes the feed and the hashes to their last `kept`
/// versions (every 100 versions), remembering the highest pruned.
pub(super) fn append_change(
    tx: &Connection,
    event: &pb::WatchEvent,
    kept: u64,
) -> Result<(), ControlError> {
    use prost::Message;
    let stored = |v: u64| i64::try_from(v).map_err(|_| db_err(format!("version {v} too large")));
    tx.execute(
        "INSERT INTO changes (version, epoch, event) VALUES (?1, ?2, ?3)",
        params![
            stored(event.version)?,
            stored(event.epoch)?,
            event.encode_to_vec()
        ],
    )
    .map_err(db_err)?;
    if let Some(floor) = event.version.checked_sub(kept).filter(|f| f % 100 == 0) {
        let floor = stored(floor)?;
        let pruned = tx
            .execute("DELETE FROM changes WHERE version <= ?1", [floor])
            .map_err(db_err)?;
        tx.execute("DELETE FROM chains WHERE version <= ?1", [floor])
            .map_err(db_err)?;
        if pruned > 0 {
            tx.execute(
                "UPDATE meta SET value = max(value, ?1) WHERE key = 'feed_floor'",
                [floor],
            )
            .map_err(db_err)?;
        }
    }
    Ok(())
}

/// `" AND col = ?n"` filters for optional values; returns the SQL and the bound values.
pub(super) fn filters<'a>(
    first: usize,
    pairs: &[(&str, Option<&'a str>)],
) -> (String, Vec<&'a str>) {
    let mut sql = String::new();
    let mut values = Vec::new();
    for (col, v) in pairs {
        if let Some(v) = v {
            values.push(*v);
            sql.push_str(&format!(" AND {col} = ?{}", first + values.len() - 1));
        }
    }
    (sql, values)
}

/// A unit of work's view of one SQLite transaction.
pub(super) struct SqliteTxn<'a> {
    pub(super) tx: &'a rusqlite::Transaction<'a>,
    pub(super) feed_kept: u64,
    /// The version this transaction published, announced after the commit.
    pub(super) published: Option<u64>,
}

impl SqliteTxn<'_> {
    fn all<T>(
        &self,
        sql: &str,
        bound: &[&dyn rusqlite::ToSql],
        row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, ControlError> {
        let mut s = self.tx.prepare(sql).map_err(db_err)?;
        collect(s.query_map(bound, row).map_err(db_err)?)
    }

    fn one<T>(
        &self,
        sql: &str,
        bound: &[&dyn rusqlite::ToSql],
        row: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, ControlError> {
        self.tx
            .query_row(sql, bound, row)
            .optional()
            .map_err(db_err)
    }

    fn exec(&self, sql: &str, bound: &[&dyn rusqlite::ToSql]) -> Result<usize, ControlError> {
        self.tx.execute(sql, bound).map_err(db_err)
    }
}

/// The condition selecting a kill scope's tokens (bound as ?1 tenant, ?2 target).
pub(super) fn scope_condition(scope: Scope) -> &'static str {
    match scope {
        Scope::Session => "tenant = ?1 AND session = ?2",
        Scope::Agent => "tenant = ?1 AND agent = ?2",
        Scope::Tenant => "tenant = ?1 AND ?2 = ?2",
        Scope::All => "?1 = ?1 AND ?2 = ?2",
    }
}

impl Txn for SqliteTxn<'_> {
    fn epoch(&mut self) -> Result<u64, ControlError> {
        meta(self.tx, "epoch")
    }

    fn version(&mut self) -> Result<u64, ControlError> {
        meta(self.tx, "version")
    }

    fn publish(
        &mut self,
        items: &[pb::StateItem],
        epoch_event: bool,
    ) -> Result<(u64, u64), ControlError> {
        use prost::Message;
        let version = bump(self.tx)?;
        let epoch = meta(self.tx, "epoch")?;
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
        self.exec(
            "INSERT INTO chains (version, chain) VALUES (?1, ?2) \
             ON CONFLICT (version) DO UPDATE SET chain = excluded.chain",
            params![stored("version", version)?, event.chain],
        )?;
        if !items.is_empty() || epoch_event {
            append_change(self.tx, &event, self.feed_kept)?;
        }
        self.published = Some(version);
        Ok((epoch, version))
    }

    fn set_epoch(&mut self, epoch: u64) -> Result<(), ControlError> {
        let epoch = stored("state epoch", epoch)?;
        self.exec("UPDATE meta SET value = ?1 WHERE key = 'epoch'", &[&epoch])
            .map(|_| ())
    }

    fn chain_at(&mut self, version: u64) -> Result<Option<Vec<u8>>, ControlError> {
        let v = stored("version", version)?;
        self.one("SELECT chain FROM chains WHERE version = ?1", &[&v], |r| {
            r.get(0)
        })
    }

    fn reported_ahead(&mut self) -> Result<Option<(u64, u64, String)>, ControlError> {
        let row: Option<(i64, i64, String)> = self.one(
            "SELECT epoch, version, sidecar FROM reported WHERE id = 1",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
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
            "INSERT INTO reported (id, epoch, version, sidecar) VALUES (1, ?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, \
             version = excluded.version, sidecar = excluded.sidecar",
            params![e, v, sidecar],
        )
        .map(|_| ())
    }

    fn agent(&mut self, tenant: &str, id: &str, now: i64) -> Result<Option<Agent>, ControlError> {
        self.one(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE tenant = ?2 AND id = ?3"),
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
        let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&now];
        bound.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
        self.all(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE 1 = 1{cond} ORDER BY tenant, id"),
            &bound,
            agent_row,
        )
    }

    fn insert_agent(&mut self, a: &Agent) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO agents (tenant, id, status, risk_tier, reason, created_at, updated_at, \
             updated_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
            params![
                a.tenant,
                a.id,
                a.status.as_str(),
                a.risk_tier,
                a.reason,
                a.created_at,
                a.updated_by
            ],
        )
        .map(|_| ())
    }

    fn update_agent(&mut self, a: &Agent) -> Result<(), ControlError> {
        self.exec(
            "UPDATE agents SET status = ?3, reason = ?4, updated_at = ?5, updated_by = ?6 \
             WHERE tenant = ?1 AND id = ?2",
            params![
                a.tenant,
                a.id,
                a.status.as_str(),
                a.reason,
                a.updated_at,
                a.updated_by
            ],
        )
        .map(|_| ())
    }

    fn token(&mut self, jti: &str) -> Result<Option<Token>, ControlError> {
        self.one(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = ?1"),
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
            " AND revoked_at IS NULL AND expires_at > ?2"
        } else {
            " AND ?2 = ?2"
        };
        let (cond, values) = filters(3, &[("agent", agent)]);
        let mut bound: Vec<&dyn rusqlite::ToSql> = vec![&tenant, &after];
        bound.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant = ?1{live}{cond} \
                 ORDER BY issued_at, jti"
            ),
            &bound,
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
        let cond = scope_condition(scope);
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE {cond} AND revoked_at IS NULL \
                 AND expires_at > ?3 ORDER BY issued_at, jti"
            ),
            &[&tenant, &target, &expiring_after],
            token_row,
        )
    }

    fn revoked_tokens(&mut self, expiring_after: i64) -> Result<Vec<Token>, ControlError> {
        self.all(
            &format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE revoked_at IS NOT NULL \
                 AND expires_at > ?1 ORDER BY jti"
            ),
            &[&expiring_after],
            token_row,
        )
    }

    fn insert_token(&mut self, t: &Token) -> Result<(), ControlError> {
        let scopes = serde_json::to_string(&t.scopes).map_err(db_err)?;
        self.exec(
            "INSERT INTO tokens (jti, tenant, agent, session, scopes, issued_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.jti,
                t.tenant,
                t.agent,
                t.session,
                scopes,
                t.issued_at,
                t.expires_at
            ],
        )
        .map(|_| ())
    }

    fn revoke_token(&mut self, jti: &str, at: i64, reason: &str) -> Result<(), ControlError> {
        self.exec(
            "UPDATE tokens SET revoked_at = ?2, revoked_reason = ?3 WHERE jti = ?1",
            params![jti, at, reason],
        )
        .map(|_| ())
    }

    fn scope_known(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
    ) -> Result<bool, ControlError> {
        let sql = match scope {
            Scope::Session => "SELECT count(*) FROM tokens WHERE tenant = ?1 AND session = ?2",
            Scope::Agent => {
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = ?1 AND agent = ?2) + \
                 (SELECT count(*) FROM agents WHERE tenant = ?1 AND id = ?2)"
            }
            Scope::Tenant => {
                "SELECT (SELECT count(*) FROM tokens WHERE tenant = ?1) + \
                 (SELECT count(*) FROM agents WHERE tenant = ?1) + \
                 (SELECT count(*) FROM tenants WHERE name = ?1) + 0 * length(?2)"
            }
            Scope::All => "SELECT 1 + 0 * length(?1 || ?2)",
        };
        let n: i64 = self
            .tx
            .query_row(sql, params![tenant, target], |r| r.get(0))
            .map_err(db_err)?;
        Ok(n > 0)
    }

    fn kill_mark(
        &mut self,
        scope: Scope,
        tenant: &str,
        target: &str,
    ) -> Result<Option<KillMark>, ControlError> {
        self.one(
            "SELECT scope, tenant, target, before FROM kills \
             WHERE scope = ?1 AND tenant = ?2 AND target = ?3",
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (scope, tenant, target) DO UPDATE SET before = excluded.before, \
             reason = excluded.reason, actor = excluded.actor, at = excluded.at",
            params![
                mark.scope.code(),
                mark.tenant,
                mark.target,
                mark.before,
                reason,
                actor,
                at
            ],
        )
        .map(|_| ())
    }

    fn tenant(&mut self, name: &str) -> Result<Option<Tenant>, ControlError> {
        self.one(
            "SELECT name, mode, autonomy_level, updated_at, updated_by FROM tenants WHERE name = ?1",
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
        self.exec(
            "INSERT INTO tenants (name, mode, autonomy_level, updated_at, updated_by) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET mode = excluded.mode, \
             autonomy_level = excluded.autonomy_level, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            params![
                t.name,
                t.mode.as_str(),
                t.autonomy_level,
                t.updated_at,
                t.updated_by
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
        let bound: Vec<&dyn rusqlite::ToSql> =
            values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        self.all(
            &format!(
                "SELECT {BUDGET_COLUMNS} FROM budgets WHERE 1 = 1{cond} ORDER BY tenant, agent"
            ),
            &bound,
            budget_row,
        )
    }

    fn put_budget(&mut self, b: &Budget) -> Result<(), ControlError> {
        self.exec(
            "INSERT INTO budgets (tenant, agent, max_calls, max_cost, window_secs, updated_at, \
             updated_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (tenant, agent) DO UPDATE \
             SET max_calls = excluded.max_calls, max_cost = excluded.max_cost, \
             window_secs = excluded.window_secs, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
            params![
                b.tenant,
                b.agent,
                i64::try_from(b.max_calls).unwrap_or(i64::MAX),
                b.max_cost,
                i64::try_from(b.window_secs).unwrap_or(i64::MAX),
                b.updated_at,
                b.updated_by
            ],
        )
        .map(|_| ())
    }

    fn delete_budget(&mut self, tenant: &str, agent: &str) -> Result<(), ControlError> {
        self.exec(
            "DELETE FROM budgets WHERE tenant = ?1 AND agent = ?2",
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
        let bound: Vec<&dyn rusqlite::ToSql> =
            values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        self.all(
            &format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE 1 = 1{cond} ORDER BY created_at, id"
            ),
            &bound,
            approval_row,
        )
    }

    fn approval(&mut self, tenant: &str, id: &str) -> Result<Option<Approval>, ControlError> {
        self.one(
            &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = ?1 AND id = ?2"),
            &[&tenant, &id],
            approval_row,
        )
    }

    fn insert_approval(&mut self, a: &Approval) -> Result<(), ControlError> {
        self.exec(
            &format!(
                "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"
            ),
            params![
                a.id,
                a.tenant,
                a.agent,
                a.session,
                a.run_id,
                a.tool,
                a.action,
                a.resource,
                a.arguments,
                a.call_hash,
                a.policy_reason,
                a.decision_id,
                a.status.as_str(),
                a.created_at,
                a.expires_at,
                a.decided_by,
                a.decided_at,
                a.decision_reason,
                a.override_expires_at,
                a.used_at,
                a.used_by_decision
            ],
        )
        .map(|_| ())
    }

    fn update_approval(&mut self, a: &Approval) -> Result<(), ControlError> {
        self.exec(
            "UPDATE approvals SET status = ?3, decided_by = ?4, decided_at = ?5, \
             decision_reason = ?6, override_expires_at = ?7, used_at = ?8, used_by_decision = ?9 \
             WHERE tenant = ?1 AND id = ?2",
            params![
                a.tenant,
                a.id,
                a.status.as_str(),
                a.decided_by,
                a.decided_at,
                a.decision_reason,
                a.override_expires_at,
                a.used_at,
                a.used_by_decision
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
            "INSERT OR IGNORE INTO policy_bundles (digest, revision, files, stored_at) \
             VALUES (?1, ?2, ?3, ?4)",
            params![digest, revision, files, at],
        )
        .map(|_| ())
    }

    fn bundle(&mut self, digest: &str) -> Result<Option<Vec<u8>>, ControlError> {
        self.one(
            "SELECT files FROM policy_bundles WHERE digest = ?1",
            &[&digest],
            |r| r.get(0),
        )
    }

    fn append_revision(&mut self, rev: &Revision) -> Result<u64, ControlError> {
        self.exec(
            "INSERT INTO policy_history (revision, digest, action, actor, reason, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                rev.revision,
                rev.digest,
                rev.action,
                rev.actor,
                rev.reason,
                rev.activated_at
            ],
        )?;
        Ok(u64::try_from(self.tx.last_insert_rowid()).unwrap_or(0))
    }

    fn revisions(&mut self, limit: u32) -> Result<Vec<Revision>, ControlError> {
        self.all(
            "SELECT id, revision, digest, action, actor, reason, at FROM policy_history \
             ORDER BY id DESC LIMIT ?1",
            &[&limit],
            revision_row,
        )
    }

    fn insert_incident(&mut self, i: &Incident) -> Result<(), ControlError> {
        let evidence = serde_json::to_string(&i.evidence).map_err(db_err)?;
        let actions = serde_json::to_string(&i.actions).map_err(db_err)?;
        let decisions = serde_json::to_string(&i.decisions).map_err(db_err)?;
        self.exec(
            &format!(
                "INSERT INTO incidents ({INCIDENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                 ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
            ),
            params![
                i.id,
                i.tenant,
                i.agent,
                i.session,
                i.run_id,
                i.kind,
                i.severity.as_str(),
                i.summary,
                evidence,
                i.trigger_decision,
                i.decided_at_ns,
                i.status.as_str(),
                i.created_at_ns,
                i.updated_at,
                i.acknowledged_by,
                i.closed_by,
                i.close_reason,
                actions,
                i.autonomy_level,
                i.reported_by,
                i.policy_revision,
                decisions
            ],
        )
        .map(|_| ())
    }

    fn incident(&mut self, tenant: &str, id: &str) -> Result<Option<Incident>, ControlError> {
        self.one(
            &format!("SELECT {INCIDENT_COLUMNS} FROM incidents WHERE tenant = ?1 AND id = ?2"),
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
        let bound: Vec<&dyn rusqlite::ToSql> =
            values.iter().map(|v| v as &dyn rusqlite::ToSql).collect();
        self.all(
            &format!(
                "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE 1 = 1{cond} ORDER BY created_at_ns, id"
            ),
            &bound,
            incident_row,
        )
    }

    fn update_incident(&mut self, i: &Incident) -> Result<(), ControlError> {
        let actions = serde_json::to_string(&i.actions).map_err(db_err)?;
        self.exec(
            "UPDATE incidents SET status = ?3, acknowledged_by = ?4, closed_by = ?5, \
             close_reason = ?6, updated_at = ?7, actions = ?8 WHERE tenant = ?1 AND id = ?2",
            params![
                i.tenant,
                i.id,
                i.status.as_str(),
                i.acknowledged_by,
                i.closed_by,
                i.close_reason,
                i.updated_at,
                actions
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
             last_error, created_at_ms, done_at_ms) VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, '', ?5, 0)",
            params![incident.id, incident.tenant, url, payload, at_ms],
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
                 AND next_at_ms <= ?1 ORDER BY next_at_ms, id LIMIT ?2"
            ),
            &[&now_ms, &limit],
            outbox_row,
        )
    }

    fn next_notification_at(&mut self) -> Result<Option<i64>, ControlError> {
        self.tx
            .query_row(
                "SELECT min(next_at_ms) FROM outbox WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)
    }

    fn notifications(&mut self, incident: &str) -> Result<Vec<Outbox>, ControlError> {
        self.all(
            &format!("SELECT {OUTBOX_COLUMNS} FROM outbox WHERE incident = ?1 ORDER BY id"),
            &[&incident],
            outbox_row,
        )
    }

    fn update_notification(&mut self, n: &Outbox, done_at_ms: i64) -> Result<(), ControlError> {
        self.exec(
            "UPDATE outbox SET payload = ?2, state = ?3, attempts = ?4, next_at_ms = ?5, \
             last_error = ?6, done_at_ms = ?7 WHERE id = ?1",
            params![
                n.id,
                n.payload,
                n.state,
                n.attempts,
                n.next_at_ms,
                n.last_error,
                done_at_ms
            ],
        )
        .map(|_| ())
    }

    fn delete_finished_notifications(&mut self, before_ms: i64) -> Result<usize, ControlError> {
        self.exec(
            "DELETE FROM outbox WHERE state != 'pending' AND done_at_ms < ?1",
            &[&before_ms],
        )
    }

    fn append_incident_event(
        &mut self,
        event: &str,
        tenant: &str,
        incident: &str,
    ) -> Result<u64, ControlError> {
        let seq: i64 = self
            .tx
            .query_row(
                "UPDATE meta SET value = value + 1 WHERE key = 'incident_seq' RETURNING value",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        self.exec(
            "INSERT INTO incident_events (seq, event, tenant, incident) VALUES (?1, ?2, ?3, ?4)",
            params![seq, event, tenant, incident],
        )?;
        let kept = stored("feed size", self.feed_kept)?;
        if seq % 100 == 0 {
            self.exec(
                "DELETE FROM incident_events WHERE seq <= ?1",
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
            "SELECT seq, event, tenant, incident FROM incident_events WHERE seq > ?1 \
             ORDER BY seq LIMIT ?2",
            &[&after, &limit],
            |r| {
                Ok(IncidentEvent {
                    seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    event: r.get(1)?,
                    tenant: r.get(2)?,
                    incident: r.get(3)?,
                })
            },
        )
    }

    fn last_incident_event(&mut self) -> Result<u64, ControlError> {
        meta(self.tx, "incident_seq")
    }
}
