//! What every handler shares: the store, the token, the loaded models and the counters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tuneforge_core::ClassifierModel;
use tuneforge_store::Store;

use crate::prometheus::Counters;

pub struct AppState {
    pub store: Store,
    pub token: String,
    /// Models loaded once and kept warm, by (name, version).
    pub models: Mutex<HashMap<(String, i64), Arc<ClassifierModel>>>,
    pub counters: Arc<Counters>,
}

impl AppState {
    pub fn new(store: Store, token: String) -> Self {
        Self { store, token, models: Mutex::new(HashMap::new()), counters: Arc::new(Counters::default()) }
    }
}
