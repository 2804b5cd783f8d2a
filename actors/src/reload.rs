//! Reloading a running node's settings (SIGHUP, or `POST /admin/reload`): the settings are read
//! again (by the binary, which owns files and the environment), and each key that changed is
//! applied at once if it can be, or reported as needing a restart. A file that does not load
//! changes nothing and says why. The files the settings name (the TLS certificate and key, the
//! token keys, the admin token) are read again too, each on its own.
//!
//! What applies live (docs/operations.md, "Reloading settings"): the limits every new request,
//! call or connection reads (`LIVE_KEYS`), the fork timers and forward limit of new calls, and
//! the log level (the binary applies it).

use arc_swap::ArcSwap;
use serde::Serialize;
use std::sync::{Arc, Mutex, OnceLock};

use crate::admin::AdminToken;
use crate::auth::Verifier;
use crate::link::Link;
use crate::settings::{Fork, Limits, Settings};
use crate::tls::ServerTls;

/// The settings actors read as they go, swapped whole on reload.
#[derive(Debug, Clone)]
pub struct Live {
    pub limits: Limits,
    pub fork: Fork,
}

impl Live {
    pub fn of(s: &Settings) -> Live {
        Live {
            limits: s.limits.clone(),
            fork: s.fork.clone(),
        }
    }
}

/// Keys applied at once on reload: read through [`Live`] by every new request, call or
/// connection (a connection's outbound queue and a call's fork timers keep the values they
/// started with).
pub const LIVE_KEYS: &[&str] = &[
    "limits.outbound_queue",
    "limits.outbound_queue_bytes",
    "limits.calls_per_endpoint",
    "limits.subscriptions_per_endpoint",
    "limits.unacked_per_call",
    "limits.requests_per_second",
    "limits.request_burst",
    "limits.presence_updates_per_second",
    "limits.presence_update_burst",
    "fork.toast_timeout_ms",
    "fork.auto_accept_grace_ms",
    "fork.max_forwards",
    "log.level",
];

/// Reads the settings file and the environment again, validated.
pub type LoadSettings = Box<dyn Fn() -> Result<Settings, String> + Send + Sync>;
/// Sets a new `log.level`.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How the binary reads the settings again and sets the log level.
pub struct Reloader {
    /// The settings file and the environment, read again and validated.
    pub load: LoadSettings,
    /// Applies a new `log.level`; an error (a filter that does not parse) leaves the old one.
    pub log_level: SetLogLevel,
}

/// What a reload did, key by key.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys whose new value is in force.
    pub applied: Vec<String>,
    /// Keys whose new value takes a restart (the node keeps running with the old one).
    pub restart_needed: Vec<String>,
    /// Files read again: `tls` (the certificate and key), `token_keys`, `admin_token`,
    /// `link_tls` (the link certificate, key and CA).
    pub reloaded: Vec<String>,
    /// What failed, with why (the old value stays).
    pub failed: Vec<Failed>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failed {
    pub what: String,
    pub error: String,
}

/// Everything a reload touches, shared by the node's context and its handle.
pub struct Reloadables {
    pub live: ArcSwap<Live>,
    /// The settings the node runs with (restart-only keys keep their start-up value).
    current: Mutex<Settings>,
    pub tls: Option<Arc<ServerTls>>,
    pub verifier: Arc<Verifier>,
    pub admin_token: Option<Arc<AdminToken>>,
    /// Set by the binary; without it (a node embedded with settings of its own) a reload only
    /// reads the files again.
    pub reloader: OnceLock<Reloader>,
    /// The cluster, once joined: its own files (link TLS) are read again with the node's.
    pub link: OnceLock<Arc<dyn Link>>,
    /// Held for a whole reload: a SIGHUP and `POST /admin/reload` at once must not interleave,
    /// or the one that read the files first could swap them in last.
    reloading: Mutex<()>,
}

impl Reloadables {
    pub fn new(
        settings: &Settings,
        tls: Option<Arc<ServerTls>>,
        verifier: Arc<Verifier>,
        admin_token: Option<Arc<AdminToken>>,
    ) -> Reloadables {
        Reloadables {
            live: ArcSwap::from_pointee(Live::of(settings)),
            current: Mutex::new(settings.clone()),
            tls,
            verifier,
            admin_token,
            reloader: OnceLock::new(),
            link: OnceLock::new(),
            reloading: Mutex::new(()),
        }
    }

