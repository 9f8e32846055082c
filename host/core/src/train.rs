//! The training pipeline: from an experiment to a run directory with checkpoints, metrics,
//! a best model and a summary — and back again with `resume`.
//!
//! Determinism: the data order of epoch `e` derives from `(seed, e)` and the dropout masks of
//! step `s` from `(seed, s)`, so a run resumed from a checkpoint (which records the step, the
//! data cursor, the trainable weights and the optimizer moments) follows the same trajectory
//! as one that was never interrupted.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use tuneforge_data::{
    BatchPlan, BatchPlanConfig, EncodedBatch, Example, LabelVocab, ReadOptions, dataset_hash, read_examples,
    stratified_split,
};

use crate::checkpoint::{CheckpointState, Checkpoints};
use crate::classifier::Fusion;
use crate::classifier::{ClassifierOptions, FrozenPrefix, Trainability};
use crate::distill::{Teacher, TeacherTargets, distill_loss, student_base};
use crate::experiment::{BestMetric, ExperimentConfig, FusionKind, PeftMethod};
use crate::hooks::{Hook, HookFactory, Hooks, LossHook, LossInput, NoHooks, PluginLineage};
use crate::layers::ForwardCtx;
use crate::optim::{AdamW, AdamWConfig, clip_scale, grad_norm};
use crate::parallel::DataParallel;
use crate::prefix_cache::PrefixCache;
use crate::run::{MetricsLog, create_run_dir};
use crate::{
    ClassifierModel, CoreError, EvalReport, GateResult, LrSchedule, ModelSource, Result, RunDir, check_gates,
    eval::evaluate_with, new_run_id,
};

/// How `train` starts and stops.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run in this directory from its latest checkpoint.
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this many optimizer steps in total; the schedule still
    /// spans the whole run, so a resumed run continues the same trajectory.
    pub stop_after_steps: Option<u64>,
}

/// Progress reported while training.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    Started {
        run: &'a RunDir,
        start_step: u64,
        total_steps: u64,
        n_train: usize,
        n_validation: usize,
        n_trainable: usize,
        n_params: usize,
        /// The plugins the run calls.
        plugins: &'a [PluginLineage],
    },
    Step {
        step: u64,
        total_steps: u64,
        loss: f64,
        lr: f64,
        tokens_per_s: f64,
    },
    Evaluated {
        step: u64,
        report: &'a EvalReport,
        improved: bool,
    },
    /// A causal-LM (instruction tuning) run's validation: mean loss over the response
    /// tokens and its perplexity; step 0 is the base model.
    LmEvaluated {
        step: u64,
        loss: f64,
        perplexity: f64,
        improved: bool,
    },
    Checkpointed {
        step: u64,
        dir: &'a Path,
    },
}

/// What a run reports in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    /// `completed`, or `stopped` (by `--stop-after-steps`; resume with `--resume`).
    pub status: String,
    pub model_source: String,
    pub method: PeftMethod,
    pub labels: Vec<String>,
    pub dataset_hash: String,
    pub validation_hash: String,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub skipped_lines: usize,
    pub steps: u64,
    pub total_steps: u64,
    pub params_total: usize,
    pub params_trainable: usize,
    pub trainable_ratio: f64,
    pub weight_decay: f64,
    pub train_seconds: f64,
    pub train_tokens: u64,
    pub train_tokens_per_s: f64,
    pub best_metric: BestMetric,
    pub best_value: Option<f64>,
    pub best_step: Option<u64>,
    pub best_model_dir: Option<PathBuf>,
    /// The best model on the validation set.
    pub validation: Option<EvalReport>,
    pub gates: Vec<GateResult>,
    pub gates_passed: bool,
    /// The step at which early stopping ended the run, if it did.
    pub early_stopped_at: Option<u64>,
    /// The adapters or LoRA the model carries.
    pub peft: crate::PeftSpec,
    /// The plugins the run called: name, version, kind, sha256 and API version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginLineage>,
    /// Plugin calls that failed and were skipped (`on_error = "skip"`), per plugin.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugin_calls_skipped: BTreeMap<String, u64>,
    /// Examples the augmenters added to the training split.
    #[serde(default)]
    pub augmented_examples: usize,
}

