//! The correlation engine: attack patterns in the decision stream.
//!
//! Every decided Check becomes a [`Decision`] event; the engine keeps a little state per
//! tenant and agent and raises an [`Finding`] when a pattern completes:
//!
//! | kind | when (defaults) | severity |
//! |---|---|---|
//! | `deny_storm` | an agent reaches 5 denies within 60 s | high |
//! | `data_exfil_pattern` | a source action, then a sink action of the same agent within 120 s | critical (high if the sink was refused) |
//! | `approval_flood` | 10 approval requests within 300 s | medium |
//! | `runaway` | 20 calls within 10 s | high |
//! | `budget_exhausted` | a call denied `budget_exhausted` | medium |
//! | `trust_escalation` | a deny, then an allow of the same tool and action within 120 s | high |
//! | `untrusted_mutation` | a state-mutating call triggered by `untrusted_external` content | high (critical if it went through) |
//!
//! Threshold rules fire **once per episode**: not again for the events that follow, nor
//! because the window slid back to the threshold; they re-arm only after a whole window in
//! which the count stayed below it. The other rules are quiet for `quiet` (5 min) after
//! they fire for the same agent and call (the same sink, tool and action): an agent that
//! reads and posts in a loop raises one incident, not one per post. Times are the decisions' own (events may arrive out of
//! order; each rule reasons on decision time, not arrival); an event without a valid time
//! is refused, never treated as epoch 0.
//!
//! Source, sink and mutating actions are matched **by word**: tool and action names are
//! split at separators and camelCase (`postgres_query` → `postgres`, `query`;
//! `sendEmail` → `send`, `email`), so `location` holds no `cat` and `postgres_query` is not
//! a `post`. The word lists come from the policy bundle's data
//! (`data.aegis.correlation.{source_words,sink_words,mutating_words}`), with the defaults
//! below when a bundle has none.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::config::CorrelationConfig;
use crate::types::Severity;

/// Default source words (reading data).
pub const SOURCE_WORDS: &[&str] = &[
    "read", "get", "fetch", "list", "download", "query", "select", "export", "dump", "cat",
];
/// Default sink words (sending data out).
pub const SINK_WORDS: &[&str] = &[
    "send",
    "post",
    "upload",
    "email",
    "webhook",
    "push",
    "publish",
    "write_external",
    "share",
    "transfer",
    "exfil",
];
/// Default words of state-mutating actions.
pub const MUTATING_WORDS: &[&str] = &[
    "create", "update", "delete", "write", "put", "patch", "post", "send", "push", "publish",
    "transfer", "refund", "pay", "execute", "exec", "run", "deploy", "merge", "remove", "drop",
    "insert", "upload", "share", "email",
];

/// Denies that are containment already in force (a frozen or revoked agent, a killed or
/// rotated-out token), not the agent meeting policy: they count towards neither a deny
/// storm nor the deny half of a trust escalation. Otherwise a frozen agent that keeps
/// calling raises storm after storm, and its unfreeze raises a `trust_escalation` on its
/// next allowed call.
pub const CONTAINMENT_REASONS: &[&str] = &[
    "agent_frozen",
    "agent_revoked",
    "token_revoked",
    // The approval machinery's own refusals: a restricted agent at its cap of pending
    // approvals, or a control plane that cannot be asked.
    "approval_cap_reached",
    "approval_unavailable",
    "override_unverified",
    // A token of a tenant this fleet sidecar does not serve: its own tenant's sidecar and
    // control plane deal with that agent, and would refuse this one's report anyway.
    "tenant_not_served",
];

/// The reason of a call held because its agent is restricted (autonomy L2): containment
/// at work, so not an approval request that counts towards an `approval_flood`.
pub const RESTRICTED_REASON: &str = "agent_restricted";

