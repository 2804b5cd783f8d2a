//! confab actors.
