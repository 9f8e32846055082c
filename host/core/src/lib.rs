//! The training core of tuneforge: transformer models built from differentiable candle ops,
//! parameter stores with trainable/frozen parts, AdamW and schedules, the training loop with
//! atomic checkpoints and resume, evaluation, gates, and where models come from.
//!
//! This crate knows tensors and files. It must not know HTTP, SQL or wasmtime: the plugin
//! runtime, the store and the server build on it, never the other way round.

pub mod bert;
mod checkpoint;
mod classifier;
pub mod device;
pub mod distill;
mod error;
pub mod eval;
pub mod experiment;
pub mod export;
mod fs_atomic;
mod gates;
pub mod generate;
pub mod gguf;
pub mod hooks;
pub mod layers;
pub mod llama;
mod metrics;
mod optim;
pub mod parallel;
mod params;
mod peft;
mod prefix_cache;
pub mod quantize;
mod run;
mod schedule;
pub mod sft;
mod source;
pub mod testing;
mod train;
mod weights;

pub use checkpoint::{CheckpointState, Checkpoints, LoadedCheckpoint};
pub use classifier::{
    ClassifierModel, ClassifierOptions, FrozenPrefix, Fusion, META_FILE, MODEL_PLUGINS_FILE, ModelMeta, Pooling,
    Prediction, Trainability, is_decoder_source,
};
pub use device::{DeviceSpec, Precision};
pub use error::CoreError;
pub use eval::{EvalReport, evaluate, evaluate_with};
pub use experiment::{ExperimentConfig, PluginSpec};
pub use gates::{GateResult, check_gates};
pub use hooks::{HookFactory, Hooks, NoHooks, PluginLineage};
pub use layers::ForwardCtx;
pub use metrics::{ClassMetrics, ClassificationMetrics};
pub use optim::{AdamW, AdamWConfig, grad_norm};
pub use params::{Init, ParamBuilder, ParamStore};
pub use peft::{AdapterPlacement, PeftSpec};
pub use prefix_cache::PrefixCache;
pub use run::{RunDir, is_model_dir, new_run_id, registration_metrics};
pub use schedule::{LrSchedule, ScheduleKind};
pub use source::{ModelSource, cache_dir};
pub use train::{
    RunOptions, RunSummary, StepMode, StepStats, TrainBatch, TrainEvent, TrainOutcome, apply_data_hooks,
    load_experiment_data, train_experiment, train_experiment_in, train_experiment_with, train_step, train_step_with,
};

/// Result type of this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
