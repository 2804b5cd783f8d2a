//! Sign-in tokens: HS256 JWTs whose `sub` is the user's SIP URI. The algorithm is pinned, so a
//! token signed any other way (including `none`) is refused.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("token rejected: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("token subject is not the claimed user")]
    WrongUser,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// Verifies tokens against the node's secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &str, leeway_s: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Ok when `token` is valid now and its normalised `sub` equals `user` (already normalised).
    pub fn verify(&self, token: &str, user: &str) -> Result<(), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        match confab_protocol::uri::normalize_user_uri(&data.claims.sub) {
            Ok(sub) if sub == user => Ok(()),
            _ => Err(AuthError::WrongUser),
        }
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
        assert!(v.verify(&t, "sip:alice@example.com").is_ok());
    }

    #[test]
    fn rejects_wrong_secret_user_algorithm_and_expiry() {
        let v = Verifier::new("s", 5);
        let user = "sip:alice@example.com";
        assert!(
            v.verify(&token(Algorithm::HS256, "x", user, now() + 60), user)
                .is_err()
        );
        assert!(
            v.verify(
                &token(Algorithm::HS256, "s", "sip:bob@example.com", now() + 60),
                user
            )
            .is_err()
        );
        assert!(
            v.verify(&token(Algorithm::HS384, "s", user, now() + 60), user)
                .is_err()
        );
        assert!(
            v.verify(&token(Algorithm::HS256, "s", user, now() - 60), user)
                .is_err()
        );
        assert!(v.verify("not.a.jwt", user).is_err());
    }
}
