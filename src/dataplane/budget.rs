//! Per-agent call and cost budgets, counted by the data plane that decides the calls.
//!
//! A budget allows `max_calls` calls and `max_cost` cost (from the `x-aegis-cost` request
//! header) per window of `window_secs`; windows are fixed (aligned to multiples of the
//! window length) and start over empty. A call that would go past either limit is denied
//! with `budget_exhausted` and consumes nothing; only calls that go on to the tool count.
//! Counts live in memory: each sidecar counts the calls it decides (in the all-in-one
//! server, every call), and a restart starts the window over.

use std::collections::HashMap;
use std::sync::Mutex;

/// A budget's limits (0: no limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Most calls per window.
    pub max_calls: u64,
    /// Most cost (the sum of the calls' costs) per window.
    pub max_cost: f64,
    /// Window length, seconds.
    pub window_secs: u64,
}

/// Use in the current window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    window: i64,
    /// Calls counted in the current window.
    pub calls: u64,
    /// Cost counted in the current window.
    pub cost: f64,
}

/// Which limit a refused call would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// `max_calls` would be passed.
    Calls,
    /// `max_cost` would be passed.
    Cost,
}

/// Budget counters by tenant and agent.
#[derive(Debug, Default)]
pub struct Meter {
    usage: Mutex<HashMap<String, HashMap<String, Usage>>>,
}

impl Meter {
    /// Charges one call of `cost` to the agent at Unix time `now`, or refuses it.
    pub fn charge(
        &self,
        tenant: &str,
        agent: &str,
        limit: &Limit,
        cost: f64,
        now: i64,
    ) -> Result<(), Exhausted> {
        let window = window_of(limit, now);
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let per_tenant = match all.get_mut(tenant) {
            Some(m) => m,
            None => all.entry(tenant.to_owned()).or_default(),
        };
        let usage = match per_tenant.get_mut(agent) {
            Some(u) => u,
            None => per_tenant.entry(agent.to_owned()).or_default(),
        };
        if usage.window != window {
            *usage = Usage {
                window,
                ..Usage::default()
            };
        }
        usage.admits(limit, cost)?;
        usage.calls += 1;
        usage.cost += cost;
        Ok(())
    }

    /// Whether a call of `cost` would be charged now, without charging it.
    pub fn check(
        &self,
        tenant: &str,
        agent: &str,
        limit: &Limit,
        cost: f64,
        now: i64,
    ) -> Result<(), Exhausted> {
        self.usage(tenant, agent, limit, now).admits(limit, cost)
    }

    /// The agent's use in the window containing `now`.
    pub fn usage(&self, tenant: &str, agent: &str, limit: &Limit, now: i64) -> Usage {
        let window = window_of(limit, now);
        let all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        all.get(tenant)
            .and_then(|m| m.get(agent))
            .filter(|u| u.window == window)
            .copied()
            .unwrap_or_default()
    }
}

impl Usage {
    /// Whether one more call of `cost` stays within `limit`.
    fn admits(&self, limit: &Limit, cost: f64) -> Result<(), Exhausted> {
        if limit.max_calls > 0 && self.calls + 1 > limit.max_calls {
            return Err(Exhausted::Calls);
        }
        if limit.max_cost > 0.0 && self.cost + cost > limit.max_cost {
            return Err(Exhausted::Cost);
        }
        Ok(())
    }
}

fn window_of(limit: &Limit, now: i64) -> i64 {
    let len = i64::try_from(limit.window_secs.max(1)).unwrap_or(i64::MAX);
    now.div_euclid(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_cost_per_window() {
        let m = Meter::default();
        let calls = Limit {
            max_calls: 2,
            max_cost: 0.0,
            window_secs: 60,
        };
        assert_eq!(m.charge("t", "a", &calls, 0.0, 120), Ok(()));
        assert_eq!(m.charge("t", "a", &calls, 0.0, 150), Ok(()));
        assert_eq!(m.charge("t", "a", &calls, 0.0, 179), Err(Exhausted::Calls));
        assert_eq!(m.charge("t", "b", &calls, 0.0, 179), Ok(()), "per agent");
        assert_eq!(m.charge("t", "a", &calls, 0.0, 180), Ok(()), "next window");
        let cost = Limit {
            max_calls: 0,
            max_cost: 10.0,
            window_secs: 60,
        };
        assert_eq!(m.charge("u", "a", &cost, 7.5, 0), Ok(()));
        assert_eq!(m.charge("u", "a", &cost, 3.0, 1), Err(Exhausted::Cost));
        assert_eq!(
            m.charge("u", "a", &cost, 2.5, 2),
            Ok(()),
            "a refused call costs nothing"
        );
        assert_eq!(m.usage("u", "a", &cost, 3).cost, 10.0);
    }
}
