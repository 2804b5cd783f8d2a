//! Certificates for TLS tests, made with rcgen in a temporary directory: a CA, a server
//! certificate for `localhost` and `127.0.0.1` signed by it, a client certificate, and on
//! demand a node's certificate for the direct links' TLS (`cluster.link_tls_*`).

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::path::PathBuf;

/// A CA and what it signed, as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA's certificate: what clients trust.
    pub ca: PathBuf,
    /// The server's certificate chain and key, for `[tls] cert_file` and `key_file`.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate and key the CA signed (for `client_ca_file`).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    /// A new CA named `name`, with a server and a client certificate.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca_cert = params.self_signed(&ca_key).expect("a CA certificate");
        let path = |file: &str| dir.path().join(file);
        let pki = Pki {
            ca: path("ca.pem"),
            cert: path("server.pem"),
            key: path("server-key.pem"),
            client_cert: path("client.pem"),
            client_key: path("client-key.pem"),
            ca_cert,
            ca_key,
            dir,
        };
        std::fs::write(&pki.ca, pki.ca_cert.pem()).expect("write the CA");
        pki.issue_server(&pki.cert, &pki.key);
        let (cert, key) = pki.sign(
            vec![],
            "confab test client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        std::fs::write(&pki.client_cert, cert).expect("write the client certificate");
        std::fs::write(&pki.client_key, key).expect("write the client key");
        pki
    }

    /// Writes a new server certificate (for `localhost` and `127.0.0.1`) and key to the given
    /// paths.
    pub fn issue_server(&self, cert: &std::path::Path, key: &std::path::Path) {
        let (c, k) = self.sign(
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            "confab test node",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        std::fs::write(cert, c).expect("write the server certificate");
        std::fs::write(key, k).expect("write the server key");
    }

    /// [`Pki::issue_server`], valid until the first of January of `year`.
    pub fn issue_server_until(&self, cert: &std::path::Path, key: &std::path::Path, year: i32) {
        let (c, k) = self.sign_with(
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            "confab test node",
            ExtendedKeyUsagePurpose::ServerAuth,
            |p| p.not_after = rcgen::date_time_ymd(year, 1, 1),
        );
        std::fs::write(cert, c).expect("write the server certificate");
        std::fs::write(key, k).expect("write the server key");
    }

    /// Writes a client certificate this CA signs, valid until `until` (to the second), and
    /// its key.
    pub fn issue_client_until(
        &self,
        cert: &std::path::Path,
        key: &std::path::Path,
        until: std::time::SystemTime,
    ) {
        let (c, k) = self.sign_with(
            vec![],
            "confab test client (expiring)",
            ExtendedKeyUsagePurpose::ClientAuth,
            |p| p.not_after = until.into(),
        );
        std::fs::write(cert, c).expect("write the client certificate");
        std::fs::write(key, k).expect("write the client key");
    }

    /// Writes a server certificate that expired on 2020-01-01, and its key.
    pub fn issue_expired_server(&self, cert: &std::path::Path, key: &std::path::Path) {
        let (c, k) = self.sign_with(
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            "confab test node (expired)",
            ExtendedKeyUsagePurpose::ServerAuth,
            |p| {
                p.not_before = rcgen::date_time_ymd(2019, 1, 1);
                p.not_after = rcgen::date_time_ymd(2020, 1, 1);
            },
        );
        std::fs::write(cert, c).expect("write the server certificate");
        std::fs::write(key, k).expect("write the server key");
    }

    /// A certificate (PEM) for `names`, signed by the CA, and its key (PEM).
    fn sign(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        self.sign_with(names, common_name, usage, |_| {})
    }

    /// [`Pki::sign`], with `tweak` applied to the certificate's parameters.
    fn sign_with(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params.extended_key_usages = vec![usage];
        tweak(&mut params);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("a key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("a signed certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Link TLS for the cluster node `s` sets up: a certificate this CA signs naming its
    /// `cluster.node_id`, its key, and this CA.
    pub fn with_link_tls(&self, s: &mut confab_actors::Settings) {
        let c = s.cluster.as_mut().expect("a cluster node");
        let (cert, key) = self.issue_link(c.node_id.as_deref().expect("a node id"));
        let text = |p: PathBuf| p.to_str().expect("a UTF-8 path").to_owned();
        c.link_tls_cert_file = text(cert);
        c.link_tls_key_file = text(key);
        c.link_tls_ca_file = text(self.ca.clone());
    }

    /// Writes a direct link's certificate naming node `node` (for both ends of a link: server
    /// and client use) and its key; their paths.
    pub fn issue_link(&self, node: &str) -> (PathBuf, PathBuf) {
        self.issue_link_with(node, |_| {})
    }

    /// [`Pki::issue_link`], valid until the first of January of `year`.
    pub fn issue_link_until(&self, node: &str, year: i32) -> (PathBuf, PathBuf) {
        self.issue_link_with(node, |p| p.not_after = rcgen::date_time_ymd(year, 1, 1))
    }

    fn issue_link_with(
        &self,
        node: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> (PathBuf, PathBuf) {
        let path = |file: &str| self.dir.path().join(format!("{node}-{file}"));
        let (cert, key) = (path("link.pem"), path("link-key.pem"));
        let (c, k) = self.sign_with(
            vec![node.to_owned()],
            node,
            ExtendedKeyUsagePurpose::ServerAuth,
            |p| {
                p.extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ClientAuth);
                tweak(p);
            },
        );
        std::fs::write(&cert, c).expect("write the link certificate");
        std::fs::write(&key, k).expect("write the link key");
        (cert, key)
    }

    /// `[tls]` settings for a node presenting this PKI's server certificate.
    pub fn node_tls(&self) -> confab_actors::settings::Tls {
        confab_actors::settings::Tls {
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            client_ca_file: None,
        }
    }
}
