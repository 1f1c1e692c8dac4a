//! Build input: the OPA-Envoy input document plus Aegis's `agent`, `tool` and `context`.
//!
//! ```text
//! input.attributes        the CheckRequest attributes, protojson-encoded as OPA-Envoy does
//! input.parsed_path       path segments, percent-decoded: "/a/b%20c" → ["a", "b c"]
//! input.parsed_query      {"k": ["v1", "v2"]}
//! input.parsed_body       JSON or form body (null when absent, unparsed type or truncated)
//! input.truncated_body    the body Envoy sent may be partial
//! input.version           {"encoding": "protojson", "ext_authz": "v3"}
//! input.agent             {id, tenant, scopes, session, status, risk_tier}
//! input.tool              {name, action, arguments, resource, route, source}
//! input.context           {trust_level, run_id, parent_agent}
//! ```
//!
//! [`build`] makes only the parts the bundle can read ([`crate::policy::reads`]); what
//! [`decode`] checks of the request does not depend on the bundle.
//!
//! The tool comes from the route (see [`crate::policy::routes`]): Envoy's per-route labels,
//! else the bundle's route catalogue, else, on a route declared MCP, the JSON-RPC
//! `tools/call` body. What the agent says of its own call (`x-aegis-tool`,
//! `x-aegis-action`, `x-aegis-resource`) is ignored, or, on a route set to `verify`,
//! compared and denied on mismatch. Of the other claims, only those that make the decision
//! stricter are believed: an `untrusted…` trust level, and an `x-aegis-cost` above the
//! route's.
//!
//! Bodies are read the way a strict tool server would: media types case-insensitively, a
//! route's declared body type only under that `content-type`, JSON with duplicate keys
//! (compared under Unicode case folding, as Go's decoder matches fields) refused, a
//! JSON-RPC batch refused, and a body of exactly Envoy's buffer limit without a `content-length` that
//! proves it whole taken as truncated. Paths must arrive normalized (Envoy's
//! `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`): a dot segment,
//! an encoded slash or backslash, or an empty segment inside the path is denied.

use std::borrow::Cow;
use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use serde_json::{Map, Value};

use crate::dataplane::state::AgentContext;
use crate::identity::Claims;
use crate::policy::reads::Reads;
use crate::policy::routes::{
    AgentLabels, BodyKind, Catalogue, Protocol, Route, RouteError, RouteSource,
};

/// Limits on what a request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest body read, in bytes; a longer one is denied (`BodyTooLarge`).
    pub max_body_bytes: usize,
    /// Most request headers accepted; more is denied (`TooManyHeaders`).
    pub max_headers: usize,
    /// Largest total of header names and values, in bytes; more is denied (`HeadersTooLarge`).
    pub max_header_bytes: usize,
    /// Envoy's `with_request_body.max_request_bytes`: a body this long is whole only if its
    /// `content-length` says so (0: not known).
    pub envoy_max_request_bytes: usize,
}

/// Room in a CheckRequest for what it carries besides the body and the headers: the
/// peers' addresses and certificates, the route's context extensions, metadata.
pub const CHECK_OVERHEAD_BYTES: usize = 64 * 1024;

impl Limits {
    /// The largest CheckRequest decoded; a larger one is refused by the gRPC layer with
    /// `OUT_OF_RANGE` before it is read (no decision, no row: Envoy's
    /// `failure_mode_allow`/`status_on_error` decide). Room for the body Envoy sends
    /// (`envoy_max_request_bytes`, or `max_body_bytes` when that is 0), the headers twice
    /// (Envoy repeats `:path`, host and query in `http.path`, `http.host`, `http.query`),
    /// and [`CHECK_OVERHEAD_BYTES`]. With the defaults: 64 KiB + 2 × 64 KiB + 64 KiB =
    /// 256 KiB, against the 4 MiB gRPC default.
    pub fn max_check_request_bytes(&self) -> usize {
        let body = if self.envoy_max_request_bytes > 0 {
            self.envoy_max_request_bytes
        } else {
            self.max_body_bytes
        };
        body.saturating_add(self.max_header_bytes.saturating_mul(2))
            .saturating_add(CHECK_OVERHEAD_BYTES)
    }
}

/// Deepest JSON body parsed: serde_json's own recursion limit, which bounds the stack
/// used by parsing and by every later walk of the value.
pub const MAX_JSON_DEPTH: usize = 128;

/// Claim headers that never reach the tool (the token and override headers aside).
pub const CLAIM_HEADERS: [&str; 5] = [
    "x-aegis-tool",
    "x-aegis-action",
    "x-aegis-resource",
    "x-aegis-trust-level",
    "x-aegis-cost",
];

