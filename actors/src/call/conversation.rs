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
    calls: IdMap<String, LegRef>,
}

impl Actor for Conversation {
    type Context = Context<Self>;
}

impl Handler<ConversationMsg> for Conversation {
    type Result = ();

    fn handle(&mut self, msg: ConversationMsg, ctx: &mut Context<Self>) {
        match msg {
            ConversationMsg::Add { call, leg } => {
                self.calls.insert(call, leg);
            }
            ConversationMsg::Remove { call } => {
                self.calls.remove(&call);
                if self.calls.is_empty() {
                    ctx.stop();
                }
            }
            ConversationMsg::Terminate => {
                for leg in self.calls.values() {
                    leg.do_send(LegMsg::Terminate {
                        rid: None,
                        cause: TerminateCause::Conversation,
                    });
                }
            }
        }
    }
}
