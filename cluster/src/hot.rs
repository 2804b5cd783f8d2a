//! The two envelopes of a cross-node message, written and read by hand: `Event` (a leg's
//! frame for an endpoint on another node) and `Leg` (an endpoint's request for its leg). The
//! bytes are exactly serde's (`wire.rs`: MessagePack, named fields, externally tagged), so
//! the wire between nodes does not change; a test checks each against `rmp_serde`.
//!
//! Why by hand: a perf profile of cross-node messages put serde's generic decoding of these
//! envelopes (a `String` for every id, a `Vec` for the frame) and their encoding from owned
//! copies at about a tenth of the receiving node's work. Reading borrows from the payload
//! instead, and anything this reader does not expect (another envelope, a field of an
//! unexpected kind, a repeated key) returns `None`, and the caller falls back to serde, which
//! keeps deciding what is well-formed.

use confab_protocol::peek::{self, value_len};

use crate::wire::WireLegMsg;

/// An `Event` envelope, borrowed from its payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EventRef<'a> {
    pub endpoint: &'a str,
    pub frame: &'a [u8],
    pub call: Option<&'a str>,
    pub from_node: &'a str,
    pub from_epoch: u64,
    pub seq: Option<u64>,
}

/// A `Leg` envelope, its ids borrowed from the payload.
#[derive(Debug)]
pub(crate) struct LegRef<'a> {
    pub call: &'a str,
    pub reply_node: &'a str,
    pub reply_endpoint: &'a str,
    pub msg: WireLegMsg,
}

/// What [`read`] makes of a payload.
#[derive(Debug)]
pub(crate) enum HotEnvelope<'a> {
    Event(EventRef<'a>),
    Leg(LegRef<'a>),
}

/// Reads an `Event` or a `Leg` envelope; `None` for anything else (serde reads it).
pub(crate) fn read(payload: &[u8]) -> Option<HotEnvelope<'_>> {
    let mut rd = payload;
    if peek::map_len(&mut rd)? != 1 {
        return None;
    }
    match str(&mut rd)? {
        "Event" => read_event(&mut rd).map(HotEnvelope::Event),
        "Leg" => read_leg(&mut rd).map(HotEnvelope::Leg),
        _ => None,
    }
}

fn read_event<'a>(rd: &mut &'a [u8]) -> Option<EventRef<'a>> {
    let (mut endpoint, mut frame, mut call, mut from_node, mut from_epoch, mut seq) =
        (None, None, None, None, None, None);
    for _ in 0..peek::map_len(rd)? {
        match str(rd)? {
            "endpoint" => once(&mut endpoint, str(rd)?)?,
            "frame" => once(&mut frame, bin(rd)?)?,
            "call" => once(&mut call, optional(rd, str)?)?,
            "from_node" => once(&mut from_node, str(rd)?)?,
            "from_epoch" => once(&mut from_epoch, uint(rd)?)?,
            "seq" => once(&mut seq, optional(rd, uint)?)?,
            _ => peek::skip(rd)?,
        }
    }
    Some(EventRef {
        endpoint: endpoint?,
        frame: frame?,
        call: call.flatten(),
        from_node: from_node?,
        from_epoch: from_epoch?,
        seq: seq.flatten(),
    })
}

fn read_leg<'a>(rd: &mut &'a [u8]) -> Option<LegRef<'a>> {
    let (mut call, mut reply_node, mut reply_endpoint, mut msg) = (None, None, None, None);
    for _ in 0..peek::map_len(rd)? {
        match str(rd)? {
            "call" => once(&mut call, str(rd)?)?,
            "reply_node" => once(&mut reply_node, str(rd)?)?,
            "reply_endpoint" => once(&mut reply_endpoint, str(rd)?)?,
            // The request itself is small and of many kinds: serde reads it.
            "msg" => {
                let len = value_len(rd)?;
                let (value, rest) = rd.split_at(len);
                *rd = rest;
                once(&mut msg, rmp_serde::from_slice::<WireLegMsg>(value).ok()?)?;
            }
            _ => peek::skip(rd)?,
        }
    }
    Some(LegRef {
        call: call?,
        reply_node: reply_node?,
        reply_endpoint: reply_endpoint?,
        msg: msg?,
    })
}

