//! Micro-benchmarks of the protocol hot paths: framing and (de)serialisation of the messages a
//! chat sends most, the call state machine, and the SDP work done once per call.
//!
//! Run with `cargo bench -p confab-protocol --bench protocol`. Measurement windows are short on
//! purpose (the whole suite runs in about a minute); treat the numbers as indicative.

use bytes::{BufMut, BytesMut};
use confab_protocol::codec::{LEN_PREFIX, encode_frame};
use confab_protocol::sdp;
use confab_protocol::state::{CallEvent, CallState, Direction, transition};
use confab_protocol::{
    Body, ClientMsg, FrameCodec, Reason, ServerMsg, decode_client, decode_server,
};
use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};
use std::time::Duration;
use tokio_util::codec::Decoder;

const CALL: &str = "node-1.5f3a9c21.c1a";
const CONVERSATION: &str = "node-1.5f3a9c21.v1b";
const FROM: &str = "sip:alice@example.com";
/// Frames in the buffer handed to one `FrameCodec` decode run (a busy socket read).
const FRAMES_PER_READ: usize = 64;

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    group
}

/// A 100-byte text body, like a short chat line.
fn text_body() -> String {
    let line = "Are we still on for the design review at three? I moved it to room 4.12 because ";
    let mut body = line.repeat(2);
    body.truncate(100);
    assert_eq!(body.len(), 100);
    body
}

fn message_received() -> ServerMsg {
    ServerMsg::MessageReceived {
        call: CALL.to_owned(),
        msg: 42,
        from: FROM.to_owned(),
        content_type: "text/plain; charset=utf-8".to_owned(),
        body: Body::Text(text_body()),
        toast: None,
    }
}

fn call_state() -> ServerMsg {
    ServerMsg::CallState {
        call: CALL.to_owned(),
        conversation: CONVERSATION.to_owned(),
        direction: Direction::Outbound,
        state: CallState::Terminating,
        previous: CallState::Established,
        reason: Some(Reason::new(200, "Terminated remotely")),
    }
}

fn client_message() -> ClientMsg {
    ClientMsg::Message {
        rid: Some(17),
        call: CALL.to_owned(),
        content_type: "text/plain; charset=utf-8".to_owned(),
        body: Body::Text(text_body()),
    }
}

fn client_message_ack() -> ClientMsg {
    ClientMsg::MessageAck {
        call: CALL.to_owned(),
        msg: 42,
    }
}

/// The frame body (length prefix stripped) of `msg`, as its sender would write it.
fn body_of(msg: &impl serde::Serialize) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_frame(msg, &mut buf).expect("encodes");
    buf[LEN_PREFIX..].to_vec()
}

