//! The decision document: what the policy's rule returned, made typed.
//!
//! A boolean (OPA-Envoy's `allow` style), or an object with OPA-Envoy's keys (`allowed`,
//! `headers`, `body`, `http_status`, `request_headers_to_remove`, `response_headers_to_add`,
//! `query_parameters_to_set`, `query_parameters_to_remove`, `dynamic_metadata`) plus Aegis's
//! `decision` and `reason`. An undefined result (no rule matched, no default) is a deny with
//! reason `no_decision`: policies decide, and silence is not consent.

use regorus::Value;

/// The four outcomes a policy can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request goes on to the tool.
    Allow,
    /// The request is refused (403 unless the policy sets a status).
    Deny,
    /// The request goes on, changed as the policy says (headers, query).
    Sanitize,
    /// The request waits for a human: refused with an approval id to retry with.
    ApprovalNeeded,
    /// Shadow mode: the policy (or a budget) denied, the request goes on, and the decision
    /// is recorded as `would_deny`. Never a policy's own answer.
    WouldDeny,
}

impl Verdict {
    /// The name used in policies, audit rows and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Sanitize => "sanitize",
            Verdict::ApprovalNeeded => "approval_needed",
            Verdict::WouldDeny => "would_deny",
        }
    }

    /// Whether the request goes on to the tool.
    pub fn allows(self) -> bool {
        matches!(
            self,
            Verdict::Allow | Verdict::Sanitize | Verdict::WouldDeny
        )
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => Verdict::Allow,
            "deny" => Verdict::Deny,
            "sanitize" => Verdict::Sanitize,
            "approval_needed" => Verdict::ApprovalNeeded,
            _ => return None,
        })
    }
}

