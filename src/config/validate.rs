//! What a configuration must satisfy before anything starts; each error names its
//! setting.

use super::*;

impl Config {
    /// Checks every setting; the first problem found, naming its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
}
