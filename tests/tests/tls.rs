//! TLS on the client port (`[tls]`, docs/protocol.md §1): real TLS between real sockets, with
//! certificates made by rcgen. Devices sign in, call and chat over TLS through the Rust client
//! library; a plain-TCP client on the TLS port gets nothing; a reloaded certificate is
//! presented to new connections while old ones carry on, and one that does not load leaves
//! the old in place; with `client_ca_file`, a client without a certificate is refused.
#![allow(clippy::unwrap_used)]

use confab_client::{
    AutoAcceptPolicy, CallEstablishOptions, ClientError, ClientTls, Conversation, Endpoint,
    EndpointOptions, Hello, InstantMessagingCall,
};
use confab_protocol::*;
use confab_tests::pki::Pki;
use confab_tests::*;
use std::net::SocketAddr;
use std::sync::Arc;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";

fn tls_node(
    pki: &Pki,
    tweak: impl FnOnce(&mut confab_actors::settings::Tls),
) -> confab_actors::RunningNode {
    let mut tls = pki.node_tls();
    tweak(&mut tls);
    start_node(|s| {
        s.tls = Some(tls);
        s.fork.toast_timeout_ms = 60_000;
        s.fork.auto_accept_grace_ms = 60_000;
    })
}

async fn connect(addr: SocketAddr, user: &str, tls: ClientTls) -> Result<Endpoint, ClientError> {
    let mut options = EndpointOptions {
        auto_accept: AutoAcceptPolicy::Accept,
        ..EndpointOptions::default()
    };
    options.connection.tls = Some(tls);
    tokio::time::timeout(
        EVENT_TIMEOUT,
        Endpoint::connect_with(addr, Hello::new(user, token(user), "laptop"), options),
    )
    .await
    .expect("sign-in finished in time")
}

fn trusting(pki: &Pki) -> ClientTls {
    ClientTls::with_ca_file(&pki.ca).unwrap()
}

