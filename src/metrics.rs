//! Prometheus instruments kept by the hot paths: fixed-bucket histograms and a bounded
//! decision × reason counter. Lock-free on the way in except the first time a reason is
//! seen; the admin listener renders them (`src/admin.rs`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A cumulative histogram over fixed upper bounds (Prometheus `le`), in the unit the
/// bounds are written in; observations are recorded in millionths of that unit.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    /// Sum in millionths of the unit.
    sum_micro: AtomicU64,
    count: AtomicU64,
}

/// Seconds: 50 µs to 2.5 s (a Check, an audit commit).
pub const LATENCY_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
];

/// Rows in one audit commit: 1 to 512 (`audit.max_batch`'s default).
pub const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

impl Histogram {
    /// An empty histogram with these bucket upper bounds (ascending), plus `+Inf`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records `v` (in the bounds' unit).
    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        // Saturating float-to-int: a negative or NaN value adds 0.
        self.sum_micro.fetch_add((v * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Records a duration, in seconds.
    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Writes the `_bucket`, `_sum` and `_count` series of `name` with its HELP and TYPE.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            match self.bounds.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_micro.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {}", self.count());
    }
}

/// Distinct reasons kept before the rest count as `other`: reasons come from policies,
/// and a policy that put a request value into its reason must not grow the scrape
/// without bound.
pub const MAX_REASONS: usize = 256;

/// Counts per (decision, reason).
#[derive(Debug, Default)]
pub struct ReasonCounts {
    by_reason: RwLock<HashMap<Box<str>, Vec<AtomicU64>>>,
}

impl ReasonCounts {
    /// Counts one answer with decision index `d` (of `decisions`, `n` in all) and `reason`.
    pub fn count(&self, d: usize, n: usize, reason: &str) {
        let reason = if reason.is_empty() { "none" } else { reason };
        if let Ok(map) = self.by_reason.read()
            && let Some(counts) = map.get(reason)
        {
            if let Some(c) = counts.get(d) {
                c.fetch_add(1, Relaxed);
            }
            return;
        }
        let Ok(mut map) = self.by_reason.write() else {
            return;
        };
        let key = if map.len() >= MAX_REASONS && !map.contains_key(reason) {
            "other"
        } else {
            reason
        };
        let counts = map
            .entry(key.into())
            .or_insert_with(|| (0..n).map(|_| AtomicU64::new(0)).collect());
        if let Some(c) = counts.get(d) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// (decision index, reason, count) for every non-zero pair, sorted by reason.
    pub fn snapshot(&self) -> Vec<(usize, String, u64)> {
        let Ok(map) = self.by_reason.read() else {
            return Vec::new();
        };
        let mut out: Vec<_> = map
            .iter()
            .flat_map(|(reason, counts)| {
                counts.iter().enumerate().filter_map(move |(d, c)| {
                    let n = c.load(Relaxed);
                    (n > 0).then(|| (d, reason.to_string(), n))
                })
            })
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
pub fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(
            out.contains("x_sum 6\n") && out.contains("x_count 4\n"),
            "{out}"
        );
    }

    #[test]
    fn reasons_are_bounded() {
        let r = ReasonCounts::default();
        for i in 0..MAX_REASONS + 10 {
            r.count(0, 2, &format!("r{i}"));
        }
        r.count(1, 2, "r0");
        let snap = r.snapshot();
        assert_eq!(
            snap.iter()
                .filter(|(_, reason, _)| reason == "other")
                .count(),
            1
        );
        let other = snap.iter().find(|(_, r, _)| r == "other").map(|x| x.2);
        assert_eq!(other, Some(10));
        assert!(snap.contains(&(1, "r0".into(), 1)));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
