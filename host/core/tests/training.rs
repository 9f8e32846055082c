//! The training core end to end on tiny random models: gradients against finite
//! differences, every trainable tensor moving, overfitting, freezing, and kill-and-resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use tuneforge_core::bert::BertConfig;
use tuneforge_core::testing::{tiny_tokenizer, write_tiny_task};
use tuneforge_core::{
    AdamW, AdamWConfig, ClassifierModel, ClassifierOptions, ExperimentConfig, ForwardCtx, PeftSpec, Pooling, Result,
    RunOptions, Trainability, train_experiment,
};
use tuneforge_data::{EncodedBatch, TextEncoder};

const WORDS: &[&str] = tuneforge_core::testing::TINY_WORDS;

fn tiny_model(dtype: DType, pooling: Pooling, trainability: Trainability) -> Result<ClassifierModel> {
    tiny_model_with(dtype, pooling, trainability, None)
}

/// Two features per row, standardised with made-up statistics.
fn tiny_fusion() -> tuneforge_core::Fusion {
    tuneforge_core::Fusion::fit("f", vec!["x".into(), "y".into()], &[vec![0.0, 2.0], vec![1.0, 4.0]], 3)
}

fn tiny_model_with(
    dtype: DType,
    pooling: Pooling,
    trainability: Trainability,
    fusion: Option<tuneforge_core::Fusion>,
) -> Result<ClassifierModel> {
    let tokenizer = tiny_tokenizer(WORDS)?;
    let text = TextEncoder::new(tokenizer, 16)?;
    let mut config = BertConfig::tiny(text.vocab_size());
    config.hidden_dropout_prob = 0.0;
    config.attention_probs_dropout_prob = 0.0;
    ClassifierModel::random(
        config,
        text,
        &ClassifierOptions {
            labels: vec!["a".into(), "b".into(), "c".into()],
            pooling,
            max_len: 16,
            classifier_dropout: 0.0,
            seed: 7,
            trainability,
            base_model: "tiny".into(),
            dtype,
            device: candle_core::Device::Cpu,
            peft: PeftSpec::None,
            extra_tokens: Vec::new(),
            fusion,
        },
    )
}

fn batch(model: &ClassifierModel) -> Result<EncodedBatch> {
    let texts = ["fever cough hot", "rash itch red skin", "chest pain", "head pain tired sneeze"];
    let encoded = model.text_encoder().encode(&texts)?;
    let b = EncodedBatch::collate(&encoded, &[0, 1, 2, 3], Some(&[0, 1, 2, 0]), 0);
    Ok(if model.meta().fusion.is_some() {
        b.with_features(&[vec![0.5, 3.0], vec![-1.0, 2.5], vec![2.0, 6.0], vec![0.0, 1.0]])
    } else {
        b
    })
}

fn loss_of(model: &ClassifierModel, b: &EncodedBatch) -> Result<f64> {
    let (loss, _) = model.loss(b, &ForwardCtx::eval_differentiable())?;
    Ok(loss.to_scalar::<f64>()?)
}

/// A row's logits do not depend on the batch it comes in: alone, or padded beside longer
/// rows (on the CPU the encoder packs the real tokens; padding must change nothing).
#[test]
fn a_rows_logits_do_not_depend_on_the_padding_of_its_batch() -> Result<()> {
    let model = tiny_model(DType::F64, Pooling::Mean, Trainability::default())?;
    let texts = ["chest pain", "rash itch red skin fever cough hot", "head pain tired sneeze"];
    let encoded = model.text_encoder().encode(&texts)?;
    let together = model.logits(&EncodedBatch::collate(&encoded, &[0, 1, 2], None, 0), &ForwardCtx::eval())?;
    for row in 0..3 {
        let alone = model.logits(&EncodedBatch::collate(&encoded, &[row], None, 0), &ForwardCtx::eval())?;
        let diff = (alone.get(0)? - together.get(row)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "row {row}: logits differ by {diff}");
    }
    Ok(())
}

