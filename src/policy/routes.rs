//! Routes: which tool a request calls, from what the platform team configured.
//!
//! The agent is the party being checked, so the tool and action the policy sees never come
//! from what the agent says about its own call. They come, in this order, from:
//!
//! 1. the route's labels: Envoy's per-route `ExtAuthzPerRoute`
//!    `check_settings.context_extensions` (keys `aegis.*`, [`LABEL_KEYS`]), which the agent
//!    cannot set;
//! 2. the bundle's route catalogue, `data.aegis.routes`: host + method + path pattern →
//!    tool and action, first match wins;
//! 3. on a route declared MCP (`protocol: mcp`), the JSON-RPC `tools/call` body, parsed by
//!    [`crate::check::input`] the strict way the tool's server may parse it.
//!
//! Labels that name a tool or declare MCP define the route on their own; other labels
//! (`aegis.labels`, `aegis.cost`, `aegis.body`, …) refine a catalogue route, so that a
//! virtual host can set them for every route beneath it. A request neither names is on
//! no route: its tool is empty and the default bundle denies it (`unknown_route`).

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;

/// The `context_extensions` keys Aegis reads; any other `aegis.*` key is a configuration
/// error (a typo must not silently drop a label).
pub const LABEL_KEYS: [&str; 9] = [
    "aegis.route",
    "aegis.tool",
    "aegis.action",
    "aegis.resource",
    "aegis.protocol",
    "aegis.methods",
    "aegis.body",
    "aegis.labels",
    "aegis.cost",
];

/// How the route's tool server reads the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Plain HTTP: the tool is the route's.
    #[default]
    Http,
    /// MCP over HTTP: one JSON-RPC message per POST, the tool in a `tools/call` body.
    Mcp,
}

/// A body type the route declares: a body must say it is of that type (`content-type`)
/// and parse as it, else it is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`: parsed as JSON, duplicate keys refused.
    Json,
    /// `application/x-www-form-urlencoded`: parsed as a form.
    Form,
}

/// What to do with the `x-aegis-tool` / `x-aegis-action` / `x-aegis-resource` headers an
/// agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentLabels {
    /// Not read (the default): the route alone names the tool.
    #[default]
    Ignore,
    /// Compared with what the route says; a header that disagrees is denied
    /// (`tool_label_mismatch`, `action_label_mismatch`, `resource_label_mismatch`).
    Verify,
}

/// Where a route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteSource {
    /// No label and no catalogue entry: the request is on no known route.
    #[default]
    None,
    /// Envoy's per-route labels.
    Envoy,
    /// The bundle's route catalogue.
    Catalogue,
}

/// What the platform team configured for the route a request took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    /// The route's name, for the audit row and `input.tool.route` (may be empty).
    pub name: String,
    /// Which configuration the route came from.
    pub source: RouteSource,
    /// The tool; `None` on an MCP route that serves many tools (the body names it).
    pub tool: Option<String>,
    /// The action; `None`: from the method (GET/HEAD read, POST create, PUT/PATCH update,
    /// DELETE delete), or from the MCP body.
    pub action: Option<String>,
    /// The resource; `None`: the request path (or the MCP call's argument).
    pub resource: Option<String>,
    /// HTTP, or MCP (the tool comes from the `tools/call` body).
    pub protocol: Protocol,
    /// Methods the route serves, upper case; empty: any. Another method is denied
    /// (`method_not_allowed`).
    pub methods: Vec<String>,
    /// The body type the route declares, if any; `None`: the body is not read.
    pub body: Option<BodyKind>,
    /// Whether the agent's `x-aegis-*` label headers are ignored or compared.
    pub labels: AgentLabels,
    /// The cost of one call for budgets; an agent's `x-aegis-cost` may only raise it.
    pub cost: f64,
}

/// A route label or catalogue entry that cannot be used: the platform's configuration is
/// wrong, not the agent's request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A label key (named) that Aegis does not know: a typo in the platform's configuration.
    #[error("unknown route label {0:?} in context_extensions (known: {known})", known = LABEL_KEYS.join(", "))]
    UnknownLabel(String),
    /// A label whose value cannot be used.
    #[error("route label {key}={value:?}: {message}")]
    BadLabel {
        /// The label's key.
        key: &'static str,
        /// Its value, as configured.
        value: String,
        /// What is wrong with it.
        message: &'static str,
    },
}

impl Route {
    /// Whether the route names a tool, or hands the choice to an MCP body.
    pub fn is_known(&self) -> bool {
        self.source != RouteSource::None
    }

