//! `confab admin …`: the operator's commands over a node's admin API (the operations port's
//! `/admin/` routes, docs/operations.md "The admin API"): status, sessions, one user's
//! endpoints as the arbiter ranks them, kick, drain, reload. `--json` prints the API's JSON as it came.

use anyhow::Context as _;
use clap::{Args as ClapArgs, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use std::process::ExitCode;

use super::out::Output;

#[derive(ClapArgs)]
pub struct AdminArgs {
    /// The node's operations port (metrics.listen), as host:port or an http:// URL.
    #[arg(long, env = "CONFAB_ADMIN", default_value = "127.0.0.1:9464")]
    pub admin: String,
    /// The admin token's file (the node's admin.token_file, first line).
    #[arg(long, env = "CONFAB_ADMIN_TOKEN_FILE")]
    pub admin_token_file: std::path::PathBuf,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Every node's version, uptime, endpoints, calls and readiness.
    Status,
    /// Signed-in sessions (every node's), in endpoint id order, a page at a time.
    Sessions {
        /// Only this user's (a SIP URI).
        #[arg(long)]
        user: Option<String>,
        /// Start after this endpoint id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Follow `next` to the end.
        #[arg(long)]
        all: bool,
    },
    /// A user's endpoints, most active first, as the fork arbiter ranks them.
    User {
        /// The user (a SIP URI).
        user: String,
    },
    /// End a session (--endpoint) or every session of a user (--user); the client is told
    /// the reason.
    Kick {
        #[arg(
            long,
            conflicts_with = "endpoint",
            required_unless_present = "endpoint"
        )]
        user: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
        /// What the client is told.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Drain the node: no new sign-ins, clients told to reconnect elsewhere, and the node
    /// stops when the last leaves or at the deadline.
    Drain {
        /// How long to wait for the clients (default: the node's admin.drain_deadline_ms).
        #[arg(long)]
        deadline_ms: Option<u64>,
    },
    /// Reload the node's settings as SIGHUP does: each changed key applied or reported as
    /// needing a restart; a file that does not load changes nothing.
    Reload,
}

