//! A conversation: the group of one endpoint's calls that UCMA terminates together. It exists
//! while it holds a call; terminating it terminates each of its calls (the UCMA cascade).

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

#[derive(Default)]
pub struct Conversation {
    /// Each call's leg, and whether it has been asked to terminate already: a client may repeat
    /// `conversation_terminate` at will, and while a leg on another node cannot report its end
    /// (NATS away) each repeat would queue another envelope for it.
    calls: IdMap<String, (LegRef, bool)>,
}

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
