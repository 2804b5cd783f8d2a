//! Hardening, part 4: authentication and authorization over real TCP.
//!
//! - Every request that names a call or a conversation, sent by another endpoint (mallory, a
//!   different user, and alice's own second device) with alice's and bob's real ids, is
//!   `unknown_call` / `unknown_conversation` / `message_failed 481` / ignored, and the call it
//!   names is unaffected: nothing reaches its parties and messages still flow both ways.
//! - Tokens: the algorithm is pinned to HS256, `exp`/`nbf` hold within `auth.leeway_s`, the
//!   subject must be the user signing in; anything else is `unauthorized` and close.
//! - No error text carries internals (library names, source paths, panics, actor names).
//! - Presence: another user's subscriber sees `user` and `availability` only.

use confab_protocol::*;
use confab_tests::*;
use rmpv::Value;
use std::time::Duration;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const MALLORY: &str = "sip:mallory@example.com";

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(150);

/// Words that would mean an error text leaks how the node is built.
const INTERNALS: &[&str] = &[
    "rmp",
    "serde",
    "msgpack marker",
    "uncategorized",
    "IO error",
    "panicked",
    "unwrap",
    ".rs:",
    "/src/",
    "src/",
    "CallLeg",
    "LegMsg",
    "ForkArbiter",
    "ArbiterMsg",
    "EndpointMsg",
    "PresenceShard",
    "PresenceMsg",
    "Conversation {",
    "Addr<",
    "Mailbox",
    "actix",
    "tokio",
    "jsonwebtoken",
    "InvalidSignature",
    "ExpiredSignature",
    "ImmatureSignature",
    "InvalidAlgorithm",
    "Base64",
    "Utf8Error",
    "TypeMismatch",
    "Json(",
    "Error(",
    "Some(",
];

/// Asserts the human text of an error or a failed message says nothing about internals.
fn assert_clean(text: &str) {
    assert!(!text.is_empty(), "an error without text");
    for word in INTERNALS {
        assert!(
            !text.contains(word),
            "error text leaks internals ({word:?}): {text:?}"
        );
    }
}

/// Asserts `m` is `error{code}` with clean text.
fn assert_code(m: &ServerMsg, want: ErrorCode) {
    match m {
        ServerMsg::Error { code, message, .. } => {
            assert_eq!(*code, want, "{m:?}");
            assert_clean(message);
        }
        other => panic!("expected error {want:?}, got {other:?}"),
    }
}

async fn assert_open(c: &mut Raw) {
    c.ping().await;
}

fn established(call: &str) -> impl Fn(&ServerMsg) -> bool + use<> {
    let call = call.to_owned();
    move |m| matches!(m, ServerMsg::CallEstablished { call: c, .. } if *c == call)
}

/// A call from alice to bob, as both parties and two attackers see it.
struct Scene {
    _node: confab_actors::RunningNode,
    alice: Raw,
    bob: Raw,
    /// Another user.
    mallory: Raw,
    /// Alice's own second device, signed in after the call was placed (so it has no fork):
    /// ids belong to endpoints, not to users.
    alice2: Raw,
    /// Alice's leg and conversation.
    ca: String,
    va: String,
    /// Bob's leg and conversation.
    cb: String,
    vb: String,
}

impl Scene {
    /// Alice calls bob; bob's leg rings (`established = false`) or is accepted.
    async fn new(established_call: bool) -> Scene {
        let node = start_node(|s| s.fork.toast_timeout_ms = 10_000);
        let mut alice = Raw::sign_in(node.addr, ALICE, "laptop").await;
        let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
        let mallory = Raw::sign_in(node.addr, MALLORY, "laptop").await;
        let (ca, va) = alice.establish(BOB, Some("hi bob")).await;
        let (m, _) = bob
            .recv_until(|m| matches!(m, ServerMsg::CallIncoming { .. }))
            .await;
        let ServerMsg::CallIncoming {
            call: cb,
            conversation: vb,
            ..
        } = m
        else {
            unreachable!()
        };
        // call_ringing, then the caller's establishing -> establishing.
        alice
            .recv_until(|m| {
                matches!(
                    m,
                    ServerMsg::CallState {
                        state: CallState::Establishing,
                        previous: CallState::Establishing,
                        ..
                    }
                )
            })
            .await;
        let alice2 = Raw::sign_in(node.addr, ALICE, "phone").await;
        let mut scene = Scene {
            _node: node,
            alice,
            bob,
            mallory,
            alice2,
            ca,
            va,
            cb,
            vb,
        };
        if established_call {
            scene.accept().await;
        }
        scene
    }

