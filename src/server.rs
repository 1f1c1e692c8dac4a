//! `aegis serve`: the ext_authz gRPC server and the control-plane gRPC server (each with
//! `grpc.health.v1` and reflection), the policy watcher, a fleet sidecar's follower, and
//! an orderly shutdown.
//!
//! Modes (`mode`): `all-in-one` (default) runs both servers in one process, the data plane
//! applying every control action before it returns; `control-plane` runs only the control
//! plane; `sidecar` runs only the data plane and follows a remote control plane
//! (`control.url`).
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
use crate::check::{AuthorizationService, Checker, ControlView, TokenSource};
use crate::config::ControlDatabase;
use crate::config::{Config, Mode};
use crate::control::ControlError;
use crate::control::auth::Authenticator;
use crate::control::core::{ControlCore, InProcessControl, Settings};
use crate::control::pb::control_plane_server::ControlPlaneServer;
use crate::control::postgres::PostgresStore;
use crate::control::service::ControlService;
use crate::control::sqlite::SqliteStore;
use crate::control::store::ControlStore;
use crate::dataplane::budget::Meter;
use crate::dataplane::follow::{Follow, FollowStatus};
use crate::dataplane::link::Remote;
use crate::dataplane::state::State;
use crate::identity::{Identifier, KeyRing, Revocations, TokenPolicy};
use crate::keys::{KeyError, Signer};
use crate::policy::{BundleError, BundleSource, Policy, PolicyOptions};
use crate::seam::ControlPlane;
use crate::telemetry::{Telemetry, TelemetryError, TelemetryOptions};

mod health;
mod listen;
mod setup;
use health::*;
use listen::*;
pub use listen::{MAX_PENDING_RESET_STREAMS, incoming};
pub(crate) use setup::identifier;
use setup::*;

/// How `aegis serve` announces its bound address on stderr (`<ANNOUNCE><addr>: …`); the
/// benchmark and the tests read it to find a server started on port 0.
pub const ANNOUNCE: &str = "aegis serving ext_authz on ";

/// The gRPC service name health is reported under (besides the server-wide "").
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The signing key could not be read or created.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A key file or the data directory is open to other local users.
    #[error(transparent)]
    InsecureFile(#[from] crate::files::InsecureFile),
    /// The policy bundle could not be loaded or compiled.
    #[error("policy bundle {source_name}: {error}")]
    Policy {
        /// Where the bundle was loaded from.
        source_name: String,
        /// What is wrong with it.
        error: BundleError,
    },
    /// The audit log could not be opened or continued.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The OTLP exporter could not be set up.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The control plane could not start (or a sidecar could not reach its state).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The configuration does not allow this mode (what is missing or contradictory).
    #[error("{0}")]
    Config(String),
    /// A listener could not bind.
    #[error("listen on {addr}: {error}")]
    Listen {
        /// The address it was asked for.
        addr: std::net::SocketAddr,
        /// Why the bind failed.
        error: std::io::Error,
    },
}

/// How a control-plane-only server announces its address on stderr; the all-in-one
/// server prints this line too, before [`ANNOUNCE`], for its control listener.
pub const CONTROL_ANNOUNCE: &str = "aegis serving control plane on ";

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The main bound address: ext_authz (all-in-one, sidecar) or the control plane
    /// (control-plane mode). Useful with port 0.
    pub local_addr: std::net::SocketAddr,
    /// The control-plane address (all-in-one and control-plane modes).
    pub control_addr: Option<std::net::SocketAddr>,
    /// The revocation set the server checks on every call.
    pub revocations: Arc<Revocations>,
    /// The control state the data plane enforces.
    pub state: Arc<State>,
    /// The live policy.
    pub policy: Arc<Policy>,
    /// Checks in flight and shed (admission control); absent without a data plane.
    pub admission: Option<Arc<crate::check::Admission>>,
    /// The bound admin address (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: std::net::SocketAddr,
    /// A sidecar's connection to its control plane.
    pub follow: Option<Arc<FollowStatus>>,
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

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| StartError::Listen { addr, error })
}

fn bound(
    listener: &TcpListener,
    addr: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|error| StartError::Listen { addr, error })
}

/// Binds the main listener (`listen`, or `control_listen` in control-plane mode) and
/// starts serving in the background.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let addr = match config.mode {
        Mode::ControlPlane => config.control_listen,
        Mode::AllInOne | Mode::Sidecar => config.listen,
    };
    let listener = bind(addr).await?;
    start_on(config, listener).await
}

