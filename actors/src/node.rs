//! Running a node: binding the sockets, the worker threads (one actix arbiter per core), the
//! accept loop with its connection limit, the operations port, and graceful shutdown.

use actix::Arbiter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::context::NodeCtx;
use crate::directory::{Directory, LocalDirectory};
use crate::endpoint::EndpointMsg;
use crate::link::{Join, JoinError, Joined, Link};
use crate::metrics as m;
use crate::presence::PresenceShards;
use crate::presence::rank::Thresholds;
use crate::reload::Reloadables;
use crate::session::Listener;
use crate::settings::Settings;
use crate::tls::ServerTls;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the node thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot join the cluster: {0}")]
    Cluster(JoinError),
    #[error("the settings have a [cluster] section but this node was built without a cluster link")]
    NoLink,
    #[error("the node stopped while starting")]
    Start,
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot load the token keys: {0}")]
    Keys(#[from] crate::auth::KeysError),
    #[error("{0}")]
    AdminToken(#[from] crate::admin::TokenError),
}

/// What the node thread reports once started: its id and directory, or why it could not join
/// its cluster.
type Ready = Result<(String, Arc<dyn Directory>, Option<Arc<dyn Link>>), JoinError>;

/// A node running on its own threads. Dropping it shuts it down gracefully.
pub struct RunningNode {
    pub addr: SocketAddr,
    /// The WebSocket listener's address, when `[server.websocket]` is set.
    pub websocket_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// The node's id (the cluster node id in a cluster).
    pub node_id: String,
    directory: Arc<dyn Directory>,
    link: Option<Arc<dyn Link>>,
    reloadables: Arc<Reloadables>,
    /// Cancelled once the node thread has stopped (a signal, or the end of an admin drain).
    ended: CancellationToken,
    /// The node thread's own runtime (for [`RunningNode::responsive`]).
    main: actix::dev::ArbiterHandle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningNode {
    /// Graceful shutdown: clients get `shutdown`, every call ends with 503, then the node exits
    /// (at the latest after `server.shutdown_timeout_ms`).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    /// Blocks until the node stops by itself.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The endpoint ids the node's directory lists for `user` (in a cluster, those of every
    /// node it knows of). For tests and tools.
    pub fn endpoints_of(&self, user: &str) -> Vec<String> {
        self.directory
            .endpoints_of(user)
            .into_iter()
            .map(|e| e.id.to_string())
            .collect()
    }

    /// The node's link to the other nodes, when it is in a cluster.
    pub fn link(&self) -> Option<&Arc<dyn Link>> {
        self.link.as_ref()
    }

    /// Reads the client port's TLS certificate and key again (SIGHUP): new handshakes present
    /// the new pair, connections already open are untouched; a pair that does not load leaves
    /// the old one in place and says why. `Ok(false)` when the port has no TLS.
    pub fn reload_tls(&self) -> Result<bool, crate::tls::TlsError> {
        match &self.reloadables.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Reads the token keys again (`auth.jwks_file`, SIGHUP): new sign-ins are checked against
    /// the new set; signed-in endpoints and their calls are untouched. A file that does not
    /// load leaves the old keys. `Ok(false)` when there is no key file.
    pub fn reload_token_keys(&self) -> Result<bool, crate::auth::KeysError> {
        self.reloadables.verifier.reload()
    }

    /// Reloads (SIGHUP, or `POST /admin/reload`): the settings, through the reloader the
    /// binary set, each changed key applied or reported as needing a restart; and the files
    /// the settings name. `Err` (nothing changed) when the settings do not load.
    pub fn reload(&self) -> Result<crate::reload::ReloadReport, String> {
        self.reloadables.reload()
    }

    /// How the binary reads the settings again; set once, after the node started.
    pub fn set_reloader(&self, reloader: crate::reload::Reloader) {
        let _ = self.reloadables.reloader.set(reloader);
    }

    /// Resolves once the node has stopped by itself (an admin drain ended) or was stopped.
    pub fn ended(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.ended.clone().cancelled_owned()
    }

    /// Whether the node's main runtime runs a task within `within` (the systemd watchdog pings
    /// only while it does, so a node that hangs is restarted).
    pub async fn responsive(&self, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if !self.main.spawn(async move {
            let _ = tx.send(());
        }) {
            return false;
        }
        matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }

    /// A handle that can start the graceful shutdown from another thread.
    pub fn stopper(&mut self) -> Option<oneshot::Sender<()>> {
        self.stop.take()
    }

    fn stop_and_join(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Whether accepted sockets inherit `TCP_NODELAY` from their listener, so that the node sets it
/// once on each listener [`bind`] makes (the clients' and the metrics endpoint's) instead of
/// with a system call per connection (a sign-in is only about five system calls on the node,
/// so one fewer shows). Linux copies the option into every accepted socket; elsewhere each
/// session sets it itself.
pub(crate) const LISTENER_NODELAY_INHERITED: bool = cfg!(target_os = "linux");

fn bind(
    addr: SocketAddr,
    backlog: u32,
    reuse_port: bool,
) -> Result<std::net::TcpListener, NodeError> {
    use socket2::{Domain, Socket, Type};
    let err = |source| NodeError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    if LISTENER_NODELAY_INHERITED {
        socket.set_tcp_nodelay(true).map_err(err)?;
    }
    socket.bind(&addr.into()).map_err(err)?;
    // std's listener uses a backlog of 128, which drops SYNs during a sign-in burst and makes
    // clients wait a second for the retransmit.
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

/// Binds `addr` without `SO_REUSEPORT` and without listening: fails if anything holds the port.
fn probe_exclusive(addr: SocketAddr) -> Result<socket2::Socket, NodeError> {
    use socket2::{Domain, Socket, Type};
    let err = |source| NodeError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket)
}

/// One listening socket per worker thread on the same address (`SO_REUSEPORT`), so each worker
/// accepts its own connections: no accept thread handing every new socket to a worker (a
/// wake-up and an epoll re-registration per sign-in), and the kernel spreads connections over
/// the workers. Other platforms get one listener, served by the first worker.
///
/// Public so that `confab-bench bare-server` listens exactly as the node does: its sign-in
/// rate is then the machine's share of the node's (see BENCHMARKS.md). The claim must be held
/// while the listeners serve.
pub fn bind_listeners(
    addr: SocketAddr,
    backlog: u32,
    workers: usize,
) -> Result<(Vec<std::net::TcpListener>, Option<PortClaim>), NodeError> {
    // Only Linux spreads a port's connections over its SO_REUSEPORT listeners (the BSDs and
    // macOS give them all to one); elsewhere one listener serves, through the first worker.
    if !cfg!(target_os = "linux") || workers <= 1 {
        return Ok((vec![bind(addr, backlog, false)?], None));
    }
    // SO_REUSEPORT would also let a second node bind the same port and silently take half of
    // the connections. The claim stops another confab node, even one started at the same
    // instant; the exclusive bind (without listening, so no client is refused in the meantime)
    // stops any other program that holds the port.
    let claim = if addr.port() != 0 {
        let claim = PortClaim::take(addr)?;
        drop(probe_exclusive(addr)?);
        Some(claim)
    } else {
        None
    };
    let first = bind(addr, backlog, true)?;
    let bound = first
        .local_addr()
        .map_err(|source| NodeError::Bind { addr, source })?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind(bound, backlog, true)?);
    }
    Ok((listeners, claim))
}

/// A node's claim on the client address it shares between its `SO_REUSEPORT` listeners: an
/// abstract Unix socket named after the address, held while the node runs. Binding one is
/// atomic and exclusive within the network namespace (the scope of TCP ports too), and the
/// kernel lets go of it when the process exits, however it exits: no lock file to clean up.
#[derive(Debug)]
pub struct PortClaim {
    #[cfg(target_os = "linux")]
    _socket: std::os::unix::net::UnixDatagram,
}

impl PortClaim {
    #[cfg(target_os = "linux")]
    fn take(addr: SocketAddr) -> Result<PortClaim, NodeError> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
        let err = |source| NodeError::Bind { addr, source };
        let name = UnixAddr::from_abstract_name(format!("confab-node {addr}")).map_err(err)?;
        let socket = UnixDatagram::bind_addr(&name).map_err(err)?;
        Ok(PortClaim { _socket: socket })
    }

    /// Only Linux shares a port between listeners; elsewhere nothing needs claiming.
    #[cfg(not(target_os = "linux"))]
    fn take(_: SocketAddr) -> Result<PortClaim, NodeError> {
        Ok(PortClaim {})
    }
}

fn worker_count(settings: &Settings) -> usize {
    match settings.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds the node's ports and starts it alone, on its own threads. A node of a cluster is
/// started with [`spawn_node_with`] and the cluster's [`Join`].
pub fn spawn_node(settings: Settings) -> Result<RunningNode, NodeError> {
    spawn_node_with(settings, None)
}

/// Binds the node's ports and starts it on its own threads, joining its cluster through `join`
/// when the settings have a `[cluster]` section.
pub fn spawn_node_with(
    settings: Settings,
    join: Option<Arc<dyn Join>>,
) -> Result<RunningNode, NodeError> {
    let join = match (&settings.cluster, join) {
        (None, _) => None,
        (Some(_), None) => return Err(NodeError::NoLink),
        (Some(_), Some(j)) => Some(j),
    };
    // Before anything binds: a certificate that does not load stops the node at once.
    let tls = settings
        .tls
        .as_ref()
        .map(ServerTls::load)
        .transpose()?
        .map(Arc::new);
    if settings.server.proxy_protocol && settings.server.proxy_trusted_from.is_empty() {
        tracing::warn!(
            "server.proxy_protocol takes PROXY headers from any peer: set server.proxy_trusted_from to the load balancers' networks, or make sure only they reach the client port"
        );
    }
    if tls.is_none() && !settings.server.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %settings.server.listen,
            "the client port listens beyond this machine without TLS: tokens and messages cross the network in clear text; set [tls] (docs/security.md)"
        );
    }
    let verifier = Arc::new(Verifier::from_settings(&settings.auth)?);
    let admin_token = match settings.admin.token_file.as_str() {
        "" => None,
        path => Some(Arc::new(crate::admin::AdminToken::load(path)?)),
    };
    let reloadables = Arc::new(Reloadables::new(&settings, tls, verifier, admin_token));
    let node_reloadables = reloadables.clone();
    let (listeners, port_claim) = bind_listeners(
        settings.server.listen,
        settings.server.listen_backlog,
        worker_count(&settings),
    )?;
    let addr = listeners[0]
        .local_addr()
        .map_err(|source| NodeError::Bind {
            addr: settings.server.listen,
            source,
        })?;
    let (websocket, websocket_claim) = match &settings.server.websocket {
        None => (Vec::new(), None),
        Some(ws) => bind_listeners(
            ws.listen,
            settings.server.listen_backlog,
            worker_count(&settings),
        )?,
    };
    let websocket_addr = match websocket.first() {
        None => None,
        Some(l) => Some(l.local_addr().map_err(|source| NodeError::Bind {
            addr: settings.server.listen,
            source,
        })?),
    };
    let metrics_listener = settings
        .metrics_addr()
        .map(|a| bind(a, 128, false))
        .transpose()?;
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let (stop_tx, stop_rx) = oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ended = CancellationToken::new();
    let thread_ended = ended.clone();
    let (main_tx, main_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("confab-node".into())
        .spawn(move || {
            // Held until the node has stopped listening.
            let _port_claims = (port_claim, websocket_claim);
            let system = actix::System::new();
            let _ =
                main_tx.send(system.block_on(async { actix::System::current().arbiter().clone() }));
            system.block_on(run(
                settings,
                node_reloadables,
                Bound {
                    clients: listeners,
                    websocket,
                    metrics: metrics_listener,
                },
                (stop_rx, ready_tx),
                join,
            ));
            thread_ended.cancel();
        })
        .map_err(NodeError::Thread)?;
    // The node is ready once it has joined its cluster (at once without one).
    let (node_id, directory, link) = match ready_rx.recv() {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(NodeError::Cluster(e));
        }
        Err(_) => {
            let _ = thread.join();
            return Err(NodeError::Start);
        }
    };
    let main = main_rx.recv().map_err(|_| NodeError::Start)?;
    tracing::info!(%addr, ?websocket_addr, ?metrics_addr, "confab node listening");
    Ok(RunningNode {
        addr,
        websocket_addr,
        metrics_addr,
        node_id,
        directory,
        link,
        reloadables,
        ended,
        main,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// The sockets [`spawn_node`] bound for the node thread.
struct Bound {
    clients: Vec<std::net::TcpListener>,
    /// The WebSocket listener's sockets (none without `[server.websocket]`).
    websocket: Vec<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
}

async fn run(
    settings: Settings,
    reloadables: Arc<Reloadables>,
    bound: Bound,
    (stop, ready): (oneshot::Receiver<()>, std::sync::mpsc::Sender<Ready>),
    join: Option<Arc<dyn Join>>,
) {
    let Bound {
        clients: listeners,
        websocket: websocket_listeners,
        metrics: metrics_listener,
    } = bound;

    let workers: Vec<Arbiter> = (0..worker_count(&settings))
        .map(|_| Arbiter::new())
        .collect();
    let handles: Vec<_> = workers.iter().map(|a| a.handle()).collect();
    let thresholds = Thresholds {
        inactive_after: Duration::from_millis(settings.presence.inactive_after_ms),
        away_after: Duration::from_millis(settings.presence.away_after_ms),
    };
    let presence = PresenceShards::start(&handles, thresholds);
    // Before the cluster starts, so what it records while joining is kept.
    let recorder = m::recorder();
    m::describe_all();
    if let Some(tls) = &reloadables.tls {
        tls.record_expiry();
    }
    let (directory, link): (Arc<dyn Directory>, _) = match join {
        None => (Arc::new(<LocalDirectory>::default()), None),
        Some(join) => {
            let node_id = settings
                .cluster
                .as_ref()
                .and_then(|c| c.node_id.clone())
                .unwrap_or_else(|| {
                    // Subject- and key-safe: letters, digits, - and _.
                    let base: String = settings
                        .server
                        .node_id
                        .chars()
                        .map(|ch| {
                            if ch.is_ascii_alphanumeric() || ch == '_' {
                                ch
                            } else {
                                '-'
                            }
                        })
                        .collect();
                    format!("{base}-{:06x}", rand::random::<u32>() >> 8)
                });
            match join.join(&settings, node_id, presence.clone()).await {
                Ok(Joined {
                    directory, link, ..
                }) => {
                    // Set once: a node joins one cluster, once.
                    let _ = reloadables.link.set(link.clone());
                    (directory, Some(link))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot join the cluster");
                    let _ = ready.send(Err(e));
                    for w in workers {
                        w.stop();
                    }
                    actix::System::current().stop();
                    return;
                }
            }
        }
    };
    let ctx = Arc::new(NodeCtx::new(
        settings,
        directory,
        presence,
        link,
        reloadables,
    ));
    if let Some(link) = &ctx.link {
        // Weak: the link lives in the context, and must not keep it alive.
        let weak = Arc::downgrade(&ctx);
        link.answer_admin_with(Arc::new(move |q| {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(ctx) => Some(crate::admin::answer_here(&ctx, q).await),
                    None => None,
                }
            })
        }));
    }
    let _ = ready.send(Ok((
        ctx.node_id.clone(),
        ctx.directory.clone(),
        ctx.link.clone(),
    )));

    if let Some(l) = metrics_listener.and_then(|l| tokio::net::TcpListener::from_std(l).ok()) {
        actix_rt::spawn(crate::http::serve(l, recorder.clone(), ctx.clone()));
    }
    if let Some(h) = recorder {
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                h.run_upkeep();
            }
        });
    }

    let slots = Arc::new(Semaphore::new(ctx.settings.server.max_connections));
    let accepting = CancellationToken::new();
    // Forgets the addresses nothing is held for any more, so the limiter stays small.
    let limits = ctx.address_limits.clone();
    let sweeping = accepting.clone();
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = sweeping.cancelled() => return,
                _ = tick.tick() => limits.sweep(tokio::time::Instant::now()),
            }
        }
    });
    let mut loops = Vec::new();
    let every_listener = (listeners.into_iter().map(|l| (l, Listener::Clients)))
        .zip(handles.iter().cycle())
        .chain(
            (websocket_listeners
                .into_iter()
                .map(|l| (l, Listener::WebSocket)))
            .zip(handles.iter().cycle()),
        );
    for ((listener, kind), worker) in every_listener {
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let (ctx, slots, accepting) = (ctx.clone(), slots.clone(), accepting.clone());
        worker.spawn(async move {
            accept_loop(listener, kind, ctx, slots, accepting).await;
            drop(done_tx);
        });
        loops.push(done_rx);
    }
    // Until told to stop; a dropped stopper (the node's owner gone) stops it too.
    // Until told to stop, or an admin drain has ended; a dropped stopper (the node's owner
    // gone) stops it too.
    tokio::select! {
        _ = stop => {}
        _ = ctx.stop_requested() => {}
    }
    accepting.cancel();
    // The listeners close as their loops end, before the endpoints are told to go.
    let _ = tokio::time::timeout(Duration::from_secs(1), futures::future::join_all(loops)).await;
    drain(&ctx).await;
    if let Some(l) = &ctx.link {
        l.clone().leave().await;
    }
    for w in workers {
        w.stop();
    }
    actix::System::current().stop();
}