    async fn accept(&mut self) {
        let reply = self.bob.accept(&self.cb).await;
        assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
        self.bob.recv_until(established(&self.cb)).await;
        // The toast comes right after bob's call_established.
        let (toast, _) = self
            .bob
            .recv_until(|m| matches!(m, ServerMsg::MessageReceived { .. }))
            .await;
        assert!(
            matches!(
                toast,
                ServerMsg::MessageReceived {
                    toast: Some(true),
                    ..
                }
            ),
            "{toast:?}"
        );
        self.alice.recv_until(established(&self.ca)).await;
    }

    /// Every id of the call, each as an attacker would try it.
    fn call_ids(&self) -> [String; 2] {
        [self.ca.clone(), self.cb.clone()]
    }

    fn conversation_ids(&self) -> [String; 2] {
        [self.va.clone(), self.vb.clone()]
    }

    /// Both attackers send `make(id)` for every id and expect `want` each time.
    async fn attack(
        &mut self,
        ids: &[String],
        make: impl Fn(String) -> ClientMsg,
        want: ErrorCode,
    ) {
        for attacker in [&mut self.mallory, &mut self.alice2] {
            for id in ids {
                let reply = attacker.request(make(id.clone())).await;
                assert_code(&reply, want);
            }
        }
    }

    /// Nothing reached alice or bob, and the call carries messages both ways.
    async fn assert_unaffected(&mut self) {
        self.alice.expect_silence(QUIET).await;
        self.bob.expect_silence(QUIET).await;
        let (ca, cb) = (self.ca.clone(), self.cb.clone());
        round_trip(&mut self.alice, &mut self.bob, &ca, &cb).await;
        round_trip(&mut self.bob, &mut self.alice, &cb, &ca).await;
        assert_open(&mut self.mallory).await;
        assert_open(&mut self.alice2).await;
    }
}

/// `from` sends a message on `call`; `to` receives it on `peer_call`, acks; delivered.
async fn round_trip(from: &mut Raw, to: &mut Raw, call: &str, peer_call: &str) {
    let rid = from.rid();
    from.send(&ClientMsg::Message {
        rid,
        call: call.to_owned(),
        content_type: "text/plain".into(),
        body: "still ours".into(),
    })
    .await;
    let m = to.recv().await;
    let ServerMsg::MessageReceived { call: c, msg, .. } = m else {
        panic!("expected message_received, got {m:?}");
    };
    assert_eq!(c, peer_call);
    to.send(&ClientMsg::MessageAck { call: c, msg }).await;
    let reply = from.recv().await;
    assert!(
        matches!(&reply, ServerMsg::MessageDelivered { rid: r, msg: n, .. } if *r == rid && *n == msg),
        "{reply:?}"
    );
}

#[tokio::test]
async fn call_accept_on_anothers_ringing_call_is_unknown_call() {
    let mut s = Scene::new(false).await;
    let ids = s.call_ids();
    s.attack(
        &ids,
        |call| ClientMsg::CallAccept {
            rid: None,
            call,
            sdp: answer(),
        },
        ErrorCode::UnknownCall,
    )
    .await;
    // Bob's fork still rings and is his to accept.
    s.alice.expect_silence(QUIET).await;
    s.bob.expect_silence(QUIET).await;
    s.accept().await;
    s.assert_unaffected().await;
}

