//! Minting the JWTs that `hello` carries (HS256, `sub` = the user URI, `exp` in the future).
//! The node owns the secret in production; this exists for tests, the CLI and the bench, which
//! share it with the node they talk to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
}

/// An HS256 token for `user` signed with `secret`, valid for `ttl` from now.
///
/// `user` goes into `sub` as given; the node normalises it before comparing it with the
/// `hello`'s user.
pub fn mint(user: &str, secret: impl AsRef<[u8]>, ttl: Duration) -> String {
    // A clock before 1970 only makes the token expired, which the node reports clearly.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let claims = Claims {
        sub: user,
        exp: now.saturating_add(ttl).as_secs(),
        iat: now.as_secs(),
    };
    let key = EncodingKey::from_secret(secret.as_ref());
    // HS256 with a byte secret and plain claims cannot fail to encode; should it ever, an empty
    // token is refused by the node as `unauthorized`, which beats a panic in the caller.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap_or_else(|e| {
        tracing::error!(error = %e, "could not sign a token");
        String::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Back {
        sub: String,
        exp: u64,
    }

    #[test]
    fn round_trips_with_hs256_and_the_same_secret() {
        let token = mint("sip:alice@example.com", "s3cret", Duration::from_secs(60));
        let data = decode::<Back>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("valid token");
        assert_eq!(data.claims.sub, "sip:alice@example.com");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        assert!(data.claims.exp >= now + 59 && data.claims.exp <= now + 61);
    }

    #[test]
    fn another_secret_does_not_verify() {
        let token = mint("sip:alice@example.com", "s3cret", Duration::from_secs(60));
        let result = decode::<Back>(
            &token,
            &DecodingKey::from_secret(b"other"),
            &Validation::new(Algorithm::HS256),
        );
        assert!(result.is_err());
    }
}
