//! The admin listener: Prometheus metrics and plain HTTP health probes, for platforms
//! that scrape and probe over HTTP rather than gRPC.
//!
//! - `GET /metrics`: Prometheus text format (0.0.4): Checks by decision and by decision
//!   and reason, Check latency, Checks in flight and the admission limit, Checks shed by
//!   cause, audit commit latency, batch size and failures, the audit queue's depth and
//!   capacity, the policy revision and reload failures, revocations applied, the
//!   control-plane connection, incidents by kind, the span queue's capacity, readiness.
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 while Aegis can decide and record, else 503 with the reason (the
//!   same verdict as the gRPC health service).
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, its head read up
//! to 8 KiB within 5 s, GET only, `Connection: close`. It binds loopback by default.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::audit::store::AuditLog;
use crate::check::Checker;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin endpoints report on.
pub struct AdminState {
    /// The data plane (absent on a control-plane-only server).
    pub checker: Option<Arc<Checker>>,
    /// The data plane's view of the control state (absent on a control plane alone).
    pub control_state: Option<Arc<crate::dataplane::state::State>>,
    /// The fleet sidecar's follower status (absent unless the server follows a control plane).
    pub follow: Option<Arc<crate::dataplane::follow::FollowStatus>>,
    /// The control plane (absent on a fleet sidecar).
    pub control_core: Option<Arc<crate::control::core::ControlCore>>,
    /// The audit log, for its health and counters.
    pub audit: AuditLog,
    /// The live policy (absent on a control-plane-only server).
    pub policy: Option<Arc<crate::policy::Policy>>,
    /// `otlp.queue_size`, reported as the span queue's capacity.
    pub span_queue_capacity: usize,
    /// What the span queue counted; `None` when spans are not exported.
    pub spans: Option<Arc<crate::telemetry::SpanStats>>,
    /// The readiness verdict: `Err` names what is unusable.
    pub ready: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// Serves the admin endpoints on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stopped = std::pin::pin!(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &state).await {
                            crate::log!(debug, "admin request: {e}");
                        }
                    });
                }
                Err(e) => {
                    crate::log!(warn, "admin listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut stopped => return,
        }
    }
}

async fn answer(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return Err(e),
        Err(_) => return respond(&mut stream, 408, "text/plain", "request head timeout\n").await,
    };
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let body = metrics(state);
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/readyz" => match (state.ready)() {
            // A refused rollback keeps the sidecar serving (it decides from the newest
            // state it knew) but is said here, where a probe or an operator looks.
            Ok(()) => match state.control_state.as_ref().and_then(|s| s.rollback()) {
                Some(rollback) => {
                    let body = format!("ready; warning: {rollback}\n");
                    respond(&mut stream, 200, "text/plain", &body).await
                }
                None => respond(&mut stream, 200, "text/plain", "ready\n").await,
            },
            Err(why) => {
                respond(
                    &mut stream,
                    503,
                    "text/plain",
                    &format!("not ready: {why}\n"),
                )
                .await
            }
        },
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

