//! Calls: the per-leg call actor and the conversation that groups an endpoint's calls.

pub mod conversation;
pub mod leg;
pub mod offer;
pub mod unacked;
