//! Configuration: one struct, filled from defaults, then a TOML file (`--config` /
//! `AEGIS_CONFIG`), then `AEGIS_*` environment variables, then flags: later wins.
//! Every option has all three forms; the README lists them.
//!
//! ```toml
//! listen = "127.0.0.1:9191"
//! data_dir = "./aegis-data"
//! [policy]
//! bundle = "policies/"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::Severity;

/// A configuration problem, naming the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (the parser's message).
        message: String,
    },
    /// A setting has a value Aegis cannot use.
    #[error("{setting}: {message}")]
    Invalid {
        /// The setting's name as written in the file (`section.key`).
        setting: &'static str,
        /// What is wrong with its value.
        message: String,
    },
}

/// What `aegis serve` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Data plane and control plane in one process (the default).
    #[default]
    AllInOne,
    /// The control plane only, for a fleet of sidecars.
    ControlPlane,
    /// A data plane following a remote control plane (`control.url`).
    Sidecar,
}

/// What an approval's override token is bound to, beyond the exact call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverrideBinding {
    /// Redeemable only by a token of the session that raised the approval (the default):
    /// an approver approved *this* run's call, not the agent's calls in other sessions.
    #[default]
    Session,
    /// Redeemable by any token of the agent (the agent retries from another session).
    Agent,
}

/// All of Aegis's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `all-in-one`, `control-plane` or `sidecar` (implied by `control.url`).
    pub mode: Mode,
    /// ext_authz gRPC listen address (also serves health and reflection).
    pub listen: SocketAddr,
    /// Control-plane gRPC address (all-in-one and control-plane modes).
    pub control_listen: SocketAddr,
    /// Admin HTTP address: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// A plaintext gRPC listener serving only `grpc.health.v1.Health`, for kubelet's
    /// `grpc:` probes when the ext_authz or control-plane listener requires (m)TLS.
    pub health_listen: Option<SocketAddr>,
    /// Directory for the signing key and the audit database (created 0700).
    pub data_dir: PathBuf,
    /// Start even when the data directory or a key file is writable (or a private key
    /// readable) by someone else, with a warning (src/files.rs); for volumes that cannot
    /// have narrower modes. Default false: such a start is refused, naming the path.
    pub allow_insecure_files: bool,
    /// Seconds to wait for in-flight Checks on SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// Also serve ext_authz (and health) on this Unix domain socket, for an Envoy in the
    /// same pod; plaintext, guarded by the socket's mode (0660).
    pub listen_uds: Option<PathBuf>,
    /// The Ed25519 seed (64 hex digits) to sign with, read as is (e.g. a mounted Secret);
    /// unset: `data_dir/signing.key`, created on first use.
    pub signing_key_file: Option<PathBuf>,
    /// `[tls]`: TLS, and with `client_ca_file` mTLS, on the ext_authz TCP listener.
    pub tls: TlsConfig,
    /// `[control_tls]`: TLS, and with `client_ca_file` mTLS, on the control-plane listener.
    pub control_tls: TlsConfig,
    /// `[policy]`: the bundle, its signing keys and the evaluation limits.
    pub policy: PolicyConfig,
    /// `[token]`: the agent tokens the data plane accepts.
    pub token: TokenConfig,
    /// `[audit]`: the audit log's durability, checkpoints and witness.
    pub audit: AuditConfig,
    /// `[otlp]`: where spans are exported (none when unset).
    pub otlp: OtlpConfig,
    /// `[limits]`: request sizes and concurrency the data plane accepts.
    pub limits: LimitsConfig,
    /// `[control]`: the control plane (or, in a sidecar, the one it follows).
    pub control: ControlConfig,
    /// `[correlation]`: the attack-pattern thresholds.
    pub correlation: CorrelationConfig,
    /// `[notify]`: incident webhooks.
    pub notify: NotifyConfig,
}

/// `[tls]` / `[control_tls]`: a listener's certificate and, for mTLS, the CA its clients'
/// certificates must chain to. PEM files.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain (PEM), leaf first.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM bundle): mTLS.
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    fn validate(&self, setting: &'static str) -> Result<(), ConfigError> {
        let message = match (&self.cert_file, &self.key_file, &self.client_ca_file) {
            (Some(_), None, _) => "cert_file is set without key_file",
            (None, Some(_), _) => "key_file is set without cert_file",
            (None, None, Some(_)) => "client_ca_file (mTLS) needs cert_file and key_file",
            _ => return Ok(()),
        };
        Err(ConfigError::Invalid {
            setting,
            message: message.into(),
        })
    }
}

/// `[notify]`: incident webhooks, delivered by the control plane through a durable outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where incidents go, per tenant.
    pub webhooks: Vec<WebhookConfig>,
    /// First retry delay after a failed delivery; doubled per attempt (with jitter) ...
    pub retry_initial_ms: u64,
    /// ... up to this.
    pub retry_max_ms: u64,
    /// Attempts before a notification is given up (kept in the outbox as `failed`).
    pub max_attempts: u32,
    /// Time limit of one delivery.
    pub timeout_ms: u64,
    /// Extra CA certificates (PEM) trusted for https webhooks, besides the Mozilla roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            retry_initial_ms: 1_000,
            retry_max_ms: 300_000,
            max_attempts: 20,
            timeout_ms: 5_000,
            ca_file: None,
        }
    }
}

/// One `[[notify.webhooks]]` endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The tenant whose incidents go here, or `*` for every tenant.
    pub tenant: String,
    /// `https://` (or `http://`) URL of the receiver: a Slack incoming webhook, a SOAR, a relay.
    pub url: String,
    /// Least severity sent: low, medium, high or critical [default: low].
    #[serde(default = "default_min_severity")]
    pub min_severity: String,
    /// `slack` (Slack-compatible `text` and `blocks`) or `json` (the incident as JSON)
    /// [default: slack].
    #[serde(default = "default_webhook_format")]
    pub format: String,
}

