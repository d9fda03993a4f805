//! TLS on the gRPC port (rustls with the ring provider; no OpenSSL), optionally mutual,
//! with certificates rotated without a restart.
//!
//! Every accepted connection is handshaken with the configuration current at that moment
//! (an [`ArcSwap`]), in a task of its own, so a slow or silent client never holds up the
//! others. The files are read again when their modification time or size changes (checked
//! every second) and on SIGHUP (`server::reload`). A new set that fails to load (a half-written key, a
//! certificate that does not match its key) is logged and the old one kept: the server
//! never stops accepting. Open connections are never cut by a rotation.

use std::{io, path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, RootCertStore, ServerConfig, server::WebPkiClientVerifier},
    server::TlsStream,
};
use tokio_stream::wrappers::ReceiverStream;

pub use crate::config::TlsFiles;

/// Why a set of TLS files could not be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// Which file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// Which file.
        path: String,
        /// What was missing or wrong.
        what: String,
    },
    /// rustls refused the set (a certificate that does not match its key, say).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn pem_error(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(path, format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Builds the server configuration from `files`.
///
/// # Errors
/// [`TlsError`] naming the file or the mismatch.
pub fn load(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| pem_error(&files.key, format!("no usable private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| pem_error(ca, format!("not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The current TLS configuration, reloaded when its files change or on SIGHUP.
#[derive(Debug)]
pub struct Reloading {
    current: Arc<ArcSwap<ServerConfig>>,
    watcher: JoinHandle<()>,
}

impl Drop for Reloading {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Reloading {
    /// Loads `files` and starts watching them.
    ///
    /// # Errors
    /// [`TlsError`] when the files cannot be used at start (the server does not start).
    pub fn start(files: TlsFiles) -> Result<Self, TlsError> {
        let current = Arc::new(ArcSwap::from_pointee(load(&files)?));
        let paths = [
            Some(&files.cert),
            Some(&files.key),
            files.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        let live = current.clone();
        let watcher = super::reload::watch("tls", paths, move || {
            live.store(Arc::new(load(&files).map_err(|e| e.to_string())?));
            Ok(())
        });
        Ok(Self { current, watcher })
    }

    /// Accepts connections on `listener` and hands on those whose handshake succeeds,
    /// each handshaken with the configuration current when it arrived.
    pub fn incoming(
        &self,
        listener: TcpListener,
        keepalive: Duration,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(1_024);
        let current = self.current.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, say: wait a moment rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let ka = socket2::TcpKeepalive::new().with_time(keepalive);
                let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka);
                let acceptor = TlsAcceptor::from(current.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            metrics::counter!(crate::telemetry::names::TLS_HANDSHAKE_FAILURES)
                                .increment(1);
                            tracing::debug!(%peer, error = %e, "TLS handshake refused");
                        }
                        Err(_) => {
                            metrics::counter!(crate::telemetry::names::TLS_HANDSHAKE_FAILURES)
                                .increment(1);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}
