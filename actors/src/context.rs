//! What every actor of a node shares: settings, the id minter, the directory, presence and the
//! token verifier. Built once at start-up and handed around behind an `Arc`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
    /// What a reload changes: the live settings and the files the settings name (the TLS
    /// certificate, the token keys, the admin token).
    pub reloadables: Arc<crate::reload::Reloadables>,
    /// Cancelled to stop the node from within (the end of an admin drain).
    stop_requested: tokio_util::sync::CancellationToken,
    /// When the node started (the admin API's uptime).
    pub started: std::time::Instant,
    /// Call legs on this node now (the admin API's status).
    legs: AtomicUsize,
    /// Resumable sessions whose window ended lately (to word a late resume's refusal).
    pub expired_sessions: crate::endpoint::ExpiredSessions,
    /// The endpoints' heartbeat check: one sweep for the node (`heartbeat.rs`).
    pub heartbeats: Arc<crate::heartbeat::Heartbeats>,
}

pub type Ctx = Arc<NodeCtx>;

impl NodeCtx {
    pub fn new(
        settings: Settings,
        directory: Arc<dyn Directory>,
        presence: PresenceShards,
        link: Option<Arc<dyn Link>>,
        reloadables: Arc<crate::reload::Reloadables>,
    ) -> Self {
        let tls = reloadables.tls.clone();
        let heartbeats = crate::heartbeat::Heartbeats::new(settings.heartbeat());
        let verifier = reloadables.verifier.clone();
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
            reloadables,
            stop_requested: tokio_util::sync::CancellationToken::new(),
            draining: AtomicBool::new(false),
            started: std::time::Instant::now(),
            legs: AtomicUsize::new(0),
            expired_sessions: Default::default(),
            heartbeats,
        }
    }

    /// True once a graceful shutdown started: no new sign-ins.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining; false if it had started already.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    /// The settings that change on reload (limits, fork timers), as they are now.
    pub fn live(&self) -> arc_swap::Guard<Arc<crate::reload::Live>> {
        self.reloadables.live.load()
    }

    /// The admin token now, if the admin API is on.
    pub fn admin_token(&self) -> Option<String> {
        self.reloadables.admin_token.as_ref().map(|t| t.get())
    }

    /// Stops the node as a SIGTERM would (after an admin drain).
    pub fn request_stop(&self) {
        self.stop_requested.cancel();
    }

    /// Resolves once [`NodeCtx::request_stop`] was called.
    pub fn stop_requested(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop_requested.cancelled()
    }

    /// A call leg started (`true`) or stopped here.
    pub fn count_leg(&self, started: bool) {
        if started {
            self.legs.fetch_add(1, Ordering::Relaxed);
        } else {
            self.legs.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Call legs on this node now.
    pub fn legs(&self) -> usize {
        self.legs.load(Ordering::Relaxed)
    }
}
