//! TLS, mTLS and the Unix socket listener, with certificates made in the test by the
//! openssl CLI: the ext_authz listener (in process), and a fleet over mTLS (real
//! processes: a control plane, sidecars following it over `https://`, `aegis ctl`).
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A client TLS config trusting `ca`, presenting `identity` (cert, key) when given.
fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let read = |p: &Path| std::fs::read(p).expect("pem");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    tls
}

/// What a Check over `tls` to `url` comes to ([`outcome`]), or the connection error.
async fn check_over(
    url: String,
    tls: Option<ClientTlsConfig>,
    req: envoy_types::ext_authz::v3::pb::CheckRequest,
) -> String {
    let mut ep = Endpoint::from_shared(url)
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).expect("tls config");
    }
    let channel = match ep.connect().await {
        Ok(c) => c,
        Err(e) => return format!("connect error: {e:?}"),
    };
    outcome(AuthorizationClient::new(channel).check(req).await)
}

#[tokio::test]
async fn ext_authz_over_mtls_and_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "mesh");
    let (server_cert, server_key) = ca.leaf("aegis", "serverAuth");
    let (envoy_cert, envoy_key) = ca.leaf("envoy", "clientAuth");
    let rogue = TestCa::new(dir.path(), "rogue");
    let (rogue_cert, rogue_key) = rogue.leaf("envoy", "clientAuth");
    let socket = dir.path().join("ext_authz.sock");

    let mut config = config(dir.path());
    config.tls.cert_file = Some(server_cert.clone());
    config.tls.key_file = Some(server_key.clone());
    config.tls.client_ca_file = Some(ca.ca.clone());
    config.listen_uds = Some(socket.clone());
    let running = aegis::server::start(config.clone())
        .await
        .expect("server starts with mTLS");
    let signer = aegis::keys::Signer::load(&config.data_dir).expect("key");
    let token = mint(&signer, claims("acme", "billing-bot", &["invoices:read"]));
    let https = format!("https://127.0.0.1:{}", running.local_addr.port());
    let read = || Req::read_invoices(&token);

    // Envoy's client certificate, signed by the mesh CA: decided.
    let envoy = client_tls(&ca.ca, Some((&envoy_cert, &envoy_key)));
    assert_eq!(
        check_over(https.clone(), Some(envoy.clone()), read()).await,
        "allow"
    );
    // By name too (the certificate has DNS:localhost).
    let by_name = format!("https://localhost:{}", running.local_addr.port());
    assert_eq!(check_over(by_name, Some(envoy), read()).await, "allow");

    // No client certificate, one from another CA, plaintext, or a client that does not
    // trust the server's CA: no decision at all.
    for (what, url, tls) in [
        (
            "no client certificate",
            https.clone(),
            Some(client_tls(&ca.ca, None)),
        ),
        (
            "client certificate from another CA",
            https.clone(),
            Some(client_tls(&ca.ca, Some((&rogue_cert, &rogue_key)))),
        ),
        (
            "plaintext",
            format!("http://127.0.0.1:{}", running.local_addr.port()),
            None,
        ),
        (
            "server not trusted",
            https.clone(),
            Some(client_tls(&rogue.ca, Some((&envoy_cert, &envoy_key)))),
        ),
    ] {
        let seen = check_over(url, tls, read()).await;
        assert!(seen.contains("error"), "{what}: {seen}");
    }

    // The Unix socket: plaintext, mode 0660, the same decisions.
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    let path = socket.clone();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connects over the socket");
    let mut uds = AuthorizationClient::new(channel);
    let r = uds.check(read()).await.expect("decided").into_inner();
    assert_eq!(code(&r), 0, "allowed over the socket");
    let r = uds
        .check(Req::read_invoices("not-a-token"))
        .await
        .expect("decided")
        .into_inner();
    assert_eq!(reason(&r), Some("token_malformed"));

    running.shutdown().await;
    // Four decisions were recorded (two over mTLS, two over the socket), none for the
    // refused handshakes.
    let db = config.data_dir.join("audit.db");
    assert_eq!(decisions(&db).len(), 4, "{:?}", decisions(&db));
    // The socket file outlives the process; the next start replaces it.
    assert!(socket.exists(), "stale socket left behind");
    let again = aegis::server::start(config.clone())
        .await
        .expect("restarts over the stale socket");
    assert!(
        tokio::net::UnixStream::connect(&socket).await.is_ok(),
        "the new socket accepts"
    );
    again.shutdown().await;
}

