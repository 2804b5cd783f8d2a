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
    let scheme = if scheme.eq_ignore_ascii_case("sip") {
        "sip"
    } else if scheme.eq_ignore_ascii_case("sips") {
        "sips"
    } else {
        return Err(InvalidUri);
    };
    let (user, host) = rest.rsplit_once('@').ok_or(InvalidUri)?;
    if !acceptable_part(user) || !acceptable_part(host) || host.contains('@') {
        return Err(InvalidUri);
    }
    // Built in one allocation: this runs for every sign-in and every call's target.
    let mut normalized = String::with_capacity(uri.len());
    normalized.push_str(scheme);
    normalized.push(':');
    normalized.push_str(user);
    normalized.push('@');
    let host_start = normalized.len();
    normalized.push_str(host);
    normalized[host_start..].make_ascii_lowercase();
    Ok(normalized)
}

/// A user or host part: not empty, no whitespace, no control characters, none of `<>"`.
fn acceptable_part(s: &str) -> bool {
    let forbidden = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"');
    if s.is_ascii() {
        // Byte by byte for the usual all-ASCII part; for ASCII, `is_whitespace` and
        // `is_control` are exactly the bytes up to space and DEL, which the test below checks.
        !s.is_empty()
            && s.bytes()
                .all(|b| b > b' ' && b != 0x7f && !matches!(b, b'<' | b'>' | b'"'))
    } else {
        !s.chars().any(forbidden)
    }
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

    #[test]
    fn the_ascii_fast_path_forbids_exactly_what_the_char_rules_forbid() {
        for b in 0u8..0x80 {
            let c = char::from(b);
            let by_char = c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"');
            let uri = format!("sip:a{c}b@host");
            assert_eq!(normalize_user_uri(&uri).is_err(), by_char, "byte {b:#x}");
        }
    }

    #[test]
    fn non_ascii_parts_are_checked_by_character() {
        assert_eq!(
            normalize_user_uri("sip:J\u{f6}rg@B\u{fc}cher.DE").as_deref(),
            Ok("sip:J\u{f6}rg@b\u{fc}cher.de")
        );
        // No-break space and a C1 control character are whitespace and control outside ASCII.
        assert_eq!(normalize_user_uri("sip:a\u{a0}b@h"), Err(InvalidUri));
        assert_eq!(normalize_user_uri("sip:a@h\u{85}"), Err(InvalidUri));
    }
}
