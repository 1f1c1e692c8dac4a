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
                token_slack_secs: i64::try_from(config.token.leeway_secs)
                    .unwrap_or(i64::MAX / 2)
                    .saturating_add(60),
                max_token_ttl_secs: i64::try_from(config.control.max_token_ttl_secs)
                    .unwrap_or(i64::MAX / 2),
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
        revocation_slack: i64::try_from(config.token.leeway_secs)
            .unwrap_or(i64::MAX / 2)
            .saturating_add(60),
        keys: [
            (
                "signing key",
                config.signing_key_path(),
                signer.kid().to_owned(),
            ),
            ("audit key", config.audit_key_path(), audit_kid),
        ],
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

fn control_settings(config: &Config) -> Settings {
    Settings {
        issuer: config.token.issuer.clone(),
        audience: config.token.audience.clone(),
        token_ttl_secs: config.token.lifetime_secs,
        max_token_ttl_secs: config.control.max_token_ttl_secs,
        approval_ttl_secs: config.control.approval_ttl_secs,
        override_ttl_secs: config.control.override_ttl_secs,
        override_binding: config.control.override_binding,
        max_pending_approvals: config.control.max_pending_approvals,
        default_autonomy: config.control.soc_autonomy_level,
        webhooks: config.notify.webhooks.clone(),
        sidecar_calls_per_sec: config.control.sidecar_calls_per_sec,
        sidecar_call_burst: config.control.sidecar_call_burst,
    }
}

/// The sidecar's TLS towards an `https://` control plane (mTLS with `control.cert_file`).
fn control_client_tls(
    config: &Config,
) -> Result<Option<tonic::transport::ClientTlsConfig>, StartError> {
    let c = &config.control;
    let files = crate::tls::ClientFiles {
        ca: c.ca_file.as_deref().map(|p| ("control.ca_file", p)),
        cert: c.cert_file.as_deref().map(|p| ("control.cert_file", p)),
        key: c.key_file.as_deref().map(|p| ("control.key_file", p)),
    };
    crate::tls::client(c.url.as_deref().unwrap_or_default(), files).map_err(StartError::Config)
}

/// The sidecar's credential: the token file, else `AEGIS_CONTROL_TOKEN`.
fn sidecar_credential(config: &Config) -> Result<String, StartError> {
    let token = match &config.control.token_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            StartError::Config(format!("control.token_file {}: {e}", path.display()))
        })?,
        None => std::env::var("AEGIS_CONTROL_TOKEN").unwrap_or_default(),
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(StartError::Config(
            "control.token_file: the sidecar credential is empty".into(),
        ));
    }
    Ok(token)
}

/// Opens the audit log with its own key, trusting earlier audit keys and, for a log begun
/// before the audit key was split off, the token key up to where the audit key took over;
/// every checkpoint is published to the witness file and the OTLP collector, if set.
fn open_audit(
    config: &Config,
    token_signer: &Signer,
    telemetry: &Telemetry,
) -> Result<(AuditLog, crate::audit::store::WriterThread, String), StartError> {
    // A log begun before the audit key (its checkpoints signed by the token key) is
    // continued only by the start that creates the audit key: after that, the token key
    // is never trusted for the log again, whatever the log's tail says.
    let migrating = config.audit.signing_key_file.is_none()
        && !config.data_dir.join(crate::keys::AUDIT_KEY_FILE).exists();
    let signer = Signer::for_audit(config)?;
    let kid = signer.kid().to_owned();
    if signer.kid() == token_signer.kid() {
        return Err(StartError::Config(format!(
            "audit.signing_key_file: key {} is also the token-signing key; the audit log needs \
             a key of its own",
            signer.kid()
        )));
    }
    let mut keys = vec![signer.verifying_key()];
    for path in &config.audit.trusted_keys {
        keys.push(crate::keys::read_public_key(path)?);
    }
    let legacy = if migrating {
        vec![token_signer.verifying_key()]
    } else {
        Vec::new()
    };
    let trust = crate::audit::verify::Trust {
        keys: &keys,
        legacy: &legacy,
    };
    let mut sinks: Vec<Box<dyn crate::audit::witness::Sink>> = Vec::new();
    if let Some(path) = &config.audit.witness_file {
        let sink = crate::audit::witness::FileSink::open(path).map_err(|e| {
            StartError::Config(format!("audit.witness_file {}: {e}", path.display()))
        })?;
        sinks.push(Box::new(sink));
    }
    if config.otlp.endpoint.is_some() {
        sinks.push(Box::new(telemetry.checkpoint_sink()));
    }
    let witness = if sinks.is_empty() {
        None
    } else {
        let interval = Duration::from_millis(config.audit.witness_interval_ms);
        Some(
            crate::audit::witness::Publisher::start(sinks, interval)
                .map_err(|e| StartError::Config(format!("audit witness publisher: {e}")))?,
        )
    };
    let store_opts = StoreOptions {
        queue_capacity: config.audit.queue_capacity,
        max_batch: config.audit.max_batch,
        durability: config.audit.durability,
    };
    let (audit, writer) = AuditLog::open_with(
        &config.data_dir.join(AUDIT_DB_FILE),
        signer,
        &store_opts,
        trust,
        witness,
        config.audit.witness_file.as_deref(),
    )?;
    Ok((audit, writer, kid))
}

