//! A webhook address, parsed once: `[notify]` validation and the notifier share it.
//!
//! A bottom module (it imports nothing from the crate), so the configuration can check
//! its webhook URLs without importing the control plane.

/// A webhook address: `http[s]://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// host:port to connect to.
    pub authority: String,
    /// The Host header.
    pub host: String,
    /// The request path with its query: the webhook's secret, so errors never quote it.
    pub path: String,
    /// https: TLS, the server's certificate checked against the Mozilla roots (and
    /// `notify.ca_file`) for `host`.
    pub tls: bool,
}

impl Endpoint {
    /// Parses a webhook URL. Errors never quote the URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        // Errors never quote the URL: a webhook's path is its secret (Slack's are).
        let (rest, tls) = if let Some(rest) = url.strip_prefix("https://") {
            (rest, true)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (rest, false)
        } else {
            return Err("the URL must start with https:// or http://".into());
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if host.is_empty() || host.contains('@') || host.chars().any(char::is_whitespace) {
            return Err("the URL has no valid host".into());
        }
        let has_port = match host.rfind(':') {
            Some(i) => !host.ends_with(']') && host[i + 1..].parse::<u16>().is_ok(),
            None => false,
        };
        let authority = match (has_port, tls) {
            (true, _) => host.to_owned(),
            (false, true) => format!("{host}:443"),
            (false, false) => format!("{host}:80"),
        };
        Ok(Self {
            authority,
            host: host.to_owned(),
            path: path.to_owned(),
            tls,
        })
    }

    /// The TLS server name: the host without its port or IPv6 brackets.
    pub fn server_name(&self) -> Result<rustls_pki_types::ServerName<'static>, String> {
        let name = match self.host.rfind(':') {
            Some(i) if !self.host.ends_with(']') => &self.host[..i],
            _ => self.host.as_str(),
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        rustls_pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| format!("TLS server name {name:?}: {e}"))
    }
}