/// Analytic gradients of the whole model (embeddings, every layer norm, attention, head)
/// match central finite differences in f64. Fused candle ops without a backward would make
/// the analytic gradient of everything below them zero, and this test fail.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for (pooling, fusion) in [(Pooling::Mean, None), (Pooling::Cls, None), (Pooling::Mean, Some(tiny_fusion()))] {
        let with_fusion = fusion.is_some();
        let model = tiny_model_with(DType::F64, pooling, Trainability::default(), fusion)?;
        let b = batch(&model)?;
        let (loss, _) = model.loss(&b, &ForwardCtx::eval_differentiable())?;
        let grads = loss.backward()?;
        let eps = 1e-6;
        let vars = model.params().trainable();
        let fusion_params = if with_fusion { 2 } else { 0 };
        assert_eq!(vars.len(), 5 + 16 * 2 + 2 + fusion_params, "every parameter trains in full fine-tuning");
        for (name, var) in vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let g_flat = g.flatten_all()?.to_vec1::<f64>()?;
            let norm: f64 = g_flat.iter().map(|v| v * v).sum::<f64>().sqrt();
            // Position rows past the batch's length and unused word rows legitimately get no
            // gradient; every other tensor must.
            assert!(norm > 0.0, "{name}: gradient is zero");
            // Check the largest-gradient element and one more.
            let largest =
                g_flat.iter().enumerate().fold((0, 0.0f64), |a, (i, v)| if v.abs() > a.1 { (i, v.abs()) } else { a }).0;
            for idx in [largest, (largest * 7 + 3) % g_flat.len()] {
                let original = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
                let mut plus = original.clone();
                plus[idx] += eps;
                var.set(&Tensor::from_vec(plus, var.shape(), var.device())?)?;
                let lp = loss_of(&model, &b)?;
                let mut minus = original.clone();
                minus[idx] -= eps;
                var.set(&Tensor::from_vec(minus, var.shape(), var.device())?)?;
                let lm = loss_of(&model, &b)?;
                var.set(&Tensor::from_vec(original, var.shape(), var.device())?)?;
                let numeric = (lp - lm) / (2.0 * eps);
                let analytic = g_flat[idx];
                let tol = 1e-6 + 1e-4 * analytic.abs().max(numeric.abs());
                assert!(
                    (numeric - analytic).abs() < tol,
                    "{name}[{idx}] ({pooling:?}): analytic {analytic:e} vs numeric {numeric:e}"
                );
            }
        }
    }
    Ok(())
}

/// Inference uses candle's fused kernels; they must give the training path's logits.
#[test]
fn fused_inference_matches_the_differentiable_forward() -> Result<()> {
    let model = tiny_model(DType::F32, Pooling::Mean, Trainability::default())?;
    let b = batch(&model)?;
    let fused = model.logits(&b, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
    let composed = model.logits(&b, &ForwardCtx::eval_differentiable())?.flatten_all()?.to_vec1::<f32>()?;
    for (a, c) in fused.iter().zip(&composed) {
        assert!((a - c).abs() < 1e-5, "{a} vs {c}");
    }
    Ok(())
}

#[test]
fn one_step_moves_every_trainable_tensor_and_no_frozen_one() -> Result<()> {
    let model = tiny_model(
        DType::F32,
        Pooling::Mean,
        Trainability { train_last_layers: Some(1), train_embeddings: false, peft_only: false },
    )?;
    let before: HashMap<String, Vec<f32>> = model
        .params()
        .tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    let vars = model.params().trainable();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let (loss, _) = model.loss(&batch(&model)?, &ForwardCtx::train(1))?;
    let store = loss.backward()?;
    let grads: HashMap<String, Tensor> =
        vars.iter().filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone()))).collect();
    opt.step(&grads, 1e-3)?;
    for (name, t) in model.params().tensors() {
        let after = t.flatten_all()?.to_vec1::<f32>()?;
        let moved = after != before[&name];
        let trainable = name.starts_with("encoder.layer.1.") || name.starts_with("classifier.");
        assert_eq!(moved, trainable, "{name}: moved={moved}, trainable={trainable}");
    }
    Ok(())
}

