//! The receiving node's rules that keep one sender's envelopes in order while they move
//! between NATS and a direct link (pure: the inbox feeds them what arrives and delivers what
//! they answer; see `mod.rs` for the whole design).
//!
//! A sender that switches node B's envelopes from NATS to link `L` first publishes
//! [`Marker::Open`] for `L` on B's NATS inbox, then writes to `L`; when `L` fails it publishes
//! [`Marker::Closed`] for `L` on NATS, then goes on over NATS. NATS keeps one publisher's order,
//! so on B's NATS inbox everything sent before the switch comes before the `Open` marker. The
//! rules:
//!
//! 1. A NATS payload that is not a marker is delivered at once (a tagged one, rule 8, without
//!    its tag).
//! 2. A link's payload is delivered at once once its `Open` has been read on NATS.
//! 3. Before that it is held; the `Open` delivers what is held, in order.
//! 4. After its `Closed` has been read on NATS, whatever the link still delivers is dropped:
//!    the sender has gone back to NATS, and a late envelope would overtake later ones. (Loss
//!    between nodes is allowed and answered; reordering is not.)
//! 5. What is held for a link is bounded: past the bound it is dropped and the link must be
//!    closed, so that its sender goes back to NATS.
//! 6. A run of a node declared dead is forgotten (its later runs are not).
//! 7. An `Open` for a link already closed (or refused for holding too much) opens nothing.
//! 8. A NATS envelope tagged as sent by run `R` of node `A` ([`sender_tag`]) closes the link of
//!    `(A, R)` open here, as that link's `Closed` read at this point would (rule 4), then is
//!    delivered without its tag. Why: core NATS may lose a `Closed` (a slow-consumer drop),
//!    and the sender, back on NATS, sends the envelope after it stopped using the link; if
//!    the link stayed open, its last payloads, read late, would be delivered after it. A
//!    sender tags its NATS envelopes for a node only once it has opened a link to that node's
//!    run (`mod.rs`), so a node without links, or a build that does not read tags, never gets
//!    one, and an untagged envelope is read by rule 1.
//! 9. An `Open` read while another link of the same run is open closes that one first, as its
//!    `Closed` would: a sender opens a link only after its last one is over, so that `Closed`
//!    was lost.
//!
//! Everything is kept per sending run (node and epoch): a restarted node's new links never
//! meet its old run's state.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// What every marker starts with: 0xc1 is never used by MessagePack, so a marker can never be
/// read as an envelope, nor an envelope as a marker.
const MARKER_TAG: u8 = 0xc1;
const OPEN: u8 = b'O';
const CLOSED: u8 = b'C';
/// The kind of a sender tag: the envelope after it was sent over NATS by the run it names.
const SENDER: u8 = b'S';
/// A sender tag's length before its node id: the marker byte, the kind, the run, the id's
/// length.
const TAG_FIXED: usize = 12;

/// A sender's switch between NATS and one of its links, published on the receiver's NATS inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// From here, run `run` of `from` sends its envelopes for this node over link `link`.
    Open { from: String, run: u64, link: u64 },
    /// From here, run `run` of `from` sends over NATS again; link `link` is over.
    Closed { from: String, run: u64, link: u64 },
}

impl Marker {
    /// `[0xc1, kind, link (8 bytes, big-endian), run (8 bytes, big-endian), from (UTF-8)]`.
    pub fn encode(&self) -> Bytes {
        let (kind, from, run, link) = match self {
            Marker::Open { from, run, link } => (OPEN, from, run, link),
            Marker::Closed { from, run, link } => (CLOSED, from, run, link),
        };
        let mut out = Vec::with_capacity(18 + from.len());
        out.push(MARKER_TAG);
        out.push(kind);
        out.extend_from_slice(&link.to_be_bytes());
        out.extend_from_slice(&run.to_be_bytes());
        out.extend_from_slice(from.as_bytes());
        Bytes::from(out)
    }

