//! TLS on the client port (rustls, with the ring provider): the server configuration built
//! from `[tls]`, and its certificate reloaded in place.
//!
//! - TLS 1.2 and 1.3 only; resumption by session tickets (and a session cache for TLS 1.2
//!   clients without tickets), so a reconnecting client skips the full handshake.
//! - With `client_ca_file`, every client must present a certificate that CA signed.
//! - The certificate and key, and the client CA, are read at start (a bad file stops the
//!   node) and again by [`ServerTls::reload`] (SIGHUP): a set that does not load is reported
//!   and the old one kept; connections already open are not touched, new handshakes use the
//!   new set. A new client CA makes a new configuration (the verifier is built into it), with
//!   a new ticketer and session cache, so that a client of a CA just removed makes a full
//!   handshake and is refused by it, rather than resuming and being refused at its `hello`.
//! - A resumed session's client certificate is checked again ([`ServerTls::accept`]): rustls
//!   carries it from ticket to ticket unchecked, so a client whose certificate expired could
//!   otherwise go on resuming for good. Its `hello` is refused, saying why.
//!
//! The PEM readers and the provider are public: the cluster's direct links
//! (`cluster.link_tls_*`) build their own configurations from the same pieces.

use rustls::HandshakeKind;
use rustls::ServerConfig;
use rustls::crypto::ring as provider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::metrics as m;
use crate::settings;

/// TLS sessions a node remembers for TLS 1.2 resumption without tickets.
const SESSION_CACHE: usize = 4096;

/// A TLS problem; `key` is the setting at fault (`tls.cert_file`, `cluster.link_tls_ca_file`).
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}: {path} holds no {what}")]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{key}: the key does not fit the certificate or is of an unsupported kind: {reason}")]
    Key { key: &'static str, reason: String },
    #[error("{key}: {reason}")]
    Config { key: &'static str, reason: String },
}

/// A PEM file a setting names: the setting (for errors) and the path.
#[derive(Debug, Clone, Copy)]
pub struct PemFile<'a> {
    pub key: &'static str,
    pub path: &'a Path,
}

/// The crypto provider every TLS configuration of the node uses (ring, as async-nats does).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider::default_provider())
}

/// The client port's TLS: the acceptor handshakes use, and the certificate it presents.
pub struct ServerTls {
    /// Swapped whole when a reload reads a new client CA (`client_ca_file`).
    accepting: RwLock<Accepting>,
    cert: Arc<ReloadableCert>,
    cfg: settings::Tls,
    /// `client_ca_file`'s certificates as last read (None without one): a reload rebuilds
    /// the configuration only when they changed (a rebuild ends session resumption).
    client_ca: RwLock<Option<Vec<CertificateDer<'static>>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cfg.cert_file)
            .finish_non_exhaustive()
    }
}

/// A client's finished handshake.
pub struct Accepted<IO> {
    pub stream: TlsStream<IO>,
    /// Why the client certificate of a resumed session no longer verifies, if it does not:
    /// the client's `hello` is refused with it.
    pub stale_certificate: Option<String>,
}

