//! The hot path: one Check.
//!
//! ```text
//! decode → identify → build input → evaluate → enforce → record → respond
//! ```
//! Each step is its own function (and file); only `record` does I/O (the audit commit,
//! shared with concurrent Checks by group commit), besides `enforce` reaching the control
//! plane for `approval_needed` decisions (see [`enforce`]). No lock is held across an
//! await.
//!
//! Outcomes:
//! - a decision the agent sees: the policy's, or Aegis's own deny for a refused token
//!   (401) or a request it cannot parse (400/413/431). Recorded, then answered.
//! - a failure of Aegis itself (policy evaluation error or timeout, audit write failure):
//!   recorded as `error` when the log can still be written, and answered with a gRPC
//!   error, never a non-OK CheckResponse, so Envoy's `failure_mode_allow` /
//!   `status_on_error` decide. Nothing is answered before its audit row is durable.

mod enforce;
pub mod input;
pub mod protojson;
pub mod respond;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use opentelemetry::KeyValue;
use tonic::{Code, Request, Response, Status};

use crate::audit::Record;
use crate::audit::store::{AuditError, AuditLog};
use crate::control::budget::Meter;
use crate::control::link::ControlLink;
use crate::control::state::{AgentContext, State};
use crate::identity::{Claims, Identifier, Refusal, TokenError};
use crate::policy::{Decision, EvalError, Policy, Verdict};
use crate::telemetry::Telemetry;
use input::{Decoded, InputError, Limits};

/// The W3C trace context of the gRPC call carrying a Check (Envoy puts its ext_authz
/// client span there).
#[derive(Debug, Clone, Default)]
pub struct TraceHeaders {
    /// The `traceparent` gRPC metadata, if sent.
    pub traceparent: Option<String>,
    /// The `tracestate` gRPC metadata, if sent.
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The trace headers of a gRPC call's metadata (absent or non-ASCII values are `None`).
    pub fn from_metadata(m: &tonic::metadata::MetadataMap) -> Self {
        let get = |k: &str| m.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Self {
            traceparent: get("traceparent"),
            tracestate: get("tracestate"),
        }
    }
}

/// Where the agent token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A header holding the bare token (default `x-aegis-token`).
    Header(String),
    /// `authorization: Bearer <token>`.
    Bearer,
}

impl TokenSource {
    /// The header that carries the token (removed before the request goes on).
    pub fn header(&self) -> &str {
        match self {
            TokenSource::Header(h) => h,
            TokenSource::Bearer => "authorization",
        }
    }
}

/// Everything one Check needs, shared by all of them.
#[derive(Debug)]
pub struct Checker {
    /// Verifies agent tokens and answers revocation.
    pub identifier: Arc<Identifier>,
    /// The live policy bundle (swapped on reload).
    pub policy: Arc<Policy>,
    /// The audit log every decision is recorded in before it is answered.
    pub audit: AuditLog,
    /// Makes the Check's span.
    pub telemetry: Telemetry,
    /// What a request may carry.
    pub limits: Limits,
    /// Where the agent token is read from.
    pub token_source: TokenSource,
    /// Admission control: Checks past `limits.max_inflight` are shed before any work.
    pub admission: Arc<Admission>,
    /// Checks answered, by decision (for metrics).
    pub counters: Counters,
    /// The control state enforced on every Check, budgets, and the way to the control plane.
    pub control: ControlView,
    ids: DecisionIds,
}

/// What the data plane knows of and needs from the control plane.
#[derive(Debug, Clone)]
pub struct ControlView {
    /// The control state enforced on every Check: statuses, revocations, kills, tenant modes.
    pub state: Arc<State>,
    /// Counts each agent's calls and cost against its budget.
    pub meter: Arc<Meter>,
    /// How approvals are raised and overrides redeemed (in-process or over gRPC).
    pub link: ControlLink,
    /// The correlation engine's queue: every recorded decision is offered to it.
    pub correlation: Option<Arc<crate::correlate::Correlator>>,
}