#[tokio::test]
async fn call_decline_of_anothers_call_is_unknown_call() {
    let mut s = Scene::new(false).await;
    let ids = s.call_ids();
    for code in [None, Some(603)] {
        s.attack(
            &ids,
            |call| ClientMsg::CallDecline {
                rid: None,
                call,
                code,
            },
            ErrorCode::UnknownCall,
        )
        .await;
    }
    s.alice.expect_silence(QUIET).await;
    s.accept().await;
    s.assert_unaffected().await;
}

#[tokio::test]
async fn call_forward_of_anothers_call_is_unknown_call() {
    let mut s = Scene::new(false).await;
    let ids = s.call_ids();
    s.attack(
        &ids,
        |call| ClientMsg::CallForward {
            rid: None,
            call,
            to: MALLORY.into(),
        },
        ErrorCode::UnknownCall,
    )
    .await;
    s.mallory.expect_silence(QUIET).await;
    s.accept().await;
    s.assert_unaffected().await;
}

#[tokio::test]
async fn call_transfer_of_anothers_call_is_unknown_call() {
    let mut s = Scene::new(true).await;
    let ids = s.call_ids();
    s.attack(
        &ids,
        |call| ClientMsg::CallTransfer {
            rid: None,
            call,
            to: MALLORY.into(),
        },
        ErrorCode::UnknownCall,
    )
    .await;
    // No fork of a transfer reached mallory.
    s.mallory.expect_silence(QUIET).await;
    s.assert_unaffected().await;
}

#[tokio::test]
async fn call_terminate_of_anothers_call_is_unknown_call() {
    for established_call in [false, true] {
        let mut s = Scene::new(established_call).await;
        let ids = s.call_ids();
        s.attack(
            &ids,
            |call| ClientMsg::CallTerminate { rid: None, call },
            ErrorCode::UnknownCall,
        )
        .await;
        if !established_call {
            s.alice.expect_silence(QUIET).await;
            s.accept().await;
        }
        s.assert_unaffected().await;
    }
}

#[tokio::test]
async fn conversation_terminate_of_anothers_conversation_is_unknown_conversation() {
    for established_call in [false, true] {
        let mut s = Scene::new(established_call).await;
        let ids = s.conversation_ids();
        s.attack(
            &ids,
            |conversation| ClientMsg::ConversationTerminate {
                rid: None,
                conversation,
            },
            ErrorCode::UnknownConversation,
        )
        .await;
        if !established_call {
            s.alice.expect_silence(QUIET).await;
            s.accept().await;
        }
        s.assert_unaffected().await;
    }
}

#[tokio::test]
async fn call_establish_into_anothers_conversation_is_unknown_conversation() {
    let mut s = Scene::new(true).await;
    let ids = s.conversation_ids();
    s.attack(
        &ids,
        |conversation| ClientMsg::CallEstablish {
            rid: None,
            to: BOB.into(),
            conversation: Some(conversation),
            toast: None,
            sdp: offer(),
        },
        ErrorCode::UnknownConversation,
    )
    .await;
    s.assert_unaffected().await;
}

#[tokio::test]
async fn message_on_anothers_call_fails_481() {
    for established_call in [false, true] {
        let mut s = Scene::new(established_call).await;
        for id in s.call_ids() {
            for attacker in [&mut s.mallory, &mut s.alice2] {
                for body in [Body::Text("boo".into()), Body::Binary(vec![0xde, 0xad])] {
                    let content_type = if body.is_text() {
                        "text/plain"
                    } else {
                        "application/octet-stream"
                    };
                    let reply = attacker
                        .request(ClientMsg::Message {
                            rid: None,
                            call: id.clone(),
                            content_type: content_type.into(),
                            body,
                        })
                        .await;
                    match &reply {
                        ServerMsg::MessageFailed {
                            call,
                            msg: None,
                            code: 481,
                            text,
                            ..
                        } => {
                            assert_eq!(call, &id);
                            assert_clean(text);
                        }
                        other => panic!("expected message_failed 481, got {other:?}"),
                    }
                }
            }
        }
        if !established_call {
            s.alice.expect_silence(QUIET).await;
            s.accept().await;
        }
        s.assert_unaffected().await;
    }
}

