//! Lock helpers. The library's std mutexes guard plain data with no invariant a panic could
//! break half-way, so a poisoned lock is still safe to use and must not take the caller down.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, ignoring poisoning (see the module doc).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
