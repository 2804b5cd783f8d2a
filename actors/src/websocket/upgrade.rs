//! The WebSocket listener's HTTP side: reads one request head, and either upgrades it (the
//! right path, the upgrade headers, an allowed `Origin`), serves a page from `static_dir`, or
//! answers with the HTTP status that says what was wrong, counted by reason.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::messages::{WsFrames, WsWriter, split};
use crate::context::Ctx;
use crate::metrics as m;
use crate::settings::WebSocket;
use crate::transport::ClientStream;

/// Longest request head read (a browser's upgrade request is well under 2 KiB).
const MAX_HEAD: usize = 8192;

/// Most headers a request may have.
const MAX_HEADERS: usize = 48;

/// The subprotocol a client may ask for; selected when asked for, never required.
pub const SUBPROTOCOL: &str = "confab.v1";

/// The WebSocket layer's read buffer, allocated up front: small, so an idle endpoint stays
/// cheap (a larger message grows it). 4 KiB cost 10.5 KB per idle endpoint against 7.5 KB
/// for 1 KiB, at the same message rate (BENCHMARKS.md).
const WS_READ_BUFFER: usize = 1024;

/// Encoded messages the WebSocket layer gathers before writing them out: the writer task
/// sends a batch of frames and then flushes, so a batch goes out in one write (0 would write
/// every message on its own: a system call each, and a sixth of TCP's message rate).
const WS_WRITE_BUFFER: usize = 64 * 1024;

/// What one request asked for.
#[derive(Debug, PartialEq)]
enum Verdict {
    Upgrade { key: String, subprotocol: bool },
    Page(String),
    Refuse(Refused),
}

/// A request refused: its HTTP status and the metric's reason.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Refused {
    BadRequest,
    Origin,
    NotFound,
    Method,
    UpgradeRequired,
    Version,
    /// A page asked for on a resumed TLS session whose client certificate no longer verifies.
    ClientCertificate,
}

impl Refused {
    fn status(self) -> &'static str {
        match self {
            Refused::BadRequest => "400 Bad Request",
            Refused::Origin | Refused::ClientCertificate => "403 Forbidden",
            Refused::NotFound => "404 Not Found",
            Refused::Method => "405 Method Not Allowed",
            Refused::UpgradeRequired | Refused::Version => "426 Upgrade Required",
        }
    }

    /// The label of `confab_websocket_rejections_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::BadRequest => "bad_request",
            Refused::Origin => "origin",
            Refused::NotFound => "not_found",
            Refused::Method => "method",
            Refused::UpgradeRequired => "upgrade_required",
            Refused::Version => "version",
            Refused::ClientCertificate => "client_certificate",
        }
    }

    const ALL: [Refused; 7] = [
        Refused::BadRequest,
        Refused::Origin,
        Refused::NotFound,
        Refused::Method,
        Refused::UpgradeRequired,
        Refused::Version,
        Refused::ClientCertificate,
    ];
}

/// Every reason `confab_websocket_rejections_total` counts (handshake and messages).
pub fn rejection_labels() -> impl Iterator<Item = &'static str> {
    Refused::ALL.into_iter().map(Refused::label).chain([
        "text_message",
        "too_large",
        "empty",
        "protocol",
    ])
}

/// Serves one connection of the WebSocket listener up to the upgrade: the upgraded socket as
/// frames and writer, or `None` once a page or a refusal has been answered. `stale_certificate`:
/// the connection resumed a TLS session whose client certificate no longer verifies
/// (`tls::Accepted`); a page, which needs no `hello`, is refused to it, while an upgrade goes
/// on and its `hello` is refused saying why.
pub async fn accept(
    mut stream: ClientStream,
    ctx: &Ctx,
    peer: std::net::SocketAddr,
    stale_certificate: bool,
) -> Option<(WsFrames, WsWriter)> {
    let settings = ctx.settings.server.websocket.as_ref()?;
    let tls = ctx.tls.is_some();
    let mut head = Vec::with_capacity(1024);
    let verdict = match read_head(&mut stream, &mut head).await {
        Ok(true) => judge(&head, settings, tls),
        Ok(false) => Verdict::Refuse(Refused::BadRequest),
        Err(_) => return None,
    };
    let verdict = match verdict {
        Verdict::Page(_) if stale_certificate => Verdict::Refuse(Refused::ClientCertificate),
        verdict => verdict,
    };
    match verdict {
        Verdict::Upgrade { key, subprotocol } => {
            let mut reply = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                derive_accept_key(key.as_bytes())
            );
            if subprotocol {
                reply.push_str(&format!("Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"));
            }
            reply.push_str("\r\n");
            stream.write_all(reply.as_bytes()).await.ok()?;
            metrics::counter!(m::WEBSOCKET_UPGRADES).increment(1);
            let max = ctx.settings.server.max_frame as usize;
            let config = WebSocketConfig::default()
                .read_buffer_size(WS_READ_BUFFER)
                .write_buffer_size(WS_WRITE_BUFFER)
                .max_message_size(Some(max))
                .max_frame_size(Some(max));
            let socket = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
            let hello_max = ctx.settings.server.max_hello_frame.min(max as u32) as usize;
            Some(split(socket, hello_max))
        }
        Verdict::Page(path) => {
            super::pages::serve(&mut stream, &settings.static_dir, &path).await;
            None
        }
        Verdict::Refuse(why) => {
            tracing::debug!(%peer, reason = why.label(), "WebSocket request refused");
            metrics::counter!(m::WEBSOCKET_REJECTIONS, "reason" => why.label()).increment(1);
            let extra = match why {
                Refused::UpgradeRequired => "Upgrade: websocket\r\n",
                Refused::Version => "Sec-WebSocket-Version: 13\r\n",
                _ => "",
            };
            let reply = format!(
                "HTTP/1.1 {}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n",
                why.status()
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
            None
        }
    }
}

