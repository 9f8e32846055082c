//! An augmenter plugin for tuneforge: new training examples from each one, deterministic
//! for a seed. The host keeps the original and adds what you return.
//!
//! This example adds a copy with one word dropped. Change `augment`.

use tuneforge_plugin_sdk::{Augment, Example, PluginError, export_augment};

struct MyAugment;

impl Augment for MyAugment {
    fn new() -> Result<Self, PluginError> {
        Ok(Self)
    }

    fn augment(&mut self, example: &Example, seed: u64) -> Result<Vec<Example>, PluginError> {
        let words: Vec<&str> = example.text.split_whitespace().collect();
        if words.len() < 4 {
            return Ok(Vec::new());
        }
        let drop = (seed % words.len() as u64) as usize;
        let text = words.iter().enumerate().filter(|(i, _)| *i != drop).map(|(_, w)| *w).collect::<Vec<_>>().join(" ");
        Ok(vec![Example { text, label: example.label.clone() }])
    }
}

export_augment!(MyAugment);
