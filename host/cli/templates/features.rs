//! A feature-extractor plugin for tuneforge: numbers from a record (a JSON object with at
//! least `text`), fused with the text embedding by the host.
//!
//! This example returns the number of words and of digits. Change `describe` and `extract`.

use tuneforge_plugin_sdk::{Features, PluginError, export_features};

struct MyFeatures;

/// The `text` field of a record like `{"text": "..."}` (a real plugin may use serde_json).
fn text_of(record: &str) -> &str {
    record.split_once("\"text\"").map_or(record, |(_, rest)| rest)
}

impl Features for MyFeatures {
    fn new() -> Result<Self, PluginError> {
        Ok(Self)
    }

    fn describe(&self) -> Vec<String> {
        vec!["words".into(), "digits".into()]
    }

    fn extract(&mut self, record_json: &str) -> Result<Vec<f32>, PluginError> {
        let text = text_of(record_json);
        let words = text.split_whitespace().count() as f32;
        let digits = text.chars().filter(char::is_ascii_digit).count() as f32;
        Ok(vec![words, digits])
    }
}

export_features!(MyFeatures);
