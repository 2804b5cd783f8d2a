//! Latency histograms and the bench's output: a table for people, one JSON object for tools.

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// Microsecond latencies from 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 60_000_000);
    let _ = h.record(us);
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// A scenario's figures.
pub struct Report {
    pub scenario: &'static str,
    pub throughput_per_s: f64,
    pub latency: Histogram<u64>,
    pub extra: Map<String, Value>,
}

impl Report {
    pub fn new(scenario: &'static str, throughput_per_s: f64, latency: Histogram<u64>) -> Self {
        Report {
            scenario,
            throughput_per_s,
            latency,
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "scenario": self.scenario,
            "throughput_per_s": round(self.throughput_per_s),
            "p50_ms": round(ms(&self.latency, 0.5)),
            "p99_ms": round(ms(&self.latency, 0.99)),
            "p999_ms": round(ms(&self.latency, 0.999)),
            "samples": self.latency.len(),
        });
        if let Value::Object(map) = &mut v {
            map.extend(self.extra.clone());
        }
        v
    }

    pub fn table(&self) -> String {
        let mut out = format!("confab-bench {}\n", self.scenario);
        let row = |k: &str, v: String| format!("  {k:<24} {v}\n");
        out += &row("throughput/s", format!("{:.0}", self.throughput_per_s));
        out += &row("latency p50 ms", format!("{:.3}", ms(&self.latency, 0.5)));
        out += &row("latency p99 ms", format!("{:.3}", ms(&self.latency, 0.99)));
        out += &row(
            "latency p99.9 ms",
            format!("{:.3}", ms(&self.latency, 0.999)),
        );
        out += &row("samples", self.latency.len().to_string());
        for (k, v) in &self.extra {
            out += &row(k, v.to_string());
        }
        out
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