    /// Whether the route serves `method` (any, when it names none).
    pub fn serves(&self, method: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }
}

// === Envoy's per-route labels ===

/// The `aegis.*` labels of one request, as Envoy sent them.
#[derive(Debug, Default, PartialEq)]
struct Labels<'a> {
    route: Option<&'a str>,
    tool: Option<&'a str>,
    action: Option<&'a str>,
    resource: Option<&'a str>,
    protocol: Option<Protocol>,
    methods: Option<Vec<String>>,
    body: Option<BodyKind>,
    labels: Option<AgentLabels>,
    cost: Option<f64>,
}

impl<'a> Labels<'a> {
    fn parse(ext: &'a HashMap<String, String>) -> Result<Self, RouteError> {
        let mut l = Labels::default();
        for (key, value) in ext {
            let Some(known) = LABEL_KEYS.iter().find(|k| **k == key.as_str()) else {
                if key.to_ascii_lowercase().starts_with("aegis.") {
                    return Err(RouteError::UnknownLabel(key.clone()));
                }
                continue; // another ext_authz user's extension
            };
            let bad = |message| RouteError::BadLabel {
                key: known,
                value: value.clone(),
                message,
            };
            let v = value.trim();
            let non_empty = || Some(v).filter(|v| !v.is_empty()).ok_or(bad("empty"));
            match *known {
                "aegis.route" => l.route = Some(v),
                "aegis.tool" => l.tool = Some(non_empty()?),
                "aegis.action" => l.action = Some(non_empty()?),
                "aegis.resource" => l.resource = Some(v),
                "aegis.protocol" => {
                    l.protocol = Some(parse_protocol(v).ok_or(bad("expected http or mcp"))?)
                }
                "aegis.methods" => {
                    l.methods = Some(parse_methods(v.split(',')).ok_or(bad("expected GET,POST,…"))?)
                }
                "aegis.body" => l.body = Some(parse_body(v).ok_or(bad("expected json or form"))?),
                "aegis.labels" => {
                    l.labels = Some(parse_labels(v).ok_or(bad("expected ignore or verify"))?)
                }
                "aegis.cost" => {
                    l.cost = Some(parse_cost(v).ok_or(bad("expected a finite number ≥ 0"))?)
                }
                _ => {}
            }
        }
        if l.action.is_some() && l.tool.is_none() {
            return Err(RouteError::BadLabel {
                key: "aegis.action",
                value: l.action.unwrap_or_default().to_owned(),
                message: "an action needs aegis.tool",
            });
        }
        Ok(l)
    }

    /// Labels that define a route on their own.
    fn define_route(&self) -> bool {
        self.tool.is_some() || self.protocol == Some(Protocol::Mcp)
    }

    /// Lays the labels over `route`.
    fn apply(&self, route: &mut Route) {
        if let Some(v) = self.route {
            route.name = v.to_owned();
        }
        if let Some(v) = self.resource {
            route.resource = Some(v.to_owned());
        }
        if let Some(v) = self.protocol {
            route.protocol = v;
        }
        if let Some(v) = &self.methods {
            route.methods = v.clone();
        }
        if let Some(v) = self.body {
            route.body = Some(v);
        }
        if let Some(v) = self.labels {
            route.labels = v;
        }
        if let Some(v) = self.cost {
            route.cost = v;
        }
    }
}

fn parse_protocol(v: &str) -> Option<Protocol> {
    match v.to_ascii_lowercase().as_str() {
        "http" => Some(Protocol::Http),
        "mcp" => Some(Protocol::Mcp),
        _ => None,
    }
}

fn parse_body(v: &str) -> Option<BodyKind> {
    match v.to_ascii_lowercase().as_str() {
        "json" => Some(BodyKind::Json),
        "form" => Some(BodyKind::Form),
        _ => None,
    }
}

fn parse_labels(v: &str) -> Option<AgentLabels> {
    match v.to_ascii_lowercase().as_str() {
        "ignore" => Some(AgentLabels::Ignore),
        "verify" => Some(AgentLabels::Verify),
        _ => None,
    }
}

fn parse_cost(v: &str) -> Option<f64> {
    v.parse::<f64>().ok().filter(|c| c.is_finite() && *c >= 0.0)
}

/// Method tokens (RFC 9110 `token`), upper-cased; `None` if one is not a token.
fn parse_methods<'s>(items: impl Iterator<Item = &'s str>) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for m in items.map(str::trim) {
        let token = !m.is_empty()
            && m.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return None;
        }
        out.push(m.to_ascii_uppercase());
    }
    Some(out)
}