fn bench_codec(c: &mut Criterion) {
    let mut group = configure(c, "codec");
    group.throughput(Throughput::Elements(1));

    for (name, msg) in [
        ("encode_frame/message_received_100b", message_received()),
        ("encode_frame/call_state", call_state()),
    ] {
        // The outbox reuses one buffer per write batch, so the steady state has no allocation.
        let mut buf = BytesMut::with_capacity(1024);
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                encode_frame(black_box(&msg), &mut buf).expect("encodes");
                black_box(buf.len())
            })
        });
    }

    // What the node's outbox uses: hand-written for `call_state`, serde for the rest.
    let msg = call_state();
    let mut buf = BytesMut::with_capacity(1024);
    group.bench_function("encode_server_frame/call_state", |b| {
        b.iter(|| {
            buf.clear();
            confab_protocol::hot::encode_server_frame(black_box(&msg), &mut buf).expect("encodes");
            black_box(buf.len())
        })
    });

    for (name, msg) in [
        ("decode_client/message_100b", client_message()),
        ("decode_client/message_ack", client_message_ack()),
    ] {
        let body = body_of(&msg);
        assert_eq!(decode_client(&body).as_ref(), Ok(&msg));
        group.bench_function(name, |b| {
            b.iter(|| decode_client(black_box(&body)).expect("decodes"))
        });
    }

    // What a client reads for every message it sends or receives (hand-written since
    // 2026-12-03; anything unusual falls back to serde).
    let msg = message_received();
    let body = body_of(&msg);
    assert_eq!(decode_server(&body).as_ref(), Ok(&msg));
    group.bench_function("decode_server/message_received_100b", |b| {
        b.iter(|| decode_server(black_box(&body)).expect("decodes"))
    });
    // And what it writes: `message` by hand, as the client library and confab-bench do.
    let msg = client_message();
    let mut buf = BytesMut::with_capacity(1024);
    group.bench_function("encode_client_frame/message_100b", |b| {
        b.iter(|| {
            buf.clear();
            confab_protocol::hot::encode_client_frame(black_box(&msg), &mut buf).expect("encodes");
            black_box(buf.len())
        })
    });

    // One read's worth of frames: 64 `message` frames of ~150 bytes each.
    let frame_body = body_of(&client_message());
    let mut wire = BytesMut::with_capacity(FRAMES_PER_READ * (LEN_PREFIX + frame_body.len()));
    for _ in 0..FRAMES_PER_READ {
        wire.put_u32(u32::try_from(frame_body.len()).expect("small"));
        wire.extend_from_slice(&frame_body);
    }
    group.throughput(Throughput::Elements(FRAMES_PER_READ as u64));
    group.bench_function("frame_codec_decode/64_frames", |b| {
        let mut codec = FrameCodec::default();
        b.iter_batched_ref(
            || wire.clone(),
            |buf| {
                let mut frames = 0usize;
                while let Some(frame) = codec.decode(buf).expect("valid frames") {
                    black_box(&frame);
                    frames += 1;
                }
                assert_eq!(frames, FRAMES_PER_READ);
            },
            BatchSize::SmallInput,
        )
    });
    // Same buffer, each frame also decoded into a `ClientMsg`: the full inbound path.
    group.bench_function("frame_codec_decode+decode_client/64_frames", |b| {
        let mut codec = FrameCodec::default();
        b.iter_batched_ref(
            || wire.clone(),
            |buf| {
                while let Some(frame) = codec.decode(buf).expect("valid frames") {
                    black_box(decode_client(&frame).expect("decodes"));
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Establish, ring, answer, a failed transfer, hang up.
const OUTBOUND_LIFECYCLE: [CallEvent; 7] = [
    CallEvent::Establish,
    CallEvent::Ringing,
    CallEvent::Established,
    CallEvent::Transfer,
    CallEvent::TransferFailed,
    CallEvent::Terminate,
    CallEvent::TerminateCompleted,
];

/// Accept, established, a failed transfer, the remote side hangs up.
const INBOUND_LIFECYCLE: [CallEvent; 6] = [
    CallEvent::Accept,
    CallEvent::Established,
    CallEvent::Transfer,
    CallEvent::TransferFailed,
    CallEvent::RemoteTerminate,
    CallEvent::TerminateCompleted,
];

fn run_lifecycle(direction: Direction, events: &[CallEvent]) -> CallState {
    events
        .iter()
        .fold(direction.initial_state(), |state, &event| {
            transition(black_box(direction), black_box(state), black_box(event))
                .expect("legal transition")
        })
}

fn bench_state(c: &mut Criterion) {
    let mut group = configure(c, "state");
    for (name, direction, events) in [
        (
            "transition/outbound_lifecycle",
            Direction::Outbound,
            &OUTBOUND_LIFECYCLE[..],
        ),
        (
            "transition/inbound_lifecycle",
            Direction::Inbound,
            &INBOUND_LIFECYCLE[..],
        ),
    ] {
        assert_eq!(run_lifecycle(direction, events), CallState::Terminated);
        group.throughput(Throughput::Elements(events.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| run_lifecycle(black_box(direction), black_box(events)))
        });
    }
    group.finish();
}

fn bench_sdp(c: &mut Criterion) {
    let mut group = configure(c, "sdp");
    let accept_types = ["text/plain", "text/html", "application/json"];
    let max_size = Some(65_536);

    group.bench_function("build_offer", |b| {
        b.iter(|| sdp::build_offer(black_box(&accept_types), black_box(max_size)))
    });

    let offer = sdp::build_offer(&accept_types, max_size);
    let answer = sdp::build_answer(&offer, &["text/plain", "text/*"], Some(16_384))
        .expect("answerable offer");
    group.throughput(Throughput::Bytes(offer.len() as u64));
    group.bench_function("parse/offer", |b| {
        b.iter(|| sdp::parse(black_box(&offer)).expect("parses"))
    });
    group.throughput(Throughput::Bytes((offer.len() + answer.len()) as u64));
    group.bench_function("negotiate", |b| {
        b.iter(|| sdp::negotiate(black_box(&offer), black_box(&answer)).expect("negotiates"))
    });

    let negotiated = sdp::negotiate(&offer, &answer).expect("negotiates");
    group.throughput(Throughput::Elements(1));
    for (name, content_type, allowed) in [
        (
            "content_type_allowed/match_with_params",
            "text/plain; charset=utf-8",
            true,
        ),
        ("content_type_allowed/miss", "application/json", false),
    ] {
        assert_eq!(
            sdp::content_type_allowed(&negotiated.accept_types, content_type),
            allowed
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                sdp::content_type_allowed(
                    black_box(&negotiated.accept_types),
                    black_box(content_type),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_codec, bench_state, bench_sdp);
criterion_main!(benches);
