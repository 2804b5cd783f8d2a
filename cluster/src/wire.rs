//! What nodes say to each other: envelopes on `confab.node.<id>`, heartbeats on
//! `confab.nodes.heartbeat`, and the directory records of the `confab-endpoints` KV bucket.
//! All MessagePack with named fields (`to_vec_named`), externally tagged enums.

use confab_protocol::{Activity, Body, Reason, Status, Toast};
use serde::{Deserialize, Serialize};

use confab_actors::call::leg::{LegMsg, TerminateCause};

/// One message for an actor on the receiving node.
#[derive(Debug, Serialize, Deserialize)]
pub enum Envelope {
    /// A leg's event for its endpoint's client (a `ServerMsg`, MessagePack-encoded).
    Event {
        endpoint: String,
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
        /// With an answer (`ok`, `error`) to a call request: the call whose leg answers, so
        /// the endpoint settles that call's waiting request even when its client used the same
        /// `rid` for requests to two calls. Absent on anything else.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call: Option<String>,
        /// The sending node and its run: a run declared dead has had its calls ended for the
        /// clients already, so anything it still sends is dropped (no second answer).
        from_node: String,
        from_epoch: u64,
        /// On a call's state events (`call_state`, `call_established`, ...; see
        /// `cluster/src/events.rs`): their number within the leg's, from 1. The endpoint's node
        /// passes them on in this order only, answers `EventsSeen`, and the leg's node sends
        /// the unanswered ones again. Absent on anything else, and from an older node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// An endpoint's node has passed on the state events of the leg `call` numbered up to
    /// `upto` (see `seq` above): the leg's node stops sending them again.
    EventsSeen {
        call: String,
        upto: u64,
    },
    /// A leg ended; its endpoint answers `Release` (or the node does, if the endpoint is gone).
    LegEnded {
        endpoint: String,
        call: String,
        conversation: String,
        elsewhere: bool,
        from_node: String,
        from_epoch: u64,
        /// Why it ended: if the leg's own `call_state` events of its end were lost on the way,
        /// the endpoint's node sends them to the client itself. Absent from an older node, and
        /// from a node answering for a leg it no longer holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Reason>,
    },
    /// A fork arbiter created an inbound leg for this endpoint: adopt it (or `ForkLost`).
    Adopt {
        endpoint: String,
        leg_node: String,
        arbiter: String,
        call: String,
        conversation: String,
        from: String,
        offer: String,
        toast: Option<Toast>,
        immediate: bool,
        /// The run of `leg_node` that sends it: a run declared dead gets `ForkLost` instead, or
        /// its call would ring here with nothing left to end it (everything else that run sends
        /// is dropped). Absent from an older node's envelope: then it is taken.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_epoch: Option<u64>,
    },
    /// An endpoint's request for its leg.
    Leg {
        call: String,
        reply_node: String,
        reply_endpoint: String,
        msg: WireLegMsg,
    },
    ForkAdopted {
        arbiter: String,
        call: String,
    },
    ForkLost {
        arbiter: String,
        call: String,
    },
    /// A sign-in on `from_node` waits for its directory record (landed at revision `upto`):
    /// the receiver answers `DirectorySynced` once its watch has applied that revision, so
    /// the new endpoint can be reached from here (see `cluster/src/signin.rs`).
    DirectorySync {
        from_node: String,
        token: u64,
        upto: u64,
    },
    /// The answer to `DirectorySync` `token`.
    DirectorySynced {
        from_node: String,
        token: u64,
    },
    /// An admin API query (the engine's `admin::Query`, MessagePack) from `from_node`, which
    /// waits for the `AdminAnswer` with the same `token`.
    AdminQuery {
        from_node: String,
        token: u64,
        #[serde(with = "serde_bytes")]
        query: Vec<u8>,
    },
    /// The answer (`admin::Answer`, MessagePack) to `AdminQuery` `token`.
    AdminAnswer {
        from_node: String,
        token: u64,
        #[serde(with = "serde_bytes")]
        answer: Vec<u8>,
    },
    /// A client resumed, on `from_node`, the session of `endpoint` held here: take it back
    /// through that node's relay `relay` (`confab_actors::relay`). The answer is `RelayOut`
    /// (the welcome and what follows, or the refusal), then `RelayOutEnd`.
    ResumeRelay {
        from_node: String,
        relay: u64,
        endpoint: String,
        user: String,
        rid: Option<u32>,
        token: String,
        seen: u64,
        sent: u64,
    },
    /// Bytes for the client of relay `relay` here, numbered from 1 (a gap ends the relay).
    RelayOut {
        relay: u64,
        seq: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The session left relay `relay` here: close its client's connection.
    RelayOutEnd {
        relay: u64,
    },
    /// The client's frames (MessagePack bodies) for `endpoint` here, batch `seq` of relay
    /// `relay` of `from_node`.
    RelayIn {
        endpoint: String,
        from_node: String,
        relay: u64,
        seq: u64,
        frames: Vec<serde_bytes::ByteBuf>,
    },
    /// The client's connection of that relay ended.
    RelayInEnd {
        endpoint: String,
        from_node: String,
        relay: u64,
    },
    /// Several envelopes for this node, each encoded as it would go alone, in the order they
    /// were sent (`batch.rs`). Sent only to a node whose heartbeat says `batches`.
    Batch {
        envelopes: Vec<serde_bytes::ByteBuf>,
    },
    /// "You were declared dead in run `epoch`": the receiver rejoins as a new run.
    Rejoin {
        epoch: u64,
        /// The latest run of the receiver's id the sender knows: the new run's epoch must be
        /// above it, whatever the receiver's wall clock says (a node restarted with its clock
        /// set back would otherwise take an epoch still counted as dead, or as stale).
        #[serde(default)]
        above: u64,
    },
}

/// The endpoint → leg messages of [`LegMsg`] that may cross nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireLegMsg {
    Accept {
        rid: Option<u32>,
        sdp: String,
    },
    Decline {
        rid: Option<u32>,
        code: u16,
    },
    Forward {
        rid: Option<u32>,
        to: String,
    },
    Transfer {
        rid: Option<u32>,
        to: String,
    },
    Terminate {
        rid: Option<u32>,
        cause: TerminateCause,
    },
    Message {
        rid: Option<u32>,
        content_type: String,
        body: Body,
    },
    Ack {
        msg: u32,
    },
    Composing {
        active: bool,
    },
    EndpointLost,
    Release,
}

impl WireLegMsg {
    /// Whether a client's requests drive it: such a leg message is bounded (see
    /// `quota.rs`); what the node sends on its own (a sign-out's hang-up, a lost endpoint, a
    /// release) must not be lost.
    pub fn is_bounded(&self) -> bool {
        matches!(
            self,
            WireLegMsg::Message { .. }
                | WireLegMsg::Ack { .. }
                | WireLegMsg::Composing { .. }
                | WireLegMsg::Accept { .. }
                | WireLegMsg::Decline { .. }
                | WireLegMsg::Forward { .. }
                | WireLegMsg::Transfer { .. }
                | WireLegMsg::Terminate {
                    cause: TerminateCause::Call,
                    ..
                }
        )
    }