#[test]
fn bad_tls_settings_stop_the_start_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "mesh");
    let (cert, _) = ca.leaf("aegis", "serverAuth");
    let (_, other_key) = ca.leaf("other", "serverAuth");
    let data = dir.path().join("data");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN NOTHING-----\n").expect("write");
    let os = |s: &str| std::ffi::OsString::from(s);
    let base = [os("--data-dir"), data.clone().into_os_string()];
    let refuse = |more: Vec<std::ffi::OsString>| {
        let args: Vec<std::ffi::OsString> = base.iter().cloned().chain(more).collect();
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        serve_refuses(&refs)
    };

    let err = refuse(vec![os("--tls-cert-file"), cert.clone().into_os_string()]);
    assert!(
        err.contains("tls") && err.contains("without key_file"),
        "{err}"
    );
    let err = refuse(vec![
        os("--tls-cert-file"),
        cert.clone().into_os_string(),
        os("--tls-key-file"),
        other_key.clone().into_os_string(),
    ]);
    assert!(err.contains("tls:") && err.contains("key_file"), "{err}");
    let err = refuse(vec![
        os("--control-tls-cert-file"),
        garbage.clone().into_os_string(),
        os("--control-tls-key-file"),
        other_key.into_os_string(),
    ]);
    assert!(
        err.contains("control_tls.cert_file") && err.contains("garbage.pem"),
        "{err}"
    );
    let err = refuse(vec![
        os("--tls-client-ca-file"),
        ca.ca.clone().into_os_string(),
    ]);
    assert!(err.contains("client_ca_file"), "{err}");
    // A regular file where the socket should go is not replaced.
    let occupied = dir.path().join("occupied");
    std::fs::write(&occupied, "keep me").expect("write");
    let err = refuse(vec![os("--listen-uds"), occupied.clone().into_os_string()]);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&occupied).expect("kept"), "keep me");
}