/// Headers with which some frameworks (Express's method-override, Symfony, ASP.NET) run
/// another method than the request's: refused.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// A request Aegis cannot make sense of, or that contradicts its route: answered with a
/// 4xx deny, never an internal error ([`InputError::Route`] aside, which is the platform's
/// misconfiguration and fails the Check).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The CheckRequest carries no HTTP request (not an HTTP ext_authz call).
    #[error("request has no attributes.request.http")]
    NoHttp,
    /// The body's length and the limit it passed, in bytes.
    #[error("body is {0} bytes, over the {1}-byte limit")]
    BodyTooLarge(usize, usize),
    /// The header count and the limit it passed.
    #[error("request has {0} headers, over the limit of {1}")]
    TooManyHeaders(usize, usize),
    /// The headers' total size and the limit it passed, in bytes.
    #[error("request headers are {0} bytes, over the {1}-byte limit")]
    HeadersTooLarge(usize, usize),
    /// The path does not percent-decode to UTF-8.
    #[error("path is not valid percent-encoded UTF-8")]
    MalformedPath,
    /// The path has a dot segment, an encoded slash or backslash, or an empty segment (which one).
    #[error("path is not normalized: {0}")]
    PathNotNormalized(&'static str),
    /// The body claims JSON and does not parse, or repeats a key (the parser's message).
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),
    /// The JSON body nests deeper than `MAX_JSON_DEPTH`.
    #[error("JSON body nests deeper than {MAX_JSON_DEPTH} levels")]
    BodyTooDeep,
    /// The form body is not UTF-8.
    #[error("malformed form body: not UTF-8")]
    MalformedForm,
    /// The body may be cut at Envoy's buffer limit and the route's tool reads it.
    #[error("the body may be cut short (Envoy's buffer limit) and this route's tool reads it")]
    BodyTruncated,
    /// The body of an MCP route is not one well-formed `tools/call` (what is wrong).
    #[error("malformed MCP request: {0}")]
    MalformedMcp(&'static str),
    /// The `content-type` this route's body cannot be read as.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// A method-override header (named) that could make the tool run another method.
    #[error("{0} is refused: the tool might run another method than the policy saw")]
    MethodOverride(&'static str),
    /// A JSON-RPC batch (an array) where one message is expected.
    #[error("a JSON-RPC batch: send one message per request")]
    JsonRpcBatch,
    /// The `tools/call` body names another tool than the route serves.
    #[error("MCP tools/call names {body:?}, the route serves tool {route:?}")]
    McpToolMismatch {
        /// The tool the route serves.
        route: String,
        /// The tool the `tools/call` body names.
        body: String,
    },
    /// The `tools/call` body names another action than the route serves.
    #[error("MCP tools/call names action {body:?}, the route serves {route:?}")]
    McpActionMismatch {
        /// The action the route serves.
        route: String,
        /// The action the `tools/call` body names.
        body: String,
    },
    /// The HTTP method, which the route does not list.
    #[error("method {0} is not served by this route")]
    MethodNotAllowed(String),
    /// On a `verify` route, an `x-aegis-*` label header disagrees with the route.
    #[error("x-aegis-{label} says {claimed:?}, the route says {actual:?}")]
    LabelMismatch {
        /// The label (`tool`, `action` or `resource`).
        label: &'static str,
        /// What the agent's header said.
        claimed: String,
        /// What the route says.
        actual: String,
    },
    /// The `x-aegis-cost` header as sent, which is not a finite number ≥ 0.
    #[error("x-aegis-cost {0:?} is not a finite number ≥ 0")]
    MalformedCost(String),
    /// Envoy's route labels or the catalogue could not give a route.
    #[error(transparent)]
    Route(#[from] RouteError),
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
            InputError::PathNotNormalized(_) => (400, "path_not_normalized"),
            InputError::MalformedJson(_) | InputError::MalformedForm => (400, "malformed_body"),
            InputError::BodyTooDeep => (400, "body_too_deep"),
            InputError::BodyTruncated => (413, "body_truncated"),
            InputError::MalformedMcp(_) => (400, "malformed_mcp_request"),
            InputError::JsonRpcBatch => (400, "jsonrpc_batch_refused"),
            InputError::UnsupportedMediaType(_) => (415, "unsupported_media_type"),
            InputError::MethodOverride(_) => (400, "method_override_refused"),
            InputError::McpToolMismatch { .. } => (403, "mcp_tool_mismatch"),
            InputError::McpActionMismatch { .. } => (403, "mcp_action_mismatch"),
            InputError::MethodNotAllowed(_) => (405, "method_not_allowed"),
            InputError::LabelMismatch { label, .. } => match *label {
                "tool" => (403, "tool_label_mismatch"),
                "action" => (403, "action_label_mismatch"),
                _ => (403, "resource_label_mismatch"),
            },
            InputError::MalformedCost(_) => (400, "malformed_cost"),
            InputError::Route(_) => (500, "route_misconfigured"),
        }
    }
}

/// Where the tool and action the policy sees came from (`input.tool.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolSource {
    /// Envoy's per-route labels.
    RouteLabels,
    /// The bundle's route catalogue.
    Catalogue,
    /// The MCP body, on a route declared MCP.
    McpBody,
    /// On no known route: no tool.
    #[default]
    None,
}

impl ToolSource {
    /// The name the policy and the audit log see (`input.tool.source`).
    pub fn as_str(self) -> &'static str {
        match self {
            ToolSource::RouteLabels => "route_labels",
            ToolSource::Catalogue => "catalogue",
            ToolSource::McpBody => "mcp_body",
            ToolSource::None => "none",
        }
    }
}

/// The tool call a request makes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tool {
    /// The tool's name (`input.tool.name`), from the route or the MCP body; empty on no known
    /// route.
    pub name: String,
    /// What the call does with the tool (`input.tool.action`): the route's action, else from
    /// the method or the MCP body.
    pub action: String,
    /// The call's arguments: the MCP `tools/call` arguments or a JSON object body, else an
    /// empty object.
    pub arguments: Value,
    /// What the call acts on: the route's resource, else the request path.
    pub resource: String,
    /// The route's name (may be empty).
    pub route: String,
    /// Where the tool was found.
    pub source: ToolSource,
}

/// Where the call came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// `untrusted…` if the agent said so in `x-aegis-trust-level`, else `unspecified`.
    pub trust_level: String,
    /// The agent's run id (`x-aegis-run-id`; empty if not sent).
    pub run_id: String,
    /// The agent that started this one (`x-aegis-parent-agent`; empty if not sent).
    pub parent_agent: String,
}

/// The decoded request: everything later steps read, parsed once.
#[derive(Debug)]
pub struct Decoded<'a> {
    /// The HTTP request Envoy sent, as received.
    pub http: &'a HttpRequest,
    /// The headers by lower-case name (Envoy's `headers`, or built from its `header_map`).
    pub headers: Cow<'a, HashMap<String, String>>,
    /// The path's segments, percent-decoded (`input.parsed_path`).
    pub parsed_path: Vec<String>,
    /// The query, each key with its list of values (`input.parsed_query`).
    pub parsed_query: Map<String, Value>,
    /// The JSON or form body; null when absent, of another type or truncated.
    pub parsed_body: Value,
    /// The body Envoy sent may be partial (its buffer limit).
    pub truncated_body: bool,
    /// The tool call, from the route.
    pub tool: Tool,
    /// The request is one MCP message on a route declared MCP.
    pub mcp: bool,
    /// Where the call came from, as the agent's headers say.
    pub context: CallContext,
    /// The call's cost for budgets: the route's, or the agent's `x-aegis-cost` if higher.
    pub cost: f64,
}