    /// None when `payload` is not a marker (an envelope); a payload that starts like a marker
    /// but is malformed is not one either, and the envelope reader drops it.
    pub fn decode(payload: &[u8]) -> Option<Marker> {
        let (&tag, rest) = payload.split_first()?;
        if tag != MARKER_TAG {
            return None;
        }
        let (&kind, rest) = rest.split_first()?;
        let (link, rest) = rest.split_at_checked(8)?;
        let (run, from) = rest.split_at_checked(8)?;
        let link = u64::from_be_bytes(link.try_into().ok()?);
        let run = u64::from_be_bytes(run.try_into().ok()?);
        let from = std::str::from_utf8(from).ok()?.to_owned();
        match kind {
            OPEN => Some(Marker::Open { from, run, link }),
            CLOSED => Some(Marker::Closed { from, run, link }),
            _ => None,
        }
    }
}

/// The tag run `run` of `from` puts before each envelope it sends over NATS to a node that may
/// hold one of its links open (rule 8): `[0xc1, 'S', run (8 bytes, big-endian), the id's length
/// (2 bytes, big-endian), from (UTF-8)]`, the envelope's bytes right after it. None for an id
/// longer than 65,535 bytes (NATS takes no such subject anyway).
pub fn sender_tag(from: &str, run: u64) -> Option<Bytes> {
    let len = u16::try_from(from.len()).ok()?;
    let mut out = Vec::with_capacity(TAG_FIXED + from.len());
    out.push(MARKER_TAG);
    out.push(SENDER);
    out.extend_from_slice(&run.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(from.as_bytes());
    Some(Bytes::from(out))
}

/// `envelope` with `tag` (a [`sender_tag`]) before it: the one copy a tagged envelope costs.
pub fn tagged(tag: &[u8], envelope: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(tag.len() + envelope.len());
    out.extend_from_slice(tag);
    out.extend_from_slice(envelope);
    Bytes::from(out)
}

/// A tagged payload's sender (node, run) and where its envelope starts; None when `payload`
/// is not tagged (an envelope, a marker, or a malformed tag, which the envelope reader drops).
pub fn untag(payload: &[u8]) -> Option<((&str, u64), usize)> {
    let (head, rest) = payload.split_at_checked(TAG_FIXED)?;
    if head[0] != MARKER_TAG || head[1] != SENDER {
        return None;
    }
    let run = u64::from_be_bytes(head[2..10].try_into().ok()?);
    let len = usize::from(u16::from_be_bytes(head[10..12].try_into().ok()?));
    let from = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some(((from, run), TAG_FIXED + len))
}

/// What happened to a link's payload.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkVerdict {
    Delivered,
    Held,
    /// Its link was closed already (rule 4).
    Dropped,
    /// Over the bound, or held too long (rule 5): what was held is dropped; the caller closes
    /// the link.
    Overflow,
}

/// Links whose `Closed` was read, kept per sender so late payloads are recognised.
const CLOSED_KEPT: usize = 8;

/// The bounds on what is held for one link before its `Open` (rule 5): an `Open` lost on the
/// way (core NATS delivers at most once) must not hold a link's envelopes for ever.
#[derive(Debug, Clone, Copy)]
pub struct HoldLimit {
    pub payloads: usize,
    pub bytes: usize,
    pub time: Duration,
}

#[derive(Default)]
struct Sender {
    open: Option<u64>,
    held: HashMap<u64, Held>,
    closed: VecDeque<u64>,
}

struct Held {
    payloads: VecDeque<Bytes>,
    bytes: usize,
    /// When the first was held.
    since: Instant,
}

/// The receiving side's state: per sending run (node, then epoch), its open link, what is
/// held, and the links closed lately. By node first, so that a link's payload or a tagged
/// envelope finds its sender by the `&str` it carries, without allocating a key.
pub struct InboxOrder {
    senders: HashMap<String, HashMap<u64, Sender>>,
    limit: HoldLimit,
}

