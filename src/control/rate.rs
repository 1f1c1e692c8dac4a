//! How often one sidecar credential may raise approvals and report incidents.
//!
//! Both calls make the control plane act for a tenant (a pending approval counts against
//! the agent's cap; an incident may restrict, freeze or kill it), so a compromised agent
//! pod holding its sidecar's credential must not be able to make them as fast as it can
//! send. Each credential (its actor and tenants), call kind and agent gets a token bucket:
//! `burst` calls at once, refilled at `per_sec`; a call past it is RESOURCE_EXHAUSTED, and
//! nothing is stored or audited for it. Kinds and agents have buckets of their own so that
//! an agent raising approvals as fast as it can drains neither the incident reports of
//! its sidecar (its own exfiltration would go unreported) nor the approvals of the other
//! agents sharing the credential. The in-process data plane of the all-in-one server does not
//! go through the gRPC service and is not rationed.
//!
//! The buckets sit in a map of at most [`MAX_CREDENTIALS`]: when it is full, buckets that
//! have refilled completely (their credential idle) are swept out; if none has, the call
//! is refused (fail closed) rather than the map growing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::ControlError;
use super::auth::Operator;

/// Buckets (credential, kind, agent) at once.
pub const MAX_CREDENTIALS: usize = 65_536;

/// The buckets of every sidecar credential.
#[derive(Debug)]
pub struct SidecarRate {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Calls refused since start (`aegis_control_sidecar_calls_refused_total`).
    pub refused: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl SidecarRate {
    /// `per_sec` calls a second after a burst of `burst` (both at least 1; the config
    /// refuses 0).
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes one `what` call for `agent` from `op`'s bucket, or refuses naming the rate.
    pub fn admit(&self, op: &Operator, what: &str, agent: &str) -> Result<(), ControlError> {
        let admitted = self.admit_at(op, what, agent, Instant::now());
        if admitted.is_err() {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admitted
    }

    fn admit_at(
        &self,
        op: &Operator,
        what: &str,
        agent: &str,
        now: Instant,
    ) -> Result<(), ControlError> {
        let key = format!("{}/{}/{what}/{agent}", op.actor(), op.tenant);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= MAX_CREDENTIALS {
            buckets.retain(|_, b| self.refilled(b, now) < self.burst);
            if buckets.len() >= MAX_CREDENTIALS {
                return Err(ControlError::Exhausted(format!(
                    "{MAX_CREDENTIALS} sidecar credentials are making fleet calls at once: \
                     {what} refused, try again shortly"
                )));
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = self.refilled(bucket, now);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(ControlError::Exhausted(format!(
                "sidecar credential {} ({}) is over its rate of {} calls a second (burst {}) \
                 for agent {agent}: {what} refused (control.sidecar_calls_per_sec, \
                 control.sidecar_call_burst)",
                op.name, op.tenant, self.per_sec, self.burst
            )));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + elapsed * self.per_sec).min(self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::auth::Role;
    use std::time::Duration;

    fn sidecar(name: &str, tenant: &str) -> Operator {
        Operator {
            name: name.into(),
            role: Role::Sidecar,
            tenant: tenant.into(),
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn a_burst_then_the_rate_per_credential() {
        let rate = SidecarRate::new(2, 3);
        let (a, b) = (sidecar("a", "acme"), sidecar("b", "globex"));
        let t0 = Instant::now();
        for _ in 0..3 {
            rate.admit_at(&a, "x", "bot", t0).expect("within the burst");
        }
        let e = rate.admit_at(&a, "x", "bot", t0).expect_err("over");
        assert!(matches!(e, ControlError::Exhausted(_)), "{e}");
        // Another credential has its own bucket.
        rate.admit_at(&b, "x", "bot", t0).expect("own bucket");
        // Half a second refills one call at 2 a second.
        rate.admit_at(&a, "x", "bot", t0 + Duration::from_millis(500))
            .expect("refilled");
        assert!(
            rate.admit_at(&a, "x", "bot", t0 + Duration::from_millis(500))
                .is_err()
        );
    }

    /// An agent draining its approvals leaves its sidecar's incident reports and the
    /// other agents' approvals alone (review finding: one shared bucket let an agent
    /// silence the report of its own exfiltration).
    #[test]
    fn kinds_and_agents_have_buckets_of_their_own() {
        let rate = SidecarRate::new(1, 2);
        let a = sidecar("a", "acme");
        let t0 = Instant::now();
        for _ in 0..2 {
            rate.admit_at(&a, "approval request", "mallory", t0)
                .expect("burst");
        }
        assert!(
            rate.admit_at(&a, "approval request", "mallory", t0)
                .is_err()
        );
        rate.admit_at(&a, "incident report", "mallory", t0)
            .expect("incidents are not drained by approvals");
        rate.admit_at(&a, "approval request", "alice", t0)
            .expect("another agent's approvals are not drained");
    }

    #[test]
    fn the_map_is_bounded_and_idle_buckets_make_room() {
        let rate = SidecarRate::new(1, 1);
        let t0 = Instant::now();
        for i in 0..MAX_CREDENTIALS {
            rate.admit_at(&sidecar(&format!("s{i}"), "acme"), "x", "bot", t0)
                .expect("room");
        }
        let newcomer = sidecar("new", "acme");
        assert!(
            rate.admit_at(&newcomer, "x", "bot", t0).is_err(),
            "full, none idle"
        );
        let later = t0 + Duration::from_secs(2);
        rate.admit_at(&newcomer, "x", "bot", later)
            .expect("idle buckets swept");
    }
}
