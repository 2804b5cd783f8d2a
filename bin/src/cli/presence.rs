//! `confab presence set` and `confab presence watch`.
//!
//! A device state belongs to the endpoint that publishes it and goes with it; `presence set`
//! signs in an endpoint of its own, so its device state lasts only while it stays signed in
//! (`--hold`). The manual status is the user's and outlives it while any other endpoint of the
//! user is signed in.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::anyhow;
use clap::ArgGroup;
use confab_client::presence::PresenceUpdate;
use confab_client::{Activity, AutoAcceptPolicy, Status};
use serde_json::json;

use super::out::{Output, Tone};
use super::session::{self, Session};

/// A device's activity, as `device_state` publishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivityArg {
    Active,
    Inactive,
    Away,
}

impl From<ActivityArg> for Activity {
    fn from(a: ActivityArg) -> Self {
        match a {
            ActivityArg::Active => Activity::Active,
            ActivityArg::Inactive => Activity::Inactive,
            ActivityArg::Away => Activity::Away,
        }
    }
}

impl ActivityArg {
    pub fn as_str(self) -> &'static str {
        match self {
            ActivityArg::Active => "active",
            ActivityArg::Inactive => "inactive",
            ActivityArg::Away => "away",
        }
    }
}

/// A manual status, spelt as on the wire (the kebab-case spelling works too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum StatusArg {
    Available,
    Busy,
    #[value(alias = "do-not-disturb")]
    DoNotDisturb,
    #[value(alias = "be-right-back")]
    BeRightBack,
    Away,
    #[value(alias = "appear-offline")]
    AppearOffline,
}

impl From<StatusArg> for Status {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Available => Status::Available,
            StatusArg::Busy => Status::Busy,
            StatusArg::DoNotDisturb => Status::DoNotDisturb,
            StatusArg::BeRightBack => Status::BeRightBack,
            StatusArg::Away => Status::Away,
            StatusArg::AppearOffline => Status::AppearOffline,
        }
    }
}

#[derive(clap::Args)]
#[command(group(
    ArgGroup::new("what")
        .required(true)
        .multiple(true)
        .args(["activity", "status", "clear_status"])
))]
pub struct SetArgs {
    /// This device's activity (it lasts while this command's endpoint is signed in: --hold).
    #[arg(long, value_enum)]
    pub activity: Option<ActivityArg>,
    /// With --activity: milliseconds since the user's last input on this device.
    #[arg(long, default_value_t = 0, requires = "activity")]
    pub idle_ms: u64,
    /// The user's manual status, for all their devices (cleared when their last one signs out).
    #[arg(long, value_enum, conflicts_with = "clear_status")]
    pub status: Option<StatusArg>,
    /// Clear the user's manual status.
    #[arg(long)]
    pub clear_status: bool,
    /// Stay signed in (printing the user's presence as it changes) until Ctrl-C.
    #[arg(long)]
    pub hold: bool,
}

pub async fn set(session: &Session, out: &Arc<Output>, args: SetArgs) -> anyhow::Result<ExitCode> {
    let endpoint = session.sign_in(AutoAcceptPolicy::Notify).await?;
    session::decline_incoming(&endpoint, Arc::clone(out));
    if let Some(activity) = args.activity {
        endpoint
            .publish_device_state(activity.into(), args.idle_ms)
            .await?;
    }
    if args.clear_status {
        endpoint.set_status(None).await?;
    } else if let Some(status) = args.status {
        endpoint.set_status(Some(status.into())).await?;
    }
    // The node applies a user's presence messages in order, so the first update of this
    // subscription already shows what was just published.
    let mut updates = endpoint.subscribe([endpoint.user()]).await?;
    let ctrl_c = session::interrupted();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Some(update) => {
                    print_presence(out, &update);
                    if !args.hold {
                        break;
                    }
                }
                None => return Err(anyhow!("the connection to the node closed")),
            },
            _ = &mut ctrl_c => break,
        }
    }
    endpoint.bye().await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn watch(
    session: &Session,
    out: &Arc<Output>,
    users: &[String],
    count: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let endpoint = session.sign_in(AutoAcceptPolicy::Notify).await?;
    session::decline_incoming(&endpoint, Arc::clone(out));
    let mut updates = endpoint.subscribe(users).await?;
    let mut seen = 0u64;
    let ctrl_c = session::interrupted();
    tokio::pin!(ctrl_c);
    while count.is_none_or(|count| seen < count) {
        tokio::select! {
            update = updates.recv() => match update {
                Some(update) => {
                    print_presence(out, &update);
                    seen += 1;
                }
                None => return Err(anyhow!("the connection to the node closed")),
            },
            _ = &mut ctrl_c => break,
        }
    }
    endpoint.bye().await?;
    Ok(ExitCode::SUCCESS)
}

/// `<user>: <availability>`, then for one's own user the manual status and the ranked
/// endpoints, one per line.
fn print_presence(out: &Output, update: &PresenceUpdate) {
    out.event(
        || {
            let mut text = format!(
                "{}: {}",
                out.paint(Tone::Who, &update.user),
                json_name(&update.availability)
            );
            if let Some(status) = &update.status {
                let status = status.as_ref().map_or("none".to_owned(), json_name);
                text.push_str(&out.paint(Tone::Dim, &format!(" (status: {status})")));
            }
            for e in update.endpoints.iter().flatten() {
                let idle = e
                    .idle_ms
                    .map_or("never published".to_owned(), |ms| format!("idle {ms} ms"));
                let most = if update.most_active.as_deref() == Some(e.endpoint.as_str()) {
                    "  <- most active"
                } else {
                    ""
                };
                text.push_str(&format!(
                    "\n  {}. {} {} {}, {idle}{most}",
                    e.rank,
                    e.device,
                    out.paint(Tone::Dim, &e.endpoint),
                    json_name(&e.activity),
                ));
            }
            text
        },
        || {
            let mut event = json!({
                "event": "presence",
                "user": update.user,
                "availability": update.availability,
            });
            // What only the user's own endpoints are told is left out for everyone else.
            if update.endpoints.is_some() || update.status.is_some() {
                event["most_active"] = json!(update.most_active);
                event["endpoints"] = json!(update.endpoints);
                event["status"] = json!(update.status.flatten());
            }
            event
        },
    );
}

/// The wire name of one of the protocol's enums.
fn json_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_owned(),
    }
}