/// Bounds the Checks in flight. A Check over the bound is refused at once with
/// `RESOURCE_EXHAUSTED`: it gets no decision and leaves no row, and Envoy's
/// `failure_mode_allow`/`status_on_error` decide. Shedding at the door keeps the Checks
/// already admitted inside Envoy's timeout instead of letting every one of them be late.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    inflight: AtomicUsize,
    /// Shed at the door (over `max`).
    shed: AtomicU64,
    /// Admitted, then refused because the audit queue was full.
    queue_full: AtomicU64,
}

/// Checks recorded, by decision: allow, deny, sanitize, approval_needed, would_deny, error.
#[derive(Debug)]
pub struct Counters {
    by_decision: [AtomicU64; 6],
    /// The same answers by (decision, reason), bounded in reasons.
    by_reason: crate::metrics::ReasonCounts,
    /// Time from a Check's arrival to its answer (audit commit included), every Check
    /// admitted, decided or failed.
    pub latency: crate::metrics::Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            by_decision: Default::default(),
            by_reason: crate::metrics::ReasonCounts::default(),
            latency: crate::metrics::Histogram::new(crate::metrics::LATENCY_BOUNDS),
        }
    }
}

const DECISIONS: [&str; 6] = [
    "allow",
    "deny",
    "sanitize",
    "approval_needed",
    "would_deny",
    "error",
];

impl Counters {
    fn count(&self, decision: &str, reason: &str) {
        if let Some(i) = DECISIONS.iter().position(|d| *d == decision)
            && let Some(c) = self.by_decision.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
            self.by_reason.count(i, DECISIONS.len(), reason);
        }
    }

    /// (decision, reason, Checks) for every pair seen since start.
    pub fn reasons(&self) -> Vec<(&'static str, String, u64)> {
        self.by_reason
            .snapshot()
            .into_iter()
            .filter_map(|(i, reason, n)| DECISIONS.get(i).map(|d| (*d, reason, n)))
            .collect()
    }

    /// (decision, Checks recorded with it) since start.
    pub fn decisions(&self) -> Vec<(&'static str, u64)> {
        DECISIONS
            .iter()
            .zip(&self.by_decision)
            .map(|(d, n)| (*d, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// One admitted Check; leaving (answered, failed or cancelled) frees its place.
struct Admitted<'a>(&'a Admission);

/// How a Check ended, before it is recorded.
#[derive(Debug)]
enum Outcome {
    /// A decision the agent sees: gRPC code of the response and default HTTP status.
    Decided {
        decision: Decision,
        code: Code,
        default_status: u32,
    },
    /// Aegis could not decide.
    Failed {
        reason: &'static str,
        status: Status,
    },
}

/// Who called which tool, as far as the Check got.
#[derive(Debug, Default)]
struct Call {
    claims: Option<Arc<Claims>>,
    tool: String,
    action: String,
    resource: String,
    run_id: String,
    trust_level: String,
    policy_revision: String,
    /// The agent's control state, while the policy's decision awaits `enforce`.
    policy_agent: Option<AgentContext>,
    /// The call's cost (budgets).
    cost: f64,
    /// An `approval_needed` call, for `enforce`.
    pending: Option<enforce::PendingCall>,
    /// The approval raised or redeemed.
    approval_id: String,
    /// Headers to remove from the request that goes on (besides the token): the override
    /// token and the agent's claim headers it sent.
    strip_headers: Vec<&'static str>,
}

/// gRPC service wrapper (a newtype: `impl Authorization for Arc<_>` would break the orphan rule).
#[derive(Debug, Clone)]
pub struct AuthorizationService(pub Arc<Checker>);

#[tonic::async_trait]
impl Authorization for AuthorizationService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let Some(_admitted) = self.0.admission.admit() else {
            return Err(overloaded(&self.0.admission));
        };
        // Envoy's own span (its ext_authz client span) travels in the gRPC metadata; the
        // HTTP request's `traceparent` is only the fallback.
        let trace = TraceHeaders::from_metadata(request.metadata());
        self.0
            .check_traced(request.into_inner(), trace)
            .await
            .map(Response::new)
    }
}

// === impl Admission ===

