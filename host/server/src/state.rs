//! What every handler shares: the store, the token, the loaded models and the counters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tuneforge_plugin_runtime::PluginRuntime;
use tuneforge_store::Store;

use crate::batcher::GenerationBatcher;
use crate::prometheus::Counters;

pub struct AppState {
    pub store: Store,
    pub token: String,
    /// Models loaded once and kept warm, by (name, version).
    pub models: Mutex<HashMap<(String, i64), Arc<crate::batcher::Batcher>>>,
    pub counters: Arc<Counters>,
    /// Runs the cleaners and feature plugins that models carry; started on first use.
    pub plugins: std::sync::OnceLock<PluginRuntime>,
    /// Registered language models loaded once and kept warm, by (name, version).
    pub generators: Mutex<HashMap<(String, i64), Arc<GenerationBatcher>>>,
    /// The decoder behind `/api/v1/generate` without a `model` (`serve --generator`), and its
    /// source.
    pub generator: Option<Arc<GenerationBatcher>>,
    pub generator_name: Option<String>,
    /// Where the classifiers compute (the CPU unless `serve --device` says otherwise).
    pub device: candle_core::Device,
    /// How each model's micro-batches form.
    pub batch_policy: crate::batcher::BatchPolicy,
}

impl AppState {
    pub fn new(store: Store, token: String) -> Self {
        Self {
            store,
            token,
            models: Mutex::new(HashMap::new()),
            generators: Mutex::new(HashMap::new()),
            counters: Arc::new(Counters::default()),
            plugins: std::sync::OnceLock::new(),
            generator: None,
            generator_name: None,
            device: candle_core::Device::Cpu,
            batch_policy: Default::default(),
        }
    }
}