/// Writes an `Event` envelope into `out`, as serde writes [`crate::wire::Envelope::Event`].
pub(crate) fn write_event(out: &mut Vec<u8>, ev: &EventRef<'_>) {
    let fields = 4 + u32::from(ev.call.is_some()) + u32::from(ev.seq.is_some());
    let _ = rmp::encode::write_map_len(out, 1);
    let _ = rmp::encode::write_str(out, "Event");
    let _ = rmp::encode::write_map_len(out, fields);
    let _ = rmp::encode::write_str(out, "endpoint");
    let _ = rmp::encode::write_str(out, ev.endpoint);
    let _ = rmp::encode::write_str(out, "frame");
    let _ = rmp::encode::write_bin(out, ev.frame);
    if let Some(call) = ev.call {
        let _ = rmp::encode::write_str(out, "call");
        let _ = rmp::encode::write_str(out, call);
    }
    let _ = rmp::encode::write_str(out, "from_node");
    let _ = rmp::encode::write_str(out, ev.from_node);
    let _ = rmp::encode::write_str(out, "from_epoch");
    let _ = rmp::encode::write_uint(out, ev.from_epoch);
    if let Some(seq) = ev.seq {
        let _ = rmp::encode::write_str(out, "seq");
        let _ = rmp::encode::write_uint(out, seq);
    }
}

/// Writes a `Leg` envelope into `out`, as serde writes [`crate::wire::Envelope::Leg`]; false
/// if its request does not encode (never, for the requests a leg takes).
pub(crate) fn write_leg(
    out: &mut Vec<u8>,
    call: &str,
    reply_node: &str,
    reply_endpoint: &str,
    msg: &WireLegMsg,
) -> bool {
    let _ = rmp::encode::write_map_len(out, 1);
    let _ = rmp::encode::write_str(out, "Leg");
    let _ = rmp::encode::write_map_len(out, 4);
    let _ = rmp::encode::write_str(out, "call");
    let _ = rmp::encode::write_str(out, call);
    let _ = rmp::encode::write_str(out, "reply_node");
    let _ = rmp::encode::write_str(out, reply_node);
    let _ = rmp::encode::write_str(out, "reply_endpoint");
    let _ = rmp::encode::write_str(out, reply_endpoint);
    let _ = rmp::encode::write_str(out, "msg");
    rmp_serde::encode::write_named(out, msg).is_ok()
}

/// Sets a field read for the first time; a second one is not this reader's to judge.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// A nil (`Some(None)`) or what `read` reads.
fn optional<'a, T>(
    rd: &mut &'a [u8],
    read: impl FnOnce(&mut &'a [u8]) -> Option<T>,
) -> Option<Option<T>> {
    if rd.first() == Some(&0xc0) {
        *rd = &rd[1..];
        return Some(None);
    }
    read(rd).map(Some)
}

fn str<'a>(rd: &mut &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(peek::read_str(rd)?).ok()
}

fn bin<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = rmp::decode::read_bin_len(rd).ok()? as usize;
    if rd.len() < len {
        return None;
    }
    let (b, rest) = rd.split_at(len);
    *rd = rest;
    Some(b)
}