impl Decoded<'_> {
    /// A request header by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What the platform configured that a decode needs: Envoy's per-route labels and the
/// bundle's route catalogue.
#[derive(Debug, Clone, Copy)]
pub struct RouteConfig<'a> {
    /// Envoy's per-route labels (`x-aegis-*` metadata on the route).
    pub extensions: &'a HashMap<String, String>,
    /// The bundle's route catalogue, used when Envoy sends no labels.
    pub catalogue: &'a Catalogue,
}

impl<'a> RouteConfig<'a> {
    /// The labels Envoy sent with `req` (none without attributes), and `catalogue`.
    pub fn of(
        req: &'a envoy_types::ext_authz::v3::pb::CheckRequest,
        catalogue: &'a Catalogue,
    ) -> Self {
        static NONE: std::sync::LazyLock<HashMap<String, String>> =
            std::sync::LazyLock::new(HashMap::new);
        Self {
            extensions: req
                .attributes
                .as_ref()
                .map_or(&NONE, |a| &a.context_extensions),
            catalogue,
        }
    }
}

/// Decodes the HTTP request: limits, path, route, body, tool and context.
pub fn decode<'a>(
    http: Option<&'a HttpRequest>,
    routes: RouteConfig<'_>,
    limits: &Limits,
) -> Result<Decoded<'a>, InputError> {
    let http = http.ok_or(InputError::NoHttp)?;
    let headers = decode_headers(http, limits)?;
    decode_with_headers(http, headers, routes, limits)
}

/// [`decode`] with the headers already decoded (the token is read from them first).
pub fn decode_with_headers<'a>(
    http: &'a HttpRequest,
    headers: Cow<'a, HashMap<String, String>>,
    routes: RouteConfig<'_>,
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
    let host = if http.host.is_empty() {
        headers
            .get(":authority")
            .or_else(|| headers.get("host"))
            .map_or("", String::as_str)
    } else {
        http.host.as_str()
    };
    let route = crate::policy::routes::resolve(
        routes.extensions,
        routes.catalogue,
        host,
        &http.method,
        &parsed_path,
    )?;
    if !route.serves(&http.method) {
        return Err(InputError::MethodNotAllowed(http.method.clone()));
    }
    if let Some(h) = METHOD_OVERRIDE_HEADERS
        .iter()
        .find(|h| headers.contains_key(**h))
    {
        // Some frameworks run the method these name instead of the request's.
        return Err(InputError::MethodOverride(h));
    }
    let (parsed_body, truncated_body) = parse_body(&headers, body, &route, limits)?;
    let (tool, mcp) = tool(&route, &parsed_body, body.is_empty(), &http.method, path)?;
    if route.labels == AgentLabels::Verify {
        verify_labels(&headers, &tool)?;
    }
    let get = |k: &str| headers.get(k).cloned().unwrap_or_default();
    let context = CallContext {
        trust_level: trust_level(headers.get("x-aegis-trust-level").map(String::as_str)),
        run_id: get("x-aegis-run-id"),
        parent_agent: get("x-aegis-parent-agent"),
    };
    let claimed_cost = match headers.get("x-aegis-cost").map(|v| v.trim()) {
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
        mcp,
        context,
        cost: route.cost.max(claimed_cost),
    })
}

/// The trust level the policy sees: `unspecified`, unless the agent claims a level
/// starting with `untrusted` — a claim that can only make its own calls stricter.
fn trust_level(claim: Option<&str>) -> String {
    // Envoy joins a repeated header with ",": the strictest value counts
    // (`untrusted_external`, else the first in order), so a second header cannot cancel
    // the first.
    claim
        .unwrap_or("")
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| c.starts_with("untrusted"))
        .min_by(|a, b| (a != "untrusted_external", a).cmp(&(b != "untrusted_external", b)))
        .unwrap_or_else(|| "unspecified".to_owned())
}

/// On a `verify` route, each label header the agent sent must say what the route says.
fn verify_labels(headers: &HashMap<String, String>, tool: &Tool) -> Result<(), InputError> {
    let labels = [
        ("x-aegis-tool", "tool", &tool.name),
        ("x-aegis-action", "action", &tool.action),
        ("x-aegis-resource", "resource", &tool.resource),
    ];
    for (header, name, actual) in labels {
        let Some(claimed) = headers.get(header).map(|v| v.trim()) else {
            continue;
        };
        if claimed != actual {
            return Err(InputError::LabelMismatch {
                label: name,
                claimed: claimed.to_owned(),
                actual: actual.clone(),
            });
        }
    }
    Ok(())
}
/// The input document for an identified agent, with its status and risk tier as the
/// control plane has them: the parts `reads` names (the bundle's, see
/// [`crate::policy::reads`]; [`crate::policy::reads::ALL`] for the whole document).
pub fn build(
    attributes: Option<&AttributeContext>,
    d: &Decoded<'_>,
    claims: &Claims,
    known: &AgentContext,
    reads: &Reads,
) -> regorus::Value {
    use super::protojson::{Obj, json_to_rego_within, map_to_rego};
    use regorus::Value as R;
    let strings = |v: &[String]| R::from(v.iter().map(|s| R::from(s.as_str())).collect::<Vec<_>>());
    let mut doc = Obj::reading(reads);
    doc.put_with("attributes", |r| {
        attributes.map_or_else(R::new_object, |a| super::protojson::attributes(a, r))
    })
    .put_with("parsed_path", |_| strings(&d.parsed_path))
    .put_with("parsed_query", |r| map_to_rego(&d.parsed_query, r))
    .put_with("parsed_body", |r| json_to_rego_within(&d.parsed_body, r))
    .put_with("truncated_body", |_| R::from(d.truncated_body))
    .put_with("version", |r| {
        let mut version = Obj::reading(r);
        version
            .put_str("encoding", "protojson")
            .put_str("ext_authz", "v3");
        version.build()
    })
    .put_with("agent", |r| {
        let mut agent = Obj::reading(r);
        agent
            .put_with("id", |_| R::from(claims.sub.as_str()))
            .put_with("tenant", |_| R::from(claims.tenant.as_str()))
            .put_with("scopes", |_| strings(&claims.scopes))
            .put_with("session", |_| R::from(claims.sid.as_str()))
            .put_with("status", |_| R::from(known.status.as_str()))
            .put_with("risk_tier", |_| R::from(&*known.risk_tier));
        agent.build()
    })
    .put_with("tool", |r| {
        let mut tool = Obj::reading(r);
        tool.put_with("name", |_| R::from(d.tool.name.as_str()))
            .put_with("action", |_| R::from(d.tool.action.as_str()))
            .put_with("arguments", |r| json_to_rego_within(&d.tool.arguments, r))
            .put_with("resource", |_| R::from(d.tool.resource.as_str()))
            .put_with("route", |_| R::from(d.tool.route.as_str()))
            .put_with("source", |_| R::from(d.tool.source.as_str()));
        tool.build()
    })
    .put_with("context", |r| {
        let mut context = Obj::reading(r);
        context
            .put_with("trust_level", |_| R::from(d.context.trust_level.as_str()))
            .put_with("run_id", |_| R::from(d.context.run_id.as_str()))
            .put_with("parent_agent", |_| R::from(d.context.parent_agent.as_str()));
        context.build()
    });
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

fn http_verb(method: &str) -> &'static str {
    match method.to_ascii_uppercase().as_str() {
        "GET" | "HEAD" => "read",
        "POST" => "create",
        "PUT" | "PATCH" => "update",
        "DELETE" => "delete",
        _ => "other",
    }
}

