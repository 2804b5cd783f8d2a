//! Envelopes between nodes: publishing them (one task and one transport, so envelopes from
//! this node to another arrive in the order sent; see `transport/`), the bound on those clients' requests
//! drive ([`super::quota`]), and delivering received ones to the actors they address.

use super::*;
use crate::hot::{self, EventRef, HotEnvelope};
use crate::transport::Messages;
use confab_actors::link::RelayAsk;

impl Cluster {
    /// Publishes an envelope to `node`.
    pub fn send(&self, node: &str, env: &Envelope) {
        if let Some(payload) = encode(env) {
            self.send_payload(node, payload);
        }
    }

    /// Publishes an envelope encoded already to `node`.
    pub(crate) fn send_payload(&self, node: &str, payload: Bytes) {
        self.send_encoded(node, &payload, false);
    }

    /// Publishes an envelope encoded already to `node`; `bounded`: one a client's requests
    /// drive (see [`quota`]), not sent when `cluster.max_queued_envelopes` (or
    /// `max_queued_bytes`) already wait. False when it was not sent, and the caller answers
    /// for it. It is copied into the node's batch (`batch.rs`), so `payload` may be a buffer
    /// the caller reuses.
    pub(crate) fn send_encoded(&self, node: &str, payload: &[u8], bounded: bool) -> bool {
        if !bounded {
            return self.publish(&node_subject(node), payload, false);
        }
        if !self.quota.take(payload.len()) {
            return false;
        }
        self.publish_bounded(&node_subject(node), payload)
    }

    /// Queues an envelope whose place in the quota is taken; gives the place back when it
    /// cannot be queued.
    fn publish_bounded(&self, subject: &str, payload: &[u8]) -> bool {
        let sent = self.publish(subject, payload, true);
        if !sent {
            self.quota.release(payload.len());
        }
        sent
    }

    /// Publishes an envelope a client's requests drive (see [`quota`]) to `node`, unless
    /// `cluster.max_queued_envelopes` (or `max_queued_bytes`) already wait; false when it was
    /// not sent, and the caller answers for it.
    pub fn send_bounded(&self, node: &str, env: &Envelope) -> bool {
        self.reserve_bounded(node, env)
            .is_some_and(BoundedEnvelope::send)
    }