/// Thresholds and windows.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// `deny_storm`: this many denies of one agent within this window.
    pub deny_storm: (usize, Duration),
    /// `data_exfil_pattern`: how long after a source action a sink action completes the pattern.
    pub exfil_window: Duration,
    /// `approval_flood`: this many approval requests of one agent within this window.
    pub approval_flood: (usize, Duration),
    /// `runaway`: this many calls of one agent within this window.
    pub runaway: (usize, Duration),
    /// `trust_escalation`: how long after a deny an allow of the same tool and action counts.
    pub trust_escalation_window: Duration,
    /// How long a non-threshold finding (exfiltration to one sink, trust escalation or an
    /// untrusted mutation of one tool and action, budget exhaustion) stays quiet for the
    /// agent before it may fire again.
    pub quiet: Duration,
}

impl Default for Thresholds {
    /// The defaults of `[correlation]`.
    fn default() -> Self {
        Self::from_config(&CorrelationConfig::default())
    }
}

impl Thresholds {
    /// The thresholds `[correlation]` sets.
    pub fn from_config(c: &CorrelationConfig) -> Self {
        let n = |c: u32| usize::try_from(c).unwrap_or(usize::MAX);
        Self {
            deny_storm: (
                n(c.deny_storm_count),
                Duration::from_secs(c.deny_storm_window_secs),
            ),
            exfil_window: Duration::from_secs(c.exfil_window_secs),
            approval_flood: (
                n(c.approval_flood_count),
                Duration::from_secs(c.approval_flood_window_secs),
            ),
            runaway: (
                n(c.runaway_count),
                Duration::from_secs(c.runaway_window_secs),
            ),
            trust_escalation_window: Duration::from_secs(c.trust_escalation_window_secs),
            quiet: Duration::from_secs(c.quiet_secs),
        }
    }
}

/// Word lists for matching actions.
#[derive(Debug, Clone)]
pub struct Words {
    /// Words of actions that read data (the first half of `data_exfil_pattern`).
    pub source: Vec<String>,
    /// Words of actions that send data out (its second half).
    pub sink: Vec<String>,
    /// Words of actions that change state (`untrusted_mutation`).
    pub mutating: Vec<String>,
}

/// The lists split into words once.
#[derive(Debug, Clone, Default)]
struct Split {
    source: Vec<Vec<String>>,
    sink: Vec<Vec<String>>,
    mutating: Vec<Vec<String>>,
}

impl Split {
    fn of(w: &Words) -> Self {
        let split = |l: &[String]| {
            l.iter()
                .map(|e| words(e))
                .filter(|w| !w.is_empty())
                .collect()
        };
        Self {
            source: split(&w.source),
            sink: split(&w.sink),
            mutating: split(&w.mutating),
        }
    }
}

impl Default for Words {
    fn default() -> Self {
        let own = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect();
        Self {
            source: own(SOURCE_WORDS),
            sink: own(SINK_WORDS),
            mutating: own(MUTATING_WORDS),
        }
    }
}

/// One decided Check, as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Decision time, Unix nanoseconds (from the decision itself).
    pub time_ns: i64,
    /// The agent's tenant.
    pub tenant: String,
    /// The agent's id (its token's `sub`).
    pub agent: String,
    /// The agent's session (its token's `sid`); empty if it has none.
    pub session: String,
    /// The agent's run id (`x-aegis-run-id`); empty if not sent.
    pub run_id: String,
    /// The tool the call used (empty on no known route).
    pub tool: String,
    /// The action the call made on the tool.
    pub action: String,
    /// allow, deny, sanitize, approval_needed, would_deny.
    pub decision: String,
    /// The decision's reason code (`budget_exhausted`, `agent_restricted`, ...).
    pub reason: String,
    /// The decision's id, as in its audit row and span.
    pub decision_id: String,
    /// `unspecified` or an `untrusted…` level the agent declared.
    pub trust_level: String,
    /// The audit row this data plane wrote for the decision: its sequence number and hash
    /// (sent with an incident's evidence, checkable against an exported log).
    pub audit_seq: u64,
    /// That row's hash.
    pub row_hash: crate::audit::Hash,
}

