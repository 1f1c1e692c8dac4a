//! The command line and `AEGIS_*` variables over the file: every option's flag.

use super::*;

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

// === impl Overrides ===

impl Overrides {
    pub(super) fn apply(&self, c: &mut Config) {
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