    /// Takes the place of a bounded envelope without sending it yet, for a sender that must
    /// set things up only once it knows the envelope will go (a fork's leg); None when the
    /// bound is reached. Dropped unsent, it gives its place back.
    pub fn reserve_bounded(&self, node: &str, env: &Envelope) -> Option<BoundedEnvelope<'_>> {
        self.reserve_bounded_payload(node, encode(env)?)
    }

    fn reserve_bounded_payload(&self, node: &str, payload: Bytes) -> Option<BoundedEnvelope<'_>> {
        if !self.quota.take(payload.len()) {
            return None;
        }
        Some(BoundedEnvelope {
            cluster: self,
            subject: node_subject(node),
            payload: Some(payload),
        })
    }

    /// Queues an envelope for the publisher, into the node's batch where it takes batches
    /// (`batch.rs`); false once the publisher has stopped (the node is leaving, and ends the
    /// calls itself). `bounded`: it holds a place in the quota, given back once published.
    pub(super) fn publish(&self, subject: &str, payload: &[u8], bounded: bool) -> bool {
        let batches = self.batching.takes(subject);
        if !self.outbound.push(subject, payload, batches, bounded) {
            return false;
        }
        m::hot().envelopes_out.increment(1);
        true
    }

    /// A leg's event for an endpoint on `node`; false when it was not sent. A
    /// `message_received` (not a toast, which is part of the call's set-up) and a
    /// `remote_composing{active:true}` are driven by the other client's flow: over the bound
    /// they are not sent (the sender's leg answers the message with 408 after the ack timeout;
    /// the leg keeps the notice off). Everything else, the `active:false` that ends a notice
    /// included, is never dropped here, and a state event for a node that acknowledges them is
    /// numbered with the next of `numbered` (the leg's count) and sent again until seen
    /// (`events.rs`).
    ///
    /// `call` is the call of the leg that sends it; it travels with an answer to a call
    /// request (see [`Envelope::Event`]).
    pub fn send_event(
        &self,
        node: &str,
        endpoint: &str,
        call: &str,
        msg: &ServerMsg,
        numbered: &AtomicU64,
    ) -> bool {
        // The frame's bytes as the client will get them: the hand-written encoder of the
        // node's frequent frames (`protocol/src/hot.rs`), not serde's (about ten times the
        // instructions for a `message_received`); the envelope carries the body, without the
        // length prefix.
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch { framed, payload } = scratch;
            framed.clear();
            if let Err(e) = confab_protocol::hot::encode_server_frame(msg, framed) {
                tracing::error!(error = %e, "cannot encode an event");
                return false;
            }
            let frame = &framed[confab_protocol::codec::LEN_PREFIX..];
            let answers_request = matches!(msg, ServerMsg::Ok { .. } | ServerMsg::Error { .. });
            let seq = (events::is_state_event(msg) && self.acks_events(node))
                .then(|| numbered.fetch_add(1, Ordering::Relaxed) + 1);
            let ev = EventRef {
                endpoint,
                frame,
                call: answers_request.then_some(call),
                from_node: &self.node_id,
                from_epoch: self.epoch(),
                seq,
            };
            payload.clear();
            hot::write_event(payload, &ev);
            if let Some(seq) = seq {
                // Kept to be sent again until seen: its own copy.
                self.send_state_event(node, call, seq, Bytes::copy_from_slice(payload));
                true
            } else {
                let bounded = is_bounded_event(msg);
                self.send_encoded(node, payload, bounded) || !bounded
            }
        })
    }

    pub(super) fn route(self: &Arc<Self>, env: Envelope) {
        m::hot().envelopes_in.increment(1);
        match env {
            // Batches are opened before routing (`route_payload`); one built here goes the same way.
            Envelope::Batch { envelopes } => {
                for one in envelopes {
                    route_payload(self, &one);
                }
            }
            Envelope::Event {
                endpoint,
                frame,
                call,
                from_node,
                from_epoch,
                seq,
            } => self.route_event(EventRef {
                endpoint: &endpoint,
                frame: &frame,
                call: call.as_deref(),
                from_node: &from_node,
                from_epoch,
                seq,
            }),
            Envelope::LegEnded {
                endpoint,
                call,
                conversation,
                elsewhere,
                from_node,
                from_epoch,
                reason,
            } if !self.is_dead(&from_node, from_epoch) => {
                match self.endpoints.get(endpoint.as_str()).map(|e| e.clone()) {
                    Some(ep) => ep.do_send(EndpointMsg::LegEnded {
                        call,
                        conversation,
                        elsewhere,
                        reason,
                    }),
                    // Nobody here holds it any more: release the leg. If the endpoint left
                    // while the call lasted, this end answers its `EndpointLost`.
                    None => {
                        self.lost_endpoint_answered(&call);
                        self.release_leg(call, endpoint);
                    }
                }
            }
            Envelope::LegEnded { from_node, .. } => {
                tracing::debug!(node = %from_node, "dropping a leg end from a run declared dead");
            }
            Envelope::Adopt {
                endpoint,
                leg_node,
                arbiter,
                call,
                conversation,
                from,
                offer,
                toast,
                immediate,
                from_epoch,
            } => {
                // A run not heard of yet is noted first: if it replaces one, the calls of the
                // one it replaces end here now, before this call is rung, and not with them
                // when the new run's heartbeat comes.
                if from_epoch.is_some_and(|epoch| {
                    self.is_dead(&leg_node, epoch) || !self.saw_node(&leg_node, epoch, false)
                }) {
                    tracing::debug!(node = %leg_node, "refusing a fork from a run declared dead or replaced");
                    self.send(&leg_node, &Envelope::ForkLost { arbiter, call });
                    return;
                }
                let fork = RemoteFork {
                    leg_node: leg_node.clone(),
                    arbiter: arbiter.clone(),
                    call: call.clone(),
                    conversation,
                    from,
                    offer,
                    toast,
                    immediate,
                    leg_epoch: from_epoch,
                };
                match self.endpoints.get(endpoint.as_str()).map(|e| e.clone()) {
                    Some(ep) => {
                        let guard =
                            confab_actors::endpoint::RemoteForkGuard::new(self.clone(), &fork);
                        ep.do_send(EndpointMsg::Adopt(fork, guard));
                    }
                    None => self.send(&leg_node, &Envelope::ForkLost { arbiter, call }),
                }
            }
            Envelope::Leg {
                call,
                reply_node,
                reply_endpoint,
                msg,
            } => self.route_leg(&call, &reply_node, &reply_endpoint, msg),
            Envelope::EventsSeen { call, upto } => self.events_seen(&call, upto),
            Envelope::ForkAdopted { arbiter, call } => {
                if let Some(a) = self.arbiters.get(&arbiter).map(|a| a.clone()) {
                    a.do_send(ArbiterMsg::ForkAdopted { call });
                }
            }
            Envelope::ForkLost { arbiter, call } => {
                if let Some(a) = self.arbiters.get(&arbiter).map(|a| a.clone()) {
                    a.do_send(ArbiterMsg::ForkLost { call });
                }
            }
            Envelope::DirectorySync {
                from_node,
                token,
                upto,
            } => self.answer_directory_sync(from_node, token, upto),
            Envelope::DirectorySynced { from_node, token } => {
                self.directory_synced(&from_node, token);
            }
            Envelope::Rejoin { epoch, above } => {
                if epoch == self.epoch() {
                    self.rejoin(above);
                }
            }
            Envelope::AdminQuery {
                from_node,
                token,
                query,
            } => self.answer_admin_query(from_node, token, &query),
            Envelope::AdminAnswer {
                from_node,
                token,
                answer,
            } => self.admin_answered(from_node, token, &answer),
            Envelope::ResumeRelay {
                from_node,
                relay,
                endpoint,
                user,
                rid,
                token,
                seen,
                sent,
            } => self.resume_relayed(
                from_node,
                relay,
                RelayAsk {
                    endpoint,
                    user,
                    rid,
                    token,
                    seen,
                    sent,
                },
            ),
            Envelope::RelayOut { relay, seq, bytes } => self.relayed_out(relay, seq, bytes),
            Envelope::RelayOutEnd { relay } => self.relayed_out_end(relay),
            Envelope::RelayIn {
                endpoint,
                from_node,
                relay,
                seq,
                frames,
            } => self.tell_endpoint(
                &endpoint,
                EndpointMsg::Relayed {
                    from: from_node,
                    relay,
                    seq,
                    frames: frames
                        .into_iter()
                        .map(|f| Bytes::from(f.into_vec()))
                        .collect(),
                },
            ),
            Envelope::RelayInEnd {
                endpoint,
                from_node,
                relay,
            } => self.tell_endpoint(
                &endpoint,
                EndpointMsg::RelayEnded {
                    from: from_node,
                    relay,
                },
            ),
        }
    }

    /// Hands `msg` to the endpoint `endpoint` here, if it is still here (a relayed session's
    /// frames or end for an endpoint gone since are dropped: nobody waits for them).
    fn tell_endpoint(&self, endpoint: &str, msg: EndpointMsg) {
        if let Some(ep) = self.endpoints.get(endpoint).map(|e| e.clone()) {
            ep.do_send(msg);
        }
    }

    /// Tells the leg of `call` on another node that `endpoint` here does not hold it (any
    /// more), so it can stop: without a holder nothing else would release it.
    pub fn release_leg(&self, call: String, endpoint: String) {
        if let Some(node) = self.leg_node_hint(&call).filter(|n| *n != self.node_id) {
            self.send(
                &node,
                &Envelope::Leg {
                    call,
                    reply_node: self.node_id.clone(),
                    reply_endpoint: endpoint,
                    msg: WireLegMsg::Release,
                },
            );
        }
    }

    /// A leg's event for an endpoint here. A `message_received` (never numbered: it is not a
    /// state event) goes to the endpoint as the leg's node encoded it, for its client as it
    /// is; anything else is decoded for the endpoint to act on.
    fn route_event(&self, ev: EventRef<'_>) {
        if self.is_dead(ev.from_node, ev.from_epoch) {
            tracing::debug!(node = %ev.from_node, "dropping an event from a run declared dead");
            return;
        }
        // Read before the map is: its shard stays locked only while the message is queued.
        let msg = if ev.seq.is_none()
            && let Some(call) = confab_protocol::peek::message_received_call(ev.frame)
        {
            EndpointMsg::RemoteFrame {
                call: call.to_owned(),
                frame: Bytes::copy_from_slice(ev.frame),
            }
        } else {
            match decode_server(ev.frame) {
                Ok(msg) => EndpointMsg::RemoteEvent {
                    msg,
                    call: ev.call.map(str::to_owned),
                    seq: ev.seq,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "dropping an unreadable remote event");
                    return;
                }
            }
        };
        // Sent to under the map's read guard: cloning the address out and dropping it (two
        // shared counters each way) was 3% of the receiving node's work. `do_send` only queues.
        if let Some(ep) = self.endpoints.get(ev.endpoint) {
            ep.do_send(msg);
        }
    }

    /// An endpoint's request for a leg here (or, gone, the one answer it is owed).
    fn route_leg(&self, call: &str, reply_node: &str, reply_endpoint: &str, msg: WireLegMsg) {
        // Sent to under the map's read guard, as in `route_event`.
        if let Some(leg) = self.legs.get(call) {
            leg.value().1.do_send(msg.into_leg_msg());
            return;
        }
        self.leg_missing(call, reply_node, reply_endpoint, msg);
    }

    /// The node of a leg, from its id (ids start with their node's id).
    pub(super) fn leg_node_hint(&self, call: &str) -> Option<String> {
        call.split_once('.').map(|(n, _)| n.to_owned())
    }

    /// A request for a leg that is gone: the one answer it is owed.
    pub(super) fn leg_missing(&self, call: &str, node: &str, endpoint: &str, msg: WireLegMsg) {
        let reply = match msg {
            WireLegMsg::Message { rid, .. } => ServerMsg::MessageFailed {
                rid,
                call: call.to_owned(),
                msg: None,
                code: 481,
                text: confab_actors::reasons::CALL_DOES_NOT_EXIST.to_owned(),
            },
            WireLegMsg::Terminate {
                rid,
                cause: confab_actors::call::leg::TerminateCause::Call,
            } => ServerMsg::Ok { rid },
            WireLegMsg::Accept { rid, .. }
            | WireLegMsg::Decline { rid, .. }
            | WireLegMsg::Forward { rid, .. }
            | WireLegMsg::Transfer { rid, .. } => ServerMsg::error(
                rid,
                confab_protocol::ErrorCode::InvalidState,
                "the call is over",
            ),
            // The leg answers an `EndpointLost` with its end; gone, its node does.
            WireLegMsg::EndpointLost => {
                self.send(
                    node,
                    &Envelope::LegEnded {
                        endpoint: endpoint.to_owned(),
                        call: call.to_owned(),
                        conversation: String::new(),
                        elsewhere: false,
                        from_node: self.node_id.clone(),
                        from_epoch: self.epoch(),
                        reason: None,
                    },
                );
                return;
            }
            _ => return,
        };
        // An answer, never a state event: nothing to number.
        self.send_event(node, endpoint, call, &reply, &AtomicU64::default());
    }
}

