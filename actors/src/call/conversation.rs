//! A conversation: the group of one endpoint's calls that UCMA terminates together. It exists
//! while it holds a call; terminating it terminates each of its calls (the UCMA cascade). Its
//! endpoint starts it with its first call and stops it by dropping its address with the last
//! one, so a conversation of one call is sent no message unless it is terminated.

use actix::prelude::*;

use crate::call::leg::{LegMsg, TerminateCause};
use crate::ids::IdMap;
use crate::route::LegRef;

#[derive(Message)]
#[rtype(result = "()")]
pub enum ConversationMsg {
    Add {
        call: String,
        leg: LegRef,
    },
    Remove {
        call: String,
    },
    /// `conversation_terminate` (the endpoint already answered `ok`).
    Terminate,
}

pub struct Conversation {
    /// Each call's leg, and whether it has been asked to terminate already: a client may repeat
    /// `conversation_terminate` at will, and while a leg on another node cannot report its end
    /// (NATS away) each repeat would queue another envelope for it.
    calls: IdMap<String, (LegRef, bool)>,
}

impl Conversation {
    /// A conversation with its first call in it.
    pub fn with(call: String, leg: LegRef) -> Self {
        let mut calls = IdMap::default();
        calls.insert(call, (leg, false));
        Conversation { calls }
    }
}

// No timers and no spawned futures here: actix stops an actor whose addresses are all dropped
// only when nothing else runs in its context, and the endpoint relies on that to stop a
// conversation with its last call; anything that kept the context busy would leak one actor per
// call.
impl Actor for Conversation {
    type Context = Context<Self>;
}

impl Handler<ConversationMsg> for Conversation {
    type Result = ();

    fn handle(&mut self, msg: ConversationMsg, ctx: &mut Context<Self>) {
        match msg {
            ConversationMsg::Add { call, leg } => {
                self.calls.insert(call, (leg, false));
            }
            ConversationMsg::Remove { call } => {
                self.calls.remove(&call);
                if self.calls.is_empty() {
                    ctx.stop();
                }
            }
            ConversationMsg::Terminate => {
                for (leg, asked) in self.calls.values_mut() {
                    if !*asked {
                        *asked = true;
                        leg.do_send(LegMsg::Terminate {
                            rid: None,
                            cause: TerminateCause::Conversation,
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoint stops a conversation by dropping its address with its last call (it sends
    /// no message then); actix must then stop it, or every call would leak one actor.
    #[test]
    fn a_conversation_stops_once_its_address_is_dropped() {
        let system = actix::System::new();
        let stopped = system.block_on(async {
            let addr = Conversation {
                calls: IdMap::default(),
            }
            .start();
            let weak = addr.downgrade();
            drop(addr);
            // It stops on one of its next polls; yield until it has, a bounded number of times.
            for _ in 0..1000 {
                if weak.upgrade().is_none() {
                    return true;
                }
                actix_rt::task::yield_now().await;
            }
            false
        });
        assert!(stopped, "the conversation is still running");
    }
}
