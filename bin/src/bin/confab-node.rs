//! `confab-node`: runs a node. The only place (with the other binaries) that reads files, the
//! environment and signals; everything else is in `confab-actors`.

use anyhow::Context as _;
use clap::Parser;
use confab_actors::{RunningNode, Settings};
use confab_cluster::spawn_node;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

#[cfg(all(unix, not(feature = "system-allocator")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The confab IM-call node. With no arguments it runs with the embedded defaults.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML settings file (see config/node.toml); CONFAB_<SECTION>_<KEY> variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the settings (the file, the environment, the log filter) and exit: 0 and "ok" if
    /// the node would start with them, else the setting at fault and a non-zero status.
    #[arg(long, conflicts_with = "print_config")]
    check: bool,
    /// Print the effective settings (file plus environment plus defaults) as TOML, secrets
    /// redacted, and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => String::new(),
    };
    let settings = Settings::load(&text, std::env::vars())?;
    if args.print_config {
        let text = toml::to_string_pretty(&settings.redacted())?;
        std::io::stdout().write_all(text.as_bytes())?;
        return Ok(());
    }
    if args.check {
        log_filter(&settings)?;
        // The files the settings name, read as a start would read them.
        // A certificate that expired or soon will still loads (a start would take it), but
        // the operator running the check hears of it.
        let mut expiring = Vec::new();
        if let Some(tls) = &settings.tls {
            let tls = confab_actors::tls::ServerTls::load(tls)?;
            expiring.push(("tls.cert_file", tls.not_after()));
            if let Some(ca) = tls.client_ca_not_after() {
                expiring.push(("tls.client_ca_file", ca));
            }
        }
        if let Some(cluster) = &settings.cluster
            && let Some(link) = confab_cluster::direct::LinkTls::from_settings(cluster)?
        {
            expiring.push(("cluster.link_tls_cert_file", link.not_after()));
            expiring.push(("cluster.link_tls_ca_file", link.ca_not_after()));
        }
        for (key, not_after) in expiring {
            if let Some(problem) = confab_actors::tls::expiry_problem(not_after) {
                writeln!(std::io::stderr(), "warning: {key}: {problem}")?;
            }
        }
        confab_actors::auth::Verifier::from_settings(&settings.auth)?;
        if !settings.admin.token_file.is_empty() {
            confab_actors::admin::AdminToken::load(&settings.admin.token_file)?;
        }
        let source = args
            .config
            .as_ref()
            .map_or("the embedded defaults".to_owned(), |p| {
                p.display().to_string()
            });
        writeln!(
            std::io::stdout(),
            "ok: {source} (with the environment's CONFAB_* overrides)"
        )?;
        return Ok(());
    }
    let logs = init_logs(&settings)?;
    raise_file_limit(settings.server.max_connections);
    if settings.auth.jwt_secret == "change-me" {
        tracing::warn!("auth.jwt_secret is the default; set CONFAB_AUTH_JWT_SECRET in production");
    }
    // The signal handlers go in before the node starts (which may wait seconds for NATS): a
    // SIGHUP meanwhile must not kill the process, whose default action for it is to end.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _entered = runtime.enter();
        Signals::install()
    };
    let mut node = spawn_node(settings)?;
    node.set_reloader(reloader(args.config.clone(), logs));
    let stop = node.stopper();
    systemd::ready();
    runtime.block_on(async {
        // The node also stops by itself at the end of an admin drain.
        tokio::select! {
            _ = wait_for_signal(signals, &node) => {
                tracing::info!("signal received; shutting down gracefully");
            }
            _ = node.ended() => tracing::info!("the node stopped (drained)"),
            _ = systemd::watchdog(&node) => {}
        }
    });
    systemd::stopping();
    if let Some(stop) = stop {
        let _ = stop.send(());
    }
    node.wait();
    Ok(())
}

/// The log filter: `RUST_LOG` when set, else `log.level`, which must parse.
fn log_filter(settings: &Settings) -> anyhow::Result<EnvFilter> {
    match EnvFilter::try_from_default_env() {
        Ok(filter) => Ok(filter),
        Err(_) => EnvFilter::try_new(&settings.log.level)
            .map_err(|e| anyhow::anyhow!("invalid setting log.level: {e}")),
    }
}

