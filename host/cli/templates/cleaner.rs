//! A cleaner plugin for tuneforge: every text passes through `clean` when data is read.
//!
//! This example collapses whitespace. Change `clean`.

use tuneforge_plugin_sdk::{Cleaner, PluginError, export_cleaner};

struct MyCleaner;

impl Cleaner for MyCleaner {
    fn new() -> Result<Self, PluginError> {
        Ok(Self)
    }

    fn clean(&mut self, text: &str) -> Result<String, PluginError> {
        Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

export_cleaner!(MyCleaner);