#[tokio::test]
async fn message_ack_on_anothers_call_is_ignored() {
    let mut s = Scene::new(true).await;
    // Alice sends; bob receives and holds his ack.
    let rid = s.alice.rid();
    s.alice
        .send(&ClientMsg::Message {
            rid,
            call: s.ca.clone(),
            content_type: "text/plain".into(),
            body: "ack me".into(),
        })
        .await;
    let m = s.bob.recv().await;
    let ServerMsg::MessageReceived { msg, .. } = m else {
        panic!("expected message_received, got {m:?}");
    };
    // The attackers ack it (and its neighbours) on every id: nothing, not even an error.
    for attacker in [&mut s.mallory, &mut s.alice2] {
        for call in [s.ca.clone(), s.cb.clone()] {
            for n in [msg.saturating_sub(1), msg, msg + 1] {
                attacker
                    .send(&ClientMsg::MessageAck {
                        call: call.clone(),
                        msg: n,
                    })
                    .await;
            }
        }
        assert_open(attacker).await;
    }
    // Alice is not told it was delivered until bob himself acks.
    s.alice.expect_silence(QUIET).await;
    s.bob.expect_silence(QUIET).await;
    s.bob
        .send(&ClientMsg::MessageAck {
            call: s.cb.clone(),
            msg,
        })
        .await;
    assert_eq!(
        s.alice.recv().await,
        ServerMsg::MessageDelivered {
            rid,
            call: s.ca.clone(),
            msg
        }
    );
    s.assert_unaffected().await;
}

#[tokio::test]
async fn composing_on_anothers_call_is_ignored() {
    let mut s = Scene::new(true).await;
    for attacker in [&mut s.mallory, &mut s.alice2] {
        for call in [s.ca.clone(), s.cb.clone()] {
            for active in [true, false, true] {
                attacker
                    .send(&ClientMsg::Composing {
                        call: call.clone(),
                        active,
                    })
                    .await;
            }
        }
        assert_open(attacker).await;
    }
    // Neither party sees a remote_composing.
    s.assert_unaffected().await;
    // A real composing still works.
    s.alice
        .send(&ClientMsg::Composing {
            call: s.ca.clone(),
            active: true,
        })
        .await;
    assert_eq!(
        s.bob.recv().await,
        ServerMsg::RemoteComposing {
            call: s.cb.clone(),
            active: true
        }
    );
}

// ---- tokens ----

/// base64url without padding (RFC 7515 §2).
fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[derive(serde::Serialize, Default)]
struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn claims(sub: &str, exp: i64) -> Claims {
    Claims {
        sub: Some(sub.to_owned()),
        exp: Some(exp),
        nbf: None,
    }
}