/// The percent-decoded segments of a normalized path. Each raw segment is decoded on its
/// own, so an encoded slash cannot make a new segment; a path Envoy would have normalized
/// (dot segments, `//`, encoded `/` or `\`) means the proxy in front does not normalize,
/// and the tool might see another path than the policy: refused.
fn parse_path(path: &str) -> Result<Vec<String>, InputError> {
    let raw: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = raw.len() - 1;
    let mut out = Vec::with_capacity(raw.len());
    for (i, seg) in raw.iter().enumerate() {
        if seg.contains('\\') {
            return Err(InputError::PathNotNormalized("a backslash"));
        }
        let decoded = percent_encoding::percent_decode_str(seg)
            .decode_utf8()
            .map_err(|_| InputError::MalformedPath)?;
        if decoded.contains(['/', '\\']) {
            return Err(InputError::PathNotNormalized(
                "an encoded slash or backslash",
            ));
        }
        // `..;x` is `..` to servers that strip path parameters (Tomcat) before resolving
        // dot segments.
        let before_params = decoded.split(';').next().unwrap_or("");
        if before_params == "." || before_params == ".." {
            return Err(InputError::PathNotNormalized("a dot segment"));
        }
        if decoded.contains('%') {
            // `%252e` is `%2e` here and `.` to a gateway that decodes once more.
            return Err(InputError::PathNotNormalized("a double-encoded character"));
        }
        if decoded.is_empty() && i != last {
            return Err(InputError::PathNotNormalized("an empty segment (//)"));
        }
        out.push(decoded.into_owned());
    }
    Ok(out)
}

/// The body type a request is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyType {
    Json,
    Form,
    Other,
}

/// The body type a `content-type` names: its essence compared case-insensitively,
/// parameters (`; charset=…`) ignored; `application/*+json` is JSON.
fn media_type(content_type: &str) -> BodyType {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => BodyType::Json,
        "application/x-www-form-urlencoded" => BodyType::Form,
        e if e.starts_with("application/") && e.ends_with("+json") => BodyType::Json,
        _ => BodyType::Other,
    }
}

/// `(parsed_body, truncated_body)`. A route declared MCP takes JSON, a route with a
/// declared body type that type, each only under its own `content-type` (415 otherwise);
/// other routes go by the `content-type` (OPA-Envoy's behaviour). A body that may be cut short is never parsed:
/// on a route whose tool reads the body (MCP, or a declared type) it is refused, elsewhere
/// the policy sees `truncated_body` (the default bundle denies it).
fn parse_body(
    headers: &HashMap<String, String>,
    body: &[u8],
    route: &Route,
    limits: &Limits,
) -> Result<(Value, bool), InputError> {
    let declared = match (route.protocol, route.body) {
        (Protocol::Mcp, _) | (Protocol::Http, Some(BodyKind::Json)) => Some(BodyType::Json),
        (Protocol::Http, Some(BodyKind::Form)) => Some(BodyType::Form),
        (Protocol::Http, None) => None,
    };
    let content_type = headers.get("content-type").map(String::as_str);
    if content_type.is_some_and(|c| c.contains(',')) {
        // Two content-type headers, joined by Envoy: servers disagree on which counts.
        return Err(InputError::UnsupportedMediaType(
            "more than one content-type".into(),
        ));
    }
    let named = content_type.map_or(BodyType::Other, media_type);
    if let Some(d) = declared
        && !body.is_empty()
        && named != d
    {
        // A body one server reads as JSON and another as a form (going by the header)
        // would let the policy and the tool see different calls.
        let want = match d {
            BodyType::Json => "application/json",
            _ => "application/x-www-form-urlencoded",
        };
        return Err(InputError::UnsupportedMediaType(format!(
            "this route takes {want}, the request says {:?}",
            content_type.unwrap_or("")
        )));
    }
    let kind = declared.unwrap_or(named);
    if truncated(headers, body.len(), limits) {
        if declared.is_some() {
            return Err(InputError::BodyTruncated);
        }
        return Ok((Value::Null, true));
    }
    if body.is_empty() {
        return Ok((Value::Null, false));
    }
    let parsed = match kind {
        BodyType::Json => {
            let v = parse_json(body)?;
            // A route whose tool reads its arguments from the body takes an object (an MCP
            // route's message is checked, and refused by name, with the MCP request).
            if declared.is_some() && route.protocol == Protocol::Http && !v.is_object() {
                return Err(InputError::MalformedJson(
                    "this route takes a JSON object".into(),
                ));
            }
            v
        }
        BodyType::Form => {
            let text = std::str::from_utf8(body).map_err(|_| InputError::MalformedForm)?;
            Value::Object(parse_query(text))
        }
        BodyType::Other => Value::Null,
    };
    Ok((parsed, false))
}

