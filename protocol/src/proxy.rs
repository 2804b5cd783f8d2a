//! The PROXY protocol, version 2 (HAProxy's binary header): what a load balancer in front of
//! the node puts before a connection's first byte, so the node sees the client's address
//! rather than the balancer's. Pure parsing; the session reads the bytes.
//!
//! The header is 16 fixed bytes (the signature, version and command, family and transport, and
//! the length of the rest), then that many bytes: the source and destination addresses and
//! ports for TCP over IPv4 (12 bytes) or IPv6 (36), then optional TLVs, which are skipped.
//! `LOCAL` (the balancer's own health check) and families other than TCP/IP carry no client
//! address: the connection's own peer stands.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use thiserror::Error;

/// The first 12 bytes of every version 2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version and command, family, length.
pub const FIXED_LEN: usize = 16;
/// The most the variable part may hold here: the addresses and a few TLVs. A balancer sends
/// far less; a larger length is refused before it is read.
pub const MAX_REST_LEN: usize = 512;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied TCP connection from `source` to `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// `LOCAL`, or a family without a TCP/IP address: use the connection's own peer.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol v2 header")]
    Signature,
    #[error("PROXY protocol version {0} (only 2)")]
    Version(u8),
    #[error("unknown PROXY command {0}")]
    Command(u8),
    #[error("PROXY header length {0} over the limit")]
    TooLong(usize),
    #[error("PROXY header too short for its address family")]
    Truncated,
}

/// Checks the fixed 16 bytes and returns how many bytes follow them.
pub fn rest_len(fixed: &[u8; FIXED_LEN]) -> Result<usize, ProxyError> {
    if fixed[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    let version = fixed[12] >> 4;
    if version != 2 {
        return Err(ProxyError::Version(version));
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_REST_LEN {
        return Err(ProxyError::TooLong(len));
    }
    Ok(len)
}

/// Parses a whole header: the fixed 16 bytes and the `rest` that [`rest_len`] announced.
pub fn parse(fixed: &[u8; FIXED_LEN], rest: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let len = rest_len(fixed)?;
    if rest.len() != len {
        return Err(ProxyError::Truncated);
    }
    match fixed[12] & 0x0F {
        0x0 => return Ok(ProxyHeader::Local),
        0x1 => {}
        other => return Err(ProxyError::Command(other)),
    }
    let port = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
    match fixed[13] {
        // TCP over IPv4.
        0x11 => {
            if rest.len() < 12 {
                return Err(ProxyError::Truncated);
            }
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    rest[at],
                    rest[at + 1],
                    rest[at + 2],
                    rest[at + 3],
                ))
            };
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            })
        }
        // TCP over IPv6.
        0x21 => {
            if rest.len() < 36 {
                return Err(ProxyError::Truncated);
            }
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&rest[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            })
        }
        // UNSPEC, UDP, UNIX sockets: no TCP/IP client address to take.
        _ => Ok(ProxyHeader::Local),
    }
}

/// A version 2 `PROXY` header for a TCP connection from `source` to `destination` (both of one
/// family): what a balancer sends. For tests and tools.
pub fn encode(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(bytes: &[u8]) -> ([u8; FIXED_LEN], &[u8]) {
        let mut fixed = [0u8; FIXED_LEN];
        fixed.copy_from_slice(&bytes[..FIXED_LEN]);
        (fixed, &bytes[FIXED_LEN..])
    }

    #[test]
    fn an_ipv4_header_gives_the_client_address() {
        let src: SocketAddr = "203.0.113.7:40000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let dst: SocketAddr = "192.0.2.1:5070".parse().unwrap_or_else(|_| unreachable!());
        let bytes = encode(src, dst);
        let (fixed, rest) = split(&bytes);
        assert_eq!(rest_len(&fixed), Ok(12));
        assert_eq!(
            parse(&fixed, rest),
            Ok(ProxyHeader::Proxied {
                source: src,
                destination: dst
            })
        );
    }

    #[test]
    fn an_ipv6_header_gives_the_client_address() {
        let src: SocketAddr = "[2001:db8::7]:40000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let dst: SocketAddr = "[2001:db8::1]:5070"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let bytes = encode(src, dst);
        let (fixed, rest) = split(&bytes);
        assert_eq!(
            parse(&fixed, rest),
            Ok(ProxyHeader::Proxied {
                source: src,
                destination: dst
            })
        );
    }

    #[test]
    fn local_and_other_families_keep_the_connections_own_address() {
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let (fixed, rest) = split(&bytes);
        assert_eq!(parse(&fixed, rest), Ok(ProxyHeader::Local));
        let mut unix = SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 4, 1, 2, 3, 4]);
        let (fixed, rest) = split(&unix);
        assert_eq!(parse(&fixed, rest), Ok(ProxyHeader::Local));
    }

    #[test]
    fn tlvs_after_the_addresses_are_skipped() {
        let src: SocketAddr = "203.0.113.7:1".parse().unwrap_or_else(|_| unreachable!());
        let mut bytes = encode(src, src);
        bytes[15] += 4;
        bytes.extend_from_slice(&[0x04, 0x00, 0x01, 0xAA]);
        let (fixed, rest) = split(&bytes);
        assert!(matches!(
            parse(&fixed, rest),
            Ok(ProxyHeader::Proxied { .. })
        ));
    }

    #[test]
    fn bad_headers_are_refused_with_their_reason() {
        let good = encode(
            "203.0.113.7:1".parse().unwrap_or_else(|_| unreachable!()),
            "192.0.2.1:2".parse().unwrap_or_else(|_| unreachable!()),
        );
        let (mut fixed, _) = split(&good);
        fixed[0] = b'G';
        assert_eq!(rest_len(&fixed), Err(ProxyError::Signature));
        let (mut fixed, _) = split(&good);
        fixed[12] = 0x11;
        assert_eq!(rest_len(&fixed), Err(ProxyError::Version(1)));
        let (mut fixed, rest) = split(&good);
        fixed[12] = 0x2F;
        assert_eq!(parse(&fixed, rest), Err(ProxyError::Command(0xF)));
        let (mut fixed, _) = split(&good);
        fixed[14] = 0xFF;
        assert_eq!(rest_len(&fixed), Err(ProxyError::TooLong(0xFF0C)));
        // A length that lies: shorter than IPv4's addresses.
        let (mut fixed, rest) = split(&good);
        fixed[15] = 4;
        assert_eq!(parse(&fixed, &rest[..4]), Err(ProxyError::Truncated));
        // Fewer bytes than announced.
        let (fixed, rest) = split(&good);
        assert_eq!(parse(&fixed, &rest[..11]), Err(ProxyError::Truncated));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes: no panic, a bounded length, and only a rest of the announced length parses.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some((head, rest)) = data.split_first_chunk::<FIXED_LEN>() {
                match rest_len(head) {
                    Ok(len) => {
                        prop_assert!(len <= MAX_REST_LEN);
                        if rest.len() != len {
                            prop_assert!(parse(head, rest).is_err());
                        }
                    }
                    Err(_) => prop_assert!(parse(head, rest).is_err()),
                }
            }
        }

        /// Every address pair a balancer could send comes back as sent.
        #[test]
        fn encoded_addresses_round_trip(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), p in any::<u16>(), q in any::<u16>()) {
            let source = SocketAddr::new(IpAddr::from(a), p);
            let destination = SocketAddr::new(IpAddr::from(b), q);
            let bytes = encode(source, destination);
            let (head, rest) = bytes.split_first_chunk::<FIXED_LEN>().expect("16 bytes");
            prop_assert_eq!(parse(head, rest), Ok(ProxyHeader::Proxied { source, destination }));
        }
    }
}
