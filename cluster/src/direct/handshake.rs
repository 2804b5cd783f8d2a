//! How two nodes open a direct link: each proves it holds the cluster's link secret, without
//! sending it, by a challenge answered with an HMAC-SHA256 over both sides' fresh nonces and the
//! link's identity (which node dials which, in which runs, which link). A recorded handshake
//! cannot be replayed (the other side's nonce is new each time), nor a proof moved to another
//! link or role. The dialer proves first: the acceptor, which anyone may reach, says nothing
//! that would let a stranger test guesses of the secret offline (the dialer dials only
//! addresses it heard in heartbeats over NATS).
//!
//! Frames are length-prefixed (`LengthDelimitedCodec`, a 4-byte big-endian length, at most
//! 4 KiB until the end of the handshake); the handshake's are MessagePack maps:
//!
//! 1. dialer → acceptor: [`Hello`];
//! 2. acceptor → dialer: [`Reply::Challenge`], or [`Reply::Refused`] (a wrong version, node or
//!    run, or a run declared dead);
//! 3. dialer → acceptor: [`Proof`];
//! 4. acceptor → dialer: [`Reply::Welcome`] with its own proof, or [`Reply::Refused`]. From
//!    here only the dialer sends: one envelope payload per frame.

use ring::hmac;
use serde::{Deserialize, Serialize};

/// The version of the link's frames; a node refuses another. 2: the acceptor reads sender
/// tags on its NATS inbox (`order.rs`, rule 8), and a dialer tags envelopes only for a run that
/// took a link from it, so a node of version 1, which would read a tagged envelope as garbage,
/// never gets one.
pub const VERSION: u32 = 2;

/// Step 1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub from: String,
    pub from_epoch: u64,
    /// The node and run the dialer means to reach (from its heartbeat): an address may have
    /// changed hands, and a run may have ended.
    pub to: String,
    pub to_epoch: u64,
    pub link: u64,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
}

/// Steps 2 and 4.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    Challenge {
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
    },
    Welcome {
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

/// What a proof signs: the role, the hello's facts and both nonces, each variable part with
/// its length so that no two different sets of facts read the same.
fn signed(role: Role, hello: &Hello, acceptor_nonce: &[u8]) -> Vec<u8> {
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
    m.extend_from_slice(&hello.to_epoch.to_be_bytes());
    m.extend_from_slice(&hello.link.to_be_bytes());
    m
}

/// The proof `role` gives for this handshake.
pub fn prove(key: &hmac::Key, role: Role, hello: &Hello, acceptor_nonce: &[u8]) -> Vec<u8> {
    hmac::sign(key, &signed(role, hello, acceptor_nonce))
        .as_ref()
        .to_vec()
}

/// Whether `proof` is `role`'s proof for this handshake (compared in constant time).
pub fn verify(
    key: &hmac::Key,
    role: Role,
    hello: &Hello,
    acceptor_nonce: &[u8],
    proof: &[u8],
) -> bool {
    hello.nonce.len() == NONCE_LEN
        && acceptor_nonce.len() == NONCE_LEN
        && hmac::verify(key, &signed(role, hello, acceptor_nonce), proof).is_ok()
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
            to_epoch: 20,
            link: 3,
            nonce: nonce(),
        }
    }

    #[test]
    fn a_proof_holds_only_for_its_own_secret_role_and_facts() {
        let k = key("a shared secret of the cluster");
        let h = hello();
        let an = nonce();
        let p = prove(&k, Role::Acceptor, &h, &an);
        assert!(verify(&k, Role::Acceptor, &h, &an, &p));
        assert!(!verify(&k, Role::Dialer, &h, &an, &p), "the other role");
        assert!(
            !verify(&key("another secret"), Role::Acceptor, &h, &an, &p),
            "another secret"
        );
        let other_run = Hello {
            to_epoch: 21,
            ..h.clone()
        };
        assert!(
            !verify(&k, Role::Acceptor, &other_run, &an, &p),
            "another run"
        );
        assert!(!verify(&k, Role::Acceptor, &h, &nonce(), &p), "a replay");
        let other_link = Hello {
            link: 4,
            ..h.clone()
        };
        assert!(!verify(&k, Role::Acceptor, &other_link, &an, &p));
        let other_node = Hello {
            to: "c".into(),
            ..h.clone()
        };
        assert!(!verify(&k, Role::Acceptor, &other_node, &an, &p));
        let short = Hello {
            nonce: vec![0; 4],
            ..h
        };
        let p = prove(&k, Role::Acceptor, &short, &an);
        assert!(
            !verify(&k, Role::Acceptor, &short, &an, &p),
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
        let p = prove(&k, Role::Dialer, &h, &an);
        assert!(!verify(&k, Role::Dialer, &shifted, &an, &p));
    }
}