// ---- the pipeline on files ----

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| tuneforge_core::CoreError::Io { path: "tmp".into(), source: e })?;
        let root = dir.path().to_path_buf();
        let _ = write_tiny_task(&root, "")?;
        Ok(Self { _dir: dir, root })
    }

    fn config(&self, extra: &str, overrides: &[&str]) -> Result<ExperimentConfig> {
        let text = write_tiny_task(&self.root, extra)?;
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        ExperimentConfig::from_toml(&text, "test.toml", &ov)
    }
}

fn train_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().expect("loss"))
        .collect()
}

#[test]
fn a_tiny_model_overfits_a_tiny_dataset_and_the_best_model_reloads() -> Result<()> {
    let fx = Fixture::new()?;
    let out = train_experiment(fx.config("", &["train.lr=1e-2"])?, &RunOptions::default(), &mut |_| {})?;
    let losses = train_losses(out.run.root());
    assert_eq!(losses.len(), 30 * 3);
    assert!(losses[0] > 0.9, "starts near ln(3): {}", losses[0]);
    let tail = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(tail < 0.1, "final loss {tail}");
    let s = &out.summary;
    assert_eq!(s.status, "completed");
    let v = s.validation.as_ref().expect("validation report");
    assert_eq!(v.accuracy, 1.0);
    assert!(s.gates_passed);
    let reloaded = ClassifierModel::load(&out.run.best())?;
    let p = reloaded.predict(&["rash itch red skin", "chest pain"], 8)?;
    assert_eq!((p[0].label.as_str(), p[1].label.as_str()), ("acne", "angina"));
    for name in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "best/model.safetensors",
        "best/tokenizer.json",
        "checkpoints/LATEST",
    ] {
        assert!(out.run.root().join(name).exists(), "{name}");
    }
    Ok(())
}

#[test]
fn freezing_leaves_frozen_weights_bit_identical_and_reports_the_ratio() -> Result<()> {
    let fx = Fixture::new()?;
    let cfg = fx.config("", &["peft.method=freeze", "peft.train_last_layers=1", "train.epochs=3"])?;
    let out = train_experiment(cfg, &RunOptions::default(), &mut |_| {})?;
    let base = candle_core::safetensors::load(fx.root.join("model/model.safetensors"), &candle_core::Device::Cpu)?;
    let tuned = candle_core::safetensors::load(out.run.best().join("model.safetensors"), &candle_core::Device::Cpu)?;
    let bits = |t: &Tensor| {
        t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    for (name, t) in &base {
        let same = bits(t)? == bits(&tuned[name])?;
        let frozen = !name.starts_with("encoder.layer.1.");
        assert_eq!(same, frozen, "{name}");
    }
    // Layer 1 of the tiny config (h=16, ffn=32) plus a 3-label head, over everything.
    let h = 16usize;
    let layer = 4 * (h * h + h) + 2 * 2 * h + (h * 32 + 32) + (32 * h + h);
    let head = 3 * h + 3;
    let total: usize = base.values().map(|t| t.elem_count()).sum::<usize>() + head;
    let expected = (layer + head) as f64 / total as f64;
    assert!((out.summary.trainable_ratio - expected).abs() < 1e-12, "{} vs {expected}", out.summary.trainable_ratio);
    assert_eq!(out.summary.params_trainable, layer + head);
    Ok(())
}

#[test]
fn a_stopped_and_resumed_run_follows_the_uninterrupted_trajectory() -> Result<()> {
    let fx = Fixture::new()?;
    // Dropout on, gradient accumulation and mid-epoch evaluation: all must resume exactly.
    let extra = "grad_accum = 2\neval_every_steps = 2\n";
    let ov = ["train.epochs=4", "model.classifier_dropout=0.2"];
    let full = train_experiment(fx.config(extra, &ov)?, &RunOptions::default(), &mut |_| {})?;
    let stopped =
        train_experiment(fx.config(extra, &ov)?, &RunOptions { resume: None, stop_after_steps: Some(3) }, &mut |_| {})?;
    assert_eq!(stopped.summary.status, "stopped");
    assert_eq!(train_losses(stopped.run.root()).len(), 3);
    let resumed = train_experiment(
        fx.config(extra, &ov)?,
        &RunOptions { resume: Some(stopped.run.root().to_path_buf()), stop_after_steps: None },
        &mut |_| {},
    )?;
    assert_eq!(resumed.run.root(), stopped.run.root());
    let a = train_losses(full.run.root());
    let b = train_losses(resumed.run.root());
    assert_eq!(a.len(), b.len());
    assert_eq!(a.len(), 4 * 2);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-5, "step {}: {x} vs {y}", i + 1);
    }
    assert_eq!(full.summary.best_value, resumed.summary.best_value);
    Ok(())
}

