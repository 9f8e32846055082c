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

/// The words of [`TINY_CSV`]'s texts.
pub const TINY_WORDS: &[&str] =
    &["fever", "cough", "rash", "itch", "pain", "chest", "head", "sneeze", "red", "skin", "hot", "tired"];

/// A tiny three-class symptom task (`label,text`), learnable by a tiny model in seconds.
pub const TINY_CSV: &str = "label,text\n\
flu,fever cough hot\nflu,fever hot tired\nflu,cough sneeze fever\nflu,hot cough tired\n\
flu,fever sneeze\nflu,cough hot\nflu,tired fever cough\nflu,sneeze hot fever\n\
acne,rash itch red\nacne,red skin rash\nacne,itch skin red\nacne,rash skin\n\
acne,skin itch rash\nacne,red rash\nacne,itch red skin\nacne,rash itch skin\n\
angina,chest pain\nangina,pain chest tired\nangina,chest pain hot\nangina,pain chest\n\
angina,chest tired pain\nangina,pain in chest\nangina,chest pain pain\nangina,tired chest pain\n";

/// Writes a tiny model (`root/model`) and [`TINY_CSV`] (`root/train.csv`) and returns the text
/// of an experiment over them (validated on the training file, runs under `root/runs`), with
/// `extra` TOML appended.
pub fn write_tiny_task(root: &Path, extra: &str) -> Result<String> {
    write_tiny_model_dir(&root.join("model"), TINY_WORDS, 3)?;
    let csv = root.join("train.csv");
    std::fs::write(&csv, TINY_CSV).map_err(CoreError::io(&csv))?;
    Ok(format!(
        "[experiment]\noutput_dir = \"{out}\"\nseed = 11\n[model]\nsource = \"{model}\"\nmax_len = 16\nclassifier_dropout = 0.0\n\
         [data]\ntrain = \"{train}\"\nvalidation = \"{train}\"\n[train]\nepochs = 30\nbatch_size = 8\nlr = 3e-3\nwarmup_steps = 2\n{extra}",
        out = root.join("runs").display(),
        model = root.join("model").display(),
        train = csv.display(),
    ))
}
