//! The `confab` command-line client, one module per subcommand; `out` prints, `session` signs in
//! and holds what every subcommand shares (call printing, stdin lines).

pub mod admin;
pub mod chat;
pub mod listen;
pub mod out;
pub mod presence;
pub mod send;
pub mod session;

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning (a panicking printer must not silence the others).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
