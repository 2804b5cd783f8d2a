//! A call's SDP offer as its legs and forks share it: the text (which every fork's
//! `call_incoming` carries) and, once the node has parsed it, its message media, so a fork's
//! accept checks the answer without parsing the offer again. Cloning shares, not copies.

use confab_protocol::sdp::{self, MessageMedia, Negotiated, SdpError};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct CallOffer(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    sdp: String,
    media: Option<MessageMedia>,
}

impl CallOffer {
    /// An offer whose message media the caller's leg has already checked.
    pub fn parsed(sdp: String, media: MessageMedia) -> Self {
        CallOffer(Arc::new(Inner {
            sdp,
            media: Some(media),
        }))
    }

    /// An offer not parsed yet (a caller's before its leg checks it, one from another node, a
    /// transferee's SDP); it is parsed when an answer is checked against it.
    pub fn unparsed(sdp: String) -> Self {
        CallOffer(Arc::new(Inner { sdp, media: None }))
    }

    pub fn sdp(&self) -> &str {
        &self.0.sdp
    }

    /// Checks `answer` against this offer; what the call may carry.
    pub fn negotiate(&self, answer: &str) -> Result<Negotiated, SdpError> {
        match &self.0.media {
            Some(media) => sdp::negotiate_offered(media, answer),
            None => sdp::negotiate(&self.0.sdp, answer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_and_unparsed_offers_negotiate_alike() -> Result<(), SdpError> {
        let offer = sdp::build_offer(&["text/plain", "text/html"], Some(4096));
        let answer = sdp::build_answer(&offer, &["text/plain"], Some(1024))?;
        let parsed = CallOffer::parsed(offer.clone(), sdp::offer_media(&offer)?);
        let unparsed = CallOffer::unparsed(offer);
        assert_eq!(parsed.negotiate(&answer)?, unparsed.negotiate(&answer)?);
        let wider = sdp::build_offer(&["image/png"], None);
        assert_eq!(parsed.negotiate(&wider), unparsed.negotiate(&wider));
        Ok(())
    }
}
