//! Training throughput of one configuration, as one JSON line: tokens/s, step time, model
//! FLOP utilisation and peak memory. `cargo xtask gpu-check` runs a matrix of these, each
//! in its own process (so one run's allocator pool does not inflate the next one's peak).
//!
//! The models have the shapes of all-MiniLM-L6-v2 or BERT-base (encoder, full fine-tuning,
//! a 20-label head) and SmolLM2-135M (decoder, LoRA r = 8 on every projection) with seeded random
//! weights: throughput does not depend on the weight values, and the device machine has no
//! copy of the real ones.
//!
//! `--write-task DIR` instead writes a tiny classification task there (a random tiny BERT,
//! its data and `exp.toml`), for `gpu-check.sh` to train end to end with the `tuneforge`
//! binary on the GPU.
//!
//! ```text
//! cargo run --release -p tuneforge-core --features cuda --example gpu-bench -- \
//!     --model minilm --device cuda --precision bf16 --batch 32 --seq 128 --steps 20
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tuneforge_core::device::{MemoryWatch, memory_in_use};
use tuneforge_core::llama::{DecoderModel, LlamaConfig};
use tuneforge_core::sft::sft_step;
use tuneforge_core::{
    AdamW, AdamWConfig, ClassifierModel, ClassifierOptions, DeviceSpec, ParamBuilder, PeftSpec, Precision, StepMode,
    TrainBatch, train_step_with,
};
use tuneforge_data::EncodedBatch;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MINILM: &str = r#"{"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
  "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
  "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}"#;

/// BERT-base's shape (110M parameters): big enough per token for the matrix products to
/// dominate, where MFU means something.
const BERT_BASE: &str = r#"{"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
  "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
  "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}"#;

const SMOLLM2: &str = r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
  "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
  "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
  "max_position_embeddings": 8192, "tie_word_embeddings": true}"#;

struct Args {
    model: String,
    device: DeviceSpec,
    precision: Precision,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    checkpointing: bool,
    peak_tflops: f64,
    /// Names the build in the report (`framework`), e.g. one against a patched candle.
    label: String,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        model: "minilm".into(),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        batch: 32,
        seq: 128,
        steps: 10,
        warmup: 3,
        checkpointing: false,
        peak_tflops: 989.0,
        label: "tuneforge".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = value()?,
            "--device" => a.device = value()?.parse()?,
            "--precision" => {
                a.precision = match value()?.as_str() {
                    "f32" => Precision::F32,
                    "bf16" => Precision::Bf16,
                    other => return Err(format!("--precision {other}: f32 or bf16").into()),
                }
            }
            "--batch" => a.batch = value()?.parse()?,
            "--seq" => a.seq = value()?.parse()?,
            "--steps" => a.steps = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--checkpointing" => a.checkpointing = true,
            "--peak-tflops" => a.peak_tflops = value()?.parse()?,
            "--label" => a.label = value()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    a.precision.check(&a.device)?;
    Ok(a)
}

/// Seeded token ids in `1..vocab`, `[batch, seq]`.
fn ids(batch: usize, seq: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..batch * seq)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1 + (x % (vocab as u64 - 1)) as u32
        })
        .collect()
}

