//! `tuneforge quantize`: an int8 copy of a trained model for serving.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use tuneforge_core::quantize::quantize_int8;

use super::Outcome;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Target {
    /// int8 weights, one symmetric scale per output channel.
    Int8,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A run directory (its best/ model) or a model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The weight format to write.
    #[arg(long, value_enum, default_value = "int8")]
    to: Target,
    /// Keep the word-embedding table in f32 (only the encoder's linear layers become int8;
    /// the model is then about half the size instead of a quarter). A decoder classifier's
    /// embeddings stay f32 either way.
    #[arg(long)]
    keep_embeddings_float: bool,
    /// The model directory to write (replaced if it exists); it loads in eval, predict and serve.
    #[arg(value_name = "OUT")]
    out: PathBuf,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<Outcome> {
    let Target::Int8 = args.to;
    let r = quantize_int8(&args.model, &args.out, args.keep_embeddings_float)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "wrote {}: {} tensors int8 ({} parameters), {} parameters f32; {:.1} MiB{} -> {:.1} MiB ({:.0}%); \
         worst rounding {:.3} of a step",
        args.out.display(),
        r.tensors,
        r.quantized_params,
        r.float_params,
        mib(r.bytes_before),
        if r.from_over_base { " (f32, with the base model it was saved over)" } else { "" },
        mib(r.bytes_after),
        100.0 * r.bytes_after as f64 / r.bytes_before.max(1) as f64,
        r.max_error_in_steps
    );
    println!("int8 kernel on this CPU: {}", tuneforge_kernels::KernelPath::detect());
    Ok(Outcome::Success)
}
