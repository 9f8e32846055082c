//! `tuneforge export`: a LoRA model (a classifier, or an instruction-tuned decoder) in
//! Hugging Face PEFT's layout, or with LoRA merged.

use std::path::PathBuf;

use clap::Args;
use tuneforge_core::export::{export_merged, export_peft};

use super::Outcome;

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("kind").required(true).args(["peft", "merged"]))]
pub struct ExportArgs {
    /// Write adapter_config.json + adapter_model.safetensors (Hugging Face PEFT layout).
    #[arg(long)]
    peft: bool,
    /// Write a tuneforge model directory with the LoRA updates folded into the base weights.
    #[arg(long)]
    merged: bool,
    /// A run directory (its best/ model) or a model directory.
    #[arg(value_name = "RUN_DIR")]
    model: PathBuf,
    /// The directory to write (replaced if it exists).
    #[arg(value_name = "OUT")]
    out: PathBuf,
}

pub fn run(args: ExportArgs) -> anyhow::Result<Outcome> {
    if args.peft {
        export_peft(&args.model, &args.out)?;
    } else {
        export_merged(&args.model, &args.out)?;
    }
    let mut files: Vec<String> =
        std::fs::read_dir(&args.out)?.filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok())).collect();
    files.sort();
    let kind = if args.peft { "Hugging Face PEFT's layout" } else { "a model directory with LoRA merged" };
    println!("wrote {} ({kind}): {}", args.out.display(), files.join(", "));
    Ok(Outcome::Success)
}
