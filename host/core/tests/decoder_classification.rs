//! Classification with a decoder backbone: a tiny random Llama or Qwen2 (GGUF or Hugging
//! Face directory) under a head, pooled at the last real token, trained with LoRA through
//! the ordinary experiment pipeline; saved, reloaded and served like an encoder classifier.

use tuneforge_core::testing::{TINY_CSV, write_tiny_decoder};
use tuneforge_core::{ClassifierModel, ExperimentConfig, RunOptions, train_experiment};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn experiment(root: &std::path::Path, source: &std::path::Path, peft: &str) -> Result<String> {
    let csv = root.join("train.csv");
    std::fs::write(&csv, TINY_CSV)?;
    Ok(format!(
        "[experiment]\noutput_dir = \"{out}\"\nseed = 5\n[model]\nsource = \"{model}\"\nmax_len = 24\npooling = \"last\"\n\
         classifier_dropout = 0.0\n[data]\ntrain = \"{train}\"\nvalidation = \"{train}\"\n{peft}\n\
         [train]\nepochs = 25\nbatch_size = 8\nlr = 1e-2\nwarmup_steps = 2\n",
        out = root.join("runs").display(),
        model = source.display(),
        train = csv.display(),
    ))
}

#[test]
fn a_decoder_with_lora_learns_the_tiny_task_and_reloads() -> Result<()> {
    for (kind, from_gguf) in [("llama", true), ("qwen2", false)] {
        let tmp = tempfile::tempdir()?;
        write_tiny_decoder(&tmp.path().join("m"), kind)?;
        let source = if from_gguf { tmp.path().join("m/model.gguf") } else { tmp.path().join("m/hf") };
        let peft =
            "[peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"up_proj\"]";
        let text = experiment(tmp.path(), &source, peft)?;
        let out = train_experiment(
            ExperimentConfig::from_toml(&text, "exp.toml", &[])?,
            &RunOptions::default(),
            &mut |_| {},
        )?;
        let s = &out.summary;
        assert!(s.trainable_ratio < 0.5, "{kind}: only LoRA and the head train, ratio {}", s.trainable_ratio);
        let acc = s.validation.as_ref().expect("report").accuracy;
        assert!(acc >= 0.9, "{kind}: accuracy {acc} on the training rows");
        let best = ClassifierModel::load(&out.run.best())?;
        assert_eq!(best.meta().architecture, kind);
        assert!(best.config().is_none(), "no encoder config for a decoder");
        let texts = ["fever cough hot", "rash itch red", "chest pain tired"];
        let p = best.predict(&texts, 2)?;
        assert_eq!(p.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(), ["flu", "acne", "angina"], "{kind}");
        // Padding after a row's last token does not change its prediction (causal attention).
        let alone = best.predict(&texts[2..], 1)?;
        assert!((alone[0].score - p[2].score).abs() < 1e-4, "{kind}: {} vs {}", alone[0].score, p[2].score);
        // Saved over its base: only LoRA and the head are in the directory, a fraction of
        // the decoder; the base model comes from its source at load.
        assert!(best.meta().over_base, "{kind}");
        let bytes = std::fs::read(out.run.best().join("model.safetensors"))?;
        let saved = safetensors::SafeTensors::deserialize(&bytes)?;
        let names = saved.names();
        assert!(names.iter().all(|n| n.contains("lora_") || n.starts_with("classifier")), "{kind}: {names:?}");
        let count: usize = saved.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>()).sum();
        assert_eq!(count, s.params_trainable, "{kind}");
        // A re-saved loaded model (nothing trains) is whole, and predicts the same.
        best.save(&tmp.path().join("whole"))?;
        let whole = ClassifierModel::load(&tmp.path().join("whole"))?;
        assert!(!whole.meta().over_base);
        assert!((whole.predict(&texts[2..], 1)?[0].score - p[2].score).abs() < 1e-5);
        // Fine-tuning from it is refused with the base to start from instead.
        let again = experiment(tmp.path(), &out.run.best(), peft)?;
        let err = train_experiment(
            ExperimentConfig::from_toml(&again, "exp.toml", &[])?,
            &RunOptions::default(),
            &mut |_| {},
        )
        .expect_err("not a base model")
        .to_string();
        assert!(err.contains("saved over its base"), "{kind}: {err}");
        // int8 for serving: LoRA merged, a whole model (no base needed), the same answers.
        let int8_dir = tmp.path().join("int8");
        let report = tuneforge_core::quantize::quantize_int8(&out.run.best(), &int8_dir, false)?;
        assert_eq!(report.tensors, 6 * best.backbone_config().n_layers(), "{kind}: six projections per block");
        assert!(report.from_over_base, "{kind}");
        assert!(report.bytes_after < report.bytes_before, "{kind}: sizes against the whole f32 model: {report:?}");
        check_int8(&int8_dir, &texts, &p, kind)?;
        // Without its base, loading says which base it needs; the int8 copy needs none.
        let moved = tmp.path().join("moved-base");
        std::fs::rename(tmp.path().join("m"), &moved)?;
        let err = ClassifierModel::load(&out.run.best()).expect_err("the base is gone").to_string();
        assert!(err.contains("base model") && err.contains(&source.display().to_string()), "{kind}: {err}");
        check_int8(&int8_dir, &texts, &p, kind)?;
        std::fs::rename(&moved, tmp.path().join("m"))?;
    }
    Ok(())
}