/// An envelope holding its place in [`Cluster::quota`], ready to go (see
/// [`Cluster::reserve_bounded`]).
pub struct BoundedEnvelope<'a> {
    cluster: &'a Cluster,
    subject: String,
    /// Taken when sent; still here on drop means unsent, and the place is given back.
    payload: Option<Bytes>,
}

impl BoundedEnvelope<'_> {
    /// Queues it; false if the publisher has stopped.
    pub fn send(mut self) -> bool {
        let Some(payload) = self.payload.take() else {
            return false;
        };
        self.cluster.publish_bounded(&self.subject, &payload)
    }
}

impl Drop for BoundedEnvelope<'_> {
    fn drop(&mut self) {
        if let Some(payload) = self.payload.take() {
            self.cluster.quota.release(payload.len());
        }
    }
}

/// What every node's inbox subject starts with.
pub(crate) const NODE_SUBJECT_PREFIX: &str = "confab.node.";

pub(super) fn node_subject(node: &str) -> String {
    // Not `format!`: this is on every envelope's path, and the formatting machinery was 2-3%
    // of a node's work across nodes.
    [NODE_SUBJECT_PREFIX, node].concat()
}

/// Whether a leg's event for a client is driven by the other client's flow, and so bounded
/// (see [`Cluster::send_event`]).
pub(crate) fn is_bounded_event(msg: &ServerMsg) -> bool {
    matches!(
        msg,
        ServerMsg::MessageReceived { toast: None, .. }
            | ServerMsg::RemoteComposing { active: true, .. }
    )
}