#[tokio::test]
async fn devices_sign_in_call_and_chat_over_tls() {
    let pki = Pki::new("chat");
    let node = tls_node(&pki, |_| {});
    // The name checked is the address connected to (127.0.0.1), or one given.
    let alice = connect(node.addr, ALICE, trusting(&pki)).await.unwrap();
    let bob = connect(node.addr, BOB, trusting(&pki).server_name("localhost"))
        .await
        .unwrap();
    let mut ringing = bob.incoming_calls();
    let call = InstantMessagingCall::establish(
        &Conversation::new(&alice),
        BOB,
        Some(legs::text_toast("over TLS")),
        CallEstablishOptions::default(),
    )
    .await
    .unwrap();
    let inbound = tokio::time::timeout(EVENT_TIMEOUT, ringing.recv())
        .await
        .unwrap()
        .unwrap();
    inbound.established().await.unwrap();
    let mut received = inbound.flow().received();
    let msg = call.flow().send_text("encrypted hello").await.unwrap();
    let toast = received.recv().await.unwrap();
    let hello = received.recv().await.unwrap();
    assert!(toast.toast);
    assert_eq!(
        (hello.msg, hello.body),
        (msg, Body::from("encrypted hello"))
    );
    call.terminate().await.unwrap();
    alice.bye().await.unwrap();
    bob.bye().await.unwrap();
    let (_, _, metrics) = http_get(node.metrics_addr.unwrap(), "/metrics").await;
    assert!(metric(&metrics, "confab_tls_handshakes_total{result=\"ok\"}") >= 2.0);
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_node_or_does_not_speak_tls_gets_nothing() {
    let pki = Pki::new("trust");
    let stranger = Pki::new("stranger");
    let node = tls_node(&pki, |_| {});
    // Trusting another CA: the handshake fails on the client's side.
    match connect(node.addr, ALICE, trusting(&stranger)).await {
        Err(ClientError::Tls(why)) => assert!(why.contains("handshake"), "{why}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // A name the certificate does not carry.
    match connect(
        node.addr,
        ALICE,
        trusting(&pki).server_name("elsewhere.example"),
    )
    .await
    {
        Err(ClientError::Tls(_)) => {}
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // Plain TCP on the TLS port: the hello is not TLS, so the node closes without a frame.
    let mut raw = Raw::connect(node.addr).await;
    raw.send(&ClientMsg::Hello {
        resume: None,
        rid: Some(1),
        version: 1,
        user: ALICE.to_owned(),
        token: token(ALICE),
        device: "plain".to_owned(),
        agent: None,
    })
    .await;
    assert_eq!(raw.expect_closed().await, Vec::<ServerMsg>::new());
    // The node counts a handshake the client gave up on when it sees the close, which may be
    // after the client has moved on: poll the counter (there is no event to wait for).
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let (_, _, metrics) = http_get(node.metrics_addr.unwrap(), "/metrics").await;
        let refused = metric(
            &metrics,
            "confab_connections_rejected_total{reason=\"tls\"}",
        );
        if refused >= 3.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{refused} TLS refusals counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_and_the_old_ones_carry_on() {
    let old = Pki::new("old");
    let new = Pki::new("new");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node-key.pem"));
    old.issue_server(&cert, &key);
    let node = tls_node(&old, |t| {
        t.cert_file = cert.clone();
        t.key_file = key.clone();
    });
    let alice = connect(node.addr, ALICE, trusting(&old)).await.unwrap();

    // A file that does not load: refused, and the old certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(node.reload_tls().is_err());
    connect(node.addr, BOB, trusting(&old))
        .await
        .unwrap()
        .bye()
        .await
        .unwrap();

    // A certificate of another CA: new connections get it, the open one goes on.
    new.issue_server(&cert, &key);
    assert!(node.reload_tls().unwrap());
    assert!(matches!(
        connect(node.addr, BOB, trusting(&old)).await,
        Err(ClientError::Tls(_))
    ));
    let bob = connect(node.addr, BOB, trusting(&new)).await.unwrap();
    let presence = alice.subscribe([BOB]).await.unwrap();
    drop(presence);
    bob.bye().await.unwrap();
    alice.bye().await.unwrap();
    let (_, _, metrics) = http_get(node.metrics_addr.unwrap(), "/metrics").await;
    for series in [
        "confab_tls_reloads_total{result=\"ok\"}",
        "confab_tls_reloads_total{result=\"failed\"}",
    ] {
        assert!(metric(&metrics, series) >= 1.0, "{series}");
    }
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_its_certificate_get_in() {
    let pki = Pki::new("mutual");
    let node = tls_node(&pki, |t| t.client_ca_file = Some(pki.ca.clone()));
    // The library presents no certificate: the node refuses the handshake, so the client
    // sees the connection end before any welcome.
    assert!(connect(node.addr, ALICE, trusting(&pki)).await.is_err());

    // With the CA's client certificate (rustls directly), the hello gets its welcome.
    let config = mutual_config(&pki.ca, &pki.client_cert, &pki.client_key);
    let answer = mutual_hello(node.addr, config).await;
    assert!(
        matches!(answer, Ok((ServerMsg::Welcome { .. }, _))),
        "{answer:?}"
    );
}

/// A client configuration (rustls directly: the library presents no certificate) with the
/// client certificate `cert` and its `key`, trusting `ca` for the node's. It keeps its
/// sessions: a second hello with it tries to resume the first's.
fn mutual_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    mutual_config_resuming(ca, cert, key, Resumes::Tls13)
}

/// How a test client resumes its sessions.
#[derive(Debug, Clone, Copy)]
enum Resumes {
    Tls13,
    Tls12Tickets,
    Tls12SessionIds,
}

/// [`mutual_config`], resuming as `how` says.
fn mutual_config_resuming(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    how: Resumes,
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ));
    let builder = match how {
        Resumes::Tls13 => builder.with_safe_default_protocol_versions(),
        Resumes::Tls12Tickets | Resumes::Tls12SessionIds => {
            builder.with_protocol_versions(&[&rustls::version::TLS12])
        }
    };
    let mut config = builder
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    if let Resumes::Tls12SessionIds = how {
        config.resumption = rustls::client::Resumption::in_memory_sessions(64)
            .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
    }
    Arc::new(config)
}

/// `GET /` over TLS with `config` on the WebSocket listener at `addr`: whether the session was
/// resumed, and the status line of the answer.
async fn page_over_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> (bool, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The node closes after its answer, with or without close_notify.
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    (
        resumed,
        answer.lines().next().unwrap_or_default().to_owned(),
    )
}

/// A hello over TLS with `config`: the first frame the node answers and whether the TLS session
/// was a resumed one, or why there was no answer (a refused certificate shows as the handshake
/// or the first read failing).
async fn mutual_hello(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(ServerMsg, bool), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let hello = ClientMsg::Hello {
        resume: None,
        rid: Some(1),
        version: 1,
        user: ALICE.to_owned(),
        token: token(ALICE),
        device: "mutual".to_owned(),
        agent: None,
    };
    // Known once the handshake is over: a refusal after it says which kind it followed.
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let kind = if resumed { "resumed" } else { "full" };
    tls.write_all(&frame(&hello))
        .await
        .map_err(|e| format!("write after a {kind} handshake: {e}"))?;
    let mut len = [0u8; 4];
    tls.read_exact(&mut len)
        .await
        .map_err(|e| format!("read after a {kind} handshake: {e}"))?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    tls.read_exact(&mut body)
        .await
        .map_err(|e| format!("read after a {kind} handshake: {e}"))?;
    let answer = decode_server(&body).map_err(|e| format!("decode: {e}"))?;
    Ok((answer, resumed))
}

#[tokio::test]
async fn a_reloaded_client_ca_lets_in_the_new_cas_clients_and_no_longer_the_old_ones() {
    let old = Pki::new("old clients");
    let new = Pki::new("new clients");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("client-ca.pem");
    std::fs::copy(&old.ca, &ca).unwrap();
    // The node's own certificate is the old PKI's; only the client CA changes.
    let node = tls_node(&old, |t| t.client_ca_file = Some(ca.clone()));
    // Each client keeps its configuration, and with it its sessions: the old CA's client
    // tries to resume the session it had once the CA is gone.
    let old_client = mutual_config(&old.ca, &old.client_cert, &old.client_key);
    let new_client = mutual_config(&old.ca, &new.client_cert, &new.client_key);
    let hello = |config: &Arc<rustls::ClientConfig>| mutual_hello(node.addr, config.clone());
    let answer = hello(&old_client).await;
    assert!(
        matches!(answer, Ok((ServerMsg::Welcome { .. }, _))),
        "{answer:?}"
    );
    assert!(hello(&new_client).await.is_err(), "another CA's client");

    // A CA file that does not load: refused, and the old CA stays (and the old client's
    // session with it: it resumes, which the last step relies on).
    std::fs::write(&ca, "not a CA").unwrap();
    let report = node.reload().expect("the settings load");
    assert!(report.failed.iter().any(|f| f.what == "tls"), "{report:?}");
    let answer = hello(&old_client).await;
    assert!(
        matches!(answer, Ok((ServerMsg::Welcome { .. }, true))),
        "resumed: {answer:?}"
    );
    // The same CA again (a reload for another file): nothing rebuilt, sessions still resume.
    std::fs::copy(&old.ca, &ca).unwrap();
    let report = node.reload().expect("the settings load");
    assert!(report.reloaded.iter().any(|r| r == "tls"), "{report:?}");
    let answer = hello(&old_client).await;
    assert!(
        matches!(answer, Ok((ServerMsg::Welcome { .. }, true))),
        "resumed: {answer:?}"
    );

    // The new CA in place: its clients get in, the old CA's no longer do, not even by
    // resuming a session the node gave it before.
    std::fs::copy(&new.ca, &ca).unwrap();
    let report = node.reload().expect("the settings load");
    assert!(report.reloaded.iter().any(|r| r == "tls"), "{report:?}");
    let answer = hello(&new_client).await;
    assert!(
        matches!(answer, Ok((ServerMsg::Welcome { .. }, _))),
        "{answer:?}"
    );
    let answer = hello(&old_client).await;
    assert!(answer.is_err(), "the old CA's client, resuming: {answer:?}");
}

/// rustls carries a session's client certificate from ticket to ticket without checking it
/// again, so without the node's own check a client could go on resuming after its certificate
/// expired, for as long as it came back within a ticket's lifetime. The node checks a resumed
/// session's certificate as a full handshake would, and once it fails refuses the `hello`,
/// saying why (over TLS 1.3, TLS 1.2 tickets and TLS 1.2 session ids alike), and over `wss://`
/// the pages.
#[tokio::test]
async fn a_client_whose_certificate_expired_can_no_longer_resume_its_session() {
    let pki = Pki::new("expiring");
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web");
    std::fs::create_dir(&web).unwrap();
    std::fs::write(web.join("index.html"), "<h1>confab</h1>").unwrap();
    let mut tls = pki.node_tls();
    tls.client_ca_file = Some(pki.ca.clone());
    let node = start_node(move |s| {
        s.tls = Some(tls);
        s.server.websocket = Some(confab_actors::settings::WebSocket {
            static_dir: web.to_string_lossy().into_owned(),
            ..confab_actors::settings::WebSocket::new("127.0.0.1:0".parse().unwrap())
        });
    });
    let pages = node.websocket_addr.expect("the WebSocket listener");
    let (cert, key) = (
        dir.path().join("client.pem"),
        dir.path().join("client-key.pem"),
    );
    // Long enough for the handshakes below on a loaded machine; the test waits it out.
    let until = std::time::SystemTime::now() + std::time::Duration::from_secs(4);
    pki.issue_client_until(&cert, &key, until);
    let clients = [
        Resumes::Tls13,
        Resumes::Tls12Tickets,
        Resumes::Tls12SessionIds,
    ]
    .map(|how| (how, mutual_config_resuming(&pki.ca, &cert, &key, how)));
    for (how, client) in &clients {
        let answer = mutual_hello(node.addr, client.clone()).await;
        assert!(
            matches!(answer, Ok((ServerMsg::Welcome { .. }, false))),
            "{how:?}, a full handshake: {answer:?}"
        );
        let answer = mutual_hello(node.addr, client.clone()).await;
        assert!(
            matches!(answer, Ok((ServerMsg::Welcome { .. }, true))),
            "{how:?}, resumed while valid: {answer:?}"
        );
    }
    let browser = mutual_config(&pki.ca, &cert, &key);
    assert_eq!(
        page_over_tls(pages, browser.clone()).await,
        (false, "HTTP/1.1 200 OK".to_owned())
    );

    // What is tested is the certificate's notAfter passing: wait for it (to the second, as
    // X.509 counts), then a second more.
    let left = until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + std::time::Duration::from_millis(1_100)).await;
    // Each client resumes again (its handshakes handed it new tickets, or kept its session
    // id), and each time its hello gets the reason, not just a closed connection.
    for (how, client) in &clients {
        for attempt in 1..=2 {
            match mutual_hello(node.addr, client.clone()).await {
                Ok((ServerMsg::Error { code, message, .. }, true)) => {
                    assert_eq!(code, ErrorCode::Unauthorized, "{how:?}, attempt {attempt}");
                    assert!(
                        message.contains("resumed TLS session refused")
                            && message.contains("xpired")
                            && message.contains("start a new TLS session"),
                        "{how:?}, attempt {attempt}: {message}"
                    );
                }
                other => panic!("{how:?}, attempt {attempt} after expiry: {other:?}"),
            }
        }
    }
    assert_eq!(
        page_over_tls(pages, browser).await,
        (true, "HTTP/1.1 403 Forbidden".to_owned()),
        "a page on a resumed session after expiry"
    );
    // A client that starts a new session gets the handshake's own refusal.
    let fresh = mutual_config(&pki.ca, &cert, &key);
    let answer = mutual_hello(node.addr, fresh).await;
    assert!(answer.is_err(), "a full handshake after expiry: {answer:?}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_by_the_client() {
    let pki = Pki::new("expired");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node-key.pem"));
    pki.issue_expired_server(&cert, &key);
    let node = tls_node(&pki, |t| {
        t.cert_file = cert.clone();
        t.key_file = key.clone();
    });
    match connect(node.addr, ALICE, trusting(&pki)).await {
        Err(ClientError::Tls(why)) => assert!(why.to_lowercase().contains("expired"), "{why}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

/// A handshake that never finishes (nothing sent, or a TLS record cut short) holds the
/// connection only until `server.tls_handshake_timeout_ms`, then it is closed and counted.
#[tokio::test]
async fn a_handshake_that_never_finishes_is_closed_at_its_own_deadline() {
    let pki = Pki::new("stall");
    let tls = pki.node_tls();
    let node = start_node(move |s| {
        s.tls = Some(tls);
        // The handshake's own deadline, well inside the hello's.
        s.server.tls_handshake_timeout_ms = 300;
        s.server.hello_timeout_ms = 60_000;
    });
    let mut silent = Raw::connect(node.addr).await;
    let mut cut_short = Raw::connect(node.addr).await;
    // A TLS handshake record that announces 255 bytes and brings 3.
    cut_short
        .send_bytes(&[0x16, 0x03, 0x01, 0x00, 0xFF, 0x01, 0x00, 0x00])
        .await;
    assert_eq!(silent.expect_closed().await, Vec::<ServerMsg>::new());
    assert_eq!(cut_short.expect_closed().await, Vec::<ServerMsg>::new());
    // Garbage instead of a client hello: refused at once.
    let mut garbage = Raw::connect(node.addr).await;
    garbage
        .send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(garbage.expect_closed().await, Vec::<ServerMsg>::new());
}
