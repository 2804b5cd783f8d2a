//! confab binaries.
