//! Extension points: what a training run asks of code outside the core.
//!
//! The core does not know WebAssembly. A run receives [`Hooks`] — loss terms, metrics,
//! cleaners and augmenters behind small traits — and the plugin runtime implements them with
//! sandboxed components. Every hook failure arrives as a message that already names the
//! plugin, the function and the cause; the experiment's `on_error` decides whether the run
//! stops or skips that call.

use serde::{Deserialize, Serialize};

/// What a hook returns: a value, or a message naming the plugin, function and cause.
pub type HookResult<T> = std::result::Result<T, String>;

/// One micro-batch, as a loss hook sees it.
#[derive(Debug, Clone, Copy)]
pub struct LossInput<'a> {
    pub rows: usize,
    pub classes: usize,
    /// Row-major logits, `rows * classes` values.
    pub logits: &'a [f32],
    /// Gold class per row.
    pub labels: &'a [u32],
    /// Text per row.
    pub texts: &'a [String],
}

/// A loss hook's answer: the value and d value / d logits (row-major, `rows * classes`).
#[derive(Debug, Clone, PartialEq)]
pub struct LossValue {
    pub value: f32,
    pub grad: Vec<f32>,
}

/// A loss term computed outside the graph; the trainer adds `weight * sum(logits * grad)`.
pub trait LossHook: Send {
    fn compute(&mut self, input: &LossInput<'_>) -> HookResult<LossValue>;
}

/// Predictions on the validation set, as a metric hook sees them.
#[derive(Debug, Clone, Copy)]
pub struct MetricInput<'a> {
    pub rows: usize,
    pub classes: usize,
    /// Row-major class probabilities.
    pub probabilities: &'a [f32],
    pub labels: &'a [u32],
}

/// Extra evaluation metrics: `(name, value)` pairs.
pub trait MetricHook: Send {
    fn evaluate(&mut self, input: &MetricInput<'_>) -> HookResult<Vec<(String, f64)>>;
}

/// Text cleaning, applied to every text when data is read.
pub trait CleanHook: Send {
    fn clean(&mut self, text: &str) -> HookResult<String>;
}

/// Data augmentation of the training split: new `(text, label)` pairs from one example.
pub trait AugmentHook: Send {
    fn augment(&mut self, text: &str, label: &str, seed: u64) -> HookResult<Vec<(String, Option<String>)>>;
}

/// Numeric features of a record (`{"text": ...}` as JSON), for feature fusion.
pub trait FeatureHook: Send {
    /// The feature names, in order.
    fn names(&mut self) -> HookResult<Vec<String>>;
    /// Exactly `n` finite values.
    fn extract(&mut self, record_json: &str, n: usize) -> HookResult<Vec<f32>>;
}

/// A plugin a trained model needs at inference (a cleaner or a features plugin): saved into
/// the model directory (`plugins/<name>/`, `plugins.json`) so the model stays usable as is.
#[derive(Debug, Clone, PartialEq)]
pub struct InferencePlugin {
    pub name: String,
    pub kind: String,
    pub sha256: String,
    /// The installed manifest, with `wasm = "plugin.wasm"`.
    pub manifest_toml: String,
    pub wasm_path: std::path::PathBuf,
    pub config: Vec<(String, String)>,
}

/// One entry of a model directory's `plugins.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPluginEntry {
    pub name: String,
    pub kind: String,
    pub sha256: String,
    pub config: Vec<(String, String)>,
}

/// What happens when a plugin call fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The run stops with the plugin's error (after keeping what it recorded).
    #[default]
    Stop,
    /// The call is skipped (counted and logged) and the run goes on.
    Skip,
}

/// A hook with the name it reports under and its error policy.
pub struct Hook<T: ?Sized> {
    pub name: String,
    /// For losses: the weight of the term; ignored by other kinds.
    pub weight: f64,
    pub on_error: OnError,
    /// Failed calls skipped so far.
    pub skipped: u64,
    pub hook: Box<T>,
}

impl<T: ?Sized> std::fmt::Debug for Hook<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook").field("name", &self.name).field("weight", &self.weight).finish_non_exhaustive()
    }
}

impl<T: ?Sized> Hook<T> {
    pub fn new(name: impl Into<String>, weight: f64, on_error: OnError, hook: Box<T>) -> Self {
        Self { name: name.into(), weight, on_error, skipped: 0, hook }
    }