fn default_min_severity() -> String {
    Severity::Low.as_str().into()
}

fn default_webhook_format() -> String {
    "slack".into()
}
/// `[correlation]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorrelationConfig {
    /// Run the correlation engine on this data plane's decisions.
    pub enabled: bool,
    /// `deny_storm`: this many denies of one agent ...
    pub deny_storm_count: u32,
    /// ... within this many seconds.
    pub deny_storm_window_secs: u64,
    /// `data_exfil_pattern`: longest time from the source action to the sink action.
    pub exfil_window_secs: u64,
    /// `approval_flood`: this many approval requests of one agent ...
    pub approval_flood_count: u32,
    /// ... within this many seconds.
    pub approval_flood_window_secs: u64,
    /// `runaway`: this many calls of one agent ...
    pub runaway_count: u32,
    /// ... within this many seconds.
    pub runaway_window_secs: u64,
    /// `trust_escalation`: longest time from the deny to the allow.
    pub trust_escalation_window_secs: u64,
    /// How long a non-threshold rule stays quiet for the same agent and call after it fires.
    pub quiet_secs: u64,
}

impl Default for CorrelationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            deny_storm_count: 5,
            deny_storm_window_secs: 60,
            exfil_window_secs: 120,
            approval_flood_count: 10,
            approval_flood_window_secs: 300,
            runaway_count: 20,
            runaway_window_secs: 10,
            trust_escalation_window_secs: 120,
            quiet_secs: 300,
        }
    }
}

/// File name of the signing key seed inside the data directory.
pub const SIGNING_KEY_FILE: &str = "signing.key";
/// File name of the public key inside the data directory.
pub const PUBLIC_KEY_FILE: &str = "signing.pub";
/// File name of the audit signing key seed inside the data directory.
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// File name of the audit public key inside the data directory.
pub const AUDIT_PUBLIC_KEY_FILE: &str = "audit.pub";

/// SQLite's `synchronous` setting for the audit database (plain data here; the audit
/// writer gives it its meaning).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every commit: a row whose Check was answered survives power loss.
    Full,
    /// WAL without fsync per commit: a committed row is in the OS's hands before its Check
    /// is answered, so it survives a crash or SIGKILL of the process, not a power loss.
    Normal,
}

/// `[control]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Control plane and all-in-one: where the control store lives. Unset: `control.db`
    /// in the data directory. `sqlite:PATH`: that SQLite file, which several control-plane
    /// processes on one host may share. `postgres://user:password@host:port/db`: a
    /// PostgreSQL database shared by control-plane replicas on any machines.
    pub database_url: Option<String>,
    /// Sidecar mode: the control plane to follow, e.g. `http://aegis-control:9193`.
    pub url: Option<String>,
    /// Sidecar mode: file holding the sidecar credential (`aegis operator issue --role
    /// sidecar`); or the credential itself in `AEGIS_CONTROL_TOKEN`.
    pub token_file: Option<PathBuf>,
    /// Sidecar mode: the name the control plane logs this sidecar under.
    pub sidecar_name: String,
    /// Sidecar mode: time limit of a call to the control plane from a Check (raising an
    /// approval, redeeming an override), in milliseconds.
    pub request_timeout_ms: u64,
    /// A tenant's SOC autonomy level (1-4) until one is set over the API.
    pub soc_autonomy_level: u32,
    /// How long a pending approval waits for an answer before it expires, in seconds.
    pub approval_ttl_secs: u64,
    /// Lifetime of an override token minted by an approval, in seconds.
    pub override_ttl_secs: u64,
    /// `session` (default): an override token is redeemed only by a token of the session
    /// that raised the approval; `agent`: by any token of the agent.
    pub override_binding: OverrideBinding,
    /// Most pending approvals per agent.
    pub max_pending_approvals: u32,
    /// Control plane: RequestApproval and ReportIncident calls a second one sidecar
    /// credential may make, after a burst of `sidecar_call_burst`; past that,
    /// RESOURCE_EXHAUSTED.
    pub sidecar_calls_per_sec: u32,
    /// The burst of calls allowed above `sidecar_calls_per_sec`.
    pub sidecar_call_burst: u32,
    /// Longest lifetime of an agent token, in seconds: the control plane and `aegis token
    /// issue` mint none longer, and every data plane refuses a token whose `exp - iat` is
    /// longer (`token_lifetime_too_long`), whoever signed it.
    pub max_token_ttl_secs: u64,
    /// Lifetime of operator credentials minted by `aegis operator issue`, in seconds.
    pub operator_ttl_secs: u64,
    /// Sidecar mode, `https://` URL: the CA bundle (PEM) the control plane's certificate
    /// must chain to; unset: the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Sidecar mode: the client certificate (PEM) presented to a control plane that
    /// requires mTLS, and its key.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM), with `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// File name of the control database in the data directory (the default store).
pub const CONTROL_DB_FILE: &str = "control.db";

/// Where the control store lives ([`Config::control_database`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlDatabase {
    /// A SQLite file (the embedded default: `control.db` in the data directory).
    Sqlite(PathBuf),
    /// A PostgreSQL database (a libpq URL, `postgres://user:password@host:port/db`),
    /// shared by several control-plane replicas.
    Postgres(String),
}