    /// Reloads: the settings (when the binary said how) and the files. `Err` when the
    /// settings do not load: then nothing changed.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = ReloadReport::default();
        if let Some(r) = self.reloader.get() {
            let new = (r.load)()?;
            self.apply(&new, r, &mut report);
        }
        self.reload_files(&mut report);
        Ok(report)
    }

    fn apply(&self, new: &Settings, r: &Reloader, report: &mut ReloadReport) {
        let mut current = match self.current.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        for key in changed_keys(&current, new) {
            if !LIVE_KEYS.contains(&key.as_str()) {
                report.restart_needed.push(key);
            } else if key == "log.level" {
                match (r.log_level)(&new.log.level) {
                    Ok(()) => report.applied.push(key),
                    Err(error) => report.failed.push(Failed { what: key, error }),
                }
            } else {
                report.applied.push(key);
            }
        }
        if report.applied.is_empty() {
            return;
        }
        current.limits = new.limits.clone();
        current.fork = new.fork.clone();
        if report.applied.iter().any(|k| k == "log.level") {
            current.log.level = new.log.level.clone();
        }
        self.live.store(Arc::new(Live::of(&current)));
    }

    fn reload_files(&self, report: &mut ReloadReport) {
        let mut outcome = |what: &str, result: Result<bool, String>| match result {
            Ok(true) => report.reloaded.push(what.to_owned()),
            Ok(false) => {}
            Err(error) => report.failed.push(Failed {
                what: what.to_owned(),
                error,
            }),
        };
        if let Some(tls) = &self.tls {
            outcome(
                "tls",
                tls.reload().map(|()| true).map_err(|e| e.to_string()),
            );
        }
        outcome(
            "token_keys",
            self.verifier.reload().map_err(|e| e.to_string()),
        );
        if let Some(t) = &self.admin_token {
            outcome(
                "admin_token",
                t.reload().map(|()| true).map_err(|e| e.to_string()),
            );
        }
        if let Some(link) = self.link.get() {
            for (what, result) in link.reload_files() {
                outcome(what, result);
            }
        }
    }
}

/// The `section.key` names whose values differ between `old` and `new`, in order.
pub fn changed_keys(old: &Settings, new: &Settings) -> Vec<String> {
    let (Ok(old), Ok(new)) = (toml::Table::try_from(old), toml::Table::try_from(new)) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    let sections: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for section in sections {
        match (old.get(section), new.get(section)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for name in names {
                    if a.get(name) != b.get(name) {
                        keys.push(format!("{section}.{name}"));
                    }
                }
            }
            (a, b) if a != b => keys.push(section.clone()),
            _ => {}
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Settings {
        Settings::load(text, []).expect("valid")
    }

    #[test]
    fn changed_keys_name_each_key_and_a_section_that_appears() {
        let old = load("");
        let new = load(
            "[limits]\ncalls_per_endpoint = 3\n[fork]\ntoast_timeout_ms = 2000\n[server]\nlisten = \"127.0.0.1:5999\"\n[cluster]\nnats_url = \"nats://x:4222\"\n",
        );
        assert_eq!(
            changed_keys(&old, &new),
            [
                "cluster",
                "fork.toast_timeout_ms",
                "limits.calls_per_endpoint",
                "server.listen"
            ]
        );
        assert!(changed_keys(&old, &old).is_empty());
    }

    fn reloadables(start: &Settings, next: Settings) -> Reloadables {
        let r = Reloadables::new(
            start,
            None,
            Arc::new(Verifier::from_settings(&start.auth).expect("keys")),
            None,
        );
        let next = Mutex::new(Some(next));
        let _ = r.reloader.set(Reloader {
            load: Box::new(move || {
                next.lock()
                    .ok()
                    .and_then(|mut n| n.take())
                    .ok_or_else(|| "configuration: no such file".to_owned())
            }),
            log_level: Box::new(|level| {
                // The settings check a filter's form; the binary may still fail to apply one.
                if level == "trace" {
                    Err("the filter would not apply".to_owned())
                } else {
                    Ok(())
                }
            }),
        });
        r
    }

    #[test]
    fn live_keys_apply_and_the_others_are_reported_for_a_restart() {
        let start = load("");
        let r = reloadables(
            &start,
            load(
                "[limits]\nrequests_per_second = 7\n[server]\nmax_connections = 77\n[log]\nlevel = \"debug\"\n",
            ),
        );
        let report = r.reload().expect("loads");
        assert_eq!(report.applied, ["limits.requests_per_second", "log.level"]);
        assert_eq!(report.restart_needed, ["server.max_connections"]);
        assert_eq!(report.reloaded, Vec::<String>::new());
        assert_eq!(r.live.load().limits.requests_per_second, 7);
    }

    #[test]
    fn a_file_that_does_not_load_changes_nothing() {
        let start = load("");
        let r = reloadables(&start, load(""));
        r.reload().expect("first loads");
        let e = r.reload().expect_err("the second finds no file");
        assert!(e.contains("no such file"), "{e}");
        assert_eq!(
            r.live.load().limits.requests_per_second,
            start.limits.requests_per_second
        );
    }

    #[test]
    fn a_log_level_that_does_not_apply_fails_alone() {
        let start = load("");
        let r = reloadables(
            &start,
            load("[log]\nlevel = \"trace\"\n[fork]\nmax_forwards = 2\n"),
        );
        let report = r.reload().expect("loads");
        assert_eq!(report.applied, ["fork.max_forwards"]);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].what, "log.level");
    }
}