/// A pattern the engine found.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The rule that fired (`deny_storm`, `data_exfil_pattern`, ...; see the module docs).
    pub kind: &'static str,
    /// A [`Severity`]'s word (`Severity::as_str`), as the incident report carries it.
    pub severity: &'static str,
    /// The tenant of the agent it is about.
    pub tenant: String,
    /// The agent it is about.
    pub agent: String,
    /// The session of the decision that completed the pattern.
    pub session: String,
    /// The run id of the decision that completed the pattern.
    pub run_id: String,
    /// One sentence for the operator: what happened, with the counts.
    pub summary: String,
    /// The decisions behind it (ids), oldest first.
    pub evidence: Vec<String>,
    /// The same decisions, whole.
    pub decisions: Vec<Arc<Decision>>,
    /// The decision that completed the pattern, and its time.
    pub trigger: String,
    /// The time of that decision, Unix nanoseconds.
    pub time_ns: i64,
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// A decision (its id) with a time outside 2001..2286 (the time, Unix nanoseconds).
    #[error("decision {0} has no valid time ({1}): refused, not treated as epoch 0")]
    BadTime(String, i64),
    /// A decision (its id) without a tenant or an agent.
    #[error("decision {0} names no tenant or agent")]
    NoAgent(String),
}

/// A count of events in a sliding window that fires once per episode.
#[derive(Debug, Default)]
struct Episode {
    times: VecDeque<(i64, Arc<Decision>)>,
    /// Set while an episode is on: the last time the count was at or over the threshold.
    on_since_last: Option<i64>,
}

impl Episode {
    /// Adds an event at `t`; returns the evidence when this event starts an episode.
    fn add(
        &mut self,
        t: i64,
        d: &Arc<Decision>,
        threshold: usize,
        window: i64,
    ) -> Option<Vec<Arc<Decision>>> {
        let at = self.times.partition_point(|(x, _)| *x <= t);
        self.times.insert(at, (t, d.clone()));
        // Only the newest `threshold` events can make the count: older ones are dropped, so
        // the state per agent stays small however busy the agent is.
        while self.times.len() > threshold.max(1) {
            self.times.pop_front();
        }
        let newest = self.times.back().map_or(t, |(x, _)| *x);
        // The window that ends at the newest event.
        while self
            .times
            .front()
            .is_some_and(|(x, _)| *x <= newest - window)
        {
            self.times.pop_front();
        }
        // Re-arm only after a whole window below the threshold.
        if let Some(last) = self.on_since_last
            && newest - last >= window
            && self.times.len() < threshold
        {
            self.on_since_last = None;
        }
        if self.times.len() >= threshold {
            let was_on = self.on_since_last.is_some();
            self.on_since_last = Some(newest);
            if !was_on {
                return Some(self.times.iter().map(|(_, d)| d.clone()).collect());
            }
        }
        None
    }
}

#[derive(Debug, Default)]
struct AgentState {
    denies: Episode,
    approvals: Episode,
    calls: Episode,
    /// Source and sink events in the exfiltration window: (time, decision, allowed,
    /// tool.action), sorted by time; a source is consumed by the incident it starts.
    sources: VecDeque<(i64, Arc<Decision>, String)>,
    sinks: VecDeque<(i64, Arc<Decision>, bool, String)>,
    /// Recent denies by tool.action: (time, decision).
    denied: HashMap<String, Vec<(i64, Arc<Decision>)>>,
    /// Last time a quiet-limited finding fired, by key.
    quiet: HashMap<String, i64>,
}

/// The engine: state per (tenant, agent).
#[derive(Debug)]
pub struct Engine {
    thresholds: Thresholds,
    words: Split,
    /// tenant → agent → state.
    agents: HashMap<String, HashMap<String, AgentState>>,
    /// `tool.action` → (source, sink, mutating): names repeat, splitting them need not.
    classes: HashMap<String, (bool, bool, bool)>,
}

