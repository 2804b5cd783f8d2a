//! confab tests.
