//! The confab node: an actor per endpoint, conversation and call leg, presence shards that rank
//! endpoints, and a fork arbiter per forked call, on actix over tokio.
//!
//! Entry point: [`node::spawn_node`] with [`settings::Settings`].

pub mod address_limits;
pub mod admin;
pub mod arbiter;
pub mod auth;
pub mod call;
pub mod connection_task;
pub mod context;
pub mod directory;
pub mod endpoint;
pub mod fork;
pub mod heartbeat;
pub mod http;
pub mod ids;
pub mod link;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod presence;
pub mod ratelimit;
pub mod reasons;
pub mod refusal;
pub mod relay;
pub mod reload;
pub mod route;
pub mod session;
pub mod settings;
pub mod tls;
pub mod transport;
pub mod websocket;

pub use node::{NodeError, RunningNode, spawn_node};
pub use settings::Settings;
