//! SIP user URIs as the contract uses them: `sip:user@host`, normalised by lower-casing the
//! scheme and the host while keeping the user part exact (RFC 3261 §19.1.4 compares users
//! case-sensitively and hosts case-insensitively).

use thiserror::Error;

/// Why a string is not a user URI the node accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a SIP user URI (expected sip:user@host)")]
pub struct InvalidUri;

/// Longest URI accepted; anything longer is a mistake or an attack, never a real address.
pub const MAX_URI_LEN: usize = 256;

/// Normalises `sip:User@Example.COM` to `sip:User@example.com`; rejects anything else.
pub fn normalize_user_uri(uri: &str) -> Result<String, InvalidUri> {
    if uri.len() > MAX_URI_LEN {
        return Err(InvalidUri);
    }
    let (scheme, rest) = uri.split_once(':').ok_or(InvalidUri)?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "sip" && scheme != "sips" {
        return Err(InvalidUri);
    }
    let (user, host) = rest.rsplit_once('@').ok_or(InvalidUri)?;
    let bad = |s: &str| {
        s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"'))
    };
    if bad(user) || bad(host) || host.contains('@') {
        return Err(InvalidUri);
    }
    Ok(format!("{scheme}:{user}@{}", host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercases_scheme_and_host_only() {
        assert_eq!(
            normalize_user_uri("SIP:Alice@Example.COM").as_deref(),
            Ok("sip:Alice@example.com")
        );
        assert_eq!(
            normalize_user_uri("sips:bob@b.org").as_deref(),
            Ok("sips:bob@b.org")
        );
    }

    #[test]
    fn rejects_non_sip_uris() {
        for bad in [
            "",
            "alice",
            "tel:+123",
            "sip:",
            "sip:@host",
            "sip:alice@",
            "sip:a b@c",
            "mailto:a@b",
            "sip:alice",
        ] {
            assert_eq!(normalize_user_uri(bad), Err(InvalidUri), "{bad:?}");
        }
        assert_eq!(
            normalize_user_uri(&format!("sip:{}@h", "a".repeat(300))),
            Err(InvalidUri)
        );
    }
}