/// What a handshake uses: the acceptor, and the client certificate verifier built into it
/// (None without `client_ca_file`), which checks a resumed session's certificate again.
#[derive(Clone)]
struct Accepting {
    acceptor: TlsAcceptor,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

fn config_err(e: rustls::Error) -> TlsError {
    TlsError::Config {
        key: "tls",
        reason: e.to_string(),
    }
}

impl ServerTls {
    /// Reads the files named by `cfg` and builds the server configuration.
    pub fn load(cfg: &settings::Tls) -> Result<ServerTls, TlsError> {
        let cert = Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(node_certified_key(cfg)?)),
        });
        let client_ca = client_ca_certs(cfg)?;
        let accepting = accepting(cert.clone(), client_ca.as_deref())?;
        Ok(ServerTls {
            accepting: RwLock::new(accepting),
            cert,
            cfg: cfg.clone(),
            client_ca: RwLock::new(client_ca),
        })
    }

    /// Records when the certificate in use expires (see [`record_expiry`]): at start, once
    /// the node's metrics recorder is installed; a reload records its own.
    pub fn record_expiry(&self) {
        record_expiry("client", self.not_after());
        if let Some(ca) = self.client_ca_not_after() {
            record_expiry("client_ca", ca);
        }
    }

    /// When the client CA (`client_ca_file`) expires, if there is one: Some(None) if it cannot
    /// be read.
    pub fn client_ca_not_after(&self) -> Option<Option<i64>> {
        self.client_ca
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .map(earliest_not_after)
    }

    /// When the certificate in use expires (Unix seconds), if it can be read.
    pub fn not_after(&self) -> Option<i64> {
        let current = match self.cert.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        not_after_of(&current)
    }

    /// A client's handshake, with the configuration of now. A full handshake checks the
    /// client's certificate (with `client_ca_file`); a resumed one does not, and rustls puts
    /// the certificate of the session's first handshake into every ticket it issues after, so
    /// a client that reconnects now and then would keep an expired certificate's access for
    /// good. A resumed session's certificate is checked here against the CA and the clock of
    /// now, as a full handshake would. One that fails is not cut off at once: its handshake
    /// has already handed the client new tickets (rustls sends them with every handshake, and
    /// nothing here can stop it), so it will resume again, and a closed connection would never
    /// tell it why; its `hello` is refused instead, saying why and that it must start a new
    /// TLS session ([`Accepted::stale_certificate`]).
    pub async fn accept<IO>(&self, stream: IO) -> std::io::Result<Accepted<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let Accepting { acceptor, verifier } = self
            .accepting
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stream = acceptor.accept(stream).await?;
        let conn = stream.get_ref().1;
        let stale_certificate = match verifier {
            Some(verifier) if conn.handshake_kind() == Some(HandshakeKind::Resumed) => {
                recheck_resumed(&*verifier, conn.peer_certificates(), UnixTime::now()).err()
            }
            _ => None,
        };
        Ok(Accepted {
            stream,
            stale_certificate,
        })
    }

    /// Reads the certificate and key again, and the client CA when there is one; on success
    /// new handshakes use them, on failure everything stays as it was and the error says why.
    /// Connections already open are not touched. Counted in `confab_tls_reloads_total{result}`.
    pub fn reload(&self) -> Result<(), TlsError> {
        reload_outcome(
            m::TLS_RELOADS,
            "client",
            &self.cfg.cert_file,
            self.read_again(),
        )
    }

    /// Everything is read before anything is swapped, so a file that does not load changes
    /// nothing.
    fn read_again(&self) -> Result<(), TlsError> {
        let key = node_certified_key(&self.cfg)?;
        let client_ca = client_ca_certs(&self.cfg)?;
        let changed = *self.client_ca.read().unwrap_or_else(|p| p.into_inner()) != client_ca;
        // Only a new CA rebuilds: the rebuilt configuration's new tickets make every client
        // handshake in full once, which a reload for another file should not cost.
        let rebuilt = match changed {
            true => Some(accepting(self.cert.clone(), client_ca.as_deref())?),
            false => None,
        };
        let not_after = not_after_of(&key);
        let mut current = self.cert.current.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(key);
        // Under the lock: the gauges name what is now in use.
        record_expiry("client", not_after);
        if let Some(accepting) = rebuilt {
            *self.accepting.write().unwrap_or_else(|p| p.into_inner()) = accepting;
            if let Some(certs) = &client_ca {
                record_expiry("client_ca", earliest_not_after(certs));
            }
            *self.client_ca.write().unwrap_or_else(|p| p.into_inner()) = client_ca;
        }
        Ok(())
    }
}

/// Counts a reload of TLS files in `counter` and logs it: `files` says which (`client`,
/// `link`), `cert_file` where the certificate came from. The old files stay on an error.
pub fn reload_outcome(
    counter: &'static str,
    files: &'static str,
    cert_file: &Path,
    result: Result<(), TlsError>,
) -> Result<(), TlsError> {
    match &result {
        Ok(()) => {
            metrics::counter!(counter, "result" => "ok").increment(1);
            tracing::info!(files, cert_file = %cert_file.display(), "TLS files reloaded");
        }
        Err(e) => {
            metrics::counter!(counter, "result" => "failed").increment(1);
            tracing::error!(files, error = %e, "TLS files not reloaded; the old ones stay");
        }
    }
    result
}

/// `tls.client_ca_file`'s certificates, read now (None without one).
fn client_ca_certs(cfg: &settings::Tls) -> Result<Option<Vec<CertificateDer<'static>>>, TlsError> {
    cfg.client_ca_file
        .as_deref()
        .map(|path| {
            read_certs(PemFile {
                key: "tls.client_ca_file",
                path,
            })
        })
        .transpose()
}

/// The client port's acceptor: TLS 1.2 and 1.3, the certificate `cert` resolves, clients
/// verified against `client_ca` when given (the verifier kept beside it for resumed sessions,
/// [`ServerTls::accept`]), and a ticketer and session cache of its own. Its own, not the
/// previous configuration's: a client the old CA let in then makes a full handshake, which
/// refuses it with a TLS alert, instead of resuming into a refused `hello` again and again.
/// After a new client CA is reloaded, every client makes one full handshake.
fn accepting(
    cert: Arc<ReloadableCert>,
    client_ca: Option<&[CertificateDer<'static>]>,
) -> Result<Accepting, TlsError> {
    let provider = self::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(config_err)?;
    let verifier = client_ca
        .map(|certs| client_verifier("tls.client_ca_file", certs, provider))
        .transpose()?;
    let builder = match &verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.ticketer = provider::Ticketer::new().map_err(config_err)?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Accepting {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        verifier,
    })
}