/// Reads until the end of the request head (a blank line), at most [`MAX_HEAD`] bytes;
/// returns the request line.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head over 8 KiB"));
        }
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").to_owned())
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// One metric: HELP, TYPE, and a sample per (label value, count) under `label`; an
/// empty `label` is one unlabelled sample.
fn metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: &[(&str, u64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (value, n) in samples {
        if label.is_empty() {
            let _ = writeln!(out, "{name} {n}");
        } else {
            let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
        }
    }
}

/// The Prometheus text exposition.
fn metrics(state: &AdminState) -> String {
    let mut out = String::with_capacity(2048);
    if let Some(c) = &state.checker {
        metric(
            &mut out,
            "aegis_checks_total",
            "counter",
            "Checks answered with a decision (error: Aegis failed and answered a gRPC error after recording it).",
            "decision",
            &c.counters.decisions(),
        );
        let _ = writeln!(
            out,
            "# HELP aegis_check_decisions_total Checks answered, by decision and reason (at most {} reasons; the rest are counted as other).\n# TYPE aegis_check_decisions_total counter",
            crate::metrics::MAX_REASONS
        );
        for (decision, reason, n) in c.counters.reasons() {
            let _ = writeln!(
                out,
                "aegis_check_decisions_total{{decision=\"{decision}\",reason=\"{}\"}} {n}",
                crate::metrics::label(&reason)
            );
        }
        c.counters.latency.render(
            &mut out,
            "aegis_check_duration_seconds",
            "Time from a Check's arrival to its answer, audit commit included (Checks shed at the door are not in it).",
        );
        let (door, queue) = c.admission.shed();
        metric(
            &mut out,
            "aegis_checks_shed_total",
            "counter",
            "Checks refused with RESOURCE_EXHAUSTED before a decision, by cause.",
            "cause",
            &[("max_inflight", door), ("audit_queue_full", queue)],
        );
        metric(
            &mut out,
            "aegis_checks_inflight",
            "gauge",
            "Checks being decided now.",
            "",
            &[("", c.admission.inflight() as u64)],
        );
        metric(
            &mut out,
            "aegis_checks_inflight_limit",
            "gauge",
            "limits.max_inflight: Checks past it are shed.",
            "",
            &[("", c.admission.limit() as u64)],
        );
    }
    if let Some(s) = &state.control_state {
        metric(
            &mut out,
            "aegis_control_state_version",
            "gauge",
            "Version of the control-plane state this data plane enforces.",
            "",
            &[("", s.version())],
        );
        metric(
            &mut out,
            "aegis_control_state_epoch",
            "gauge",
            "Epoch of the control-plane state this data plane enforces (raised by an operator's confirmation of a restore).",
            "",
            &[("", s.epoch())],
        );
        metric(
            &mut out,
            "aegis_control_rollback_refused",
            "gauge",
            "1 while this sidecar refuses a control-plane state behind the one it holds (restored backup, stale replica) and decides from its own.",
            "",
            &[("", u64::from(s.rollback().is_some()))],
        );
        metric(
            &mut out,
            "aegis_control_rollbacks_refused_total",
            "counter",
            "Control-plane snapshots refused as rollbacks since start.",
            "",
            &[("", s.rollbacks_refused())],
        );
        let (tokens, kills) = s.revocations.applied();
        metric(
            &mut out,
            "aegis_revocations_applied_total",
            "counter",
            "Token revocations and kill marks applied one by one since start (a snapshot resync is not counted).",
            "kind",
            &[("token", tokens), ("kill", kills)],
        );
        metric(
            &mut out,
            "aegis_control_revoked_tokens",
            "gauge",
            "Revoked token ids held (until the tokens expire).",
            "",
            &[("", s.revocations.revoked_tokens() as u64)],
        );
    }
    if let Some(f) = &state.follow {
        use std::sync::atomic::Ordering::Relaxed;
        metric(
            &mut out,
            "aegis_control_connected",
            "gauge",
            "1 while this sidecar follows the control plane's watch stream.",
            "",
            &[("", u64::from(f.connected.load(Relaxed)))],
        );
        metric(
            &mut out,
            "aegis_control_connects_total",
            "counter",
            "Watch streams opened (the first and every reconnect).",
            "",
            &[("", f.connects.load(Relaxed))],
        );
        metric(
            &mut out,
            "aegis_control_events_total",
            "counter",
            "Control-plane snapshots and deltas applied.",
            "",
            &[("", f.events.load(Relaxed))],
        );
    }
    if let Some(core) = &state.control_core {
        metric(
            &mut out,
            "aegis_control_watchers",
            "gauge",
            "Sidecars following this control plane now.",
            "",
            &[("", core.watchers() as u64)],
        );
        metric(
            &mut out,
            "aegis_control_sidecars_ahead_total",
            "counter",
            "Watch calls from sidecars holding a state ahead of this control plane's (it was restored from a backup or failed over to a stale replica).",
            "",
            &[(
                "",
                core.sidecars_ahead
                    .load(std::sync::atomic::Ordering::Relaxed),
            )],
        );
        metric(
            &mut out,
            "aegis_incidents_total",
            "counter",
            "Incidents raised since start, by kind.",
            "kind",
            &core.incidents_raised(),
        );
        metric(
            &mut out,
            "aegis_audit_refusals_unrecorded_total",
            "counter",
            &format!(
                "Refused control calls counted but not recorded in the audit log, by the rate they were past: one actor's or one peer's ({}/s each), or every refuser's together ({}/s).",
                crate::control::refusals::ROWS_PER_REFUSER_PER_SEC,
                crate::control::refusals::ROWS_PER_SEC
            ),
            "reason",
            &core.unrecorded_refusals(),
        );
        metric(
            &mut out,
            "aegis_control_sidecar_calls_refused_total",
            "counter",
            "RequestApproval and ReportIncident calls refused RESOURCE_EXHAUSTED: their sidecar credential was over control.sidecar_calls_per_sec.",
            "",
            &[("", core.sidecar_calls_refused())],
        );
    }
    let stats = &state.audit.stats;
    metric(
        &mut out,
        "aegis_audit_commit_failures_total",
        "counter",
        "Audit group commits that failed (their Checks were answered with an error).",
        "",
        &[(
            "",
            stats
                .failed_commits
                .load(std::sync::atomic::Ordering::Relaxed),
        )],
    );
    metric(
        &mut out,
        "aegis_audit_gather_sleeps_total",
        "counter",
        "Batches the audit writer held open (one short sleep) for rows of Checks still on their way.",
        "",
        &[(
            "",
            stats
                .gather_sleeps
                .load(std::sync::atomic::Ordering::Relaxed),
        )],
    );
    metric(
        &mut out,
        "aegis_audit_queue_depth",
        "gauge",
        "Audit rows waiting for the writer.",
        "",
        &[("", state.audit.queued() as u64)],
    );
    metric(
        &mut out,
        "aegis_audit_queue_capacity",
        "gauge",
        "audit.queue_capacity: rows past it make Checks fail with RESOURCE_EXHAUSTED.",
        "",
        &[("", state.audit.capacity() as u64)],
    );
    if let Some(w) = &state.audit.witness {
        use std::sync::atomic::Ordering::Relaxed;
        for (name, kind, help, value) in [
            (
                "aegis_audit_witness_published_total",
                "counter",
                "Signed audit checkpoints handed to the witness sinks (file, OTLP).",
                w.published.load(Relaxed),
            ),
            (
                "aegis_audit_witness_skipped_total",
                "counter",
                "Checkpoints not published: a newer one came within audit.witness_interval_ms (it extends them).",
                w.skipped.load(Relaxed),
            ),
            (
                "aegis_audit_witness_failures_total",
                "counter",
                "Batches of checkpoints a witness sink failed to take (retried with the next).",
                w.failures.load(Relaxed),
            ),
            (
                "aegis_audit_witness_tree_size",
                "gauge",
                "Rows covered by the newest published checkpoint: the log up to here has left the host.",
                w.published_size.load(Relaxed),
            ),
        ] {
            metric(&mut out, name, kind, help, "", &[("", value)]);
        }
    }
    metric(
        &mut out,
        "aegis_span_queue_capacity",
        "gauge",
        "otlp.queue_size: spans past it are dropped, never Checks delayed.",
        "",
        &[("", state.span_queue_capacity as u64)],
    );
    if let Some(spans) = &state.spans {
        use std::sync::atomic::Ordering::Relaxed;
        // Held first: a span that leaves the queue between the reads is then counted twice,
        // never missed (its outcome is read after it left).
        let held = spans.held();
        metric(
            &mut out,
            "aegis_spans_total",
            "counter",
            "Decision and checkpoint spans by what became of them: exported (the collector took them), failed (an export failed: collector down, refused or past its timeout), dropped (the queue was full, or the span ended after shutdown began). Each decision is in the audit log either way.",
            "outcome",
            &[
                ("exported", spans.exported.load(Relaxed)),
                ("failed", spans.failed.load(Relaxed)),
                ("dropped", spans.dropped.load(Relaxed)),
            ],
        );
        metric(
            &mut out,
            "aegis_span_queue_depth",
            "gauge",
            "Spans held for export now: waiting, or being exported.",
            "",
            &[("", held)],
        );
    }
    if let Some(policy) = &state.policy {
        metric(
            &mut out,
            "aegis_policy_reload_failures_total",
            "counter",
            "Bundle reloads refused (unreadable, not compiling, unsigned or tampered): the last good bundle kept serving.",
            "",
            &[("", policy.reload_failures())],
        );
        let current = policy.current();
        let _ = writeln!(
            out,
            "# HELP aegis_policy_revision_info The policy bundle being enforced (value 1).\n# TYPE aegis_policy_revision_info gauge\naegis_policy_revision_info{{revision=\"{}\",digest=\"{}\"}} 1",
            crate::metrics::label(current.revision()),
            crate::metrics::label(current.digest()),
        );
    }
    metric(
        &mut out,
        "aegis_ready",
        "gauge",
        "1 while the audit log, the policy and the signing key are usable (gRPC health SERVING).",
        "",
        &[("", u64::from((state.ready)().is_ok()))],
    );
    stats.commit_seconds.render(
        &mut out,
        "aegis_audit_commit_duration_seconds",
        "Time of one audit group commit (chain, insert, signed checkpoint, COMMIT).",
    );
    stats.batch_rows.render(
        &mut out,
        "aegis_audit_commit_rows",
        "Rows per audit group commit.",
    );
    out
}