/// A database URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// `[policy]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Bundle directory or `.tar.gz`; unset: the default bundle built into the binary.
    pub bundle: Option<PathBuf>,
    /// The rule whose value is the decision.
    pub query: String,
    /// Time limit of one evaluation, in milliseconds, from the moment the Check asks for
    /// it (waiting for an evaluation thread included).
    pub eval_timeout_ms: u64,
    /// Threads that evaluate policies, off the async workers; 0: four per core, at
    /// least 8, at most 64.
    pub eval_threads: usize,
    /// How often the bundle's files are checked for changes, in milliseconds.
    pub watch_interval_ms: u64,
    /// Public key file(s) (64 hex digits, like `signing.pub`) bundles must be signed with:
    /// set, every bundle loaded must carry a `.signatures.json` that verifies with one of
    /// them. One path or a list (a list lets a signing key be rotated without a flag day).
    #[serde(deserialize_with = "one_or_many")]
    pub verification_key: Vec<PathBuf>,
}

/// A path or a list of paths.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

/// `[token]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// Required `iss` of agent tokens.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// Header carrying the token; `authorization` means `Authorization: Bearer <token>`.
    pub header: String,
    /// Lifetime of tokens minted by `aegis token issue`, in seconds.
    pub lifetime_secs: u64,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds.
    pub leeway_secs: u64,
    /// Verified tokens kept in the cache.
    pub cache_entries: usize,
    /// Largest token accepted, in bytes.
    pub max_bytes: usize,
    /// Extra trusted public keys (files of 64 hex digits), e.g. the control plane's.
    pub trusted_keys: Vec<PathBuf>,
}

/// `[audit]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// `normal` (default: each row is in the WAL before its Check is answered, which survives
    /// a crash or SIGKILL of the process) or `full` (also fsync per commit: survives power
    /// loss, at ~0.4 ms median and several ms p99 per commit on the disks measured).
    pub durability: Durability,
    /// Rows waiting for the writer before Checks fail closed with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Most rows in one group commit.
    pub max_batch: usize,
    /// The key checkpoints are signed with (64 hex digits, like `signing.key`). Unset:
    /// `data_dir/audit.key`, created on first start. Never the token-signing key: whoever
    /// can mint tokens cannot also sign the log.
    pub signing_key_file: Option<PathBuf>,
    /// Public keys of earlier audit keys (rotation): checkpoints they signed still verify
    /// at start-up and in `aegis audit verify`.
    pub trusted_keys: Vec<PathBuf>,
    /// Append every signed checkpoint to this file as a JSON line, outside the data
    /// directory (ideally another host's mount). `aegis audit verify --witness` reads it.
    pub witness_file: Option<PathBuf>,
    /// Publish the newest checkpoint at most this often (ms): the window between a commit
    /// and its publication, against the witness's volume. 0 publishes every checkpoint.
    pub witness_interval_ms: u64,
}

/// `[otlp]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; unset: `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// else no export.
    pub endpoint: Option<String>,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Spans waiting for export before new ones are dropped.
    pub queue_size: usize,
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body inspected; larger is denied 413.
    pub max_body_bytes: usize,
    /// Most request headers; more is denied 431.
    pub max_headers: usize,
    /// Most header bytes (names and values); more is denied 431.
    pub max_header_bytes: usize,
    /// Envoy's `with_request_body.max_request_bytes`: a body of this length is taken as
    /// whole only with a `content-length` saying so (0: no such check). It also sizes the
    /// largest CheckRequest decoded (`check::input::Limits::max_check_request_bytes`).
    pub envoy_max_request_bytes: usize,
    /// Most Checks in flight at once; past that a Check is shed at once with
    /// RESOURCE_EXHAUSTED (Envoy's `failure_mode_allow`/`status_on_error` decide).
    pub max_inflight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::AllInOne,
            listen: SocketAddr::from(([127, 0, 0, 1], 9191)),
            control_listen: SocketAddr::from(([127, 0, 0, 1], 9193)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9192)),
            health_listen: None,
            data_dir: PathBuf::from("./aegis-data"),
            allow_insecure_files: false,
            shutdown_grace_secs: 10,
            listen_uds: None,
            signing_key_file: None,
            tls: TlsConfig::default(),
            control_tls: TlsConfig::default(),
            policy: PolicyConfig::default(),
            token: TokenConfig::default(),
            audit: AuditConfig::default(),
            otlp: OtlpConfig::default(),
            limits: LimitsConfig::default(),
            control: ControlConfig::default(),
            correlation: CorrelationConfig::default(),
            notify: NotifyConfig::default(),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            url: None,
            token_file: None,
            sidecar_name: String::new(),
            request_timeout_ms: 1000,
            soc_autonomy_level: 1,
            approval_ttl_secs: 900,
            override_ttl_secs: 300,
            override_binding: OverrideBinding::Session,
            max_pending_approvals: 5,
            sidecar_calls_per_sec: 10,
            sidecar_call_burst: 50,
            max_token_ttl_secs: 86_400,
            database_url: None,
            operator_ttl_secs: 8 * 3600,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            bundle: None,
            query: "data.aegis.authz.decision".into(),
            eval_timeout_ms: 50,
            eval_threads: 0,
            watch_interval_ms: 1000,
            verification_key: Vec::new(),
        }
    }
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "aegis".into(),
            audience: "aegis-sidecar".into(),
            header: "x-aegis-token".into(),
            lifetime_secs: 900,
            leeway_secs: 5,
            cache_entries: 10_000,
            max_bytes: 8192,
            trusted_keys: Vec::new(),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Normal,
            queue_capacity: 8192,
            max_batch: 512,
            signing_key_file: None,
            trusted_keys: Vec::new(),
            witness_file: None,
            witness_interval_ms: 1000,
        }
    }
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: "aegis".into(),
            queue_size: 8192,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_headers: 128,
            max_header_bytes: 64 * 1024,
            envoy_max_request_bytes: 64 * 1024,
            max_inflight: 1024,
        }
    }
}