/// Runs one admin command.
pub async fn run(args: AdminArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let token = std::fs::read_to_string(&args.admin_token_file)
        .with_context(|| format!("cannot read {}", args.admin_token_file.display()))?
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let api = Api {
        base: base_url(&args.admin),
        token,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    match args.command {
        AdminCommand::Status => {
            let v = api.call("GET", "/admin/status", None).await?;
            print(out, &v, |v| {
                let mut lines = Vec::new();
                for n in v["nodes"].as_array().into_iter().flatten() {
                    lines.push(format!(
                        "{}  v{}  up {}s  endpoints {}  calls {}  {}",
                        n["node"].as_str().unwrap_or("?"),
                        n["version"].as_str().unwrap_or("?"),
                        n["uptime_ms"].as_u64().unwrap_or(0) / 1000,
                        n["endpoints"],
                        n["calls"],
                        if n["draining"].as_bool().unwrap_or(false) {
                            "draining"
                        } else if n["ready"].as_bool().unwrap_or(false) {
                            "ready"
                        } else {
                            "degraded"
                        }
                    ));
                }
                lines.extend(missing(v));
                lines
            });
        }
        AdminCommand::Sessions {
            user,
            mut after,
            limit,
            all,
        } => loop {
            let mut path = format!("/admin/sessions?limit={limit}");
            if let Some(u) = &user {
                path.push_str(&format!("&user={}", encode(u)));
            }
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", encode(a)));
            }
            let v = api.call("GET", &path, None).await?;
            print(out, &v, |v| {
                let mut lines = Vec::new();
                for s in v["sessions"].as_array().into_iter().flatten() {
                    lines.push(format!(
                        "{}  {}  {}  {}  from {}  calls {}  {}",
                        s["endpoint"].as_str().unwrap_or("?"),
                        s["user"].as_str().unwrap_or("?"),
                        s["device"].as_str().unwrap_or("?"),
                        s["node"].as_str().unwrap_or("?"),
                        s["remote_addr"].as_str().unwrap_or("?"),
                        s["calls"],
                        s["state"].as_str().unwrap_or("?"),
                    ));
                }
                if let Some(next) = v["next"].as_str().filter(|_| !all) {
                    lines.push(format!("more: --after {next}"));
                }
                lines.extend(missing(v));
                lines
            });
            match v["next"].as_str() {
                Some(next) if all => after = Some(next.to_owned()),
                _ => break,
            }
        },
        AdminCommand::User { user } => {
            let v = api
                .call("GET", &format!("/admin/users/{}", encode(&user)), None)
                .await?;
            print(out, &v, |v| {
                let mut lines = vec![format!(
                    "{}  {}",
                    v["user"].as_str().unwrap_or("?"),
                    v["availability"].as_str().unwrap_or("?")
                )];
                for e in v["endpoints"].as_array().into_iter().flatten() {
                    lines.push(format!(
                        "  #{} {}  {}  {}  idle {}  on {}",
                        e["rank"],
                        e["endpoint"].as_str().unwrap_or("?"),
                        e["device"].as_str().unwrap_or("?"),
                        e["activity"].as_str().unwrap_or("?"),
                        e["idle_ms"]
                            .as_u64()
                            .map_or("-".to_owned(), |ms| format!("{}s", ms / 1000)),
                        e["node"].as_str().unwrap_or("?"),
                    ));
                }
                lines
            });
        }
        AdminCommand::Kick {
            user,
            endpoint,
            reason,
        } => {
            let body = json!({ "user": user, "endpoint": endpoint, "reason": reason });
            let v = api.call("POST", "/admin/kick", Some(body)).await?;
            print(out, &v, |v| {
                let mut lines = vec![format!("kicked {}", v["kicked"])];
                lines.extend(missing(v));
                lines
            });
        }
        AdminCommand::Drain { deadline_ms } => {
            let v = api
                .call(
                    "POST",
                    "/admin/drain",
                    Some(json!({ "deadline_ms": deadline_ms })),
                )
                .await?;
            print(out, &v, |v| {
                vec![format!(
                    "draining: {} endpoints; the node stops when they have left or in {} ms",
                    v["endpoints"], v["deadline_ms"]
                )]
            });
        }
        AdminCommand::Reload => {
            let v = api.call("POST", "/admin/reload", None).await?;
            print(out, &v, reload_lines);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A reload's report, one line per kind and key.
fn reload_lines(v: &Value) -> Vec<String> {
    let names = |field: &str| -> Vec<String> {
        v[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect()
    };
    let mut lines = Vec::new();
    for (field, label) in [
        ("applied", "applied"),
        ("restart_needed", "needs a restart"),
        ("reloaded", "file read again"),
    ] {
        lines.extend(names(field).into_iter().map(|k| format!("{label}: {k}")));
    }
    for f in v["failed"].as_array().into_iter().flatten() {
        lines.push(format!(
            "failed: {}: {} (the old value stays)",
            f["what"].as_str().unwrap_or("?"),
            f["error"].as_str().unwrap_or("?")
        ));
    }
    if lines.is_empty() {
        lines.push("nothing changed".to_owned());
    }
    lines
}

struct Api {
    base: String,
    token: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Api {
    /// One request; the JSON of a 2xx answer, or an error with the API's own `error` text.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token));
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&b)?)
            }
            None => Bytes::new(),
        };
        let resp = self
            .client
            .request(req.body(Full::new(payload))?)
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(
            |_| json!({ "error": String::from_utf8_lossy(&bytes).trim().to_owned() }),
        );
        if !status.is_success() {
            let why = v["error"].as_str().unwrap_or("no detail");
            anyhow::bail!(
                "{} {}: {why}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
        }
        Ok(v)
    }
}

/// `host:port` or a URL, as the base of the API's URLs.
fn base_url(admin: &str) -> String {
    let base = if admin.starts_with("http://") || admin.starts_with("https://") {
        admin.to_owned()
    } else {
        format!("http://{admin}")
    };
    base.trim_end_matches('/').to_owned()
}

/// Percent-encodes what a SIP URI or an id may hold in a path or a query.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The "no answer from" line of a cluster-wide answer, when some node was silent.
fn missing(v: &Value) -> Option<String> {
    let nodes: Vec<&str> = v["missing_nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    (!nodes.is_empty()).then(|| format!("no answer from: {}", nodes.join(", ")))
}

fn print(out: &Output, v: &Value, text: impl FnOnce(&Value) -> Vec<String>) {
    if out.json() {
        out.raw_line(&v.to_string());
    } else {
        for line in text(v) {
            out.raw_line(&line);
        }
    }
}
