//! Build input: the OPA-Envoy input document plus Aegis's `agent`, `tool` and `context`.
//!
//! ```text
//! input.attributes        the CheckRequest attributes, protojson-encoded as OPA-Envoy does
//! input.parsed_path       path segments, percent-decoded: "/a/b%20c" → ["a", "b c"]
//! input.parsed_query      {"k": ["v1", "v2"]}
//! input.parsed_body       JSON or form body (null when absent, unparsed type or truncated)
//! input.truncated_body    the body Envoy sent is partial
//! input.version           {"encoding": "protojson", "ext_authz": "v3"}
//! input.agent             {id, tenant, scopes, session, status, risk_tier}
//! input.tool              {name, action, arguments, resource}
//! input.context           {trust_level, run_id, parent_agent}
//! ```
//!
//! The tool comes from an MCP JSON-RPC `tools/call` body (`params.name` "tool.action" or
//! "tool/action", else the whole name with `x-aegis-action` or `call` as action), else the
//! `x-aegis-tool` / `x-aegis-action` / `x-aegis-resource` headers, else the first path
//! segment and the HTTP method (GET/HEAD → read, POST → create, PUT/PATCH → update,
//! DELETE → delete) with the path as resource.

use std::borrow::Cow;
use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use serde_json::{Map, Value};

use crate::control::state::AgentContext;
use crate::identity::Claims;

/// Limits on what a request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

/// Deepest JSON body parsed: serde_json's own recursion limit, which bounds the stack
/// used by parsing and by every later walk of the value.
pub const MAX_JSON_DEPTH: usize = 128;

/// A request Aegis cannot make sense of: answered with a 4xx deny, never an internal error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("request has no attributes.request.http")]
    NoHttp,
    #[error("body is {0} bytes, over the {1}-byte limit")]
    BodyTooLarge(usize, usize),
    #[error("request has {0} headers, over the limit of {1}")]
    TooManyHeaders(usize, usize),
    #[error("request headers are {0} bytes, over the {1}-byte limit")]
    HeadersTooLarge(usize, usize),
    #[error("path is not valid percent-encoded UTF-8")]
    MalformedPath,
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),
    #[error("JSON body nests deeper than {MAX_JSON_DEPTH} levels")]
    BodyTooDeep,
    #[error("malformed MCP request: {0}")]
    MalformedMcp(&'static str),
    #[error("x-aegis-cost {0:?} is not a finite number ≥ 0")]
    MalformedCost(String),
}

impl InputError {
    /// HTTP status and reason code for the deny.
    pub fn status_and_reason(&self) -> (u32, &'static str) {
        match self {
            InputError::NoHttp => (400, "malformed_request"),
            InputError::BodyTooLarge(..) => (413, "body_too_large"),
            InputError::TooManyHeaders(..) | InputError::HeadersTooLarge(..) => {
                (431, "headers_too_large")
            }
            InputError::MalformedPath => (400, "malformed_path"),
            InputError::MalformedJson(_) => (400, "malformed_body"),
            InputError::BodyTooDeep => (400, "body_too_deep"),
            InputError::MalformedMcp(_) => (400, "malformed_mcp_request"),
            InputError::MalformedCost(_) => (400, "malformed_cost"),
        }
    }
}

/// The tool call a request makes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tool {
    pub name: String,
    pub action: String,
    pub arguments: Value,
    pub resource: String,
}

/// Where the call came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    pub trust_level: String,
    pub run_id: String,
    pub parent_agent: String,
}

/// The decoded request: everything later steps read, parsed once.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub http: &'a HttpRequest,
    pub headers: Cow<'a, HashMap<String, String>>,
    pub parsed_path: Vec<String>,
    pub parsed_query: Map<String, Value>,
    pub parsed_body: Value,
    pub truncated_body: bool,
    pub tool: Tool,
    pub context: CallContext,
    /// The call's cost for budgets (`x-aegis-cost`; 0 without it).
    pub cost: f64,
}

impl Decoded<'_> {
    /// A request header by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Decodes the HTTP request: limits, path, query, body, tool and context.
pub fn decode<'a>(
    http: Option<&'a HttpRequest>,
    limits: &Limits,
) -> Result<Decoded<'a>, InputError> {
    let http = http.ok_or(InputError::NoHttp)?;
    let headers = decode_headers(http, limits)?;
    decode_with_headers(http, headers, limits)
}

