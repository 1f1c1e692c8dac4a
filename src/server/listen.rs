//! The listeners and their gRPC servers (TCP, TLS, Unix socket; ext_authz, control plane,
//! health, reflection) until shutdown.

use super::*;

pub(super) async fn serve(
    parts: Parts,
    reload_tx: Option<tokio::sync::mpsc::UnboundedSender<crate::policy::watch::Reloaded>>,
    shutdown: watch::Receiver<bool>,
) {
    let Parts {
        checker,
        core,
        auth,
        follow,
        readiness,
        writer,
        telemetry,
        policy,
        correlator,
        authz_listener,
        control_listener,
        uds_listener,
        health_listener,
        authz_server,
        control_server,
        reloads,
        watch_files,
        watch_interval,
        grace,
    } = parts;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let watcher = watch_files.then(|| {
        tokio::spawn(crate::policy::watch::run(
            policy,
            watch_interval,
            reload_tx,
            shutdown.clone(),
        ))
    });
    let recorder = match (&core, reloads) {
        (Some(core), Some(rx)) => Some(tokio::spawn(record_reloads(core.clone(), rx))),
        _ => None,
    };
    let follower = follow.map(|f| tokio::spawn(crate::dataplane::follow::run(f, shutdown.clone())));
    // The first verdict is published before any listener serves, so a probe right after
    // the start announcement never finds the service unregistered.
    let services = health_services(checker.is_some(), core.is_some());
    let first = publish_health(&health_reporter, &readiness, &services, None).await;
    let health = tokio::spawn(report_health(
        health_reporter,
        readiness,
        checker.clone(),
        services,
        first,
        shutdown.clone(),
    ));

    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let authz_router = |mut server: tonic::transport::Server, checker: &Arc<Checker>| {
        let max_request = checker.limits.max_check_request_bytes();
        server
            .add_service(
                AuthorizationServer::new(AuthorizationService(checker.clone()))
                    .max_decoding_message_size(max_request),
            )
            .add_service(health_service.clone())
            .add_optional_service(reflection(&[crate::EXT_AUTHZ_DESCRIPTOR_SET]))
    };
    let authz = match (authz_listener, &checker) {
        (Some(listener), Some(checker)) => Some(tokio::spawn(
            authz_router(authz_server, checker)
                .serve_with_incoming_shutdown(incoming(listener), stopped(shutdown.clone())),
        )),
        _ => None,
    };
    let uds = match (uds_listener, &checker) {
        (Some(listener), Some(checker)) => Some(tokio::spawn(
            authz_router(plain_server(), checker).serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                stopped(shutdown.clone()),
            ),
        )),
        _ => None,
    };
    let control = match (control_listener, &core, auth) {
        (Some(listener), Some(core), Some(auth)) => {
            let service = ControlService::new(core.clone(), auth, shutdown.clone());
            let mut server = control_server;
            let router = server
                .add_service(
                    ControlPlaneServer::new(service)
                        .max_decoding_message_size(crate::control::MAX_REQUEST_BYTES),
                )
                .add_service(health_service.clone())
                .add_optional_service(reflection(&[crate::control::CONTROL_DESCRIPTOR_SET]));
            Some(tokio::spawn(router.serve_with_incoming_shutdown(
                incoming(listener),
                stopped(shutdown.clone()),
            )))
        }
        _ => None,
    };
    let health_only = health_listener.map(|listener| {
        tokio::spawn(
            plain_server()
                .add_service(health_service)
                .serve_with_incoming_shutdown(incoming(listener), stopped(shutdown.clone())),
        )
    });
    let mut servers: Vec<_> = [
        ("ext_authz", authz),
        ("ext_authz (unix)", uds),
        ("control plane", control),
        ("health", health_only),
    ]
    .into_iter()
    .filter_map(|(name, task)| task.map(|t| (name, t)))
    .collect();
    let all_done = async {
        for (name, task) in servers.iter_mut() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => crate::log!(error, "{name} server failed: {e}"),
                Err(e) if e.is_cancelled() => {}
                Err(e) => crate::log!(error, "{name} server task failed: {e}"),
            }
        }
    };
    let mut stop = shutdown.clone();
    let deadline = async move {
        let _ = stop.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    let late = tokio::select! {
        () = all_done => false,
        () = deadline => true,
    };
    if late {
        crate::log!(
            warn,
            "in-flight calls still running after {grace:?}; stopping anyway"
        );
        for (_, task) in &servers {
            task.abort();
        }
    }
    for task in [watcher, follower, correlator].into_iter().flatten() {
        let _ = task.await;
    }
    if let Some(r) = recorder {
        let _ = r.await;
    }
    let _ = health.await;
    // Every holder of an AuditLog sender (Checker, control core) is gone once the servers
    // and tasks are: the writer drains what is queued and stops.
    drop(checker);
    drop(core);
    let _ = tokio::task::spawn_blocking(move || {
        writer.join();
        telemetry.shutdown();
    })
    .await;
    crate::log!(info, "aegis stopped: audit log flushed");
}

