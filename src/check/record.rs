//! Record: the one stage with I/O. A Check's [`DecisionRecord`] is written to the audit log
//! (and waited for: nothing is answered before its row is durable), counted, offered to
//! the correlation engine and set on the Check's span.
//!
//! Every report of a decision is made from the same record, so the row, the span, the
//! correlation event and the metrics cannot disagree on what was decided and why.

use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::KeyValue;
use tonic::Status;

use super::enforce::Enforced;
use super::error::CheckError;
use super::{Call, Checker, Outcome};
use crate::audit::Record;
use crate::audit::store::{Appended, AuditError};
use crate::identity::Claims;
use crate::telemetry::CheckSpan;

/// One enforced decision, as every report of it sees it.
#[derive(Debug)]
pub(super) struct DecisionRecord<'a> {
    /// Decision time, Unix nanoseconds.
    pub time_ns: i64,
    pub decision_id: &'a str,
    pub enforced: &'a Enforced,
    /// Who called which tool, as far as the Check got.
    pub call: &'a Call,
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

/// Writes the row and, once it is durable, counts the decision, offers it to the
/// correlation engine and ends the span. An audit failure is the Check's failure (the
/// span ends with it).
pub(super) async fn record(
    checker: &Checker,
    record: &DecisionRecord<'_>,
    span: CheckSpan,
) -> Result<(), Status> {
    let row = match checker.audit.append_row(record.audit_row(&span)).await {
        Ok(row) => row,
        Err(e) => {
            if matches!(e, AuditError::Overloaded(_)) {
                checker.admission.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            let error = CheckError::Audit(e);
            error.log();
            let status = error.status();
            span.finish(
                record.span_attributes(None),
                Some(status.message().to_owned()),
            );
            return Err(status);
        }
    };
    checker.counters.count(record);
    if let Some(c) = &checker.control.correlation
        && let Some(event) = record.correlation_event(&row)
    {
        c.offer(event);
    }
    span.finish(record.span_attributes(Some(row.seq)), record.error());
    Ok(())
}

// === impl Counters ===

impl Counters {
    /// Counts a recorded decision.
    fn count(&self, record: &DecisionRecord<'_>) {
        let (decision, reason) = (record.decision(), record.reason());
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

// === impl DecisionRecord ===

impl DecisionRecord<'_> {
    fn outcome(&self) -> &Outcome {
        self.enforced.outcome()
    }

    fn claims(&self) -> Option<&Claims> {
        self.call.claims.as_deref()
    }

    /// The decision as recorded, traced and counted: the verdict, or `error`.
    pub fn decision(&self) -> &'static str {
        match self.outcome() {
            Outcome::Decided { decision, .. } => decision.verdict.as_str(),
            Outcome::Failed { .. } => "error",
        }
    }

    /// The reason as traced and counted: the decision's, or what failed.
    pub fn reason(&self) -> &str {
        match self.outcome() {
            Outcome::Decided { decision, .. } => &decision.reason,
            Outcome::Failed { reason, .. } => reason,
        }
    }

    /// The error of a failed Check, for the span's status.
    fn error(&self) -> Option<String> {
        match self.outcome() {
            Outcome::Failed { status, .. } => Some(status.message().to_owned()),
            Outcome::Decided { .. } => None,
        }
    }

    /// The audit row. A failure's reason carries the error (`policy_error: aegis: …`); its
    /// HTTP status is 0 (the Check was answered with a gRPC error).
    pub fn audit_row(&self, span: &CheckSpan) -> Record {
        let (reason, http_status) = match self.outcome() {
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
        let claims = self.claims();
        let call = self.call;
        Record {
            time_ns: self.time_ns,
            kind: "check".into(),
            decision_id: self.decision_id.to_owned(),
            tenant: claims.map(|c| c.tenant.clone()).unwrap_or_default(),
            agent: claims.map(|c| c.sub.clone()).unwrap_or_default(),
            session: claims.map(|c| c.sid.clone()).unwrap_or_default(),
            run_id: call.run_id.clone(),
            tool: call.tool.clone(),
            action: call.action.clone(),
            resource: call.resource.clone(),
            decision: self.decision().to_owned(),
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

    /// The span's attributes; `seq` is the audit row's, when it was written.
    pub fn span_attributes(&self, seq: Option<u64>) -> Vec<KeyValue> {
        let decision = self.decision();
        let mut reason = self.reason().to_owned();
        crate::audit::bound_field(&mut reason);
        let claims = self.claims();
        let call = self.call;
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
            KeyValue::new("aegis.decision_id", self.decision_id.to_owned()),
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

    /// The correlation engine's event: only a decision of a verified agent (a failure or
    /// an anonymous call is not an agent's behaviour).
    pub fn correlation_event(&self, row: &Appended) -> Option<crate::correlate::Decision> {
        let (Outcome::Decided { decision, .. }, Some(claims)) = (self.outcome(), self.claims())
        else {
            return None;
        };
        let call = self.call;
        Some(crate::correlate::Decision {
            time_ns: self.time_ns,
            tenant: claims.tenant.clone(),
            agent: claims.sub.clone(),
            session: claims.sid.clone(),
            run_id: call.run_id.clone(),
            tool: call.tool.clone(),
            action: call.action.clone(),
            decision: decision.verdict.as_str().to_owned(),
            reason: decision.reason.clone(),
            decision_id: self.decision_id.to_owned(),
            trust_level: call.trust_level.clone(),
            audit_seq: row.seq,
            row_hash: row.hash,
        })
    }
}