/// The result of [`train_experiment`].
#[derive(Debug)]
pub struct TrainOutcome {
    pub run: RunDir,
    pub summary: RunSummary,
}

/// Reads the experiment's data: (train, validation, skipped lines), deterministic by seed.
pub fn load_experiment_data(cfg: &ExperimentConfig) -> Result<(Vec<Example>, Vec<Example>, usize)> {
    let d = &cfg.data;
    let options = ReadOptions {
        format: d.format,
        text_field: d.text_column.clone(),
        label_field: d.label_column.clone(),
        on_error: d.on_error,
        encoding: d.encoding,
    };
    let report = read_examples(&d.train, &options)?;
    let mut skipped = report.skipped.len();
    for e in report.skipped.iter().take(5) {
        tracing::warn!("skipped {e}");
    }
    let seed = cfg.experiment.seed;
    let mut all = report.examples;
    if let Some(max) = d.max_train_examples
        && max < all.len()
    {
        let keep = max as f64 / all.len() as f64;
        all = stratified_split(all, keep, seed ^ 0x5eed)?.1;
    }
    let (train, validation) = match &d.validation {
        Some(path) => {
            let v = read_examples(path, &options)?;
            skipped += v.skipped.len();
            (all, v.examples)
        }
        None => stratified_split(all, d.validation_split, seed)?,
    };
    Ok((train, validation, skipped))
}

fn trainability(cfg: &ExperimentConfig) -> Trainability {
    let p = &cfg.peft;
    match p.method {
        PeftMethod::Full => Trainability::default(),
        PeftMethod::Freeze => Trainability {
            train_last_layers: p.train_last_layers,
            train_embeddings: p.train_embeddings,
            peft_only: false,
        },
        PeftMethod::Adapter | PeftMethod::Lora => Trainability {
            train_last_layers: p.train_last_layers,
            train_embeddings: p.train_embeddings,
            peft_only: true,
        },
    }
}

fn metric_value(metric: BestMetric, r: &EvalReport) -> f64 {
    match metric {
        BestMetric::Accuracy => r.accuracy,
        BestMetric::MacroF1 => r.macro_f1,
        BestMetric::Loss => -r.loss,
    }
}