/// `aegis ctl` over https with the given TLS flags: (exit code, stdout, stderr).
fn ctl_tls(addr: &str, credential: &str, tls: &[&Path], args: &[&str]) -> (i32, String, String) {
    let names = ["--ca-file", "--cert-file", "--key-file"];
    let mut all = vec![
        "ctl".to_owned(),
        "--server".into(),
        addr.to_owned(),
        "--token".into(),
        credential.to_owned(),
    ];
    for (name, path) in names.iter().zip(tls) {
        all.push((*name).to_owned());
        all.push(path.to_string_lossy().into_owned());
    }
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = aegis_cmd(&refs);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_follows_its_control_plane_over_mtls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "fleet");
    let (cp_cert, cp_key) = ca.leaf("aegis-control", "serverAuth");
    let (sc_cert, sc_key) = ca.leaf("sidecar", "clientAuth");
    let (op_cert, op_key) = ca.leaf("operator", "clientAuth");
    let rogue = TestCa::new(dir.path(), "rogue");
    let (rogue_cert, rogue_key) = rogue.leaf("sidecar", "clientAuth");
    let s = |p: &Path| p.to_string_lossy().into_owned();

    let cp_data = dir.path().join("cp");
    let cp = spawn_control_plane(
        &cp_data,
        "127.0.0.1:0",
        &[
            "--control-tls-cert-file",
            &s(&cp_cert),
            "--control-tls-key-file",
            &s(&cp_key),
            "--control-tls-client-ca-file",
            &s(&ca.ca),
            "--health-listen",
            "127.0.0.1:0",
        ],
    );
    let url = format!("https://127.0.0.1:{}", cp.addr.port());

    // kubelet's grpc probe speaks plaintext: the health-only listener answers it, and
    // serves nothing else.
    let health = cp.announced("health ").expect("health address");
    let channel = Endpoint::from_shared(format!("http://{health}"))
        .expect("uri")
        .connect()
        .await
        .expect("plaintext health connects");
    let mut probe = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = probe
        .check(tonic_health::pb::HealthCheckRequest {
            service: "aegis.control.v1.ControlPlane".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let api = pb::control_plane_client::ControlPlaneClient::new(channel)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .expect_err("no control API on the health port");
    assert_eq!(api.code(), tonic::Code::Unimplemented, "{api}");
    let root = operator_cmd(&cp_data, "root", "admin", "*");
    let token_file = dir.path().join("sidecar.token");
    aegis::files::write_secret(
        &token_file,
        &operator_cmd(&cp_data, "fleet", "sidecar", "acme"),
    )
    .expect("write");

    // aegis ctl over mTLS; refused without a client certificate or over plaintext.
    let op = [ca.ca.as_path(), op_cert.as_path(), op_key.as_path()];
    let (code, out, err) = ctl_tls(&url, &root, &op, &["whoami"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("root"), "{out}");
    let (code, _, err) = ctl_tls(&url, &root, &op[..1], &["whoami"]);
    assert_ne!(code, 0, "no client certificate: refused ({err})");
    let (code, _, err) = ctl(cp.addr, &root, &["whoami"]);
    assert_ne!(code, 0, "plaintext refused ({err})");

    let sidecar = |name: &str, cert: &Path, key: &Path| {
        let data = dir.path().join(name);
        spawn_serve(&[
            "--data-dir",
            &s(&data),
            "--control-plane",
            &url,
            "--control-plane-token-file",
            &s(&token_file),
            "--control-plane-ca-file",
            &s(&ca.ca),
            "--control-plane-cert-file",
            &s(cert),
            "--control-plane-key-file",
            &s(key),
            "--trusted-key",
            &s(&cp_data.join("signing.pub")),
            "--sidecar-name",
            name,
        ])
    };
    let good = sidecar("sidecar-good", &sc_cert, &sc_key);
    let bad = sidecar("sidecar-rogue", &rogue_cert, &rogue_key);

    assert_eq!(
        ctl_tls(
            &url,
            &root,
            &op,
            &["agents", "register", "billing-bot", "--tenant", "acme"]
        )
        .0,
        0
    );
    let (code, token, err) = ctl_tls(
        &url,
        &root,
        &op,
        &[
            "tokens",
            "issue",
            "--agent",
            "billing-bot",
            "--tenant",
            "acme",
            "--scopes",
            "invoices:read",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_owned();
    let read = || Req::read_invoices(&token);
    let good_url = format!("http://{}", good.addr);
    let last = seen_within(&good_url, read, "allow", Duration::from_secs(20)).await;
    assert_eq!(
        last, "allow",
        "the sidecar with a fleet certificate follows"
    );

    // A freeze travels the watch stream over mTLS.
    let (code, _, err) = ctl_tls(
        &url,
        &root,
        &op,
        &[
            "agents",
            "freeze",
            "billing-bot",
            "--tenant",
            "acme",
            "--reason",
            "test",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let last = seen_within(&good_url, read, "agent_frozen", Duration::from_secs(10)).await;
    assert_eq!(last, "agent_frozen", "the freeze reached the sidecar");

    // The sidecar whose certificate another CA signed never gets a snapshot: it fails
    // closed, and its /readyz says why.
    let seen = check_over(format!("http://{}", bad.addr), None, read()).await;
    assert!(
        seen.contains("Unavailable") || seen.contains("unavailable"),
        "{seen}"
    );
    let admin = bad.announced("admin ").expect("admin address");
    let ready = http_get(admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("control plane"), "{ready}");
    drop(cp);
}

/// Checks at `url` (plaintext) until one comes to `want` or `timeout` passes: the last seen.
async fn seen_within(
    url: &str,
    req: impl Fn() -> envoy_types::ext_authz::v3::pb::CheckRequest,
    want: &str,
    timeout: Duration,
) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = check_over(url.to_owned(), None, req()).await;
        if seen == want || tokio::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