fn signed(alg: jsonwebtoken::Algorithm, secret: &str, c: &Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        c,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

fn hs256(c: &Claims) -> String {
    signed(jsonwebtoken::Algorithm::HS256, SECRET, c)
}

/// Signs in as alice with `token`; returns the node's only answer (the connection is closed
/// after a refusal, asserted here) or the welcome.
async fn try_token(addr: std::net::SocketAddr, token: String) -> ServerMsg {
    let mut c = Raw::connect(addr).await;
    c.send(&ClientMsg::Hello {
        resume: None,
        rid: Some(1),
        version: 1,
        user: ALICE.to_owned(),
        token,
        device: "laptop".to_owned(),
        agent: None,
    })
    .await;
    let first = c.recv().await;
    if !matches!(first, ServerMsg::Welcome { .. }) {
        let rest = c.expect_closed().await;
        assert!(rest.is_empty(), "{rest:?}");
    }
    first
}

async fn assert_unauthorized(addr: std::net::SocketAddr, token: String, what: &str) {
    match try_token(addr, token).await {
        ServerMsg::Error {
            rid: Some(1),
            code: ErrorCode::Unauthorized,
            message,
        } => assert_clean(&message),
        other => panic!("{what}: expected unauthorized, got {other:?}"),
    }
}

async fn assert_welcome(addr: std::net::SocketAddr, token: String, what: &str) {
    let m = try_token(addr, token).await;
    assert!(matches!(m, ServerMsg::Welcome { .. }), "{what}: {m:?}");
}

#[tokio::test]
async fn only_hs256_with_the_node_secret_is_accepted() {
    let node = start_node(|s| s.auth.leeway_s = 5);
    let good = claims(ALICE, now() + 600);
    assert_welcome(node.addr, hs256(&good), "HS256").await;

    let payload = b64(&serde_json::to_vec(&good).expect("json"));
    let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    assert_unauthorized(node.addr, format!("{none_header}.{payload}."), "alg none").await;
    let none_lower = b64(br#"{"alg":"None"}"#);
    assert_unauthorized(node.addr, format!("{none_lower}.{payload}."), "alg None").await;
    // A valid HS256 token whose header is swapped for `none`, signature kept.
    let real = hs256(&good);
    let sig = real.rsplit('.').next().expect("a signature");
    assert_unauthorized(
        node.addr,
        format!("{none_header}.{payload}.{sig}"),
        "alg none with a signature",
    )
    .await;
    for alg in [
        jsonwebtoken::Algorithm::HS384,
        jsonwebtoken::Algorithm::HS512,
    ] {
        assert_unauthorized(node.addr, signed(alg, SECRET, &good), &format!("{alg:?}")).await;
    }
    // An RS256 header over an HMAC signature made with the shared secret (key confusion).
    let rs_header = b64(br#"{"alg":"RS256","typ":"JWT"}"#);
    assert_unauthorized(node.addr, format!("{rs_header}.{payload}.{sig}"), "RS256").await;
    assert_unauthorized(
        node.addr,
        signed(jsonwebtoken::Algorithm::HS256, "not-the-secret", &good),
        "wrong secret",
    )
    .await;
}

#[tokio::test]
async fn exp_and_nbf_hold_within_the_leeway_only() {
    let node = start_node(|s| s.auth.leeway_s = 5);
    let t = now();
    assert_unauthorized(node.addr, hs256(&claims(ALICE, t - 60)), "expired 60 s ago").await;
    assert_unauthorized(node.addr, hs256(&claims(ALICE, t - 10)), "expired 10 s ago").await;
    assert_welcome(node.addr, hs256(&claims(ALICE, t - 2)), "expired 2 s ago").await;
    let future = |nbf| Claims {
        nbf: Some(nbf),
        ..claims(ALICE, t + 600)
    };
    assert_unauthorized(node.addr, hs256(&future(t + 60)), "nbf in 60 s").await;
    assert_welcome(node.addr, hs256(&future(t + 2)), "nbf in 2 s").await;
    assert_welcome(node.addr, hs256(&future(t - 60)), "nbf passed").await;
    // exp is required.
    let no_exp = Claims {
        sub: Some(ALICE.into()),
        ..Claims::default()
    };
    assert_unauthorized(node.addr, hs256(&no_exp), "no exp").await;
}

#[tokio::test]
async fn the_token_subject_must_be_the_user_signing_in() {
    let node = start_node(|_| {});
    let t = now() + 600;
    assert_unauthorized(node.addr, hs256(&claims(BOB, t)), "bob's token").await;
    assert_unauthorized(
        node.addr,
        hs256(&claims("sip:Alice@example.com", t)),
        "the user part is exact",
    )
    .await;
    assert_unauthorized(node.addr, hs256(&claims("alice", t)), "not a URI").await;
    let no_sub = Claims {
        exp: Some(t),
        ..Claims::default()
    };
    assert_unauthorized(node.addr, hs256(&no_sub), "no sub").await;
    // Scheme and host are normalised on both sides.
    assert_welcome(
        node.addr,
        hs256(&claims("SIP:alice@EXAMPLE.com", t)),
        "normalised sub",
    )
    .await;
}

#[tokio::test]
async fn garbage_tokens_are_unauthorized() {
    let node = start_node(|_| {});
    let payload = b64(br#"{"sub":"sip:alice@example.com","exp":99999999999}"#);
    let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    for garbage in [
        String::new(),
        "garbage".into(),
        "a.b.c".into(),
        "..".into(),
        format!("{header}.{payload}"),
        format!("{header}.{payload}.AAAA"),
        format!("{header}.!!!!.AAAA"),
        format!("{}.{payload}.AAAA", b64(b"not json")),
        "\u{0}\u{1}\u{2}".into(),
        "x".repeat(4000),
    ] {
        assert_unauthorized(node.addr, garbage.clone(), &garbage).await;
    }
}

// ---- error texts ----

fn body(v: &Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, v).expect("encode");
    buf
}

fn map_body(entries: &[(&str, Value)]) -> Vec<u8> {
    body(&Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    ))
}

/// `{"type":"ping","x":[[[…]]]}` with `depth` arrays, written byte by byte (a recursive
/// encoder would itself overflow the test's stack).
fn nested_ping(depth: usize) -> Vec<u8> {
    let mut b = map_body(&[("type", Value::from("ping")), ("x", Value::Nil)]);
    b.pop();
    b.extend(std::iter::repeat_n(0x91, depth));
    b.push(0xc0);
    b
}

/// Deep nesting is refused, not recursed into: a frame of ~600 nested arrays used to overflow a
/// worker thread's stack and abort the whole node (fixed by bounding MessagePack nesting to
/// `confab_protocol::messages::MAX_DEPTH`; see also `protocol/tests/fuzz_regressions.rs`).
#[tokio::test]
async fn deeply_nested_frame_is_bad_frame_and_harms_nobody() {
    let node = start_node(|_| {});
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    // An extra field nesting a little is ignored like any other.
    c.send_body(&nested_ping(4)).await;
    assert!(matches!(c.recv().await, ServerMsg::Pong { .. }));
    // Well within max_frame: one byte per level.
    for depth in [100, 600, 1000, 20_000, 65_000] {
        c.send_body(&nested_ping(depth)).await;
        assert_code(&c.recv().await, ErrorCode::BadFrame);
    }
    assert_open(&mut c).await;
    assert_open(&mut bob).await;
}

#[tokio::test]
async fn error_texts_carry_no_internals() {
    let node = start_node(|_| {});
    let mut c = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut bob = Raw::sign_in(node.addr, BOB, "laptop").await;
    let ty = |t: &str| ("type", Value::from(t));
    let bodies: Vec<Vec<u8>> = vec![
        vec![0xc1],
        vec![0x81, 0xa4],
        vec![
            0x81, 0xa4, b't', b'y', b'p', b'e', 0xa4, 0xff, 0xfe, 0xfd, 0xfc,
        ],
        vec![
            0x82, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'i', b'n', b'g', 0xd4, 1, 2,
        ],
        body(&Value::Array(vec![Value::from("ping")])),
        body(&Value::from("ping")),
        map_body(&[("rid", Value::from(5))]),
        map_body(&[ty("ping"), ("rid", Value::from(-5))]),
        map_body(&[ty("ping"), ("rid", Value::from(1u64 << 40))]),
        map_body(&[ty("ping"), ("rid", Value::F64(1.5))]),
        map_body(&[ty("dance")]),
        map_body(&[ty("subscribe"), ("users", Value::from(ALICE))]),
        map_body(&[
            ty("subscribe"),
            ("users", Value::Array(vec![Value::from(3)])),
        ]),
        map_body(&[
            ty("subscribe"),
            ("users", Value::Array(vec![Value::from("bob")])),
        ]),
        map_body(&[ty("device_state"), ("activity", Value::from("sleepy"))]),
        map_body(&[
            ty("device_state"),
            ("activity", Value::from("active")),
            ("idle_ms", Value::from(-1)),
        ]),
        map_body(&[ty("set_status"), ("status", Value::Boolean(true))]),
        map_body(&[ty("call_decline"), ("call", Value::from(1))]),
        map_body(&[
            ty("call_decline"),
            ("call", Value::from("c")),
            ("code", Value::from(99)),
        ]),
        map_body(&[
            ty("call_decline"),
            ("call", Value::from("c")),
            ("code", Value::from(70000)),
        ]),
        map_body(&[
            ty("call_forward"),
            ("call", Value::from("c")),
            ("to", Value::from("nobody")),
        ]),
        map_body(&[
            ty("call_establish"),
            ("to", Value::from("x")),
            ("sdp", Value::from("v=0")),
        ]),
        map_body(&[
            ty("call_establish"),
            ("to", Value::from(BOB)),
            ("sdp", Value::from("v=0")),
            (
                "toast",
                Value::Map(vec![
                    (Value::from("content_type"), Value::from("text/plain")),
                    (Value::from("body"), Value::Binary(vec![1])),
                ]),
            ),
        ]),
        map_body(&[
            ty("message"),
            ("call", Value::from("c")),
            ("content_type", Value::from("text/plain")),
            ("body", Value::Binary(vec![0xff])),
        ]),
        map_body(&[
            ty("message"),
            ("call", Value::from("c")),
            ("content_type", Value::from("text/plain")),
            ("body", Value::Ext(3, vec![1])),
        ]),
        map_body(&[
            ty("message_ack"),
            ("call", Value::from("c")),
            ("msg", Value::from("one")),
        ]),
        map_body(&[ty("hello"), ("version", Value::from(1))]),
        map_body(&[
            ty("hello"),
            ("version", Value::from(1)),
            ("user", Value::from(ALICE)),
            ("token", Value::from("t")),
            ("device", Value::from("d")),
        ]),
        map_body(&[
            ty("call_accept"),
            ("call", Value::from("nope")),
            ("sdp", Value::from("v=0")),
        ]),
        map_body(&[
            ty("call_transfer"),
            ("call", Value::from("nope")),
            ("to", Value::from(BOB)),
        ]),
    ];
    let mut seen = 0;
    for b in &bodies {
        c.send_body(b).await;
        match c.recv().await {
            ServerMsg::Error { message, .. } => assert_clean(&message),
            ServerMsg::MessageFailed { text, .. } => assert_clean(&text),
            other => panic!("expected an error for {b:02x?}, got {other:?}"),
        }
        seen += 1;
    }
    assert_eq!(seen, bodies.len());

    // Refusals of a call's requests, including a bad answer SDP.
    let (_ca, _) = c.establish(BOB, None).await;
    let (cb, _) = bob.incoming().await;
    for sdp in [
        "garbage",
        "v=0\r\n",
        "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 1 RTP/AVP 0\r\n",
    ] {
        let reply = bob
            .request(ClientMsg::CallAccept {
                rid: None,
                call: cb.clone(),
                sdp: sdp.into(),
            })
            .await;
        assert_code(&reply, ErrorCode::NotAcceptable);
    }
    let reply = bob
        .request(ClientMsg::CallTransfer {
            rid: None,
            call: cb.clone(),
            to: ALICE.into(),
        })
        .await;
    assert_code(&reply, ErrorCode::InvalidState);
    let reply = bob
        .request(ClientMsg::Hello {
            resume: None,
            rid: None,
            version: 1,
            user: BOB.into(),
            token: token(BOB),
            device: "again".into(),
            agent: None,
        })
        .await;
    assert_code(&reply, ErrorCode::InvalidState);

    // Refusals at sign-in.
    for (first, code) in [
        (
            frame(&ClientMsg::Ping { rid: Some(1) }),
            ErrorCode::NotAuthenticated,
        ),
        (
            frame(&ClientMsg::Hello {
                resume: None,
                rid: Some(1),
                version: 2,
                user: ALICE.into(),
                token: token(ALICE),
                device: "d".into(),
                agent: None,
            }),
            ErrorCode::UnsupportedVersion,
        ),
        (
            frame(&ClientMsg::Hello {
                resume: None,
                rid: Some(1),
                version: 1,
                user: "alice".into(),
                token: token(ALICE),
                device: "d".into(),
                agent: None,
            }),
            ErrorCode::Unauthorized,
        ),
        (
            frame(&ClientMsg::Hello {
                resume: None,
                rid: Some(1),
                version: 1,
                user: ALICE.into(),
                token: token(ALICE),
                device: "d".repeat(500),
                agent: None,
            }),
            ErrorCode::BadFrame,
        ),
        (vec![0, 0, 0, 1, 0xc1], ErrorCode::NotAuthenticated),
        (vec![0, 0, 0, 0], ErrorCode::BadFrame),
        (vec![0xff, 0xff, 0xff, 0xff], ErrorCode::FrameTooLarge),
    ] {
        let mut anon = Raw::connect(node.addr).await;
        anon.send_bytes(&first).await;
        let frames = anon.expect_closed().await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_code(&frames[0], code);
    }
    // After hello: framing errors close the connection, with clean text too.
    for bytes in [vec![0u8, 0, 0, 0], vec![0xff, 0xff, 0xff, 0xff]] {
        let mut c = Raw::sign_in(node.addr, "sip:erin@example.com", "laptop").await;
        c.send_bytes(&bytes).await;
        let frames = c.expect_closed().await;
        match &frames[..] {
            [ServerMsg::Error { message, .. }] => assert_clean(message),
            other => panic!("{other:?}"),
        }
    }
}

// ---- presence ----

#[tokio::test]
async fn another_users_subscriber_sees_availability_only() {
    let node = start_node(|_| {});
    let mut a1 = Raw::sign_in(node.addr, ALICE, "laptop").await;
    let mut a2 = Raw::sign_in(node.addr, ALICE, "phone").await;
    let mut mallory = Raw::sign_in(node.addr, MALLORY, "laptop").await;
    let sub = ClientMsg::Subscribe {
        rid: None,
        users: vec![ALICE.into()],
    };
    let reply = mallory.request(sub.clone()).await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    let reply = a1.request(sub).await;
    assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");

    // Alice's devices change everything a presence event can carry.
    let changes = [
        ClientMsg::DeviceState {
            rid: None,
            activity: Activity::Active,
            idle_ms: Some(10),
        },
        ClientMsg::SetStatus {
            rid: None,
            status: Some(Status::Busy),
        },
        ClientMsg::DeviceState {
            rid: None,
            activity: Activity::Away,
            idle_ms: None,
        },
        ClientMsg::SetStatus {
            rid: None,
            status: Some(Status::AppearOffline),
        },
        ClientMsg::SetStatus {
            rid: None,
            status: None,
        },
    ];
    for (i, change) in changes.into_iter().enumerate() {
        let who = if i % 2 == 0 { &mut a2 } else { &mut a1 };
        let reply = who.request(change).await;
        assert!(matches!(reply, ServerMsg::Ok { .. }), "{reply:?}");
    }
    let bye = a2.request(ClientMsg::Bye { rid: None }).await;
    assert!(matches!(bye, ServerMsg::Ok { .. }));

    // Alice's own device sees the details (so there were details to leak) ...
    let (full, _) = a1
        .recv_until(|m| matches!(m, ServerMsg::Presence { endpoints: Some(e), .. } if e.len() == 1))
        .await;
    assert!(matches!(
        full,
        ServerMsg::Presence {
            most_active: Some(_),
            status: Some(_),
            ..
        }
    ));
    // ... mallory sees user and availability only, in every event.
    let mut events = 0;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(300), mallory.recv()).await {
        match m {
            ServerMsg::Presence {
                user,
                most_active,
                endpoints,
                status,
                ..
            } => {
                assert_eq!(user, ALICE);
                assert_eq!((most_active, endpoints, status), (None, None, None));
                events += 1;
            }
            other => panic!("mallory got {other:?}"),
        }
    }
    assert!(events >= 3, "mallory saw only {events} presence events");
}