    /// Applies the error policy to one call's result: `Ok(None)` when a failure is skipped.
    pub fn policy<R>(&mut self, result: HookResult<R>) -> crate::Result<Option<R>> {
        match result {
            Ok(v) => Ok(Some(v)),
            Err(message) if self.on_error == OnError::Skip => {
                self.skipped += 1;
                tracing::warn!(plugin = %self.name, skipped = self.skipped, "{message} (skipped: on_error = \"skip\")");
                Ok(None)
            }
            Err(message) => Err(crate::CoreError::Plugin { message }),
        }
    }
}

/// Where a plugin came from, recorded in every run's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginLineage {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub api_version: String,
}

/// Everything a run calls out to.
#[derive(Debug, Default)]
pub struct Hooks {
    pub losses: Vec<Hook<dyn LossHook>>,
    pub metrics: Vec<Hook<dyn MetricHook>>,
    pub cleaners: Vec<Hook<dyn CleanHook>>,
    pub augmenters: Vec<Hook<dyn AugmentHook>>,
    /// At most one features plugin, for `[model] fusion`.
    pub features: Option<Hook<dyn FeatureHook>>,
    /// Plugins to save with the model (cleaners, features).
    pub inference: Vec<InferencePlugin>,
    pub lineage: Vec<PluginLineage>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.losses.is_empty() && self.metrics.is_empty() && self.cleaners.is_empty() && self.augmenters.is_empty()
    }

    /// Runs the cleaners over `text`, in order. A skipped failure leaves the text as it was.
    pub fn clean(&mut self, text: &str) -> crate::Result<String> {
        let mut out = text.to_string();
        for c in &mut self.cleaners {
            let result = c.hook.clean(&out);
            if let Some(cleaned) = c.policy(result)? {
                out = cleaned;
            }
        }
        Ok(out)
    }

    /// The features plugin's name and feature names, if the run has one.
    pub fn feature_names(&mut self) -> crate::Result<Option<(String, Vec<String>)>> {
        let Some(f) = self.features.as_mut() else { return Ok(None) };
        let names = f.hook.names().map_err(|message| crate::CoreError::Plugin { message })?;
        if names.is_empty() {
            return Err(crate::CoreError::Plugin { message: format!("plugin `{}` describes no features", f.name) });
        }
        Ok(Some((f.name.clone(), names)))
    }

    /// The features of each text (a skipped failure gives a row of zeros).
    pub fn feature_rows<'a>(&mut self, texts: impl Iterator<Item = &'a str>, n: usize) -> crate::Result<Vec<Vec<f32>>> {
        let Some(f) = self.features.as_mut() else {
            return Err(crate::CoreError::Plugin { message: "no features plugin".into() });
        };
        let mut out = Vec::new();
        for text in texts {
            let record = serde_json::json!({ "text": text }).to_string();
            let result = f.hook.extract(&record, n);
            out.push(f.policy(result)?.unwrap_or_else(|| vec![0.0; n]));
        }
        Ok(out)
    }

    /// Plugin metrics, each reported as `<plugin>:<name>`.
    pub fn metrics(&mut self, input: &MetricInput<'_>) -> crate::Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        for m in &mut self.metrics {
            let result = m.hook.evaluate(input);
            if let Some(scores) = m.policy(result)? {
                out.extend(scores.into_iter().map(|(k, v)| (format!("{}:{k}", m.name), v)));
            }
        }
        Ok(out)
    }
}

/// Builds the hooks of an experiment once its labels are known (the CLI passes the plugin
/// runtime here; a run with no plugins uses [`NoHooks`]).
pub trait HookFactory {
    fn build(&self, cfg: &crate::ExperimentConfig, labels: &[String]) -> crate::Result<Hooks>;
}

/// For runs without plugins: refuses experiments that list some.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl HookFactory for NoHooks {
    fn build(&self, cfg: &crate::ExperimentConfig, _labels: &[String]) -> crate::Result<Hooks> {
        if let Some(p) = cfg.plugins.first() {
            return Err(crate::CoreError::Plugin {
                message: format!(
                    "plugin `{}`: this entry point runs no plugins; run the experiment with `tuneforge train`",
                    p.display_name()
                ),
            });
        }
        Ok(Hooks::default())
    }
}
