//! Identifier minting, and the hasher for maps keyed by those ids. Endpoint, call and
//! conversation ids are opaque strings that must be unique across the cluster and across
//! restarts of a node, so each carries the node id and a random per-process epoch before a
//! counter.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fast hasher (foldhash, seeded per process) for maps whose keys nodes mint: ids from an
/// [`IdGen`] of this node or of another node of the cluster (a trusted peer), and message
/// numbers. No client picks the keys that go into these maps (a client's ids are only looked
/// up), so SipHash's protection against chosen-key flooding buys nothing there, while it cost
/// a visible share of a forked call (about 28 look-ups and inserts per call). Maps keyed by
/// what clients send (user URIs) keep std's SipHash.
pub type FastState = foldhash::fast::RandomState;
/// A map keyed by node-minted ids (see [`FastState`]).
pub type IdMap<K, V> = HashMap<K, V, FastState>;
/// A set of node-minted ids (see [`FastState`]).
pub type IdSet<K> = HashSet<K, FastState>;

#[derive(Debug)]
pub struct IdGen {
    prefix: String,
    next: AtomicU64,
}

impl IdGen {
    pub fn new(node_id: &str) -> Self {
        let epoch: u32 = rand::random();
        IdGen {
            prefix: format!("{node_id}.{epoch:08x}."),
            next: AtomicU64::new(1),
        }
    }

    /// A fresh id; `kind` (`e`, `c`, `v`) only helps a human reading logs.
    pub fn mint(&self, kind: char) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Written by hand, not with `format!`: a forked call mints about ten ids, and the
        // formatting machinery cost ten times this per id. The text is `format!`'s
        // `{prefix}{kind}{n:x}` exactly (a test checks).
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
        let mut id = String::with_capacity(self.prefix.len() + kind.len_utf8() + digits as usize);
        id.push_str(&self.prefix);
        id.push(kind);
        for shift in (0..digits).rev() {
            let nibble = ((n >> (shift * 4)) & 0xf) as u8;
            id.push(char::from(b"0123456789abcdef"[nibble as usize]));
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_carry_the_node() {
        let a = IdGen::new("n1");
        let b = IdGen::new("n1");
        let x = a.mint('c');
        assert!(x.starts_with("n1."));
        assert_ne!(x, a.mint('c'));
        assert_ne!(x, b.mint('c'), "a restarted node gets a new epoch");
    }

    #[test]
    fn the_counter_is_written_in_lower_case_hex_without_padding() {
        let g = IdGen::new("n1");
        for n in [0u64, 1, 9, 10, 15, 16, 255, 256, 0xdead_beef, u64::MAX] {
            g.next.store(n, Ordering::Relaxed);
            assert_eq!(g.mint('v'), format!("{}v{n:x}", g.prefix));
        }
    }
}