    pub fn from_leg_msg(m: LegMsg) -> Option<Self> {
        Some(match m {
            LegMsg::Accept { rid, sdp } => WireLegMsg::Accept { rid, sdp },
            LegMsg::Decline { rid, code } => WireLegMsg::Decline { rid, code },
            LegMsg::Forward { rid, to } => WireLegMsg::Forward { rid, to },
            LegMsg::Transfer { rid, to } => WireLegMsg::Transfer { rid, to },
            LegMsg::Terminate { rid, cause } => WireLegMsg::Terminate { rid, cause },
            LegMsg::Message {
                rid,
                content_type,
                body,
            } => WireLegMsg::Message {
                rid,
                content_type,
                body,
            },
            LegMsg::Ack { msg } => WireLegMsg::Ack { msg },
            LegMsg::Composing { active } => WireLegMsg::Composing { active },
            LegMsg::EndpointLost => WireLegMsg::EndpointLost,
            LegMsg::Release => WireLegMsg::Release,
            _ => return None,
        })
    }

    pub fn into_leg_msg(self) -> LegMsg {
        match self {
            WireLegMsg::Accept { rid, sdp } => LegMsg::Accept { rid, sdp },
            WireLegMsg::Decline { rid, code } => LegMsg::Decline { rid, code },
            WireLegMsg::Forward { rid, to } => LegMsg::Forward { rid, to },
            WireLegMsg::Transfer { rid, to } => LegMsg::Transfer { rid, to },
            WireLegMsg::Terminate { rid, cause } => LegMsg::Terminate { rid, cause },
            WireLegMsg::Message {
                rid,
                content_type,
                body,
            } => LegMsg::Message {
                rid,
                content_type,
                body,
            },
            WireLegMsg::Ack { msg } => LegMsg::Ack { msg },
            WireLegMsg::Composing { active } => LegMsg::Composing { active },
            WireLegMsg::EndpointLost => LegMsg::EndpointLost,
            WireLegMsg::Release => LegMsg::Release,
        }
    }
}

/// `confab.nodes.heartbeat`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub epoch: u64,
    /// Set once, when the node leaves gracefully.
    #[serde(default)]
    pub leaving: bool,
    /// The node acknowledges numbered state events (`EventsSeen`, `cluster/src/events.rs`): they
    /// are numbered and sent again only to such a node. An older node, which does not say,
    /// would pass each repeat on to its client.
    #[serde(default)]
    pub acks_events: bool,
    /// The node answers `DirectorySync` (`cluster/src/signin.rs`). A sign-in elsewhere does not
    /// wait for a node whose heartbeat lacks it (an older build, which would never answer);
    /// it does wait for a node not heard from yet.
    #[serde(default)]
    pub syncs_directory: bool,
    /// The node reads `Envelope::Batch` (`batch.rs`): envelopes for it may go together. An
    /// older node, which does not say, gets each alone.
    #[serde(default)]
    pub batches: bool,
    /// Where the node takes direct links from the others (`direct/`); absent: it takes none,
    /// and envelopes for it go over NATS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// `Envelope::Batch` of `envelopes` (each already encoded), written directly: the same bytes
/// as serde's encoding of the enum (a test compares them), without copying each envelope into
/// a buffer of its own first.
pub fn encode_batch(envelopes: &[bytes::Bytes]) -> bytes::Bytes {
    let total: usize = envelopes.iter().map(|e| e.len() + 5).sum();
    let mut out = Vec::with_capacity(total + 24);
    // {"Batch": {"envelopes": [bin, ...]}}
    let _ = rmp::encode::write_map_len(&mut out, 1);
    let _ = rmp::encode::write_str(&mut out, "Batch");
    let _ = rmp::encode::write_map_len(&mut out, 1);
    let _ = rmp::encode::write_str(&mut out, "envelopes");
    let _ = rmp::encode::write_array_len(&mut out, envelopes.len() as u32);
    for e in envelopes {
        let _ = rmp::encode::write_bin(&mut out, e);
    }
    bytes::Bytes::from(out)
}

/// A device-state publication with the owning node's wall-clock stamp.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PublicationRecord {
    pub activity: Activity,
    pub idle_ms: u64,
    pub stamp_unix_ms: u64,
}

