//! The input document holds only what the bundle can read (`src/policy/reads.rs`,
//! `input::build`): the policy must still see exactly what the request carried, however it
//! reads it. A part the analysis missed would be absent from the document, and a policy
//! reading it would decide on nothing.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use aegis::policy::{BundleSource, CompiledBundle};
use common::*;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;

/// What the default bundle reads, and so all a Check builds for it. A change to the bundle
/// that reads more shows here; the rest of the document is not built.
#[test]
fn the_default_bundle_reads_ten_parts_of_the_input() {
    let bundle =
        CompiledBundle::load(&BundleSource::Embedded, &policy_options()).expect("default bundle");
    assert_eq!(
        bundle.reads().paths(),
        [
            "input.agent.scopes",
            "input.attributes.request.http.headers",
            "input.context.trust_level",
            "input.parsed_query",
            "input.tool.action",
            "input.tool.arguments.amount",
            "input.tool.arguments.url",
            "input.tool.name",
            "input.tool.source",
            "input.truncated_body",
        ]
    );
}

/// Ways of reading the request: each is served alone in a bundle of its own (a bundle
/// that reads the whole input somewhere is built whole, which would hide a miss elsewhere).
/// Each defines `sees` when it saw what [`request`] carries; the third column is what the
/// analysis must find the bundle reads (`input` alone: the whole document).
const WAYS: &[(&str, &str, &[&str])] = &[
    (
        "import_alias",
        "import input.attributes.source as src\nsees if src.address.socketAddress.address == \"10.1.2.3\"\n",
        &["input.attributes.source"],
    ),
    (
        "bare_input_to_a_builtin",
        "sees if object.get(input, [\"attributes\", \"destination\", \"principal\"], \"\") == \"spiffe://tool\"\n",
        &["input"],
    ),
    (
        "walk_over_input",
        "sees if {\n\tsome v\n\twalk(input, [_, v])\n\tv == \"walked-value\"\n}\n",
        &["input"],
    ),
    (
        "dynamic_key_at_the_root",
        "sees if {\n\tsome k\n\tinput[k].run_id == \"run-7\"\n}\n",
        &["input"],
    ),
    (
        "literal_brackets",
        "sees if input[\"attributes\"][\"request\"][\"http\"][\"method\"] == \"PUT\"\n",
        &["input.attributes.request.http.method"],
    ),
    (
        "function_argument",
        "header_of(http, name) := http.headers[name]\nsees if header_of(input.attributes.request.http, \"x-fn\") == \"fn-value\"\n",
        &["input.attributes.request.http"],
    ),
    (
        "comprehension",
        "sees if count([s | some s in input.parsed_path]) == 2\n",
        &["input.parsed_path"],
    ),
    (
        // Spoiled or unread, the headers fail it: a header starting "spoiled" fails the
        // condition, and a domain missing leaves `every` true for the spoiled request or
        // undefined for the good one.
        "every",
        "sees if every _, v in input.attributes.request.http.headers { not startswith(v, \"spoiled\") }\n",
        &["input.attributes.request.http.headers"],
    ),
    (
        "array_index",
        "sees if input.parsed_path[1] == \"two\"\n",
        &["input.parsed_path.1"],
    ),
    (
        "head_key",
        "keyed[input.parsed_query.q[0]] := 1\nsees if keyed.qv == 1\n",
        &["input.parsed_query.q.0"],
    ),
    (
        "with_value",
        "run_of := input.agent.run_id\nsees if run_of == \"run-7\" with input.agent as input.context\n",
        &["input.agent.run_id", "input.context"],
    ),
    (
        "else_value",
        "host := \"none\" if false\nelse := input.attributes.request.http.host\nsees if host == \"tools.internal\"\n",
        &["input.attributes.request.http.host"],
    ),
    (
        "marshalled_subtree",
        "sees if contains(json.marshal(input.attributes.contextExtensions), \"labelled\")\n",
        &["input.attributes.contextExtensions"],
    ),
    (
        "deep_body_key",
        "sees if input.parsed_body.a.b == 1\n",
        &["input.parsed_body.a.b"],
    ),
    (
        "body_sibling",
        "sees if input.parsed_body.c == [1, 2]\n",
        &["input.parsed_body.c"],
    ),
];

