//! TLS to PostgreSQL, with rustls (already in the tree under tonic), so the control state
//! and the credentials in the DSN do not cross the network in the clear.
//!
//! The DSN speaks libpq's words: `sslmode=require`, `verify-ca` or `verify-full` turn TLS on
//! and `sslrootcert=PATH` names the certificate authority (PEM) to trust, else the Mozilla
//! roots (webpki-roots) are. Whichever mode, a TLS connection verifies the server's
//! certificate and its name, as libpq's `verify-full` does: a certificate that is not
//! checked protects against a passive reader only, and the control store is worth an
//! active attacker. `sslmode=disable` or `prefer` (the default) keep a plain connection,
//! as before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use crate::control::ControlError;

/// The DSN as tokio-postgres reads it, and the TLS it asks for (None: plain).
#[derive(Debug)]
pub(super) struct Dsn {
    /// The DSN without `sslrootcert`, `sslmode=verify-*` written as `require`.
    pub(super) url: String,
    /// The client configuration TLS connections use.
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
}

/// Reads the TLS words of `url` (`shown`: the URL without its password, for errors).
pub(super) fn dsn(url: &str, shown: &str) -> Result<Dsn, ControlError> {
    let bad = |m: String| ControlError::Store(format!("control.database_url {shown}: {m}"));
    // The query starts after the userinfo (a password may hold `?` or `&`).
    let host_at = url.rfind('@').map_or(0, |at| at + 1);
    let (base, query) = match url.get(host_at..).and_then(|rest| rest.find('?')) {
        Some(q) => (
            url.get(..host_at + q).unwrap_or(url),
            url.get(host_at + q + 1..).unwrap_or(""),
        ),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let (mut mode, mut root) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", m)) => mode = Some(m.to_owned()),
            Some(("sslrootcert", path)) => root = Some(path.to_owned()),
            _ => kept.push(pair.to_owned()),
        }
    }
    let tls = match mode.as_deref() {
        None | Some("disable" | "prefer") => {
            if root.is_some() {
                return Err(bad(
                    "sslrootcert is set but sslmode is not require, verify-ca or verify-full \
                     (the connection would not use TLS)"
                        .into(),
                ));
            }
            None
        }
        Some("require" | "verify-ca" | "verify-full") => {
            kept.push("sslmode=require".into());
            Some(Arc::new(client_config(root.as_deref()).map_err(bad)?))
        }
        Some(other) => {
            return Err(bad(format!(
                "sslmode {other:?} is not disable, prefer, require, verify-ca or verify-full"
            )));
        }
    };
    if let Some(m) = mode
        .as_deref()
        .filter(|m| matches!(*m, "disable" | "prefer"))
    {
        kept.push(format!("sslmode={m}"));
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Dsn { url, tls })
}

/// A rustls client configuration trusting `root` (a PEM file) or the Mozilla roots.
fn client_config(root: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("sslrootcert {path}: {e}"))?;
            let mut n = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("sslrootcert {path}: bad PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("sslrootcert {path}: no PEM certificate in it"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Makes a TLS connector per connection, for the server's name.
#[derive(Clone)]
pub(super) struct MakeTls(pub(super) Arc<rustls::ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<Connect> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Connect {
            connector: TlsConnector::from(self.0.clone()),
            name,
        })
    }
}

/// The TLS handshake for one connection.
pub(super) struct Connect {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(Stream(Box::new(tls)))
        })
    }
}

/// A TLS connection to the server.
pub struct Stream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM channel binding is not offered; the server's certificate is verified.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_words_are_read_and_the_rest_kept() {
        let plain = dsn("postgres://u@h/db?application_name=x", "shown").expect("plain");
        assert_eq!(plain.url, "postgres://u@h/db?application_name=x");
        assert!(plain.tls.is_none());
        let tls = dsn(
            "postgres://u@h/db?sslmode=verify-full&connect_timeout=3",
            "s",
        )
        .expect("verify-full with the Mozilla roots");
        assert_eq!(
            tls.url,
            "postgres://u@h/db?connect_timeout=3&sslmode=require"
        );
        assert!(tls.tls.is_some());
        let err = dsn("postgres://u@h/db?sslmode=allow", "shown").expect_err("allow");
        assert!(err.to_string().contains("sslmode \"allow\""), "{err}");
        let err = dsn("postgres://u@h/db?sslrootcert=/x.pem", "shown").expect_err("no mode");
        assert!(err.to_string().contains("sslrootcert is set"), "{err}");
        // A password holding `?` and `&` is not read as the query.
        let odd = dsn(
            "postgres://u:p?sslmode=disable&x@h/db?sslmode=verify-full",
            "s",
        )
        .expect("odd password");
        assert!(odd.tls.is_some(), "the real query asks for TLS");
        assert_eq!(
            odd.url,
            "postgres://u:p?sslmode=disable&x@h/db?sslmode=require"
        );
        let err = dsn(
            "postgres://u@h/db?sslmode=require&sslrootcert=/nowhere.pem",
            "shown",
        )
        .expect_err("missing file");
        assert!(err.to_string().contains("/nowhere.pem"), "{err}");
    }
}
