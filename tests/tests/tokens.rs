//! Sign-in tokens of an identity provider (docs/protocol.md §3, docs/security.md §2): RS256,
//! ES256 and EdDSA keys from a JWKS file chosen by `kid`, `iss` and `aud` checked, each refusal
//! naming its check, and a key rotated in the file (SIGHUP's reload) under a live call. The
//! EC and Ed25519 keys are made at run time (rcgen); the RSA key is a test fixture.
#![allow(clippy::unwrap_used)]

use confab_protocol::*;
use confab_tests::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::net::SocketAddr;

const ALICE: &str = "sip:alice@example.com";
const BOB: &str = "sip:bob@example.com";
const ISSUER: &str = "https://idp.example.com";
const AUDIENCE: &str = "confab";

/// A signing key of the identity provider: its `kid`, algorithm, private key and public JWK.
struct IdpKey {
    kid: &'static str,
    alg: Algorithm,
    private: EncodingKey,
    jwk: Value,
}

fn b64url(bytes: &[u8]) -> String {
    use std::fmt::Write;
    // The JWK's numbers: unpadded base64url, by hand rather than another dependency.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            let _ = write!(out, "{}", A[((v >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn ec_key(kid: &'static str) -> IdpKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw(); // 0x04 || X || Y
    IdpKey {
        kid,
        alg: Algorithm::ES256,
        private: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "x": b64url(&raw[1..33]),
                    "y": b64url(&raw[33..65]), "kid": kid, "alg": "ES256", "use": "sig"}),
    }
}

fn ed_key(kid: &'static str) -> IdpKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    IdpKey {
        kid,
        alg: Algorithm::EdDSA,
        private: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(pair.public_key_raw()),
                    "kid": kid, "alg": "EdDSA"}),
    }
}

fn rsa_key(kid: &'static str) -> IdpKey {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let pem = std::fs::read(format!("{dir}/rsa-test-key.pem")).unwrap();
    let mut jwk: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/rsa-test-jwk.json")).unwrap())
            .unwrap();
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!("RS256");
    IdpKey {
        kid,
        alg: Algorithm::RS256,
        private: EncodingKey::from_rsa_pem(&pem).unwrap(),
        jwk,
    }
}

fn write_jwks(path: &std::path::Path, keys: &[&IdpKey]) {
    let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    std::fs::write(path, set.to_string()).unwrap();
}

/// A token for `sub` signed by `key` (its `kid` in the header), with `claims` over the
/// defaults (a valid `iss`, `aud` and an `exp` an hour away).
fn idp_token(key: &IdpKey, sub: &str, claims: Value) -> String {
    let mut body = json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE,
                          "exp": jsonwebtoken::get_current_timestamp() + 3600});
    for (k, v) in claims.as_object().unwrap() {
        if v.is_null() {
            body.as_object_mut().unwrap().remove(k);
        } else {
            body[k] = v.clone();
        }
    }
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.to_owned());
    jsonwebtoken::encode(&header, &body, &key.private).unwrap()
}

/// Sends a `hello` with `token`; the node's answer.
async fn hello(addr: SocketAddr, user: &str, token: String) -> (Raw, ServerMsg) {
    let mut raw = Raw::connect(addr).await;
    raw.send(&ClientMsg::Hello {
        resume: None,
        rid: Some(1),
        version: 1,
        user: user.to_owned(),
        token,
        device: "laptop".to_owned(),
        agent: None,
    })
    .await;
    let answer = raw.recv().await;
    if let ServerMsg::Welcome { endpoint, .. } = &answer {
        raw.endpoint = endpoint.clone();
        raw.user = user.to_owned();
    }
    (raw, answer)
}

fn idp_node(jwks: &std::path::Path) -> confab_actors::RunningNode {
    let jwks = jwks.to_str().unwrap().to_owned();
    start_node(move |s| {
        s.auth.jwks_file = jwks;
        s.auth.issuer = ISSUER.to_owned();
        s.auth.audience = AUDIENCE.to_owned();
        s.fork.toast_timeout_ms = 60_000;
    })
}

