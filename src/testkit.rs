//! Fixtures shared by the benchmark, the fuzz harnesses and the tests: Envoy-shaped
//! CheckRequests, a server started as a child process, the no-op ext_authz server the
//! benchmark compares against, and an OTLP receiver that keeps the spans it is sent.
//! One copy of each, so the bench measures what the tests check.

use anyhow::{Context, anyhow, bail};
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One CheckRequest as Envoy sends it.
pub fn request(
    token: &str,
    tool: &str,
    action: &str,
    args: &str,
    mcp: bool,
    with_credentials: bool,
) -> CheckRequest {
    let mut headers = std::collections::HashMap::new();
    headers.insert(":authority".to_owned(), "tools.internal".to_owned());
    headers.insert("x-aegis-token".to_owned(), token.to_owned());
    headers.insert("x-aegis-run-id".to_owned(), "run-42".to_owned());
    headers.insert("x-aegis-trust-level".to_owned(), "internal".to_owned());
    headers.insert(
        "traceparent".to_owned(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
    );
    if with_credentials {
        headers.insert(
            "authorization".to_owned(),
            "Bearer upstream-secret".to_owned(),
        );
    }
    let (path, body) = if mcp {
        headers.insert("content-type".to_owned(), "application/json".to_owned());
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}.{action}","arguments":{args}}}}}"#
        );
        ("/mcp".to_owned(), body)
    } else {
        (format!("/{tool}/{action}?page=1"), String::new())
    };
    let http = attribute_context::HttpRequest {
        id: "req-1".into(),
        method: if mcp { "POST".into() } else { "GET".into() },
        headers,
        path,
        host: "tools.internal".into(),
        scheme: "http".into(),
        protocol: "HTTP/1.1".into(),
        size: body.len() as i64,
        body,
        ..Default::default()
    };
    let mut req = check_request(http);
    if !mcp && let Some(a) = req.attributes.as_mut() {
        // A plain HTTP call is labelled by its Envoy route, as deploy/envoy.yaml does.
        a.context_extensions
            .insert("aegis.tool".to_owned(), tool.to_owned());
        a.context_extensions
            .insert("aegis.action".to_owned(), action.to_owned());
    }
    req
}

/// Wraps an HTTP request into the CheckRequest Envoy sends.
pub fn check_request(http: attribute_context::HttpRequest) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

/// A server started as a child process (the benchmark's servers, and the tests' `aegis
/// serve` processes); killed when dropped.
#[derive(Debug)]
pub struct ChildServer {
    /// The process (killed when this is dropped).
    pub child: Child,
    /// The address the server announced (its ext_authz or control listener).
    pub addr: SocketAddr,
    /// The stderr lines up to and including the announcing one.
    pub lines: Vec<String>,
}

impl ChildServer {
    /// Spawns this binary with `args` and waits for the line announcing its address.
    pub(crate) fn spawn(args: &[&str], marker: &str) -> anyhow::Result<Self> {
        Self::spawn_exe(&std::env::current_exe()?, args, marker)
    }

    /// Spawns `exe <args>` and waits for a stderr line `…<marker><address>…`.
    pub fn spawn_exe(exe: &std::path::Path, args: &[&str], marker: &str) -> anyhow::Result<Self> {
        Self::spawn_cmd(Command::new(exe), args, &[], marker)
    }

    /// [`Self::spawn_exe`] with a prepared command (environment) and extra OS-string args.
    pub fn spawn_cmd(
        mut cmd: Command,
        args: &[&str],
        more: &[&std::ffi::OsStr],
        marker: &str,
    ) -> anyhow::Result<Self> {
        let mut child = cmd
            .args(args)
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let addr = loop {
            let Some(line) = lines.next() else {
                bail!("{args:?} exited before listening: {}", seen.join("\n"))
            };
            let line = line?;
            seen.push(line.clone());
            if let Some(rest) = line.split(marker).nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("");
                break addr
                    .trim_end_matches(':')
                    .parse::<SocketAddr>()
                    .with_context(|| format!("address in {line:?}"))?;
            }
            if Instant::now() > deadline {
                bail!("{args:?} did not announce its address");
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe; with
        // AEGIS_TEST_CHILD_LOG set, echo it (to see what a child did in a failing test).
        let echo = std::env::var_os("AEGIS_TEST_CHILD_LOG").is_some();
        let pid = child.id();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if echo {
                    eprintln!("[child {pid}] {line}");
                }
            }
        });
        Ok(Self {
            child,
            addr,
            lines: seen,
        })
    }

    /// The address a line `…<marker><address>…` printed before the announcement names.
    pub fn announced(&self, marker: &str) -> Option<SocketAddr> {
        self.lines.iter().find_map(|l| {
            let rest = l.split(marker).nth(1)?;
            rest.split_whitespace()
                .next()?
                .trim_end_matches([':', ','])
                .parse()
                .ok()
        })
    }

    /// SIGTERM, then wait (the server drains and flushes).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        bail!("server did not stop within 30 s of SIGTERM")
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The no-op ext_authz server: answers OK to every Check, nothing else.
#[derive(Debug, Clone, Copy)]
pub struct NoopAuthz;

