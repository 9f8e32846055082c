//! A saved model together with the plugins it needs at inference: the cleaners it was trained
//! with and its features plugin, loaded from the model directory itself (`plugins.json`,
//! `plugins/<name>/`), so that `predict`, `eval` and the server see text exactly as training
//! did.

use std::path::Path;

use tuneforge_core::hooks::{Hook, ModelPluginEntry, OnError};
use tuneforge_core::{ClassifierModel, CoreError, EvalReport, Hooks, MODEL_PLUGINS_FILE, Prediction, evaluate_with};
use tuneforge_data::Example;

use crate::hooks::Adapter;
use crate::{PluginKind, PluginRuntime, PluginSetup};

/// A model and its inference plugins. Shareable: the plugins sit behind a lock that is held
/// only while they run, never during the model's forward pass.
pub struct Predictor {
    model: ClassifierModel,
    hooks: std::sync::Mutex<Hooks>,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor").field("model", &self.model.meta().labels).finish_non_exhaustive()
    }
}

fn plugin_err(message: String) -> CoreError {
    CoreError::Plugin { message }
}

/// The plugins a model directory lists, loaded and verified (hash as recorded).
pub fn load_model_plugins(runtime: &PluginRuntime, dir: &Path, labels: &[String]) -> tuneforge_core::Result<Hooks> {
    let list = dir.join(MODEL_PLUGINS_FILE);
    let mut hooks = Hooks::default();
    if !list.exists() {
        return Ok(hooks);
    }
    let text = std::fs::read_to_string(&list).map_err(|e| CoreError::file(&list, e.to_string()))?;
    let entries: Vec<ModelPluginEntry> =
        serde_json::from_str(&text).map_err(|e| CoreError::file(&list, format!("line {}: {e}", e.line())))?;
    for e in entries {
        let setup = PluginSetup { config: e.config.clone(), labels: labels.to_vec(), assets: Default::default() };
        let instance =
            runtime.load(&dir.join("plugins").join(&e.name), setup).map_err(|e| plugin_err(e.to_string()))?;
        if instance.installed().sha256 != e.sha256 {
            return Err(CoreError::file(
                &list,
                format!("plugin `{}` does not match the hash recorded at training", e.name),
            ));
        }
        match instance.kind() {
            PluginKind::Cleaner => {
                hooks.cleaners.push(Hook::new(e.name, 1.0, OnError::Stop, Box::new(Adapter(instance))))
            }
            PluginKind::Features => {
                hooks.features = Some(Hook::new(e.name, 1.0, OnError::Stop, Box::new(Adapter(instance))))
            }
            other => {
                return Err(CoreError::file(
                    &list,
                    format!("plugin `{}` is a {other} plugin, not needed at inference", e.name),
                ));
            }
        }
    }
    Ok(hooks)
}

impl Predictor {
    /// Loads the model in `dir` and its inference plugins.
    pub fn load(runtime: &PluginRuntime, dir: &Path) -> tuneforge_core::Result<Self> {
        Self::load_on(runtime, dir, &candle_core::Device::Cpu)
    }

    /// [`Predictor::load`] with the model on `device` (plugins run on the host).
    pub fn load_on(runtime: &PluginRuntime, dir: &Path, device: &candle_core::Device) -> tuneforge_core::Result<Self> {
        let model = ClassifierModel::load_on(dir, device)?;
        let hooks = load_model_plugins(runtime, dir, model.labels())?;
        if let Some(f) = &model.meta().fusion
            && hooks.features.as_ref().is_none_or(|h| h.name != f.plugin)
        {
            return Err(CoreError::file(
                dir,
                format!("the model fuses features from `{}`, which it does not carry", f.plugin),
            ));
        }
        Ok(Self { model, hooks: std::sync::Mutex::new(hooks) })
    }

    pub fn model(&self) -> &ClassifierModel {
        &self.model
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, Hooks> {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names of the plugins applied before the model.
    pub fn plugin_names(&self) -> Vec<String> {
        let hooks = self.hooks();
        let cleaners = hooks.cleaners.iter().map(|h| h.name.clone());
        cleaners.chain(hooks.features.iter().map(|h| h.name.clone())).collect()
    }

    /// Predictions for texts: cleaned, featurised, classified.
    pub fn predict(&self, texts: &[String], batch_size: usize) -> tuneforge_core::Result<Vec<Prediction>> {
        let (cleaned, features) = {
            let mut hooks = self.hooks();
            let cleaned = texts.iter().map(|t| hooks.clean(t)).collect::<tuneforge_core::Result<Vec<_>>>()?;
            let features = match &self.model.meta().fusion {
                Some(f) => Some(hooks.feature_rows(cleaned.iter().map(String::as_str), f.features.len())?),
                None => None,
            };
            (cleaned, features)
        };
        self.model.predict_with_features(&cleaned, features.as_deref(), batch_size)
    }

    /// Evaluation on labelled examples, cleaned as in training.
    pub fn evaluate(&self, examples: &[Example], batch_size: usize) -> tuneforge_core::Result<EvalReport> {
        let mut hooks = self.hooks();
        let mut examples = examples.to_vec();
        for e in &mut examples {
            e.text = hooks.clean(&e.text)?;
        }
        evaluate_with(&self.model, &examples, batch_size, &mut hooks)
    }
}
