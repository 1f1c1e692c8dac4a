//! Respond: the CheckResponse Envoy acts on.
//!
//! - allow / sanitize → `OK` with the policy's header and query mutations, the agent token
//!   header removed (tools never see agent credentials), as are an override token and the
//!   agent's claim headers (`x-aegis-tool`, `-action`, `-resource`, `-trust-level`,
//!   `-cost`), and dynamic metadata;
//! - deny → `PERMISSION_DENIED` (`UNAUTHENTICATED` for token refusals) with a denied
//!   response: status (default 403), `x-aegis-reason`, `x-aegis-decision-id`, and a JSON
//!   body with decision, reason and decision id;
//! - approval_needed → a 403 deny that also carries `x-aegis-approval-required: true` and
//!   the pending approval's id in `x-aegis-approval-id` (and `approval_id` in the body);
//! - would_deny (shadow mode) → `OK`, like an allow, with `decision: would_deny` in the
//!   dynamic metadata.
//!
//! Aegis's own failures are answered here as gRPC errors (see [`super::error`]), never as
//! a CheckResponse.

use envoy_types::ext_authz::v3::pb::{CheckResponse, HeaderAppendAction, HttpStatus};
use envoy_types::ext_authz::v3::{
    CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use serde_json::{Map, Value, json};
use tonic::{Code, Status};

use super::Outcome;
use super::enforce::Enforced;
use super::protojson::json_to_struct;
use crate::policy::{Decision, Verdict};

/// What every response carries about the decision.
#[derive(Debug)]
pub struct Meta<'a> {
    /// The decision's id, sent in `x-aegis-decision-id` and the deny body.
    pub decision_id: &'a str,
    /// The policy revision that decided, in the deny body.
    pub policy_version: &'a str,
    /// The approval raised (approval_needed) or redeemed (an override allowed); may be empty.
    pub approval_id: &'a str,
    /// Headers to remove before the request goes on (the override token, the agent's claim
    /// headers), besides the token header.
    pub strip_headers: &'a [&'static str],
}

/// The answer to an enforced Check: its CheckResponse, or the gRPC error of a Check that
/// failed. Takes an [`Enforced`] outcome, so that nothing unenforced can be answered.
pub(super) fn respond(
    enforced: Enforced,
    meta: &Meta<'_>,
    token_header: &str,
) -> Result<CheckResponse, Status> {
    match enforced.into_outcome() {
        Outcome::Decided { decision, .. } if decision.verdict.allows() => {
            Ok(allowed(&decision, meta, token_header))
        }
        Outcome::Decided {
            decision,
            code,
            default_status,
        } => Ok(denied(&decision, meta, code, default_status)),
        Outcome::Failed { status, .. } => Err(status),
    }
}

/// An allow (or sanitize): the request goes on, mutated as the policy asks.
pub fn allowed(d: &Decision, meta: &Meta<'_>, token_header: &str) -> CheckResponse {
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    let mut ok = OkHttpResponseBuilder::new();
    for (k, v) in &d.headers {
        ok.add_header(k.clone(), v.clone(), overwrite, false);
    }
    ok.remove_header(token_header);
    for h in meta.strip_headers {
        ok.remove_header(*h);
    }
    for h in &d.request_headers_to_remove {
        if !h.eq_ignore_ascii_case(token_header) {
            ok.remove_header(h.clone());
        }
    }
    for (k, v) in &d.response_headers_to_add {
        ok.add_response_header(k.clone(), v.clone(), overwrite, false);
    }
    for (k, v) in &d.query_parameters_to_set {
        ok.set_query_parameter(k.clone(), v.clone());
    }
    for q in &d.query_parameters_to_remove {
        ok.remove_query_parameter(q.clone());
    }
    let mut resp = CheckResponse::with_status(Status::ok(""));
    resp.set_http_response(ok);
    resp.set_dynamic_metadata(Some(json_to_struct(&metadata(d, meta))));
    resp
}

/// A deny: the agent gets `http_status` with the reason in a header and a JSON body.
pub fn denied(d: &Decision, meta: &Meta<'_>, code: Code, default_status: u32) -> CheckResponse {
    let status = d.http_status.unwrap_or(default_status);
    let mut denied = DeniedHttpResponseBuilder::new();
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    for (k, v) in &d.headers {
        denied.add_header(k.clone(), v.clone(), overwrite, false);
    }
    denied.add_header("x-aegis-reason", d.reason.clone(), overwrite, false);
    denied.add_header("x-aegis-decision-id", meta.decision_id, overwrite, false);
    if d.verdict == Verdict::ApprovalNeeded {
        denied.add_header("x-aegis-approval-required", "true", overwrite, false);
    }
    if !meta.approval_id.is_empty() {
        denied.add_header("x-aegis-approval-id", meta.approval_id, overwrite, false);
    }
    let body = match &d.body {
        Some(b) => b.clone(),
        None => {
            denied.add_header("content-type", "application/json", overwrite, false);
            let mut body = json!({
                "decision": d.verdict.as_str(),
                "reason": d.reason,
                "decision_id": meta.decision_id,
                "policy_version": meta.policy_version,
            });
            if !meta.approval_id.is_empty()
                && let Some(fields) = body.as_object_mut()
            {
                fields.insert(
                    "approval_id".to_owned(),
                    Value::String(meta.approval_id.to_owned()),
                );
            }
            body.to_string()
        }
    };
    denied.set_body(body);
    // Any status the policy names, not only those the builder's enum lists.
    let mut denied = denied.build();
    denied.status = Some(HttpStatus {
        code: i32::try_from(status).unwrap_or(403),
    });
    let mut resp = CheckResponse::with_status(Status::new(code, d.reason.clone()));
    resp.set_http_response(denied);
    resp.set_dynamic_metadata(Some(json_to_struct(&metadata(d, meta))));
    resp
}

/// The policy's `dynamic_metadata`, with Aegis's own keys on top (a policy cannot forge them).
fn metadata(d: &Decision, meta: &Meta<'_>) -> Map<String, Value> {
    let mut m = d.dynamic_metadata.clone().unwrap_or_default();
    m.insert(
        "decision_id".into(),
        Value::String(meta.decision_id.to_owned()),
    );
    m.insert(
        "policy_version".into(),
        Value::String(meta.policy_version.to_owned()),
    );
    m.insert(
        "decision".into(),
        Value::String(d.verdict.as_str().to_owned()),
    );
    m
}
