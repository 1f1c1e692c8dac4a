//! The hot path: one Check.
//!
//! ```text
//! decode → identify → build → evaluate → enforce → record → respond
//! ```
//! [`Checker::check`] calls each step in that order; each has a typed input and output.
//! Only `record` does I/O (the audit commit, shared with concurrent Checks by group
//! commit), besides `enforce` reaching the control plane for `approval_needed` decisions
//! (see [`enforce`]). No lock is held across an await.
//!
//! - decode, identify, build, evaluate (`judge.rs`): the request's headers and body (the
//!   token is verified while the headers are at hand); who calls and the agent's control
//!   state (a contained agent goes no further than enforce's first step: the policy is not
//!   asked); the OPA-Envoy input document (`input.rs`); the policy's decision, on the
//!   policy's evaluation threads.
//! - enforce (`enforce.rs`): containment, restriction, shadow, approvals, budget, in that
//!   order; its [`Enforced`](enforce::Enforced) outcome is all `record` and `respond` take.
//! - record (`record.rs`): one decision record, from which the audit row, the span, the
//!   correlation event and the metrics are made.
//! - respond (`respond.rs`): the CheckResponse, or the gRPC error.
//!
//! Outcomes:
//! - a decision the agent sees: the policy's, or Aegis's own deny for a refused token
//!   (401) or a request it cannot parse (400/413/431). Recorded, then answered.
//! - a failure of Aegis itself (policy evaluation error or timeout, audit write failure):
//!   recorded as `error` when the log can still be written, and answered with a gRPC
//!   error, never a non-OK CheckResponse, so Envoy's `failure_mode_allow` /
//!   `status_on_error` decide. Nothing is answered before its audit row is durable.
//!   Every one is a [`CheckError`], mapped to its gRPC status (or denial) in one place.

mod enforce;
pub mod error;
pub mod input;
mod judge;
pub mod protojson;
mod record;
pub mod respond;

pub use error::CheckError;
pub use record::Counters;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use tonic::{Code, Request, Response, Status};

use crate::audit::store::AuditLog;
use crate::dataplane::budget::Meter;
use crate::dataplane::state::State;
use crate::identity::{Claims, Identifier};
use crate::policy::{Decision, Policy};
use crate::seam::ControlPlane;
use crate::telemetry::Telemetry;
use input::{Decoded, Limits};
use record::DecisionRecord;

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
    pub link: Arc<dyn ControlPlane>,
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

/// One admitted Check; leaving (answered, failed or cancelled) frees its place.
struct Admitted<'a>(&'a Admission);

/// How a Check ended: what `enforce` works on and hands to `record` and `respond`.
#[derive(Debug)]
enum Outcome {
    /// A decision the agent sees: gRPC code of the response and default HTTP status.
    Decided {
        decision: Decision,
        code: Code,
        default_status: u32,
    },
    /// Aegis could not decide: the reason recorded and the gRPC error answered (made by
    /// [`CheckError::into_outcome`]).
    Failed {
        reason: &'static str,
        status: Status,
    },
}

/// Who called which tool, as far as the Check got: filled by the stages, read by
/// `record` and `respond`.
#[derive(Debug, Default)]
struct Call {
    claims: Option<Arc<Claims>>,
    tool: String,
    action: String,
    resource: String,
    run_id: String,
    trust_level: String,
    policy_revision: String,
    /// The approval raised or redeemed.
    approval_id: String,
    /// Headers to remove from the request that goes on (besides the token): the override
    /// token and the agent's claim headers it sent.
    strip_headers: Vec<&'static str>,
    /// The Check's row, announced to the audit writer until just before it is queued;
    /// withdrawn while the Check waits on the control plane, whose own rows (an approval
    /// raised or redeemed) must not wait for it.
    coming: Option<crate::audit::store::Coming>,
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
            return Err(CheckError::Overloaded(self.0.admission.max).status());
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

    /// The pipeline: decode → identify → build → evaluate (in [`Self::judge`]) → enforce →
    /// record → respond.
    async fn check_timed(
        &self,
        req: CheckRequest,
        trace: TraceHeaders,
    ) -> Result<CheckResponse, Status> {
        let now_ns = crate::unix_nanos();
        let decision_id = self.ids.next();
        let span = self.start_span(&req, &trace);
        // Every Check that gets this far records a row: announced now, so the audit writer
        // can give it a place in the batch it is gathering.
        let mut call = Call {
            coming: Some(self.audit.expect_row()),
            ..Call::default()
        };
        let judged = self.judge(&req, &mut call, now_ns).await;
        let now = now_ns / 1_000_000_000;
        let enforced = enforce::enforce(self, judged, &mut call, &decision_id, now).await;
        // The row is queued next: the announcement ends first, so the writer never sleeps
        // for a row it has already taken.
        call.coming = None;
        let decision = DecisionRecord {
            time_ns: now_ns,
            decision_id: &decision_id,
            enforced: &enforced,
            call: &call,
        };
        record::record(self, &decision, span).await?;
        respond::respond(
            enforced,
            &call.meta(&decision_id),
            self.token_source.header(),
        )
    }

    /// The Check's span: a child of Envoy's span from the gRPC metadata, else of the
    /// request's own `traceparent`.
    fn start_span(&self, req: &CheckRequest, trace: &TraceHeaders) -> crate::telemetry::CheckSpan {
        let http = http_of(req);
        let header = |k: &str| http.and_then(|h| h.headers.get(k)).map(String::as_str);
        self.telemetry.start_check(&[
            (trace.traceparent.as_deref(), trace.tracestate.as_deref()),
            (header("traceparent"), header("tracestate")),
        ])
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

    /// What the response says of the decision besides the decision itself.
    fn meta<'a>(&'a self, decision_id: &'a str) -> respond::Meta<'a> {
        respond::Meta {
            decision_id,
            policy_version: &self.policy_revision,
            approval_id: &self.approval_id,
            strip_headers: &self.strip_headers,
        }
    }
}

/// The HTTP request of a CheckRequest, if it has one.
fn http_of(req: &CheckRequest) -> Option<&HttpRequest> {
    req.attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
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
        Self {
            prefix: u64::from_be_bytes(crate::ids::random_bytes()),
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