/// Flags and `AEGIS_*` variables (clap gives flags precedence over the environment).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long, env = "AEGIS_CONFIG")]
    pub config: Option<PathBuf>,
    /// all-in-one, control-plane or sidecar [default: all-in-one; sidecar with --control-plane].
    #[arg(long, env = "AEGIS_MODE")]
    pub mode: Option<Mode>,
    /// ext_authz listen address [default: 127.0.0.1:9191].
    #[arg(long, env = "AEGIS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Control-plane gRPC address [default: 127.0.0.1:9193].
    #[arg(long, env = "AEGIS_CONTROL_LISTEN")]
    pub control_listen: Option<SocketAddr>,
    /// Where the control store lives: sqlite:PATH or postgres://... [default: control.db in the data dir].
    #[arg(long = "control-database-url", env = "AEGIS_CONTROL_DATABASE_URL")]
    pub control_database_url: Option<String>,
    /// Follow this control plane (sidecar mode), e.g. http://aegis-control:9193.
    #[arg(long = "control-plane", env = "AEGIS_CONTROL_PLANE")]
    pub control_url: Option<String>,
    /// File holding the sidecar credential for --control-plane.
    #[arg(long = "control-plane-token-file", env = "AEGIS_CONTROL_TOKEN_FILE")]
    pub control_token_file: Option<PathBuf>,
    /// CA bundle (PEM) an https --control-plane's certificate must chain to [default: Mozilla roots].
    #[arg(long = "control-plane-ca-file", env = "AEGIS_CONTROL_CA_FILE")]
    pub control_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a control plane that requires mTLS.
    #[arg(long = "control-plane-cert-file", env = "AEGIS_CONTROL_CERT_FILE")]
    pub control_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --control-plane-cert-file.
    #[arg(long = "control-plane-key-file", env = "AEGIS_CONTROL_KEY_FILE")]
    pub control_key_file: Option<PathBuf>,
    /// Plaintext gRPC health-only listener, for kubelet's grpc probes [default: none].
    #[arg(long, env = "AEGIS_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Also serve ext_authz on this Unix domain socket (same-pod Envoy).
    #[arg(long, env = "AEGIS_LISTEN_UDS")]
    pub listen_uds: Option<PathBuf>,
    /// Sign with this Ed25519 seed file (64 hex digits) instead of DATA_DIR/signing.key.
    #[arg(long, env = "AEGIS_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// TLS certificate (PEM) of the ext_authz listener.
    #[arg(long, env = "AEGIS_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM) of the ext_authz listener.
    #[arg(long, env = "AEGIS_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Require ext_authz clients' certificates signed by this CA (mTLS).
    #[arg(long, env = "AEGIS_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// TLS certificate (PEM) of the control-plane listener.
    #[arg(long, env = "AEGIS_CONTROL_TLS_CERT_FILE")]
    pub control_tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM) of the control-plane listener.
    #[arg(long, env = "AEGIS_CONTROL_TLS_KEY_FILE")]
    pub control_tls_key_file: Option<PathBuf>,
    /// Require control-plane clients' certificates signed by this CA (mTLS).
    #[arg(long, env = "AEGIS_CONTROL_TLS_CLIENT_CA_FILE")]
    pub control_tls_client_ca_file: Option<PathBuf>,
    /// Name this sidecar reports to the control plane [default: the host name].
    #[arg(long, env = "AEGIS_SIDECAR_NAME")]
    pub sidecar_name: Option<String>,
    /// Time limit of a Check's call to the control plane in ms [default: 1000].
    #[arg(long, env = "AEGIS_CONTROL_REQUEST_TIMEOUT_MS")]
    pub control_request_timeout_ms: Option<u64>,
    /// Default SOC autonomy level of tenants, 1-4 [default: 1].
    #[arg(long, env = "AEGIS_SOC_AUTONOMY_LEVEL")]
    pub soc_autonomy_level: Option<u32>,
    /// Seconds a pending approval waits for an answer [default: 900].
    #[arg(long, env = "AEGIS_APPROVAL_TTL_SECS")]
    pub approval_ttl_secs: Option<u64>,
    /// Lifetime of override tokens in seconds [default: 300].
    #[arg(long, env = "AEGIS_OVERRIDE_TTL_SECS")]
    pub override_ttl_secs: Option<u64>,
    /// What an override token is bound to besides the call: session or agent [default: session].
    #[arg(long, env = "AEGIS_OVERRIDE_BINDING", value_enum)]
    pub override_binding: Option<OverrideBinding>,
    /// Most pending approvals per agent [default: 5].
    #[arg(long, env = "AEGIS_MAX_PENDING_APPROVALS")]
    pub max_pending_approvals: Option<u32>,
    /// Approvals raised and incidents reported a second per sidecar credential [default: 10].
    #[arg(long, env = "AEGIS_SIDECAR_CALLS_PER_SEC")]
    pub sidecar_calls_per_sec: Option<u32>,
    /// Burst of approvals and incidents per sidecar credential [default: 50].
    #[arg(long, env = "AEGIS_SIDECAR_CALL_BURST")]
    pub sidecar_call_burst: Option<u32>,
    /// Longest agent token lifetime the control plane mints, in seconds [default: 86400].
    #[arg(long, env = "AEGIS_MAX_TOKEN_TTL_SECS")]
    pub max_token_ttl_secs: Option<u64>,
    /// Lifetime of operator credentials in seconds [default: 28800].
    #[arg(long, env = "AEGIS_OPERATOR_TTL_SECS")]
    pub operator_ttl_secs: Option<u64>,
    /// Run the correlation engine on this data plane's decisions [default: true].
    #[arg(long, env = "AEGIS_CORRELATION")]
    pub correlation: Option<bool>,
    /// Admin HTTP address (/metrics, /healthz, /readyz) [default: 127.0.0.1:9192].
    #[arg(long, env = "AEGIS_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Data directory [default: ./aegis-data].
    #[arg(long, env = "AEGIS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Start even with a group/other-writable data directory or key file, warning instead
    /// of refusing [default: false].
    #[arg(long, env = "AEGIS_ALLOW_INSECURE_FILES")]
    pub allow_insecure_files: Option<bool>,
    /// Seconds to wait for in-flight Checks at shutdown [default: 10].
    #[arg(long, env = "AEGIS_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Policy bundle directory or .tar.gz [default: the built-in bundle].
    #[arg(long, env = "AEGIS_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// Decision rule [default: data.aegis.authz.decision].
    #[arg(long, env = "AEGIS_POLICY_QUERY")]
    pub policy_query: Option<String>,
    /// Evaluation time limit in ms [default: 50].
    #[arg(long, env = "AEGIS_EVAL_TIMEOUT_MS")]
    pub eval_timeout_ms: Option<u64>,
    /// Policy evaluation threads [default: 0, four per core, 8 to 64].
    #[arg(long, env = "AEGIS_EVAL_THREADS")]
    pub eval_threads: Option<usize>,
    /// Bundle change polling interval in ms [default: 1000].
    #[arg(long, env = "AEGIS_WATCH_INTERVAL_MS")]
    pub watch_interval_ms: Option<u64>,
    /// Public key file bundles must be signed with (repeatable; env: comma-separated)
    /// [default: none, signatures not checked].
    #[arg(
        long = "bundle-verification-key",
        env = "AEGIS_BUNDLE_VERIFICATION_KEY",
        value_delimiter = ','
    )]
    pub bundle_verification_key: Vec<PathBuf>,
    /// Required token issuer [default: aegis].
    #[arg(long, env = "AEGIS_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// Required token audience [default: aegis-sidecar].
    #[arg(long, env = "AEGIS_TOKEN_AUDIENCE")]
    pub token_audience: Option<String>,
    /// Token header; `authorization` means Bearer [default: x-aegis-token].
    #[arg(long, env = "AEGIS_TOKEN_HEADER")]
    pub token_header: Option<String>,
    /// Lifetime of minted tokens in seconds [default: 900].
    #[arg(long, env = "AEGIS_TOKEN_LIFETIME_SECS")]
    pub token_lifetime_secs: Option<u64>,
    /// Clock skew tolerated in seconds [default: 5].
    #[arg(long, env = "AEGIS_TOKEN_LEEWAY_SECS")]
    pub token_leeway_secs: Option<u64>,
    /// Verified-token cache entries [default: 10000].
    #[arg(long, env = "AEGIS_TOKEN_CACHE_ENTRIES")]
    pub token_cache_entries: Option<usize>,
    /// Largest token in bytes [default: 8192].
    #[arg(long, env = "AEGIS_TOKEN_MAX_BYTES")]
    pub token_max_bytes: Option<usize>,
    /// Extra trusted public key file (repeatable; env: comma-separated).
    #[arg(
        long = "trusted-key",
        env = "AEGIS_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    pub trusted_keys: Vec<PathBuf>,
    /// Audit durability: normal or full [default: normal].
    #[arg(long, env = "AEGIS_AUDIT_DURABILITY")]
    pub audit_durability: Option<Durability>,
    /// Audit queue capacity [default: 8192].
    #[arg(long, env = "AEGIS_AUDIT_QUEUE_CAPACITY")]
    pub audit_queue_capacity: Option<usize>,
    /// Most rows per audit commit [default: 512].
    #[arg(long, env = "AEGIS_AUDIT_MAX_BATCH")]
    pub audit_max_batch: Option<usize>,
    /// Audit checkpoint signing key file [default: DATA_DIR/audit.key].
    #[arg(long, env = "AEGIS_AUDIT_SIGNING_KEY_FILE")]
    pub audit_signing_key_file: Option<PathBuf>,
    /// Public key of an earlier audit key (repeatable; env: comma-separated).
    #[arg(
        long = "audit-trusted-key",
        env = "AEGIS_AUDIT_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    pub audit_trusted_keys: Vec<PathBuf>,
    /// Append-only file every signed audit checkpoint is published to [default: none].
    #[arg(long, env = "AEGIS_AUDIT_WITNESS_FILE")]
    pub audit_witness_file: Option<PathBuf>,
    /// Publish the newest audit checkpoint at most every this many ms; 0: every one
    /// [default: 1000].
    #[arg(long, env = "AEGIS_AUDIT_WITNESS_INTERVAL_MS")]
    pub audit_witness_interval_ms: Option<u64>,
    /// OTLP/gRPC endpoint [default: OTEL_EXPORTER_OTLP_ENDPOINT, else none].
    #[arg(long, env = "AEGIS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// service.name of spans [default: aegis].
    #[arg(long, env = "AEGIS_OTLP_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,
    /// Span export queue size [default: 8192].
    #[arg(long, env = "AEGIS_OTLP_QUEUE_SIZE")]
    pub otlp_queue_size: Option<usize>,
    /// Largest body inspected in bytes [default: 1048576].
    #[arg(long, env = "AEGIS_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Most request headers [default: 128].
    #[arg(long, env = "AEGIS_MAX_HEADERS")]
    pub max_headers: Option<usize>,
    /// Most header bytes [default: 65536].
    #[arg(long, env = "AEGIS_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Envoy's with_request_body.max_request_bytes [default: 65536].
    #[arg(long, env = "AEGIS_ENVOY_MAX_REQUEST_BYTES")]
    pub envoy_max_request_bytes: Option<usize>,
    /// Most Checks in flight before new ones are shed [default: 1024].
    #[arg(long, env = "AEGIS_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
}