fn step_seed(seed: u64, step: u64, micro: usize) -> u64 {
    seed.wrapping_mul(0xA24B_AED4_963E_E407) ^ step.wrapping_mul(0x9FB2_1C65_1E98_DF25) ^ micro as u64
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Cleans the texts of both splits with the run's cleaners, then appends what the augmenters
/// derive from each training example (deterministic per seed and example). Returns how many
/// examples were added.
pub fn apply_data_hooks(
    hooks: &mut Hooks,
    train: &mut Vec<Example>,
    validation: &mut [Example],
    seed: u64,
) -> Result<usize> {
    if !hooks.cleaners.is_empty() {
        for e in train.iter_mut().chain(validation.iter_mut()) {
            e.text = hooks.clean(&e.text)?;
        }
    }
    let mut added = Vec::new();
    for (i, e) in train.iter().enumerate() {
        for a in &mut hooks.augmenters {
            let result = a.hook.augment(&e.text, &e.label, seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let Some(new) = a.policy(result)? else { continue };
            for (text, label) in new {
                let mut x = e.clone();
                x.text = text;
                x.label = label.unwrap_or_else(|| e.label.clone());
                added.push(x);
            }
        }
    }
    let n = added.len();
    train.extend(added);
    Ok(n)
}

/// Runs (or resumes) an experiment that calls no plugins.
pub fn train_experiment(
    cfg: ExperimentConfig,
    options: &RunOptions,
    on_event: &mut dyn FnMut(TrainEvent<'_>),
) -> Result<TrainOutcome> {
    train_experiment_with(cfg, options, &NoHooks, on_event)
}

/// Runs (or resumes) an experiment, with the plugins `factory` builds for it.
pub fn train_experiment_with(
    cfg: ExperimentConfig,
    options: &RunOptions,
    factory: &dyn HookFactory,
    on_event: &mut dyn FnMut(TrainEvent<'_>),
) -> Result<TrainOutcome> {
    train_experiment_in(cfg, options, None, factory, on_event)
}

/// [`train_experiment_with`] as a rank of a data-parallel `group` (`None`: the group this
/// process was launched into by `tuneforge train --gpus N`, or a group of one): each step's
/// micro-batches are dealt out by rank and the gradients averaged; rank 0 alone writes the
/// run directory (and, resuming, every rank reads its checkpoint).
pub fn train_experiment_in(
    cfg: ExperimentConfig,
    options: &RunOptions,
    group: Option<&DataParallel>,
    factory: &dyn HookFactory,
    on_event: &mut dyn FnMut(TrainEvent<'_>),
) -> Result<TrainOutcome> {
    // The device first: a run that cannot start leaves nothing behind.
    cfg.train.precision.check(&cfg.run.device).map_err(|message| CoreError::Config {
        file: "experiment".into(),
        field: "train.precision".into(),
        message,
    })?;
    let device = cfg.run.device.open()?;
    let mut from_env = None;
    let parallel = DataParallel::given_or_from_env(group, &mut from_env, &device)?;
    let secondary_scratch = if parallel.is_primary() {
        None
    } else {
        Some(tempfile::tempdir().map_err(CoreError::io(std::env::temp_dir()))?)
    };
    // The run to resume (every rank reads its checkpoint), and the run this rank writes:
    // the same directory for rank 0; ranks other than 0 of a data-parallel group write
    // nothing that lasts (a temporary directory), resuming or not.
    let resumed = match &options.resume {
        Some(dir) => {
            let run = RunDir::new(dir);
            if !run.config().is_file() {
                return Err(CoreError::file(dir, "is not a run directory (config.toml is missing)"));
            }
            Some(run)
        }
        None => None,
    };
    let (cfg, run) = match (&resumed, &secondary_scratch) {
        (Some(r), None) => (ExperimentConfig::from_file(&r.config(), &[])?, r.clone()),
        _ => {
            let mut cfg = match &resumed {
                Some(r) => ExperimentConfig::from_file(&r.config(), &[])?,
                None => cfg,
            };
            let cwd = std::env::current_dir().map_err(CoreError::io("."))?;
            cfg.absolutize(&cwd);
            if let Some(scratch) = &secondary_scratch {
                cfg.experiment.output_dir = scratch.path().to_path_buf();
            }
            let run = create_run_dir(&cfg.experiment.output_dir, &new_run_id(cfg.experiment.name.as_deref()))?;
            crate::fs_atomic::write_atomic(&run.config(), cfg.to_toml().as_bytes())?;
            (cfg, run)
        }
    };
    let t = &cfg.train;
    let seed = cfg.experiment.seed;
    let source = ModelSource::parse(&cfg.model.source)?;
    let base_dir = source.resolve()?;
    let (mut train, mut validation, skipped) = load_experiment_data(&cfg)?;
    let vocab = LabelVocab::from_examples(&train);
    let mut hooks = factory.build(&cfg, vocab.labels())?;
    let augmented_examples = apply_data_hooks(&mut hooks, &mut train, &mut validation, seed)?;
    if augmented_examples > 0 {
        tracing::info!(added = augmented_examples, "augmented the training split");
    }
    let (train, validation) = (train, validation);
    let fusion = match (cfg.model.fusion, hooks.feature_names()?) {
        (FusionKind::None, None) => None,
        (FusionKind::None, Some((name, _))) => {
            return Err(CoreError::Config {
                file: "experiment".into(),
                field: "model.fusion".into(),
                message: format!("plugin `{name}` extracts features: set [model] fusion = \"concat\" to use them"),
            });
        }
        (FusionKind::Concat, None) => {
            return Err(CoreError::Config {
                file: "experiment".into(),
                field: "model.fusion".into(),
                message: "is \"concat\" but no features plugin is listed in [[plugins]]".into(),
            });
        }
        (FusionKind::Concat, Some((name, names))) => {
            let started = Instant::now();
            let rows = hooks.feature_rows(train.iter().map(|e| e.text.as_str()), names.len())?;
            tracing::info!(plugin = %name, features = names.len(), seconds = started.elapsed().as_secs_f64(), "extracted features");
            Some((Fusion::fit(&name, names, &rows, cfg.model.fusion_dim), rows))
        }
    };
    let (student_dir, keep) = match &cfg.distill {
        Some(d) => student_base(d, &base_dir)?,
        None => (base_dir.clone(), None),
    };
    let model = ClassifierModel::from_base_layers(
        &student_dir,
        &ClassifierOptions {
            labels: vocab.labels().to_vec(),
            pooling: cfg.model.pooling,
            max_len: cfg.model.max_len,
            classifier_dropout: cfg.model.classifier_dropout,
            seed,
            trainability: trainability(&cfg),
            base_model: source.spec(),
            dtype: DType::F32,
            device: device.clone(),
            peft: cfg.peft.spec(),
            extra_tokens: cfg.data.read_extra_tokens()?,
            fusion: fusion.as_ref().map(|(f, _)| f.clone()),
        },
        keep.as_deref(),
    )?;
    let texts: Vec<&str> = train.iter().map(|e| e.text.as_str()).collect();
    let teacher = match &cfg.distill {
        Some(d) => {
            let teacher = Teacher::prepare(d, vocab.labels(), &texts, t.eval_batch_size.unwrap_or(t.batch_size * 2))?;
            tracing::info!(
                teacher = %teacher.dir.display(),
                layers = ?keep,
                seconds = teacher.seconds,
                "cached the teacher's outputs over the training split"
            );
            Some(teacher)
        }
        None => None,
    };
    let encoded = model.text_encoder().encode(&texts)?;
    let label_ids: Vec<u32> =
        train.iter().map(|e| vocab.require_id(&e.label).map(|i| i as u32)).collect::<Result<_, _>>()?;
    let plan = BatchPlan::new(
        encoded.iter().map(|e| e.len()).collect(),
        BatchPlanConfig { batch_size: t.batch_size, shuffle: true, group_by_length: t.group_by_length, seed },
    );
    let batches_per_epoch = plan.batches_per_epoch();
    // A data-parallel step takes `grad_accum` micro-batches on each rank; a last step that
    // cannot give every rank one is dropped.
    let world = parallel.world();
    let span = t.grad_accum * world;
    let steps_per_epoch = if world > 1 {
        (batches_per_epoch / world).max(1).div_ceil(t.grad_accum) as u64
    } else {
        batches_per_epoch.div_ceil(t.grad_accum) as u64
    };
    let total_steps = steps_per_epoch * t.epochs;
    let warmup = t.warmup_steps.unwrap_or((t.warmup_ratio * total_steps as f64).round() as u64);
    let schedule = LrSchedule { kind: t.schedule, peak_lr: t.lr, warmup_steps: warmup, total_steps };
    let trainable = model.params().trainable();
    let mut optimizer =
        AdamW::new(trainable.clone(), AdamWConfig { weight_decay: t.weight_decay, ..Default::default() })?;
    let checkpoints = Checkpoints::new(run.checkpoints(), t.keep_checkpoints);

    let mut state = CheckpointState::start(seed);
    if let Some(r) = &resumed {
        crate::fs_atomic::recover_dir(&run.best())?;
        let (at, dir) = crate::checkpoint::resume(r, t.keep_checkpoints, model.params(), &mut optimizer)?;
        state = at;
        tracing::info!(step = state.step, dir = %dir.display(), "resuming");
    }
    let cache = build_prefix_cache(&cfg, &model, &encoded)?;
    let mut log = MetricsLog::open(&run.metrics(), options.resume.as_ref().map(|_| state.step))?;
    on_event(TrainEvent::Started {
        run: &run,
        start_step: state.step,
        total_steps,
        n_train: train.len(),
        n_validation: validation.len(),
        n_trainable: model.params().n_trainable(),
        n_params: model.params().n_params(),
        plugins: &hooks.lineage,
    });

    let eval_bs = t.eval_batch_size.unwrap_or(t.batch_size * 2);
    let pad = model.text_encoder().pad_id();
    let mut stopped = false;
    let mut last_checkpoint_step = if options.resume.is_some() { Some(state.step) } else { None };
    'epochs: while state.epoch < t.epochs && state.early_stopped_at.is_none() {
        let batches = plan.epoch(state.epoch);
        while state.batch_in_epoch < batches.len() {
            if options.stop_after_steps.is_some_and(|s| state.step >= s) {
                stopped = true;
                break 'epochs;
            }
            let started = Instant::now();
            let end = (state.batch_in_epoch + span).min(batches.len());
            if end - state.batch_in_epoch < world {
                state.batch_in_epoch = batches.len();
                break;
            }
            let micro = parallel.shard(&batches[state.batch_in_epoch..end]);
            let step_batches = micro
                .iter()
                .map(|indices| {
                    let mut tokens = EncodedBatch::collate(&encoded, indices, Some(&label_ids), pad);
                    if let Some((_, rows)) = &fusion {
                        tokens = tokens.with_features(rows);
                    }
                    let prefix = cache.as_ref().map(|c| c.collate(&tokens)).transpose()?;
                    let texts = if hooks.losses.is_empty() {
                        Vec::new()
                    } else {
                        indices.iter().map(|&i| train[i].text.clone()).collect()
                    };
                    let teacher = teacher.as_ref().map(|t| t.targets(indices)).transpose()?;
                    Ok(TrainBatch { tokens, prefix, texts, teacher })
                })
                .collect::<Result<Vec<_>>>()?;
            let lr = schedule.lr(state.step);
            // Dropout seeds by the micro-batch's place in the whole step, whichever rank runs it.
            let seeds: Vec<u64> = (0..step_batches.len())
                .map(|mi| step_seed(seed, state.step, parallel.rank() + mi * parallel.world()))
                .collect();
            let stats = train_step_with(
                &model,
                &trainable,
                &mut optimizer,
                &step_batches,
                &seeds,
                t.max_grad_norm,
                lr,
                &mut hooks.losses,
                StepMode::from_config(t).with_parallel(parallel),
            )
            .map_err(|e| match e {
                CoreError::Diverged { loss, .. } => CoreError::Diverged { step: state.step + 1, loss },
                other => other,
            })?;
            let StepStats { loss, tokens, grad_norm, forward_s, backward_s, optimizer_s, plugin_losses } = stats;
            let seconds = started.elapsed().as_secs_f64();
            state.step += 1;
            state.batch_in_epoch = end;
            state.tokens_seen += tokens;
            state.train_seconds += seconds;
            let mut record = serde_json::json!({
                "kind": "train", "step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "tokens": tokens, "seconds": seconds,
                "forward_s": forward_s, "backward_s": backward_s, "optimizer_s": optimizer_s,
            });
            for (name, value) in &plugin_losses {
                record[format!("plugin:{name}")] = serde_json::json!(value);
            }
            log.append(&record)?;
            on_event(TrainEvent::Step {
                step: state.step,
                total_steps,
                loss,
                lr,
                tokens_per_s: tokens as f64 / seconds.max(1e-9),
            });
            let epoch_done = state.batch_in_epoch >= batches.len();
            let eval_due = if t.eval_every_steps > 0 {
                state.step.is_multiple_of(t.eval_every_steps) || state.step == total_steps
            } else {
                epoch_done
            };
            if eval_due {
                if epoch_done {
                    state.epoch += 1;
                    state.batch_in_epoch = 0;
                }
                let report = evaluate_with(&model, &validation, eval_bs, &mut hooks)?;
                let value = metric_value(t.metric_for_best, &report);
                let improved = state.record_evaluation(value, t.early_stopping_min_delta, t.early_stopping_patience);
                if improved {
                    model.save_with_plugins(&run.best(), &hooks.inference)?;
                }
                let mut record = serde_json::json!({
                    "kind": "eval", "step": state.step, "epoch": state.epoch, "val_loss": report.loss,
                    "accuracy": report.accuracy, "macro_f1": report.macro_f1, "improved": improved,
                });
                for (name, value) in &report.plugin_metrics {
                    record[name.as_str()] = serde_json::json!(value);
                }
                log.append(&record)?;
                on_event(TrainEvent::Evaluated { step: state.step, report: &report, improved });
                let dir = checkpoints.save(&state, &trainable_tensors(&trainable), &optimizer.state_tensors()?)?;
                last_checkpoint_step = Some(state.step);
                on_event(TrainEvent::Checkpointed { step: state.step, dir: &dir });
                if state.early_stopped_at.is_some() {
                    break 'epochs;
                }
                if epoch_done {
                    continue 'epochs;
                }
            }
        }
        state.epoch += 1;
        state.batch_in_epoch = 0;
    }
    if last_checkpoint_step != Some(state.step) {
        let dir = checkpoints.save(&state, &trainable_tensors(&trainable), &optimizer.state_tensors()?)?;
        on_event(TrainEvent::Checkpointed { step: state.step, dir: &dir });
    }

    let (validation_report, gates) = if !stopped && run.best().exists() {
        let best = ClassifierModel::load(&run.best())?;
        let mut report = evaluate_with(&best, &validation, eval_bs, &mut hooks)?;
        // The saved model has nothing trainable; report the ratio the run trained with.
        report.trainable_ratio = model.params().trainable_ratio();
        let gates = check_gates(&cfg.gates, &report);
        (Some(report), gates)
    } else {
        (None, Vec::new())
    };
    let summary = RunSummary {
        run_id: run.id(),
        status: if stopped { "stopped" } else { "completed" }.into(),
        model_source: source.spec(),
        method: cfg.peft.method,
        labels: vocab.labels().to_vec(),
        dataset_hash: dataset_hash(&train),
        validation_hash: dataset_hash(&validation),
        train_examples: train.len(),
        validation_examples: validation.len(),
        skipped_lines: skipped,
        steps: state.step,
        total_steps,
        params_total: model.params().n_params(),
        params_trainable: model.params().n_trainable(),
        trainable_ratio: model.params().trainable_ratio(),
        weight_decay: t.weight_decay,
        train_seconds: state.train_seconds,
        train_tokens: state.tokens_seen,
        train_tokens_per_s: state.tokens_seen as f64 / state.train_seconds.max(1e-9),
        best_metric: t.metric_for_best,
        best_value: state.best_metric.map(|v| if t.metric_for_best == BestMetric::Loss { -v } else { v }),
        best_step: state.best_step,
        best_model_dir: run.best().exists().then(|| run.best()),
        gates_passed: gates.iter().all(|g| g.passed),
        validation: validation_report,
        gates,
        early_stopped_at: state.early_stopped_at,
        peft: model.meta().peft.clone(),
        plugins: hooks.lineage.clone(),
        plugin_calls_skipped: skipped_calls(&hooks),
        augmented_examples,
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| CoreError::file(run.summary(), e.to_string()))?;
    crate::fs_atomic::write_atomic(&run.summary(), &json)?;
    Ok(TrainOutcome { run, summary })
}

fn skipped_calls(hooks: &Hooks) -> BTreeMap<String, u64> {
    let losses = hooks.losses.iter().map(|h| (&h.name, h.skipped));
    let metrics = hooks.metrics.iter().map(|h| (&h.name, h.skipped));
    let cleaners = hooks.cleaners.iter().map(|h| (&h.name, h.skipped));
    let augmenters = hooks.augmenters.iter().map(|h| (&h.name, h.skipped));
    losses
        .chain(metrics)
        .chain(cleaners)
        .chain(augmenters)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.clone(), n))
        .collect()
}

/// What one optimizer step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Real tokens processed.
    pub tokens: u64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// Mean value of each loss plugin's term (unweighted) over the micro-batches it answered.
    pub plugin_losses: Vec<(String, f64)>,
}

/// A batch for [`train_step`]: its tokens and, with a frozen-prefix cache, the cached hidden
/// states to start from.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    pub tokens: EncodedBatch,
    pub prefix: Option<FrozenPrefix>,
    /// The rows' texts, for loss plugins (empty when no plugin needs them).
    pub texts: Vec<String>,
    /// Distillation: the teacher's softened outputs for these rows.
    pub teacher: Option<TeacherTargets>,
}