/// The signer's own public key and `token.trusted_keys`.
fn token_keys(config: &Config, signer: &Signer) -> Result<KeyRing, KeyError> {
    let mut keys = KeyRing::default();
    keys.insert(signer.verifying_key());
    for path in &config.token.trusted_keys {
        keys.insert(crate::keys::read_public_key(path)?);
    }
    Ok(keys)
}

fn identifier(config: &Config, keys: KeyRing, revocations: Arc<Revocations>) -> Identifier {
    let policy = TokenPolicy {
        issuer: config.token.issuer.clone(),
        audience: config.token.audience.clone(),
        leeway_secs: i64::try_from(config.token.leeway_secs).unwrap_or(i64::MAX),
        max_bytes: config.token.max_bytes,
        max_lifetime_secs: i64::try_from(config.control.max_token_ttl_secs).unwrap_or(i64::MAX),
    };
    Identifier::new(keys, policy, revocations, config.token.cache_entries)
}

async fn serve(
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
async fn record_reloads(
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

fn reflection(
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
fn plain_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
}

/// [`plain_server`] with a listener's TLS settings (`setting` is `tls` or `control_tls`)
/// when they set a certificate: its files read and the rustls configuration built here,
/// so that every problem is reported at start-up.
fn grpc_server(
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
fn bind_uds(path: &std::path::Path) -> Result<tokio::net::UnixListener, StartError> {
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

/// What readiness is judged on.
struct Readiness {
    audit: AuditLog,
    /// The data plane's policy and control state (absent on a control-plane-only server).
    policy: Option<Arc<Policy>>,
    state: Arc<State>,
    /// Seconds a revoked token id is kept past its token's expiry (over the verifier's
    /// clock-skew leeway, which still accepts a token that long after `exp`).
    revocation_slack: i64,
    /// (what, file, key id in use) of the token-signing key and the audit key.
    keys: [(&'static str, std::path::PathBuf, String); 2],
}

impl Readiness {
    /// `Err` naming the first unusable part: the audit log (its last commit failed), the
    /// policy (every recent evaluation failed), or the signing key or the audit key (its
    /// file is missing, unreadable or another key: a restart would sign with something
    /// else, or not start).
    fn check(&self) -> Result<(), String> {
        if !self.audit.is_healthy() {
            return Err("audit log: the last commit failed".into());
        }
        if let Some(policy) = &self.policy {
            policy.health()?;
            if !self.state.synced() {
                if let Some(rollback) = self.state.rollback() {
                    return Err(rollback.to_string());
                }
                return Err("control plane: no state received yet (a sidecar fails closed until its first snapshot)".into());
            }
        }
        for (what, file, kid) in &self.keys {
            match Signer::load_file(file) {
                Ok(s) if s.kid() == kid => {}
                Ok(s) => {
                    return Err(format!(
                        "{what}: the file now holds key {}, not {kid} in use",
                        s.kid()
                    ));
                }
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
        Ok(())
    }
}

/// The health services this server answers for: the server as a whole, ext_authz and
/// the control plane as they run here.
fn health_services(authz: bool, control: bool) -> Vec<&'static str> {
    let mut services = vec![""];
    if authz {
        services.push(AUTHZ_SERVICE);
    }
    if control {
        services.push(crate::control::CONTROL_SERVICE);
    }
    services
}

/// Checks readiness and, when the status differs from `last`, logs why and sets it for
/// every service. Returns the status now.
async fn publish_health(
    reporter: &tonic_health::server::HealthReporter,
    readiness: &Readiness,
    services: &[&'static str],
    last: Option<ServingStatus>,
) -> ServingStatus {
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
        for service in services {
            reporter.set_service_status(*service, status).await;
        }
    }
    status
}

/// Keeps the health service truthful: NOT_SERVING while the audit log, the policy or the
/// signing key is unusable, SERVING again once it recovers; each change is logged with its
/// reason. Also summarises shed Checks (overload) since the last tick.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    readiness: Arc<Readiness>,
    checker: Option<Arc<Checker>>,
    services: Vec<&'static str>,
    first: ServingStatus,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = Some(first);
    let mut ticks: u64 = 0;
    let mut shed_before = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        last = Some(publish_health(&reporter, &readiness, &services, last).await);
        let Some(checker) = &checker else {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {
                    for service in &services {
                        reporter.set_service_status(*service, ServingStatus::NotServing).await;
                    }
                    return;
                }
            }
            continue;
        };
        // Revoked token ids are useless once their tokens have expired: drop them now and
        // then (every minute) so the set holds only what can still be presented.
        ticks += 1;
        if ticks.is_multiple_of(240) {
            readiness
                .state
                .revocations
                .prune(crate::control::now_secs(), readiness.revocation_slack);
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
                for service in &services {
                    reporter.set_service_status(*service, ServingStatus::NotServing).await;
                }
                return;
            }
        }
    }
}
