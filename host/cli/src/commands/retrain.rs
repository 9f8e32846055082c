//! `tuneforge retrain --model NAME`: a candidate from user feedback. The production version's
//! experiment (or `--config`) is re-run on its original training data plus the corrections
//! people gave (reviewed ones, unless `--all-feedback`): a correction overrides the original
//! label of the same text, duplicates are dropped, and a text that is in the validation set
//! stays out of training. Each example keeps its provenance (`source`). The run goes through
//! the normal pipeline; if its gates pass, it is registered as a candidate and an A/B test
//! against production starts (it decides on its own unless `--manual`).
//!
//! A language model (an instruction-tuned adapter) is retrained the same way on
//! conversations: each corrected generation (the turns it answered, the correction as the
//! assistant's answer; a generation rated correct with its own answer) joins the original
//! instruction data, replacing an example that asks the same thing.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tuneforge_core::experiment::Task;
use tuneforge_core::generate::normalise_text;
use tuneforge_core::sft::{SftExample, load_sft_data};
use tuneforge_core::{ExperimentConfig, RunOptions, load_experiment_data};
use tuneforge_data::DataFormat;
use tuneforge_store::{FeedbackFilter, FeedbackRow};

use super::models::actor;
use super::train::{causal_lm_recorded, train_recorded};
use super::{DbArgs, Outcome, report_gates};
use crate::recorder::{open_store, runtime};

#[derive(Debug, Args)]
pub struct RetrainArgs {
    /// The registered model whose production version is retrained.
    #[arg(long)]
    model: String,
    /// An experiment file to use instead of the production run's own config.
    #[arg(long, value_name = "EXP.toml")]
    config: Option<PathBuf>,
    /// Use unreviewed feedback too (default: only feedback marked reviewed).
    #[arg(long)]
    all_feedback: bool,
    /// The share of sessions the candidate serves in the A/B test.
    #[arg(long, default_value_t = 0.2)]
    share: f64,
    /// Register the candidate but start no A/B test.
    #[arg(long)]
    no_ab: bool,
    /// The A/B test waits for a decision by hand.
    #[arg(long)]
    manual: bool,
    #[arg(long, short)]
    quiet: bool,
    /// Where the candidate trains: cpu, cuda or cuda:N (default: the experiment's `[run] device`).
    #[arg(long, value_name = "DEVICE", value_parser = |s: &str| s.parse::<tuneforge_core::DeviceSpec>())]
    device: Option<tuneforge_core::DeviceSpec>,
    #[command(flatten)]
    db: DbArgs,
}

/// What building the dataset did, for the report.
#[derive(Default)]
struct Merge {
    original: usize,
    duplicates: usize,
    added: usize,
    overridden: usize,
    skipped_validation: usize,
    unusable: usize,
}

/// Originals first (exact duplicates dropped), then the feedback's examples, oldest first so
/// the newest wins: an example whose key is in `held_out` stays out, one whose key is taken
/// replaces that row. `same` says whether two examples teach the same thing.
fn merge<T: Clone>(
    originals: &[T],
    feedback: &[(T, String)],
    held_out: &std::collections::HashSet<String>,
    key_of: impl Fn(&T) -> String,
    same: impl Fn(&T, &T) -> bool,
) -> (Vec<(T, String)>, Merge) {
    let mut rows: Vec<(T, String)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut m = Merge::default();
    for e in originals {
        let k = key_of(e);
        match index.get(&k) {
            Some(&i) if same(&rows[i].0, e) => m.duplicates += 1,
            _ => {
                index.insert(k, rows.len());
                rows.push((e.clone(), "original".into()));
            }
        }
    }
    m.original = rows.len();
    for (e, source) in feedback {
        let k = key_of(e);
        if held_out.contains(&k) {
            m.skipped_validation += 1;
            continue;
        }
        match index.get(&k) {
            Some(&i) => {
                if !same(&rows[i].0, e) {
                    m.overridden += 1;
                }
                rows[i] = (e.clone(), source.clone());
            }
            None => {
                index.insert(k, rows.len());
                rows.push((e.clone(), source.clone()));
                m.added += 1;
            }
        }
    }
    (rows, m)
}