impl InboxOrder {
    pub fn new(limit: HoldLimit) -> Self {
        InboxOrder {
            senders: HashMap::new(),
            limit,
        }
    }

    /// A payload read on NATS: an envelope is delivered into `out` (rule 1), a tagged one
    /// closing its sender's open link first (rule 8); a marker is applied (rules 3, 4, 7 and
    /// 9), an `Open` delivering what its link had held.
    pub fn nats(&mut self, payload: Bytes, out: &mut VecDeque<Bytes>) {
        if let Some(((from, run), start)) = untag(&payload) {
            if let Some(sender) = self.senders.get_mut(from).and_then(|r| r.get_mut(&run))
                && let Some(link) = sender.open
            {
                sender.closed(link);
            }
            // A slice of the same buffer: the tag costs no copy here.
            out.push_back(payload.slice(start..));
            return;
        }
        let Some(marker) = Marker::decode(&payload) else {
            out.push_back(payload);
            return;
        };
        match marker {
            Marker::Open { from, run, link } => {
                let sender = self
                    .senders
                    .entry(from)
                    .or_default()
                    .entry(run)
                    .or_default();
                // Rule 9 first: even an `Open` that opens nothing (rule 7) was sent after the
                // link open before it was over.
                if let Some(before) = sender.open
                    && before != link
                {
                    sender.closed(before);
                }
                if sender.closed.contains(&link) {
                    return;
                }
                sender.open = Some(link);
                if let Some(held) = sender.held.remove(&link) {
                    out.extend(held.payloads);
                }
            }
            Marker::Closed { from, run, link } => {
                self.senders
                    .entry(from)
                    .or_default()
                    .entry(run)
                    .or_default()
                    .closed(link);
            }
        }
    }

    /// A payload read on link `link` of `from`'s run `run`, at `now` (rules 2 to 5).
    pub fn link(
        &mut self,
        (from, run): (&str, u64),
        link: u64,
        payload: Bytes,
        now: Instant,
        out: &mut VecDeque<Bytes>,
    ) -> LinkVerdict {
        // Looked up by `&str` first: a node's id is copied only for its first payload.
        if !self.senders.contains_key(from) {
            self.senders.insert(from.to_owned(), HashMap::new());
        }
        let Some(runs) = self.senders.get_mut(from) else {
            // Inserted just above: never here.
            return LinkVerdict::Dropped;
        };
        let sender = runs.entry(run).or_default();
        if sender.open == Some(link) {
            out.push_back(payload);
            return LinkVerdict::Delivered;
        }
        if sender.closed.contains(&link) {
            return LinkVerdict::Dropped;
        }
        let held = sender.held.entry(link).or_insert_with(|| Held {
            payloads: VecDeque::new(),
            bytes: 0,
            since: now,
        });
        if held.payloads.len() >= self.limit.payloads
            || held.bytes + payload.len() > self.limit.bytes
            || now.duration_since(held.since) > self.limit.time
        {
            sender.held.remove(&link);
            sender.close(link);
            return LinkVerdict::Overflow;
        }
        held.bytes += payload.len();
        held.payloads.push_back(payload);
        LinkVerdict::Held
    }

    /// Runs of `from` up to `run` were declared dead (rule 6): their state goes.
    pub fn forget(&mut self, from: &str, run: u64) {
        if let Some(runs) = self.senders.get_mut(from) {
            runs.retain(|r, _| *r > run);
            if runs.is_empty() {
                self.senders.remove(from);
            }
        }
    }

    /// Payloads held now, all links together.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.senders
            .values()
            .flat_map(|runs| runs.values())
            .flat_map(|s| s.held.values())
            .map(|h| h.payloads.len())
            .sum()
    }
}