// === impl Config ===

impl Config {
    /// Defaults, then the file, then the overrides; validated.
    pub fn load(o: &Overrides) -> Result<Self, ConfigError> {
        let mut c = match &o.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        o.apply(&mut c);
        // A control-plane URL means following it, unless a mode was chosen explicitly.
        if c.control.url.is_some() && c.mode == Mode::AllInOne && o.mode.is_none() {
            c.mode = Mode::Sidecar;
        }
        if c.control.sidecar_name.is_empty() {
            c.control.sidecar_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "sidecar".into());
        }
        if c.otlp.endpoint.is_none() {
            c.otlp.endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty());
        }
        c.validate()?;
        Ok(c)
    }

    /// Parses a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError::File {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// The control store `control.database_url` names.
    pub fn control_database(&self) -> Result<ControlDatabase, ConfigError> {
        let Some(url) = &self.control.database_url else {
            return Ok(ControlDatabase::Sqlite(self.data_dir.join(CONTROL_DB_FILE)));
        };
        let invalid = |message: String| ConfigError::Invalid {
            setting: "control.database_url",
            message,
        };
        match url.split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => {
                Ok(ControlDatabase::Sqlite(PathBuf::from(path)))
            }
            Some(("sqlite", _)) => Err(invalid(format!("{url:?}: sqlite: needs a file path"))),
            Some(("postgres" | "postgresql", rest)) if rest.starts_with("//") => {
                Ok(ControlDatabase::Postgres(url.clone()))
            }
            Some((scheme, _)) => Err(invalid(format!(
                "{}: the control store is sqlite:PATH or postgres://..., not {scheme:?}",
                redact_url(url)
            ))),
            None => Err(invalid(format!(
                "{}: expected sqlite:PATH or postgres://...",
                redact_url(url)
            ))),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.control_database()?;
        let positive = |setting: &'static str, v: u64| {
            if v == 0 {
                Err(ConfigError::Invalid {
                    setting,
                    message: "must be greater than 0".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("policy.eval_timeout_ms", self.policy.eval_timeout_ms)?;
        positive("token.lifetime_secs", self.token.lifetime_secs)?;
        positive("token.cache_entries", self.token.cache_entries as u64)?;
        positive("token.max_bytes", self.token.max_bytes as u64)?;
        positive("audit.queue_capacity", self.audit.queue_capacity as u64)?;
        positive("audit.max_batch", self.audit.max_batch as u64)?;
        positive("otlp.queue_size", self.otlp.queue_size as u64)?;
        positive("limits.max_inflight", self.limits.max_inflight as u64)?;
        positive(
            "control.request_timeout_ms",
            self.control.request_timeout_ms,
        )?;
        positive("control.approval_ttl_secs", self.control.approval_ttl_secs)?;
        positive("control.override_ttl_secs", self.control.override_ttl_secs)?;
        positive(
            "control.max_pending_approvals",
            u64::from(self.control.max_pending_approvals),
        )?;
        positive(
            "control.sidecar_calls_per_sec",
            u64::from(self.control.sidecar_calls_per_sec),
        )?;
        positive(
            "control.sidecar_call_burst",
            u64::from(self.control.sidecar_call_burst),
        )?;
        positive(
            "control.max_token_ttl_secs",
            self.control.max_token_ttl_secs,
        )?;
        positive("control.operator_ttl_secs", self.control.operator_ttl_secs)?;
        positive("notify.retry_initial_ms", self.notify.retry_initial_ms)?;
        positive("notify.retry_max_ms", self.notify.retry_max_ms)?;
        positive("notify.max_attempts", u64::from(self.notify.max_attempts))?;
        positive("notify.timeout_ms", self.notify.timeout_ms)?;
        for (n, w) in self.notify.webhooks.iter().enumerate() {
            let invalid = |message: String| ConfigError::Invalid {
                setting: "notify.webhooks",
                message: format!("webhook {} (tenant {:?}): {message}", n + 1, w.tenant),
            };
            if w.tenant != "*" {
                crate::ids::check_id("tenant", &w.tenant).map_err(invalid)?;
            }
            crate::endpoint::Endpoint::parse(&w.url).map_err(invalid)?;
            if w.min_severity.parse::<Severity>().is_err() {
                return Err(invalid(format!(
                    "min_severity {:?} is not low, medium, high or critical",
                    w.min_severity
                )));
            }
            if !matches!(w.format.as_str(), "slack" | "json") {
                return Err(invalid(format!(
                    "format {:?} is not slack or json",
                    w.format
                )));
            }
        }
        let c = &self.correlation;
        for (setting, v) in [
            (
                "correlation.deny_storm_count",
                u64::from(c.deny_storm_count),
            ),
            (
                "correlation.deny_storm_window_secs",
                c.deny_storm_window_secs,
            ),
            ("correlation.exfil_window_secs", c.exfil_window_secs),
            (
                "correlation.approval_flood_count",
                u64::from(c.approval_flood_count),
            ),
            (
                "correlation.approval_flood_window_secs",
                c.approval_flood_window_secs,
            ),
            ("correlation.runaway_count", u64::from(c.runaway_count)),
            ("correlation.runaway_window_secs", c.runaway_window_secs),
            (
                "correlation.trust_escalation_window_secs",
                c.trust_escalation_window_secs,
            ),
        ] {
            positive(setting, v)?;
        }
        // The engine keeps up to `count` decisions per agent and rule and reports them all
        // as evidence: a bound keeps both (and the report under gRPC's message limit) small.
        const MAX_COUNT: u32 = 1000;
        for (setting, v) in [
            ("correlation.deny_storm_count", c.deny_storm_count),
            ("correlation.approval_flood_count", c.approval_flood_count),
            ("correlation.runaway_count", c.runaway_count),
        ] {
            if v > MAX_COUNT {
                return Err(ConfigError::Invalid {
                    setting,
                    message: format!("{v} is more than {MAX_COUNT}"),
                });
            }
        }
        // Windows are nanoseconds inside the engine: a century is plenty.
        const MAX_WINDOW_SECS: u64 = 100 * 365 * 86_400;
        for (setting, v) in [
            (
                "correlation.deny_storm_window_secs",
                c.deny_storm_window_secs,
            ),
            ("correlation.exfil_window_secs", c.exfil_window_secs),
            (
                "correlation.approval_flood_window_secs",
                c.approval_flood_window_secs,
            ),
            ("correlation.runaway_window_secs", c.runaway_window_secs),
            (
                "correlation.trust_escalation_window_secs",
                c.trust_escalation_window_secs,
            ),
            ("correlation.quiet_secs", c.quiet_secs),
        ] {
            if v > MAX_WINDOW_SECS {
                return Err(ConfigError::Invalid {
                    setting,
                    message: format!("{v} s is more than a century"),
                });
            }
        }
        if !(1..=4).contains(&self.control.soc_autonomy_level) {
            return Err(ConfigError::Invalid {
                setting: "control.soc_autonomy_level",
                message: format!("{} is not 1-4", self.control.soc_autonomy_level),
            });
        }
        match (self.mode, &self.control.url) {
            (Mode::Sidecar, None) => {
                return Err(ConfigError::Invalid {
                    setting: "control.url",
                    message: "sidecar mode follows a control plane: set --control-plane URL".into(),
                });
            }
            (Mode::Sidecar, Some(url))
                if !url.starts_with("http://") && !url.starts_with("https://") =>
            {
                return Err(ConfigError::Invalid {
                    setting: "control.url",
                    message: format!("{url:?} must start with http:// or https://"),
                });
            }
            (Mode::Sidecar, _)
                if self.control.token_file.is_none()
                    && std::env::var("AEGIS_CONTROL_TOKEN").map_or(true, |t| t.is_empty()) =>
            {
                return Err(ConfigError::Invalid {
                    setting: "control.token_file",
                    message: "a sidecar needs its credential: --control-plane-token-file FILE \
                              or AEGIS_CONTROL_TOKEN (aegis operator issue --role sidecar --tenant <tenant>)"
                        .into(),
                });
            }
            _ => {}
        }
        self.tls.validate("tls")?;
        self.control_tls.validate("control_tls")?;
        match (&self.control.cert_file, &self.control.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    setting: "control.cert_file",
                    message: "the sidecar's client certificate needs both cert_file and key_file"
                        .into(),
                });
            }
            _ => {}
        }
        if let Some(url) = &self.control.url
            && !url.starts_with("https://")
            && (self.control.ca_file.is_some() || self.control.cert_file.is_some())
        {
            return Err(ConfigError::Invalid {
                setting: "control.url",
                message: format!(
                    "{url:?}: control.ca_file / cert_file are set, so the URL must be https://"
                ),
            });
        }
        if self.policy.query.split('.').next() != Some("data") {
            return Err(ConfigError::Invalid {
                setting: "policy.query",
                message: format!("{:?} must start with data.", self.policy.query),
            });
        }
        if self.token.header.is_empty()
            || self
                .token
                .header
                .chars()
                .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
        {
            return Err(ConfigError::Invalid {
                setting: "token.header",
                message: "must be a lower-case header name".into(),
            });
        }
        Ok(())
    }

    /// The file the signing key is read from: `signing_key_file`, else
    /// `data_dir/signing.key`.
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(SIGNING_KEY_FILE))
    }

    /// The file the audit key is read from: `audit.signing_key_file`, else
    /// `data_dir/audit.key`.
    pub fn audit_key_path(&self) -> PathBuf {
        self.audit
            .signing_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(AUDIT_KEY_FILE))
    }

    /// The evaluation time limit.
    pub fn eval_timeout(&self) -> Duration {
        Duration::from_millis(self.policy.eval_timeout_ms)
    }
}

