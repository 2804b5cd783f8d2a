//! The admin API's routes on the operations port, behind the bearer token of
//! `[admin] token_file` (no token, no routes): sessions, one user's endpoints as the arbiter
//! ranks them, node status, kick, drain. In a cluster each query is answered for the whole
//! cluster, and names the nodes that did not answer within `admin.cluster_timeout_ms`.
//! docs/operations.md ("The admin API") is the reference.

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query as UrlQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use confab_protocol::uri::normalize_user_uri;
use confab_protocol::{EndpointPresence, ServerMsg};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

use super::{Answer, MAX_PAGE, NodeStatus, Query, Session, answer_here};
use crate::context::Ctx;
use crate::endpoint::EndpointMsg;
use crate::metrics as m;
use crate::presence::UserView;
use crate::route::EndpointRef;

/// What the client of a kicked session is told when the operator gives no reason.
const DEFAULT_KICK_REASON: &str = "Signed out by an operator";
/// What every client of a draining node is told.
const DRAIN_REASON: &str = "Node draining; reconnect to another node";
/// Sessions a page lists when `limit` is not given.
const DEFAULT_PAGE: usize = 100;

/// The admin routes, or None when no token is configured.
pub fn router(ctx: Ctx) -> Option<Router> {
    ctx.reloadables.admin_token.as_ref()?;
    Some(
        Router::new()
            .route("/admin/status", get(status))
            .route("/admin/sessions", get(sessions))
            .route("/admin/users/{user}", get(user))
            .route("/admin/kick", post(kick))
            .route("/admin/drain", post(drain))
            .route("/admin/reload", post(reload))
            .route_layer(middleware::from_fn_with_state(ctx.clone(), authorize))
            .with_state(ctx),
    )
}

/// 401 for a missing or wrong token, with no detail, counted.
async fn authorize(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (given, ctx.admin_token()) {
        (Some(given), Some(token)) => same(given.as_bytes(), token.as_bytes()),
        _ => false,
    };
    if !ok {
        return answer(
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            json!({"error": "unauthorized"}),
        );
    }
    next.run(req).await
}