/// Buffers each thread encodes its hot envelopes in before they are copied into their batch
/// (`batch.rs`), so that an envelope costs no allocation of its own: an event's frame and its
/// envelope, or a leg message's envelope.
pub(crate) struct Scratch {
    pub framed: bytes::BytesMut,
    pub payload: Vec<u8>,
}

thread_local! {
    pub(crate) static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch {
        framed: bytes::BytesMut::with_capacity(1024),
        payload: Vec::with_capacity(1024),
    });
}

/// About how many bytes `env` takes encoded: its buffer is made that large at once (growing a
/// buffer while encoding, and copying it each time, was a tenth of a node's time across nodes).
/// Room for an envelope's fields besides its largest (bytes): ids, node, epoch, keys.
const ENVELOPE_HINT: usize = 160;

fn size_hint(env: &Envelope) -> usize {
    ENVELOPE_HINT
        + match env {
            Envelope::Event { frame, .. } => frame.len(),
            Envelope::RelayOut { bytes, .. } => bytes.len(),
            Envelope::RelayIn { frames, .. } => frames.iter().map(|f| f.len() + 5).sum(),
            Envelope::AdminQuery { query, .. } => query.len(),
            Envelope::AdminAnswer { answer, .. } => answer.len(),
            _ => 0,
        }
}

