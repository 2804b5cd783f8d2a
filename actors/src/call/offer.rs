//! A call's SDP offer as its legs and forks share it: the text (which every fork's
//! `call_incoming` carries) and its message media, parsed at most once, when first asked for
//! (the caller's leg checks it before it rings anyone), so neither a fork's accept nor a
//! second look parses the offer again. Cloning shares, not copies.

use confab_protocol::sdp::{self, MessageMedia, Negotiated, SdpError};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone)]
pub struct CallOffer(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    sdp: String,
    media: OnceLock<Result<MessageMedia, SdpError>>,
}

impl CallOffer {
    /// An offer, parsed when its media is first needed.
    pub fn new(sdp: String) -> Self {
        CallOffer(Arc::new(Inner {
            sdp,
            media: OnceLock::new(),
        }))
    }

    pub fn sdp(&self) -> &str {
        &self.0.sdp
    }

    /// The offer's usable message media, or why it has none (parsed on the first call).
    pub fn media(&self) -> Result<&MessageMedia, &SdpError> {
        self.0
            .media
            .get_or_init(|| sdp::offer_media(&self.0.sdp))
            .as_ref()
    }

    /// Checks `answer` against this offer; what the call may carry.
    pub fn negotiate(&self, answer: &str) -> Result<Negotiated, SdpError> {
        sdp::negotiate_offered(self.media().map_err(Clone::clone)?, answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_offer_negotiates_as_the_text_does() -> Result<(), SdpError> {
        let offer = sdp::build_offer(&["text/plain", "text/html"], Some(4096));
        let answer = sdp::build_answer(&offer, &["text/plain"], Some(1024))?;
        let shared = CallOffer::new(offer.clone());
        assert_eq!(
            shared.media().cloned(),
            sdp::offer_media(&offer).as_ref().cloned()
        );
        // Once parsed, and again from the kept media: both as `sdp::negotiate` answers.
        for _ in 0..2 {
            assert_eq!(shared.negotiate(&answer), sdp::negotiate(&offer, &answer));
            let wider = sdp::build_offer(&["image/png"], None);
            assert_eq!(shared.negotiate(&wider), sdp::negotiate(&offer, &wider));
        }
        let bad = CallOffer::new("v=1\r\n".to_owned());
        assert!(bad.media().is_err());
        assert_eq!(bad.negotiate(&answer), sdp::negotiate("v=1\r\n", &answer));
        Ok(())
    }
}
