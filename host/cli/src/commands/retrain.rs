//! `tuneforge retrain --model NAME`: a candidate from user feedback. The production version's
//! experiment (or `--config`) is re-run on its original training data plus the corrections
//! people gave (reviewed ones, unless `--all-feedback`): a correction overrides the original
//! label of the same text, duplicates are dropped, and a text that is in the validation set
//! stays out of training. Each example keeps its provenance (`source`). The run goes through
//! the normal pipeline; if its gates pass, it is registered as a candidate and an A/B test
//! against production starts (it decides on its own unless `--manual`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tuneforge_core::{ExperimentConfig, RunOptions, load_experiment_data};
use tuneforge_data::DataFormat;
use tuneforge_store::FeedbackFilter;

use super::models::actor;
use super::train::train_recorded;
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

/// Text as compared for overrides and duplicates: case and spacing do not matter.
fn key(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
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
    let (train, validation, _) = load_experiment_data(&cfg)?;
    let filter = FeedbackFilter {
        model: Some(args.model.clone()),
        reviewed: if args.all_feedback { None } else { Some(true) },
        limit: 100_000,
        ..Default::default()
    };
    let feedback = rt.block_on(store.feedback(&filter))?;

    // Originals first (exact duplicates dropped), then corrections, oldest first so the newest wins.
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut duplicates = 0usize;
    for e in &train {
        match index.get(&key(&e.text)) {
            Some(&i) if rows[i].1 == e.label => duplicates += 1,
            _ => {
                index.insert(key(&e.text), rows.len());
                rows.push((e.text.clone(), e.label.clone(), "original".into()));
            }
        }
    }
    let held_out: std::collections::HashSet<String> = validation.iter().map(|e| key(&e.text)).collect();
    let (mut added, mut overridden, mut skipped_validation, mut unusable) = (0usize, 0usize, 0usize, 0usize);
    for f in feedback.iter().rev() {
        let label = match (&f.corrected_label, f.rating.as_str()) {
            (Some(l), _) => l.clone(),
            (None, "correct") => f.output.clone(),
            _ => {
                unusable += 1;
                continue;
            }
        };
        let k = key(&f.input);
        if held_out.contains(&k) {
            skipped_validation += 1;
            continue;
        }
        let source = format!("feedback:{}", f.id);
        match index.get(&k) {
            Some(&i) => {
                if rows[i].1 != label {
                    overridden += 1;
                }
                rows[i] = (f.input.clone(), label, source);
            }
            None => {
                index.insert(k, rows.len());
                rows.push((f.input.clone(), label, source));
                added += 1;
            }
        }
    }

    let stamp = tuneforge_store::now_ms();
    let dir = cfg.experiment.output_dir.join("retrain-data").join(format!("{}-{stamp}", args.model));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, lines: Vec<serde_json::Value>| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let train_file = write(
        "train.jsonl",
        rows.iter().map(|(t, l, s)| serde_json::json!({"text": t, "label": l, "source": s})).collect(),
    )?;
    let validation_file = write(
        "validation.jsonl",
        validation
            .iter()
            .map(|e| serde_json::json!({"text": e.text, "label": e.label, "source": "original"}))
            .collect(),
    )?;
    println!(
        "dataset: {} examples ({} original, {added} added and {overridden} relabelled from {} feedback; {duplicates} \
         duplicates dropped, {skipped_validation} in the validation set left out, {unusable} wrong answers without a \
         correction ignored) in {}",
        rows.len(),
        rows.iter().filter(|r| r.2 == "original").count(),
        feedback.len(),
        dir.display()
    );

    cfg.experiment.name = Some(format!("{}-retrain", args.model));
    cfg.data.train = train_file;
    cfg.data.validation = Some(validation_file);
    cfg.data.format = Some(DataFormat::Jsonl);
    cfg.data.text_column = "text".into();
    cfg.data.label_column = "label".into();
    cfg.data.max_train_examples = None;
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
    let metrics = s.validation.as_ref().map(|v| serde_json::json!({"accuracy": v.accuracy, "macro_f1": v.macro_f1}));
    let v = rt.block_on(store.register_model(
        &args.model,
        &s.run_id,
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
