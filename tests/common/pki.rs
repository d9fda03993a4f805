//! Certificates the tests make themselves (rcgen), and TLS clients that use them.

use std::{path::PathBuf, time::Duration};

use geomatch::grpc::pb::nearby_client::NearbyClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{
    build::ping,
    fixtures::{SHANGHAI, north_of},
};

/// A test CA.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `sans`, named `cn`: (certificate PEM, key PEM).
    pub fn leaf(&self, cn: &str, sans: &[&str], expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = date_time_ymd(2019, 1, 1);
            params.not_after = date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A folder of PEM files for one test.
pub fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("geomatch-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `body` to `path` the way cert-manager and Vault agents do: a new file renamed
/// over the old one.
pub fn put(path: &std::path::Path, body: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A server certificate for 127.0.0.1 and localhost, written into `d`: the flags.
pub fn server_files(d: &std::path::Path, ca: &Ca) -> Vec<String> {
    let (cert, key) = ca.leaf("geomatch", &["localhost", "127.0.0.1"], false);
    put(&d.join("server.pem"), &cert);
    put(&d.join("server.key"), &key);
    vec![
        "--tls-cert".into(),
        d.join("server.pem").display().to_string(),
        "--tls-key".into(),
        d.join("server.key").display().to_string(),
    ]
}

/// A TLS connection trusting `ca`, presenting `identity` if given.
pub async fn connect(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether one call over a fresh connection succeeds.
pub async fn serves(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> bool {
    match connect(addr, ca, identity).await {
        Ok(ch) => NearbyClient::new(ch)
            // Far from the watches the tests open.
            .update_location(ping("tls:probe", north_of(SHANGHAI, 50_000.0)))
            .await
            .is_ok(),
        Err(_) => false,
    }
}
