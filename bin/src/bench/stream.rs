//! A bench connection's byte stream: plain TCP, or TLS (rustls) to a node with `[tls]`, so the
//! same scenarios measure both (`confab-bench --ca FILE`).

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// Plain TCP, or TLS (`tokio_util`'s `Either` reads and writes either).
pub type BenchStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// A TLS client configuration trusting the CA certificate(s) in `ca`; with `resume` off, every
/// connection makes a full handshake (no session tickets or cache).
pub fn tls_config(ca: &Path, resume: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("reading {}", ca.display()))?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    if resume {
        // Room for the tickets of every connection a run opens at once.
        config.resumption = rustls::client::Resumption::in_memory_sessions(65_536);
    } else {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// The TLS handshake over `stream` to `server` (its certificate checked against the IP).
pub async fn connect_tls(
    config: &Arc<rustls::ClientConfig>,
    stream: TcpStream,
    server: std::net::IpAddr,
) -> anyhow::Result<BenchStream> {
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(
            rustls_pki_types::ServerName::IpAddress(server.into()),
            stream,
        )
        .await
        .context("TLS handshake")?;
    Ok(Either::Right(Box::new(tls)))
}
