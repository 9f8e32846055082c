//! Tiny random models and tokenizers for tests, examples and benchmarks of the machinery
//! (never for real training): a word-level tokenizer over a given vocabulary and a model
//! directory in Hugging Face layout with random BERT weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::bert::BertProcessing;

use crate::bert::{BertConfig, BertEncoder};
use crate::weights::to_safetensors_bytes;
use crate::{CoreError, ParamBuilder, Result};

/// Special tokens first: `[PAD]`=0, `[CLS]`=1, `[SEP]`=2, `[UNK]`=3, then `words`.
pub fn tiny_tokenizer(words: &[&str]) -> Result<Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, w) in ["[PAD]", "[CLS]", "[SEP]", "[UNK]"].iter().chain(words).enumerate() {
        vocab.entry((*w).to_owned()).or_insert(i as u32);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| CoreError::Param { name: "tokenizer".into(), message: e.to_string() })?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(Lowercase))
        .map_err(|e| CoreError::Param { name: "tokenizer".into(), message: e.to_string() })?;
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), 2), ("[CLS]".into(), 1))));
    Ok(tokenizer)
}

/// Writes `config.json`, `model.safetensors` (random encoder weights from `seed`) and
/// `tokenizer.json` for a tiny BERT over `words` into `dir`.
pub fn write_tiny_model_dir(dir: &Path, words: &[&str], seed: u64) -> Result<BertConfig> {
    std::fs::create_dir_all(dir).map_err(CoreError::io(dir))?;
    let tokenizer = tiny_tokenizer(words)?;
    let config = BertConfig::tiny(tokenizer.get_vocab_size(true));
    let pb = ParamBuilder::random(seed, DType::F32, &Device::Cpu);
    BertEncoder::new(&config, &pb, &crate::PeftSpec::None, 0)?;
    let (store, _) = pb.finish();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(CoreError::io(&p))
    };
    write("model.safetensors", &to_safetensors_bytes(&store.tensors())?)?;
    write(
        "config.json",
        serde_json::to_string_pretty(&config).map_err(|e| CoreError::file(dir, e.to_string()))?.as_bytes(),
    )?;
    let json = tokenizer.to_string(true).map_err(|e| CoreError::file(dir, e.to_string()))?;
    write("tokenizer.json", json.as_bytes())?;
    Ok(config)
}