#[tonic::async_trait]
impl Authorization for NoopAuthz {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse::default()))
    }
}

/// `aegis noop-server`: serves [`NoopAuthz`] until SIGTERM.
pub async fn noop_server_main(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("noop ext_authz listening on {}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(AuthorizationServer::new(NoopAuthz))
        .serve_with_incoming_shutdown(crate::server::incoming(listener), async move {
            term.recv().await;
        })
        .await?;
    Ok(())
}

/// An OTLP/gRPC trace receiver on loopback that counts (and keeps) what it receives.
#[derive(Debug)]
pub struct SpanSink {
    /// The receiver's loopback address.
    pub addr: SocketAddr,
    /// Check spans (`ext_authz.check`) received.
    pub spans: Arc<AtomicU64>,
    /// Audit checkpoint spans (`aegis.audit.checkpoint`) received.
    pub checkpoints: Arc<AtomicU64>,
    /// Every export request received, in order.
    pub received: Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>,
}

/// The name of a Check's span.
pub const CHECK_SPAN: &str = "ext_authz.check";

/// The name of an audit checkpoint's span.
pub const CHECKPOINT_SPAN: &str = "aegis.audit.checkpoint";

#[derive(Debug, Clone)]
pub(crate) struct SinkService {
    spans: Arc<AtomicU64>,
    checkpoints: Arc<AtomicU64>,
    received: Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>,
    keep: bool,
}

#[tonic::async_trait]
impl TraceService for SinkService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = request.into_inner();
        let named = |name: &str| {
            req.resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .filter(|s| s.name == name)
                .count() as u64
        };
        let (spans, checkpoints) = (named(CHECK_SPAN), named(CHECKPOINT_SPAN));
        // Kept before it is counted: a test that waits for the count then finds it.
        if self.keep
            && let Ok(mut v) = self.received.lock()
        {
            v.push(req);
        }
        self.spans.fetch_add(spans, Ordering::Release);
        self.checkpoints.fetch_add(checkpoints, Ordering::Release);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl SpanSink {
    /// Starts a counting receiver on 127.0.0.1 (the benchmark's).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    /// Starts a receiver that also keeps every request (tests).
    pub async fn start_keeping() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    /// Every Check span a keeping receiver has received, in arrival order.
    pub fn received_spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.received_named(CHECK_SPAN)
    }

    /// Every audit checkpoint span a keeping receiver has received, in arrival order.
    pub fn received_checkpoint_spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.received_named(CHECKPOINT_SPAN)
    }

    fn received_named(&self, name: &str) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        let received = self.received.lock().map(|r| r.clone()).unwrap_or_default();
        received
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .filter(|s| s.name == name)
            .collect()
    }

    async fn start_with(keep: bool) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(AtomicU64::new(0));
        let checkpoints = Arc::new(AtomicU64::new(0));
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let svc = SinkService {
            spans: spans.clone(),
            checkpoints: checkpoints.clone(),
            received: received.clone(),
            keep,
        };
        // A runtime of its own, as a remote collector would be: decoding span batches must
        // not delay the benchmark client's own handling of Check responses.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("otlp-sink".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let _ = tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(svc))
                        .serve_with_incoming(crate::server::incoming(listener))
                        .await;
                });
            })?;
        Ok(Self {
            addr,
            spans,
            checkpoints,
            received,
        })
    }
}