impl From<EncodedBatch> for TrainBatch {
    fn from(tokens: EncodedBatch) -> Self {
        Self { tokens, prefix: None, texts: Vec::new(), teacher: None }
    }
}

/// One optimizer step over `batches` (gradient accumulation: the mean of their losses),
/// with dropout masks drawn from `seeds[i]` for batch `i`, clipping at `max_grad_norm`
/// (0: off) and learning rate `lr`.
pub fn train_step(
    model: &ClassifierModel,
    trainable: &[(String, candle_core::Var)],
    optimizer: &mut AdamW,
    batches: &[TrainBatch],
    seeds: &[u64],
    max_grad_norm: f64,
    lr: f64,
) -> Result<StepStats> {
    train_step_with(model, trainable, optimizer, batches, seeds, max_grad_norm, lr, &mut [], StepMode::default())
}

/// How a training step computes: mixed precision and gradient checkpointing.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepMode<'a> {
    /// Activations and products in this dtype (bf16), parameters in their own.
    pub compute_dtype: Option<DType>,
    /// Recompute each encoder layer in the backward pass instead of keeping its activations.
    pub checkpointing: bool,
    /// Data parallelism: gradients (and the reported loss) averaged over the group.
    pub parallel: Option<&'a DataParallel>,
}

impl<'a> StepMode<'a> {
    pub fn from_config(t: &crate::experiment::TrainSection) -> Self {
        Self { compute_dtype: t.precision.compute_dtype(), checkpointing: t.gradient_checkpointing, parallel: None }
    }

