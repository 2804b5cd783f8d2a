//! confab client.