// ---- parameter-efficient methods ----

fn peft_model(dir: &Path, peft: PeftSpec, trainability: Trainability) -> Result<ClassifierModel> {
    ClassifierModel::from_base(
        dir,
        &ClassifierOptions {
            labels: vec!["acne".into(), "angina".into(), "flu".into()],
            pooling: Pooling::Mean,
            max_len: 16,
            classifier_dropout: 0.0,
            seed: 1,
            trainability,
            base_model: "tiny".into(),
            dtype: DType::F32,
            device: candle_core::Device::Cpu,
            peft,
            extra_tokens: Vec::new(),
            fusion: None,
        },
    )
}

fn lora(first_layer: usize) -> PeftSpec {
    PeftSpec::Lora {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["query".into(), "value".into(), "dense".into()],
        first_layer,
    }
}

fn adapter(first_layer: usize) -> PeftSpec {
    PeftSpec::Adapter {
        reduction_factor: 4,
        placement: vec![tuneforge_core::AdapterPlacement::Attention, tuneforge_core::AdapterPlacement::Ffn],
        first_layer,
    }
}

const PEFT_ONLY: Trainability = Trainability { train_last_layers: None, train_embeddings: false, peft_only: true };

#[test]
fn fresh_adapters_and_lora_compute_the_base_model() -> Result<()> {
    let fx = Fixture::new()?;
    let dir = fx.root.join("model");
    let texts = ["fever cough hot", "rash itch red skin", "chest pain tired"];
    let base = peft_model(&dir, PeftSpec::None, Trainability::default())?.embeddings(&texts, 8)?;
    for spec in [lora(0), lora(1), adapter(0), adapter(1)] {
        let model = peft_model(&dir, spec.clone(), PEFT_ONLY)?;
        let got = model.embeddings(&texts, 8)?;
        for (a, b) in base.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{spec:?}: {a} vs {b}");
        }
        let names: Vec<String> = model.params().trainable().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().all(|n| n.starts_with("classifier.") || PeftSpec::is_peft_param(n)), "{names:?}");
    }
    Ok(())
}

/// With weight decay off, two AdamW steps move every LoRA and adapter tensor (A only gets a
/// gradient once B has left zero) and no base tensor.
#[test]
fn two_steps_move_every_peft_tensor_and_no_base_tensor() -> Result<()> {
    let fx = Fixture::new()?;
    for spec in [lora(0), adapter(0)] {
        let model = peft_model(&fx.root.join("model"), spec.clone(), PEFT_ONLY)?;
        let snapshot = |m: &ClassifierModel| -> Result<HashMap<String, Vec<f32>>> {
            m.params().tensors().into_iter().map(|(n, t)| Ok((n, t.flatten_all()?.to_vec1::<f32>()?))).collect()
        };
        let before = snapshot(&model)?;
        let vars = model.params().trainable();
        let mut opt = AdamW::new(vars.clone(), AdamWConfig { weight_decay: 0.0, ..Default::default() })?;
        let b = batch(&model)?;
        for step in 0..2 {
            tuneforge_core::train_step(&model, &vars, &mut opt, &[b.clone().into()], &[step], 0.0, 1e-2)?;
        }
        let after = snapshot(&model)?;
        for (name, v) in &after {
            let moved = *v != before[name];
            let trainable = name.starts_with("classifier.") || PeftSpec::is_peft_param(name);
            assert_eq!(moved, trainable, "{spec:?}: {name}");
        }
    }
    Ok(())
}