    pub fn with_parallel(self, parallel: &'a DataParallel) -> Self {
        Self { parallel: Some(parallel), ..self }
    }

    /// The forward context of a training pass with dropout seeded by `seed`.
    pub fn ctx(self, seed: u64) -> ForwardCtx {
        ForwardCtx::train(seed).with_compute_dtype(self.compute_dtype).with_checkpointing(self.checkpointing)
    }
}

/// [`train_step`] with loss plugins (each adds `weight * sum(logits * stop_grad(grad))` to a
/// micro-batch's loss, where `grad` is the plugin's d value / d logits) and a [`StepMode`].
#[allow(clippy::too_many_arguments)]
pub fn train_step_with(
    model: &ClassifierModel,
    trainable: &[(String, candle_core::Var)],
    optimizer: &mut AdamW,
    batches: &[TrainBatch],
    seeds: &[u64],
    max_grad_norm: f64,
    lr: f64,
    losses: &mut [Hook<dyn LossHook>],
    mode: StepMode<'_>,
) -> Result<StepStats> {
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut plugin_sums: Vec<(f64, u32)> = vec![(0.0, 0); losses.len()];
    let (mut loss_sum, mut tokens) = (0.0f64, 0u64);
    let (mut forward_s, mut backward_s) = (0.0f64, 0.0f64);
    for (batch, &seed) in batches.iter().zip(seeds) {
        tokens += batch.tokens.n_tokens as u64;
        let ctx = mode.ctx(seed);
        let phase = Instant::now();
        let (mut loss, logits) = model.loss_from(&batch.tokens, batch.prefix.as_ref(), &ctx)?;
        if let Some(t) = &batch.teacher {
            let kd = distill_loss(&logits, &t.probs, t.temperature)?;
            loss = ((loss * (1.0 - t.alpha))? + (kd * t.alpha)?)?;
        }
        let mut value = scalar(&loss)?;
        if !losses.is_empty() {
            let (rows, classes) = logits.dims2()?;
            let flat = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let input = LossInput { rows, classes, logits: &flat, labels: &batch.tokens.labels, texts: &batch.texts };
            for (hook, sum) in losses.iter_mut().zip(plugin_sums.iter_mut()) {
                let result = hook.hook.compute(&input);
                let Some(out) = hook.policy(result)? else { continue };
                let grad = Tensor::from_vec(out.grad, (rows, classes), logits.device())?.to_dtype(logits.dtype())?;
                let term = (logits.mul(&grad)?.sum_all()? * hook.weight)?;
                loss = (loss + term)?;
                value += hook.weight * out.value as f64;
                sum.0 += out.value as f64;
                sum.1 += 1;
            }
        }
        forward_s += phase.elapsed().as_secs_f64();
        if !value.is_finite() {
            return Err(CoreError::Diverged { step: optimizer.step_count() + 1, loss: value as f32 });
        }
        loss_sum += value;
        let phase = Instant::now();
        let store = (loss / batches.len() as f64)?.backward()?;
        accumulate_grads(&store, trainable, &mut grads)?;
        model.checkpointed_backward(&ctx, &store, trainable, &mut grads)?;
        backward_s += phase.elapsed().as_secs_f64();
    }
    let phase = Instant::now();
    let mut loss = loss_sum / batches.len().max(1) as f64;
    if let Some(dp) = mode.parallel {
        dp.all_reduce_mean(&mut grads)?;
        loss = dp.mean_scalar(loss, model.device())?;
    }
    let norm = grad_norm(&grads)?;
    optimizer.step_scaled(&grads, lr, clip_scale(norm, max_grad_norm))?;
    Ok(StepStats {
        loss,
        tokens,
        grad_norm: norm,
        forward_s,
        backward_s,
        optimizer_s: phase.elapsed().as_secs_f64(),
        plugin_losses: losses
            .iter()
            .zip(&plugin_sums)
            .filter(|(_, (_, n))| *n > 0)
            .map(|(h, (s, n))| (h.name.clone(), s / *n as f64))
            .collect(),
    })
}