/// What the serving tasks share.
struct Parts {
    checker: Option<Arc<Checker>>,
    core: Option<Arc<ControlCore>>,
    auth: Option<Authenticator>,
    follow: Option<Follow>,
    readiness: Arc<Readiness>,
    writer: crate::audit::store::WriterThread,
    telemetry: Telemetry,
    policy: Arc<Policy>,
    /// The correlation task (holds the control link: joined before the audit writer).
    correlator: Option<tokio::task::JoinHandle<()>>,
    /// The data-plane listener and the control-plane listener, as the mode has them.
    authz_listener: Option<TcpListener>,
    control_listener: Option<TcpListener>,
    /// `listen_uds`: ext_authz on a Unix socket too (data planes only).
    uds_listener: Option<tokio::net::UnixListener>,
    /// `health_listen`: gRPC health only, plaintext.
    health_listener: Option<TcpListener>,
    /// The ext_authz and control-plane gRPC servers, with `tls` and `control_tls`
    /// applied (and checked) at start-up.
    authz_server: tonic::transport::Server,
    control_server: tonic::transport::Server,
    /// Bundles the file watcher installs, for the control plane to record.
    reloads: Option<tokio::sync::mpsc::UnboundedReceiver<crate::policy::watch::Reloaded>>,
    watch_files: bool,
    watch_interval: Duration,
    grace: Duration,
}

