//! `tuneforge predict`: labels and probabilities for texts.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tuneforge_plugin_runtime::{PluginRuntime, Predictor};

use super::Outcome;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A model directory written by `tuneforge train` (a run's `best/`).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Print JSON (one array of predictions) on stdout.
    #[arg(long)]
    json: bool,
    /// How many of the most likely labels to show per text (the first, then the runners-up).
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// Texts to classify; without any, one text per line is read from standard input.
    texts: Vec<String>,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub fn run(args: PredictArgs) -> anyhow::Result<Outcome> {
    let model = Predictor::load_on(&PluginRuntime::new()?, &args.model, &args.device.open()?)?;
    let texts = if args.texts.is_empty() {
        std::io::stdin().lock().lines().collect::<Result<Vec<_>, _>>().context("reading texts from standard input")?
    } else {
        args.texts
    };
    let texts: Vec<String> = texts.into_iter().filter(|t| !t.trim().is_empty()).collect();
    if texts.is_empty() {
        anyhow::bail!("no text to classify: give texts as arguments or on standard input");
    }
    let predictions = model.predict(&texts, 32)?;
    if args.json {
        let items: Vec<serde_json::Value> = texts
            .iter()
            .zip(&predictions)
            .map(|(text, p)| {
                let probs: serde_json::Map<String, serde_json::Value> =
                    p.probabilities.iter().map(|(l, v)| (l.clone(), serde_json::json!(v))).collect();
                serde_json::json!({ "text": text, "label": p.label, "score": p.score, "probabilities": probs })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        for (text, p) in texts.iter().zip(&predictions) {
            let mut ranked = p.probabilities.clone();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let others: Vec<String> =
                ranked.iter().skip(1).take(args.top.saturating_sub(1)).map(|(l, v)| format!("{l} {v:.3}")).collect();
            let others = if others.is_empty() { String::new() } else { format!(" (then {})", others.join(", ")) };
            println!("{}\t{:.3}{others}\t{}", p.label, p.score, text);
        }
    }
    Ok(Outcome::Success)
}
