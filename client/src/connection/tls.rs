//! TLS to the node (rustls, with the ring provider): which certificates to trust and which
//! name to check, for [`super::ConnectionOptions::tls`].

use rustls::ClientConfig;
use rustls::crypto::ring as provider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use crate::error::ClientError;

/// How to speak TLS to a node: the certificates trusted (the system's roots, or a CA file) and
/// the name the node's certificate must carry (by default, the IP address connected to).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the operating system's root certificates.
    pub fn system_roots() -> Result<ClientTls, ClientError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(ClientError::Tls(format!(
                "no usable system root certificates ({} errors)",
                found.errors.len()
            )));
        }
        Self::with_roots(roots)
    }

    /// Trusts the certificates (PEM) in `path` only: a private CA's, or the node's own.
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<ClientTls, ClientError> {
        let path = path.as_ref();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Tls(format!(
                "{}: no PEM certificate",
                path.display()
            )));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
        }
        Self::with_roots(roots)
    }

    fn with_roots(roots: rustls::RootCertStore) -> Result<ClientTls, ClientError> {
        let config = ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// The name the node's certificate must carry (a DNS name or an IP address), when it is
    /// not the address connected to.
    pub fn server_name(mut self, name: impl Into<String>) -> ClientTls {
        self.server_name = Some(name.into());
        self
    }

    /// Runs the TLS handshake over `stream`, connected to `peer`.
    pub(super) async fn connect(
        &self,
        stream: tokio::net::TcpStream,
        peer: IpAddr,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ClientError> {
        let name = match &self.server_name {
            Some(name) => ServerName::try_from(name.clone())
                .map_err(|e| ClientError::Tls(format!("server name {name:?}: {e}")))?,
            None => ServerName::IpAddress(peer.into()),
        };
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| ClientError::Tls(format!("handshake: {e}")))
    }
}
