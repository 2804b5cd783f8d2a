//! [`Conversation`]: a group of calls (UCMA's class of the same name). The node creates
//! conversation ids, so a new conversation is unbound until its first call is created; ending
//! it ends every call in it.

use std::sync::{Arc, OnceLock};

use confab_protocol::ClientMsg;

use crate::call::InstantMessagingCall;
use crate::endpoint::{Endpoint, ok_reply};
use crate::error::ClientError;

/// A conversation of one endpoint; cheap to clone (clones share the binding).
///
/// Unlike UCMA's, a confab conversation lives on the node only while it holds a call (see
/// docs/protocol.md, "Where the contract is silent"): once its last call has ended, placing
/// another call in it fails with [`ClientError::Server`] `unknown_conversation`. Use a new
/// `Conversation` for a call placed after the previous ones ended.
#[derive(Clone)]
pub struct Conversation {
    endpoint: Endpoint,
    inner: Arc<ConversationInner>,
}

struct ConversationInner {
    id: OnceLock<String>,
    /// Held while the first call is being placed, so concurrent first calls share one id.
    binding: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Conversation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversation")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl Conversation {
    /// A new conversation on `endpoint`; the node assigns its id with its first call.
    pub fn new(endpoint: &Endpoint) -> Self {
        Self::with_id(endpoint, OnceLock::new())
    }

    pub(crate) fn bound(endpoint: &Endpoint, id: String) -> Self {
        Self::with_id(endpoint, OnceLock::from(id))
    }

    fn with_id(endpoint: &Endpoint, id: OnceLock<String>) -> Self {
        Conversation {
            endpoint: endpoint.clone(),
            inner: Arc::new(ConversationInner {
                id,
                binding: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The node's id of the conversation; `None` until its first call is created.
    pub fn id(&self) -> Option<&str> {
        self.inner.id.get().map(String::as_str)
    }

    /// The endpoint the conversation belongs to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The calls of this conversation that the endpoint holds now.
    pub fn calls(&self) -> Vec<InstantMessagingCall> {
        let Some(id) = self.id() else {
            return Vec::new();
        };
        self.endpoint
            .calls()
            .into_iter()
            .filter(|call| call.conversation_id() == id)
            .collect()
    }

    /// Terminates every call in the conversation. A conversation that never had a call has
    /// nothing to end.
    pub async fn terminate(&self) -> Result<(), ClientError> {
        let Some(id) = self.id() else {
            return Ok(());
        };
        let request = ClientMsg::ConversationTerminate {
            rid: None,
            conversation: id.to_owned(),
        };
        ok_reply(self.endpoint.connection().request(request).await?)
    }

    /// Serialises the binding of a new conversation; a no-op lock once it is bound.
    pub(crate) async fn binding(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        if self.id().is_some() {
            return None;
        }
        Some(self.inner.binding.lock().await)
    }

    pub(crate) fn bind(&self, id: String) {
        if self.inner.id.set(id).is_err() {
            tracing::debug!("conversation already bound");
        }
    }
}
