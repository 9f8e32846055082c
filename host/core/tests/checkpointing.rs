//! Gradient checkpointing recomputes each transformer layer in the backward pass; the
//! gradients must be the ones of the ordinary backward, dropout included (the recomputed
//! layer draws the same masks), for the encoder and the decoder.

use candle_core::{DType, Device, Tensor};
use tuneforge_core::ForwardCtx;
use tuneforge_core::llama::{DecoderModel, LlamaConfig};
use tuneforge_core::testing::{
    classifier_gradients, decoder_gradients, max_relative_difference, tiny_batch, tiny_classifier,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[test]
fn encoder_checkpointing_gives_the_same_gradients_with_dropout() -> Result<()> {
    let model = tiny_classifier(&Device::Cpu, 0.2, 3)?;
    let batch = tiny_batch(&model)?;
    let (plain_loss, plain) = classifier_gradients(&model, &batch, &ForwardCtx::train(11))?;
    let ctx = ForwardCtx::train(11).with_checkpointing(true);
    let (ckpt_loss, ckpt) = classifier_gradients(&model, &batch, &ctx)?;
    assert!(ctx.take_record().is_none(), "the backward consumed the record");
    assert_eq!(plain_loss, ckpt_loss);
    assert_eq!(plain.len(), model.params().trainable().len(), "every trainable tensor has a gradient");
    let diff = max_relative_difference(&plain, &ckpt)?;
    assert!(diff < 1e-5, "checkpointed gradients differ by {diff}");
    // A different step seed draws different masks: the comparison above is not vacuous.
    let (_, other) = classifier_gradients(&model, &batch, &ForwardCtx::train(12))?;
    assert!(max_relative_difference(&plain, &other)? > 1e-3);
    Ok(())
}

#[test]
fn decoder_checkpointing_gives_the_same_gradients() -> Result<()> {
    for kind in ["llama", "qwen2"] {
        let config = LlamaConfig::tiny(kind, 40);
        let model = DecoderModel::random(&config, 5, DType::F32)?;
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 17, 2, 8], [4, 4, 30, 12, 7, 1, 0]], &Device::Cpu)?;
        let (plain_loss, plain) = decoder_gradients(&model, &ids, &ForwardCtx::eval_differentiable())?;
        let ctx = ForwardCtx::eval_differentiable().with_checkpointing(true);
        let (ckpt_loss, ckpt) = decoder_gradients(&model, &ids, &ctx)?;
        assert!((plain_loss - ckpt_loss).abs() < 1e-6, "{kind}: {plain_loss} vs {ckpt_loss}");
        assert_eq!(plain.len(), model.params().trainable().len(), "{kind}");
        let diff = max_relative_difference(&plain, &ckpt)?;
        assert!(diff < 1e-5, "{kind}: checkpointed gradients differ by {diff}");
    }
    Ok(())
}

#[test]
fn inference_never_checkpoints() {
    let ctx = ForwardCtx::eval().with_checkpointing(true);
    assert!(!ctx.is_checkpointing(), "a pass that is not differentiated keeps nothing");
}

/// `[train] gradient_checkpointing = true` in an experiment: the same training run (same
/// losses, same final accuracy) as without it.
#[test]
fn an_experiment_with_checkpointing_follows_the_same_curve() -> Result<()> {
    use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment};
    let curve = |checkpointing: bool| -> Result<(Vec<f64>, f64)> {
        let tmp = tempfile::tempdir()?;
        let text = tuneforge_core::testing::write_tiny_task(tmp.path(), "")?;
        let overrides = ["train.epochs=3".to_owned(), format!("train.gradient_checkpointing={checkpointing}")];
        let cfg = ExperimentConfig::from_toml(&text, "exp.toml", &overrides)?;
        let out = train_experiment(cfg, &RunOptions::default(), &mut |_| {})?;
        let metrics = std::fs::read_to_string(out.run.metrics())?;
        let losses = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "train")
            .filter_map(|v| v["loss"].as_f64())
            .collect();
        Ok((losses, out.summary.validation.as_ref().map_or(0.0, |v| v.accuracy)))
    };
    let (plain, plain_acc) = curve(false)?;
    let (ckpt, ckpt_acc) = curve(true)?;
    assert!(plain.len() >= 9, "{plain:?}");
    assert_eq!(plain.len(), ckpt.len());
    for (a, b) in plain.iter().zip(&ckpt) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert_eq!(plain_acc, ckpt_acc);
    Ok(())
}
