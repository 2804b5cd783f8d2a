//! Reading a node's `/metrics` the way Prometheus does: one plain HTTP GET on the operations
//! port, parsed into `(series, value)` samples. Shared by the limits and soak suites.
//!
//! The recorder is process-wide, so every node a test binary starts reports into the same
//! counters; tests compare a counter before and after, never its absolute value.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One scrape of `/metrics`.
pub struct Metrics {
    samples: Vec<(String, String, f64)>,
}

impl Metrics {
    /// Sum of the samples of `name` whose labels include every `(key, value)` of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether the node exports `name` at all.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// Sum of every sample, of any metric, one of whose label values is `value`: how a limit
    /// shows whatever the metric is called (e.g. `reason="endpoints_per_user"`).
    pub fn labelled(&self, value: &str) -> f64 {
        let needle = format!("=\"{value}\"");
        self.samples
            .iter()
            .filter(|(_, l, _)| l.split(',').any(|p| p.ends_with(&needle)))
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// `GET /metrics` on `addr`.
pub fn scrape(addr: Option<SocketAddr>) -> Metrics {
    let addr = addr.expect("the node exports metrics");
    let mut s = TcpStream::connect(addr).expect("metrics port");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: confab\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.to_owned(), labels.to_owned(), value))
        })
        .collect();
    Metrics { samples }
}
