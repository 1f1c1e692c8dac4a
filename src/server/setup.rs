//! What the start composes from the configuration: the audit log, the token keys and
//! identifier, the control settings and the sidecar credential.

use super::*;

pub(super) fn control_settings(config: &Config) -> Settings {
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
pub(super) fn control_client_tls(
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
pub(super) fn sidecar_credential(config: &Config) -> Result<String, StartError> {
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
pub(super) fn open_audit(
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
        gather: crate::audit::store::gather_window().map_err(StartError::Config)?,
        wal_restart_frames: crate::audit::store::wal_restart_frames()
            .map_err(StartError::Config)?,
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
pub(super) fn token_keys(config: &Config, signer: &Signer) -> Result<KeyRing, KeyError> {
    let mut keys = KeyRing::default();
    keys.insert(signer.verifying_key());
    for path in &config.token.trusted_keys {
        keys.insert(crate::keys::read_public_key(path)?);
    }
    Ok(keys)
}

/// The agent-token identifier `aegis serve` builds from `config` (also what `aegis bench
/// --mixes` times).
pub(crate) fn identifier(
    config: &Config,
    keys: KeyRing,
    revocations: Arc<Revocations>,
) -> Identifier {
    let policy = TokenPolicy {
        issuer: config.token.issuer.clone(),
        audience: config.token.audience.clone(),
        leeway_secs: i64::try_from(config.token.leeway_secs).unwrap_or(i64::MAX),
        max_bytes: config.token.max_bytes,
        max_lifetime_secs: i64::try_from(config.control.max_token_ttl_secs).unwrap_or(i64::MAX),
    };
    Identifier::new(keys, policy, revocations, config.token.cache_entries)
}