/// An unsigned integer; anything else is `None`.
fn uint(rd: &mut &[u8]) -> Option<u64> {
    peek::read_uint(rd)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Envelope;
    use confab_protocol::Body;

    fn serde_bytes(env: &Envelope) -> Vec<u8> {
        rmp_serde::to_vec_named(env).expect("encodes")
    }

    fn events() -> Vec<Envelope> {
        let event = |call: Option<&str>, seq, epoch| Envelope::Event {
            endpoint: "b.1.e2".into(),
            frame: vec![0x81, 0xa1, 0x74, 0x01],
            call: call.map(str::to_owned),
            from_node: "node-a".into(),
            from_epoch: epoch,
            seq,
        };
        vec![
            event(None, None, 7),
            event(Some("a.1.c3"), None, 1_796_663_708_616),
            event(None, Some(300), u64::MAX),
            event(Some("a.1.c3"), Some(2), 0),
        ]
    }

    fn legs() -> Vec<Envelope> {
        let leg = |msg| Envelope::Leg {
            call: "a.1.c3".into(),
            reply_node: "b".into(),
            reply_endpoint: "b.1.e2".into(),
            msg,
        };
        vec![
            leg(WireLegMsg::Ack { msg: 59_041 }),
            leg(WireLegMsg::Message {
                rid: Some(3),
                content_type: "text/plain".into(),
                body: Body::Text("x".repeat(300)),
            }),
            leg(WireLegMsg::Release),
        ]
    }

    #[test]
    fn events_are_written_as_serde_writes_them_and_read_back() {
        for env in events() {
            let Envelope::Event {
                endpoint,
                frame,
                call,
                from_node,
                from_epoch,
                seq,
            } = &env
            else {
                unreachable!()
            };
            let ev = EventRef {
                endpoint,
                frame,
                call: call.as_deref(),
                from_node,
                from_epoch: *from_epoch,
                seq: *seq,
            };
            let mut out = Vec::new();
            write_event(&mut out, &ev);
            assert_eq!(out, serde_bytes(&env));
            let Some(HotEnvelope::Event(back)) = read(&out) else {
                panic!("not read back: {env:?}")
            };
            assert_eq!(back, ev);
        }
    }

    #[test]
    fn legs_are_written_as_serde_writes_them_and_read_back() {
        for env in legs() {
            let Envelope::Leg {
                call,
                reply_node,
                reply_endpoint,
                msg,
            } = &env
            else {
                unreachable!()
            };
            let mut out = Vec::new();
            assert!(write_leg(&mut out, call, reply_node, reply_endpoint, msg));
            assert_eq!(out, serde_bytes(&env));
            let Some(HotEnvelope::Leg(back)) = read(&out) else {
                panic!("not read back: {env:?}")
            };
            assert_eq!(
                (back.call, back.reply_node, back.reply_endpoint),
                (call.as_str(), reply_node.as_str(), reply_endpoint.as_str())
            );
            assert_eq!(format!("{:?}", back.msg), format!("{msg:?}"));
        }
    }

    #[test]
    fn a_nil_option_and_an_unknown_field_are_read_as_serde_reads_them() {
        // {"Event": {"endpoint": "e", "frame": bin(1), "call": nil, "from_node": "a",
        //  "from_epoch": 1, "later": [1, 2], "seq": nil}}
        let mut p = vec![0x81, 0xa5];
        p.extend_from_slice(b"Event");
        p.push(0x87);
        for (k, v) in [
            (&b"endpoint"[..], &[0xa1, b'e'][..]),
            (b"frame", &[0xc4, 0x01, 0x00]),
            (b"call", &[0xc0]),
            (b"from_node", &[0xa1, b'a']),
            (b"from_epoch", &[0x01]),
            (b"later", &[0x92, 0x01, 0x02]),
            (b"seq", &[0xc0]),
        ] {
            p.push(0xa0 | k.len() as u8);
            p.extend_from_slice(k);
            p.extend_from_slice(v);
        }
        let Some(HotEnvelope::Event(ev)) = read(&p) else {
            panic!("not read")
        };
        assert_eq!((ev.endpoint, ev.call, ev.seq), ("e", None, None));
        let Ok(Envelope::Event { call, seq, .. }) = rmp_serde::from_slice::<Envelope>(&p) else {
            panic!("serde disagrees")
        };
        assert_eq!((call, seq), (None, None));
    }

    #[test]
    fn anything_unexpected_is_left_to_serde() {
        let mut ok = Vec::new();
        write_event(
            &mut ok,
            &EventRef {
                endpoint: "e",
                frame: &[0x90],
                call: None,
                from_node: "a",
                from_epoch: 1,
                seq: None,
            },
        );
        // Truncated anywhere.
        for cut in 0..ok.len() {
            assert!(read(&ok[..cut]).is_none(), "read a payload cut at {cut}");
        }
        // Another envelope.
        let seen = serde_bytes(&Envelope::EventsSeen {
            call: "c".into(),
            upto: 1,
        });
        assert!(read(&seen).is_none());
        // A repeated field: {"Leg": {"call": "c", "call": "c", ...}}
        let mut twice = Vec::new();
        let _ = rmp::encode::write_map_len(&mut twice, 1);
        let _ = rmp::encode::write_str(&mut twice, "Leg");
        let _ = rmp::encode::write_map_len(&mut twice, 2);
        for _ in 0..2 {
            let _ = rmp::encode::write_str(&mut twice, "call");
            let _ = rmp::encode::write_str(&mut twice, "c");
        }
        assert!(read(&twice).is_none());
        // A negative epoch.
        let mut negative = Vec::new();
        let _ = rmp::encode::write_map_len(&mut negative, 1);
        let _ = rmp::encode::write_str(&mut negative, "Event");
        let _ = rmp::encode::write_map_len(&mut negative, 1);
        let _ = rmp::encode::write_str(&mut negative, "from_epoch");
        let _ = rmp::encode::write_sint(&mut negative, -1);
        assert!(read(&negative).is_none());
    }
}