/// Compares in time that depends on the length only, so the token cannot be guessed byte by
/// byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON answer, counted by `result`.
fn answer(result: &'static str, status: StatusCode, body: serde_json::Value) -> Response {
    metrics::counter!(m::ADMIN_REQUESTS, "result" => result).increment(1);
    let mut r = axum::Json(body).into_response();
    *r.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

fn bad_request(why: &str) -> Response {
    answer(
        "bad_request",
        StatusCode::BAD_REQUEST,
        json!({ "error": why }),
    )
}

/// `q` answered by this node and, in a cluster, by every other node it knows: the answers,
/// and the nodes that did not answer in time.
async fn everywhere(ctx: &Ctx, q: Query) -> (Vec<Answer>, Vec<String>) {
    let here = answer_here(ctx, q.clone()).await;
    let Some(link) = &ctx.link else {
        return (vec![here], Vec::new());
    };
    let timeout = Duration::from_millis(ctx.settings.admin.cluster_timeout_ms);
    let mut others = link.ask_other_nodes(&q, timeout).await;
    others.answers.push(here);
    others.missing.sort();
    (others.answers, others.missing)
}

async fn status(State(ctx): State<Ctx>) -> Response {
    let (answers, missing) = everywhere(&ctx, Query::Status).await;
    let mut nodes: Vec<NodeStatus> = answers
        .into_iter()
        .filter_map(|a| match a {
            Answer::Status(s) => Some(s),
            _ => None,
        })
        .collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    answer(
        "ok",
        StatusCode::OK,
        json!({ "node": ctx.node_id, "nodes": nodes, "missing_nodes": missing }),
    )
}

#[derive(Deserialize)]
struct SessionsParams {
    user: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct SessionsPage {
    sessions: Vec<Session>,
    /// Pass as `after` for the next page; null on the last.
    next: Option<String>,
    missing_nodes: Vec<String>,
}

async fn sessions(
    State(ctx): State<Ctx>,
    params: Result<UrlQuery<SessionsParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(UrlQuery(p)) = params else {
        return bad_request("user, after and limit are the parameters; limit is a number");
    };
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return bad_request(&format!("limit must be 1-{MAX_PAGE}"));
    }
    let user = match p.user.as_deref().map(normalize_user_uri).transpose() {
        Ok(u) => u,
        Err(_) => return bad_request("user is not a SIP URI"),
    };
    let q = Query::Sessions {
        user,
        after: p.after,
        limit,
    };
    let (answers, missing) = everywhere(&ctx, q).await;
    let mut more = false;
    let mut all: Vec<Session> = Vec::new();
    for a in answers {
        if let Answer::Sessions(s) = a {
            // A node that filled its page may hold more after it.
            more |= s.len() >= limit;
            all.extend(s);
        }
    }
    all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    more |= all.len() > limit;
    all.truncate(limit);
    let next = if more {
        all.last().map(|s| s.endpoint.clone())
    } else {
        None
    };
    let page = SessionsPage {
        sessions: all,
        next,
        missing_nodes: missing,
    };
    answer(
        "ok",
        StatusCode::OK,
        serde_json::to_value(page).unwrap_or_default(),
    )
}

/// One endpoint of a user as `GET /admin/users/{user}` shows it: the presence view's entry
/// (its effective activity, idle time and rank) and the node it is on.
#[derive(Serialize)]
struct RankedEndpoint {
    #[serde(flatten)]
    presence: EndpointPresence,
    node: String,
}

async fn user(State(ctx): State<Ctx>, Path(user): Path<String>) -> Response {
    let Ok(user) = normalize_user_uri(&user) else {
        return bad_request("user is not a SIP URI");
    };
    let view = ctx
        .presence
        .for_user(&user)
        .send(UserView { user: user.clone() })
        .await
        .ok()
        .flatten();
    let Some(ServerMsg::Presence {
        availability,
        most_active,
        endpoints,
        status,
        ..
    }) = view
    else {
        return answer(
            "not_found",
            StatusCode::NOT_FOUND,
            json!({ "error": "the user has no endpoint signed in" }),
        );
    };
    let entries = ctx.directory.endpoints_of(&user);
    let ranked: Vec<RankedEndpoint> = endpoints
        .unwrap_or_default()
        .into_iter()
        .map(|presence| {
            let node = entries
                .iter()
                .find(|e| *e.id == *presence.endpoint)
                .map(|e| match &e.addr {
                    EndpointRef::Local(_) => ctx.node_id.clone(),
                    EndpointRef::Remote { node, .. } => node.clone(),
                })
                .unwrap_or_default();
            RankedEndpoint { presence, node }
        })
        .collect();
    answer(
        "ok",
        StatusCode::OK,
        json!({
            "user": user,
            "availability": availability,
            "status": status,
            "most_active": most_active,
            "endpoints": ranked,
        }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KickRequest {
    user: Option<String>,
    endpoint: Option<String>,
    reason: Option<String>,
}

async fn kick(
    State(ctx): State<Ctx>,
    body: Result<axum::Json<KickRequest>, JsonRejection>,
) -> Response {
    let Ok(axum::Json(req)) = body else {
        return bad_request(
            "the body must be JSON: {\"user\": …} or {\"endpoint\": …}, and an optional \"reason\"",
        );
    };
    let user = match (&req.user, &req.endpoint) {
        (Some(u), None) => match normalize_user_uri(u) {
            Ok(u) => Some(u),
            Err(_) => return bad_request("user is not a SIP URI"),
        },
        (None, Some(_)) => None,
        _ => return bad_request("name exactly one of user and endpoint"),
    };
    let reason = req
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_KICK_REASON.to_owned());
    if reason.len() > 200 {
        return bad_request("reason must be at most 200 bytes");
    }
    let q = Query::Kick {
        user,
        endpoint: req.endpoint,
        reason,
    };
    let (answers, missing) = everywhere(&ctx, q).await;
    let kicked: usize = answers
        .iter()
        .map(|a| match a {
            Answer::Kicked(n) => *n,
            _ => 0,
        })
        .sum();
    if kicked == 0 {
        return answer(
            "not_found",
            StatusCode::NOT_FOUND,
            json!({ "error": "no such session", "kicked": 0, "missing_nodes": missing }),
        );
    }
    answer(
        "ok",
        StatusCode::OK,
        json!({ "kicked": kicked, "missing_nodes": missing }),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    deadline_ms: Option<u64>,
}

/// Drains this node: no more sign-ins (`/readyz` says draining), every client told to
/// reconnect elsewhere, and the node stops once the last endpoint is gone or at the deadline
/// (then as on SIGTERM: the calls left end with 503).
async fn drain(
    State(ctx): State<Ctx>,
    body: Result<axum::Json<DrainRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(axum::Json(r)) => r,
        // No body at all is a drain with the default deadline.
        Err(JsonRejection::MissingJsonContentType(_)) => DrainRequest::default(),
        Err(_) => return bad_request("the body must be JSON: {\"deadline_ms\": …} or nothing"),
    };
    let deadline_ms = req
        .deadline_ms
        .unwrap_or(ctx.settings.admin.drain_deadline_ms);
    if !ctx.start_draining() {
        return answer(
            "conflict",
            StatusCode::CONFLICT,
            json!({ "error": "the node is draining already" }),
        );
    }
    let endpoints = ctx.directory.all();
    tracing::info!(
        endpoints = endpoints.len(),
        deadline_ms,
        "an operator started a drain"
    );
    for e in &endpoints {
        if let Some(a) = e.addr.local() {
            a.do_send(EndpointMsg::DrainNotice {
                reason: DRAIN_REASON.to_owned(),
            });
        }
    }
    let waiting = ctx.clone();
    actix_rt::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(deadline_ms);
        let empty = tokio::time::timeout_at(deadline, async {
            while !waiting.directory.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match empty {
            Ok(()) => tracing::info!("drained: the last endpoint left; stopping"),
            Err(_) => tracing::info!("drain deadline reached; stopping"),
        }
        waiting.request_stop();
    });
    answer(
        "ok",
        StatusCode::ACCEPTED,
        json!({ "draining": true, "endpoints": endpoints.len(), "deadline_ms": deadline_ms }),
    )
}

/// Reloads as SIGHUP does: the settings file and environment read again, each changed key
/// applied or reported as needing a restart, and the files the settings name read again. A
/// file that does not load changes nothing: 400 with why.
async fn reload(State(ctx): State<Ctx>) -> Response {
    let reloadables = ctx.reloadables.clone();
    let result = tokio::task::spawn_blocking(move || reloadables.reload()).await;
    match result {
        Ok(Ok(report)) => {
            tracing::info!(?report, "an operator reloaded the settings");
            answer(
                "ok",
                StatusCode::OK,
                serde_json::to_value(report).unwrap_or_default(),
            )
        }
        Ok(Err(why)) => {
            tracing::warn!(%why, "reload refused: nothing changed");
            answer(
                "bad_request",
                StatusCode::BAD_REQUEST,
                json!({ "error": why, "changed": false }),
            )
        }
        Err(_) => answer(
            "bad_request",
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "error": "the reload did not finish" }),
        ),
    }
}
