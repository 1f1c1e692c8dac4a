//! TLS for the gRPC listeners (ext_authz, control plane) and for the clients that call
//! the control plane (a fleet sidecar's watch, `aegis ctl`): rustls with ring, through
//! tonic. PEM files are read and checked here so that a wrong file is named at start-up
//! rather than surfacing as a handshake failure later.
//!
//! Certificates are read once, at start-up: a rotated certificate takes a restart (a
//! rolling restart in Kubernetes; the README says so).

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

/// The server TLS settings of a listener (`setting` is `tls` or `control_tls`, for
/// errors); `None` when TLS is off.
pub fn server(setting: &str, t: &TlsConfig) -> Result<Option<ServerTlsConfig>, String> {
    let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
        return Ok(None);
    };
    let identity = identity(
        (&format!("{setting}.cert_file"), cert),
        (&format!("{setting}.key_file"), key),
    )?;
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &t.client_ca_file {
        let pem = certificates(&format!("{setting}.client_ca_file"), ca)?;
        config = config.client_ca_root(Certificate::from_pem(pem));
    }
    Ok(Some(config))
}

/// The files a client's TLS comes from, each with the setting or flag that named it (for
/// errors).
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientFiles<'a> {
    /// The CA bundle the server's certificate must chain to; `None`: the Mozilla roots.
    pub ca: Option<(&'a str, &'a Path)>,
    /// The client certificate for mTLS; `None`: no client certificate.
    pub cert: Option<(&'a str, &'a Path)>,
    /// The client certificate's private key.
    pub key: Option<(&'a str, &'a Path)>,
}

/// Client TLS for a control-plane URL: `None` for `http://`; for `https://`, trust the CA
/// file (else the Mozilla roots) and present the certificate and key when set (mTLS).
pub fn client(url: &str, files: ClientFiles<'_>) -> Result<Option<ClientTlsConfig>, String> {
    if !url.starts_with("https://") {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new();
    config = match files.ca {
        Some((setting, ca)) => {
            config.ca_certificate(Certificate::from_pem(certificates(setting, ca)?))
        }
        None => config.with_webpki_roots(),
    };
    match (files.cert, files.key) {
        (Some(cert), Some(key)) => config = config.identity(identity(cert, key)?),
        (None, None) => {}
        (Some((setting, _)), None) | (None, Some((setting, _))) => {
            return Err(format!(
                "{setting}: a client certificate needs both a certificate and its key"
            ));
        }
    }
    Ok(Some(config))
}

/// A certificate chain and its key, both checked.
fn identity(
    (cert_setting, cert): (&str, &Path),
    (key_setting, key): (&str, &Path),
) -> Result<Identity, String> {
    let cert_pem = certificates(cert_setting, cert)?;
    let key_pem = read(key_setting, key)?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{key_setting} {}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            key.display()
        )
    })?;
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// A PEM file holding at least one certificate, every one of which parses.
fn certificates(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(setting, path)?;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| format!("{setting} {}: bad PEM certificate: {e}", path.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!(
            "{setting} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(pem)
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{setting} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "not pem").expect("write");
        std::fs::write(&key, "not pem either").expect("write");
        let t = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            client_ca_file: None,
        };
        let err = server("tls", &t).expect_err("garbage refused");
        assert!(
            err.contains("tls.cert_file") && err.contains("no PEM certificate"),
            "{err}"
        );

        let missing = TlsConfig {
            cert_file: Some(dir.path().join("absent.pem")),
            ..t.clone()
        };
        let err = server("control_tls", &missing).expect_err("missing refused");
        assert!(
            err.contains("control_tls.cert_file") && err.contains("absent.pem"),
            "{err}"
        );

        assert!(server("tls", &TlsConfig::default()).expect("off").is_none());
        assert!(
            client("http://x:1", ClientFiles::default())
                .expect("plaintext")
                .is_none()
        );
    }
}