impl Admission {
    /// Admits up to `max` Checks at once (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            inflight: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
        }
    }

    fn admit(&self) -> Option<Admitted<'_>> {
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            self.shed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Admitted(self))
    }

    /// The most Checks admitted at once (`limits.max_inflight`).
    pub fn limit(&self) -> usize {
        self.max
    }

    /// Checks in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Checks shed since start: (over `max_inflight`, audit queue full).
    pub fn shed(&self) -> (u64, u64) {
        (
            self.shed.load(Ordering::Relaxed),
            self.queue_full.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn overloaded(a: &Admission) -> Status {
    Status::resource_exhausted(format!(
        "aegis: overloaded: {} Checks in flight (limits.max_inflight); shed without a decision",
        a.max
    ))
}

// === impl Checker ===

impl Checker {
    /// The Checker of a data plane; `max_inflight` bounds its Admission.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identifier: Arc<Identifier>,
        policy: Arc<Policy>,
        audit: AuditLog,
        telemetry: Telemetry,
        limits: Limits,
        token_source: TokenSource,
        max_inflight: usize,
        control: ControlView,
    ) -> Self {
        Self {
            identifier,
            policy,
            audit,
            telemetry,
            limits,
            token_source,
            admission: Arc::new(Admission::new(max_inflight)),
            counters: Counters::default(),
            control,
            ids: DecisionIds::new(),
        }
    }

    /// Decides one Check, records it durably, and builds the response; its latency is
    /// counted (a Check cancelled by its caller is not).
    pub async fn check(&self, req: CheckRequest) -> Result<CheckResponse, Status> {
        self.check_traced(req, TraceHeaders::default()).await
    }

    /// [`Self::check`] with the trace context of the gRPC call (Envoy's span).
    pub async fn check_traced(
        &self,
        req: CheckRequest,
        trace: TraceHeaders,
    ) -> Result<CheckResponse, Status> {
        let started = std::time::Instant::now();
        let answer = self.check_timed(req, trace).await;
        self.counters.latency.observe_duration(started.elapsed());
        answer
    }

    async fn check_timed(
        &self,
        req: CheckRequest,
        trace: TraceHeaders,
    ) -> Result<CheckResponse, Status> {
        let now_ns = crate::unix_nanos();
        let decision_id = self.ids.next();
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let header = |k: &str| http.and_then(|h| h.headers.get(k)).map(String::as_str);
        // Envoy's span from the gRPC metadata, else the request's own `traceparent`.
        let span = self.telemetry.start_check(&[
            (trace.traceparent.as_deref(), trace.tracestate.as_deref()),
            (header("traceparent"), header("tracestate")),
        ]);

        let (outcome, mut call) = self.decide(&req, http, now_ns).await;
        let outcome = enforce::apply(
            self,
            outcome,
            &mut call,
            &decision_id,
            now_ns / 1_000_000_000,
        )
        .await;

        let record = self.record(&outcome, &call, &decision_id, now_ns, &span);
        let row = match self.audit.append_row(record).await {
            Ok(row) => row,
            Err(e) => {
                if matches!(e, AuditError::Overloaded(_)) {
                    self.admission.queue_full.fetch_add(1, Ordering::Relaxed);
                }
                let status = audit_failure(&e);
                span.finish(
                    span_attributes(&outcome, &call, &decision_id, None),
                    Some(status.message().to_owned()),
                );
                return Err(status);
            }
        };
        self.counters.count(outcome.decision(), outcome.reason());
        if let (Some(c), Outcome::Decided { decision, .. }, Some(claims)) =
            (&self.control.correlation, &outcome, call.claims.as_deref())
        {
            c.offer(crate::correlate::Decision {
                time_ns: now_ns,
                tenant: claims.tenant.clone(),
                agent: claims.sub.clone(),
                session: claims.sid.clone(),
                run_id: call.run_id.clone(),
                tool: call.tool.clone(),
                action: call.action.clone(),
                decision: decision.verdict.as_str().to_owned(),
                reason: decision.reason.clone(),
                decision_id: decision_id.clone(),
                trust_level: call.trust_level.clone(),
                audit_seq: row.seq,
                row_hash: row.hash,
            });
        }
        let error = match &outcome {
            Outcome::Failed { status, .. } => Some(status.message().to_owned()),
            Outcome::Decided { .. } => None,
        };
        span.finish(
            span_attributes(&outcome, &call, &decision_id, Some(row.seq)),
            error,
        );
        self.respond(outcome, &call, &decision_id)
    }

    /// decode → identify → build input → evaluate. Pure computation, no I/O; the
    /// evaluation runs on the policy's evaluation threads (see [`crate::policy::pool`]).
    async fn decide(
        &self,
        req: &CheckRequest,
        http: Option<&HttpRequest>,
        now_ns: i64,
    ) -> (Outcome, Call) {
        let mut call = Call::default();
        if !self.control.state.synced() {
            // A fleet sidecar that has never had the control plane's state cannot know
            // which tokens are revoked or agents frozen: it fails closed.
            return (
                Outcome::Failed {
                    reason: "control_unsynced",
                    status: Status::unavailable(
                        "aegis: no control-plane state yet (waiting for the first snapshot)",
                    ),
                },
                call,
            );
        }
        let Some(http) = http else {
            return (bad_input(InputError::NoHttp), call);
        };
        let headers = match input::decode_headers(http, &self.limits) {
            Ok(h) => h,
            Err(e) => return (bad_input(e), call),
        };
        let identity = self
            .token(&headers)
            .map_err(Refusal::from)
            .and_then(|t| self.identifier.identify(t, now_ns / 1_000_000_000));
        let bundle = self.policy.current();
        let routes = input::RouteConfig::of(req, bundle.routes());
        let decoded = input::decode_with_headers(http, headers, routes, &self.limits);
        if let Ok(d) = &decoded {
            call.set_tool(d);
        }
        let claims = match identity {
            Ok(c) => c,
            Err(refusal) => {
                // A revoked token of a frozen or revoked agent: the agent's status is the
                // more telling reason (an agent's revocation also kills its tokens).
                let contained = match (&refusal.error, &refusal.verified) {
                    (TokenError::Revoked(_), Some(c)) => {
                        enforce::contained(&self.control.state.agent(c))
                    }
                    _ => None,
                };
                call.claims = refusal.verified;
                return (
                    contained.unwrap_or_else(|| unauthenticated(&refusal.error)),
                    call,
                );
            }
        };
        call.claims = Some(claims.clone());
        let agent = self.control.state.agent(&claims);
        if let Some(outcome) = enforce::contained(&agent) {
            return (outcome, call);
        }
        let decoded = match decoded {
            Ok(d) => d,
            Err(InputError::Route(e)) => {
                // The platform's labels are wrong, not the agent's request: fail the Check
                // so that Envoy's status_on_error answers and the operator sees the cause.
                crate::log!(error, "check failed: {e}");
                return (
                    Outcome::Failed {
                        reason: "route_misconfigured",
                        status: Status::failed_precondition(format!("aegis: {e}")),
                    },
                    call,
                );
            }
            Err(e) => return (bad_input(e), call),
        };
        call.policy_revision = bundle.revision().to_owned();
        let attributes = req
            .attributes
            .as_ref()
            .map_or_else(regorus::Value::new_object, protojson::attributes);
        let doc = input::build(attributes, &decoded, &claims, &agent);
        let result = self.policy.evaluate(bundle.clone(), doc).await;
        self.policy.note_evaluation(result.is_ok());
        let outcome = match result {
            Ok(decision) => {
                let (decision, held) = enforce::restrict(&agent, decision, &bundle, &decoded);
                if decision.verdict == Verdict::ApprovalNeeded {
                    let mut pending = enforce::pending_call(&decoded, &claims, &decision.reason);
                    pending.held = held;
                    call.pending = Some(pending);
                }
                call.cost = decoded.cost;
                call.policy_agent = Some(agent);
                // An override token and the agent's claims about its call never reach the
                // tool, whatever becomes of the call.
                call.strip_headers = std::iter::once(crate::control::approvals::OVERRIDE_HEADER)
                    .chain(input::CLAIM_HEADERS)
                    .filter(|h| decoded.header(h).is_some())
                    .collect();
                Outcome::Decided {
                    decision,
                    code: Code::PermissionDenied,
                    default_status: 403,
                }
            }
            Err(e) => {
                crate::log!(error, "policy evaluation failed: {e}");
                let status = match e {
                    EvalError::Timeout(_) => Status::deadline_exceeded(format!("aegis: {e}")),
                    EvalError::Bounded(_) | EvalError::Overloaded(_) => {
                        Status::resource_exhausted(format!("aegis: {e}"))
                    }
                    _ => Status::internal(format!("aegis: {e}")),
                };
                Outcome::Failed {
                    reason: "policy_error",
                    status,
                }
            }
        };
        (outcome, call)
    }

    /// The agent token from the configured header.
    fn token<'h>(
        &self,
        headers: &'h std::collections::HashMap<String, String>,
    ) -> Result<&'h str, TokenError> {
        let value = headers
            .get(self.token_source.header())
            .map(|v| v.trim())
            .filter(|v| !v.is_empty());
        let value = value.ok_or(TokenError::Missing)?;
        match self.token_source {
            TokenSource::Header(_) => Ok(value),
            TokenSource::Bearer => match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
                _ => Err(TokenError::Malformed(
                    "authorization header is not a Bearer token".into(),
                )),
            },
        }
    }

    /// The audit row of this Check.
    fn record(
        &self,
        outcome: &Outcome,
        call: &Call,
        decision_id: &str,
        now_ns: i64,
        span: &crate::telemetry::CheckSpan,
    ) -> Record {
        let (reason, http_status) = match outcome {
            Outcome::Decided {
                decision,
                default_status,
                ..
            } => {
                let status = if decision.verdict.allows() {
                    200
                } else {
                    decision.http_status.unwrap_or(*default_status)
                };
                (decision.reason.clone(), i64::from(status))
            }
            Outcome::Failed { reason, status } => (format!("{reason}: {}", status.message()), 0),
        };
        let claims = call.claims.as_deref();
        Record {
            time_ns: now_ns,
            kind: "check".into(),
            decision_id: decision_id.to_owned(),
            tenant: claims.map(|c| c.tenant.clone()).unwrap_or_default(),
            agent: claims.map(|c| c.sub.clone()).unwrap_or_default(),
            session: claims.map(|c| c.sid.clone()).unwrap_or_default(),
            run_id: call.run_id.clone(),
            tool: call.tool.clone(),
            action: call.action.clone(),
            resource: call.resource.clone(),
            decision: outcome.decision().to_owned(),
            reason,
            http_status,
            policy_revision: call.policy_revision.clone(),
            trust_level: call.trust_level.clone(),
            approval_id: call.approval_id.clone(),
            actor: String::new(),
            trace_id: span.trace_id(),
            span_id: span.span_id(),
        }
    }

    fn respond(
        &self,
        outcome: Outcome,
        call: &Call,
        decision_id: &str,
    ) -> Result<CheckResponse, Status> {
        let meta = respond::Meta {
            decision_id,
            policy_version: &call.policy_revision,
            approval_id: &call.approval_id,
            strip_headers: &call.strip_headers,
        };
        match outcome {
            Outcome::Decided { decision, .. } if decision.verdict.allows() => Ok(respond::allowed(
                &decision,
                &meta,
                self.token_source.header(),
            )),
            Outcome::Decided {
                decision,
                code,
                default_status,
            } => Ok(respond::denied(&decision, &meta, code, default_status)),
            Outcome::Failed { status, .. } => Err(status),
        }
    }
}

