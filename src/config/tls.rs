//! TLS flags: the certificate and key the gRPC port serves, and the CA of mutual TLS.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

/// The PEM files TLS is served from (read again when they change, or on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Mutual TLS: the CA a client's certificate must chain to. `None`: any client.
    pub client_ca: Option<PathBuf>,
}

/// TLS on the gRPC port. Without `--tls-cert`, the port serves plaintext (the loopback /
/// development default).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM certificate chain: the gRPC port then serves TLS only (with --tls-key). Read
    /// again when the file changes or on SIGHUP; new connections get the new one.
    #[arg(long, env = "GEOMATCH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "GEOMATCH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): mutual TLS, a client without a certificate chaining to one
    /// of them is refused during the handshake.
    #[arg(long, env = "GEOMATCH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, when TLS is on.
    ///
    /// # Errors
    /// A one-line reason when the flags do not go together.
    pub fn settings(&self) -> anyhow::Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })),
            (None, None) if self.tls_client_ca.is_some() => {
                bail!("--tls-client-ca: needs --tls-cert and --tls-key (mutual TLS is TLS)")
            }
            (None, None) => Ok(None),
            (Some(_), None) => bail!("--tls-cert: needs --tls-key"),
            (None, Some(_)) => bail!("--tls-key: needs --tls-cert"),
        }
    }
}
