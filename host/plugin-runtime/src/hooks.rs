//! The bridge to the training core: an experiment's `[[plugins]]` become [`Hooks`].

use std::path::PathBuf;

use tuneforge_core::hooks::{
    AugmentHook, CleanHook, FeatureHook, Hook, HookResult, InferencePlugin, LossHook, LossInput, LossValue, MetricHook,
    MetricInput,
};
use tuneforge_core::{CoreError, ExperimentConfig, HookFactory, Hooks, PluginLineage, PluginSpec};

use crate::{PluginError, PluginInstance, PluginKind, PluginRuntime, PluginSetup, config_pairs, installed_dir};

/// Builds a run's hooks with the plugin runtime, finding plugins by name in `home`.
#[derive(Debug)]
pub struct RuntimeHooks {
    runtime: std::sync::OnceLock<PluginRuntime>,
    pub home: PathBuf,
}

impl RuntimeHooks {
    /// With a runtime started now.
    pub fn new(home: PathBuf) -> Result<Self, PluginError> {
        let runtime = std::sync::OnceLock::new();
        let _ = runtime.set(PluginRuntime::new()?);
        Ok(Self { runtime, home })
    }

    /// Starts the runtime only when an experiment lists plugins.
    pub fn lazy(home: PathBuf) -> Self {
        Self { runtime: std::sync::OnceLock::new(), home }
    }

    fn runtime(&self) -> Result<&PluginRuntime, PluginError> {
        if let Some(r) = self.runtime.get() {
            return Ok(r);
        }
        let r = PluginRuntime::new()?;
        Ok(self.runtime.get_or_init(|| r))
    }

    /// Loads one `[[plugins]]` entry.
    pub fn load(&self, spec: &PluginSpec, labels: &[String]) -> Result<PluginInstance, PluginError> {
        let path = match (&spec.name, &spec.path) {
            (_, Some(p)) => p.clone(),
            (Some(name), None) => installed_dir(&self.home, name)?,
            (None, None) => return Err(PluginError::Engine("a [[plugins]] entry needs `name` or `path`".into())),
        };
        let setup = PluginSetup {
            config: config_pairs(&spec.config),
            labels: labels.to_vec(),
            assets: spec.assets.clone().into_iter().collect(),
        };
        self.runtime()?.load(&path, setup)
    }
}

fn plugin_err(e: PluginError) -> CoreError {
    CoreError::Plugin { message: e.to_string() }
}

impl HookFactory for RuntimeHooks {
    fn build(&self, cfg: &ExperimentConfig, labels: &[String]) -> tuneforge_core::Result<Hooks> {
        let mut hooks = Hooks::default();
        for spec in &cfg.plugins {
            let instance = self.load(spec, labels).map_err(plugin_err)?;
            let m = &instance.installed().manifest;
            hooks.lineage.push(PluginLineage {
                name: m.name.clone(),
                version: m.version.clone(),
                kind: m.kind.to_string(),
                sha256: instance.installed().sha256.clone(),
                api_version: m.api_version.clone(),
            });
            let name = m.name.clone();
            let (w, e) = (spec.weight, spec.on_error);
            if matches!(instance.kind(), PluginKind::Cleaner | PluginKind::Features) {
                hooks.inference.push(inference_plugin(&instance, config_pairs(&spec.config)));
            }
            match instance.kind() {
                PluginKind::Loss => hooks.losses.push(Hook::new(name, w, e, Box::new(Adapter(instance)))),
                PluginKind::Metric => hooks.metrics.push(Hook::new(name, w, e, Box::new(Adapter(instance)))),
                PluginKind::Cleaner => hooks.cleaners.push(Hook::new(name, w, e, Box::new(Adapter(instance)))),
                PluginKind::Augment => hooks.augmenters.push(Hook::new(name, w, e, Box::new(Adapter(instance)))),
                PluginKind::Features => {
                    if let Some(other) = &hooks.features {
                        return Err(CoreError::Plugin {
                            message: format!(
                                "plugins `{}` and `{name}` both extract features; a run fuses one features plugin",
                                other.name
                            ),
                        });
                    }
                    hooks.features = Some(Hook::new(name, w, e, Box::new(Adapter(instance))));
                }
            }
        }
        Ok(hooks)
    }
}

/// What a model directory keeps of a plugin it needs at inference.
pub(crate) fn inference_plugin(instance: &PluginInstance, config: Vec<(String, String)>) -> InferencePlugin {
    let installed = instance.installed();
    let mut manifest = installed.manifest.clone();
    manifest.wasm = Some("plugin.wasm".into());
    InferencePlugin {
        name: manifest.name.clone(),
        kind: manifest.kind.to_string(),
        sha256: installed.sha256.clone(),
        manifest_toml: manifest.to_toml(),
        wasm_path: installed.wasm_path.clone(),
        config,
    }
}

/// A plugin instance seen through one of the core's hook traits.
pub(crate) struct Adapter(pub(crate) PluginInstance);

impl LossHook for Adapter {
    fn compute(&mut self, input: &LossInput<'_>) -> HookResult<LossValue> {
        self.0
            .compute_loss(input.rows, input.classes, input.logits, input.labels, input.texts)
            .map(|a| LossValue { value: a.value, grad: a.grad })
            .map_err(|e| e.to_string())
    }
}

impl MetricHook for Adapter {
    fn evaluate(&mut self, input: &MetricInput<'_>) -> HookResult<Vec<(String, f64)>> {
        self.0.evaluate_metric(input.rows, input.classes, input.probabilities, input.labels).map_err(|e| e.to_string())
    }
}

impl CleanHook for Adapter {
    fn clean(&mut self, text: &str) -> HookResult<String> {
        self.0.clean(text).map_err(|e| e.to_string())
    }
}

impl AugmentHook for Adapter {
    fn augment(&mut self, text: &str, label: &str, seed: u64) -> HookResult<Vec<(String, Option<String>)>> {
        self.0.augment(text, Some(label), seed).map_err(|e| e.to_string())
    }
}

impl FeatureHook for Adapter {
    fn names(&mut self) -> HookResult<Vec<String>> {
        self.0.feature_names().map_err(|e| e.to_string())
    }

    fn extract(&mut self, record_json: &str, n: usize) -> HookResult<Vec<f32>> {
        self.0.extract_features(record_json, n).map_err(|e| e.to_string())
    }
}
