//! Sessions resumed through another node (`confab_actors::relay`), as envelopes. On the
//! client's node a relay is an id and the channel its client's writer reads; `ResumeRelay`
//! asks the holding node to take the session back, `RelayIn` carries the client's frames
//! there, `RelayOut` brings back what the endpoint's writer writes. Both directions are
//! numbered: envelopes between two nodes arrive in order, so a gap means some were lost (an
//! envelope dropped by NATS), and the relay ends rather than skip frames; the client then
//! resumes again, and the counting of docs/protocol.md §3 makes up for what was lost.

use super::*;
use bytes::BytesMut;
use confab_actors::endpoint::{Attach, Resume};
use confab_actors::link::{Link, RelayAsk, RelayDown, RelayDownRx};
use confab_actors::outbox::write_loop;
use confab_actors::refusal::{Refusal, ResumeRefusal};
use confab_actors::relay::RelayWriter;

/// A relay of this node's: where its session is held, and what waits for its client.
pub(super) struct Relay {
    node: String,
    next_seq: u64,
    down: mpsc::UnboundedSender<RelayDown>,
}

impl Cluster {
    /// On the client's node: asks `node` to take `ask`'s session back through a new relay.
    pub(super) fn open_relay(&self, node: &str, ask: RelayAsk) -> Option<(u64, RelayDownRx)> {
        if self.leaving.load(Ordering::Acquire) {
            return None;
        }
        let relay = self.next_relay.fetch_add(1, Ordering::Relaxed);
        let (down, rx) = mpsc::unbounded_channel();
        self.relays.insert(
            relay,
            Relay {
                node: node.to_owned(),
                next_seq: 1,
                down,
            },
        );
        self.send(
            node,
            &Envelope::ResumeRelay {
                from_node: self.node_id.clone(),
                relay,
                endpoint: ask.endpoint,
                user: ask.user,
                rid: ask.rid,
                token: ask.token,
                seen: ask.seen,
                sent: ask.sent,
            },
        );
        Some((relay, rx))
    }

    pub(super) fn relay_up(
        &self,
        node: &str,
        endpoint: &str,
        relay: u64,
        seq: u64,
        frames: Vec<Bytes>,
    ) -> bool {
        self.send_bounded(
            node,
            &Envelope::RelayIn {
                endpoint: endpoint.to_owned(),
                from_node: self.node_id.clone(),
                relay,
                seq,
                frames: frames
                    .into_iter()
                    .map(|f| serde_bytes::ByteBuf::from(f.to_vec()))
                    .collect(),
            },
        )
    }

    pub(super) fn relay_up_end(&self, node: &str, endpoint: &str, relay: u64) {
        self.send(
            node,
            &Envelope::RelayInEnd {
                endpoint: endpoint.to_owned(),
                from_node: self.node_id.clone(),
                relay,
            },
        );
    }

    pub(super) fn close_relay(&self, relay: u64) {
        self.relays.remove(&relay);
    }

    /// Whether `node` was heard within the node timeout.
    pub(super) fn node_alive(&self, node: &str) -> bool {
        node == self.node_id || lock(&self.nodes).contains_key(node)
    }

    /// Relays to `node` (to every node with `None`: this node is cut off) end: their clients'
    /// connections close, and the clients resume again.
    pub(super) fn end_relays_to(&self, node: Option<&str>) {
        self.relays.retain(|_, r| {
            let ends = node.is_none_or(|n| n == r.node);
            if ends {
                let _ = r.down.send(RelayDown::End);
            }
            !ends
        });
    }

    /// On the client's node: bytes from the holding node for relay `relay`'s client.
    pub(super) fn relayed_out(&self, relay: u64, seq: u64, bytes: Vec<u8>) {
        let Some(mut r) = self.relays.get_mut(&relay) else {
            return;
        };
        if r.next_seq != seq {
            tracing::warn!(
                relay,
                seq,
                expected = r.next_seq,
                "relayed bytes lost between the nodes; ending the relay"
            );
            let _ = r.down.send(RelayDown::End);
            drop(r);
            self.relays.remove(&relay);
            return;
        }
        r.next_seq += 1;
        let _ = r.down.send(RelayDown::Bytes(Bytes::from(bytes)));
    }

    pub(super) fn relayed_out_end(&self, relay: u64) {
        if let Some((_, r)) = self.relays.remove(&relay) {
            let _ = r.down.send(RelayDown::End);
        }
    }

    /// On the holding node: a client resumed `endpoint`'s session on `from_node`. The endpoint
    /// checks it as its own resume; taken back, its writer writes to the relay from then on.
    pub(super) fn resume_relayed(self: &Arc<Self>, from_node: String, relay: u64, ask: RelayAsk) {
        let endpoint = self.endpoints.get(ask.endpoint.as_str()).map(|e| e.clone());
        let cluster = self.clone();
        self.rt.spawn(async move {
            let rid = ask.rid;
            let taken = match endpoint {
                None => Err(ResumeRefusal::Unknown),
                Some(ep) => ep
                    .send(Resume {
                        rid,
                        user: ask.user,
                        token: ask.token,
                        seen: ask.seen,
                        sent: ask.sent,
                        conn: Attach::Relay {
                            node: from_node.clone(),
                            relay,
                        },
                    })
                    .await
                    .unwrap_or(Err(ResumeRefusal::Unknown)),
            };
            let label = taken.as_ref().map_or_else(|why| why.label(), |_| "ok");
            metrics::counter!(m::RESUMES, "result" => label).increment(1);
            let link: Arc<dyn Link> = cluster.clone();
            let mut writer = RelayWriter::new(link, from_node, relay);
            match taken {
                Ok(rx) => write_loop(rx, writer).await,
                Err(why) => {
                    tracing::info!(endpoint = %ask.endpoint, result = why.label(), "relayed resume refused");
                    let mut buf = BytesMut::new();
                    let refusal = Refusal::Resume(why).reply(rid);
                    if confab_protocol::hot::encode_server_frame(&refusal, &mut buf).is_ok() {
                        use tokio::io::AsyncWriteExt;
                        let _ = writer.write_all(&buf).await;
                    }
                }
            }
        });
    }
}