/// The rule for a resumed session: the client certificate it carries (`chain`, the client's
/// first) must still pass `verifier` at `now`, as in a full handshake. A session without one
/// fails: with `client_ca_file` none can begin without a certificate.
fn recheck_resumed(
    verifier: &dyn ClientCertVerifier,
    chain: Option<&[CertificateDer<'static>]>,
    now: UnixTime,
) -> Result<(), String> {
    let Some((end_entity, intermediates)) = chain.and_then(|c| c.split_first()) else {
        return Err("the resumed session carries no client certificate".into());
    };
    verifier
        .verify_client_cert(end_entity, intermediates, now)
        .map(|_| ())
        .map_err(|e| format!("the client certificate no longer verifies: {e}"))
}

/// The certificate the node presents, swapped whole by a reload.
#[derive(Debug)]
struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = match self.current.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        Some(current.clone())
    }
}

/// A certificate due to expire within this long is logged as a warning whenever it is read.
const EXPIRY_WARNING_SECS: i64 = 14 * 24 * 3600;

/// When the first certificate of `key`'s chain (the one presented) expires: its notAfter, in
/// Unix seconds; None if x509-parser cannot read what rustls accepted.
pub fn not_after_of(key: &CertifiedKey) -> Option<i64> {
    not_after_der(key.cert.first()?)
}

/// When `cert` expires: its notAfter, in Unix seconds.
fn not_after_der(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// When the first of `certs` expires (for a CA file: every chain through it then fails);
/// None if one cannot be read.
pub fn earliest_not_after(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs
        .iter()
        .map(not_after_der)
        .collect::<Option<Vec<i64>>>()
        .and_then(|all| all.into_iter().min())
}

/// Records when the `cert` certificate (`client`, `link`, or the CAs `client_ca`, `link_ca`)
/// expires, as the
/// `confab_tls_cert_expiry_timestamp_seconds{cert}` gauge, for an alert well before it does;
/// and logs a warning if that is within 14 days, an error if it has passed (new handshakes with
/// it then fail). Call it once a certificate is in use: at start and after each reload.
pub fn record_expiry(cert: &'static str, not_after: Option<i64>) {
    let Some(not_after) = not_after else {
        // NaN rather than the last value: that would be another certificate's date, and the
        // series cannot be removed. An alert's comparison with NaN is false, as for "unknown".
        metrics::gauge!(m::TLS_CERT_EXPIRY, "cert" => cert).set(f64::NAN);
        tracing::warn!(
            cert,
            "cannot read the certificate's expiry date; its expiry metric is NaN"
        );
        return;
    };
    metrics::gauge!(m::TLS_CERT_EXPIRY, "cert" => cert).set(not_after as f64);
    match expiry_notice(not_after, unix_now()) {
        ExpiryNotice::Expired => tracing::error!(
            cert,
            not_after,
            "the certificate has expired: new TLS handshakes with it fail; replace it and reload"
        ),
        ExpiryNotice::Soon { days_left } => tracing::warn!(
            cert,
            not_after,
            days_left,
            "the certificate expires soon; replace it and reload"
        ),
        ExpiryNotice::None => {}
    }
}

/// What `confab-node --check` prints of a certificate valid until `not_after` (Unix seconds):
/// a sentence when it has expired, expires within 14 days, or cannot be read; None otherwise.
pub fn expiry_problem(not_after: Option<i64>) -> Option<String> {
    let Some(not_after) = not_after else {
        return Some("its expiry date cannot be read".to_owned());
    };
    match expiry_notice(not_after, unix_now()) {
        ExpiryNotice::Expired => Some(format!(
            "it has expired (notAfter {not_after}, Unix seconds): TLS handshakes with it fail"
        )),
        ExpiryNotice::Soon { days_left } => Some(format!(
            "it expires in {days_left} days (notAfter {not_after}, Unix seconds)"
        )),
        ExpiryNotice::None => None,
    }
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What the log says of a certificate when it is read.
#[derive(Debug, PartialEq, Eq)]
enum ExpiryNotice {
    None,
    /// It expires within [`EXPIRY_WARNING_SECS`]: a warning.
    Soon {
        days_left: i64,
    },
    /// Its notAfter has passed: an error.
    Expired,
}

/// The notice for a certificate valid until `not_after`, read at `now` (both Unix seconds).
fn expiry_notice(not_after: i64, now: i64) -> ExpiryNotice {
    let left = not_after.saturating_sub(now);
    if left <= 0 {
        ExpiryNotice::Expired
    } else if left < EXPIRY_WARNING_SECS {
        ExpiryNotice::Soon {
            days_left: left / 86_400,
        }
    } else {
        ExpiryNotice::None
    }
}

fn node_certified_key(cfg: &settings::Tls) -> Result<CertifiedKey, TlsError> {
    certified_key(
        PemFile {
            key: "tls.cert_file",
            path: &cfg.cert_file,
        },
        PemFile {
            key: "tls.key_file",
            path: &cfg.key_file,
        },
    )
}

/// The chain of `cert` with the private key of `key`, checked to fit each other.
pub fn certified_key(cert: PemFile<'_>, key: PemFile<'_>) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key.path).map_err(|e| TlsError::File {
        key: key.key,
        path: key.path.to_owned(),
        reason: e.to_string(),
    })?;
    let key_err = |e: rustls::Error| TlsError::Key {
        key: key.key,
        reason: e.to_string(),
    };
    let signing = provider::sign::any_supported_type(&der).map_err(key_err)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(key_err)?;
    Ok(certified)
}