/// [`decode`] with the headers already decoded (the token is read from them first).
pub fn decode_with_headers<'a>(
    http: &'a HttpRequest,
    headers: Cow<'a, HashMap<String, String>>,
    limits: &Limits,
) -> Result<Decoded<'a>, InputError> {
    let body: &[u8] = if http.body.is_empty() {
        &http.raw_body
    } else {
        http.body.as_bytes()
    };
    if body.len() > limits.max_body_bytes {
        return Err(InputError::BodyTooLarge(body.len(), limits.max_body_bytes));
    }
    let (path, query) = split_path(&http.path);
    let parsed_path = parse_path(path)?;
    let parsed_query = parse_query(query);
    let (parsed_body, truncated_body) = parse_body(&headers, body)?;
    let tool = tool(&headers, &parsed_body, &http.method, path)?;
    let get = |k: &str| headers.get(k).cloned().unwrap_or_default();
    let context = CallContext {
        trust_level: headers
            .get("x-aegis-trust-level")
            .cloned()
            .unwrap_or_else(|| "unspecified".into()),
        run_id: get("x-aegis-run-id"),
        parent_agent: get("x-aegis-parent-agent"),
    };
    let cost = match headers.get("x-aegis-cost").map(|v| v.trim()) {
        None | Some("") => 0.0,
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|c| c.is_finite() && *c >= 0.0)
            .ok_or_else(|| InputError::MalformedCost(v.to_owned()))?,
    };
    Ok(Decoded {
        http,
        headers,
        parsed_path,
        parsed_query,
        parsed_body,
        truncated_body,
        tool,
        context,
        cost,
    })
}

/// The whole input document for an identified agent, with its status and risk tier as the
/// control plane has them.
pub fn build(
    attributes: regorus::Value,
    d: &Decoded<'_>,
    claims: &Claims,
    known: &AgentContext,
) -> regorus::Value {
    use super::protojson::{Obj, json_to_rego, map_to_rego};
    use regorus::Value as R;
    let strings = |v: &[String]| R::from(v.iter().map(|s| R::from(s.as_str())).collect::<Vec<_>>());
    let mut version = Obj::default();
    version
        .put_str("encoding", "protojson")
        .put_str("ext_authz", "v3");
    let mut agent = Obj::default();
    agent
        .put("id", R::from(claims.sub.as_str()))
        .put("tenant", R::from(claims.tenant.as_str()))
        .put("scopes", strings(&claims.scopes))
        .put("session", R::from(claims.sid.as_str()))
        .put("status", R::from(known.status.as_str()))
        .put("risk_tier", R::from(&*known.risk_tier));
    let mut tool = Obj::default();
    tool.put("name", R::from(d.tool.name.as_str()))
        .put("action", R::from(d.tool.action.as_str()))
        .put("arguments", json_to_rego(&d.tool.arguments))
        .put("resource", R::from(d.tool.resource.as_str()));
    let mut context = Obj::default();
    context
        .put("trust_level", R::from(d.context.trust_level.as_str()))
        .put("run_id", R::from(d.context.run_id.as_str()))
        .put("parent_agent", R::from(d.context.parent_agent.as_str()));
    let mut doc = Obj::default();
    doc.put("attributes", attributes)
        .put("parsed_path", strings(&d.parsed_path))
        .put("parsed_query", map_to_rego(&d.parsed_query))
        .put("parsed_body", json_to_rego(&d.parsed_body))
        .put("truncated_body", R::from(d.truncated_body))
        .put("version", version.build())
        .put("agent", agent.build())
        .put("tool", tool.build())
        .put("context", context.build());
    doc.build()
}

/// `headers`, or (with Envoy's `encode_raw_headers`) `header_map` joined like Envoy joins
/// repeated headers; checked against the limits.
pub fn decode_headers<'a>(
    http: &'a HttpRequest,
    limits: &Limits,
) -> Result<Cow<'a, HashMap<String, String>>, InputError> {
    let map: Cow<'a, HashMap<String, String>> = match &http.header_map {
        Some(hm) if http.headers.is_empty() => {
            let mut m: HashMap<String, String> = HashMap::with_capacity(hm.headers.len());
            for h in &hm.headers {
                let v = if h.raw_value.is_empty() {
                    h.value.clone()
                } else {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                };
                m.entry(h.key.to_ascii_lowercase())
                    .and_modify(|e| {
                        e.push(',');
                        e.push_str(&v);
                    })
                    .or_insert(v);
            }
            Cow::Owned(m)
        }
        _ => Cow::Borrowed(&http.headers),
    };
    if map.len() > limits.max_headers {
        return Err(InputError::TooManyHeaders(map.len(), limits.max_headers));
    }
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_header_bytes {
        return Err(InputError::HeadersTooLarge(bytes, limits.max_header_bytes));
    }
    Ok(map)
}