/// A bundle allowing when `way` saw the request, denying with `blind` otherwise.
fn bundle(way: &str) -> String {
    format!(
        "package aegis.authz\nimport rego.v1\n{way}\n\
         decision := {{\"allowed\": true, \"decision\": \"allow\", \"reason\": \"seen\"}} if sees\n\
         else := {{\"allowed\": false, \"decision\": \"deny\", \"reason\": \"blind\", \"http_status\": 403}}\n"
    )
}

/// The request every way in [`WAYS`] looks for, with one part changed by `spoil` (to show
/// each rule can fail).
fn request(token: &str, spoil: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    let pick = |part: &str, good: &'static str, bad: &'static str| {
        if spoil == part { bad } else { good }
    };
    let path = format!(
        "/one/{}?q={}",
        pick("array_index", "two", "three"),
        pick("head_key", "qv", "qx")
    );
    let body = format!(
        r#"{{"a": {{"b": {}}}, "c": {}}}"#,
        pick("deep_body_key", "1", "2"),
        pick("body_sibling", "[1, 2]", "[1]"),
    );
    let mut r = Req::post(&path, "application/json", &body)
        .method(pick("literal_brackets", "PUT", "POST"))
        .token(token)
        .tool("invoices", "read")
        .label(
            "aegis.resource",
            pick("marshalled_subtree", "labelled", "plain"),
        )
        .header("x-walk", pick("walk_over_input", "walked-value", "other"))
        .header("x-fn", pick("function_argument", "fn-value", "other"))
        .header("x-every", pick("every", "fine", "spoiled"))
        .header(
            "x-aegis-run-id",
            if matches!(spoil, "dynamic_key_at_the_root" | "with_value") {
                "run-8"
            } else {
                "run-7"
            },
        )
        .build();
    if spoil == "comprehension" {
        // Three segments: the comprehension counts them, and [1] is still "two".
        let http = r.attributes.as_mut().unwrap().request.as_mut().unwrap();
        let http = http.http.as_mut().unwrap();
        http.path = "/one/two/three?q=qv".into();
    }
    if spoil == "else_value" {
        let http = r.attributes.as_mut().unwrap().request.as_mut().unwrap();
        http.http.as_mut().unwrap().host = "elsewhere".into();
    }
    let a = r.attributes.as_mut().unwrap();
    let socket = |ip: &str| Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
            ..Default::default()
        })),
    };
    a.source = Some(Peer {
        address: Some(socket(pick("import_alias", "10.1.2.3", "10.9.9.9"))),
        ..Default::default()
    });
    a.destination = Some(Peer {
        address: Some(socket("10.0.0.2")),
        principal: pick("bare_input_to_a_builtin", "spiffe://tool", "spiffe://other").into(),
        ..Default::default()
    });
    r
}

/// Through the real server: each way of reading the input, alone in its bundle, is found
/// by the analysis (what the bundle reads, as the server builds it), sees the request, and
/// the same request with that way's part changed is denied (so each rule can fail: none
/// passes by reading nothing).
#[tokio::test]
async fn a_policy_reading_the_input_any_way_it_can_sees_what_the_request_carried() {
    for (way, rego, reads) in WAYS {
        let (_tmp, b) = rego_bundle(&bundle(rego));
        let compiled = CompiledBundle::load(&BundleSource::from_path(&b), &policy_options())
            .expect("the bundle compiles");
        assert_eq!(compiled.reads().paths(), *reads, "{way}");
        let mut s = start_with(|c| c.policy.bundle = Some(b)).await;
        let t = s.token("acme", "reader", &[]);
        let r = s.check(request(&t, "")).await.expect("decided");
        assert_eq!(
            code(&r),
            0,
            "{way}: the policy did not see the request: {r:?}"
        );
        let r = s.check(request(&t, way)).await.expect("decided");
        assert_ne!(code(&r), 0, "{way}: its part changed, and still allowed");
        assert_eq!(reason(&r), Some("blind"), "{way}: its part changed: {r:?}");
        s.stop().await;
    }
}

