//! `tuneforge eval`: metrics of a trained model on a labelled file.

use std::path::PathBuf;

use clap::Args;
use tuneforge_core::experiment::GatesConfig;
use tuneforge_core::{ExperimentConfig, check_gates};
use tuneforge_data::{DataFormat, OnError, ReadOptions, read_examples};
use tuneforge_plugin_runtime::{PluginRuntime, Predictor};

use super::{Outcome, report_gates};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model directory written by `tuneforge train` (a run's `best/`).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Labelled data: CSV, JSONL or `sentence@label` lines.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// The data format (default: from the file extension).
    #[arg(long, value_parser = ["csv", "jsonl", "phrasebank"])]
    format: Option<String>,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Skip malformed lines (and count them) instead of stopping at the first.
    #[arg(long)]
    skip_bad_lines: bool,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Check the `[gates]` of this experiment file.
    #[arg(long, value_name = "EXP.toml")]
    config: Option<PathBuf>,
    /// Gate: fail when accuracy is below this.
    #[arg(long)]
    min_accuracy: Option<f64>,
    /// Gate: fail when inference takes longer than this per 1,000 tokens.
    #[arg(long)]
    max_s_per_1k_tokens: Option<f64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub fn run(args: EvalArgs) -> anyhow::Result<Outcome> {
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let mut gates = match &args.config {
        Some(path) => ExperimentConfig::from_file(path, &[])?.gates,
        None => GatesConfig::default(),
    };
    gates.min_accuracy = args.min_accuracy.or(gates.min_accuracy);
    gates.max_s_per_1k_tokens = args.max_s_per_1k_tokens.or(gates.max_s_per_1k_tokens);
    // A saved model trains nothing; the trainable-ratio gate belongs to `train`.
    gates.max_trainable_ratio = None;
    let model = Predictor::load_on(&PluginRuntime::new()?, &args.model, &args.device.open()?)?;
    let options = ReadOptions {
        format: args.format.as_deref().and_then(DataFormat::parse),
        text_field: args.text_column.clone(),
        label_field: args.label_column.clone(),
        on_error: if args.skip_bad_lines { OnError::Skip } else { OnError::Fail },
        ..Default::default()
    };
    let data = read_examples(&args.data, &options)?;
    if !data.skipped.is_empty() {
        eprintln!("skipped {} malformed lines of {}", data.skipped.len(), args.data.display());
    }
    let report = model.evaluate(&data.examples, args.batch_size)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("examples:     {}", report.n);
        println!("accuracy:     {:.4}", report.accuracy);
        println!("macro-F1:     {:.4}", report.macro_f1);
        println!("loss:         {:.4}", report.loss);
        println!(
            "speed:        {:.4} s per 1k tokens ({:.0} tokens/s, {} tokens)",
            report.s_per_1k_tokens, report.tokens_per_s, report.n_tokens
        );
        if report.unknown_labels > 0 {
            println!(
                "unknown:      {} examples have labels the model does not know (counted wrong)",
                report.unknown_labels
            );
        }
        let width = model.model().labels().iter().map(|l| l.chars().count()).max().unwrap_or(5).clamp(5, 40);
        println!("\n{:<width$}  precision  recall  f1      support", "label");
        for c in &report.metrics.per_class {
            println!("{:<width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}", c.label, c.precision, c.recall, c.f1, c.support);
        }
        println!("\nconfusion matrix (rows: true label, columns: predicted, in the order above)");
        for row in &report.metrics.confusion {
            println!("{}", row.iter().map(|v| format!("{v:>4}")).collect::<String>());
        }
    }
    Ok(report_gates(&check_gates(&gates, &report)))
}
