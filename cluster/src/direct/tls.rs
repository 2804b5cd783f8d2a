//! TLS on the direct links (`cluster.link_tls_*`, off by default): the configurations a dialer
//! and an acceptor use, the stream a link runs over (plain TCP or TLS), and the check that the
//! dialer's certificate names the node its hello says it is. The HMAC handshake
//! (`handshake.rs`) runs inside the TLS stream as it runs on a plain one.
//!
//! - TLS 1.3 only: every node of a cluster runs this code, there is no older peer to meet.
//! - Both sides present a certificate the cluster's CA signed and check the other's. The
//!   names checked are node ids (each certificate carries its node's `cluster.node_id` as a
//!   DNS name): the dialer checks that the acceptor's names the node it dials, the acceptor that
//!   the dialer's names the node its hello claims. Why node ids, not addresses:
//!   docs/architecture.md, "Direct links between nodes".
//! - No resumption: links are few and long-lived, and each handshake checks both certificates
//!   afresh (one that expired, or of a node re-issued, is not carried over by a ticket).
//! - The files are read at start (one that does not load stops the node) and again by
//!   [`LinkTls::reload`] (SIGHUP, `POST /admin/reload`): a set that does not load is reported
//!   and the old one kept. New links use what was read last; links already open keep the
//!   certificates they were made with.

use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_util::either::Either;

use confab_actors::metrics as m;
use confab_actors::settings;
use confab_actors::tls::{self, PemFile, TlsError};

/// A link's connection: plain TCP, or TLS over it.
pub type LinkStream = Either<TcpStream, TlsStream<TcpStream>>;

/// What both sides of a link use when the cluster has link TLS. Clones share one set of
/// configurations, which [`LinkTls::reload`] replaces whole.
#[derive(Clone)]
pub struct LinkTls {
    files: Arc<LinkTlsFiles>,
    current: Arc<RwLock<Arc<Configs>>>,
}

/// The three files link TLS is read from.
struct LinkTlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// The configurations made from one reading of the files.
struct Configs {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    /// When the certificate they present expires (Unix seconds), if it can be read.
    not_after: Option<i64>,
    /// When the first certificate of the link CA file expires.
    ca_not_after: Option<i64>,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls")
            .field("cert", &self.files.cert)
            .finish_non_exhaustive()
    }
}

impl LinkTls {
    /// Link TLS as `cfg` sets it (none without `link_tls_cert_file`), its files read now: a
    /// file that does not load is an error, which stops the node at start.
    pub fn from_settings(cfg: &settings::Cluster) -> Result<Option<LinkTls>, TlsError> {
        if cfg.link_tls_cert_file.is_empty() {
            return Ok(None);
        }
        let files = LinkTlsFiles {
            cert: PathBuf::from(&cfg.link_tls_cert_file),
            key: PathBuf::from(&cfg.link_tls_key_file),
            ca: PathBuf::from(&cfg.link_tls_ca_file),
        };
        let configs = files.load()?;
        configs.record_expiry();
        Ok(Some(LinkTls {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(configs))),
        }))
    }

    /// Reads the three files again. New links use them; a set that does not load is the
    /// error, and the configurations read before stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let swapped = self.files.load().map(|configs| {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            // Under the lock: the gauge names the certificate now in use.
            configs.record_expiry();
            *current = Arc::new(configs);
        });
        tls::reload_outcome(
            m::CLUSTER_LINK_TLS_RELOADS,
            "link",
            &self.files.cert,
            swapped,
        )
    }

    /// When the link certificate in use expires (Unix seconds), if it can be read.
    pub fn not_after(&self) -> Option<i64> {
        self.configs().not_after
    }

    /// When the link CA in use expires (its first certificate to), if it can be read.
    pub fn ca_not_after(&self) -> Option<i64> {
        self.configs().ca_not_after
    }

    fn configs(&self) -> Arc<Configs> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Configs {
    /// The expiry gauges of the certificate and the CA these were made from.
    fn record_expiry(&self) {
        tls::record_expiry("link", self.not_after);
        tls::record_expiry("link_ca", self.ca_not_after);
    }
}

impl LinkTlsFiles {
    /// This node's certificate chain and key, and the CA every node's certificate chains to,
    /// made into the dialer's and the acceptor's configurations.
    fn load(&self) -> Result<Configs, TlsError> {
        fn file<'a>(key: &'static str, path: &'a std::path::Path) -> PemFile<'a> {
            PemFile { key, path }
        }
        let cert = file("cluster.link_tls_cert_file", &self.cert);
        let key = file("cluster.link_tls_key_file", &self.key);
        let ca = file("cluster.link_tls_ca_file", &self.ca);
        let certified = tls::certified_key(cert, key)?;
        let not_after = tls::not_after_of(&certified);
        // Read once: the acceptor's verifier, the dialer's roots and the expiry gauge.
        let ca_certs = tls::read_certs(ca)?;
        let ca_not_after = tls::earliest_not_after(&ca_certs);
        let mine = Arc::new(SingleCertAndKey::from(certified));
        let provider = tls::provider();
        let config_err = |e: rustls::Error| TlsError::Config {
            key: "cluster.link_tls",
            reason: e.to_string(),
        };
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(tls::client_verifier(ca.key, &ca_certs, provider.clone())?)
            .with_cert_resolver(mine.clone());
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(tls::roots_of(ca.key, &ca_certs)?)
            .with_client_cert_resolver(mine);
        client.resumption = Resumption::disabled();
        Ok(Configs {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            not_after,
            ca_not_after,
        })
    }
}

impl LinkTls {
    /// The dialer's TLS handshake on `tcp`: the acceptor's certificate must chain to the CA
    /// and name `node`.
    pub(super) async fn dial(&self, node: &str, tcp: TcpStream) -> Result<LinkStream, String> {
        let name = ServerName::try_from(node.to_owned())
            .map_err(|_| format!("node id {node:?} is not a DNS name, as link TLS needs"))?;
        let connector = self.configs().connector.clone();
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Ok(Either::Right(TlsStream::Client(stream)))
    }

    /// The acceptor's TLS handshake on `tcp`: the dialer's certificate must chain to the CA
    /// (whom it names is checked against its hello, by [`names`]).
    pub(super) async fn accept(&self, tcp: TcpStream) -> Result<LinkStream, String> {
        let acceptor = self.configs().acceptor.clone();
        let stream = acceptor.accept(tcp).await.map_err(|e| {
            // Not a TLS record at all: most likely a node without link TLS, saying its hello.
            let garbled = e
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .is_some_and(|e| matches!(e, rustls::Error::InvalidMessage(_)));
            if garbled {
                format!(
                    "TLS handshake: {e}: the other node does not speak TLS (this one uses link TLS, cluster.link_tls_*)"
                )
            } else {
                format!("TLS handshake: {e}")
            }
        })?;
        Ok(Either::Right(TlsStream::Server(stream)))
    }
}

/// Whether the certificate the other side of `stream` presented names `node` (checked by the
/// acceptor against the hello: without it, any node the CA signed could say it is another).
/// A plain stream has no certificate, and nothing to check.
pub(super) fn names(stream: &LinkStream, node: &str) -> Result<(), String> {
    let Either::Right(tls) = stream else {
        return Ok(());
    };
    let refuse = || format!("its certificate does not name node {node}");
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(refuse)?;
    let name = ServerName::try_from(node).map_err(|_| refuse())?;
    webpki::EndEntityCert::try_from(cert)
        .and_then(|cert| cert.verify_is_valid_for_subject_name(&name))
        .map_err(|_| refuse())
}