/// Whether the body Envoy sent may be only the start of the request's body: Envoy says so
/// (`x-envoy-auth-partial-body: true`), `content-length` promises more, or it is exactly as
/// long as Envoy's buffer and no `content-length` proves it whole (Envoy 1.40 sends a
/// chunked body's first `max_request_bytes` marked as complete when they arrive first).
fn truncated(headers: &HashMap<String, String>, len: usize, limits: &Limits) -> bool {
    let partial = headers
        .get("x-envoy-auth-partial-body")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let declared = headers
        .get("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok());
    let at_limit = limits.envoy_max_request_bytes > 0 && len >= limits.envoy_max_request_bytes;
    partial || declared.is_some_and(|n| n > len) || (at_limit && declared != Some(len))
}

/// JSON as a strict server reads it: one value, nesting bounded, no key with a control
/// character, and no object with two keys equal under Unicode case folding (parsers
/// disagree on which one wins, and Go's matches struct fields that way).
pub fn parse_json(body: &[u8]) -> Result<Value, InputError> {
    use serde::Deserialize as _;
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = StrictJson::deserialize(&mut de).and_then(|v| de.end().map(|()| v.0));
    parsed.map_err(|e| {
        // serde_json stops at its recursion limit; say so rather than "malformed".
        if e.to_string().starts_with("recursion limit exceeded") {
            InputError::BodyTooDeep
        } else {
            InputError::MalformedJson(e.to_string())
        }
    })
}

/// A JSON value parsed with duplicate keys refused.
struct StrictJson(Value);

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictJson)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictJson(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if key.chars().any(char::is_control) {
                return Err(serde::de::Error::custom(format!(
                    "a control character in key {key:?}"
                )));
            }
            // Folded as Go's decoder matches fields: `argumentſ` (U+017F) is `arguments`.
            if !seen.insert(key.to_uppercase().to_lowercase()) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {key:?} (keys are compared ignoring case)"
                )));
            }
            let StrictJson(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// The tool of the call, from its route (and, on an MCP route, its body); and whether the
/// request is an MCP message.
fn tool(
    route: &Route,
    body: &Value,
    body_empty: bool,
    method: &str,
    path: &str,
) -> Result<(Tool, bool), InputError> {
    let source = match route.source {
        RouteSource::None => ToolSource::None,
        RouteSource::Envoy => ToolSource::RouteLabels,
        RouteSource::Catalogue => ToolSource::Catalogue,
    };
    if route.protocol == Protocol::Mcp {
        return Ok((mcp_tool(route, source, body, body_empty, method)?, true));
    }
    let Some(name) = &route.tool else {
        return Ok((
            Tool {
                resource: path.to_owned(),
                arguments: Value::Object(Map::new()),
                route: route.name.clone(),
                ..Tool::default()
            },
            false,
        ));
    };
    let arguments = match body {
        Value::Object(_) => body.clone(),
        _ => Value::Object(Map::new()),
    };
    Ok((
        Tool {
            name: name.clone(),
            action: route
                .action
                .clone()
                .unwrap_or_else(|| http_verb(method).to_owned()),
            arguments,
            resource: route.resource.clone().unwrap_or_else(|| path.to_owned()),
            route: route.name.clone(),
            source,
        },
        false,
    ))
}

/// The tool of an MCP request on an MCP route. `tools/call` names it (`payments.create` or
/// `payments/create`; on a route labelled with a tool, a name without that prefix is the
/// action); other methods are session plumbing, tool `mcp`. A body-less GET or DELETE
/// (the server's event stream, the end of a session) is tool `mcp`, action `http_get` /
/// `http_delete`. Its source is the body's, or `route_source` where the route named it.
fn mcp_tool(
    route: &Route,
    route_source: ToolSource,
    body: &Value,
    body_empty: bool,
    method: &str,
) -> Result<Tool, InputError> {
    let plumbing = |action: String| Tool {
        name: "mcp".into(),
        action,
        arguments: Value::Object(Map::new()),
        resource: String::new(),
        route: route.name.clone(),
        source: ToolSource::McpBody,
    };
    if body_empty {
        return match method.to_ascii_uppercase().as_str() {
            m @ ("GET" | "DELETE") => Ok(plumbing(format!("http_{}", m.to_ascii_lowercase()))),
            _ => Err(InputError::MalformedMcp("an MCP request without a body")),
        };
    }
    let obj = match body {
        Value::Object(o) => o,
        Value::Array(_) => return Err(InputError::JsonRpcBatch),
        _ => {
            return Err(InputError::MalformedMcp(
                "a JSON-RPC message must be an object",
            ));
        }
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(InputError::MalformedMcp("not a JSON-RPC 2.0 message"));
    }
    let method = obj
        .get("method")
        .and_then(Value::as_str)
        .ok_or(InputError::MalformedMcp(
            "JSON-RPC request without a method",
        ))?;
    if method != "tools/call" {
        return Ok(plumbing(method.to_owned()));
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
    let split = full
        .split_once(['.', '/'])
        .filter(|(n, a)| !n.is_empty() && !a.is_empty());
    if split.is_some_and(|(n, _)| n == "mcp") || full == "mcp" {
        // Tool `mcp` is the session plumbing, public by default: not a tool to call.
        return Err(InputError::MalformedMcp(
            "tools/call names the mcp plumbing",
        ));
    }
    let (name, action, source) = match (&route.tool, split) {
        (None, Some((n, a))) => (n.to_owned(), a.to_owned(), ToolSource::McpBody),
        (None, None) => (full.to_owned(), "call".to_owned(), ToolSource::McpBody),
        (Some(t), Some((n, a))) if n == t => (t.clone(), a.to_owned(), route_source),
        (Some(t), Some(_)) => {
            return Err(InputError::McpToolMismatch {
                route: t.clone(),
                body: full.to_owned(),
            });
        }
        (Some(t), None) => (t.clone(), full.to_owned(), route_source),
    };
    if let Some(a) = &route.action
        && *a != action
    {
        return Err(InputError::McpActionMismatch {
            route: a.clone(),
            body: action,
        });
    }
    let resource = route.resource.clone().unwrap_or_else(|| {
        ["resource", "url", "uri", "path"]
            .iter()
            .find_map(|k| arguments.get(*k).and_then(Value::as_str))
            .unwrap_or("")
            .to_owned()
    });
    Ok(Tool {
        name,
        action,
        arguments,
        resource,
        route: route.name.clone(),
        source,
    })
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
            envoy_max_request_bytes: 256,
        }
    }

    #[test]
    fn the_largest_check_request_has_room_for_envoys_body_and_the_headers_twice() {
        let l = limits();
        assert_eq!(
            l.max_check_request_bytes(),
            256 + 2 * 4096 + CHECK_OVERHEAD_BYTES
        );
        let unknown = Limits {
            envoy_max_request_bytes: 0,
            ..l
        };
        assert_eq!(
            unknown.max_check_request_bytes(),
            1024 + 2 * 4096 + CHECK_OVERHEAD_BYTES,
            "max_body_bytes stands in for Envoy's"
        );
    }

    fn catalogue() -> Catalogue {
        let data = regorus::Value::from_json_str(
            r#"{"aegis": {"routes": [
                {"name": "mcp", "methods": ["GET", "POST", "DELETE"], "path": "/mcp", "protocol": "mcp"},
                {"name": "inv-read", "methods": ["GET"], "path": "/invoices/*", "tool": "invoices", "action": "read"},
                {"name": "pay", "methods": ["POST"], "path": "/payments/create", "tool": "payments", "action": "create", "body": "json"},
                {"name": "note", "methods": ["POST"], "path": "/notes", "tool": "notes"}
            ]}}"#,
        )
        .expect("json");
        Catalogue::from_data(&data).expect("catalogue")
    }

    fn req(method: &str, path: &str, ctype: &str, body: &str) -> HttpRequest {
        let mut h = HttpRequest {
            method: method.into(),
            path: path.into(),
            body: body.into(),
            host: "tools.internal".into(),
            ..Default::default()
        };
        if !ctype.is_empty() {
            h.headers.insert("content-type".into(), ctype.into());
        }
        h
    }

    fn with(mut r: HttpRequest, k: &str, v: &str) -> HttpRequest {
        r.headers.insert(k.into(), v.into());
        r
    }

    /// Decodes `r` on the catalogue with Envoy labels `labels`.
    fn decode_on<'a>(
        r: &'a HttpRequest,
        labels: &[(&str, &str)],
        limits: &Limits,
    ) -> Result<Decoded<'a>, InputError> {
        let ext: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let c = catalogue();
        let routes = RouteConfig {
            extensions: &ext,
            catalogue: &c,
        };
        decode(Some(r), routes, limits)
    }

    fn dec(r: &HttpRequest) -> Result<Decoded<'_>, InputError> {
        decode_on(r, &[], &limits())
    }

    const PAY: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"payments.create","arguments":{"amount":5000,"resource":"acct-1"}}}"#;

    #[test]
    fn path_and_query_like_opa_envoy_and_the_tool_from_the_catalogue() {
        let r = req("GET", "/invoices/a%20b?x=1&x=2&y=%2F#frag", "", "");
        let d = dec(&r).expect("decodes");
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
                resource: "/invoices/a%20b".into(),
                route: "inv-read".into(),
                source: ToolSource::Catalogue,
            }
        );
        let root = req("GET", "/", "", "");
        let d = dec(&root).expect("decodes");
        assert_eq!(d.parsed_path, vec![""]);
        assert_eq!(
            (d.tool.name.as_str(), d.tool.source),
            ("", ToolSource::None)
        );
    }

    #[test]
    fn the_agents_labels_are_ignored_or_verified() {
        // Ignored by default: the route names the tool.
        let r = with(
            with(req("GET", "/invoices/1", "", ""), "x-aegis-tool", "mcp"),
            "x-aegis-action",
            "ping",
        );
        let d = dec(&r).expect("decodes");
        assert_eq!(
            (d.tool.name.as_str(), d.tool.action.as_str()),
            ("invoices", "read")
        );
        // On no route, they name nothing.
        let r = with(
            req("DELETE", "/invoices/42", "", ""),
            "x-aegis-tool",
            "invoices",
        );
        assert_eq!(dec(&r).expect("decodes").tool.source, ToolSource::None);
        // Verified: a disagreeing label is named.
        let r = with(req("GET", "/invoices/1", "", ""), "x-aegis-action", "list");
        assert_eq!(
            decode_on(&r, &[("aegis.labels", "verify")], &limits()).err(),
            Some(InputError::LabelMismatch {
                label: "action",
                claimed: "list".into(),
                actual: "read".into()
            })
        );
        let r = with(
            req("GET", "/invoices/1", "", ""),
            "x-aegis-tool",
            "invoices",
        );
        assert!(decode_on(&r, &[("aegis.labels", "verify")], &limits()).is_ok());
        // Route labels win over the catalogue, and limit the methods.
        let r = req("POST", "/invoices/1", "", "");
        let labels = [
            ("aegis.tool", "ledger"),
            ("aegis.action", "read"),
            ("aegis.methods", "GET,HEAD"),
        ];
        assert_eq!(
            decode_on(&r, &labels, &limits()).err(),
            Some(InputError::MethodNotAllowed("POST".into()))
        );
        let r = req("GET", "/invoices/1", "", "");
        let d = decode_on(&r, &labels, &limits()).expect("decodes");
        assert_eq!(
            (d.tool.name.as_str(), d.tool.source),
            ("ledger", ToolSource::RouteLabels)
        );
    }

    #[test]
    fn claims_are_believed_only_where_they_make_the_call_stricter() {
        let r = with(
            req("GET", "/invoices/1", "", ""),
            "x-aegis-trust-level",
            "trusted",
        );
        assert_eq!(dec(&r).expect("decodes").context.trust_level, "unspecified");
        let r = with(
            req("GET", "/invoices/1", "", ""),
            "x-aegis-trust-level",
            "untrusted_external",
        );
        assert_eq!(
            dec(&r).expect("decodes").context.trust_level,
            "untrusted_external"
        );
        // A repeated header cannot cancel the claim, nor can case.
        for claim in [
            "untrusted_external,trusted",
            "trusted, untrusted_external",
            "Untrusted_External",
        ] {
            let r = with(
                req("GET", "/invoices/1", "", ""),
                "x-aegis-trust-level",
                claim,
            );
            assert_eq!(
                dec(&r).expect("decodes").context.trust_level,
                "untrusted_external",
                "{claim}"
            );
        }
        let r = with(req("GET", "/invoices/1", "", ""), "x-aegis-cost", "0.5");
        assert_eq!(
            decode_on(&r, &[("aegis.cost", "2")], &limits())
                .expect("ok")
                .cost,
            2.0
        );
        let r = with(req("GET", "/invoices/1", "", ""), "x-aegis-cost", "7");
        assert_eq!(
            decode_on(&r, &[("aegis.cost", "2")], &limits())
                .expect("ok")
                .cost,
            7.0
        );
    }

    #[test]
    fn mcp_tools_call_only_on_an_mcp_route() {
        let r = req("POST", "/mcp", "application/json", PAY);
        let d = dec(&r).expect("decodes");
        assert_eq!(
            (d.tool.name.as_str(), d.tool.action.as_str()),
            ("payments", "create")
        );
        assert_eq!(d.tool.resource, "acct-1");
        assert_eq!(d.tool.source, ToolSource::McpBody);
        assert!(d.mcp);
        assert_eq!(
            d.tool.arguments,
            json!({"amount": 5000, "resource": "acct-1"})
        );
        // A JSON-RPC body elsewhere names nothing: the route does.
        let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping","amount":5000}"#;
        let r = req("POST", "/payments/create", "application/json", ping);
        let d = dec(&r).expect("decodes");
        assert_eq!(
            (d.tool.name.as_str(), d.tool.action.as_str()),
            ("payments", "create")
        );
        assert!(!d.mcp);
        assert_eq!(d.tool.arguments["amount"], json!(5000));
        // Media types are case-insensitive, with parameters; an MCP route takes JSON only.
        for ctype in ["Application/JSON", "application/json; charset=UTF-8"] {
            let r = req("POST", "/mcp", ctype, PAY);
            let d = dec(&r).expect(ctype);
            assert_eq!(d.tool.name, "payments", "{ctype}");
        }
        for ctype in ["text/plain", "", "application/json, text/plain"] {
            let r = req("POST", "/mcp", ctype, PAY);
            assert!(
                matches!(dec(&r), Err(InputError::UnsupportedMediaType(_))),
                "{ctype}"
            );
        }
        // A route labelled with a tool: the body picks an action of that tool only.
        let labels = [("aegis.protocol", "mcp"), ("aegis.tool", "invoices")];
        let r = req("POST", "/x", "application/json", PAY);
        assert_eq!(
            decode_on(&r, &labels, &limits()).err(),
            Some(InputError::McpToolMismatch {
                route: "invoices".into(),
                body: "payments.create".into()
            })
        );
        let read = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read"}}"#;
        let r = req("POST", "/x", "application/json", read);
        let d = decode_on(&r, &labels, &limits()).expect("decodes");
        assert_eq!(
            (d.tool.name.as_str(), d.tool.action.as_str()),
            ("invoices", "read")
        );
        assert_eq!(d.tool.source, ToolSource::RouteLabels);
        // Session plumbing and the event stream.
        let r = req("GET", "/mcp", "", "");
        let d = dec(&r).expect("decodes");
        assert_eq!(
            (d.tool.name.as_str(), d.tool.action.as_str()),
            ("mcp", "http_get")
        );
    }

    #[test]
    fn mcp_messages_a_strict_server_would_not_take_are_refused() {
        let cases: [(&str, InputError); 6] = [
            (
                r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"payments.create"}}]"#,
                InputError::JsonRpcBatch,
            ),
            (
                "\"tools/call\"",
                InputError::MalformedMcp("a JSON-RPC message must be an object"),
            ),
            (
                r#"{"id":1,"method":"ping"}"#,
                InputError::MalformedMcp("not a JSON-RPC 2.0 message"),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"tools/call","params":{}}"#,
                InputError::MalformedMcp("tools/call without params.name"),
            ),
            (
                "",
                InputError::MalformedMcp("an MCP request without a body"),
            ),
            ("not json", InputError::MalformedJson(String::new())),
        ];
        for (body, want) in cases {
            let r = req("POST", "/mcp", "application/json", body);
            let got = dec(&r).err();
            match (&got, &want) {
                (Some(InputError::MalformedJson(_)), InputError::MalformedJson(_)) => {}
                _ => assert_eq!(got.as_ref(), Some(&want), "{body}"),
            }
        }
        // Two "method" keys, or two that differ only in case (Unicode case, as Go folds
        // it: ſ is s), or a key with a control character: which one a server takes
        // depends on its parser.
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"payments.create","arguments":{"amount":5},"argumentſ":{"amount":5000}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"invoices.read","params\u0000":{"name":"payments.create"}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"payments.create"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"payments.create"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"invoices.read","NAME":"payments.create"}}"#,
        ] {
            let r = req("POST", "/mcp", "application/json", body);
            assert!(
                matches!(dec(&r), Err(InputError::MalformedJson(ref m)) if m.contains("key")),
                "{body}: {:?}",
                dec(&r).err()
            );
        }
    }

    #[test]
    fn paths_that_were_not_normalized_are_refused() {
        for path in [
            "/invoices/../payments/1",
            "/invoices/%2e%2e/payments/1",
            "/invoices/%2E%2E/payments/1",
            "/invoices/..%2Fpayments/1",
            "/invoices/1%2F..%2F..%2Fpayments",
            "/invoices/.",
            "/invoices//1",
            "//invoices/1",
            "/invoices/1%5C..",
            "/invoices\\..\\payments",
            "/invoices/..;/payments/1",
            "/invoices/%2e%2e;x/payments/1",
            "/invoices/.;/1",
            "/invoices/%252e%252e/payments/1",
        ] {
            let r = req("GET", path, "", "");
            assert!(
                matches!(dec(&r), Err(InputError::PathNotNormalized(_))),
                "{path}: {:?}",
                dec(&r).err()
            );
        }
        let r = req("GET", "/invoices/", "", "");
        assert!(dec(&r).is_ok(), "a trailing slash is not a bypass");
    }

    #[test]
    fn a_body_past_the_depth_limit_is_refused_as_too_deep() {
        let limits = Limits {
            max_body_bytes: 1 << 20,
            envoy_max_request_bytes: 0,
            ..limits()
        };
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH + 1),
            "]".repeat(MAX_JSON_DEPTH + 1)
        );
        let r = req("POST", "/x", "application/json", &deep);
        let err = decode_on(&r, &[], &limits).err();
        assert_eq!(err, Some(InputError::BodyTooDeep));
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH - 1),
            "]".repeat(MAX_JSON_DEPTH - 1)
        );
        let r = req("POST", "/x", "application/json", &ok);
        assert!(decode_on(&r, &[], &limits).is_ok());
    }

    #[test]
    fn bodies_json_form_malformed_truncated() {
        let form = req(
            "POST",
            "/x",
            "Application/X-WWW-Form-Urlencoded; charset=utf-8",
            "a=1&b=two+words",
        );
        assert_eq!(
            dec(&form).expect("form").parsed_body,
            json!({"a": ["1"], "b": ["two words"]})
        );
        let bad = req("POST", "/x", "application/json", "{\"a\":");
        assert!(matches!(dec(&bad), Err(InputError::MalformedJson(_))));
        let bad = req("POST", "/x", "application/vnd.api+json", "{\"a\":");
        assert!(matches!(dec(&bad), Err(InputError::MalformedJson(_))));
        // A declared JSON route takes JSON said to be JSON: a body a server going by the
        // content-type would read as a form is refused, as is a JSON body not an object.
        let pay = req(
            "POST",
            "/payments/create",
            "application/json",
            r#"{"amount":5000}"#,
        );
        assert_eq!(
            dec(&pay).expect("json").tool.arguments,
            json!({"amount": 5000})
        );
        for (ctype, body) in [
            (
                "application/x-www-form-urlencoded",
                r#"{"memo":"&amount=5000&x=","amount":5}"#,
            ),
            ("text/plain", r#"{"amount":5000}"#),
        ] {
            let r = req("POST", "/payments/create", ctype, body);
            assert!(
                matches!(dec(&r), Err(InputError::UnsupportedMediaType(_))),
                "{ctype}"
            );
        }
        for body in [r#"[{"amount":5000}]"#, r#""&amount=5000&""#, "5000"] {
            let r = req("POST", "/payments/create", "application/json", body);
            assert!(
                matches!(dec(&r), Err(InputError::MalformedJson(_))),
                "{body}"
            );
        }

        let cut = with(
            req("POST", "/x", "application/json", "{\"a\":"),
            "content-length",
            "100",
        );
        let d = dec(&cut).expect("truncated is not an error here");
        assert!(d.truncated_body);
        assert_eq!(d.parsed_body, Value::Null);
        let big = req("POST", "/x", "application/json", &"1".repeat(2000));
        assert_eq!(dec(&big).err(), Some(InputError::BodyTooLarge(2000, 1024)));
    }

    #[test]
    fn a_body_of_exactly_envoys_limit_is_whole_only_with_proof() {
        let form = format!("a={}", "x".repeat(254));
        assert_eq!(form.len(), limits().envoy_max_request_bytes);
        // Envoy marked it complete, but nothing proves it.
        let r = with(
            req("POST", "/x", "application/x-www-form-urlencoded", &form),
            "x-envoy-auth-partial-body",
            "false",
        );
        let d = dec(&r).expect("decodes");
        assert!(d.truncated_body);
        assert_eq!(d.parsed_body, Value::Null);
        // A content-length that says exactly this much proves it.
        let r = with(r, "content-length", &form.len().to_string());
        assert!(!dec(&r).expect("decodes").truncated_body);
        // On a route whose tool reads the body, a possibly cut body is refused outright.
        let pay = format!(r#"{{"amount":1,"memo":"{}"}}"#, "x".repeat(256 - 22));
        assert_eq!(pay.len(), 256);
        let r = req("POST", "/payments/create", "application/json", &pay);
        assert_eq!(dec(&r).err(), Some(InputError::BodyTruncated));
        let r = with(
            req("POST", "/mcp", "application/json", PAY),
            "x-envoy-auth-partial-body",
            "true",
        );
        assert_eq!(dec(&r).err(), Some(InputError::BodyTruncated));
    }

    #[test]
    fn method_overrides_and_calls_of_the_mcp_plumbing_are_refused() {
        for h in METHOD_OVERRIDE_HEADERS {
            let r = with(req("POST", "/invoices/1", "", ""), h, "DELETE");
            assert_eq!(dec(&r).err(), Some(InputError::MethodOverride(h)));
        }
        for name in ["mcp.ping", "mcp/initialize", "mcp"] {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}"}}}}"#
            );
            let r = req("POST", "/mcp", "application/json", &body);
            assert_eq!(
                dec(&r).err(),
                Some(InputError::MalformedMcp(
                    "tools/call names the mcp plumbing"
                )),
                "{name}"
            );
        }
    }
}