/// Answers a connection over `server.max_connections` with 503 (a plain listener; with TLS
/// nothing can be said before a handshake).
pub async fn refuse_overloaded(mut stream: tokio::net::TcpStream) {
    let reply = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // The request is read first (what fits at once): closing over unread bytes would
        // reset the connection before the client reads the answer.
        let mut head = [0u8; 2048];
        let _ = stream.read(&mut head).await;
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Reads up to the end of the request head: `Ok(false)` when it is too long, or when more
/// than the head arrived (a client must wait for the `101` before it sends frames).
async fn read_head(stream: &mut ClientStream, head: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(end + 4 == head.len());
        }
        if head.len() > MAX_HEAD {
            return Ok(false);
        }
    }
}

/// Decides what the request head asks for, by the listener's settings.
fn judge(head: &[u8], settings: &WebSocket, tls: bool) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let (Ok(httparse::Status::Complete(_)), Some(method), Some(target)) =
        (req.parse(head), req.method, req.path.map(str::to_owned))
    else {
        return Verdict::Refuse(Refused::BadRequest);
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    // A header sent twice counts as one list (RFC 9110 §5.3).
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if method != "GET" {
        return Verdict::Refuse(Refused::Method);
    }
    if path != settings.path {
        return if settings.static_dir.is_empty() {
            Verdict::Refuse(Refused::NotFound)
        } else {
            Verdict::Page(path.to_owned())
        };
    }
    if !has_token("upgrade", "websocket") {
        return Verdict::Refuse(Refused::UpgradeRequired);
    }
    if !has_token("connection", "upgrade") {
        return Verdict::Refuse(Refused::BadRequest);
    }
    if header("sec-websocket-version") != Some("13") {
        return Verdict::Refuse(Refused::Version);
    }
    let Some(key) = header("sec-websocket-key").filter(|k| is_key(k)) else {
        return Verdict::Refuse(Refused::BadRequest);
    };
    if let Some(origin) = header("origin")
        && !origin_allowed(origin, header("host"), &settings.allowed_origins, tls)
    {
        return Verdict::Refuse(Refused::Origin);
    }
    Verdict::Upgrade {
        key: key.to_owned(),
        subprotocol: has_token("sec-websocket-protocol", SUBPROTOCOL),
    }
}

/// A `Sec-WebSocket-Key`: 16 bytes in base64, so 24 characters ending in `==`.
fn is_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// An origin is let in when it is listed (or `*` is), or when it is this listener itself
/// (the page came from `static_dir`): the scheme of the listener and the request's `Host`.
fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String], tls: bool) -> bool {
    let listed = allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin));
    let scheme = if tls { "https" } else { "http" };
    let same = host.is_some_and(|h| origin.eq_ignore_ascii_case(&format!("{scheme}://{h}")));
    listed || same
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(origins: &[&str], pages: bool) -> WebSocket {
        WebSocket {
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            static_dir: if pages { "web".into() } else { String::new() },
            ..WebSocket::new("127.0.0.1:0".parse().expect("address"))
        }
    }

    fn request(path: &str, extra: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: node.example:5080\r\n{extra}\r\n").into_bytes()
    }

    const UPGRADE: &str = "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    #[test]
    fn each_request_gets_its_verdict() {
        let s = settings(&["https://chat.example.com"], false);
        let upgrade =
            |extra: &str| judge(&request("/confab", &format!("{UPGRADE}{extra}")), &s, false);
        assert!(matches!(
            upgrade(""),
            Verdict::Upgrade {
                subprotocol: false,
                ..
            }
        ));
        assert!(matches!(
            upgrade("Sec-WebSocket-Protocol: other, confab.v1\r\n"),
            Verdict::Upgrade {
                subprotocol: true,
                ..
            }
        ));
        assert!(matches!(
            upgrade("Origin: https://chat.example.com\r\n"),
            Verdict::Upgrade { .. }
        ));
        assert!(matches!(
            upgrade("Origin: http://node.example:5080\r\n"),
            Verdict::Upgrade { .. }
        ));
        assert_eq!(
            upgrade("Origin: https://evil.example\r\n"),
            Verdict::Refuse(Refused::Origin)
        );
        assert_eq!(
            judge(&request("/confab", ""), &s, false),
            Verdict::Refuse(Refused::UpgradeRequired)
        );
        assert_eq!(
            judge(&request("/confab", &UPGRADE.replace("13", "8")), &s, false),
            Verdict::Refuse(Refused::Version)
        );
        assert_eq!(
            judge(
                &request(
                    "/confab",
                    &UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")
                ),
                &s,
                false
            ),
            Verdict::Refuse(Refused::BadRequest)
        );
        assert_eq!(
            judge(&request("/other", UPGRADE), &s, false),
            Verdict::Refuse(Refused::NotFound)
        );
        assert_eq!(
            judge(b"POST /confab HTTP/1.1\r\n\r\n", &s, false),
            Verdict::Refuse(Refused::Method)
        );
        assert_eq!(
            judge(b"garbage\r\n\r\n", &s, false),
            Verdict::Refuse(Refused::BadRequest)
        );
        let pages = settings(&[], true);
        assert_eq!(
            judge(&request("/index.html?x=1", ""), &pages, false),
            Verdict::Page("/index.html".into())
        );
    }

    #[test]
    fn a_star_lets_every_origin_in_and_tls_changes_the_own_origin() {
        assert!(origin_allowed(
            "https://any.example",
            None,
            &["*".into()],
            false
        ));
        assert!(origin_allowed("https://node:1", Some("node:1"), &[], true));
        assert!(!origin_allowed("http://node:1", Some("node:1"), &[], true));
    }
}
