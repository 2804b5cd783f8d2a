//! The shipped example configuration parses and equals the embedded defaults, so the file
//! documents exactly what a node runs with.

use confab_actors::Settings;

#[test]
fn config_node_toml_is_valid_and_matches_the_defaults() {
    let text = include_str!("../../config/node.toml");
    let file = Settings::load(text, []).expect("config/node.toml is valid");
    let defaults = Settings::default();
    assert_eq!(format!("{file:?}"), format!("{defaults:?}"));
}