/// `RUST_LOG` wins when set; otherwise `log.level`, which must parse: a filter with a typo would
/// otherwise be skipped in silence and the node would log less than the operator asked for.
/// Returns how a reload sets a new `log.level`.
fn init_logs(settings: &Settings) -> anyhow::Result<LogHandle> {
    let filter = log_filter(settings)?;
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let set = move |level: &str, apply: &dyn Fn(EnvFilter) -> Result<(), String>| {
        if from_env {
            return Err("RUST_LOG is set and wins over log.level".to_owned());
        }
        let filter = EnvFilter::try_new(level).map_err(|e| format!("invalid log.level: {e}"))?;
        apply(filter)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if settings.log.format == "json" {
        let builder = builder.json().with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        Ok(Box::new(move |level| {
            set(level, &|f| handle.reload(f).map_err(|e| e.to_string()))
        }))
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        Ok(Box::new(move |level| {
            set(level, &|f| handle.reload(f).map_err(|e| e.to_string()))
        }))
    }
}

/// Raises the open-file limit to the hard limit; warns when it cannot hold `max_connections`.
fn raise_file_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if (limit as usize) < max_connections + 64 => tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below server.max_connections; connections past it will fail"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// SIGHUP: reloads the settings (each changed key applied, or reported as needing a restart)
/// and the files they name (the TLS certificate, the token keys, the admin token, the link TLS
/// files), each on its own; a settings file that does not load changes nothing. `POST /admin/reload` does the same.
fn reload(node: &RunningNode) {
    match node.reload() {
        Ok(report) => {
            for what in &report.reloaded {
                match what.as_str() {
                    "tls" => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    "token_keys" => tracing::info!("SIGHUP: token keys reloaded"),
                    other => tracing::info!("SIGHUP: {other} reloaded"),
                }
            }
            for f in &report.failed {
                tracing::error!(what = %f.what, error = %f.error, "SIGHUP: not reloaded; the old value stays");
            }
            tracing::info!(
                applied = ?report.applied,
                restart_needed = ?report.restart_needed,
                "SIGHUP: settings reloaded"
            );
        }
        Err(e) => tracing::error!(error = %e, "SIGHUP: the settings do not load; nothing changed"),
    }
}

/// How the node reads its settings again on reload: the same file (or none) and the
/// environment as at start, and the log filter through `logs`.
fn reloader(config: Option<PathBuf>, logs: LogHandle) -> confab_actors::reload::Reloader {
    confab_actors::reload::Reloader {
        load: Box::new(move || {
            let text = match &config {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                None => String::new(),
            };
            Settings::load(&text, std::env::vars()).map_err(|e| e.to_string())
        }),
        log_level: Box::new(move |level| logs(level)),
    }
}

/// Sets the log filter to `log.level`'s new value.
type LogHandle = confab_actors::reload::SetLogLevel;

/// The signals the node handles, registered once.
struct Signals {
    #[cfg(unix)]
    term_and_hup: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Registers SIGTERM and SIGHUP (within a runtime); Ctrl-C is registered when awaited.
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                term_and_hup: signal(SignalKind::terminate())
                    .ok()
                    .zip(signal(SignalKind::hangup()).ok()),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }
}

/// Waits for SIGTERM or Ctrl-C. Meanwhile each SIGHUP reloads what can be reloaded in place
/// (see [`reload`]).
async fn wait_for_signal(signals: Signals, node: &RunningNode) {
    #[cfg(unix)]
    {
        let Some((mut term, mut hup)) = signals.term_and_hup else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => reload(node),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (signals, node);
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// systemd's `Type=notify` protocol (config/confab-node.service): `READY=1` once the node
/// listens (and has joined its cluster), `WATCHDOG=1` while it is responsive, `STOPPING=1`
/// when it begins to stop. Outside systemd (no `NOTIFY_SOCKET`) each is nothing.
mod systemd {
    use confab_actors::RunningNode;
    use std::time::Duration;

    pub fn ready() {
        #[cfg(unix)]
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "cannot tell systemd the node is ready");
        }
    }

    pub fn stopping() {
        #[cfg(unix)]
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }

    /// Pings the watchdog at half its interval for as long as the node's runtime answers
    /// within that half; never resolves. Without `WatchdogSec` it only waits.
    pub async fn watchdog(node: &RunningNode) {
        #[cfg(unix)]
        {
            if let Some(usec) = watchdog_usec() {
                let half = Duration::from_micros(usec) / 2;
                let mut tick = tokio::time::interval(half);
                loop {
                    tick.tick().await;
                    if node.responsive(half).await {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    } else {
                        tracing::error!(
                            "the node's runtime did not answer; not pinging the watchdog"
                        );
                    }
                }
            }
        }
        #[cfg(not(unix))]
        let _ = node;
        std::future::pending::<()>().await
    }

    /// `WATCHDOG_USEC`, when systemd asks for pings and they are this process's to send (its
    /// `WATCHDOG_PID`, when set, is this process; sd_notify's own check insists on it being
    /// set, which a test harness cannot do before the process exists).
    #[cfg(unix)]
    fn watchdog_usec() -> Option<u64> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.parse() == Ok(std::process::id()));
        (usec > 0 && ours).then_some(usec)
    }
}