/// The value of `ep.<user-token>.<endpoint>` in the `confab-endpoints` bucket. Only the owning
/// node writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub node: String,
    pub epoch: u64,
    pub user: String,
    pub device: String,
    #[serde(default)]
    pub publication: Option<PublicationRecord>,
    #[serde(default)]
    pub status: Option<Status>,
    #[serde(default)]
    pub status_set_unix_ms: Option<u64>,
    pub connected_unix_ms: u64,
}

/// A NATS-key-safe token for a user URI: lower-case hex of its bytes.
pub fn user_token(user: &str) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(user.len() * 2);
    for b in user.bytes() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn user_from_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The KV key of an endpoint's record.
pub fn record_key(user: &str, endpoint: &str) -> String {
    format!("ep.{}.{endpoint}", user_token(user))
}

/// (user, endpoint) of a record key.
pub fn parse_key(key: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix("ep.")?;
    let (token, endpoint) = rest.split_once('.')?;
    Some((user_from_token(token)?, endpoint.to_owned()))
}

pub use confab_actors::presence::stamp::unix_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = record_key("sip:Bob@example.com", "node-a.0000abcd.e1");
        assert!(k.starts_with("ep."));
        assert_eq!(
            parse_key(&k),
            Some((
                "sip:Bob@example.com".to_owned(),
                "node-a.0000abcd.e1".to_owned()
            ))
        );
    }

    #[test]
    fn envelopes_round_trip_with_binary_bodies() {
        let e = Envelope::Leg {
            call: "c".into(),
            reply_node: "n".into(),
            reply_endpoint: "e".into(),
            msg: WireLegMsg::Message {
                rid: Some(3),
                content_type: "application/octet-stream".into(),
                body: Body::Binary(vec![0, 1, 2]),
            },
        };
        let bytes = rmp_serde::to_vec_named(&e).expect("encodes");
        let back: Envelope = rmp_serde::from_slice(&bytes).expect("decodes");
        match back {
            Envelope::Leg {
                msg: WireLegMsg::Message { body, .. },
                ..
            } => assert_eq!(body, Body::Binary(vec![0, 1, 2])),
            other => panic!("{other:?}"),
        }
    }
}
