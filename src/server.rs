//! `aegis serve`: the ext_authz gRPC server with `grpc.health.v1` and reflection, the
//! policy watcher, and an orderly shutdown.
//!
//! Shutdown (SIGTERM/SIGINT, or [`Running::shutdown`]): stop accepting, let in-flight
//! Checks finish (bounded by `shutdown_grace_secs`), then drain the audit writer (every
//! queued row is committed) and flush spans. Start-up errors (a broken bundle, an unusable
//! data directory or audit database) are returned before anything listens.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::audit::store::{AUDIT_DB_FILE, AuditError, AuditLog, StoreOptions};
use crate::check::input::Limits;
use crate::check::{AuthorizationService, Checker, TokenSource};
use crate::config::Config;
use crate::identity::{Identifier, KeyRing, Revocations, TokenPolicy};
use crate::keys::{KeyError, Signer};
use crate::policy::{BundleError, BundleSource, Policy, PolicyOptions};
use crate::telemetry::{Telemetry, TelemetryError, TelemetryOptions};

/// How `aegis serve` announces its bound address on stderr (`<ANNOUNCE><addr>: …`); the
/// benchmark and the tests read it to find a server started on port 0.
pub const ANNOUNCE: &str = "aegis serving ext_authz on ";

/// The gRPC service name health is reported under (besides the server-wide "").
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("policy bundle {source_name}: {error}")]
    Policy {
        source_name: String,
        error: BundleError,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("listen on {addr}: {error}")]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The bound address (useful with port 0).
    pub local_addr: std::net::SocketAddr,
    /// The revocation set the server checks on every call.
    pub revocations: Arc<Revocations>,
    /// The live policy.
    pub policy: Arc<Policy>,
    /// Checks in flight and shed (admission control).
    pub admission: Arc<crate::check::Admission>,
    /// The bound admin address (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: std::net::SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the server gracefully and waits until audit rows and spans are flushed.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits for the server to stop (after a signal).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A handle that triggers shutdown.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Binds `config.listen` and starts serving in the background.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|error| StartError::Listen {
            addr: config.listen,
            error,
        })?;
    start_on(config, listener).await
}

/// Starts serving on an already bound listener.
pub async fn start_on(config: Config, listener: TcpListener) -> Result<Running, StartError> {
    let local_addr = listener.local_addr().map_err(|error| StartError::Listen {
        addr: config.listen,
        error,
    })?;
    let signer = Signer::load_or_create(&config.data_dir)?;
    let revocations = Arc::new(Revocations::default());
    let identifier = Arc::new(identifier(&config, &signer, revocations.clone())?);

    let source = config
        .policy
        .bundle
        .as_deref()
        .map_or(BundleSource::Embedded, BundleSource::from_path);
    let opts = PolicyOptions {
        query: config.policy.query.clone(),
        eval_timeout: config.eval_timeout(),
    };
    let source_name = source.to_string();
    let policy = Arc::new(
        Policy::load(source, opts).map_err(|error| StartError::Policy { source_name, error })?,
    );

    let store_opts = StoreOptions {
        queue_capacity: config.audit.queue_capacity,
        max_batch: config.audit.max_batch,
        durability: config.audit.durability,
    };
    let (audit, writer) = AuditLog::open(
        &config.data_dir.join(AUDIT_DB_FILE),
        signer.clone(),
        &store_opts,
    )?;
    let telemetry = Telemetry::init(&TelemetryOptions {
        endpoint: config.otlp.endpoint.clone(),
        service_name: config.otlp.service_name.clone(),
        queue_size: config.otlp.queue_size,
        export_timeout: Duration::from_secs(5),
    })?;

    let limits = Limits {
        max_body_bytes: config.limits.max_body_bytes,
        max_headers: config.limits.max_headers,
        max_header_bytes: config.limits.max_header_bytes,
    };
    let token_source = match config.token.header.as_str() {
        "authorization" => TokenSource::Bearer,
        h => TokenSource::Header(h.to_owned()),
    };
    let checker = Arc::new(Checker::new(
        identifier,
        policy.clone(),
        audit.clone(),
        telemetry.clone(),
        limits,
        token_source,
        config.limits.max_inflight,
    ));

    let admission = checker.admission.clone();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let watch_interval = Duration::from_millis(config.policy.watch_interval_ms);
    let readiness = Arc::new(Readiness {
        audit: audit.clone(),
        policy: policy.clone(),
        data_dir: config.data_dir.clone(),
        kid: signer.kid().to_owned(),
    });
    // The admin listener binds last: every start-up error above is reported first.
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|error| StartError::Listen {
            addr: config.admin_listen,
            error,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|error| StartError::Listen {
            addr: config.admin_listen,
            error,
        })?;
    let admin_state = Arc::new(crate::admin::AdminState {
        checker: checker.clone(),
        audit,
        span_queue_capacity: config.otlp.queue_size,
        ready: {
            let r = readiness.clone();
            Box::new(move || r.check())
        },
    });
    tokio::spawn(crate::admin::serve(
        admin_listener,
        admin_state,
        shutdown_rx.clone(),
    ));
    crate::log!(
        info,
        "{ANNOUNCE}{local_addr}: admin {admin_addr}, policy {} revision {}, data dir {}, key {}, otlp {}",
        policy.source(),
        policy.current().revision(),
        config.data_dir.display(),
        signer.kid(),
        config.otlp.endpoint.as_deref().unwrap_or("off"),
    );
    let task = tokio::spawn(serve(
        listener,
        checker,
        readiness,
        writer,
        telemetry,
        policy.clone(),
        watch_interval,
        grace,
        shutdown_rx,
    ));
    Ok(Running {
        local_addr,
        revocations,
        policy,
        admission,
        admin_addr,
        shutdown: shutdown_tx,
        task,
    })
}