// === impl Outcome ===

impl Outcome {
    /// The decision as recorded, traced and counted: the verdict, or `error`.
    fn decision(&self) -> &'static str {
        match self {
            Outcome::Decided { decision, .. } => decision.verdict.as_str(),
            Outcome::Failed { .. } => "error",
        }
    }

    /// The reason as recorded: the decision's, or what failed.
    fn reason(&self) -> &str {
        match self {
            Outcome::Decided { decision, .. } => &decision.reason,
            Outcome::Failed { reason, .. } => reason,
        }
    }
}

// === impl Call ===

impl Call {
    /// What the row, the span and the correlation event say of the call, each field
    /// bounded as the audit row bounds it: a hostile path or MCP tool name is not copied
    /// whole into every span and correlation event.
    fn set_tool(&mut self, d: &Decoded<'_>) {
        let bounded = |v: &str| {
            let mut v = v.to_owned();
            crate::audit::bound_field(&mut v);
            v
        };
        self.tool = bounded(&d.tool.name);
        self.action = bounded(&d.tool.action);
        self.resource = bounded(&d.tool.resource);
        self.run_id = bounded(&d.context.run_id);
        self.trust_level = bounded(&d.context.trust_level);
    }
}

fn bad_input(e: InputError) -> Outcome {
    let (status, reason) = e.status_and_reason();
    let mut decision = Decision::simple(Verdict::Deny, reason);
    decision.http_status = Some(status);
    Outcome::Decided {
        decision,
        code: Code::InvalidArgument,
        default_status: status,
    }
}