/// The int8 model in `dir` predicts what the f32 model predicted (`f32`) with scores close
/// to its own, and it is not a starting point for fine-tuning.
fn check_int8(dir: &std::path::Path, texts: &[&str], f32: &[tuneforge_core::Prediction], kind: &str) -> Result<()> {
    let m = ClassifierModel::load(dir)?;
    assert!(m.meta().quantization.is_some() && !m.meta().over_base, "{kind}");
    let p = m.predict(texts, 2)?;
    for (a, b) in f32.iter().zip(&p) {
        assert_eq!(a.label, b.label, "{kind}: int8 {p:?} vs f32 {f32:?}");
        assert!((a.score - b.score).abs() < 0.05, "{kind}: int8 score {} vs f32 {}", b.score, a.score);
    }
    Ok(())
}

#[test]
fn decoder_only_settings_are_checked() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_tiny_decoder(&tmp.path().join("m"), "llama")?;
    let source = tmp.path().join("m/hf");
    let bert_targets = "[peft]\nmethod = \"lora\"\ntarget_modules = [\"query\", \"value\"]";
    let text = experiment(tmp.path(), &source, bert_targets)?;
    let err =
        train_experiment(ExperimentConfig::from_toml(&text, "exp.toml", &[])?, &RunOptions::default(), &mut |_| {})
            .expect_err("BERT module names on a decoder")
            .to_string();
    assert!(err.contains("peft.target_modules") && err.contains("q_proj"), "{err}");
    let adapters = "[peft]\nmethod = \"adapter\"";
    let text = experiment(tmp.path(), &source, adapters)?;
    let err =
        train_experiment(ExperimentConfig::from_toml(&text, "exp.toml", &[])?, &RunOptions::default(), &mut |_| {})
            .expect_err("adapters on a decoder")
            .to_string();
    assert!(err.contains("adapters are for encoders"), "{err}");
    // A frozen decoder with its last block and the head training.
    let freeze = "[peft]\nmethod = \"freeze\"\ntrain_last_layers = 1";
    let text = experiment(tmp.path(), &source, freeze)?;
    let out =
        train_experiment(ExperimentConfig::from_toml(&text, "exp.toml", &[])?, &RunOptions::default(), &mut |_| {})?;
    let best = ClassifierModel::load(&out.run.best())?;
    assert_eq!(best.labels().len(), 3);
    // Its int8 copy is not where a fine-tune starts.
    tuneforge_core::quantize::quantize_int8(&out.run.best(), &tmp.path().join("q"), false)?;
    let from_int8 = experiment(tmp.path(), &tmp.path().join("q"), freeze)?;
    let err = train_experiment(
        ExperimentConfig::from_toml(&from_int8, "exp.toml", &[])?,
        &RunOptions::default(),
        &mut |_| {},
    )
    .expect_err("an int8 model")
    .to_string();
    assert!(err.contains("int8 model for serving"), "{err}");
    Ok(())
}