/// Starts serving on an already bound main listener.
pub async fn start_on(config: Config, listener: TcpListener) -> Result<Running, StartError> {
    let mode = config.mode;
    let local_addr = bound(&listener, config.listen)?;
    crate::files::check(&config)?;
    let signer = Signer::for_config(&config)?;
    // TLS files are read and checked before anything is opened, so that a wrong path or
    // a key that does not match its certificate stops the start with the setting named.
    let authz_server = grpc_server("tls", &config.tls)?;
    let control_server = grpc_server("control_tls", &config.control_tls)?;
    let revocations = Arc::new(Revocations::default());
    // A sidecar decides nothing until it has the control plane's state.
    let state = Arc::new(State::new(revocations.clone(), mode != Mode::Sidecar));
    let meter = Arc::new(Meter::default());
    // The keys tokens are verified with: agent tokens at the data plane, operator and
    // sidecar credentials at the control plane (a previous key while it rotates out).
    let token_keys = token_keys(&config, &signer)?;
    let identifier = Arc::new(identifier(&config, token_keys.clone(), revocations.clone()));

    let source = config
        .policy
        .bundle
        .as_deref()
        .map_or(BundleSource::Embedded, BundleSource::from_path);
    let opts = PolicyOptions {
        query: config.policy.query.clone(),
        eval_timeout: config.eval_timeout(),
        eval_threads: config.policy.eval_threads,
        verification_keys: config
            .policy
            .verification_key
            .iter()
            .map(|p| crate::keys::read_public_key(p))
            .collect::<Result<_, _>>()
            .map_err(|e| StartError::Config(format!("policy.verification_key: {e}")))?,
    };
    let source_name = source.to_string();
    let (policy, files) = Policy::load_with_files(source, opts.clone())
        .map_err(|error| StartError::Policy { source_name, error })?;
    let policy = Arc::new(policy);

    let telemetry = Telemetry::init(&TelemetryOptions {
        endpoint: config.otlp.endpoint.clone(),
        service_name: config.otlp.service_name.clone(),
        queue_size: config.otlp.queue_size,
        export_timeout: Duration::from_secs(5),
    })?;
    let (audit, writer, audit_kid) = open_audit(&config, &signer, &telemetry)?;

    // Seconds past `exp` a token is still accepted (clock skew) plus a margin: how long a
    // revoked token id must be kept. And the longest token lifetime.
    let token_slack = i64::try_from(config.token.leeway_secs)
        .unwrap_or(i64::MAX / 2)
        .saturating_add(60);
    let max_token_ttl = i64::try_from(config.control.max_token_ttl_secs).unwrap_or(i64::MAX / 2);

    // The control plane (all-in-one, control-plane).
    let core = match mode {
        Mode::Sidecar => None,
        Mode::AllInOne | Mode::ControlPlane => {
            let database = config
                .control_database()
                .map_err(|e| StartError::Config(e.to_string()))?;
            let store: Arc<dyn ControlStore> = match database {
                ControlDatabase::Sqlite(path) => Arc::new(SqliteStore::open(&path)?),
                ControlDatabase::Postgres(url) => Arc::new(PostgresStore::open(&url).await?),
            };
            let local = (mode == Mode::AllInOne).then(|| {
                Arc::new(crate::dataplane::InProcess {
                    state: state.clone(),
                    policy: policy.clone(),
                    meter: meter.clone(),
                    token_slack_secs: token_slack,
                    max_token_ttl_secs: max_token_ttl,
                    refusing: std::sync::atomic::AtomicBool::new(false),
                }) as Arc<dyn crate::seam::LocalDataPlane>
            });
            let core = Arc::new(ControlCore::new(
                store,
                audit.clone(),
                signer.clone(),
                control_settings(&config),
                local,
                opts.clone(),
            ));
            core.reconcile_policy(policy.current(), &files).await?;
            core.load_local().await?;
            core.init_incident_feed().await?;
            Some(core)
        }
    };
    let (link, follow): (Arc<dyn ControlPlane>, _) = match &core {
        Some(core) => (Arc::new(InProcessControl::new(core.clone())), None),
        None => {
            let url = config.control.url.clone().unwrap_or_default();
            let timeout = Duration::from_millis(config.control.request_timeout_ms);
            let channel =
                crate::dataplane::follow::channel(&url, timeout, control_client_tls(&config)?)
                    .map_err(StartError::Config)?;
            let credential = sidecar_credential(&config)?;
            // The sidecar decides only for the tenants its credential serves: it is sent
            // no other tenant's freezes and kills, so it must not let their tokens through.
            let served = crate::control::auth::own_sidecar_tenants(&credential)
                .map_err(|e| StartError::Config(format!("control.token_file: {e}")))?;
            state.serve_only(served);
            let link = Arc::new(Remote::new(channel.clone(), &credential, timeout)?);
            let follow = Follow {
                channel,
                credential,
                name: config.control.sidecar_name.clone(),
                state: state.clone(),
                policy: policy.clone(),
                status: Arc::new(FollowStatus::default()),
                token_slack_secs: token_slack,
                max_token_ttl_secs: max_token_ttl,
                held_file: config.data_dir.join(crate::dataplane::held::HELD_FILE),
            };
            if let Some(held) =
                crate::dataplane::held::Held::load(&follow.held_file).map_err(StartError::Config)?
            {
                crate::log!(
                    info,
                    "control plane: last held state epoch {} version {} ({} revoked tokens, {} kill marks); the first snapshot must not be older",
                    held.epoch,
                    held.version,
                    held.revoked.len(),
                    held.kills.len()
                );
                held.remember_in(&state);
            }
            (link, Some(follow))
        }
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Webhook delivery from the outbox; it ends on shutdown (rows left pending are
    // delivered by the next start).
    if let Some(core) = &core {
        drop(
            core.start_notifier(config.notify.clone(), shutdown_rx.clone())
                .map_err(StartError::Config)?,
        );
        // Changes committed to the store by another process sharing it reach this one's
        // data plane and watchers too; it ends on shutdown.
        drop(core.start_feed(shutdown_rx.clone()));
    }
    let (correlation, correlator_task) =
        if mode == Mode::ControlPlane || !config.correlation.enabled {
            (None, None)
        } else {
            let (c, task) = crate::correlate::Correlator::start(
                policy.clone(),
                link.clone(),
                crate::correlate::Thresholds::from_config(&config.correlation),
                shutdown_rx.clone(),
            );
            (Some(c), Some(task))
        };
    let checker = (mode != Mode::ControlPlane).then(|| {
        let limits = Limits {
            max_body_bytes: config.limits.max_body_bytes,
            max_headers: config.limits.max_headers,
            max_header_bytes: config.limits.max_header_bytes,
            envoy_max_request_bytes: config.limits.envoy_max_request_bytes,
        };
        let token_source = match config.token.header.as_str() {
            "authorization" => TokenSource::Bearer,
            h => TokenSource::Header(h.to_owned()),
        };
        Arc::new(Checker::new(
            identifier,
            policy.clone(),
            audit.clone(),
            telemetry.clone(),
            limits,
            token_source,
            config.limits.max_inflight,
            ControlView {
                state: state.clone(),
                meter,
                link,
                correlation,
            },
        ))
    });

    let (authz_listener, control_listener) = match mode {
        Mode::ControlPlane => (None, Some(listener)),
        Mode::Sidecar => (Some(listener), None),
        Mode::AllInOne => (Some(listener), Some(bind(config.control_listen).await?)),
    };
    let control_addr = match &control_listener {
        Some(l) => Some(bound(l, config.control_listen)?),
        None => None,
    };
    let uds_listener = match (&config.listen_uds, mode) {
        (Some(path), Mode::AllInOne | Mode::Sidecar) => Some(bind_uds(path)?),
        _ => None,
    };

    let readiness = Arc::new(Readiness {
        audit: audit.clone(),
        policy: (mode != Mode::ControlPlane).then(|| policy.clone()),
        state: state.clone(),
        revocation_slack: token_slack,
        keys: [
            (
                "signing key",
                config.signing_key_path(),
                signer.kid().to_owned(),
            ),
            ("audit key", config.audit_key_path(), audit_kid),
        ],
        control: core.clone(),
    });
    // The admin listener binds last: every start-up error above is reported first.
    let admin_listener = bind(config.admin_listen).await?;
    let admin_addr = bound(&admin_listener, config.admin_listen)?;
    let (health_listener, health_addr) = match config.health_listen {
        Some(addr) => {
            let l = bind(addr).await?;
            let bound_addr = bound(&l, addr)?;
            (Some(l), Some(bound_addr))
        }
        None => (None, None),
    };
    let follow_status = follow.as_ref().map(|f| f.status.clone());
    let admin_state = Arc::new(crate::admin::AdminState {
        checker: checker.clone(),
        control_state: (mode != Mode::ControlPlane).then(|| state.clone()),
        follow: follow_status.clone(),
        control_core: core.clone(),
        audit,
        policy: (mode != Mode::ControlPlane).then(|| policy.clone()),
        span_queue_capacity: config.otlp.queue_size,
        spans: telemetry.span_stats(),
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
    let (reload_tx, reloads) = match &core {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let tls = |c: &crate::config::TlsConfig| match (c.enabled(), c.client_ca_file.is_some()) {
        (false, _) => "plaintext",
        (true, true) => "mTLS",
        (true, false) => "TLS",
    };
    let health = health_addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
    if let Some(addr) = control_addr {
        crate::log!(
            info,
            "{CONTROL_ANNOUNCE}{addr}: mode {mode:?}, {}, admin {admin_addr}, health {health}, data dir {}, key {}",
            tls(&config.control_tls),
            config.data_dir.display(),
            signer.kid()
        );
    }
    if mode != Mode::ControlPlane {
        crate::log!(
            info,
            "{ANNOUNCE}{local_addr}: mode {mode:?}, {}{}, admin {admin_addr}, health {health}, control {}, policy {} revision {}, data dir {}, key {}, otlp {}",
            tls(&config.tls),
            config
                .listen_uds
                .as_ref()
                .map_or(String::new(), |p| format!(", unix:{}", p.display())),
            control_addr.map_or_else(
                || config.control.url.clone().unwrap_or_default(),
                |a| a.to_string()
            ),
            policy.source(),
            policy.current().revision(),
            config.data_dir.display(),
            signer.kid(),
            config.otlp.endpoint.as_deref().unwrap_or("off"),
        );
        crate::log!(
            info,
            "policy revision {} reads {}",
            policy.current().revision(),
            policy.current().reads().describe()
        );
    }
    let auth = core.as_ref().map(|_| {
        Authenticator::new(
            token_keys,
            config.token.issuer.clone(),
            i64::try_from(config.token.leeway_secs).unwrap_or(0),
        )
    });
    let admission = checker.as_ref().map(|c| c.admission.clone());
    let parts = Parts {
        checker,
        core,
        auth,
        follow,
        readiness,
        writer,
        telemetry,
        policy: policy.clone(),
        correlator: correlator_task,
        authz_listener,
        control_listener,
        uds_listener,
        health_listener,
        authz_server,
        control_server,
        reloads,
        watch_files: mode != Mode::Sidecar,
        watch_interval: Duration::from_millis(config.policy.watch_interval_ms),
        grace: Duration::from_secs(config.shutdown_grace_secs),
    };
    let task = tokio::spawn(serve(parts, reload_tx, shutdown_rx));
    Ok(Running {
        local_addr: control_addr
            .filter(|_| mode == Mode::ControlPlane)
            .unwrap_or(local_addr),
        control_addr,
        revocations,
        state,
        policy,
        admission,
        admin_addr,
        follow: follow_status,
        shutdown: shutdown_tx,
        task,
    })
}