/// Splits a tool or action name into lower-case words: at any non-alphanumeric character
/// and at camelCase boundaries.
pub fn words(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for ch in name.chars() {
        if !ch.is_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if ch.is_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = ch.is_lowercase() || ch.is_ascii_digit();
        cur.extend(ch.to_lowercase());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Whether the tool's or the action's words match an entry of `list`. An entry of several
/// words (`write_external`) matches those words in sequence.
fn matches(list: &[Vec<String>], names: &[Vec<String>; 2]) -> bool {
    list.iter().any(|want| {
        names
            .iter()
            .any(|w| w.windows(want.len()).any(|win| win == want.as_slice()))
    })
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Most `tool.action` classifications cached before the cache starts over.
const MAX_CLASSES: usize = 4096;

/// Most source, sink and recent-deny events kept per agent (the newest).
const MAX_KEPT: usize = 32;

/// Earliest and latest decision times accepted (2001 to 2286 in nanoseconds): anything
/// outside is a broken clock or a broken event.
const MIN_TIME_NS: i64 = 1_000_000_000 * 1_000_000_000;

// === impl Engine ===

impl Engine {
    /// An engine with these thresholds and word lists and no state yet.
    pub fn new(thresholds: Thresholds, words: Words) -> Self {
        Self {
            thresholds,
            words: Split::of(&words),
            agents: HashMap::new(),
            classes: HashMap::new(),
        }
    }

    /// The word lists in use.
    pub fn set_words(&mut self, words: Words) {
        self.words = Split::of(&words);
        self.classes.clear();
    }

    /// Feeds one decision; returns what it completes. The decision is kept as it is (in
    /// the windows that hold it), not copied.
    pub fn observe(&mut self, d: Decision) -> Result<Vec<Finding>, EventError> {
        if d.time_ns < MIN_TIME_NS {
            return Err(EventError::BadTime(d.decision_id.clone(), d.time_ns));
        }
        if d.tenant.is_empty() || d.agent.is_empty() {
            return Err(EventError::NoAgent(d.decision_id.clone()));
        }
        let th = &self.thresholds;
        let call = format!("{}.{}", d.tool, d.action);
        let (is_source, is_sink, is_mutating) = match self.classes.get(&call) {
            Some(c) => *c,
            None => {
                let names = [words(&d.tool), words(&d.action)];
                let c = (
                    matches(&self.words.source, &names),
                    matches(&self.words.sink, &names),
                    matches(&self.words.mutating, &names),
                );
                // Bounded: tool names come from agents.
                if self.classes.len() >= MAX_CLASSES {
                    self.classes.clear();
                }
                self.classes.insert(call.clone(), c);
                c
            }
        };
        let per_tenant = match self.agents.get_mut(&d.tenant) {
            Some(m) => m,
            None => self.agents.entry(d.tenant.clone()).or_default(),
        };
        let st = match per_tenant.get_mut(&d.agent) {
            Some(s) => s,
            None => per_tenant.entry(d.agent.clone()).or_default(),
        };
        let t = d.time_ns;
        let event = Arc::new(d);
        let d = &*event;
        let allowed = matches!(d.decision.as_str(), "allow" | "sanitize" | "would_deny");
        let mut found = Vec::new();
        let mut finding = |kind: &'static str,
                           severity: Severity,
                           summary: String,
                           decisions: Vec<Arc<Decision>>| {
            found.push(Finding {
                evidence: decisions.iter().map(|e| e.decision_id.clone()).collect(),
                decisions,
                kind,
                severity: severity.as_str(),
                tenant: d.tenant.clone(),
                agent: d.agent.clone(),
                session: d.session.clone(),
                run_id: d.run_id.clone(),
                summary,
                trigger: d.decision_id.clone(),
                time_ns: t,
            });
        };

        let policy_deny = d.decision == "deny" && !CONTAINMENT_REASONS.contains(&d.reason.as_str());
        // deny_storm
        if policy_deny {
            let (n, w) = th.deny_storm;
            if let Some(ev) = st.denies.add(t, &event, n, secs(w)) {
                finding(
                    "deny_storm",
                    Severity::High,
                    format!(
                        "{} reached {} denies within {} s (last: {call}, {})",
                        d.agent,
                        ev.len(),
                        w.as_secs(),
                        d.reason
                    ),
                    ev,
                );
            }
        }
        // approval_flood
        if d.decision == "approval_needed" && d.reason != RESTRICTED_REASON {
            let (n, w) = th.approval_flood;
            if let Some(ev) = st.approvals.add(t, &event, n, secs(w)) {
                finding(
                    "approval_flood",
                    Severity::Medium,
                    format!(
                        "{} raised {} approval requests within {} s",
                        d.agent,
                        ev.len(),
                        w.as_secs()
                    ),
                    ev,
                );
            }
        }
        // runaway
        {
            let (n, w) = th.runaway;
            if let Some(ev) = st.calls.add(t, &event, n, secs(w)) {
                finding(
                    "runaway",
                    Severity::High,
                    format!(
                        "{} made {} calls within {} s",
                        d.agent,
                        ev.len(),
                        w.as_secs()
                    ),
                    ev,
                );
            }
        }
        // budget_exhausted
        if d.reason == "budget_exhausted" && quiet_ok(&mut st.quiet, "budget", t, secs(th.quiet)) {
            finding(
                "budget_exhausted",
                Severity::Medium,
                format!("{} exhausted its budget ({call})", d.agent),
                vec![event.clone()],
            );
        }
        // trust_escalation: a deny, then an allow of the same tool and action.
        let tw = secs(th.trust_escalation_window);
        if policy_deny {
            let list = st.denied.entry(call.clone()).or_default();
            list.retain(|(x, _)| (t - *x).abs() < tw);
            if list.len() >= MAX_KEPT {
                list.remove(0);
            }
            list.push((t, event.clone()));
        } else if allowed && let Some(list) = st.denied.get_mut(&call) {
            list.retain(|(x, _)| t - *x < tw);
            let quiet = secs(th.quiet);
            if let Some(pos) = list.iter().position(|(x, _)| *x < t)
                && quiet_ok(&mut st.quiet, &format!("escalation:{call}"), t, quiet)
            {
                let (_, denied) = list.remove(pos);
                finding(
                    "trust_escalation",
                    Severity::High,
                    format!(
                        "{call} was denied, then allowed for {} within {} s",
                        d.agent,
                        tw / 1_000_000_000
                    ),
                    vec![denied, event.clone()],
                );
            }
        }
        // untrusted_mutation
        if d.trust_level == "untrusted_external"
            && is_mutating
            && quiet_ok(
                &mut st.quiet,
                &format!("mutation:{call}"),
                t,
                secs(th.quiet),
            )
        {
            finding(
                "untrusted_mutation",
                if allowed {
                    Severity::Critical
                } else {
                    Severity::High
                },
                format!(
                    "{} attempted {call} triggered by untrusted external content ({})",
                    d.agent, d.decision
                ),
                vec![event.clone()],
            );
        }
        // data_exfil_pattern: a source, then a sink, within the window, in decision time.
        // Sorted by time, what fell out of the window is at the front; at most MAX_KEPT of
        // each are kept (the newest): a busy reader has thousands of sources a minute.
        let xw = secs(th.exfil_window);
        while st.sources.front().is_some_and(|(x, _, _)| t - *x >= xw) {
            st.sources.pop_front();
        }
        while st.sinks.front().is_some_and(|(x, _, _, _)| t - *x >= xw) {
            st.sinks.pop_front();
        }
        if is_sink {
            // The newest source before the sink, inside the window.
            let before = st
                .sources
                .iter()
                .rposition(|(x, _, _)| *x < t && t - *x < xw);
            let quiet = secs(th.quiet);
            if let Some(pos) = before
                && quiet_ok(&mut st.quiet, &format!("exfil:{call}"), t, quiet)
            {
                let Some((_, source, src_call)) = st.sources.remove(pos) else {
                    return Ok(found);
                };
                finding(
                    "data_exfil_pattern",
                    if allowed {
                        Severity::Critical
                    } else {
                        Severity::High
                    },
                    format!(
                        "{} read with {src_call}, then sent with {call} ({}) within {} s",
                        d.agent,
                        d.decision,
                        xw / 1_000_000_000
                    ),
                    vec![source, event.clone()],
                );
            } else {
                let at = st.sinks.partition_point(|(x, _, _, _)| *x <= t);
                st.sinks
                    .insert(at, (t, event.clone(), allowed, call.clone()));
                if st.sinks.len() > MAX_KEPT {
                    st.sinks.pop_front();
                }
            }
        }
        if is_source && !is_sink {
            // A sink already seen with a later time (events out of order) completes it now.
            let after = st
                .sinks
                .iter()
                .position(|(x, _, _, _)| *x > t && *x - t < xw);
            let quiet = secs(th.quiet);
            let sink_call = after.and_then(|p| st.sinks.get(p)).map(|s| s.3.clone());
            if let (Some(pos), Some(key)) = (after, sink_call)
                && quiet_ok(&mut st.quiet, &format!("exfil:{key}"), t, quiet)
            {
                let Some((_, sink, sink_allowed, sink_call)) = st.sinks.remove(pos) else {
                    return Ok(found);
                };
                finding(
                    "data_exfil_pattern",
                    if sink_allowed {
                        Severity::Critical
                    } else {
                        Severity::High
                    },
                    format!(
                        "{} read with {call}, then sent with {sink_call} within {} s",
                        d.agent,
                        xw / 1_000_000_000
                    ),
                    vec![event.clone(), sink],
                );
            } else {
                let at = st.sources.partition_point(|(x, _, _)| *x <= t);
                st.sources.insert(at, (t, event.clone(), call.clone()));
                if st.sources.len() > MAX_KEPT {
                    st.sources.pop_front();
                }
            }
        }
        Ok(found)
    }
}

/// Whether a quiet-limited finding under `key` may fire at `t` (and note that it does).
fn quiet_ok(last: &mut HashMap<String, i64>, key: &str, t: i64, quiet: i64) -> bool {
    match last.get(key) {
        Some(prev) if (t - *prev).abs() < quiet => false,
        _ => {
            last.insert(key.to_owned(), t);
            true
        }
    }
}

/// The data plane's correlation task: decisions in over a bounded queue (a full queue drops
/// the event and counts it, never delays a Check), findings out to the control plane.
#[derive(Debug)]
pub struct Correlator {
    tx: tokio::sync::mpsc::Sender<Decision>,
    /// Events dropped on a full queue.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Events refused by the engine ([`EventError`]).
    pub refused: std::sync::atomic::AtomicU64,
    /// Findings reported to the control plane as incidents.
    pub reported: std::sync::atomic::AtomicU64,
}

/// Events waiting for the correlation task before new ones are dropped.
pub const QUEUE: usize = 8192;
/// Most events taken from the queue per wake-up.
const BATCH: usize = 256;

impl Correlator {
    /// Starts the task; it ends when `shutdown` turns true.
    pub fn start(
        policy: std::sync::Arc<crate::policy::Policy>,
        link: std::sync::Arc<dyn crate::seam::ControlPlane>,
        thresholds: Thresholds,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> (std::sync::Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let me = std::sync::Arc::new(Self {
            tx,
            dropped: Default::default(),
            refused: Default::default(),
            reported: Default::default(),
        });
        let task = tokio::spawn(run(me.clone(), rx, policy, link, thresholds, shutdown));
        (me, task)
    }

    /// Hands a decision to the engine without waiting.
    pub fn offer(&self, d: Decision) {
        if self.tx.try_send(d).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

async fn run(
    me: std::sync::Arc<Correlator>,
    mut rx: tokio::sync::mpsc::Receiver<Decision>,
    policy: std::sync::Arc<crate::policy::Policy>,
    link: std::sync::Arc<dyn crate::seam::ControlPlane>,
    thresholds: Thresholds,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut engine = Engine::new(thresholds, Words::default());
    let mut digest = String::new();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // Whatever is queued, up to BATCH, per wake-up: under load one wake-up serves many
        // decisions.
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let bundle = policy.current();
        if bundle.digest() != digest {
            digest = bundle.digest().to_owned();
            engine.set_words(words_from(&bundle));
        }
        for d in batch.drain(..) {
            let findings = match engine.observe(d) {
                Ok(f) => f,
                Err(e) => {
                    me.refused.fetch_add(1, Relaxed);
                    crate::log!(warn, "correlation: {e}");
                    continue;
                }
            };
            report(&me, link.as_ref(), &bundle, findings).await;
        }
    }
}

/// Hands findings to the control plane.
async fn report(
    me: &Correlator,
    link: &dyn crate::seam::ControlPlane,
    bundle: &crate::policy::CompiledBundle,
    findings: Vec<Finding>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    {
        for f in findings {
            let req = crate::control::pb::ReportIncidentRequest {
                tenant: f.tenant,
                agent: f.agent,
                session: f.session,
                run_id: f.run_id,
                kind: f.kind.to_owned(),
                severity: f.severity.to_owned(),
                summary: f.summary,
                evidence: f.evidence,
                trigger_decision: f.trigger,
                decided_at_ns: f.time_ns,
                policy_revision: bundle.revision().to_owned(),
                decisions: f.decisions.iter().map(|d| evidence_of(d)).collect(),
            };
            match link.report_incident(req).await {
                Ok(_) => {
                    me.reported.fetch_add(1, Relaxed);
                }
                Err(e) => crate::log!(error, "correlation: incident {} not reported: {e}", f.kind),
            }
        }
    }
}

/// A decision as an incident's evidence.
fn evidence_of(d: &Decision) -> crate::control::pb::EvidenceDecision {
    crate::control::pb::EvidenceDecision {
        decision_id: d.decision_id.clone(),
        time_ns: d.time_ns,
        tool: d.tool.clone(),
        action: d.action.clone(),
        decision: d.decision.clone(),
        reason: d.reason.clone(),
        trust_level: d.trust_level.clone(),
        session: d.session.clone(),
        run_id: d.run_id.clone(),
        row_hash: crate::hex(&d.row_hash),
        audit_seq: d.audit_seq,
    }
}

/// Whether a call is state-mutating by the word lists (what autonomy L2 holds for approval).
pub fn is_mutating(words: &Words, tool: &str, action: &str) -> bool {
    let list: Vec<Vec<String>> = words
        .mutating
        .iter()
        .map(|e| self::words(e))
        .filter(|w| !w.is_empty())
        .collect();
    matches(&list, &[self::words(tool), self::words(action)])
}

/// The word lists of a bundle (`data.aegis.correlation`), else the defaults.
pub fn words_from(bundle: &crate::policy::CompiledBundle) -> Words {
    let data = bundle.data();
    let list = |key: &str, default: &[&str]| -> Vec<String> {
        let v = &data["aegis"]["correlation"][key];
        match v.as_array() {
            Ok(items) => items
                .iter()
                .filter_map(|i| i.as_string().ok().map(|s| s.to_string()))
                .collect(),
            Err(_) => default.iter().map(|s| (*s).to_owned()).collect(),
        }
    };
    Words {
        source: list("source_words", SOURCE_WORDS),
        sink: list("sink_words", SINK_WORDS),
        mutating: list("mutating_words", MUTATING_WORDS),
    }
}