pub(super) fn encode(env: &Envelope) -> Option<Bytes> {
    let mut buf = Vec::with_capacity(size_hint(env));
    match rmp_serde::encode::write_named(&mut buf, env).map(|()| buf) {
        Ok(bytes) => Some(Bytes::from(bytes)),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an envelope");
            None
        }
    }
}

/// The publisher: hands everything queued to the transport, in order, batch by batch
/// (`batch.rs`), and gives back the quota's places once each is handed over.
pub(super) async fn publish_loop(
    transport: Arc<dyn Transport>,
    outbound: Arc<batch::Outbound>,
    quota: Arc<EnvelopeQuota>,
) {
    // Dropped with the task when the runtime stops: what is queued gives its places back, and
    // later envelopes are refused, not queued for nobody.
    struct Stopped(Arc<batch::Outbound>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _stopped = Stopped(outbound.clone());
    loop {
        // Dropped unfinished (the runtime stopping mid-publish), it gives back the places of
        // what it had not handed over.
        let mut taken = outbound.next().await;
        for item in &mut taken {
            let (subject, payload, places) = match item {
                batch::Item::One {
                    subject,
                    payload,
                    bounded,
                } => (subject, payload, bounded),
                batch::Item::Batch(b) => {
                    if b.len() > 1 {
                        metrics::counter!(m::CLUSTER_BATCHED_ENVELOPES).increment(b.len() as u64);
                    }
                    let places = b.bounded;
                    let (subject, payload) = b.into_message();
                    (subject, payload, places)
                }
                batch::Item::Flush(done) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), transport.flush()).await;
                    let _ = done.send(());
                    continue;
                }
            };
            let published = transport.publish(subject, payload).await;
            // Given back whether it went or not: it no longer waits.
            if places.envelopes > 0 {
                quota.release_many(places.envelopes, places.bytes);
            }
            if let Err(e) = published {
                tracing::warn!(error = %e, "cannot publish to the other nodes");
            }
        }
    }
}

/// A batch as received: its envelopes borrowed from the payload, not copied out of it.
#[derive(serde::Deserialize)]
enum BatchRef<'a> {
    Batch {
        #[serde(borrow)]
        envelopes: Vec<&'a serde_bytes::Bytes>,
    },
}

/// What every batch's payload starts with: a map of one entry, its key the str "Batch".
const BATCH_PREFIX: &[u8] = b"\x81\xa5Batch";

fn route_payload(cluster: &Arc<Cluster>, payload: &[u8]) {
    // A node with links reads sender tags in its inbox (`direct/order.rs`, rule 8); one
    // without may still get a tagged envelope from a node that had not yet heard that its
    // new run takes no links: read the envelope (one tag only: not recursively, so a payload
    // of nested tags costs no stack).
    let payload = match crate::direct::order::untag(payload) {
        Some((_, start)) => &payload[start..],
        None => payload,
    };
    if payload.starts_with(BATCH_PREFIX)
        && let Ok(BatchRef::Batch { envelopes }) = rmp_serde::from_slice::<BatchRef>(payload)
    {
        for one in envelopes {
            route_payload(cluster, one);
        }
        return;
    }
    // The envelopes of a cross-node message, read in place; anything else through serde.
    if let Some(env) = hot::read(payload) {
        m::hot().envelopes_in.increment(1);
        match env {
            HotEnvelope::Event(ev) => cluster.route_event(ev),
            HotEnvelope::Leg(leg) => {
                cluster.route_leg(leg.call, leg.reply_node, leg.reply_endpoint, leg.msg)
            }
        }
        return;
    }
    match rmp_serde::from_slice::<Envelope>(payload) {
        // A batch inside a batch is never sent; one that came anyway is read as a whole.
        Ok(Envelope::Batch { envelopes }) => {
            for one in envelopes {
                route_payload(cluster, &one);
            }
        }
        Ok(env) => cluster.route(env),
        Err(e) => tracing::warn!(error = %e, "dropping an unreadable envelope"),
    }
}

pub(super) async fn inbox_loop(cluster: Arc<Cluster>, mut inbox: Messages) {
    while let Some(payload) = inbox.next().await {
        route_payload(&cluster, &payload);
    }
    tracing::error!("the inbox subscription ended");
}
