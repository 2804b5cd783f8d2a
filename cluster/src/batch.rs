//! Natural batching of envelopes per destination node (issue #23): when the publisher wakes it
//! takes everything already queued, and the envelopes for one node that understands batches
//! go as one NATS message (`Envelope::Batch`), in the order they were queued. Nothing waits
//! for a batch to fill: a lone envelope goes alone, at once, so latency does not grow; under
//! load each NATS message carries many envelopes, and the cost per message (NATS's, the
//! client's and the receiver's dispatch) is shared. Order between two nodes is what the
//! contract relies on (events of a call, resends): a batch keeps it, since it holds one node's
//! envelopes in queue order and goes out where the first of them was queued.

use bytes::Bytes;

/// Most bytes of envelopes in one batch (far below NATS's default 1 MB payload limit).
pub(crate) const MAX_BATCH_BYTES: usize = 256 * 1024;

/// One message to publish: its subject and payload, and the size of each bounded envelope in
/// it (each holds its own place in the quota, given back once it is handed to NATS).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ToPublish {
    pub subject: String,
    pub payload: Payload,
    pub bounded: Vec<usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Payload {
    One(Bytes),
    /// Envelopes for one node, in order, to go as one `Envelope::Batch`.
    Many(Vec<Bytes>),
}

/// Groups `queued` (subject, payload, bounded) in order: the envelopes for a subject that
/// `batches(subject)` accepts are gathered into the message of that subject's first envelope,
/// up to [`MAX_BATCH_BYTES`]; anything else goes alone, in its place.
pub(crate) fn group(
    queued: Vec<(String, Bytes, bool)>,
    batches: impl Fn(&str) -> bool,
) -> Vec<ToPublish> {
    let mut out: Vec<ToPublish> = Vec::with_capacity(queued.len());
    // The open batch of each subject: its index in `out` and its size so far.
    let mut open: Vec<(String, usize, usize)> = Vec::new();
    for (subject, payload, bounded) in queued {
        let len = payload.len();
        let bounded: Vec<usize> = if bounded { vec![len] } else { Vec::new() };
        if !batches(&subject) {
            out.push(ToPublish {
                subject,
                payload: Payload::One(payload),
                bounded,
            });
            continue;
        }
        if let Some((_, at, size)) = open
            .iter_mut()
            .find(|(s, _, size)| *s == subject && *size + len <= MAX_BATCH_BYTES)
        {
            let batch = &mut out[*at];
            *size += len;
            batch.bounded.extend(bounded);
            match &mut batch.payload {
                Payload::Many(list) => list.push(payload),
                Payload::One(first) => {
                    let first = std::mem::take(first);
                    batch.payload = Payload::Many(vec![first, payload]);
                }
            }
            continue;
        }
        // A subject whose batch is full starts another, later in the order: everything before
        // it stays before it.
        open.retain(|(s, _, _)| *s != subject);
        open.push((subject.clone(), out.len(), len));
        out.push(ToPublish {
            subject,
            payload: Payload::One(payload),
            bounded,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(subject: &str, body: &'static [u8]) -> (String, Bytes, bool) {
        (subject.to_owned(), Bytes::from_static(body), false)
    }

    fn bodies(p: &ToPublish) -> Vec<&[u8]> {
        match &p.payload {
            Payload::One(b) => vec![&b[..]],
            Payload::Many(list) => list.iter().map(|b| &b[..]).collect(),
        }
    }

    #[test]
    fn a_lone_envelope_goes_alone() {
        let out = group(vec![q("a", b"1")], |_| true);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload, Payload::One(Bytes::from_static(b"1")));
    }

    #[test]
    fn one_nodes_envelopes_go_together_in_queue_order() {
        let out = group(
            vec![q("a", b"1"), q("b", b"x"), q("a", b"2"), q("a", b"3")],
            |_| true,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].subject, "a");
        assert_eq!(bodies(&out[0]), [&b"1"[..], &b"2"[..], &b"3"[..]]);
        assert_eq!(bodies(&out[1]), [&b"x"[..]]);
    }

    #[test]
    fn a_node_that_does_not_batch_gets_each_envelope_alone_in_order() {
        let out = group(vec![q("old", b"1"), q("old", b"2")], |s| s != "old");
        assert_eq!(out.len(), 2);
        assert_eq!(bodies(&out[0]), [&b"1"[..]]);
        assert_eq!(bodies(&out[1]), [&b"2"[..]]);
    }

    #[test]
    fn a_full_batch_starts_another_after_it() {
        let big = vec![0u8; MAX_BATCH_BYTES - 1];
        let big = Bytes::from(big);
        let out = group(
            vec![
                ("a".into(), big.clone(), false),
                q("a", b"12"),
                q("a", b"3"),
            ],
            |_| true,
        );
        assert_eq!(
            out.len(),
            2,
            "the second envelope does not fit the first batch"
        );
        assert_eq!(bodies(&out[1]), [&b"12"[..], &b"3"[..]]);
    }

    /// The quota counts envelopes as well as bytes: a batch gives back one place per bounded
    /// envelope in it (a batch giving back one place for many leaked the count, and the node
    /// then refused every bounded envelope: 1% of the rate in the first measurement).
    #[test]
    fn each_bounded_envelope_of_a_batch_is_listed() {
        let out = group(
            vec![
                ("a".into(), Bytes::from_static(b"123"), true),
                ("a".into(), Bytes::from_static(b"45"), false),
                ("a".into(), Bytes::from_static(b"6"), true),
            ],
            |_| true,
        );
        assert_eq!(out[0].bounded, [3, 1]);
    }
}
