//! Sign-in tokens: JWTs whose `sub` is the user's SIP URI.
//!
//! - **HS256** with the node's shared secret (`auth.jwt_secret`).
//! - **RS256, ES256 and EdDSA** with the public keys of an identity provider, from a JWKS file
//!   (`auth.jwks_file`), chosen by the token's `kid` (a set with one key of the token's kind
//!   needs none). The file is re-read by [`Verifier::reload`] (SIGHUP), so a key rotates
//!   without ending a call: keep the old key in the set until its tokens have expired.
//! - `iss` and `aud` are checked when `auth.issuer` / `auth.audience` are set.
//!
//! The algorithm comes from the key, never from the token alone: a token's `alg` must be the
//! one its key is for (so no `none`, and no HS256 token "signed" with a public key). A token
//! that fails any check is refused with a [`TokenRefusal`] that names the check and nothing
//! secret.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use thiserror::Error;

/// Why a token was refused: the check that failed. Its text goes to the client after
/// "invalid token: ".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenRefusal {
    #[error("malformed")]
    Malformed,
    #[error("algorithm not accepted")]
    Algorithm,
    #[error("unknown key")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("missing claim")]
    MissingClaim,
    #[error("subject is not the user signing in")]
    WrongUser,
}

impl TokenRefusal {
    /// Every check, for registering the metric's series at zero.
    pub const ALL: [TokenRefusal; 10] = [
        TokenRefusal::Malformed,
        TokenRefusal::Algorithm,
        TokenRefusal::UnknownKey,
        TokenRefusal::Signature,
        TokenRefusal::Expired,
        TokenRefusal::NotYetValid,
        TokenRefusal::Issuer,
        TokenRefusal::Audience,
        TokenRefusal::MissingClaim,
        TokenRefusal::WrongUser,
    ];

    /// The `check` label of `confab_tokens_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            TokenRefusal::Malformed => "malformed",
            TokenRefusal::Algorithm => "algorithm",
            TokenRefusal::UnknownKey => "unknown_key",
            TokenRefusal::Signature => "signature",
            TokenRefusal::Expired => "expired",
            TokenRefusal::NotYetValid => "not_yet_valid",
            TokenRefusal::Issuer => "issuer",
            TokenRefusal::Audience => "audience",
            TokenRefusal::MissingClaim => "missing_claim",
            TokenRefusal::WrongUser => "wrong_user",
        }
    }
}

/// Why the keys could not be loaded.
#[derive(Debug, Error)]
pub enum KeysError {
    #[error("auth.jwks_file: cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("auth.jwks_file: {path} is not a JWK set: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("auth.jwks_file: key {kid:?}: {reason}")]
    Key { kid: String, reason: String },
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// One public key of the JWK set, with the algorithm it is for.
struct PublicKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens: against the shared secret (HS256) and the JWK set's keys.
pub struct Verifier {
    /// `None` when `auth.jwt_secret` is empty (a JWK set only): HS256 tokens are refused.
    secret: Option<DecodingKey>,
    keys: RwLock<Arc<Vec<PublicKey>>>,
    jwks_file: Option<PathBuf>,
    leeway_s: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Verifier {
    /// HS256 with `secret` only.
    pub fn new(secret: &str, leeway_s: u64) -> Self {
        Verifier {
            secret: (!secret.is_empty()).then(|| DecodingKey::from_secret(secret.as_bytes())),
            keys: RwLock::new(Arc::new(Vec::new())),
            jwks_file: None,
            leeway_s,
            issuer: None,
            audience: None,
        }
    }

    /// As `auth` says: the secret, the JWK set file if any (read now: a file that does not
    /// load stops the node), the issuer and audience if set.
    pub fn from_settings(auth: &crate::settings::Auth) -> Result<Self, KeysError> {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let mut v = Verifier::new(&auth.jwt_secret, auth.leeway_s);
        v.issuer = non_empty(&auth.issuer);
        v.audience = non_empty(&auth.audience);
        if !auth.jwks_file.is_empty() {
            let path = PathBuf::from(&auth.jwks_file);
            v.keys = RwLock::new(Arc::new(load_keys(&path)?));
            v.jwks_file = Some(path);
        }
        Ok(v)
    }

    /// Reads the JWK set file again (SIGHUP); a file that does not load leaves the keys as
    /// they were. `Ok(false)` when there is no file to read.
    pub fn reload(&self) -> Result<bool, KeysError> {
        let Some(path) = &self.jwks_file else {
            return Ok(false);
        };
        let keys = load_keys(path)?;
        tracing::info!(keys = keys.len(), path = %path.display(), "JWK set reloaded");
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(true)
    }

    /// Ok when `token` is valid now and its normalised `sub` equals `user` (already normalised).
    pub fn verify(&self, token: &str, user: &str) -> Result<(), TokenRefusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRefusal::Malformed)?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (alg, key) = match header.alg {
            Algorithm::HS256 => (
                Algorithm::HS256,
                self.secret.as_ref().ok_or(TokenRefusal::Algorithm)?,
            ),
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
                let mut fitting = keys.iter().filter(|k| k.alg == header.alg);
                let found = match &header.kid {
                    Some(kid) => fitting.find(|k| k.kid.as_deref() == Some(kid.as_str())),
                    // Without a `kid`, only a set with one key of this kind says which.
                    None => match (fitting.next(), fitting.next()) {
                        (Some(only), None) => Some(only),
                        _ => None,
                    },
                };
                let found = found.ok_or(TokenRefusal::UnknownKey)?;
                (found.alg, &found.key)
            }
            _ => return Err(TokenRefusal::Algorithm),
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation(alg))
            .map_err(|e| refusal(&e))?;
        match confab_protocol::uri::normalize_user_uri(&data.claims.sub) {
            Ok(sub) if sub == user => Ok(()),
            _ => Err(TokenRefusal::WrongUser),
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

/// The check a library error stands for.
fn refusal(e: &jsonwebtoken::errors::Error) -> TokenRefusal {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenRefusal::Signature,
        K::ExpiredSignature => TokenRefusal::Expired,
        K::ImmatureSignature => TokenRefusal::NotYetValid,
        K::InvalidIssuer => TokenRefusal::Issuer,
        K::InvalidAudience => TokenRefusal::Audience,
        K::MissingRequiredClaim(_) => TokenRefusal::MissingClaim,
        K::InvalidAlgorithm | K::MissingAlgorithm => TokenRefusal::Algorithm,
        _ => TokenRefusal::Malformed,
    }
}

/// The public keys of the JWK set in `path` that sign RS256, ES256 (P-256) or EdDSA (Ed25519).
fn load_keys(path: &Path) -> Result<Vec<PublicKey>, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeysError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| KeysError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut kids: HashMap<String, ()> = HashMap::new();
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        let err = |reason: &str| KeysError::Key {
            kid: kid.clone().unwrap_or_default(),
            reason: reason.to_owned(),
        };
        if let Some(k) = &kid
            && kids.insert(k.clone(), ()).is_some()
        {
            return Err(err("the same kid twice"));
        }
        // Providers publish encryption keys and kinds this node does not sign with beside
        // their signing keys: those are passed over, not a reason to refuse the whole set.
        let for_signing = !matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        );
        let Some(alg) = key_algorithm(jwk).filter(|_| for_signing) else {
            tracing::warn!(kid = ?kid, "JWK set: skipping a key that is not an RS256, ES256 or EdDSA signing key");
            continue;
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| err(&e.to_string()))?;
        keys.push(PublicKey { kid, alg, key });
    }
    Ok(keys)
}