#[tokio::test]
async fn every_algorithm_signs_in_and_every_failed_check_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let (rsa, ec, ed) = (rsa_key("rsa-1"), ec_key("ec-1"), ed_key("ed-1"));
    // Providers publish encryption keys beside their signing keys: skipped, not fatal.
    let mut enc = rsa_key("enc-1");
    enc.jwk["use"] = json!("enc");
    enc.jwk["alg"] = json!("RSA-OAEP");
    write_jwks(&jwks, &[&rsa, &ec, &ed, &enc]);
    let node = idp_node(&jwks);

    for key in [&rsa, &ec, &ed] {
        let (_raw, answer) = hello(node.addr, ALICE, idp_token(key, ALICE, json!({}))).await;
        assert!(
            matches!(answer, ServerMsg::Welcome { .. }),
            "{:?}: {answer:?}",
            key.alg
        );
    }
    // The shared secret's HS256 tokens still sign in (iss and aud are checked there too).
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": ALICE, "iss": ISSUER, "aud": AUDIENCE,
                "exp": jsonwebtoken::get_current_timestamp() + 60}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert!(matches!(
        hello(node.addr, ALICE, hs).await.1,
        ServerMsg::Welcome { .. }
    ));

    let stranger = ec_key("ec-1"); // the kid of a known key, another key's signature
    let now = jsonwebtoken::get_current_timestamp();
    let cases = [
        (idp_token(&ec, ALICE, json!({"exp": now - 120})), "expired"),
        (
            idp_token(&ec, ALICE, json!({"nbf": now + 600})),
            "not yet valid",
        ),
        (
            idp_token(&ec, ALICE, json!({"iss": "https://evil.example"})),
            "wrong issuer",
        ),
        (
            idp_token(&ec, ALICE, json!({"aud": "someone-else"})),
            "wrong audience",
        ),
        (idp_token(&ec, ALICE, json!({"aud": null})), "missing claim"),
        (
            idp_token(&ec, BOB, json!({})),
            "subject is not the user signing in",
        ),
        (idp_token(&ec_key("ec-9"), ALICE, json!({})), "unknown key"),
        (idp_token(&stranger, ALICE, json!({})), "bad signature"),
        ("garbage".to_owned(), "malformed"),
    ];
    for (token, why) in cases {
        let (_raw, answer) = hello(node.addr, ALICE, token).await;
        let ServerMsg::Error { code, message, .. } = &answer else {
            panic!("{why}: {answer:?}");
        };
        assert_eq!(*code, ErrorCode::Unauthorized, "{why}");
        assert_eq!(message, &format!("invalid token: {why}"));
    }
    let (_, _, metrics) = http_get(node.metrics_addr.unwrap(), "/metrics").await;
    for check in [
        "expired",
        "issuer",
        "audience",
        "unknown_key",
        "signature",
        "wrong_user",
    ] {
        let series = format!("confab_tokens_refused_total{{check=\"{check}\"}}");
        assert!(metric(&metrics, &series) >= 1.0, "{series}");
    }
}

#[tokio::test]
async fn a_key_rotated_in_the_jwks_file_spares_the_live_call_and_serves_new_sign_ins() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let (old, new) = (ec_key("2026-11"), ed_key("2026-12"));
    write_jwks(&jwks, &[&old]);
    let node = idp_node(&jwks);
    let (mut alice, _) = hello(node.addr, ALICE, idp_token(&old, ALICE, json!({}))).await;
    let (mut bob, _) = hello(node.addr, BOB, idp_token(&old, BOB, json!({}))).await;
    let (call, _) = alice.establish(BOB, None).await;
    let (incoming, _) = bob.incoming().await;
    assert!(matches!(bob.accept(&incoming).await, ServerMsg::Ok { .. }));
    alice.state(&call, CallState::Established).await;

    // A file that does not load changes nothing.
    std::fs::write(&jwks, "{not json").unwrap();
    assert!(node.reload_token_keys().is_err());
    assert!(matches!(
        hello(node.addr, ALICE, idp_token(&old, ALICE, json!({})))
            .await
            .1,
        ServerMsg::Welcome { .. }
    ));

    // The new key only: new sign-ins need it, the call signed in with the old one goes on.
    write_jwks(&jwks, &[&new]);
    assert!(node.reload_token_keys().unwrap());
    let refused = hello(node.addr, ALICE, idp_token(&old, ALICE, json!({})))
        .await
        .1;
    assert!(
        matches!(&refused, ServerMsg::Error { message, .. } if message == "invalid token: unknown key"),
        "{refused:?}"
    );
    assert!(matches!(
        hello(node.addr, ALICE, idp_token(&new, ALICE, json!({})))
            .await
            .1,
        ServerMsg::Welcome { .. }
    ));
    send_and_ack(&mut alice, &call, &mut bob, &incoming, "still here").await;
}
