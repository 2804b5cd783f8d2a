//! The operations port: `GET /metrics` (Prometheus text format, with the process's own
//! metrics), `GET /health` (200 while serving, 503 "draining" while draining, 503 "degraded"
//! while a cluster node has lost NATS or its directory writes cannot land), and the probes
//! `GET /livez` (200 while the process serves) and `GET /readyz` (200 while it takes sign-ins:
//! 503 while draining or degraded).
//! Two fixed routes on a loopback-facing port do not justify an HTTP framework; this reads one
//! request line and answers with `Connection: close`. At most `metrics.max_connections` are
//! served at once (more wait in the listen backlog), each for at most
//! `metrics.request_timeout_ms`.

use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::context::NodeCtx;

/// The pause after a failed accept (out of files, most likely), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the operations port until the node stops.
pub async fn serve(listener: TcpListener, handle: Option<PrometheusHandle>, ctx: Arc<NodeCtx>) {
    let slots = Arc::new(Semaphore::new(ctx.settings.metrics.max_connections));
    let timeout = Duration::from_millis(ctx.settings.metrics.request_timeout_ms);
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
        let handle = handle.clone();
        let ctx = ctx.clone();
        actix_rt::spawn(async move {
            let _ = tokio::time::timeout(timeout, answer(stream, handle, ctx)).await;
            drop(slot);
        });
    }
}
/// Why the node does not take sign-ins now: draining, or (in a cluster) NATS or the directory
/// unusable; `None` when it does.
fn not_ready(ctx: &NodeCtx) -> Option<&'static str> {
    if ctx.is_draining() {
        return Some("draining");
    }
    ctx.link
        .as_ref()
        .filter(|l| !l.healthy())
        .map(|_| "degraded")
}

async fn answer(mut stream: TcpStream, handle: Option<PrometheusHandle>, ctx: Arc<NodeCtx>) {
    let mut buf = vec![0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let path = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" => {
            crate::metrics::collect_process();
            (
                "200 OK",
                "text/plain; version=0.0.4",
                handle.map(|h| h.render()).unwrap_or_default(),
            )
        }
        // Liveness: the process serves. A supervisor restarts a node on this one only, never
        // for a NATS outage or a drain.
        "/livez" => ("200 OK", "text/plain", "ok\n".to_owned()),
        // Readiness: the node takes sign-ins. A load balancer stops sending clients on 503.
        // `/health` is the same, with the body it always had.
        "/readyz" | "/health" => match not_ready(&ctx) {
            Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
            None if path == "/readyz" => ("200 OK", "text/plain", "ready\n".to_owned()),
            None => ("200 OK", "text/plain", "ok\n".to_owned()),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
