//! The calls an endpoint currently holds, by call id: how the dispatcher finds the call object
//! an event is about. A call enters when the node first names it (the `call_created` reply or
//! the `call_incoming` event) and leaves at `terminated`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::call::CallInner;
use crate::sync::lock;

#[derive(Default)]
pub(crate) struct Registry {
    calls: Mutex<HashMap<String, Arc<CallInner>>>,
}

impl Registry {
    pub(crate) fn insert(&self, call: Arc<CallInner>) {
        let previous = lock(&self.calls).insert(call.id.clone(), call);
        if let Some(previous) = previous {
            // Ids are unique across the cluster; a repeat is a node bug, and the newer leg is
            // the one events will be about.
            tracing::warn!(call = %previous.id, "the node reused a call id");
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<CallInner>> {
        lock(&self.calls).get(id).cloned()
    }

    pub(crate) fn remove(&self, id: &str) {
        lock(&self.calls).remove(id);
    }

    pub(crate) fn all(&self) -> Vec<Arc<CallInner>> {
        lock(&self.calls).values().cloned().collect()
    }

    pub(crate) fn drain(&self) -> Vec<Arc<CallInner>> {
        lock(&self.calls).drain().map(|(_, call)| call).collect()
    }
}