/// `req` decoded as the server decodes it, against `bundle`'s route catalogue.
fn decode<'r>(
    req: &'r envoy_types::ext_authz::v3::pb::CheckRequest,
    bundle: &CompiledBundle,
) -> aegis::check::input::Decoded<'r> {
    use aegis::check::input::{self, Limits, RouteConfig};
    let limits = Limits {
        max_body_bytes: 65_536,
        max_headers: 100,
        max_header_bytes: 65_536,
        envoy_max_request_bytes: 0,
    };
    let http = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    input::decode(http, RouteConfig::of(req, bundle.routes()), &limits).expect("decodes")
}

/// On the default bundle, the document built for what it reads and the whole document
/// give the same decision: 1,584 evaluations over tools and actions, MCP or plain HTTP
/// (argument sets vary the MCP calls' bodies; a plain call has none), with and without
/// credentials, trust levels and scope sets.
#[test]
fn on_the_default_bundle_the_partial_and_the_whole_document_decide_alike() {
    use aegis::check::input;
    use aegis::dataplane::state::AgentContext;
    use aegis::policy::reads;
    let bundle =
        CompiledBundle::load(&BundleSource::Embedded, &policy_options()).expect("default bundle");
    assert!(!bundle.reads().is_all());
    let tools: &[(&str, &[&str])] = &[
        ("invoices", &["read", "create", "delete_all"]),
        ("payments", &["read", "create", "refund"]),
        ("github", &["read_issue", "push"]),
        ("web_fetch", &["get"]),
        ("slack", &["post_message"]),
        ("shell", &["exec"]),
    ];
    let args = [
        "{}",
        r#"{"amount": 5}"#,
        r#"{"amount": 5000}"#,
        r#"{"amount": "5000"}"#,
        r#"{"url": "https://api.github.com/x"}"#,
        r#"{"url": "https://evil.example/x", "amount": 1}"#,
    ];
    let scopes: &[&[&str]] = &[
        &[],
        &["invoices:read", "payments:create", "payments:read"],
        &[
            "github:read",
            "github:write",
            "web:fetch",
            "slack:post",
            "invoices:write",
        ],
    ];
    let mut verdicts = std::collections::BTreeMap::new();
    for (tool, actions) in tools {
        for action in *actions {
            for a in args {
                for mcp in [false, true] {
                    for creds in [false, true] {
                        for trust in ["internal", "untrusted_external"] {
                            let mut req = aegis::testkit::request("t", tool, action, a, mcp, creds);
                            let http = req.attributes.as_mut().unwrap().request.as_mut().unwrap();
                            let headers = &mut http.http.as_mut().unwrap().headers;
                            headers.insert("x-aegis-trust-level".into(), trust.into());
                            let decoded = decode(&req, &bundle);
                            for s in scopes {
                                let claims = common::claims("acme", "agent", s);
                                let agent = AgentContext::unregistered();
                                let doc = |r| {
                                    input::build(
                                        req.attributes.as_ref(),
                                        &decoded,
                                        &claims,
                                        &agent,
                                        r,
                                    )
                                };
                                let whole = bundle.evaluate(doc(&reads::ALL)).expect("whole");
                                let part = bundle.evaluate(doc(bundle.reads())).expect("part");
                                assert_eq!(
                                    format!("{whole:?}"),
                                    format!("{part:?}"),
                                    "{tool}.{action} {a} mcp={mcp} creds={creds} {trust} {s:?}"
                                );
                                *verdicts.entry(format!("{:?}", whole.verdict)).or_insert(0) += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(verdicts.values().sum::<usize>(), 1_584);
    // The spread covers every verdict the bundle gives, and each often.
    assert_eq!(verdicts.len(), 4, "{verdicts:?}");
    assert!(verdicts.values().all(|&n| n >= 20), "{verdicts:?}");
}

/// The whole document cut down to `reads`: the builders' specification, written apart
/// from them (objects keep the keys read; anything else is whole).
fn project(v: &regorus::Value, reads: &aegis::policy::reads::Reads) -> regorus::Value {
    use aegis::policy::reads::Reads;
    match (reads, v) {
        (Reads::Keys(keys), regorus::Value::Object(o)) => {
            let mut out = regorus::Value::new_object();
            let map = out.as_object_mut().expect("an object");
            for (k, under) in keys {
                let key = regorus::Value::from(k.as_str());
                if let Some(value) = o.get(&key) {
                    map.insert(key, project(value, under));
                }
            }
            out
        }
        _ => v.clone(),
    }
}

/// Every path through the objects of `v`, to `depth` keys.
fn paths(v: &regorus::Value, at: &mut Vec<String>, depth: usize, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    if let (regorus::Value::Object(o), true) = (v, at.len() < depth) {
        for (k, sub) in o.iter() {
            at.push(k.as_string().expect("a string key").to_string());
            paths(sub, at, depth, out);
            at.pop();
        }
    }
}

/// For every path of the whole document of requests that carry every attribute (peers
/// with labels, time, metadata, TLS, a JSON and an MCP body), alone and paired with the
/// next, and for the default bundle's reads: the document built for those reads is the
/// whole one cut down to them. A builder that dropped or renamed a key it was asked for
/// fails here, whatever bundle would read it.
#[test]
fn the_partial_document_is_the_whole_one_cut_to_what_is_read() {
    use aegis::check::input;
    use aegis::dataplane::state::AgentContext;
    use aegis::policy::reads::{self, Reads};
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::TlsSession;
    use envoy_types::pb::google::protobuf::{Struct, Timestamp, Value as PbValue, value::Kind};
    let mut rich = request("t", "");
    let a = rich.attributes.as_mut().unwrap();
    a.source.as_mut().unwrap().labels = [("app".to_owned(), "agent".to_owned())].into();
    a.source.as_mut().unwrap().principal = "spiffe://agent".into();
    a.request.as_mut().unwrap().time = Some(Timestamp {
        seconds: 1_765_000_000,
        nanos: 5,
    });
    let http = a.request.as_mut().unwrap().http.as_mut().unwrap();
    http.query = "q=qv".into();
    http.fragment = "f".into();
    let field = |s: &str| PbValue {
        kind: Some(Kind::StringValue(s.into())),
    };
    a.metadata_context = Some(Metadata {
        filter_metadata: [(
            "envoy.filters.http.jwt_authn".to_owned(),
            Struct {
                fields: [
                    ("sub".to_owned(), field("alice")),
                    ("iss".to_owned(), field("idp")),
                ]
                .into(),
            },
        )]
        .into(),
        ..Default::default()
    });
    a.tls_session = Some(TlsSession {
        sni: "tools.internal".into(),
    });
    let mcp = aegis::testkit::request(
        "t",
        "payments",
        "create",
        r#"{"amount": 5, "url": "https://x.example/", "nested": {"a": [1, {"b": 2}]}}"#,
        true,
        true,
    );
    let bundle =
        CompiledBundle::load(&BundleSource::Embedded, &policy_options()).expect("default bundle");
    let claims = common::claims("acme", "agent", &["invoices:read", "payments:create"]);
    let agent = AgentContext::unregistered();
    let mut compared = 0;
    for req in [rich, mcp] {
        let decoded = decode(&req, &bundle);
        let build = |r: &Reads| input::build(req.attributes.as_ref(), &decoded, &claims, &agent, r);
        let whole = build(&reads::ALL);
        let mut all = Vec::new();
        paths(&whole, &mut Vec::new(), 8, &mut all);
        assert!(all.len() > 50, "{} paths", all.len());
        let mut cases: Vec<Reads> = vec![bundle.reads().clone()];
        for (i, p) in all.iter().enumerate() {
            let mut one = Reads::default();
            one.read(p);
            let mut two = one.clone();
            two.read(&all[(i * 7 + 3) % all.len()]);
            cases.extend([one, two]);
        }
        // A path the document does not have reads nothing, and is not made up.
        let mut absent = Reads::default();
        absent.read(&["attributes".into(), "nowhere".into()]);
        cases.push(absent);
        for r in &cases {
            assert_eq!(build(r), project(&whole, r), "reads {:?}", r.paths());
            compared += 1;
        }
    }
    assert!(compared > 250, "{compared}");
}
