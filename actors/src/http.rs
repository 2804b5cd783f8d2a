//! The operations port, on axum: `GET /metrics` (Prometheus text format, with the process's own
//! metrics), `GET /health` (200 while serving, 503 "draining" while draining, 503 "degraded"
//! while a cluster node has lost NATS or its directory writes cannot land), the probes
//! `GET /livez` (200 while the process serves) and `GET /readyz` (200 while it takes sign-ins:
//! 503 while draining or degraded), and, with `[admin] token_file`, the admin API under
//! `/admin/` (`admin/http.rs`).
//!
//! Connections are accepted here rather than by `axum::serve` so the port keeps its two limits:
//! at most `metrics.max_connections` are served at once (more wait in the listen backlog), each
//! for at most `metrics.request_timeout_ms`, after which hyper drops it.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::context::NodeCtx;

/// The pause after a failed accept (out of files, most likely), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Ops {
    handle: Option<PrometheusHandle>,
    ctx: Arc<NodeCtx>,
}

/// Serves the operations port until the node stops.
pub async fn serve(listener: TcpListener, handle: Option<PrometheusHandle>, ctx: Arc<NodeCtx>) {
    let slots = Arc::new(Semaphore::new(ctx.settings.metrics.max_connections));
    let timeout = Duration::from_millis(ctx.settings.metrics.request_timeout_ms);
    let app = router(handle, ctx.clone());
    loop {
        // A connection is accepted only when a slot is free: over the limit, scrapers wait in
        // the listen backlog (their own timeout bounds the wait), holding nothing of the node.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "the operations port cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        actix_rt::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(timeout, conn).await;
            drop(slot);
        });
    }
}

fn router(handle: Option<PrometheusHandle>, ctx: Arc<NodeCtx>) -> Router {
    let admin = crate::admin::http::router(ctx.clone());
    let ops = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .with_state(Ops { handle, ctx });
    match admin {
        Some(admin) => ops.merge(admin),
        None => ops,
    }
    .fallback(|| async { text(StatusCode::NOT_FOUND, "not found\n".to_owned()) })
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn metrics(State(ops): State<Ops>) -> Response {
    crate::metrics::collect_process();
    let body = ops.handle.map(|h| h.render()).unwrap_or_default();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

/// Liveness: the process serves. A supervisor restarts a node on this one only, never for a
/// NATS outage or a drain.
async fn livez() -> Response {
    text(StatusCode::OK, "ok\n".to_owned())
}

/// Readiness: the node takes sign-ins. A load balancer stops sending clients on 503.
async fn readyz(State(ops): State<Ops>) -> Response {
    match not_ready(&ops.ctx) {
        Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        None => text(StatusCode::OK, "ready\n".to_owned()),
    }
}

/// `/readyz` with the body `/health` always had.
async fn health(State(ops): State<Ops>) -> Response {
    match not_ready(&ops.ctx) {
        Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        None => text(StatusCode::OK, "ok\n".to_owned()),
    }
}

/// Why the node does not take sign-ins now: draining, or (in a cluster) NATS or the directory
/// unusable; `None` when it does.
pub(crate) fn not_ready(ctx: &NodeCtx) -> Option<&'static str> {
    if ctx.is_draining() {
        return Some("draining");
    }
    ctx.link
        .as_ref()
        .filter(|l| !l.healthy())
        .map(|_| "degraded")
}
