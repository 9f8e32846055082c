//! `cargo xtask`: the project's orchestration — the demo, the whole test suite and the
//! benchmarks — so that a new user needs exactly two commands. It installs what it needs
//! (pip wheels into tuneforge's cache) and never touches the network beyond the package
//! registries.

mod api_fuzz;
mod bench;
mod bench_compress;
mod bench_decoder;
mod bench_plugins;
mod bench_serve;
mod demo;
mod demo_loop;
mod gpu_check;
mod http;
mod icd10;
mod plugins;
mod postgres;
mod process;
mod test;
mod web;

use std::path::PathBuf;

use anyhow::bail;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo                 fetch all-MiniLM-L6-v2 and ICD-10-CM, fine-tune, evaluate, predict
  test                 the whole test suite: format checks, the plugins' own unit tests, and
                       every workspace test under cargo nextest
  plugins [--home DIR] build the plugins in plugins/ for wasm32-wasip2 and install them
  web                  build the dashboard's browser bundle (hydration) into <target>/site/pkg
  api-fuzz [--max-examples N]
                       Schemathesis (PyPI) against the server's OpenAPI document; fails on 5xx
  bench train [--data FILE] [--steps N] [--with-pytorch]
                       training and inference speed of all-MiniLM-L6-v2 (full, freeze, cache,
                       adapters, LoRA), side by side with PyTorch when asked
  bench compress --model RUN_DIR [--student RUN_DIR]
                       f32 vs int8 (and a distilled student): held-out accuracy, size,
                       peak memory, inference tokens/s, batch-1 latency
  bench generate [--tokens N] [--int8] [--batch N]
                       SmolLM2-135M generation speed (batch 1, KV cache; int8; N prompts
                       one after another against one batch)
  bench sft [--epochs N] [--per-chapter N] [--packing]
                       LoRA instruction tuning of SmolLM2 on ICD-10-CM: loss, perplexity and
                       held-out answers before and after, SFT tokens/s
  bench kernels        the int8 matrix product against f32 on MiniLM's shapes
  bench peft RUN_DIR   load a LoRA run's PEFT export in Hugging Face PEFT and compare outputs
  bench plugins [--steps N]
                       a loss plugin's cost per call (32x24 logits) and its share of a
                       MiniLM training step
  gpu-check [--bundle DIR]
                       build with --features cuda,nccl and run the CUDA tests, tuneforge
                       train on the GPU (--device cuda, --gpus 1) and the GPU training
                       benchmark (MiniLM, SmolLM2 LoRA: tokens/s, MFU, memory);
                       --bundle gathers the binaries and bench/gpu-check.sh for another machine
  bench serve          the server under load: 10,000 feedback posts from 64 clients, reads
                       over 10,000 runs and 1,000,000 metric points";

fn main() -> anyhow::Result<()> {
    tuneforge_kernels::tune_allocator();
    tuneforge_kernels::tune_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = &args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("demo") => demo::run(rest),
        Some("test") => test::run(rest),
        Some("plugins") => plugins::run(rest),
        Some("web") => web::run(rest),
        Some("api-fuzz") => api_fuzz::run(rest),
        Some("bench") => bench::run(rest),
        Some("gpu-check") => gpu_check::run(rest),
        Some("bench-one") => bench::run_one(rest),
        Some("bench-compress-one") => bench_compress::run_one(rest),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

/// The workspace root (xtask lives in `<root>/xtask`).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where cargo puts build outputs: `$CARGO_TARGET_DIR` or `<root>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_relative() { workspace_root().join(dir) } else { dir }
        }
        None => workspace_root().join("target"),
    }
}