/// Adds each trainable tensor's gradient in `store` to its running sum in `grads`.
pub(crate) fn accumulate_grads(
    store: &candle_core::backprop::GradStore,
    trainable: &[(String, candle_core::Var)],
    grads: &mut HashMap<String, Tensor>,
) -> Result<()> {
    for (name, var) in trainable {
        if let Some(g) = store.get(var.as_tensor()) {
            let sum = match grads.remove(name) {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            };
            grads.insert(name.clone(), sum);
        }
    }
    Ok(())
}

/// The frozen-prefix cache, when the run has a frozen prefix, the experiment allows it and
/// it fits the memory budget.
fn build_prefix_cache(
    cfg: &ExperimentConfig,
    model: &ClassifierModel,
    encoded: &[tuneforge_data::Encoded],
) -> Result<Option<PrefixCache>> {
    let layers = model.frozen_prefix_layers();
    if !cfg.train.cache_frozen_prefix || layers == 0 {
        return Ok(None);
    }
    let bytes = PrefixCache::estimate_bytes(encoded, model.backbone_config().hidden_size());
    let budget = cfg.train.cache_max_mib * 1024 * 1024;
    if bytes > budget {
        tracing::warn!(
            mib = bytes / (1024 * 1024),
            budget_mib = cfg.train.cache_max_mib,
            "the frozen-prefix cache would exceed train.cache_max_mib; training without it"
        );
        return Ok(None);
    }
    let started = Instant::now();
    let cache = PrefixCache::build(model, encoded, layers, cfg.train.batch_size.max(32))?;
    tracing::info!(
        layers,
        mib = bytes / (1024 * 1024),
        seconds = started.elapsed().as_secs_f64(),
        "cached the frozen prefix (embeddings and the first layers run once, without dropout)"
    );
    Ok(Some(cache))
}

fn trainable_tensors(vars: &[(String, candle_core::Var)]) -> Vec<(String, Tensor)> {
    vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}