impl Sender {
    /// Link `link` is over, as its `Closed` says (rule 4): not open any more, what it held
    /// dropped, and what it still delivers dropped too.
    fn closed(&mut self, link: u64) {
        if self.open == Some(link) {
            self.open = None;
        }
        self.held.remove(&link);
        self.close(link);
    }

    /// Notes `link` closed, keeping the last [`CLOSED_KEPT`].
    fn close(&mut self, link: u64) {
        if !self.closed.contains(&link) {
            if self.closed.len() == CLOSED_KEPT {
                self.closed.pop_front();
            }
            self.closed.push_back(link);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: HoldLimit = HoldLimit {
        payloads: 4,
        bytes: 1024,
        time: Duration::from_secs(1),
    };
    const A: (&str, u64) = ("a", 10);

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn open(link: u64) -> Bytes {
        Marker::Open {
            from: "a".into(),
            run: 10,
            link,
        }
        .encode()
    }

    fn closed(link: u64) -> Bytes {
        Marker::Closed {
            from: "a".into(),
            run: 10,
            link,
        }
        .encode()
    }

    fn drain(out: &mut VecDeque<Bytes>) -> Vec<Bytes> {
        out.drain(..).collect()
    }

    #[test]
    fn markers_read_back_and_never_pass_for_envelopes() {
        for m in [
            Marker::Open {
                from: "node-a".into(),
                run: 1_765_000_000_000,
                link: 7,
            },
            Marker::Closed {
                from: "b".into(),
                run: 1,
                link: u64::MAX,
            },
        ] {
            assert_eq!(Marker::decode(&m.encode()), Some(m));
        }
        // Every envelope is a MessagePack map (0x8_ or 0xde/0xdf): never 0xc1.
        assert_eq!(Marker::decode(b"\x81\xa5Batch"), None);
        assert_eq!(Marker::decode(b"\xc1O\x00"), None, "too short");
        let mut unknown = open(1).to_vec();
        unknown[1] = b'X';
        assert_eq!(Marker::decode(&unknown), None, "an unknown kind");
        assert_eq!(Marker::decode(b""), None);
    }

    #[test]
    fn rule_1_a_nats_envelope_is_delivered_at_once() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        o.nats(b("e1"), &mut out);
        assert_eq!(drain(&mut out), vec![b("e1")]);
    }

    #[test]
    fn rule_2_a_link_payload_after_its_open_is_delivered_at_once() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        o.nats(open(1), &mut out);
        assert!(out.is_empty(), "a marker is not delivered");
        let now = Instant::now();
        assert_eq!(o.link(A, 1, b("l1"), now, &mut out), LinkVerdict::Delivered);
        assert_eq!(drain(&mut out), vec![b("l1")]);
    }

