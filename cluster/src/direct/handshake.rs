//! How two nodes open a direct link: each proves it holds the cluster's link secret, without
//! sending it, by a challenge answered with an HMAC-SHA256 over both sides' fresh nonces and the
//! link's identity (which node dials which, in which runs, which link). A recorded handshake
//! cannot be replayed (the other side's nonce is new each time), nor a proof moved to another
//! link or role.
//!
//! Frames are length-prefixed (`LengthDelimitedCodec`, a 4-byte big-endian length); the
//! handshake's are MessagePack maps:
//!
//! 1. dialer → acceptor: [`Hello`];
//! 2. acceptor → dialer: [`Reply::Welcome`] with its proof, or [`Reply::Refused`];
//! 3. dialer → acceptor: [`Proof`];
//! 4. acceptor → dialer: [`Ready`]. From here only the dialer sends: one envelope payload per
//!    frame.

use ring::hmac;
use serde::{Deserialize, Serialize};

/// The version of the link's frames; a node refuses another.
pub const VERSION: u32 = 1;

/// Step 1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub from: String,
    pub from_epoch: u64,
    /// The node the dialer means to reach (an address may have changed hands).
    pub to: String,
    pub link: u64,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
}

/// Step 2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    Welcome {
        node: String,
        epoch: u64,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    Refused {
        why: String,
    },
}

/// Step 3.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proof {
    #[serde(with = "serde_bytes")]
    pub proof: Vec<u8>,
}

/// Step 4.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub ready: bool,
}

/// Bytes of each side's nonce.
pub const NONCE_LEN: usize = 32;

/// Which side a proof is for: the two are computed over the same facts, so each must be
/// bound to its role or one side could answer with the other's.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Acceptor,
    Dialer,
}

/// The key every node of a cluster derives from `cluster.link_secret`.
pub fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

/// A fresh nonce.
pub fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; NONCE_LEN];
    rand::Rng::fill(&mut rand::thread_rng(), &mut n[..]);
    n
}

/// What a proof signs: the role, the hello's facts, the acceptor's run, and both nonces, each
/// with its length so that no two different sets of facts read the same.
fn signed(role: Role, hello: &Hello, acceptor_epoch: u64, acceptor_nonce: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(160);
    m.extend_from_slice(b"confab-link/1\0");
    m.push(match role {
        Role::Acceptor => b'A',
        Role::Dialer => b'D',
    });
    for part in [
        hello.from.as_bytes(),
        hello.to.as_bytes(),
        &hello.nonce,
        acceptor_nonce,
    ] {
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&hello.from_epoch.to_be_bytes());
    m.extend_from_slice(&acceptor_epoch.to_be_bytes());
    m.extend_from_slice(&hello.link.to_be_bytes());
    m
}

/// The proof `role` gives for this handshake.
pub fn prove(
    key: &hmac::Key,
    role: Role,
    hello: &Hello,
    acceptor_epoch: u64,
    acceptor_nonce: &[u8],
) -> Vec<u8> {
    hmac::sign(key, &signed(role, hello, acceptor_epoch, acceptor_nonce))
        .as_ref()
        .to_vec()
}

/// Whether `proof` is `role`'s proof for this handshake (compared in constant time).
pub fn verify(
    key: &hmac::Key,
    role: Role,
    hello: &Hello,
    acceptor_epoch: u64,
    acceptor_nonce: &[u8],
    proof: &[u8],
) -> bool {
    hello.nonce.len() == NONCE_LEN
        && acceptor_nonce.len() == NONCE_LEN
        && hmac::verify(
            key,
            &signed(role, hello, acceptor_epoch, acceptor_nonce),
            proof,
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            from: "a".into(),
            from_epoch: 10,
            to: "b".into(),
            link: 3,
            nonce: nonce(),
        }
    }

    #[test]
    fn a_proof_holds_only_for_its_own_secret_role_and_facts() {
        let k = key("a shared secret of the cluster");
        let h = hello();
        let an = nonce();
        let p = prove(&k, Role::Acceptor, &h, 20, &an);
        assert!(verify(&k, Role::Acceptor, &h, 20, &an, &p));
        assert!(!verify(&k, Role::Dialer, &h, 20, &an, &p), "the other role");
        assert!(
            !verify(&key("another secret"), Role::Acceptor, &h, 20, &an, &p),
            "another secret"
        );
        assert!(!verify(&k, Role::Acceptor, &h, 21, &an, &p), "another run");
        assert!(
            !verify(&k, Role::Acceptor, &h, 20, &nonce(), &p),
            "a replay"
        );
        let other_link = Hello {
            link: 4,
            ..h.clone()
        };
        assert!(!verify(&k, Role::Acceptor, &other_link, 20, &an, &p));
        let other_node = Hello {
            to: "c".into(),
            ..h.clone()
        };
        assert!(!verify(&k, Role::Acceptor, &other_node, 20, &an, &p));
        let short = Hello {
            nonce: vec![0; 4],
            ..h
        };
        let p = prove(&k, Role::Acceptor, &short, 20, &an);
        assert!(
            !verify(&k, Role::Acceptor, &short, 20, &an, &p),
            "a short nonce"
        );
    }

    #[test]
    fn fields_cannot_be_shifted_between_ids() {
        let k = key("s");
        let an = nonce();
        let h = Hello {
            from: "ab".into(),
            to: "c".into(),
            ..hello()
        };
        let shifted = Hello {
            from: "a".into(),
            to: "bc".into(),
            ..h.clone()
        };
        let p = prove(&k, Role::Dialer, &h, 1, &an);
        assert!(!verify(&k, Role::Dialer, &shifted, 1, &an, &p));
    }
}
