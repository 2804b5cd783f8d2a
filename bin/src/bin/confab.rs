//! `confab`: the command-line client. Mints tokens, sends a message, listens as a device (toasts,
//! accept on Enter, auto-accept when the node asks), chats interactively, and publishes or
//! watches presence. Built on `confab-client`; see `confab --help` and the README's "Try it".

#[path = "../cli/mod.rs"]
mod cli;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use cli::out::{ColorChoice, Output};
use cli::session::{Auth, Session};

#[derive(Parser)]
#[command(
    version,
    about = "The confab command-line client: send, listen, chat and presence against a confab node"
)]
struct Args {
    /// The node's client address (host:port).
    #[arg(
        long,
        env = "CONFAB_SERVER",
        default_value = "127.0.0.1:5070",
        global = true
    )]
    server: String,
    /// Who to sign in as (a SIP URI such as sip:alice@example.com).
    #[arg(long, env = "CONFAB_USER", global = true)]
    user: Option<String>,
    /// A JWT for --user (HS256, `sub` = the user); used instead of --secret when both are set.
    #[arg(long, env = "CONFAB_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The node's JWT secret (auth.jwt_secret): mint a token for --user locally.
    #[arg(
        long,
        env = "CONFAB_AUTH_JWT_SECRET",
        global = true,
        hide_env_values = true
    )]
    secret: Option<String>,
    /// Read the token from FILE (first line), so it does not show in `ps`.
    #[arg(
        long,
        env = "CONFAB_TOKEN_FILE",
        global = true,
        conflicts_with = "token"
    )]
    token_file: Option<std::path::PathBuf>,
    /// Read the JWT secret from FILE (first line), so it does not show in `ps`.
    #[arg(
        long,
        env = "CONFAB_SECRET_FILE",
        global = true,
        conflicts_with = "secret"
    )]
    secret_file: Option<std::path::PathBuf>,
    /// Speak TLS to the node (a node with [tls]), trusting the system's root certificates
    /// unless --ca is given.
    #[arg(long, env = "CONFAB_TLS", global = true)]
    tls: bool,
    /// Trust only the CA certificate(s) in FILE (PEM); implies --tls.
    #[arg(long, env = "CONFAB_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// The name the node's certificate must carry; default: the host of --server.
    #[arg(long, env = "CONFAB_TLS_SERVER_NAME", global = true)]
    tls_server_name: Option<String>,
    /// The device name shown to the user's other endpoints.
    #[arg(long, default_value = "cli", global = true)]
    device: String,
    /// One JSON object per event, one per line, instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Colour the text output: `auto` colours only when stdout is a terminal (and NO_COLOR is
    /// unset).
    #[arg(long, value_enum, default_value = "auto", global = true)]
    color: ColorChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a JWT for USER signed with --secret.
    Token {
        /// The user the token is for (its `sub`).
        user_uri: String,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Call TO, send TEXT as a message, wait for its delivery, hang up. Exits non-zero with the
    /// reason (e.g. 480 Temporarily Unavailable) when it was not delivered.
    Send {
        /// Who to send to (a SIP URI).
        to: String,
        /// The message.
        text: String,
        /// Send TEXT as the call's toast instead: success is the call being established.
        #[arg(long)]
        toast: bool,
    },
    /// Sign in as a device and print toasts, call states and messages. Enter accepts the
    /// oldest ringing call (and marks this device active); the node's auto-accept request is
    /// always honoured.
    Listen(cli::listen::ListenArgs),
    /// Interactive chat: call TO (or, without TO, answer the first call that comes in).
    Chat {
        /// Who to call; omit to wait for a call.
        to: Option<String>,
        /// Place the call with this toast.
        #[arg(long)]
        toast: Option<String>,
    },
    /// Publish or watch presence.
    #[command(subcommand)]
    Presence(PresenceCommand),
    /// The operator's commands over a node's admin API (status, sessions, user, kick, drain).
    Admin(cli::admin::AdminArgs),
}

#[derive(Subcommand)]
enum PresenceCommand {
    /// Publish this device's activity and/or the user's manual status.
    Set(cli::presence::SetArgs),
    /// Print every presence event of USER... (the current state first).
    Watch(WatchArgs),
}

#[derive(ClapArgs)]
struct WatchArgs {
    /// The users to watch (SIP URIs).
    #[arg(required = true)]
    users: Vec<String>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The library's diagnostics, on stderr, only when asked for (RUST_LOG=debug, say).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let out = Arc::new(Output::new(args.json, args.color));
    match run(args, &out) {
        Ok(code) => code,
        Err(e) => {
            out.error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The first line of `path`, for a secret kept out of the command line.
fn first_line(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the {what} file {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if line.is_empty() {
        anyhow::bail!("the {what} file {} is empty", path.display());
    }
    Ok(line)
}

/// `--tls`/`--ca`: how to speak TLS to the node, with the name to check (the host of
/// `server` unless given).
fn client_tls(args: &Args) -> anyhow::Result<Option<confab_client::ClientTls>> {
    if !args.tls && args.ca.is_none() {
        return Ok(None);
    }
    let tls = match &args.ca {
        Some(ca) => confab_client::ClientTls::with_ca_file(ca)?,
        None => confab_client::ClientTls::system_roots()?,
    };
    let host = match &args.tls_server_name {
        Some(name) => name.clone(),
        None => server_host(&args.server).to_owned(),
    };
    Ok(Some(tls.server_name(host)))
}

/// The host of `host:port` (`[v6]:port` too).
fn server_host(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn run(mut args: Args, out: &Arc<Output>) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.secret_file {
        args.secret = Some(first_line(path, "secret")?);
    }
    if let Some(path) = &args.token_file {
        args.token = Some(first_line(path, "token")?);
    }
    if let Command::Token { user_uri, ttl } = &args.command {
        let Some(secret) = &args.secret else {
            anyhow::bail!("`token` needs --secret (or CONFAB_AUTH_JWT_SECRET)");
        };
        let token = confab_client::token::mint(user_uri, secret, Duration::from_secs(*ttl));
        out.raw_line(&token);
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Admin(admin) = args.command {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(cli::admin::run(admin, out));
    }
    let Some(user) = args.user.clone() else {
        anyhow::bail!("--user (or CONFAB_USER) is required: who to sign in as");
    };
    let auth = match (args.token.clone(), args.secret.clone()) {
        (Some(token), _) => Auth::Token(token),
        (None, Some(secret)) => Auth::Secret(secret),
        (None, None) => anyhow::bail!(
            "sign-in needs --token (CONFAB_TOKEN) or --secret (CONFAB_AUTH_JWT_SECRET)"
        ),
    };
    let session = Session {
        server: args.server.clone(),
        user,
        auth,
        device: args.device.clone(),
        tls: client_tls(&args)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let out = Arc::clone(out);
    let result = runtime.block_on(async move {
        match args.command {
            Command::Token { .. } | Command::Admin(_) => Ok(ExitCode::SUCCESS),
            Command::Send { to, text, toast } => {
                cli::send::run(&session, &out, &to, &text, toast).await
            }
            Command::Listen(listen) => cli::listen::run(&session, &out, listen).await,
            Command::Chat { to, toast } => cli::chat::run(&session, &out, to, toast).await,
            Command::Presence(PresenceCommand::Set(set)) => {
                cli::presence::set(&session, &out, set).await
            }
            Command::Presence(PresenceCommand::Watch(watch)) => {
                cli::presence::watch(&session, &out, &watch.users, watch.count).await
            }
        }
    });
    // Threads reading stdin may still be blocked; they end with the process.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}
