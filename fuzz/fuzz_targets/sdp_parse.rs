//! SDP: `parse`, `offer_media`, `negotiate`, `build_answer` and `build_offer` on split input.
//!
//! Input layout: byte 0 picks where the rest is split into an offer and an answer (and which
//! supported set and max-size our side uses); the two halves are UTF-8 (lossily). Besides
//! "never panics":
//! - an answer we build to an offer is itself valid SDP and negotiates with that offer;
//! - an offer we build from arbitrary content types parses and has usable message media;
//! - what `negotiate` accepts only lists valid, offered content types.
#![no_main]

use confab_protocol::sdp::{self, build_answer, build_offer, negotiate, offer_media, parse};
use libfuzzer_sys::fuzz_target;

const SUPPORTED: &[&[&str]] = &[
    &["text/plain"],
    &["*"],
    &["text/*", "application/json"],
    &["text/plain", "text/html", "image/png"],
];

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else {
        return;
    };
    let split = if rest.is_empty() {
        0
    } else {
        usize::from(*pick) * rest.len() / 256
    };
    let offer = String::from_utf8_lossy(&rest[..split]);
    let answer = String::from_utf8_lossy(&rest[split..]);

    let parsed = parse(&offer);
    let media = offer_media(&offer);
    if media.is_ok() {
        assert!(parsed.is_ok(), "offer_media accepted what parse refused");
    }
    let _ = parse(&answer);

    if let Ok(n) = negotiate(&offer, &answer) {
        let offered = media
            .as_ref()
            .expect("negotiate accepted an unusable offer");
        assert!(!n.accept_types.is_empty());
        for t in &n.accept_types {
            // Whatever negotiated is allowed is also allowed by the offer's own list.
            if sdp::content_type_allowed(std::slice::from_ref(t), t) {
                assert!(sdp::content_type_allowed(&offered.accept_types, t));
            }
        }
        if let (Some(a), Some(b)) = (offered.max_size, n.max_size) {
            assert!(b <= a);
        }
    }

    let supported = SUPPORTED[usize::from(*pick) % SUPPORTED.len()];
    let max_size = (pick & 1 == 1).then_some(u64::from(*pick) * 1000);
    if let Ok(ours) = build_answer(&offer, supported, max_size) {
        parse(&ours).expect("our answer parses");
        negotiate(&offer, &ours).expect("our answer negotiates with the offer it answers");
    }

    // Arbitrary words as accept-types: the offer we build is always usable.
    let types: Vec<&str> = answer.split([' ', '\n']).take(16).collect();
    let built = build_offer(&types, max_size);
    offer_media(&built).expect("our offer is usable");
});