#[test]
fn lora_trains_with_a_frozen_base_merges_and_exports() -> Result<()> {
    let fx = Fixture::new()?;
    let cfg = fx.config(
        "",
        &[
            "peft.method=lora",
            "peft.rank=4",
            "peft.alpha=8",
            "peft.target_modules=[\"query\",\"value\"]",
            "train.lr=2e-2",
        ],
    )?;
    let out = train_experiment(cfg, &RunOptions::default(), &mut |_| {})?;
    assert!(matches!(out.summary.peft, PeftSpec::Lora { rank: 4, .. }));
    assert!(out.summary.validation.as_ref().expect("report").accuracy >= 0.9);
    let base = candle_core::safetensors::load(fx.root.join("model/model.safetensors"), &candle_core::Device::Cpu)?;
    let tuned = candle_core::safetensors::load(out.run.best().join("model.safetensors"), &candle_core::Device::Cpu)?;
    for (name, t) in &base {
        let same = t.flatten_all()?.to_vec1::<f32>()? == tuned[name].flatten_all()?.to_vec1::<f32>()?;
        assert!(same, "{name} changed");
    }
    // LoRA on query and value of both layers (A: 4x16, B: 16x4) and a 3-label head.
    let trainable = 2 * 2 * (4 * 16 + 16 * 4) + 3 * 16 + 3;
    assert_eq!(out.summary.params_trainable, trainable);

    let model = ClassifierModel::load(&out.run.best())?;
    let merged_dir = fx.root.join("merged");
    tuneforge_core::export::export_merged(&out.run.best(), &merged_dir)?;
    let merged = ClassifierModel::load(&merged_dir)?;
    assert!(merged.params().tensors().iter().all(|(n, _)| !PeftSpec::is_peft_param(n)));
    let b = batch(&model)?;
    let x = model.logits(&b, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
    let y = merged.logits(&b, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
    for (a, c) in x.iter().zip(&y) {
        assert!((a - c).abs() < 1e-4, "merged {c} vs unmerged {a}");
    }

    let peft_dir = fx.root.join("peft");
    tuneforge_core::export::export_peft(out.run.root(), &peft_dir)?;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir.join("adapter_config.json")).expect("config"))
            .expect("json");
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_u64()), (Some("LORA"), Some(4)));
    let adapter =
        candle_core::safetensors::load(peft_dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu)?;
    let mut keys: Vec<&String> = adapter.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 8);
    assert_eq!(keys[0], "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight");
    assert_eq!(adapter[keys[0]].dims(), [4, 16]);
    // Adapters are not LoRA: merging them is refused with a clear message.
    let e = tuneforge_core::export::export_merged(&merged_dir, &fx.root.join("again")).expect_err("no LoRA");
    assert!(e.to_string().contains("not LoRA"), "{e}");
    Ok(())
}

/// Adapters everywhere plus the last layer's base weights train; layer 0 and the
/// embeddings stay bit-identical.
#[test]
fn adapters_combine_with_training_the_last_layer() -> Result<()> {
    let fx = Fixture::new()?;
    let cfg = fx
        .config("", &["peft.method=adapter", "peft.reduction_factor=4", "peft.train_last_layers=1", "train.lr=2e-2"])?;
    let out = train_experiment(cfg, &RunOptions::default(), &mut |_| {})?;
    let model = ClassifierModel::load(&out.run.best())?;
    let names: Vec<String> = model.params().tensors().into_iter().map(|(n, _)| n).collect();
    for layer in 0..2 {
        assert!(names.iter().any(|n| n.starts_with(&format!("encoder.layer.{layer}.attention.output.adapter.down"))));
        assert!(names.iter().any(|n| n.starts_with(&format!("encoder.layer.{layer}.output.adapter.up"))));
    }
    // Four adapters (16->4->16), layer 1 (h=16, ffn=32) and the head.
    let adapters = 4 * (16 * 4 + 4 + 4 * 16 + 16);
    let layer = 4 * (16 * 16 + 16) + 2 * 2 * 16 + (16 * 32 + 32) + (32 * 16 + 16);
    assert_eq!(out.summary.params_trainable, adapters + layer + 3 * 16 + 3);
    assert!(out.summary.validation.as_ref().expect("report").accuracy >= 0.9);
    let base = candle_core::safetensors::load(fx.root.join("model/model.safetensors"), &candle_core::Device::Cpu)?;
    let tuned = candle_core::safetensors::load(out.run.best().join("model.safetensors"), &candle_core::Device::Cpu)?;
    for (name, t) in &base {
        let same = t.flatten_all()?.to_vec1::<f32>()? == tuned[name].flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(same, !name.starts_with("encoder.layer.1."), "{name}");
    }
    Ok(())
}