/// Envoy puts the raw query (and any fragment) in `path`.
fn split_path(raw: &str) -> (&str, &str) {
    let raw = raw.split_once('#').map_or(raw, |(p, _)| p);
    raw.split_once('?').unwrap_or((raw, ""))
}

fn parse_path(path: &str) -> Result<Vec<String>, InputError> {
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| InputError::MalformedPath)?;
    Ok(decoded
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect())
}

fn parse_query(query: &str) -> Map<String, Value> {
    let mut out: Map<String, Value> = Map::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if let Value::Array(list) = out
            .entry(k.into_owned())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            list.push(Value::String(v.into_owned()));
        }
    }
    out
}

/// `(parsed_body, truncated_body)` following OPA-Envoy: by content type, and a body shorter
/// than its `content-length` (or Envoy's partial-body marker) is truncated and not parsed.
fn parse_body(headers: &HashMap<String, String>, body: &[u8]) -> Result<(Value, bool), InputError> {
    let ctype = headers
        .get("content-type")
        .map(String::as_str)
        .unwrap_or("");
    let is_json = ctype.contains("application/json");
    let is_form = ctype.contains("application/x-www-form-urlencoded");
    if body.is_empty() || !(is_json || is_form) {
        return Ok((Value::Null, false));
    }
    let declared = headers
        .get("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok());
    let partial = headers
        .get("x-envoy-auth-partial-body")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if partial || declared.is_some_and(|n| n > body.len()) {
        return Ok((Value::Null, true));
    }
    if is_json {
        let v = serde_json::from_slice(body).map_err(|e| {
            // serde_json stops at its recursion limit; say so rather than "malformed".
            if e.to_string().starts_with("recursion limit exceeded") {
                InputError::BodyTooDeep
            } else {
                InputError::MalformedJson(e.to_string())
            }
        })?;
        return Ok((v, false));
    }
    Ok((
        Value::Object(parse_query(&String::from_utf8_lossy(body))),
        false,
    ))
}

fn tool(
    headers: &HashMap<String, String>,
    body: &Value,
    method: &str,
    path: &str,
) -> Result<Tool, InputError> {
    let header = |k: &str| headers.get(k).filter(|v| !v.is_empty()).cloned();
    if let Some(mut t) = mcp_tool(body, header("x-aegis-action"))? {
        if let Some(r) = header("x-aegis-resource") {
            t.resource = r;
        }
        return Ok(t);
    }
    if let Some(name) = header("x-aegis-tool") {
        return Ok(Tool {
            name,
            action: header("x-aegis-action").unwrap_or_else(|| http_verb(method).to_owned()),
            arguments: Value::Object(Map::new()),
            resource: header("x-aegis-resource").unwrap_or_else(|| path.to_owned()),
        });
    }
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    Ok(Tool {
        name: first.to_owned(),
        action: http_verb(method).to_owned(),
        arguments: Value::Object(Map::new()),
        resource: path.to_owned(),
    })
}

fn http_verb(method: &str) -> &'static str {
    match method {
        "GET" | "HEAD" => "read",
        "POST" => "create",
        "PUT" | "PATCH" => "update",
        "DELETE" => "delete",
        _ => "other",
    }
}

