//! Fuzz harnesses: what each `fuzz/` target runs on one input. They live in the library
//! so that the ordinary build type-checks and lints them, and `tests/fuzz_corpus.rs`
//! replays the checked-in corpus through them on every test run. A harness returns
//! normally on any input; a panic, an abort or a hang is the bug the fuzzer looks for.
//!
//! - [`check_input`]: bytes as a protobuf `CheckRequest`, and as a request Envoy could
//!   send (path, content type, body, header), through the input builder: header and
//!   body limits, path and query parsing, JSON/form/MCP bodies, the OPA-Envoy document.
//! - [`token`]: bytes as an agent token through parsing, signature and claim checks.
//! - [`bundle`]: bytes as an OPA bundle `.tar.gz`, and as one Rego module, through the
//!   bundle loader and the compiler.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use prost::Message;

use crate::check::input::{self, Limits};
use crate::identity::{Audience, Claims, Identifier, KeyRing, Revocations, TokenPolicy};
use crate::policy::reads::Reads;
use crate::policy::{BundleFiles, CompiledBundle, PolicyOptions};

/// Unix time the token harness verifies at (inside the corpus tokens' lifetime).
pub const TOKEN_NOW: i64 = 1_800_000_000;

/// The fixed key the token corpus is signed with (seed of 32 × 7), so that seeds can
/// reach past the signature check.
pub fn corpus_signer() -> crate::keys::Signer {
    crate::keys::Signer::new(ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]))
}

/// Claims of the corpus tokens.
pub fn corpus_claims() -> Claims {
    Claims {
        iss: "aegis".into(),
        aud: Audience::One("aegis-sidecar".into()),
        sub: "billing-bot".into(),
        tenant: "acme".into(),
        scopes: vec!["invoices:read".into()],
        sid: "s1".into(),
        jti: "j1".into(),
        iat: TOKEN_NOW - 10,
        nbf: TOKEN_NOW - 10,
        exp: TOKEN_NOW + 600,
    }
}

const LIMITS: Limits = Limits {
    max_body_bytes: 64 * 1024,
    max_headers: 64,
    max_header_bytes: 16 * 1024,
    envoy_max_request_bytes: 1024,
};

/// One CheckRequest through the input builder.
pub fn check_input(data: &[u8]) {
    if let Ok(req) = CheckRequest::decode(data) {
        build(&req);
    }
    // The same bytes as the parts of an HTTP request, split at NUL bytes.
    let mut parts = data.splitn(4, |b| *b == 0);
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let (path, ctype, body, header) = (
        text(parts.next()),
        text(parts.next()),
        text(parts.next()),
        text(parts.next()),
    );
    let mut http = HttpRequest {
        method: "POST".into(),
        path,
        body,
        ..Default::default()
    };
    http.headers.insert("content-type".into(), ctype);
    http.headers.insert("x-aegis-tool".into(), header.clone());
    http.headers
        .insert("x-aegis-trust-level".into(), header.clone());
    // Once on an MCP route whose labels verify the agent's, once with the fuzzed labels.
    let mut req = crate::testkit::check_request(http);
    if let Some(a) = req.attributes.as_mut() {
        a.context_extensions
            .insert("aegis.protocol".into(), "mcp".into());
        a.context_extensions
            .insert("aegis.labels".into(), "verify".into());
    }
    build(&req);
    if let Some(a) = req.attributes.as_mut() {
        a.context_extensions.clear();
        a.context_extensions.insert("aegis.tool".into(), header);
    }
    build(&req);
}

fn build(req: &CheckRequest) {
    let http = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    static DEFAULT: OnceLock<(crate::policy::routes::Catalogue, Reads)> = OnceLock::new();
    let (catalogue, reads) = DEFAULT.get_or_init(default_bundle);
    let routes = input::RouteConfig::of(req, catalogue);
    if let Ok(decoded) = input::decode(http, routes, &LIMITS) {
        // The whole document, and the part the default bundle reads.
        for reads in [&crate::policy::reads::ALL, reads] {
            let _ = input::build(
                req.attributes.as_ref(),
                &decoded,
                &corpus_claims(),
                &crate::dataplane::state::AgentContext::unregistered(),
                reads,
            );
        }
    }
}

/// The default bundle's route catalogue, and what it reads of the input.
fn default_bundle() -> (crate::policy::routes::Catalogue, Reads) {
    let opts = PolicyOptions {
        query: "data.aegis.authz.decision".into(),
        eval_timeout: Duration::from_millis(50),
        eval_threads: 0,
        verification_keys: Vec::new(),
    };
    BundleFiles::read(&crate::policy::BundleSource::Embedded)
        .ok()
        .and_then(|f| f.parse().ok())
        .and_then(|p| CompiledBundle::compile_interpreter(p, &opts).ok())
        .map(|b| (b.routes().clone(), b.reads().clone()))
        .unwrap_or_default()
}

/// One agent token through verification.
pub fn token(data: &[u8]) {
    static IDENTIFIER: OnceLock<Identifier> = OnceLock::new();
    let id = IDENTIFIER.get_or_init(|| {
        let mut keys = KeyRing::default();
        keys.insert(corpus_signer().verifying_key());
        let policy = TokenPolicy {
            issuer: "aegis".into(),
            audience: "aegis-sidecar".into(),
            leeway_secs: 30,
            max_bytes: 8192,
            max_lifetime_secs: 86_400,
        };
        Identifier::new(keys, policy, Arc::new(Revocations::default()), 64)
    });
    if let Ok(t) = std::str::from_utf8(data) {
        let _ = id.identify(t, TOKEN_NOW);
    }
}

/// One bundle through the loader and the compiler.
pub fn bundle(data: &[u8]) {
    let opts = PolicyOptions {
        query: "data.aegis.authz.decision".into(),
        eval_timeout: Duration::from_millis(50),
        eval_threads: 0,
        verification_keys: Vec::new(),
    };
    let label = std::path::Path::new("fuzz.tar.gz");
    if let Ok(files) = BundleFiles::from_archive(label, data)
        && let Ok(parsed) = files.parse()
    {
        let _ = CompiledBundle::compile(parsed, &opts);
    }
    let module = BundleFiles::from_files(vec![("aegis/authz.rego".into(), data.to_vec())]);
    if let Ok(parsed) = module.parse() {
        let _ = CompiledBundle::compile(parsed, &opts);
    }
}