#[test]
fn early_stopping_ends_the_run_when_the_metric_stalls() -> Result<()> {
    let fx = Fixture::new()?;
    // No evaluation can improve accuracy by a whole point, so the second one stops the run.
    let cfg = fx.config("early_stopping_patience = 1\nearly_stopping_min_delta = 1.0\n", &["train.epochs=10"])?;
    let out = train_experiment(cfg, &RunOptions::default(), &mut |_| {})?;
    assert_eq!(out.summary.early_stopped_at, Some(6));
    assert_eq!(out.summary.steps, 6);
    assert_eq!(out.summary.total_steps, 30);
    assert_eq!(out.summary.status, "completed");
    Ok(())
}

/// Training from the frozen-prefix cache gives the loss and gradients of the full forward
/// pass (dropout off, so the frozen part computes the same either way).
#[test]
fn the_prefix_cache_gives_the_same_loss_and_gradients() -> Result<()> {
    let fx = Fixture::new()?;
    let frozen = Trainability { train_last_layers: Some(1), train_embeddings: false, peft_only: false };
    let model = peft_model(&fx.root.join("model"), PeftSpec::None, frozen)?;
    assert_eq!(model.frozen_prefix_layers(), 1);
    let texts = ["fever cough hot", "rash itch red skin", "chest pain", "pain chest tired sneeze"];
    let encoded = model.text_encoder().encode(&texts)?;
    let cache = tuneforge_core::PrefixCache::build(&model, &encoded, 1, 3)?;
    let b = EncodedBatch::collate(&encoded, &[3, 0, 2], Some(&[0, 1, 2, 0]), 0);
    let ctx = ForwardCtx::eval_differentiable();
    let (full, _) = model.loss(&b, &ctx)?;
    let prefix = cache.collate(&b)?;
    let (cached, _) = model.loss_from(&b, Some(&prefix), &ctx)?;
    let (x, y) = (full.to_scalar::<f32>()?, cached.to_scalar::<f32>()?);
    assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    let (g1, g2) = (full.backward()?, cached.backward()?);
    for (name, var) in model.params().trainable() {
        let a = g1.get(var.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f32>()?;
        let c = g2.get(var.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f32>()?;
        for (u, v) in a.iter().zip(&c) {
            assert!((u - v).abs() < 1e-4, "{name}: {u} vs {v}");
        }
    }
    Ok(())
}

/// Added terms become single tokens whose rows start as the mean of their pieces, train while
/// the original rows stay frozen, and survive saving and reloading.
#[test]
fn vocabulary_extension_round_trips_through_save_and_load() -> Result<()> {
    let fx = Fixture::new()?;
    std::fs::write(fx.root.join("terms.txt"), "# medical terms\nfever cough\nrash itch\n\nfever cough\n")
        .map_err(|e| tuneforge_core::CoreError::Io { path: "terms".into(), source: e })?;
    let extra = format!("data.extra_tokens=\"{}\"", fx.root.join("terms.txt").display());
    let cfg = fx.config("", &[&extra, "peft.method=freeze", "peft.train_last_layers=1", "train.epochs=5"])?;
    let out = train_experiment(cfg, &RunOptions::default(), &mut |_| {})?;
    let model = ClassifierModel::load(&out.run.best())?;
    assert_eq!(model.meta().extra_tokens, ["fever cough", "rash itch"]);
    let v = model.config().map_or(0, |c| c.vocab_size) as u32;
    let enc = model.text_encoder().encode(&["fever cough hot", "red rash itch"])?;
    assert_eq!(enc[0].ids, [1, v, 3 + 11, 2], "[CLS] <fever cough> hot [SEP]");
    assert_eq!(enc[1].ids[2], v + 1);
    let tuned = candle_core::safetensors::load(out.run.best().join("model.safetensors"), &candle_core::Device::Cpu)?;
    let base = candle_core::safetensors::load(fx.root.join("model/model.safetensors"), &candle_core::Device::Cpu)?;
    let word = "embeddings.word_embeddings.weight";
    assert_eq!(tuned[word].flatten_all()?.to_vec1::<f32>()?, base[word].flatten_all()?.to_vec1::<f32>()?);
    // Initialised from the mean of `fever` and `cough`, then trained away from it.
    let rows = base[word].to_vec2::<f32>()?;
    let mean: Vec<f32> = rows[4].iter().zip(&rows[5]).map(|(a, b)| (a + b) / 2.0).collect();
    let added = tuned["embeddings.word_embeddings.extra"].to_vec2::<f32>()?;
    assert_ne!(added[0], mean);
    let drift: f32 = added[0].iter().zip(&mean).map(|(a, b)| (a - b).abs()).sum::<f32>() / mean.len() as f32;
    assert!(drift < 0.5, "the added row starts from the mean ({drift})");
    let p = model.predict(&["fever cough hot", "red rash itch"], 4)?;
    assert_eq!((p[0].label.as_str(), p[1].label.as_str()), ("flu", "acne"));
    Ok(())
}

#[test]
fn a_fused_model_needs_its_features_and_reloads_with_them() -> Result<()> {
    let model = tiny_model_with(DType::F32, Pooling::Mean, Trainability::default(), Some(tiny_fusion()))?;
    let b = batch(&model)?;
    let with = model.logits(&b, &ForwardCtx::eval())?.to_vec2::<f32>()?;
    let mut bare = b.clone();
    bare.features.clear();
    let err = model.logits(&bare, &ForwardCtx::eval()).expect_err("features missing").to_string();
    assert!(err.contains("fuses 2 features from plugin `f`"), "{err}");
    let dir = tempfile::tempdir().map_err(|e| tuneforge_core::CoreError::Io { path: "tmp".into(), source: e })?;
    model.save(&dir.path().join("m"))?;
    let again = ClassifierModel::load(&dir.path().join("m"))?;
    assert_eq!(again.meta().fusion, model.meta().fusion);
    let reloaded = again.logits(&b, &ForwardCtx::eval())?.to_vec2::<f32>()?;
    assert_eq!(with, reloaded);
    let mut other = b.clone();
    other.features.iter_mut().for_each(|v| *v += 5.0);
    assert_ne!(again.logits(&other, &ForwardCtx::eval())?.to_vec2::<f32>()?, with, "features change the logits");
    Ok(())
}

/// Two data-parallel ranks (threads of an in-process group, one replica each), each taking
/// one micro-batch a step, follow the trajectory of one process that accumulates both: the
/// arithmetic of `tuneforge train --gpus 2` (over NCCL there) — same losses, same weights.
#[test]
fn two_data_parallel_ranks_train_like_one_process_with_both_micro_batches() -> Result<()> {
    use candle_core::Device;
    use tuneforge_core::parallel::DataParallel;
    use tuneforge_core::testing::tiny_classifier;
    use tuneforge_core::{StepMode, TrainBatch, train_step_with};
    let halves = |model: &ClassifierModel| -> Result<Vec<TrainBatch>> {
        let texts = ["fever cough hot", "rash itch red skin", "chest pain", "head pain tired sneeze fever"];
        let encoded = model.text_encoder().encode(&texts)?;
        Ok([[0usize, 1], [2, 3]]
            .iter()
            .map(|rows| EncodedBatch::collate(&encoded, rows, Some(&[0, 1, 2, 0]), 0).into())
            .collect())
    };
    // Losses of 6 steps and the final weights of `micro` micro-batches a step on this rank.
    let run = |group: Option<&DataParallel>, micro: &[usize]| -> Result<(Vec<f64>, Vec<f32>)> {
        let model = tiny_classifier(&Device::Cpu, 0.0, 4)?;
        let batches = halves(&model)?;
        let mine: Vec<TrainBatch> = micro.iter().map(|&i| batches[i].clone()).collect();
        let trainable = model.params().trainable();
        let mut opt = AdamW::new(trainable.clone(), AdamWConfig::default())?;
        let mode = match group {
            Some(g) => StepMode::default().with_parallel(g),
            None => StepMode::default(),
        };
        let seeds: Vec<u64> = micro.iter().map(|&i| i as u64).collect();
        let mut losses = Vec::new();
        for _ in 0..6 {
            losses.push(train_step_with(&model, &trainable, &mut opt, &mine, &seeds, 1.0, 3e-3, &mut [], mode)?.loss);
        }
        let mut weights = Vec::new();
        for (_, v) in &trainable {
            weights.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((losses, weights))
    };
    let (one_losses, one_weights) = run(None, &[0, 1])?;
    let ranks = DataParallel::in_process(2);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                s.spawn(move || {
                    let group = DataParallel::from(rank);
                    run(Some(&group), &[group.rank()])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect::<Vec<_>>()
    });
    for (rank, r) in results.into_iter().enumerate() {
        let (losses, weights) = r?;
        for (step, (a, b)) in one_losses.iter().zip(&losses).enumerate() {
            assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "rank {rank}, step {step}: {a} vs {b}");
        }
        let d = one_weights.iter().zip(&weights).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 1e-5, "rank {rank}: weights differ by {d}");
    }
    assert!(one_losses[5] < one_losses[0], "it trains: {one_losses:?}");
    Ok(())
}

/// Whole runs on two data-parallel ranks (threads of an in-process group): the run follows
/// one process accumulating both ranks' micro-batches, dropout included (micro-batches are
/// seeded by their place in the step, whichever rank runs them); stopped and resumed on two
/// ranks it follows the same trajectory, and rank 1 never writes into rank 0's run.
#[test]
fn data_parallel_runs_follow_one_process_and_resume_without_clobbering_rank_0() -> Result<()> {
    use tuneforge_core::parallel::DataParallel;
    use tuneforge_core::{NoHooks, TrainOutcome, train_experiment_in};
    let fx = Fixture::new()?;
    // 24 rows in micro-batches of 6: 4 a step for one process (grad_accum 4), 2 on each rank.
    let ov = ["train.epochs=3", "train.batch_size=6", "model.classifier_dropout=0.2"];
    let one = train_experiment(fx.config("grad_accum = 4\n", &ov)?, &RunOptions::default(), &mut |_| {})?;
    let two = |options: RunOptions| -> Result<Vec<TrainOutcome>> {
        let ranks = DataParallel::in_process(2);
        let cfg = fx.config("grad_accum = 2\n", &ov)?;
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|rank| {
                    let (cfg, options) = (cfg.clone(), options.clone());
                    s.spawn(move || {
                        let group = DataParallel::from(rank);
                        train_experiment_in(cfg, &options, Some(&group), &NoHooks, &mut |_| {})
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    };
    let whole = two(RunOptions::default())?;
    let (a, b) = (train_losses(one.run.root()), train_losses(whole[0].run.root()));
    assert_eq!((a.len(), b.len()), (3, 3), "one step an epoch");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-5, "step {}: one process {x}, two ranks {y}", i + 1);
    }
    let stopped = two(RunOptions { resume: None, stop_after_steps: Some(2) })?;
    let dir = stopped[0].run.root().to_path_buf();
    assert_eq!(train_losses(&dir).len(), 2);
    let resumed = two(RunOptions { resume: Some(dir.clone()), stop_after_steps: None })?;
    assert_eq!(resumed[0].run.root(), dir);
    assert_ne!(resumed[1].run.root(), dir, "rank 1 writes elsewhere");
    let c = train_losses(&dir);
    assert_eq!(c.len(), 3, "one metrics line a step: rank 1 did not write into rank 0's run");
    for (i, (x, y)) in b.iter().zip(&c).enumerate() {
        assert!((x - y).abs() < 1e-5, "step {}: uninterrupted {x}, resumed {y}", i + 1);
    }
    Ok(())
}
