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

mod flags;
mod validate;

pub use flags::Overrides;

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

impl ControlDatabase {
    /// The store a URL names: `sqlite:PATH` or `postgres://...` (`postgresql://`); the
    /// error quotes the URL without its password.
    pub fn parse(url: &str) -> Result<Self, String> {
        match url.split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => Ok(Self::Sqlite(PathBuf::from(path))),
            Some(("sqlite", _)) => Err(format!("{url:?}: sqlite: needs a file path")),
            Some(("postgres" | "postgresql", rest)) if rest.starts_with("//") => {
                Ok(Self::Postgres(url.to_owned()))
            }
            Some((scheme, _)) => Err(format!(
                "{}: the control store is sqlite:PATH or postgres://..., not {scheme:?}",
                redact_url(url)
            )),
            None => Err(format!(
                "{}: expected sqlite:PATH or postgres://...",
                redact_url(url)
            )),
        }
    }
}

/// A database URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // A password in the query too (`?password=...`, which libpq-style URLs accept).
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => {
            let kept: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            (rest, format!("?{}", kept.join("&")))
        }
        None => (rest, String::new()),
    };
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => rest.to_owned(),
    };
    format!("{scheme}://{rest}{query}")
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
        ControlDatabase::parse(url).map_err(|message| ConfigError::Invalid {
            setting: "control.database_url",
            message,
        })
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_urls_password_is_never_shown() {
        for (url, shown) in [
            (
                "postgres://aegis:hunter2@db:5432/aegis",
                "postgres://aegis:***@db:5432/aegis",
            ),
            (
                "postgres://aegis@db/aegis?password=hunter2&sslmode=disable",
                "postgres://aegis@db/aegis?password=***&sslmode=disable",
            ),
            (
                "postgres://db/aegis?user=a&PASSWORD=hunter2",
                "postgres://db/aegis?user=a&PASSWORD=***",
            ),
            ("postgres://db/aegis", "postgres://db/aegis"),
            (
                "sqlite:/var/lib/aegis/control.db",
                "sqlite:/var/lib/aegis/control.db",
            ),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }

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