fn unauthenticated(e: &TokenError) -> Outcome {
    let mut decision = Decision::simple(Verdict::Deny, e.reason());
    decision.http_status = Some(401);
    decision.headers.push((
        "www-authenticate".into(),
        format!("Bearer error=\"invalid_token\", error_description=\"{e}\""),
    ));
    Outcome::Decided {
        decision,
        code: Code::Unauthenticated,
        default_status: 401,
    }
}

/// An audit failure, as the gRPC error Envoy sees.
/// Overload is counted and summarised by the server's health loop rather than logged per
/// Check: a line per shed Check would add to the overload it reports.
fn audit_failure(e: &AuditError) -> Status {
    match e {
        AuditError::Overloaded(_) => Status::resource_exhausted(format!("aegis: {e}")),
        _ => {
            crate::log!(error, "check failed closed: {e}");
            Status::unavailable(format!("aegis: {e}"))
        }
    }
}

fn span_attributes(
    outcome: &Outcome,
    call: &Call,
    decision_id: &str,
    seq: Option<u64>,
) -> Vec<KeyValue> {
    let decision = outcome.decision();
    let mut reason = match outcome {
        Outcome::Decided { decision, .. } => decision.reason.clone(),
        Outcome::Failed { reason, .. } => (*reason).to_owned(),
    };
    crate::audit::bound_field(&mut reason);
    let claims = call.claims.as_deref();
    let mut attrs = vec![
        KeyValue::new("aegis.decision", decision),
        KeyValue::new("aegis.reason", reason),
        KeyValue::new("aegis.policy_version", call.policy_revision.clone()),
        KeyValue::new(
            "aegis.agent",
            claims.map(|c| c.sub.clone()).unwrap_or_default(),
        ),
        KeyValue::new(
            "aegis.tenant",
            claims.map(|c| c.tenant.clone()).unwrap_or_default(),
        ),
        KeyValue::new("aegis.tool", call.tool.clone()),
        KeyValue::new("aegis.action", call.action.clone()),
        KeyValue::new("aegis.decision_id", decision_id.to_owned()),
    ];
    if !call.approval_id.is_empty() {
        attrs.push(KeyValue::new("aegis.approval_id", call.approval_id.clone()));
    }
    if decision == "would_deny" {
        attrs.push(KeyValue::new("aegis.shadow", true));
    }
    if let Some(seq) = seq {
        attrs.push(KeyValue::new(
            "aegis.audit_seq",
            i64::try_from(seq).unwrap_or(i64::MAX),
        ));
    }
    attrs
}

/// Decision ids: a random 64-bit prefix per process and a counter; unique, cheap, and
/// not guessable across restarts.
#[derive(Debug)]
struct DecisionIds {
    prefix: u64,
    next: AtomicU64,
}

impl DecisionIds {
    fn new() -> Self {
        let mut b = [0u8; 8];
        // Without OS randomness, fall back to the clock: ids stay unique per process.
        let prefix = match getrandom::fill(&mut b) {
            Ok(()) => u64::from_be_bytes(b),
            Err(_) => crate::unix_nanos() as u64,
        };
        Self {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:016x}{:016x}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}