fn identifier(
    config: &Config,
    signer: &Signer,
    revocations: Arc<Revocations>,
) -> Result<Identifier, KeyError> {
    let mut keys = KeyRing::default();
    keys.insert(signer.verifying_key());
    for path in &config.token.trusted_keys {
        keys.insert(crate::keys::read_public_key(path)?);
    }
    let policy = TokenPolicy {
        issuer: config.token.issuer.clone(),
        audience: config.token.audience.clone(),
        leeway_secs: i64::try_from(config.token.leeway_secs).unwrap_or(i64::MAX),
        max_bytes: config.token.max_bytes,
    };
    Ok(Identifier::new(
        keys,
        policy,
        revocations,
        config.token.cache_entries,
    ))
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    listener: TcpListener,
    checker: Arc<Checker>,
    readiness: Arc<Readiness>,
    writer: crate::audit::store::WriterThread,
    telemetry: Telemetry,
    policy: Arc<Policy>,
    watch_interval: Duration,
    grace: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::EXT_AUTHZ_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection = match reflection {
        Ok(r) => Some(r),
        Err(e) => {
            crate::log!(error, "gRPC reflection unavailable: {e}");
            None
        }
    };
    let watcher = tokio::spawn(crate::policy::watch::run(
        policy,
        watch_interval,
        shutdown.clone(),
    ));
    let health = tokio::spawn(report_health(
        health_reporter,
        readiness,
        checker.clone(),
        shutdown.clone(),
    ));

    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AuthorizationServer::new(AuthorizationService(checker)))
        .add_service(health_service)
        .add_optional_service(reflection);
    let mut stop = shutdown.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let serving = router.serve_with_incoming_shutdown(incoming(listener), stopped);
    let mut stop = shutdown.clone();
    let deadline = async move {
        let _ = stop.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = serving => if let Err(e) = r { crate::log!(error, "ext_authz server failed: {e}") },
        () = deadline => crate::log!(warn, "in-flight Checks still running after {grace:?}; stopping anyway"),
    }
    let _ = watcher.await;
    let _ = health.await;
    // Every Checker (and with it every AuditLog sender) is gone once the server future is:
    // the writer drains what is queued and stops.
    let _ = tokio::task::spawn_blocking(move || {
        writer.join();
        telemetry.shutdown();
    })
    .await;
    crate::log!(info, "aegis stopped: audit log flushed");
}

/// Accepted connections with TCP_NODELAY: gRPC answers are small frames, and Nagle's
/// algorithm against the peer's delayed ACK would hold each one back ~40 ms.
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// What readiness is judged on.
struct Readiness {
    audit: AuditLog,
    policy: Arc<Policy>,
    /// The data directory and the key id being signed with.
    data_dir: std::path::PathBuf,
    kid: String,
}

impl Readiness {
    /// `Err` naming the first unusable part: the audit log (its last commit failed), the
    /// policy (every recent evaluation failed), or the signing key (its file in the data
    /// directory is missing, unreadable or another key: a restart would sign with
    /// something else, or not start).
    fn check(&self) -> Result<(), String> {
        if !self.audit.is_healthy() {
            return Err("audit log: the last commit failed".into());
        }
        self.policy.health()?;
        match Signer::load(&self.data_dir) {
            Ok(s) if s.kid() == self.kid => Ok(()),
            Ok(s) => Err(format!(
                "signing key: the file now holds key {}, not {} in use",
                s.kid(),
                self.kid
            )),
            Err(e) => Err(format!("signing key: {e}")),
        }
    }
}

/// Keeps the health service truthful: NOT_SERVING while the audit log, the policy or the
/// signing key is unusable, SERVING again once it recovers; each change is logged with its
/// reason. Also summarises shed Checks (overload) since the last tick.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    readiness: Arc<Readiness>,
    checker: Arc<Checker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = None;
    let mut shed_before = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let verdict = readiness.check();
        let status = if verdict.is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            match &verdict {
                Ok(()) if last.is_some() => crate::log!(info, "health: SERVING again"),
                Ok(()) => {}
                Err(why) => crate::log!(error, "health: NOT_SERVING: {why}"),
            }
            reporter.set_service_status("", status).await;
            reporter.set_service_status(AUTHZ_SERVICE, status).await;
            last = Some(status);
        }
        let shed = checker.admission.shed();
        if shed != shed_before {
            crate::log!(
                warn,
                "overloaded: shed {} Checks over limits.max_inflight and {} on a full audit queue \
                 since the last report ({} in flight)",
                shed.0 - shed_before.0,
                shed.1 - shed_before.1,
                checker.admission.inflight()
            );
            shed_before = shed;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {
                reporter.set_service_status("", ServingStatus::NotServing).await;
                reporter.set_service_status(AUTHZ_SERVICE, ServingStatus::NotServing).await;
                return;
            }
        }
    }
}