/// A verifier of the other side's certificate: it must chain to one of the CA certificates
/// `ca` (read from the setting `key`; valid for a client: its names are not checked here).
pub fn client_verifier(
    key: &'static str,
    ca: &[CertificateDer<'static>],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots_of(key, ca)?), provider)
        .build()
        .map_err(|e| TlsError::Config {
            key,
            reason: e.to_string(),
        })
}

/// `certs` as trust anchors (`key`, the setting they came from, names an error).
pub fn roots_of(
    key: &'static str,
    certs: &[CertificateDer<'static>],
) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(|e| TlsError::Config {
            key,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The certificates of a PEM file (at least one).
pub fn read_certs(file: PemFile<'_>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let PemFile { key, path } = file;
    let file_err = |reason: String| TlsError::File {
        key,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_within_two_weeks_of_its_expiry_is_a_warning_and_one_past_it_an_error() {
        let day = 86_400;
        let now = 1_800_000_000;
        assert_eq!(expiry_notice(now + 90 * day, now), ExpiryNotice::None);
        assert_eq!(expiry_notice(now + 14 * day, now), ExpiryNotice::None);
        assert_eq!(
            expiry_notice(now + 14 * day - 1, now),
            ExpiryNotice::Soon { days_left: 13 }
        );
        assert_eq!(
            expiry_notice(now + 1, now),
            ExpiryNotice::Soon { days_left: 0 }
        );
        assert_eq!(expiry_notice(now, now), ExpiryNotice::Expired);
        assert_eq!(expiry_notice(i64::MIN, now), ExpiryNotice::Expired);
    }

    /// A resumed session's client certificate passes only while it would pass a full
    /// handshake: before its notAfter, signed by the CA; a session without one fails.
    #[test]
    fn a_resumed_sessions_client_certificate_must_still_verify() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("a key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("a CA");
        let key = KeyPair::generate().expect("a key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("parameters");
        client.not_before = rcgen::date_time_ymd(2026, 1, 1);
        client.not_after = rcgen::date_time_ymd(2027, 1, 1);
        let client = client.signed_by(&key, &ca, &ca_key).expect("a certificate");
        let verifier = client_verifier("test", &[ca.der().clone()], provider()).expect("verifier");
        let chain = [client.der().clone()];
        let at = |unix: u64| UnixTime::since_unix_epoch(std::time::Duration::from_secs(unix));
        let (in_2026, in_2028) = (at(1_780_000_000), at(1_830_000_000));

        assert_eq!(recheck_resumed(&*verifier, Some(&chain), in_2026), Ok(()));
        let expired = recheck_resumed(&*verifier, Some(&chain), in_2028);
        assert!(
            expired.as_ref().is_err_and(|e| e.contains("xpired")),
            "{expired:?}"
        );
        assert!(recheck_resumed(&*verifier, None, in_2026).is_err());
        assert!(recheck_resumed(&*verifier, Some(&[]), in_2026).is_err());
        // A certificate the CA did not sign.
        let other_key = KeyPair::generate().expect("a key");
        let other = CertificateParams::new(Vec::<String>::new())
            .expect("parameters")
            .self_signed(&other_key)
            .expect("a certificate");
        let stranger = [other.der().clone()];
        assert!(recheck_resumed(&*verifier, Some(&stranger), in_2026).is_err());
    }
}