    #[test]
    fn rule_3_a_link_payload_before_its_open_waits_for_it_and_keeps_its_place() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        assert_eq!(o.link(A, 1, b("l1"), now, &mut out), LinkVerdict::Held);
        assert_eq!(o.link(A, 1, b("l2"), now, &mut out), LinkVerdict::Held);
        // Sent over NATS before the switch, read after the link's first payloads.
        o.nats(b("n1"), &mut out);
        o.nats(open(1), &mut out);
        assert_eq!(o.link(A, 1, b("l3"), now, &mut out), LinkVerdict::Delivered);
        assert_eq!(drain(&mut out), vec![b("n1"), b("l1"), b("l2"), b("l3")]);
        assert_eq!(o.held(), 0);
    }

    #[test]
    fn rule_4_a_link_payload_after_its_closed_is_dropped() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        o.nats(open(1), &mut out);
        o.nats(closed(1), &mut out);
        o.nats(b("n2"), &mut out);
        assert_eq!(o.link(A, 1, b("late"), now, &mut out), LinkVerdict::Dropped);
        assert_eq!(drain(&mut out), vec![b("n2")]);
        // Held ones go with the close too (their `Open` was lost).
        assert_eq!(o.link(A, 2, b("x"), now, &mut out), LinkVerdict::Held);
        o.nats(closed(2), &mut out);
        assert_eq!(o.held(), 0);
        assert!(out.is_empty());
        // The next link is a link of its own.
        o.nats(open(3), &mut out);
        assert_eq!(o.link(A, 3, b("l"), now, &mut out), LinkVerdict::Delivered);
    }

    #[test]
    fn rule_5_what_is_held_is_bounded_in_number_bytes_and_time() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        for _ in 0..LIMIT.payloads {
            assert_eq!(o.link(A, 1, b("x"), now, &mut out), LinkVerdict::Held);
        }
        assert_eq!(o.link(A, 1, b("x"), now, &mut out), LinkVerdict::Overflow);
        assert_eq!(o.held(), 0);
        assert_eq!(o.link(A, 1, b("x"), now, &mut out), LinkVerdict::Dropped);
        // By bytes.
        let big = Bytes::from(vec![0u8; 600]);
        assert_eq!(o.link(A, 2, big.clone(), now, &mut out), LinkVerdict::Held);
        assert_eq!(o.link(A, 2, big, now, &mut out), LinkVerdict::Overflow);
        // By time: an `Open` lost on the way holds nothing for ever.
        assert_eq!(o.link(A, 3, b("x"), now, &mut out), LinkVerdict::Held);
        let later = now + LIMIT.time + Duration::from_millis(1);
        assert_eq!(o.link(A, 3, b("x"), later, &mut out), LinkVerdict::Overflow);
        assert!(out.is_empty());
    }

    #[test]
    fn rule_6_only_the_dead_runs_of_a_sender_are_forgotten() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        o.nats(open(1), &mut out);
        // Run 11 of the same node, restarted, dialed before its run 10 was declared dead.
        o.nats(
            Marker::Open {
                from: "a".into(),
                run: 11,
                link: 5,
            }
            .encode(),
            &mut out,
        );
        assert_eq!(
            o.link(("b", 1), 9, b("x"), now, &mut out),
            LinkVerdict::Held
        );
        o.forget("a", 10);
        assert_eq!(
            o.link(A, 1, b("x"), now, &mut out),
            LinkVerdict::Held,
            "forgotten"
        );
        assert_eq!(
            o.link(("a", 11), 5, b("y"), now, &mut out),
            LinkVerdict::Delivered,
            "the later run keeps its link"
        );
        o.forget("b", 1);
        assert_eq!(
            o.held(),
            1,
            "a's run 10 holds again what came after it was forgotten"
        );
    }

    #[test]
    fn rule_7_an_open_after_the_close_opens_nothing() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        for _ in 0..=LIMIT.payloads {
            o.link(A, 1, b("x"), now, &mut out);
        }
        // Refused for holding too much; its `Open` comes late.
        o.nats(open(1), &mut out);
        assert!(out.is_empty());
        assert_eq!(o.link(A, 1, b("y"), now, &mut out), LinkVerdict::Dropped);
    }

    /// `envelope` as run `run` of "a" sends it over NATS to a node it may hold a link open to.
    fn from_a(run: u64, envelope: &str) -> Bytes {
        let tag = sender_tag("a", run).expect("a short id");
        tagged(&tag, envelope.as_bytes())
    }

    #[test]
    fn sender_tags_read_back_and_never_pass_for_envelopes_or_markers() {
        let payload = from_a(10, "an envelope");
        assert_eq!(untag(&payload), Some((("a", 10), 13)));
        assert_eq!(&payload[13..], b"an envelope");
        assert_eq!(Marker::decode(&payload), None, "not a marker");
        assert_eq!(untag(&open(1)), None, "a marker is not tagged");
        assert_eq!(untag(b"\x81\xa5Batch"), None);
        assert_eq!(untag(&payload[..12]), None, "its id cut off");
        let mut not_utf8 = payload.to_vec();
        not_utf8[12] = 0xff;
        assert_eq!(untag(&not_utf8), None);
        assert_eq!(sender_tag(&"x".repeat(70_000), 1), None, "an id too long");
    }

    #[test]
    fn rule_8_a_tagged_nats_envelope_closes_its_senders_open_link() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        o.nats(open(1), &mut out);
        assert_eq!(o.link(A, 1, b("l1"), now, &mut out), LinkVerdict::Delivered);
        // `Closed(1)` lost on the way; the sender is back on NATS.
        o.nats(from_a(10, "n1"), &mut out);
        assert_eq!(o.link(A, 1, b("late"), now, &mut out), LinkVerdict::Dropped);
        o.nats(from_a(10, "n2"), &mut out);
        assert_eq!(drain(&mut out), vec![b("l1"), b("n1"), b("n2")]);
        // Other runs' envelopes close nothing of run 10's, and leave no state behind.
        o.nats(open(2), &mut out);
        o.nats(from_a(11, "m"), &mut out);
        o.nats(from_a(12, "m"), &mut out);
        assert_eq!(o.link(A, 2, b("l2"), now, &mut out), LinkVerdict::Delivered);
        // What is held for a link whose `Open` is still on its way stays held: the envelope
        // was sent before that `Open`.
        o.nats(from_a(10, "n3"), &mut out);
        assert_eq!(o.link(A, 3, b("h"), now, &mut out), LinkVerdict::Held);
        o.nats(from_a(10, "n4"), &mut out);
        o.nats(open(3), &mut out);
        assert_eq!(
            drain(&mut out),
            vec![b("m"), b("m"), b("l2"), b("n3"), b("n4"), b("h")]
        );
        assert_eq!(
            o.senders.get("a").map(HashMap::len),
            Some(1),
            "run 10 only: runs 11 and 12 only sent tagged envelopes"
        );
    }

    #[test]
    fn rule_9_an_open_closes_the_link_of_the_same_run_left_open() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        o.nats(open(1), &mut out);
        assert_eq!(o.link(A, 1, b("l1"), now, &mut out), LinkVerdict::Delivered);
        // `Closed(1)` lost; the sender's next link opens.
        o.nats(open(2), &mut out);
        assert_eq!(o.link(A, 2, b("l2"), now, &mut out), LinkVerdict::Delivered);
        assert_eq!(o.link(A, 1, b("late"), now, &mut out), LinkVerdict::Dropped);
        assert_eq!(drain(&mut out), vec![b("l1"), b("l2")]);
        // The same `Open` again (NATS does not repeat, but nothing breaks) keeps its link.
        o.nats(open(2), &mut out);
        assert_eq!(o.link(A, 2, b("l3"), now, &mut out), LinkVerdict::Delivered);
        // An `Open` that opens nothing (its link refused for holding too much, rule 7) still
        // closes the link left open.
        for _ in 0..=LIMIT.payloads {
            o.link(A, 3, b("x"), now, &mut out);
        }
        o.nats(open(3), &mut out);
        assert_eq!(o.link(A, 2, b("late"), now, &mut out), LinkVerdict::Dropped);
        assert_eq!(o.link(A, 3, b("y"), now, &mut out), LinkVerdict::Dropped);
        assert_eq!(drain(&mut out), vec![b("l3")]);
    }

    #[test]
    fn senders_are_kept_apart() {
        let mut o = InboxOrder::new(LIMIT);
        let mut out = VecDeque::new();
        let now = Instant::now();
        o.nats(open(1), &mut out);
        assert_eq!(
            o.link(("c", 10), 1, b("c1"), now, &mut out),
            LinkVerdict::Held
        );
        assert_eq!(o.link(A, 1, b("a1"), now, &mut out), LinkVerdict::Delivered);
        assert_eq!(drain(&mut out), vec![b("a1")]);
    }
}