/// The algorithm a JWK signs with, from its kind (and its `alg` if it names one).
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let by_kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    match jwk.common.key_algorithm.map(|a| a.to_string()) {
        None => Some(by_kind),
        Some(named) if named == format!("{by_kind:?}") => Some(by_kind),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde::Serialize;

    #[derive(Serialize)]
    struct C<'a> {
        sub: &'a str,
        exp: u64,
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(alg: Algorithm, secret: &str, sub: &str, exp: u64) -> String {
        encode(
            &Header::new(alg),
            &C { sub, exp },
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    #[test]
    fn accepts_a_valid_token_for_the_same_user() {
        let v = Verifier::new("s", 5);
        let t = token(Algorithm::HS256, "s", "SIP:alice@EXAMPLE.com", now() + 60);
        assert_eq!(v.verify(&t, "sip:alice@example.com"), Ok(()));
    }

    #[test]
    fn each_refusal_names_its_check() {
        let v = Verifier::new("s", 5);
        let user = "sip:alice@example.com";
        let cases = [
            (
                token(Algorithm::HS256, "x", user, now() + 60),
                TokenRefusal::Signature,
            ),
            (
                token(Algorithm::HS256, "s", "sip:bob@example.com", now() + 60),
                TokenRefusal::WrongUser,
            ),
            (
                token(Algorithm::HS384, "s", user, now() + 60),
                TokenRefusal::Algorithm,
            ),
            (
                token(Algorithm::HS256, "s", user, now() - 60),
                TokenRefusal::Expired,
            ),
            ("not.a.jwt".to_owned(), TokenRefusal::Malformed),
        ];
        for (t, want) in cases {
            assert_eq!(v.verify(&t, user), Err(want));
        }
    }

    #[test]
    fn a_public_key_algorithm_without_a_jwk_set_is_an_unknown_key() {
        let v = Verifier::new("s", 5);
        let mut header =
            jsonwebtoken::decode_header(&token(Algorithm::HS256, "s", "sip:a@b", now() + 60))
                .expect("header");
        header.alg = Algorithm::ES256;
        // Re-encode only the header: the signature does not matter, the key is looked up first.
        let t = token(Algorithm::HS256, "s", "sip:a@b", now() + 60);
        let rest = t.split_once('.').map(|(_, r)| r).unwrap_or_default();
        let forged = format!(
            "{}.{rest}",
            base64_url(&serde_json::to_vec(&header).expect("json"))
        );
        assert_eq!(v.verify(&forged, "sip:a@b"), Err(TokenRefusal::UnknownKey));
    }

    fn base64_url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.len();
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=n {
                out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
