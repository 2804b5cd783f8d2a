//! What every actor of a node shares: settings, the id minter, the directory, presence and the
//! token verifier. Built once at start-up and handed around behind an `Arc`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::address_limits::AddressLimits;
use crate::auth::Verifier;
use crate::directory::Directory;
use crate::ids::IdGen;
use crate::link::Link;
use crate::presence::PresenceShards;
use crate::settings::Settings;
use crate::tls::ServerTls;

pub struct NodeCtx {
    pub settings: Settings,
    pub node_id: String,
    pub ids: IdGen,
    pub directory: Arc<dyn Directory>,
    pub presence: PresenceShards,
    pub verifier: Arc<Verifier>,
    /// Set when the node is part of a cluster: how its actors reach the other nodes'.
    pub link: Option<Arc<dyn Link>>,
    /// Set when the client port speaks TLS (`[tls]`).
    pub tls: Option<Arc<ServerTls>>,
    /// Connections and new connections per source address (checked in the accept loop).
    pub address_limits: Arc<AddressLimits>,
    /// `server.proxy_trusted_from`, parsed (validated with the settings).
    pub proxy_trusted_from: Vec<ipnet::IpNet>,
    draining: AtomicBool,
}

pub type Ctx = Arc<NodeCtx>;

impl NodeCtx {
    pub fn new(
        settings: Settings,
        directory: Arc<dyn Directory>,
        presence: PresenceShards,
        link: Option<Arc<dyn Link>>,
        tls: Option<Arc<ServerTls>>,
        verifier: Arc<Verifier>,
    ) -> Self {
        let node_id = link.as_ref().map_or_else(
            || settings.server.node_id.clone(),
            |l| l.node_id().to_owned(),
        );
        NodeCtx {
            ids: IdGen::new(&node_id),
            verifier,
            node_id,
            directory,
            presence,
            link,
            tls,
            address_limits: Arc::new(AddressLimits::new(&settings.limits)),
            proxy_trusted_from: settings
                .server
                .proxy_trusted_from
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            settings,
            draining: AtomicBool::new(false),
        }
    }

    /// True once a graceful shutdown started: no new sign-ins.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}
