//! `confab-bench`: load against a running node, end to end over TCP (or its WebSocket
//! listener, `--websocket`). Prints a summary table, or
//! one JSON object with `--json`. See BENCHMARKS.md for the figures and how they were made.

#[path = "../bench/mod.rs"]
mod bench;

use bench::Progress;
use bench::conn::Target;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "Load generator for a confab node")]
struct Args {
    /// The node's client address.
    #[arg(long, default_value = "127.0.0.1:5070", global = true)]
    server: SocketAddr,
    /// The node's JWT secret (auth.jwt_secret).
    #[arg(
        long,
        env = "CONFAB_AUTH_JWT_SECRET",
        default_value = "change-me",
        global = true
    )]
    secret: String,
    /// One JSON object with the figures instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Threads of the load generator; default: one per core.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Speak TLS to a node with [tls], trusting the CA certificate(s) in FILE; the node's
    /// certificate must carry the IP address of --server.
    #[arg(long, global = true)]
    ca: Option<std::path::PathBuf>,
    /// With --ca: a full TLS handshake on every connection (no session resumption).
    #[arg(long, global = true, requires = "ca")]
    tls_full_handshakes: bool,
    /// --server is the node's WebSocket listener ([server.websocket]): every connection
    /// upgrades (on --websocket-path) and sends one frame per binary message.
    #[arg(long, global = true)]
    websocket: bool,
    /// With --websocket: the listener's upgrade path.
    #[arg(long, global = true, default_value = "/confab")]
    websocket_path: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Call pairs exchanging messages with acks.
    Messages {
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Most unacknowledged messages per pair.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Body size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Offer this many messages per second in total (paced); default: as fast as acks allow.
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds of load.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Where the callees sign in (another node of a cluster, so every message crosses
        /// nodes); default: --server.
        #[arg(long)]
        callee_server: Option<SocketAddr>,
        /// Both sides on resumable sessions (hello.resume:{}): frames counted, acknowledged
        /// with `seen` every quarter of the node's bounds, and kept until the node's `seen`.
        #[arg(long)]
        resumable: bool,
    },
    /// Resume latency: pairs in calls; each round the resumable side (Alice) closes her socket,
    /// the other (Bob) sends a message, and Alice reconnects and resumes at once. Measures the
    /// drop → that message on the new connection, and checks it arrives exactly once.
    Resume {
        /// Pairs running their rounds concurrently.
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        /// Drops and resumes per pair.
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        /// Milliseconds between a pair's rounds.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Resume on this node (another node of the cluster: the resume is relayed to the
        /// node that holds the session, --server); default: --server.
        #[arg(long)]
        resume_on: Option<SocketAddr>,
    },
    /// Forked call setup to users with several devices.
    Calls {
        /// Concurrent callers, each calling its own user.
        #[arg(long, default_value_t = 50)]
        callers: usize,
        /// Devices per called user.
        #[arg(long, default_value_t = 3)]
        devices: usize,
        #[arg(long, value_enum, default_value = "click")]
        accept: bench::calls::Accept,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Where the called users' devices sign in (another node of a cluster, so every
        /// fork crosses nodes); default: --server.
        #[arg(long)]
        callee_server: Option<SocketAddr>,
    },
    /// Idle endpoints: sign-in rate and node memory per endpoint.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        endpoints: usize,
        /// Sign-ins in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Spread connections over 127.0.0.1 ..= 127.0.0.N.
        #[arg(long, default_value_t = 1)]
        sources: u8,
        /// The node's process id (default: the process named confab-node).
        #[arg(long)]
        node_pid: Option<u32>,
        /// Seconds to hold the endpoints before reading the node's memory.
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
    },
    /// Watchers of one user: presence change → notification latency.
    Presence {
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
    },
    /// Not a scenario but a yardstick: a server that only accepts, reads the hello, answers a
    /// fixed welcome and holds the connection, listening as the node does. Run `idle` against
    /// it for the machine's own sign-in rate (and, with `--calls`, `calls` for its call rate and
    /// `messages` for its message rate and latency).
    /// Prints its address, then serves until killed.
    BareServer {
        #[arg(long, default_value = "127.0.0.1:5071")]
        listen: SocketAddr,
        /// Threads, one listener each; default: one per core, like the node's workers.
        #[arg(long)]
        workers: Option<usize>,
        /// Also route the `calls` and `messages` scenarios' requests with the node's frames
        /// and nothing else: the yardstick for forked calls and for messages.
        #[arg(long)]
        calls: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Scenario::BareServer {
        listen,
        workers,
        calls,
    } = args.scenario
    {
        return bench::bare::serve(listen, workers, calls);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder.enable_all().build()?;
    let tls = args
        .ca
        .as_deref()
        .map(|ca| bench::stream::tls_config(ca, !args.tls_full_handshakes))
        .transpose()?;
    let target = Target {
        server: args.server,
        secret: args.secret.clone(),
        tls,
        websocket: args.websocket.then(|| args.websocket_path.clone()),
    };
    let progress = Progress::new(args.json);
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.1));
    let report = runtime.block_on(async {
        match args.scenario {
            Scenario::Messages {
                pairs,
                window,
                size,
                rate,
                duration,
                callee_server,
                resumable,
            } => {
                let callee = Target {
                    server: callee_server.unwrap_or(target.server),
                    ..target.clone()
                };
                let p = bench::messages::Params {
                    pairs,
                    window: window.max(1),
                    rate,
                    size,
                    duration: secs(duration),
                    resumable,
                };
                bench::messages::run(&target, &callee, &p, &progress).await
            }
            Scenario::Resume {
                pairs,
                rounds,
                pause_ms,
                resume_on,
            } => {
                let resume_on = Target {
                    server: resume_on.unwrap_or(target.server),
                    ..target.clone()
                };
                let p = bench::resume::Params {
                    pairs,
                    rounds,
                    pause: Duration::from_millis(pause_ms),
                };
                bench::resume::run(&target, &resume_on, &p, &progress).await
            }
            Scenario::Calls {
                callers,
                devices,
                accept,
                duration,
                callee_server,
            } => {
                let callee = Target {
                    server: callee_server.unwrap_or(target.server),
                    ..target.clone()
                };
                let p = bench::calls::Params {
                    callers,
                    devices: devices.max(1),
                    accept,
                    duration: secs(duration),
                };
                bench::calls::run(&target, &callee, &p, &progress).await
            }
            Scenario::Idle {
                endpoints,
                concurrency,
                sources,
                node_pid,
                hold,
            } => {
                let p = bench::idle::Params {
                    endpoints,
                    concurrency,
                    sources,
                    node_pid,
                    hold: secs(hold),
                };
                bench::idle::run(&target, &p, &progress).await
            }
            Scenario::Presence { watchers, changes } => {
                let p = bench::presence::Params { watchers, changes };
                bench::presence::run(&target, &p, &progress).await
            }
            Scenario::BareServer { .. } => unreachable!("served before the runtime is built"),
        }
    })?;
    let out = if args.json {
        format!("{}\n", report.to_json())
    } else {
        report.table()
    };
    std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
    // Open connections and tasks end with the process; no need to wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