/// Records every bundle the file watcher installs as a policy activation.
pub(super) async fn record_reloads(
    core: Arc<ControlCore>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::policy::watch::Reloaded>,
) {
    while let Some((compiled, files)) = rx.recv().await {
        if let Err(e) = core
            .record_activation(compiled, &files, "file", "system:file-watch")
            .await
        {
            crate::log!(
                error,
                "policy activation from the bundle files not recorded: {e}"
            );
        }
    }
}

pub(super) fn reflection(
    sets: &[&'static [u8]],
) -> Option<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for set in sets {
        builder = builder.register_encoded_file_descriptor_set(set);
    }
    match builder.build_v1() {
        Ok(r) => Some(r),
        Err(e) => {
            crate::log!(error, "gRPC reflection unavailable: {e}");
            None
        }
    }
}

/// HTTP/2 streams the client may reset before Aegis has accepted them, per connection,
/// before the connection is closed with GOAWAY (h2's rapid-reset guard; its default is 20).
/// Envoy cancels every Check that passes its ext_authz timeout, and all of a pod's Checks
/// share one connection: at the default, a slow moment (a burst of Checks queued behind a
/// busy runtime) tore down that connection and failed unrelated Checks. 1024 is more than
/// Envoy's cancellations can pile up while the connection task waits, and still a bound: a
/// rapid-reset flood holds at most 1024 un-accepted streams before the GOAWAY, and every
/// stream that reaches a Check passes admission control (`limits.max_inflight`).
pub const MAX_PENDING_RESET_STREAMS: usize = 1024;

/// A gRPC server with the listeners' common settings, plaintext.
pub(super) fn plain_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
}

/// [`plain_server`] with a listener's TLS settings (`setting` is `tls` or `control_tls`)
/// when they set a certificate: its files read and the rustls configuration built here,
/// so that every problem is reported at start-up.
pub(super) fn grpc_server(
    setting: &str,
    t: &crate::config::TlsConfig,
) -> Result<tonic::transport::Server, StartError> {
    let server = plain_server();
    match crate::tls::server(setting, t).map_err(StartError::Config)? {
        Some(tls) => server.tls_config(tls).map_err(|e| {
            StartError::Config(format!(
                "{setting}: {e} (does key_file belong to cert_file?)"
            ))
        }),
        None => Ok(server),
    }
}

/// Binds the Unix socket at `path` (mode 0660: the Envoy in the pod shares its group),
/// replacing a stale socket a previous run left; anything else at `path` is an error.
pub(super) fn bind_uds(path: &std::path::Path) -> Result<tokio::net::UnixListener, StartError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let err = |e: std::io::Error| StartError::Config(format!("listen_uds {}: {e}", path.display()));
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(StartError::Config(format!(
                "listen_uds {}: exists and is not a socket",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Accepted connections with TCP_NODELAY: gRPC answers are small frames, and Nagle's
/// algorithm against the peer's delayed ACK would hold each one back ~40 ms.
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
