//! Readiness: what makes the server NOT_SERVING, published to gRPC health and /readyz as
//! it changes.

use super::*;

/// What readiness is judged on.
pub(super) struct Readiness {
    pub(super) audit: AuditLog,
    /// The data plane's policy and control state (absent on a control-plane-only server).
    pub(super) policy: Option<Arc<Policy>>,
    pub(super) state: Arc<State>,
    /// Seconds a revoked token id is kept past its token's expiry (over the verifier's
    /// clock-skew leeway, which still accepts a token that long after `exp`).
    pub(super) revocation_slack: i64,
    /// (what, file, key id in use) of the token-signing key and the audit key.
    pub(super) keys: [(&'static str, std::path::PathBuf, String); 2],
    /// The control plane, where it runs here: not ready while it cannot reach its store.
    pub(super) control: Option<Arc<crate::control::core::ControlCore>>,
}

impl Readiness {
    /// Why the control plane here cannot reach its store, if so (handing watchers off).
    fn store_lost(&self) -> Option<String> {
        let why = self.control.as_ref()?.store_lost()?;
        Some(format!("control store: {why}"))
    }

    /// `Err` naming the first unusable part: the audit log (its last commit failed), the
    /// policy (every recent evaluation failed), or the signing key or the audit key (its
    /// file is missing, unreadable or another key: a restart would sign with something
    /// else, or not start).
    pub(super) fn check(&self) -> Result<(), String> {
        if !self.audit.is_healthy() {
            return Err("audit log: the last commit failed".into());
        }
        // A control plane alone is not ready without its store. With a data plane here
        // (all-in-one) Checks go on from the state held: only the control service says so
        // (see `publish_health`).
        if self.policy.is_none()
            && let Some(why) = self.store_lost()
        {
            return Err(why);
        }
        if let Some(policy) = &self.policy {
            policy.health()?;
            if !self.state.synced() {
                if let Some(rollback) = self.state.rollback() {
                    return Err(rollback.to_string());
                }
                return Err("control plane: no state received yet (a sidecar fails closed until its first snapshot)".into());
            }
        }
        for (what, file, kid) in &self.keys {
            match Signer::load_file(file) {
                Ok(s) if s.kid() == kid => {}
                Ok(s) => {
                    return Err(format!(
                        "{what}: the file now holds key {}, not {kid} in use",
                        s.kid()
                    ));
                }
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
        Ok(())
    }
}

/// The health services this server answers for: the server as a whole, ext_authz and
/// the control plane as they run here.
pub(super) fn health_services(authz: bool, control: bool) -> Vec<&'static str> {
    let mut services = vec![""];
    if authz {
        services.push(AUTHZ_SERVICE);
    }
    if control {
        services.push(crate::control::CONTROL_SERVICE);
    }
    services
}

/// The health published: every service's, and the control service's (which also needs
/// the control store).
pub(super) type Published = (ServingStatus, ServingStatus);

/// Checks readiness and, when it differs from `last`, logs why and sets it for every
/// service (the control service NOT_SERVING as well while the control plane cannot reach
/// its store). Returns what is published now.
pub(super) async fn publish_health(
    reporter: &tonic_health::server::HealthReporter,
    readiness: &Readiness,
    services: &[&'static str],
    last: Option<Published>,
) -> Published {
    let verdict = readiness.check();
    let status = if verdict.is_ok() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    let lost = readiness.store_lost();
    let control = if lost.is_some() {
        ServingStatus::NotServing
    } else {
        status
    };
    if last != Some((status, control)) {
        match (&verdict, &lost) {
            (Err(why), _) => crate::log!(error, "health: NOT_SERVING: {why}"),
            (Ok(()), Some(why)) => crate::log!(
                error,
                "health: {} NOT_SERVING (Checks go on from the state held): {why}",
                crate::control::CONTROL_SERVICE
            ),
            (Ok(()), None) if last.is_some() => crate::log!(info, "health: SERVING again"),
            (Ok(()), None) => {}
        }
        for service in services {
            let s = if *service == crate::control::CONTROL_SERVICE {
                control
            } else {
                status
            };
            reporter.set_service_status(*service, s).await;
        }
    }
    (status, control)
}

/// Keeps the health service truthful: NOT_SERVING while the audit log, the policy or the
/// signing key is unusable, SERVING again once it recovers; each change is logged with its
/// reason. Also summarises shed Checks (overload) since the last tick.
pub(super) async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    readiness: Arc<Readiness>,
    checker: Option<Arc<Checker>>,
    services: Vec<&'static str>,
    first: Published,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = Some(first);
    let mut ticks: u64 = 0;
    let mut shed_before = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        last = Some(publish_health(&reporter, &readiness, &services, last).await);
        if let Some(checker) = &checker {
            // Revoked token ids are useless once their tokens have expired: drop them now
            // and then (every minute) so the set holds only what can still be presented.
            ticks += 1;
            if ticks.is_multiple_of(240) {
                readiness
                    .state
                    .revocations
                    .prune(crate::control::now_secs(), readiness.revocation_slack);
            }
            let shed = checker.admission.shed();
            if shed != shed_before {
                crate::log!(
                    warn,
                    "overloaded: shed {} Checks over limits.max_inflight and {} on a full audit \
                     queue since the last report ({} in flight)",
                    shed.0 - shed_before.0,
                    shed.1 - shed_before.1,
                    checker.admission.inflight()
                );
                shed_before = shed;
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {
                for service in &services {
                    reporter.set_service_status(*service, ServingStatus::NotServing).await;
                }
                return;
            }
        }
    }
}