// === The bundle's route catalogue ===

/// `data.aegis.routes`, compiled once per bundle.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    hosts: Vec<HostPattern>,
    path: Vec<Segment>,
    route: Route,
}

#[derive(Debug, Clone, PartialEq)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one non-empty segment.
    One,
    /// `**`, last only: zero or more segments.
    Rest,
}

/// One catalogue entry as written in the bundle's data.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntrySpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    path: String,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    labels: Option<String>,
    #[serde(default)]
    cost: Option<f64>,
}

impl Catalogue {
    /// The catalogue at `data.aegis.routes` (none there: an empty catalogue). An entry that
    /// cannot be used refuses the bundle, naming the entry and what is wrong with it.
    pub fn from_data(data: &regorus::Value) -> Result<Self, String> {
        let routes = &data["aegis"]["routes"];
        if *routes == regorus::Value::Undefined {
            return Ok(Self::default());
        }
        let json = routes.to_json_str().map_err(|e| e.to_string())?;
        let specs: Vec<EntrySpec> =
            serde_json::from_str(&json).map_err(|e| format!("expected a list of routes: {e}"))?;
        let entries = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| Entry::compile(i, s).map_err(|m| format!("routes[{i}]: {m}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// Entries in the catalogue.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the catalogue has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first entry matching the request's host (port ignored), method and decoded path
    /// segments.
    pub fn find(&self, host: &str, method: &str, segments: &[String]) -> Option<&Route> {
        let host = host_name(host);
        self.entries
            .iter()
            .find(|e| {
                (e.hosts.is_empty() || e.hosts.iter().any(|h| h.matches(&host)))
                    && e.route.serves(method)
                    && path_matches(&e.path, segments)
            })
            .map(|e| &e.route)
    }
}

impl Entry {
    fn compile(i: usize, s: EntrySpec) -> Result<Self, String> {
        let protocol = match s.protocol.as_deref() {
            None => Protocol::Http,
            Some(p) => parse_protocol(p).ok_or(format!("protocol {p:?}: expected http or mcp"))?,
        };
        if s.tool.is_none() && protocol != Protocol::Mcp {
            return Err("needs a tool (or protocol \"mcp\", where the body names it)".into());
        }
        if s.action.is_some() && s.tool.is_none() {
            return Err("an action needs a tool".into());
        }
        let non_empty = |what: &str, v: Option<String>| match v {
            Some(v) if v.trim().is_empty() => Err(format!("{what} is empty")),
            other => Ok(other),
        };
        let methods = parse_methods(s.methods.iter().map(String::as_str))
            .ok_or("methods: expected HTTP method names")?;
        let body = match s.body.as_deref() {
            None => None,
            Some(b) => Some(parse_body(b).ok_or(format!("body {b:?}: expected json or form"))?),
        };
        let labels = match s.labels.as_deref() {
            None => AgentLabels::Ignore,
            Some(l) => parse_labels(l).ok_or(format!("labels {l:?}: expected ignore or verify"))?,
        };
        let cost = match s.cost {
            None => 0.0,
            Some(c) if c.is_finite() && c >= 0.0 => c,
            Some(c) => return Err(format!("cost {c}: expected a finite number ≥ 0")),
        };
        let hosts = s
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            hosts,
            path: parse_pattern(&s.path)?,
            route: Route {
                name: s.name.unwrap_or_else(|| format!("routes[{i}]")),
                source: RouteSource::Catalogue,
                tool: non_empty("tool", s.tool)?,
                action: non_empty("action", s.action)?,
                resource: s.resource,
                protocol,
                methods,
                body,
                labels,
                cost,
            },
        })
    }
}

impl HostPattern {
    fn parse(h: &str) -> Result<Self, String> {
        let h = h.trim().to_ascii_lowercase();
        match h.as_str() {
            "" => Err("hosts: an empty host".into()),
            "*" => Ok(Self::Any),
            _ => match h.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                    Ok(Self::Suffix(format!(".{suffix}")))
                }
                _ if h.contains('*') => {
                    Err(format!("hosts: {h:?}: a wildcard only as a leading \"*.\""))
                }
                _ => Ok(Self::Exact(h)),
            },
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(h) => h == host,
            Self::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

/// The host name of an `:authority`, lower case, without its port.
fn host_name(authority: &str) -> Cow<'_, str> {
    let name = if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    // `a.example.` is `a.example` to DNS.
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

fn parse_pattern(p: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("path {p:?}: must start with /"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, s)| match *s {
            "**" if i == last => Ok(Segment::Rest),
            "**" => Err(format!("path {p:?}: ** only as the last segment")),
            "*" => Ok(Segment::One),
            "." | ".." => Err(format!("path {p:?}: dot segments never match")),
            s if s.contains('*') => Err(format!("path {p:?}: * only as a whole segment")),
            s => Ok(Segment::Literal(s.to_owned())),
        })
        .collect()
}

fn path_matches(pattern: &[Segment], segments: &[String]) -> bool {
    let mut i = 0;
    for p in pattern {
        match p {
            Segment::Rest => return true,
            Segment::One => match segments.get(i) {
                Some(s) if !s.is_empty() => {}
                _ => return false,
            },
            Segment::Literal(l) => match segments.get(i) {
                Some(s) if s == l => {}
                _ => return false,
            },
        }
        i += 1;
    }
    i == segments.len()
}

// === Resolution ===

/// The route of one request: Envoy's labels, else the first catalogue entry that matches,
/// else no route. `segments` are the request's percent-decoded path segments.
pub fn resolve<'c>(
    extensions: &HashMap<String, String>,
    catalogue: &'c Catalogue,
    host: &str,
    method: &str,
    segments: &[String],
) -> Result<Cow<'c, Route>, RouteError> {
    let labels = Labels::parse(extensions)?;
    let mut route = if labels.define_route() {
        Route {
            source: RouteSource::Envoy,
            tool: labels.tool.map(str::to_owned),
            action: labels.action.map(str::to_owned),
            protocol: labels.protocol.unwrap_or_default(),
            ..Route::default()
        }
    } else {
        match catalogue.find(host, method, segments) {
            Some(r) if labels == Labels::default() => return Ok(Cow::Borrowed(r)),
            Some(r) => r.clone(),
            None => Route::default(),
        }
    };
    labels.apply(&mut route);
    Ok(Cow::Owned(route))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        p.trim_start_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect()
    }

    fn catalogue(json: &str) -> Result<Catalogue, String> {
        let v = regorus::Value::from_json_str(&format!(r#"{{"aegis": {{"routes": {json}}}}}"#))
            .map_err(|e| e.to_string())?;
        Catalogue::from_data(&v)
    }

    #[test]
    fn first_matching_entry_by_host_method_and_path() {
        let c = catalogue(
            r#"[
              {"name": "inv-read", "methods": ["GET", "head"], "path": "/invoices/*", "tool": "invoices", "action": "read"},
              {"name": "inv-list", "methods": ["GET"], "path": "/invoices", "tool": "invoices", "action": "list"},
              {"name": "pay", "hosts": ["*.pay.example"], "methods": ["POST"], "path": "/payments/create", "tool": "payments", "action": "create", "body": "json"},
              {"name": "files", "path": "/files/**", "tool": "files"},
              {"name": "mcp", "methods": ["POST"], "path": "/mcp", "protocol": "mcp"}
            ]"#,
        )
        .expect("compiles");
        let name = |host: &str, m: &str, p: &str| c.find(host, m, &segs(p)).map(|r| r.name.clone());
        assert_eq!(name("t", "GET", "/invoices/42"), Some("inv-read".into()));
        assert_eq!(name("t", "HEAD", "/invoices/42"), Some("inv-read".into()));
        assert_eq!(
            name("t", "DELETE", "/invoices/42"),
            None,
            "method not in the entry"
        );
        assert_eq!(
            name("t", "GET", "/invoices/"),
            None,
            "* needs a non-empty segment"
        );
        assert_eq!(name("t", "GET", "/invoices/42/x"), None);
        assert_eq!(name("t", "GET", "/invoices"), Some("inv-list".into()));
        assert_eq!(
            name("a.pay.example:8443", "POST", "/payments/create"),
            Some("pay".into())
        );
        assert_eq!(
            name("A.PAY.EXAMPLE", "POST", "/payments/create"),
            Some("pay".into())
        );
        assert_eq!(name("pay.example", "POST", "/payments/create"), None);
        assert_eq!(
            name("a.pay.example.", "POST", "/payments/create"),
            Some("pay".into())
        );
        assert_eq!(name("evil.example", "POST", "/payments/create"), None);
        assert_eq!(name("t", "PUT", "/files"), Some("files".into()));
        assert_eq!(name("t", "PUT", "/files/a/b/c"), Some("files".into()));
        assert_eq!(name("t", "POST", "/mcp"), Some("mcp".into()));
        assert_eq!(name("t", "GET", "/payments/1"), None);
        let pay = c
            .find("x.pay.example", "POST", &segs("/payments/create"))
            .expect("pay");
        assert_eq!(pay.body, Some(BodyKind::Json));
        assert_eq!(pay.source, RouteSource::Catalogue);
        assert_eq!(catalogue("[]").expect("empty").len(), 0);
        let none = Catalogue::from_data(&regorus::Value::new_object()).expect("no routes");
        assert!(none.is_empty());
    }

    #[test]
    fn a_bad_entry_refuses_the_bundle_and_says_which() {
        for (json, want) in [
            (r#"[{"path": "/x"}]"#, "routes[0]: needs a tool"),
            (r#"[{"path": "x", "tool": "t"}]"#, "must start with /"),
            (r#"[{"path": "/**/x", "tool": "t"}]"#, "** only as the last"),
            (r#"[{"path": "/a*", "tool": "t"}]"#, "* only as a whole"),
            (r#"[{"path": "/../x", "tool": "t"}]"#, "dot segments"),
            (
                r#"[{"path": "/x", "tool": "t", "protocol": "grpc"}]"#,
                "protocol",
            ),
            (
                r#"[{"path": "/x", "tool": "t", "methods": ["GET /"]}]"#,
                "methods",
            ),
            (
                r#"[{"path": "/x", "tool": "t", "hosts": ["a.*.b"]}]"#,
                "wildcard",
            ),
            (r#"[{"path": "/x", "tool": "t", "cost": -1}]"#, "cost"),
            (
                r#"[{"path": "/x", "tool": "t", "tol": "y"}]"#,
                "unknown field",
            ),
            (r#"[{"path": "/x", "action": "read"}]"#, "needs a tool"),
            (r#"{"path": "/x"}"#, "expected a list"),
        ] {
            let err = catalogue(json).expect_err(json);
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn labels_define_or_refine_a_route() {
        let c = catalogue(
            r#"[{"name": "inv", "methods": ["GET"], "path": "/invoices/*", "tool": "invoices", "action": "read"}]"#,
        )
        .expect("compiles");
        let ext = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let r = |kv: &[(&str, &str)], m: &str, p: &str| resolve(&ext(kv), &c, "t", m, &segs(p));

        // Labels naming a tool win over the catalogue.
        let labelled = r(
            &[("aegis.tool", "payments"), ("aegis.action", "read")],
            "GET",
            "/invoices/1",
        )
        .expect("ok");
        assert_eq!(labelled.source, RouteSource::Envoy);
        assert_eq!(labelled.tool.as_deref(), Some("payments"));
        // No labels: the catalogue.
        let plain = r(&[], "GET", "/invoices/1").expect("ok");
        assert_eq!(
            (plain.source, plain.name.as_str()),
            (RouteSource::Catalogue, "inv")
        );
        // Refining labels keep the catalogue's tool.
        let verify = r(
            &[("aegis.labels", "verify"), ("aegis.cost", "2.5")],
            "GET",
            "/invoices/1",
        )
        .expect("ok");
        assert_eq!(verify.tool.as_deref(), Some("invoices"));
        assert_eq!((verify.labels, verify.cost), (AgentLabels::Verify, 2.5));
        // Neither: no route.
        assert!(!r(&[], "DELETE", "/invoices/1").expect("ok").is_known());
        // An MCP route from labels alone.
        let mcp = r(&[("aegis.protocol", "MCP")], "POST", "/anything").expect("ok");
        assert_eq!((mcp.protocol, mcp.tool.as_deref()), (Protocol::Mcp, None));
        // Other filters' extensions are not Aegis's business.
        assert!(r(&[("team", "x")], "GET", "/invoices/1").is_ok());
        // Misconfiguration is named.
        assert_eq!(
            r(&[("aegis.tol", "x")], "GET", "/").err(),
            Some(RouteError::UnknownLabel("aegis.tol".into()))
        );
        assert_eq!(
            r(&[("Aegis.Tool", "x")], "GET", "/").err(),
            Some(RouteError::UnknownLabel("Aegis.Tool".into()))
        );
        for bad in [
            [("aegis.protocol", "grpc")],
            [("aegis.labels", "trust")],
            [("aegis.cost", "-1")],
            [("aegis.cost", "NaN")],
            [("aegis.methods", "GET /x")],
            [("aegis.action", "read")],
            [("aegis.tool", " ")],
        ] {
            assert!(
                matches!(r(&bad, "GET", "/"), Err(RouteError::BadLabel { .. })),
                "{bad:?}"
            );
        }
    }
}