/// Tells every endpoint the node is going away and waits for them to finish, up to the deadline.
async fn drain(ctx: &Arc<NodeCtx>) {
    ctx.start_draining();
    let endpoints = ctx.directory.all();
    tracing::info!(
        endpoints = endpoints.len(),
        "shutting down: ending every call"
    );
    // One deadline for both waits below, so the node is gone within shutdown_timeout_ms of
    // starting to drain (docs/operations.md), not twice that.
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(ctx.settings.server.shutdown_timeout_ms);
    // Every client hears `shutdown` before any call ends, then every call ends.
    let notices = endpoints
        .iter()
        .filter_map(|e| e.addr.local())
        .map(|a| a.send(EndpointMsg::ShutdownNotice));
    let _ = tokio::time::timeout_at(deadline, futures::future::join_all(notices)).await;
    for a in endpoints.iter().filter_map(|e| e.addr.local()) {
        a.do_send(EndpointMsg::Shutdown);
    }
    if let Some(l) = &ctx.link {
        l.end_remote_legs();
    }
    let waited = tokio::time::timeout_at(deadline, async {
        while !ctx.directory.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!("shutdown deadline reached with endpoints still connected");
    }
    if let Some(l) = &ctx.link {
        l.remote_legs_gone(Duration::from_secs(2)).await;
    }
    // Let the writers flush the last frames.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Accepts connections on one worker thread's listener and serves each on that thread, until
/// `accepting` is cancelled. `slots` (shared by every worker and both listeners) holds
/// `server.max_connections`. PROXY headers (`server.proxy_protocol`) are for the client port
/// only.
async fn accept_loop(
    listener: std::net::TcpListener,
    kind: Listener,
    ctx: Arc<NodeCtx>,
    slots: Arc<Semaphore>,
    accepting: CancellationToken,
) {
    // Registered here, with this worker's reactor.
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register a listener with the runtime");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = accepting.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics::counter!(m::CONNECTIONS_TOTAL).increment(1);
        // Before anything else: a refused address costs the node no handshake and no slot.
        // Behind a PROXY header the address is the client's, which the session reads first.
        let address_slot = if ctx.settings.server.proxy_protocol && kind == Listener::Clients {
            None
        } else {
            match ctx
                .address_limits
                .admit(peer.ip(), false, tokio::time::Instant::now())
            {
                Ok(slot) => Some(slot),
                Err(why) => {
                    crate::session::refused_for_address(peer, why);
                    drop(stream);
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refusing a connection");
            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => "max_connections").increment(1);
            match kind {
                Listener::Clients => actix_rt::spawn(refuse_overloaded(stream)),
                Listener::WebSocket if ctx.tls.is_none() => {
                    actix_rt::spawn(crate::websocket::refuse_overloaded(stream))
                }
                // Nothing can be said before a TLS handshake: the connection just closes.
                Listener::WebSocket => continue,
            };
            continue;
        };
        actix_rt::spawn(crate::session::run(
            stream,
            peer,
            ctx.clone(),
            (permit, address_slot),
            kind,
        ));
    }
}

async fn refuse_overloaded(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let msg = crate::refusal::Refusal::ConnectionLimit.reply(None);
    if let Ok(frame) = confab_protocol::codec::frame_bytes(&msg) {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&frame)).await;
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions skip `set_nodelay` where the listener's setting is inherited: if a platform
    /// stopped copying it, every small frame would wait for Nagle's algorithm. Both kinds of
    /// listener are checked: one worker's plain one and the `SO_REUSEPORT` ones of several.
    /// Two nodes started at the same instant on one port both pass the exclusive probe bind
    /// (neither listens yet); the claim lets only one through, and is free again once dropped.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_client_address_is_claimed_by_one_node_at_a_time() {
        // Documentation addresses (RFC 5737): only the claim's name, never bound by any node.
        let addr: SocketAddr = "192.0.2.1:5999".parse().expect("address");
        let first = PortClaim::take(addr).expect("the first claim");
        match PortClaim::take(addr) {
            Err(NodeError::Bind { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
            }
            other => panic!("a second claim on the same address: {other:?}"),
        }
        let other_port: SocketAddr = "192.0.2.1:5998".parse().expect("address");
        let _unrelated = PortClaim::take(other_port).expect("another address is free");
        drop(first);
        PortClaim::take(addr).expect("free again once the first node is gone");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn accepted_sockets_have_nodelay() {
        for reuse_port in [false, true] {
            let any_port = "127.0.0.1:0".parse().expect("address");
            let listener = bind(any_port, 16, reuse_port).expect("bind");
            listener.set_nonblocking(false).expect("blocking");
            let addr = listener.local_addr().expect("local address");
            let _client = std::net::TcpStream::connect(addr).expect("connect");
            let (accepted, _) = listener.accept().expect("accept");
            assert!(
                accepted.nodelay().expect("nodelay"),
                "reuse_port {reuse_port}"
            );
        }
    }
}
