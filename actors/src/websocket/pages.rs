//! The files of `[server.websocket] static_dir` (the web client), served on GET beside the
//! upgrade path: one response per connection, only regular files inside the folder, never a
//! hidden file or a path that climbs out of it.

use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

use crate::transport::ClientStream;

/// Largest file served (the web client's files are a few kilobytes).
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// Answers `GET path` from `dir`: the file, or 404.
pub async fn serve(stream: &mut ClientStream, dir: &str, path: &str) {
    let reply = match read(dir, path).await {
        Some((body, kind)) => {
            let mut head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            head.extend_from_slice(&body);
            head
        }
        None => {
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = stream.write_all(&reply).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn read(dir: &str, path: &str) -> Option<(Vec<u8>, &'static str)> {
    let file = resolve(Path::new(dir), path)?;
    // Symbolic links are followed only while they stay inside the folder.
    let root = tokio::fs::canonicalize(dir).await.ok()?;
    let real = tokio::fs::canonicalize(&file).await.ok()?;
    let meta = tokio::fs::metadata(&real).await.ok()?;
    if !real.starts_with(&root) || !meta.is_file() || meta.len() > MAX_FILE {
        return None;
    }
    let body = tokio::fs::read(&real).await.ok()?;
    Some((body, content_type(&real)))
}

/// The file a request path names under `dir` (`/` is `index.html`), or `None` when a segment
/// is empty, hidden, `..`, or holds a backslash or a percent escape.
fn resolve(dir: &Path, path: &str) -> Option<PathBuf> {
    let rel = path.strip_prefix('/')?;
    let rel = if rel.is_empty() || rel.ends_with('/') {
        format!("{rel}index.html")
    } else {
        rel.to_owned()
    };
    let mut file = dir.to_path_buf();
    for seg in rel.split('/') {
        if seg.is_empty() || seg.starts_with('.') || seg.contains(['\\', '%', '\0']) {
            return None;
        }
        file.push(seg);
    }
    Some(file)
}

fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_folder() {
        let dir = Path::new("web");
        assert_eq!(resolve(dir, "/"), Some(dir.join("index.html")));
        assert_eq!(resolve(dir, "/app.js"), Some(dir.join("app.js")));
        assert_eq!(resolve(dir, "/a/b.mjs"), Some(dir.join("a").join("b.mjs")));
        for bad in [
            "/../secret",
            "/a/../../x",
            "/.git/config",
            "//etc/passwd",
            "/a%2e%2e/x",
            "x",
        ] {
            assert_eq!(resolve(dir, bad), None, "{bad}");
        }
    }
}