/// The data files of the candidate's run, and what building them did.
struct Dataset {
    train: PathBuf,
    validation: PathBuf,
    merge: Merge,
    rows: usize,
}

fn write_jsonl(
    dir: &std::path::Path,
    name: &str,
    lines: impl Iterator<Item = serde_json::Value>,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let text: String = lines.map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Classification: texts with labels; a correction relabels the same text.
fn labelled_dataset(
    cfg: &ExperimentConfig,
    feedback: &[FeedbackRow],
    dir: &std::path::Path,
) -> anyhow::Result<Dataset> {
    let (train, validation, _) = load_experiment_data(cfg)?;
    let originals: Vec<(String, String)> = train.iter().map(|e| (e.text.clone(), e.label.clone())).collect();
    let mut unusable = 0;
    let from_feedback: Vec<((String, String), String)> = feedback
        .iter()
        .rev()
        .filter_map(|f| match f.target() {
            Some(label) => Some(((f.input.clone(), label.to_owned()), format!("feedback:{}", f.id))),
            None => {
                unusable += 1;
                None
            }
        })
        .collect();
    let held_out = validation.iter().map(|e| normalise_text(&e.text)).collect();
    let (rows, mut merge) = merge(&originals, &from_feedback, &held_out, |e| normalise_text(&e.0), |a, b| a.1 == b.1);
    merge.unusable = unusable;
    let train = write_jsonl(
        dir,
        "train.jsonl",
        rows.iter().map(|((t, l), s)| serde_json::json!({"text": t, "label": l, "source": s})),
    )?;
    let validation = write_jsonl(
        dir,
        "validation.jsonl",
        validation.iter().map(|e| serde_json::json!({"text": e.text, "label": e.label, "source": "original"})),
    )?;
    Ok(Dataset { train, validation, merge, rows: rows.len() })
}

/// Instruction tuning: conversations; a corrected answer replaces an example that asks the
/// same thing.
fn conversation_dataset(
    cfg: &ExperimentConfig,
    feedback: &[FeedbackRow],
    dir: &std::path::Path,
) -> anyhow::Result<Dataset> {
    let (train, validation) = load_sft_data(cfg)?;
    let mut unusable = 0;
    let from_feedback: Vec<(SftExample, String)> = feedback
        .iter()
        .rev()
        .filter_map(|f| match (f.conversation(), f.target()) {
            (Some(context), Some(answer)) => {
                Some((SftExample { context, response: answer.to_owned() }, format!("feedback:{}", f.id)))
            }
            _ => {
                unusable += 1;
                None
            }
        })
        .collect();
    let held_out = validation.iter().map(SftExample::context_key).collect();
    let (rows, mut merge) =
        merge(&train, &from_feedback, &held_out, SftExample::context_key, |a, b| a.response == b.response);
    merge.unusable = unusable;
    let with_source = |e: &SftExample, source: &str| {
        let mut line = e.to_json();
        line["source"] = serde_json::json!(source);
        line
    };
    let train = write_jsonl(dir, "train.jsonl", rows.iter().map(|(e, s)| with_source(e, s)))?;
    let validation = write_jsonl(dir, "validation.jsonl", validation.iter().map(|e| with_source(e, "original")))?;
    Ok(Dataset { train, validation, merge, rows: rows.len() })
}

pub fn run(args: RetrainArgs) -> anyhow::Result<Outcome> {
    let rt = runtime()?;
    let db = args.db.url();
    let store = open_store(&rt, &db)?;
    let production = rt
        .block_on(store.production(&args.model))?
        .with_context(|| format!("model `{}` has no production version to retrain", args.model))?;
    let mut cfg = match &args.config {
        Some(path) => ExperimentConfig::from_file(path, &[])?,
        None => {
            let run = rt.block_on(store.get_run(&production.run_id))?;
            let text = run.config.with_context(|| format!("run {} has no recorded config", production.run_id))?;
            ExperimentConfig::from_toml(&text, &format!("the config of run {}", production.run_id), &[])?
        }
    };
    if let Some(device) = args.device {
        cfg.run.device = device;
    }
    let filter = FeedbackFilter {
        model: Some(args.model.clone()),
        reviewed: if args.all_feedback { None } else { Some(true) },
        limit: 100_000,
        ..Default::default()
    };
    let feedback = rt.block_on(store.feedback(&filter))?;
    let stamp = tuneforge_store::now_ms();
    let dir = cfg.experiment.output_dir.join("retrain-data").join(format!("{}-{stamp}", args.model));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lm = cfg.model.task == Task::CausalLm;
    let data = if lm { conversation_dataset(&cfg, &feedback, &dir)? } else { labelled_dataset(&cfg, &feedback, &dir)? };
    let m = &data.merge;
    let (changed, unusable) = if lm {
        ("answered anew", "answers without a correction (or not generations)")
    } else {
        ("relabelled", "wrong answers without a correction")
    };
    println!(
        "dataset: {} examples ({} original, {} added and {} {changed} from {} feedback; {} duplicates dropped, {} in \
         the validation set left out, {} {unusable} ignored) in {}",
        data.rows,
        m.original,
        m.added,
        m.overridden,
        feedback.len(),
        m.duplicates,
        m.skipped_validation,
        m.unusable,
        dir.display()
    );

    cfg.experiment.name = Some(format!("{}-retrain", args.model));
    cfg.data.train = data.train;
    cfg.data.validation = Some(data.validation);
    cfg.data.max_train_examples = None;
    let (run_id, best, metrics) = if lm {
        let s = causal_lm_recorded(cfg, &RunOptions::default(), Some(&db), args.quiet)?;
        println!(
            "candidate run {}: validation loss {:.4} -> {:.4}, perplexity {:.2} -> {:.2} (base -> best)",
            s.run_id, s.base_validation_loss, s.validation_loss, s.base_perplexity, s.perplexity
        );
        let metrics = tuneforge_core::registration_metrics(&serde_json::to_value(&s)?);
        (s.run_id.clone(), s.best_model_dir.clone(), metrics)
    } else {
        cfg.data.format = Some(DataFormat::Jsonl);
        cfg.data.text_column = "text".into();
        cfg.data.label_column = "label".into();
        let outcome = train_recorded(cfg, &RunOptions::default(), Some(&db), args.quiet)?;
        let s = &outcome.summary;
        if let Some(v) = &s.validation {
            println!("candidate run {}: validation accuracy {:.4}, macro-F1 {:.4}", s.run_id, v.accuracy, v.macro_f1);
        }
        if report_gates(&s.gates) == Outcome::GateFailed {
            eprintln!("the candidate failed its gates: not registered");
            return Ok(Outcome::GateFailed);
        }
        let best = s.best_model_dir.clone().context("the run kept no best model")?;
        let metrics =
            s.validation.as_ref().map(|v| serde_json::json!({"accuracy": v.accuracy, "macro_f1": v.macro_f1}));
        (s.run_id.clone(), best, metrics)
    };
    let v = rt.block_on(store.register_model(
        &args.model,
        &run_id,
        &best.display().to_string(),
        metrics.as_ref(),
        &actor(),
    ))?;
    println!("registered {}@{} (candidate)", v.name, v.version);
    if !args.no_ab {
        let t = rt.block_on(store.start_ab(&args.model, v.version, args.share, !args.manual, &actor()))?;
        println!(
            "A/B test {} started: @{} serves {:.0}% of sessions against @{}",
            t.id,
            v.version,
            args.share * 100.0,
            t.production_version
        );
    }
    Ok(Outcome::Success)
}