fn main() -> Result<()> {
    // As the `tuneforge` binary does: on the CPU, buffers stay mapped and one thread pool.
    tuneforge_kernels::tune_allocator();
    tuneforge_kernels::tune_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--write-task") {
        let dir = std::path::PathBuf::from(args.get(1).ok_or("--write-task needs a directory")?);
        let exp = tuneforge_core::testing::write_tiny_task(&dir, "")?;
        std::fs::write(dir.join("exp.toml"), exp)?;
        return Ok(());
    }
    let a = parse()?;
    let device = a.device.open()?;
    let mode = StepMode { compute_dtype: a.precision.compute_dtype(), checkpointing: a.checkpointing, parallel: None };
    let (b, l) = (a.batch, a.seq);
    let mut extra = serde_json::Map::new();
    let tokens = (b * l) as f64;
    // Returns (seconds per step, FLOPs per step, trainable parameters, total parameters).
    let (step_s, flops, trainable, total, peak) = match a.model.as_str() {
        "minilm" | "bert-base" => {
            let shape = if a.model == "minilm" { MINILM } else { BERT_BASE };
            let config: tuneforge_core::bert::BertConfig = serde_json::from_str(shape)?;
            let words: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            let text = tuneforge_data::TextEncoder::new(tuneforge_core::testing::tiny_tokenizer(&words)?, l)?;
            let labels: Vec<String> = (0..20).map(|i| format!("label{i}")).collect();
            let model = ClassifierModel::random(
                config.clone(),
                text,
                &ClassifierOptions {
                    labels,
                    pooling: tuneforge_core::Pooling::Mean,
                    max_len: l,
                    classifier_dropout: 0.1,
                    seed: 1,
                    trainability: Default::default(),
                    base_model: format!("{}-shaped", a.model),
                    dtype: DType::F32,
                    device: device.clone(),
                    peft: PeftSpec::None,
                    extra_tokens: Vec::new(),
                    fusion: None,
                },
            )?;
            let batch = EncodedBatch {
                ids: ids(b, l, config.vocab_size),
                type_ids: vec![0; b * l],
                mask: vec![1.0; b * l],
                labels: (0..b as u32).map(|i| i % 20).collect(),
                batch_size: b,
                seq_len: l,
                n_tokens: b * l,
                indices: (0..b).collect(),
                features: Vec::new(),
            };
            let batch: TrainBatch = batch.into();
            let trainable = model.params().trainable();
            let mut opt = AdamW::new(trainable.clone(), AdamWConfig::default())?;
            let mut phases = Vec::new();
            let mut step = |i: usize| -> Result<()> {
                let s = train_step_with(
                    &model,
                    &trainable,
                    &mut opt,
                    std::slice::from_ref(&batch),
                    &[i as u64],
                    1.0,
                    5e-5,
                    &mut [],
                    mode,
                )?;
                phases.push([s.forward_s, s.backward_s, s.optimizer_s]);
                Ok(())
            };
            let (secs, peak) = timed(&device, a.warmup, a.steps, &mut step)?;
            // Host-side phase times of the timed steps: the forward ends by reading the loss
            // (a synchronisation); the backward is the time to issue its kernels; the optimizer
            // phase includes waiting for the backward's kernels (the gradient norm is read).
            let timed_phases = &phases[a.warmup..a.warmup + a.steps];
            for (k, name) in ["forward_ms", "backward_issue_ms", "optimizer_ms"].iter().enumerate() {
                let mean = timed_phases.iter().map(|p| p[k]).sum::<f64>() / a.steps.max(1) as f64;
                extra.insert((*name).to_owned(), serde_json::json!(mean * 1e3));
            }
            // Full fine-tuning: 6 FLOPs per weight per token in the matrix products (the
            // embedding lookup has none), plus attention's QKᵀ and PV: 12·layers·seq·hidden.
            let h = config.hidden_size as f64;
            let layers = config.num_hidden_layers as f64;
            let dense = layers * (4.0 * h * h + 2.0 * h * config.intermediate_size as f64);
            let flops = tokens * (6.0 * dense + 12.0 * layers * l as f64 * h);
            (secs, flops, model.params().n_trainable(), model.params().n_params(), peak)
        }
        "smollm2" => {
            let config: LlamaConfig = serde_json::from_str(SMOLLM2)?;
            let peft = PeftSpec::Lora {
                rank: 8,
                alpha: 16.0,
                dropout: 0.05,
                target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
                first_layer: 0,
            };
            let pb = ParamBuilder::random(1, DType::F32, &device);
            pb.set_trainable(PeftSpec::is_peft_param);
            let model = DecoderModel::with_peft(&config, pb, &peft)?;
            let ids = Tensor::from_vec(ids(b, l, config.vocab_size), (b, l), &device)?;
            let mask = ids.ones_like()?;
            let trainable = model.params().trainable();
            let mut opt = AdamW::new(trainable.clone(), AdamWConfig::default())?;
            let mut step = |i: usize| -> Result<()> {
                let ctx = mode.ctx(i as u64);
                sft_step(&model, &trainable, &mut opt, &ids, &mask, &ctx, 1.0, 2e-4)?;
                Ok(())
            };
            let (secs, peak) = timed(&device, a.warmup, a.steps, &mut step)?;
            // LoRA on a frozen base: forward (2) and the activations' backward (2) through
            // every weight, no weight gradients; the tied head counts as a weight; attention
            // 12·layers·seq·hidden as for full training (PaLM's accounting, no causal halving).
            let h = config.hidden_size as f64;
            let layers = config.num_hidden_layers as f64;
            let kv = (config.kv_heads() * config.head_dim()) as f64;
            let per_layer = 2.0 * h * h + 2.0 * h * kv + 3.0 * h * config.intermediate_size as f64;
            let base = layers * per_layer + h * config.vocab_size as f64;
            let flops = tokens * (4.0 * base + 12.0 * layers * l as f64 * h);
            (secs, flops, model.params().n_trainable(), model.params().n_params(), peak)
        }
        other => return Err(format!("--model {other}: minilm, bert-base or smollm2").into()),
    };
    let achieved = flops / step_s / 1e12;
    let mut line = serde_json::json!({
        "framework": a.label,
        "model": a.model,
        "device": a.device.to_string(),
        "precision": format!("{:?}", a.precision).to_lowercase(),
        "checkpointing": a.checkpointing,
        "batch": b,
        "seq": l,
        "trainable_params": trainable,
        "params": total,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens / step_s,
        "tflops": achieved,
        "mfu": achieved / a.peak_tflops,
        "peak_memory_mib": peak as f64 / (1024.0 * 1024.0),
        "memory_in_use_mib": memory_in_use(&device)? as f64 / (1024.0 * 1024.0),
    });
    if let Some(obj) = line.as_object_mut() {
        obj.extend(extra);
    }
    println!("{line}");
    Ok(())
}

/// Mean seconds per step over `steps` timed steps after `warmup` untimed ones (memory is
/// not sampled meanwhile: polling the driver would slow the steps), then the peak memory
/// above the starting point over `warmup` more steps watched.
fn timed(
    device: &Device,
    warmup: usize,
    steps: usize,
    step: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<(f64, u64)> {
    let before = memory_in_use(device)?;
    for i in 0..warmup {
        step(i)?;
    }
    device.synchronize()?;
    let started = Instant::now();
    for i in 0..steps {
        step(warmup + i)?;
    }
    device.synchronize()?;
    let secs = started.elapsed().as_secs_f64() / steps.max(1) as f64;
    let watch = MemoryWatch::start(device)?;
    for i in 0..warmup.max(1) {
        step(warmup + steps + i)?;
    }
    device.synchronize()?;
    let peak = watch.stop();
    Ok((secs, peak.saturating_sub(before)))
}
