//! Golden bytes of what nodes say to each other (`cluster::wire`): every envelope kind, the
//! heartbeat and a directory record, encoded as a node encodes them (MessagePack with named
//! fields), compared with the bytes this build was released with. A change here is a change
//! of the protocol between nodes: nodes of the old and the new build in one cluster (a rolling
//! upgrade) would misread each other. If it is meant, update the bytes with
//! `CONFAB_BLESS=1 cargo test -p confab-cluster --test wire_golden -- --nocapture` and say so in
//! docs/architecture.md section 12.

#![allow(clippy::print_stdout)] // `CONFAB_BLESS=1` prints the table to paste.

use confab_actors::call::leg::TerminateCause;
use confab_cluster::direct::handshake::{Hello, Proof, Reply, Role, prove};
use confab_cluster::direct::order::{Marker, sender_tag, tagged};
use confab_cluster::wire::{Envelope, Heartbeat, PublicationRecord, Record, WireLegMsg};
use confab_protocol::{Activity, Body, Reason, Status, Toast};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn encoded(value: &impl serde::Serialize) -> String {
    hex(&rmp_serde::to_vec_named(value).expect("encodes"))
}

/// One of each: (name, its bytes as this build encodes them).
fn samples() -> Vec<(&'static str, String)> {
    let envelopes = [
        (
            "event",
            Envelope::Event {
                endpoint: "b.1.e2".into(),
                frame: vec![0x81, 0xa1, 0x74],
                call: Some("a.1.c3".into()),
                from_node: "a".into(),
                from_epoch: 7,
                seq: Some(2),
            },
        ),
        (
            "events_seen",
            Envelope::EventsSeen {
                call: "a.1.c3".into(),
                upto: 5,
            },
        ),
        (
            "leg_ended",
            Envelope::LegEnded {
                endpoint: "b.1.e2".into(),
                call: "a.1.c3".into(),
                conversation: "a.1.v1".into(),
                elsewhere: true,
                from_node: "a".into(),
                from_epoch: 7,
                reason: Some(Reason::new(200, "Call completed elsewhere")),
            },
        ),
        (
            "adopt",
            Envelope::Adopt {
                endpoint: "b.1.e2".into(),
                leg_node: "a".into(),
                arbiter: "a.1.f1".into(),
                call: "a.1.c4".into(),
                conversation: "a.1.v1".into(),
                from: "sip:alice@example.com".into(),
                offer: "v=0".into(),
                toast: Some(Toast {
                    content_type: "text/plain".into(),
                    body: Body::Text("hi".into()),
                }),
                immediate: false,
                from_epoch: Some(7),
            },
        ),
        (
            "leg_accept",
            Envelope::Leg {
                call: "a.1.c4".into(),
                reply_node: "b".into(),
                reply_endpoint: "b.1.e2".into(),
                msg: WireLegMsg::Accept {
                    rid: Some(9),
                    sdp: "v=0".into(),
                },
            },
        ),
        (
            "leg_terminate",
            Envelope::Leg {
                call: "a.1.c4".into(),
                reply_node: "b".into(),
                reply_endpoint: "b.1.e2".into(),
                msg: WireLegMsg::Terminate {
                    rid: None,
                    cause: TerminateCause::Bye,
                },
            },
        ),
        (
            "fork_adopted",
            Envelope::ForkAdopted {
                arbiter: "a.1.f1".into(),
                call: "a.1.c4".into(),
            },
        ),
        (
            "fork_lost",
            Envelope::ForkLost {
                arbiter: "a.1.f1".into(),
                call: "a.1.c4".into(),
            },
        ),
        ("rejoin", Envelope::Rejoin { epoch: 7, above: 9 }),
        (
            "directory_sync",
            Envelope::DirectorySync {
                from_node: "b".into(),
                token: 3,
                upto: 41,
            },
        ),
        (
            "directory_synced",
            Envelope::DirectorySynced {
                from_node: "a".into(),
                token: 3,
            },
        ),
        (
            "admin_query",
            Envelope::AdminQuery {
                from_node: "a".into(),
                token: 4,
                query: vec![0x93, 0x01],
            },
        ),
        (
            "admin_answer",
            Envelope::AdminAnswer {
                from_node: "b".into(),
                token: 4,
                answer: vec![0xc0],
            },
        ),
        (
            "resume_relay",
            Envelope::ResumeRelay {
                from_node: "b".into(),
                relay: 3,
                endpoint: "a.1.e1".into(),
                user: "sip:u@h".into(),
                rid: Some(1),
                token: "t".into(),
                seen: 5,
                sent: 2,
            },
        ),
        (
            "relay_out",
            Envelope::RelayOut {
                relay: 3,
                seq: 1,
                bytes: vec![0, 0, 0, 1, 0x80],
            },
        ),
        ("relay_out_end", Envelope::RelayOutEnd { relay: 3 }),
        (
            "batch",
            Envelope::Batch {
                envelopes: vec![
                    serde_bytes::ByteBuf::from(vec![0x81, 0xa1, 0x41, 0xc0]),
                    serde_bytes::ByteBuf::from(vec![0xc0]),
                ],
            },
        ),
        (
            "relay_in",
            Envelope::RelayIn {
                endpoint: "a.1.e1".into(),
                from_node: "b".into(),
                relay: 3,
                seq: 1,
                frames: vec![serde_bytes::ByteBuf::from(vec![0x80])],
            },
        ),
        (
            "relay_in_end",
            Envelope::RelayInEnd {
                endpoint: "a.1.e1".into(),
                from_node: "b".into(),
                relay: 3,
            },
        ),
    ];
    let mut out: Vec<(&'static str, String)> = envelopes
        .iter()
        .map(|(name, e)| (*name, encoded(e)))
        .collect();
    let heartbeat = |link: Option<&str>| {
        encoded(&Heartbeat {
            node: "a".into(),
            epoch: 7,
            leaving: false,
            acks_events: true,
            syncs_directory: true,
            batches: true,
            link: link.map(str::to_owned),
        })
    };
    out.push(("heartbeat", heartbeat(None)));
    out.push(("heartbeat_with_link", heartbeat(Some("10.0.0.5:5090"))));
    // A direct link's handshake (`cluster/src/direct/handshake.rs`) and the markers that keep
    // order across a switch between NATS and a link (`direct/order.rs`).
    let hello = Hello {
        version: confab_cluster::direct::handshake::VERSION,
        from: "a".into(),
        from_epoch: 7,
        to: "b".into(),
        to_epoch: 8,
        link: 3,
        nonce: vec![1; 32],
    };
    out.push(("link_hello", encoded(&hello)));
    out.push((
        "link_challenge",
        encoded(&Reply::Challenge { nonce: vec![2; 32] }),
    ));
    out.push(("link_proof", encoded(&Proof { proof: vec![3; 32] })));
    out.push((
        "link_welcome",
        encoded(&Reply::Welcome { proof: vec![4; 32] }),
    ));
    out.push((
        "link_refused",
        encoded(&Reply::Refused {
            why: "that run was declared dead".into(),
        }),
    ));
    let key = confab_cluster::direct::handshake::key("a secret of sixteen bytes or more");
    out.push((
        "link_dialer_proof",
        hex(&prove(&key, Role::Dialer, &hello, &[2; 32])),
    ));
    out.push((
        "link_acceptor_proof",
        hex(&prove(&key, Role::Acceptor, &hello, &[2; 32])),
    ));
    for (name, marker) in [
        (
            "marker_open",
            Marker::Open {
                from: "a".into(),
                run: 7,
                link: 3,
            },
        ),
        (
            "marker_closed",
            Marker::Closed {
                from: "a".into(),
                run: 7,
                link: 3,
            },
        ),
    ] {
        out.push((name, hex(&marker.encode())));
    }
    // What a node puts before an envelope it sends over NATS to a node it has opened a link to.
    let tag = sender_tag("a", 7).expect("a short id");
    out.push(("sender_tag", hex(&tag)));
    out.push((
        "tagged_envelope",
        hex(&tagged(
            &tag,
            &rmp_serde::to_vec_named(&Envelope::Rejoin { epoch: 7, above: 9 }).expect("encodes"),
        )),
    ));
    out.push((
        "record",
        encoded(&Record {
            node: "a".into(),
            epoch: 7,
            user: "sip:alice@example.com".into(),
            device: "laptop".into(),
            publication: Some(PublicationRecord {
                activity: Activity::Active,
                idle_ms: 0,
                stamp_unix_ms: 1_796_600_000_000,
            }),
            status: Some(Status::Busy),
            status_set_unix_ms: Some(1_796_600_000_001),
            connected_unix_ms: 1_796_599_999_000,
        }),
    ));
    out
}

/// The bytes of this build (`CONFAB_BLESS=1` prints the table to paste here).
const GOLDEN: &[(&str, &str)] = &[
    (
        "event",
        "81a54576656e7486a8656e64706f696e74a6622e312e6532a56672616d65c40381a174a463616c6ca6612e312e6333a966726f6d5f6e6f6465a161aa66726f6d5f65706f636807a373657102",
    ),
    (
        "events_seen",
        "81aa4576656e74735365656e82a463616c6ca6612e312e6333a47570746f05",
    ),
    (
        "leg_ended",
        "81a84c6567456e64656487a8656e64706f696e74a6622e312e6532a463616c6ca6612e312e6333ac636f6e766572736174696f6ea6612e312e7631a9656c73657768657265c3a966726f6d5f6e6f6465a161aa66726f6d5f65706f636807a6726561736f6e82a4636f6465ccc8a474657874b843616c6c20636f6d706c6574656420656c73657768657265",
    ),
    (
        "adopt",
        "81a541646f70748aa8656e64706f696e74a6622e312e6532a86c65675f6e6f6465a161a761726269746572a6612e312e6631a463616c6ca6612e312e6334ac636f6e766572736174696f6ea6612e312e7631a466726f6db57369703a616c696365406578616d706c652e636f6da56f66666572a3763d30a5746f61737482ac636f6e74656e745f74797065aa746578742f706c61696ea4626f6479a26869a9696d6d656469617465c2aa66726f6d5f65706f636807",
    ),
    (
        "leg_accept",
        "81a34c656784a463616c6ca6612e312e6334aa7265706c795f6e6f6465a162ae7265706c795f656e64706f696e74a6622e312e6532a36d736781a641636365707482a372696409a3736470a3763d30",
    ),
    (
        "leg_terminate",
        "81a34c656784a463616c6ca6612e312e6334aa7265706c795f6e6f6465a162ae7265706c795f656e64706f696e74a6622e312e6532a36d736781a95465726d696e61746582a3726964c0a56361757365a3427965",
    ),
    (
        "fork_adopted",
        "81ab466f726b41646f7074656482a761726269746572a6612e312e6631a463616c6ca6612e312e6334",
    ),
    (
        "fork_lost",
        "81a8466f726b4c6f737482a761726269746572a6612e312e6631a463616c6ca6612e312e6334",
    ),
    ("rejoin", "81a652656a6f696e82a565706f636807a561626f766509"),
    (
        "directory_sync",
        "81ad4469726563746f727953796e6383a966726f6d5f6e6f6465a162a5746f6b656e03a47570746f29",
    ),
    (
        "directory_synced",
        "81af4469726563746f727953796e63656482a966726f6d5f6e6f6465a161a5746f6b656e03",
    ),
    (
        "admin_query",
        "81aa41646d696e517565727983a966726f6d5f6e6f6465a161a5746f6b656e04a57175657279c4029301",
    ),
    (
        "admin_answer",
        "81ab41646d696e416e7377657283a966726f6d5f6e6f6465a162a5746f6b656e04a6616e73776572c401c0",
    ),
    (
        "resume_relay",
        "81ab526573756d6552656c617988a966726f6d5f6e6f6465a162a572656c617903a8656e64706f696e74a6612e312e6531a475736572a77369703a754068a372696401a5746f6b656ea174a47365656e05a473656e7402",
    ),
    (
        "relay_out",
        "81a852656c61794f757483a572656c617903a373657101a56279746573c4050000000180",
    ),
    (
        "relay_out_end",
        "81ab52656c61794f7574456e6481a572656c617903",
    ),
    (
        "batch",
        "81a5426174636881a9656e76656c6f70657392c40481a141c0c401c0",
    ),
    (
        "relay_in",
        "81a752656c6179496e85a8656e64706f696e74a6612e312e6531a966726f6d5f6e6f6465a162a572656c617903a373657101a66672616d657391c40180",
    ),
    (
        "relay_in_end",
        "81aa52656c6179496e456e6483a8656e64706f696e74a6612e312e6531a966726f6d5f6e6f6465a162a572656c617903",
    ),
    (
        "heartbeat",
        "86a46e6f6465a161a565706f636807a76c656176696e67c2ab61636b735f6576656e7473c3af73796e63735f6469726563746f7279c3a762617463686573c3",
    ),
    (
        "heartbeat_with_link",
        "87a46e6f6465a161a565706f636807a76c656176696e67c2ab61636b735f6576656e7473c3af73796e63735f6469726563746f7279c3a762617463686573c3a46c696e6bad31302e302e302e353a35303930",
    ),
    (
        "link_hello",
        "87a776657273696f6e02a466726f6da161aa66726f6d5f65706f636807a2746fa162a8746f5f65706f636808a46c696e6b03a56e6f6e6365c4200101010101010101010101010101010101010101010101010101010101010101",
    ),
    (
        "link_challenge",
        "81a94368616c6c656e676581a56e6f6e6365c4200202020202020202020202020202020202020202020202020202020202020202",
    ),
    (
        "link_proof",
        "81a570726f6f66c4200303030303030303030303030303030303030303030303030303030303030303",
    ),
    (
        "link_welcome",
        "81a757656c636f6d6581a570726f6f66c4200404040404040404040404040404040404040404040404040404040404040404",
    ),
    (
        "link_refused",
        "81a75265667573656481a3776879ba746861742072756e20776173206465636c617265642064656164",
    ),
    (
        "link_dialer_proof",
        "7141ec14e0f2626f12cb801add506a9fdc97b665f928ad9568278a979e5578fa",
    ),
    (
        "link_acceptor_proof",
        "0dbc1d6b86a580f22cc520966dfcb60046283c185cccd94a993ab28fb9a46242",
    ),
    ("marker_open", "c14f0000000000000003000000000000000761"),
    ("marker_closed", "c1430000000000000003000000000000000761"),
    ("sender_tag", "c1530000000000000007000161"),
    (
        "tagged_envelope",
        "c153000000000000000700016181a652656a6f696e82a565706f636807a561626f766509",
    ),
    (
        "record",
        "88a46e6f6465a161a565706f636807a475736572b57369703a616c696365406578616d706c652e636f6da6646576696365a66c6170746f70ab7075626c69636174696f6e83a86163746976697479a6616374697665a769646c655f6d7300ad7374616d705f756e69785f6d73cf000001a24db46e00a6737461747573a462757379b27374617475735f7365745f756e69785f6d73cf000001a24db46e01b1636f6e6e65637465645f756e69785f6d73cf000001a24db46a18",
    ),
];

#[test]
fn what_nodes_say_to_each_other_is_encoded_as_released() {
    let samples = samples();
    if std::env::var_os("CONFAB_BLESS").is_some() {
        for (name, bytes) in &samples {
            println!("    (\"{name}\", \"{bytes}\"),");
        }
        return;
    }
    assert_eq!(samples.len(), GOLDEN.len(), "one golden entry per sample");
    // The batch the publisher writes by hand is the same bytes as serde's.
    let by_hand = confab_cluster::wire::encode_batch(&[
        bytes::Bytes::from_static(&[0x81, 0xa1, 0x41, 0xc0]),
        bytes::Bytes::from_static(&[0xc0]),
    ]);
    let batch = samples
        .iter()
        .find(|(n, _)| *n == "batch")
        .expect("a batch sample");
    assert_eq!(hex(&by_hand), batch.1, "encode_batch matches serde");
    for ((name, bytes), (golden_name, golden)) in samples.iter().zip(GOLDEN) {
        assert_eq!(name, golden_name);
        assert_eq!(bytes, golden, "{name}: the wire between nodes changed");
    }
}
