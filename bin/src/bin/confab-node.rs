//! `confab-node`: runs a node. The only place (with the other binaries) that reads files, the
//! environment and signals; everything else is in `confab-actors`.

use anyhow::Context as _;
use clap::Parser;
use confab_actors::{RunningNode, Settings};
use confab_cluster::spawn_node;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

#[cfg(unix)]
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
        if let Some(tls) = &settings.tls {
            confab_actors::tls::ServerTls::load(tls)?;
        }
        confab_actors::auth::Verifier::from_settings(&settings.auth)?;
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
    init_logs(&settings)?;
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
    let stop = node.stopper();
    runtime.block_on(async {
        wait_for_signal(signals, &node).await;
        tracing::info!("signal received; shutting down gracefully");
    });
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
fn init_logs(settings: &Settings) -> anyhow::Result<()> {
    let filter = log_filter(settings)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if settings.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
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

/// SIGHUP: reloads what can be reloaded in place, each on its own (one that does not load is
/// logged and keeps its old value): the client port's TLS certificate and the token keys.
fn reload(node: &RunningNode) {
    match node.reload_tls() {
        Ok(true) => tracing::info!("SIGHUP: TLS certificate reloaded"),
        Ok(false) => {}
        // Logged where it failed; the node goes on with the old certificate.
        Err(_) => {}
    }
    match node.reload_token_keys() {
        Ok(true) => tracing::info!("SIGHUP: token keys reloaded"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "SIGHUP: token keys not reloaded; the old ones stay"),
    }
}

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