// === impl Overrides ===

impl Overrides {
    fn apply(&self, c: &mut Config) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut c.mode, &self.mode);
        set(&mut c.listen, &self.listen);
        set(&mut c.control_listen, &self.control_listen);
        if self.control_url.is_some() {
            c.control.url = self.control_url.clone();
        }
        if self.control_database_url.is_some() {
            c.control.database_url = self.control_database_url.clone();
        }
        if self.control_token_file.is_some() {
            c.control.token_file = self.control_token_file.clone();
        }
        set(&mut c.control.sidecar_name, &self.sidecar_name);
        // Optional paths: a flag or variable sets them, nothing unsets them.
        for (dst, src) in [
            (&mut c.control.ca_file, &self.control_ca_file),
            (&mut c.control.cert_file, &self.control_cert_file),
            (&mut c.control.key_file, &self.control_key_file),
            (&mut c.listen_uds, &self.listen_uds),
            (&mut c.signing_key_file, &self.signing_key_file),
            (&mut c.tls.cert_file, &self.tls_cert_file),
            (&mut c.tls.key_file, &self.tls_key_file),
            (&mut c.tls.client_ca_file, &self.tls_client_ca_file),
            (&mut c.control_tls.cert_file, &self.control_tls_cert_file),
            (&mut c.control_tls.key_file, &self.control_tls_key_file),
            (
                &mut c.control_tls.client_ca_file,
                &self.control_tls_client_ca_file,
            ),
        ] {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        set(
            &mut c.control.request_timeout_ms,
            &self.control_request_timeout_ms,
        );
        set(&mut c.control.soc_autonomy_level, &self.soc_autonomy_level);
        set(&mut c.control.approval_ttl_secs, &self.approval_ttl_secs);
        set(&mut c.control.override_ttl_secs, &self.override_ttl_secs);
        set(&mut c.control.override_binding, &self.override_binding);
        set(
            &mut c.control.max_pending_approvals,
            &self.max_pending_approvals,
        );
        set(
            &mut c.control.sidecar_calls_per_sec,
            &self.sidecar_calls_per_sec,
        );
        set(&mut c.control.sidecar_call_burst, &self.sidecar_call_burst);
        set(&mut c.control.max_token_ttl_secs, &self.max_token_ttl_secs);
        set(&mut c.control.operator_ttl_secs, &self.operator_ttl_secs);
        set(&mut c.correlation.enabled, &self.correlation);
        set(&mut c.admin_listen, &self.admin_listen);
        if self.health_listen.is_some() {
            c.health_listen = self.health_listen;
        }
        set(&mut c.data_dir, &self.data_dir);
        set(&mut c.allow_insecure_files, &self.allow_insecure_files);
        set(&mut c.shutdown_grace_secs, &self.shutdown_grace_secs);
        if self.bundle.is_some() {
            c.policy.bundle = self.bundle.clone();
        }
        set(&mut c.policy.query, &self.policy_query);
        set(&mut c.policy.eval_timeout_ms, &self.eval_timeout_ms);
        set(&mut c.policy.eval_threads, &self.eval_threads);
        set(&mut c.policy.watch_interval_ms, &self.watch_interval_ms);
        if !self.bundle_verification_key.is_empty() {
            c.policy.verification_key = self.bundle_verification_key.clone();
        }
        set(&mut c.token.issuer, &self.token_issuer);
        set(&mut c.token.audience, &self.token_audience);
        set(&mut c.token.header, &self.token_header);
        set(&mut c.token.lifetime_secs, &self.token_lifetime_secs);
        set(&mut c.token.leeway_secs, &self.token_leeway_secs);
        set(&mut c.token.cache_entries, &self.token_cache_entries);
        set(&mut c.token.max_bytes, &self.token_max_bytes);
        if !self.trusted_keys.is_empty() {
            c.token.trusted_keys = self.trusted_keys.clone();
        }
        set(&mut c.audit.durability, &self.audit_durability);
        set(&mut c.audit.queue_capacity, &self.audit_queue_capacity);
        set(&mut c.audit.max_batch, &self.audit_max_batch);
        if self.audit_signing_key_file.is_some() {
            c.audit.signing_key_file = self.audit_signing_key_file.clone();
        }
        if !self.audit_trusted_keys.is_empty() {
            c.audit.trusted_keys = self.audit_trusted_keys.clone();
        }
        if self.audit_witness_file.is_some() {
            c.audit.witness_file = self.audit_witness_file.clone();
        }
        set(
            &mut c.audit.witness_interval_ms,
            &self.audit_witness_interval_ms,
        );
        if self.otlp_endpoint.is_some() {
            c.otlp.endpoint = self.otlp_endpoint.clone();
        }
        set(&mut c.otlp.service_name, &self.otlp_service_name);
        set(&mut c.otlp.queue_size, &self.otlp_queue_size);
        set(&mut c.limits.max_body_bytes, &self.max_body_bytes);
        set(&mut c.limits.max_headers, &self.max_headers);
        set(&mut c.limits.max_header_bytes, &self.max_header_bytes);
        set(
            &mut c.limits.envoy_max_request_bytes,
            &self.envoy_max_request_bytes,
        );
        set(&mut c.limits.max_inflight, &self.max_inflight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("aegis.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:7000\"\n[policy]\neval_timeout_ms = 20\n[audit]\ndurability = \"normal\"\n").expect("write");
        let o = Overrides {
            config: Some(path.clone()),
            eval_timeout_ms: Some(30),
            ..Default::default()
        };
        let c = Config::load(&o).expect("loads");
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.policy.eval_timeout_ms, 30);
        assert_eq!(c.audit.durability, Durability::Normal);

        // One verification key or a list; the flag replaces the file's.
        std::fs::write(&path, "[policy]\nverification_key = \"a.pub\"\n").expect("write");
        let one = Overrides {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = Config::load(&one).expect("loads");
        assert_eq!(c.policy.verification_key, [PathBuf::from("a.pub")]);
        std::fs::write(
            &path,
            "[policy]\nverification_key = [\"a.pub\", \"b.pub\"]\n",
        )
        .expect("write");
        let c = Config::load(&one).expect("loads");
        assert_eq!(c.policy.verification_key.len(), 2);
        let flag = Overrides {
            bundle_verification_key: vec![PathBuf::from("c.pub")],
            ..one
        };
        let c = Config::load(&flag).expect("loads");
        assert_eq!(c.policy.verification_key, [PathBuf::from("c.pub")]);

        std::fs::write(&path, "[policy]\nbundel = \"x\"\n").expect("write");
        let err = Config::load(&o)
            .expect_err("unknown key refused")
            .to_string();
        assert!(err.contains("bundel"), "{err}");
    }
}
