//! The operator's view of a node and what an operator can do to it: the questions the admin
//! API asks (`Query`), the answers a node gives about itself (`Answer`, worked out here from
//! its directory and its endpoint actors), and, for a cluster, the same questions asked of
//! every node through the [`Link`](crate::link::Link). The HTTP side is `admin/http.rs`.

pub mod http;

use serde::{Deserialize, Serialize};

use crate::context::Ctx;
use crate::endpoint::{Describe, EndpointMsg};

/// Why the admin token cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read admin.token_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("admin.token_file {path} holds no token (its first line is empty)")]
    Empty { path: String },
}

/// The admin API's bearer token, read from `admin.token_file` (its first line, trimmed) at
/// start and again on SIGHUP.
pub struct AdminToken {
    path: String,
    current: std::sync::RwLock<String>,
}

impl AdminToken {
    pub fn load(path: &str) -> Result<AdminToken, TokenError> {
        Ok(AdminToken {
            path: path.to_owned(),
            current: std::sync::RwLock::new(read_token(path)?),
        })
    }

    /// Reads the file again; a file that does not load leaves the old token.
    pub fn reload(&self) -> Result<(), TokenError> {
        let token = read_token(&self.path)?;
        match self.current.write() {
            Ok(mut t) => *t = token,
            Err(p) => *p.into_inner() = token,
        }
        Ok(())
    }

    pub fn get(&self) -> String {
        match self.current.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

fn read_token(path: &str) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// Most sessions one page of `GET /admin/sessions` lists.
pub const MAX_PAGE: usize = 1000;

/// One signed-in endpoint, as `GET /admin/sessions` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub node: String,
    pub user: String,
    pub device: String,
    pub endpoint: String,
    /// The client's address (the one a trusted PROXY header gave, if any).
    pub remote_addr: String,
    /// When it signed in, unix ms.
    pub since_unix_ms: u64,
    /// Calls it holds now.
    pub calls: usize,
    /// `active`; `held` while its connection is gone and the session waits for a resume;
    /// `ending` once it is signing out.
    pub state: String,
}

/// What a node says of itself in `GET /admin/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub uptime_ms: u64,
    /// Endpoints signed in on this node.
    pub endpoints: usize,
    /// Call legs on this node.
    pub calls: usize,
    pub draining: bool,
    /// Takes sign-ins (what `/readyz` says).
    pub ready: bool,
}

/// A question the admin API asks a node (every node, in a cluster).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Query {
    /// Its sessions, of `user` if given, with endpoint ids after `after`, at most `limit`, in
    /// endpoint id order.
    Sessions {
        user: Option<String>,
        after: Option<String>,
        limit: usize,
    },
    Status,
    /// Ends the sessions of `endpoint`, or of every endpoint of `user`, telling each client
    /// `reason`.
    Kick {
        user: Option<String>,
        endpoint: Option<String>,
        reason: String,
    },
}

/// A node's answer to a [`Query`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    Sessions(Vec<Session>),
    Status(NodeStatus),
    /// How many endpoints it kicked.
    Kicked(usize),
}

/// Answers `q` for this node alone.
pub async fn answer_here(ctx: &Ctx, q: Query) -> Answer {
    match q {
        Query::Sessions { user, after, limit } => {
            Answer::Sessions(sessions_here(ctx, user.as_deref(), after.as_deref(), limit).await)
        }
        Query::Status => Answer::Status(status_here(ctx)),
        Query::Kick {
            user,
            endpoint,
            reason,
        } => {
            let mut kicked = 0;
            for e in ctx.directory.all() {
                let wanted = endpoint.as_deref().is_some_and(|id| id == &*e.id)
                    || user.as_deref().is_some_and(|u| *u == *e.user);
                if let (true, Some(addr)) = (wanted, e.addr.local()) {
                    addr.do_send(EndpointMsg::Kick {
                        reason: reason.clone(),
                    });
                    kicked += 1;
                }
            }
            if kicked > 0 {
                tracing::info!(?user, ?endpoint, kicked, %reason, "an operator kicked sessions");
            }
            Answer::Kicked(kicked)
        }
    }
}

async fn sessions_here(
    ctx: &Ctx,
    user: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Vec<Session> {
    let mut entries: Vec<_> = ctx
        .directory
        .all()
        .into_iter()
        .filter(|e| user.is_none_or(|u| *u == *e.user))
        .filter(|e| after.is_none_or(|a| &*e.id > a))
        .collect();
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out = Vec::with_capacity(entries.len().min(limit));
    for e in entries {
        if out.len() >= limit {
            break;
        }
        let Some(addr) = e.addr.local() else {
            continue;
        };
        // An endpoint gone meanwhile is simply not listed.
        let Ok(d) = addr.send(Describe).await else {
            continue;
        };
        out.push(Session {
            node: ctx.node_id.clone(),
            user: e.user.to_string(),
            device: e.device,
            endpoint: e.id.to_string(),
            remote_addr: d.remote_addr.to_string(),
            since_unix_ms: d.since_unix_ms,
            calls: d.calls,
            state: if d.ending {
                "ending"
            } else if d.held {
                "held"
            } else {
                "active"
            }
            .to_owned(),
        });
    }
    out
}

fn status_here(ctx: &Ctx) -> NodeStatus {
    NodeStatus {
        node: ctx.node_id.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_ms: ctx.started.elapsed().as_millis().min(u64::MAX as u128) as u64,
        endpoints: ctx.directory.len(),
        calls: ctx.legs(),
        draining: ctx.is_draining(),
        ready: crate::http::not_ready(ctx).is_none(),
    }
}
