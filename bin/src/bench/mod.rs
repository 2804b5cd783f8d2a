//! confab-bench's scenarios and what they share: a raw connection, reports, progress.

pub mod bare;
pub mod bare_calls;
pub mod calls;
pub mod conn;
pub mod idle;
pub mod messages;
pub mod presence;
pub mod report;
pub mod resume;
pub mod stream;
pub mod ws;

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A short random tag so users of one run never collide with a previous run's.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    format!("{:x}{:x}", nanos, std::process::id())
}

/// A progress bar on a terminal (stderr), nothing when piped.
pub struct Progress {
    enabled: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            enabled: !quiet && std::io::stderr().is_terminal(),
        }
    }

    fn bar(&self, len: u64, template: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar
    }

    /// Shows elapsed time and a live counter for `duration`, then returns.
    pub async fn run_for(&self, duration: Duration, count: Arc<AtomicU64>) {
        let secs = duration.as_secs().max(1);
        let bar = self.bar(secs, "{bar:40} {pos}/{len}s {msg}");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        for _ in 0..secs {
            tick.tick().await;
            bar.inc(1);
            bar.set_message(format!("{} done", count.load(Ordering::Relaxed)));
        }
        let rest = duration.saturating_sub(Duration::from_secs(secs));
        tokio::time::sleep(rest).await;
        bar.finish_and_clear();
    }

    /// Shows `count` out of `total` until aborted.
    pub fn spawn_counter(&self, total: u64, count: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
        let bar = self.bar(total, "{bar:40} {pos}/{len} {per_sec}");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                bar.set_position(count.load(Ordering::Relaxed));
                if bar.position() >= total {
                    bar.finish_and_clear();
                    return;
                }
            }
        })
    }
}