/// The tool of an MCP JSON-RPC request, if the body is one.
fn mcp_tool(body: &Value, action_header: Option<String>) -> Result<Option<Tool>, InputError> {
    let Some(obj) = body.as_object() else {
        return Ok(None);
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Ok(None);
    }
    let method = obj
        .get("method")
        .and_then(Value::as_str)
        .ok_or(InputError::MalformedMcp(
            "JSON-RPC request without a method",
        ))?;
    if method != "tools/call" {
        // Session plumbing (initialize, tools/list, ping, …): the tool is `mcp`.
        return Ok(Some(Tool {
            name: "mcp".into(),
            action: method.to_owned(),
            arguments: Value::Object(Map::new()),
            resource: String::new(),
        }));
    }
    let params = obj
        .get("params")
        .and_then(Value::as_object)
        .ok_or(InputError::MalformedMcp("tools/call without params"))?;
    let full = params
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or(InputError::MalformedMcp("tools/call without params.name"))?;
    let arguments = match params.get("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => {
            return Err(InputError::MalformedMcp(
                "params.arguments is not an object",
            ));
        }
    };
    let (name, action) = match full.split_once(['.', '/']) {
        Some((n, a)) if !n.is_empty() && !a.is_empty() => (n.to_owned(), a.to_owned()),
        _ => (
            full.to_owned(),
            action_header.unwrap_or_else(|| "call".into()),
        ),
    };
    let resource = ["resource", "url", "uri", "path"]
        .iter()
        .find_map(|k| arguments.get(*k).and_then(Value::as_str))
        .unwrap_or("")
        .to_owned();
    Ok(Some(Tool {
        name,
        action,
        arguments,
        resource,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits {
            max_body_bytes: 1024,
            max_headers: 16,
            max_header_bytes: 4096,
        }
    }

    fn req(method: &str, path: &str, ctype: &str, body: &str) -> HttpRequest {
        let mut h = HttpRequest {
            method: method.into(),
            path: path.into(),
            body: body.into(),
            ..Default::default()
        };
        if !ctype.is_empty() {
            h.headers.insert("content-type".into(), ctype.into());
        }
        h
    }

    #[test]
    fn path_and_query_like_opa_envoy() {
        let r = req("GET", "/invoices/a%20b?x=1&x=2&y=%2F#frag", "", "");
        let d = decode(Some(&r), &limits()).expect("decodes");
        assert_eq!(d.parsed_path, vec!["invoices", "a b"]);
        assert_eq!(
            Value::Object(d.parsed_query),
            json!({"x": ["1", "2"], "y": ["/"]})
        );
        assert_eq!(
            d.tool,
            Tool {
                name: "invoices".into(),
                action: "read".into(),
                arguments: json!({}),
                resource: "/invoices/a%20b".into()
            }
        );
        let root = req("GET", "/", "", "");
        assert_eq!(
            decode(Some(&root), &limits()).expect("decodes").parsed_path,
            vec![""]
        );
    }

    #[test]
    fn mcp_tools_call() {
        let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"payments.create","arguments":{"amount":5,"resource":"acct-1"}}}"#;
        let r = req("POST", "/mcp", "application/json", body);
        let d = decode(Some(&r), &limits()).expect("decodes");
        assert_eq!(d.tool.name, "payments");
        assert_eq!(d.tool.action, "create");
        assert_eq!(d.tool.resource, "acct-1");
        assert_eq!(d.tool.arguments, json!({"amount": 5, "resource": "acct-1"}));
        let bad = req(
            "POST",
            "/mcp",
            "application/json",
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{}}"#,
        );
        assert_eq!(
            decode(Some(&bad), &limits()).err(),
            Some(InputError::MalformedMcp("tools/call without params.name"))
        );
    }

    #[test]
    fn a_body_past_the_depth_limit_is_refused_as_too_deep() {
        let limits = Limits {
            max_body_bytes: 1 << 20,
            ..limits()
        };
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH + 1),
            "]".repeat(MAX_JSON_DEPTH + 1)
        );
        let r = req("POST", "/x", "application/json", &deep);
        let err = decode(Some(&r), &limits).err();
        assert_eq!(err, Some(InputError::BodyTooDeep));
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH - 1),
            "]".repeat(MAX_JSON_DEPTH - 1)
        );
        let r = req("POST", "/x", "application/json", &ok);
        assert!(decode(Some(&r), &limits).is_ok());
    }

    #[test]
    fn bodies_json_form_malformed_truncated() {
        let form = req(
            "POST",
            "/x",
            "application/x-www-form-urlencoded",
            "a=1&b=two+words",
        );
        assert_eq!(
            decode(Some(&form), &limits()).expect("form").parsed_body,
            json!({"a": ["1"], "b": ["two words"]})
        );
        let bad = req("POST", "/x", "application/json", "{\"a\":");
        assert!(matches!(
            decode(Some(&bad), &limits()),
            Err(InputError::MalformedJson(_))
        ));
        let mut cut = req("POST", "/x", "application/json", "{\"a\":");
        cut.headers.insert("content-length".into(), "100".into());
        let d = decode(Some(&cut), &limits()).expect("truncated is not an error");
        assert!(d.truncated_body);
        assert_eq!(d.parsed_body, Value::Null);
        let big = req("POST", "/x", "application/json", &"1".repeat(2000));
        assert_eq!(
            decode(Some(&big), &limits()).err(),
            Some(InputError::BodyTooLarge(2000, 1024))
        );
    }
}