/// A decision document that does not have the expected shape.
#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    /// The JSON type the document had instead (`string`, `array`, ...).
    #[error("decision must be a boolean or an object, got {0}")]
    WrongType(&'static str),
    /// A key of the object has the wrong type or value.
    #[error("decision key {key:?}: {message}")]
    BadKey {
        /// The key.
        key: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// The `decision` key and the `allowed` key disagree.
    #[error("decision {decision:?} contradicts allowed = {allowed}")]
    Contradiction {
        /// What `decision` said.
        decision: &'static str,
        /// What `allowed` said.
        allowed: bool,
    },
}

/// A typed decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What the policy decided.
    pub verdict: Verdict,
    /// Why, as the policy says it (`reason`); recorded and sent in `x-aegis-reason`.
    pub reason: String,
    /// On allow: headers added to the upstream request; on deny: to the response.
    pub headers: Vec<(String, String)>,
    /// On deny: the response body for the agent; `None` for Aegis's JSON body.
    pub body: Option<String>,
    /// On deny: the HTTP status for the agent; `None` for 403.
    pub http_status: Option<u32>,
    /// On allow: headers removed from the upstream request.
    pub request_headers_to_remove: Vec<String>,
    /// On allow: headers added to the tool's response.
    pub response_headers_to_add: Vec<(String, String)>,
    /// On allow: query parameters set on the upstream request.
    pub query_parameters_to_set: Vec<(String, String)>,
    /// On allow: query parameters removed from the upstream request.
    pub query_parameters_to_remove: Vec<String>,
    /// As JSON, for Envoy's dynamic metadata.
    pub dynamic_metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

// === impl Decision ===

impl Decision {
    /// A decision with only a verdict and a reason.
    pub fn simple(verdict: Verdict, reason: impl Into<String>) -> Self {
        Self {
            verdict,
            reason: reason.into(),
            headers: Vec::new(),
            body: None,
            http_status: None,
            request_headers_to_remove: Vec::new(),
            response_headers_to_add: Vec::new(),
            query_parameters_to_set: Vec::new(),
            query_parameters_to_remove: Vec::new(),
            dynamic_metadata: None,
        }
    }

    /// Reads the value the decision rule produced.
    pub fn from_value(v: &Value) -> Result<Self, DecisionError> {
        let obj = match v {
            Value::Undefined => return Ok(Self::simple(Verdict::Deny, "no_decision")),
            Value::Bool(true) => return Ok(Self::simple(Verdict::Allow, "allowed")),
            Value::Bool(false) => return Ok(Self::simple(Verdict::Deny, "denied")),
            Value::Object(obj) => obj,
            other => return Err(DecisionError::WrongType(type_name(other))),
        };
        let get = |k: &str| {
            obj.get(&Value::from(k))
                .filter(|v| !matches!(v, Value::Undefined | Value::Null))
        };
        let allowed = get("allowed").map(|v| as_bool(v, "allowed")).transpose()?;
        let verdict = match get("decision") {
            Some(d) => {
                let s = as_str(d, "decision")?;
                Verdict::parse(s).ok_or_else(|| DecisionError::BadKey {
                    key: "decision",
                    message: format!("{s:?} is not one of allow, deny, sanitize, approval_needed"),
                })?
            }
            None if allowed == Some(true) => Verdict::Allow,
            None => Verdict::Deny,
        };
        if let Some(allowed) = allowed
            && allowed != verdict.allows()
        {
            return Err(DecisionError::Contradiction {
                decision: verdict.as_str(),
                allowed,
            });
        }
        let reason = match get("reason") {
            Some(r) => as_str(r, "reason")?.to_owned(),
            None => verdict.as_str().to_owned(),
        };
        let http_status = get("http_status")
            .map(|v| {
                let n = v
                    .as_u64()
                    .map_err(|_| bad("http_status", "must be an integer"))?;
                u32::try_from(n)
                    .ok()
                    .filter(|n| (100..=599).contains(n))
                    .ok_or_else(|| bad("http_status", "must be 100..=599"))
            })
            .transpose()?;
        Ok(Self {
            verdict,
            reason,
            headers: get("headers")
                .map(|v| string_pairs(v, "headers"))
                .transpose()?
                .unwrap_or_default(),
            body: get("body")
                .map(|v| as_str(v, "body").map(str::to_owned))
                .transpose()?,
            http_status,
            request_headers_to_remove: get("request_headers_to_remove")
                .map(|v| strings(v, "request_headers_to_remove"))
                .transpose()?
                .unwrap_or_default(),
            response_headers_to_add: get("response_headers_to_add")
                .map(|v| string_pairs(v, "response_headers_to_add"))
                .transpose()?
                .unwrap_or_default(),
            query_parameters_to_set: get("query_parameters_to_set")
                .map(|v| string_pairs(v, "query_parameters_to_set"))
                .transpose()?
                .unwrap_or_default(),
            query_parameters_to_remove: get("query_parameters_to_remove")
                .map(|v| strings(v, "query_parameters_to_remove"))
                .transpose()?
                .unwrap_or_default(),
            dynamic_metadata: get("dynamic_metadata").map(dynamic_metadata).transpose()?,
        })
    }
}

fn bad(key: &'static str, message: &str) -> DecisionError {
    DecisionError::BadKey {
        key,
        message: message.to_owned(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Set(_) => "set",
        Value::Object(_) => "object",
        Value::Undefined => "undefined",
    }
}

fn as_bool(v: &Value, key: &'static str) -> Result<bool, DecisionError> {
    v.as_bool()
        .copied()
        .map_err(|_| bad(key, "must be a boolean"))
}

fn as_str<'a>(v: &'a Value, key: &'static str) -> Result<&'a str, DecisionError> {
    v.as_string()
        .map(|s| s.as_ref())
        .map_err(|_| bad(key, "must be a string"))
}

/// An array or set of strings.
fn strings(v: &Value, key: &'static str) -> Result<Vec<String>, DecisionError> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Set(s) => s.iter().collect(),
        _ => return Err(bad(key, "must be an array of strings")),
    };
    items
        .into_iter()
        .map(|i| as_str(i, key).map(str::to_owned))
        .collect()
}

/// An object whose values are strings or arrays of strings (one pair per element).
fn string_pairs(v: &Value, key: &'static str) -> Result<Vec<(String, String)>, DecisionError> {
    let obj = v.as_object().map_err(|_| bad(key, "must be an object"))?;
    let mut out = Vec::new();
    for (k, val) in obj.iter() {
        let name = as_str(k, key)?.to_owned();
        match val {
            Value::String(s) => out.push((name, s.to_string())),
            Value::Array(_) | Value::Set(_) => {
                for s in strings(val, key)? {
                    out.push((name.clone(), s));
                }
            }
            _ => return Err(bad(key, "values must be strings or arrays of strings")),
        }
    }
    Ok(out)
}

/// Deepest nesting of `dynamic_metadata` (Envoy's metadata is a handful of levels): it is
/// converted and freed recursively on the async workers, whose stacks are 2 MiB, while a
/// policy could build it thousands of levels deep.
pub const MAX_METADATA_DEPTH: usize = 64;
/// Most values in `dynamic_metadata`, counting a value shared by several keys once per
/// key: regorus shares values, so a policy could hand over `m60 := {"a": m59, "b": m59}`,
/// cheap to build and 2^60 values to convert.
pub const MAX_METADATA_VALUES: usize = 10_000;

fn dynamic_metadata(
    v: &Value,
) -> Result<serde_json::Map<String, serde_json::Value>, DecisionError> {
    check_size(v).map_err(|message| bad("dynamic_metadata", &message))?;
    match serde_json::to_value(v) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(bad("dynamic_metadata", "must be an object")),
    }
}

/// Refuses a value nesting deeper than [`MAX_METADATA_DEPTH`] or holding more than
/// [`MAX_METADATA_VALUES`] values; stops as soon as it passes either, without recursing.
fn check_size(v: &Value) -> Result<(), String> {
    let mut seen = 0usize;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        seen += 1;
        if depth > MAX_METADATA_DEPTH {
            return Err(format!("nests more than {MAX_METADATA_DEPTH} levels deep"));
        }
        if seen > MAX_METADATA_VALUES {
            return Err(format!("holds more than {MAX_METADATA_VALUES} values"));
        }
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|i| (i, depth + 1))),
            Value::Set(s) => stack.extend(s.iter().map(|i| (i, depth + 1))),
            Value::Object(o) => {
                stack.extend(o.iter().flat_map(|(k, i)| [(k, depth + 1), (i, depth + 1)]))
            }
            _ => {}
        }
    }
    Ok(())
}
