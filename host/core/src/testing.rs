//! Tiny random models and tokenizers for tests, examples and benchmarks of the machinery
//! (never for real training): a word-level tokenizer over a given vocabulary, a model
//! directory in Hugging Face layout with random BERT weights, and a tiny random decoder as
//! GGUF and safetensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::bert::BertProcessing;

use crate::bert::{BertConfig, BertEncoder};
use crate::gguf::{gguf_name, permute_for_gguf};
use crate::llama::{DecoderModel, LlamaConfig};
use crate::weights::to_safetensors_bytes;
use crate::{CoreError, ParamBuilder, Result};
use candle_core::Tensor;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

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

/// A byte-level BPE vocabulary: the 256 byte symbols, a few merges, and ChatML's specials.
fn tiny_bpe_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    // GPT-2's byte-to-unicode table, as the byte-level pre-tokenizer produces.
    let mut bytes: Vec<u32> = (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF).map(u32::from).collect();
    let mut chars: Vec<u32> = bytes.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, char)> =
        bytes.iter().zip(&chars).filter_map(|(b, c)| char::from_u32(*c).map(|c| (*b, c))).collect();
    pairs.sort();
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![3, 3, 3];
    for (_, c) in &pairs {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ c", "Ġc a"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, merges.iter().map(|s| s.to_string()).collect(), types)
}

/// Writes a tiny random decoder (`kind`: `llama` or `qwen2`) twice: `dir/model.gguf` (the
/// way llama.cpp's converter writes one, Q/K rows permuted for Llama, with a byte-level BPE
/// tokenizer in its metadata) and `dir/hf/{config.json, model.safetensors}`.
pub fn write_tiny_decoder(dir: &Path, kind: &str) -> Result<LlamaConfig> {
    let (tokens, merges, types) = tiny_bpe_vocab();
    let mut cfg = LlamaConfig::tiny(kind, tokens.len());
    cfg.eos_token_id = Some(serde_json::json!(2));
    let model = DecoderModel::random(&cfg, 9, DType::F32)?;
    // Embeddings (and an untied head) at unit scale, so that logits can move far from
    // uniform when only the blocks train (LoRA), as in a pretrained model.
    let tensors: HashMap<String, Tensor> = model
        .params()
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let big = n == "model.embed_tokens.weight" || n == "lm_head.weight";
            Ok((n, if big { (t * 25.0)? } else { t }))
        })
        .collect::<Result<_>>()?;
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).map_err(CoreError::io(&hf))?;
    candle_core::safetensors::save(&tensors, hf.join("model.safetensors"))?;
    let json = serde_json::to_string(&cfg).map_err(|e| CoreError::file(&hf, e.to_string()))?;
    std::fs::write(hf.join("config.json"), json).map_err(CoreError::io(&hf))?;

    let mut q: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &tensors {
        let mut t = t.clone();
        if kind == "llama" && name.ends_with("q_proj.weight") {
            t = permute_for_gguf(&t, cfg.num_attention_heads)?;
        } else if kind == "llama" && name.ends_with("k_proj.weight") {
            t = permute_for_gguf(&t, cfg.kv_heads())?;
        }
        let gname =
            gguf_name(name).ok_or_else(|| CoreError::Param { name: name.clone(), message: "no GGUF name".into() })?;
        q.push((gname, QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(kind.into())),
        (format!("{kind}.block_count"), Value::U32(cfg.num_hidden_layers as u32)),
        (format!("{kind}.embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (format!("{kind}.feed_forward_length"), Value::U32(cfg.intermediate_size as u32)),
        (format!("{kind}.attention.head_count"), Value::U32(cfg.num_attention_heads as u32)),
        (format!("{kind}.attention.head_count_kv"), Value::U32(cfg.kv_heads() as u32)),
        (format!("{kind}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (format!("{kind}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (format!("{kind}.context_length"), Value::U32(cfg.max_position_embeddings as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    let path = dir.join("model.gguf");
    let mut f = std::fs::File::create(&path).map_err(CoreError::io(&path))?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &q_refs)?;
    drop(f);
    // The Hugging Face copy gets the same tokenizer as a tokenizer.json.
    let tok = crate::gguf::GgufFile::open(&path)?.tokenizer()?;
    let json = tok.to_string(true).map_err(|e| CoreError::file(&hf, e.to_string()))?;
    std::fs::write(hf.join("tokenizer.json"), json).map_err(CoreError::io(&hf))?;
    Ok(cfg)
}

/// A tiny random classifier over [`TINY_WORDS`] on `device` (three labels, mean pooling,
/// dropout `dropout` everywhere, everything trainable): the same values on every device for
/// a seed, so CPU and GPU results can be compared.
pub fn tiny_classifier(device: &Device, dropout: f64, seed: u64) -> Result<crate::ClassifierModel> {
    let text = tuneforge_data::TextEncoder::new(tiny_tokenizer(TINY_WORDS)?, 16)?;
    let mut config = BertConfig::tiny(text.vocab_size());
    config.hidden_dropout_prob = dropout;
    config.attention_probs_dropout_prob = dropout;
    crate::ClassifierModel::random(
        config,
        text,
        &crate::ClassifierOptions {
            labels: vec!["flu".into(), "acne".into(), "angina".into()],
            pooling: crate::Pooling::Mean,
            max_len: 16,
            classifier_dropout: dropout,
            seed,
            trainability: crate::Trainability::default(),
            base_model: "tiny".into(),
            dtype: DType::F32,
            device: device.clone(),
            peft: crate::PeftSpec::None,
            extra_tokens: Vec::new(),
            fusion: None,
        },
    )
}

/// A labelled batch of four rows of different lengths (padding included) for
/// [`tiny_classifier`].
pub fn tiny_batch(model: &crate::ClassifierModel) -> Result<tuneforge_data::EncodedBatch> {
    let texts = ["fever cough hot", "rash itch red skin", "chest pain", "head pain tired sneeze fever"];
    let encoded = model.text_encoder().encode(&texts)?;
    Ok(tuneforge_data::EncodedBatch::collate(&encoded, &[0, 1, 2, 3], Some(&[0, 1, 2, 0]), 0))
}

/// The loss and the gradient of every trainable tensor (as f32 values, by name) of one
/// forward and backward pass in `ctx` (with gradient checkpointing when `ctx` asks for it).
pub fn classifier_gradients(
    model: &crate::ClassifierModel,
    batch: &tuneforge_data::EncodedBatch,
    ctx: &crate::ForwardCtx,
) -> Result<(f32, HashMap<String, Vec<f32>>)> {
    let trainable = model.params().trainable();
    let (loss, _) = model.loss(batch, ctx)?;
    let store = loss.backward()?;
    let mut grads = HashMap::new();
    crate::train::accumulate_grads(&store, &trainable, &mut grads)?;
    model.checkpointed_backward(ctx, &store, &trainable, &mut grads)?;
    loss_and_values(&loss, grads)
}

fn loss_and_values(loss: &Tensor, grads: HashMap<String, Tensor>) -> Result<(f32, HashMap<String, Vec<f32>>)> {
    let values = grads
        .into_iter()
        .map(|(k, g)| Ok((k, g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok((loss.to_dtype(DType::F32)?.to_scalar::<f32>()?, values))
}

/// Like [`classifier_gradients`] for a decoder's language-model loss over `ids` (every
/// position after the first predicted).
pub fn decoder_gradients(
    model: &DecoderModel,
    ids: &Tensor,
    ctx: &crate::ForwardCtx,
) -> Result<(f32, HashMap<String, Vec<f32>>)> {
    let trainable = model.params().trainable();
    let mask = ids.ones_like()?;
    let (loss, _) = model.lm_loss(ids, &mask, ctx)?;
    let store = loss.backward()?;
    let mut grads = HashMap::new();
    crate::train::accumulate_grads(&store, &trainable, &mut grads)?;
    model.checkpointed_backward(ctx, &store, &trainable, &mut grads)?;
    loss_and_values(&loss, grads)
}

/// The largest difference between two gradient sets relative to the largest gradient
/// value (0 when they agree exactly); an error names a tensor present in only one.
pub fn max_relative_difference(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> Result<f32> {
    let mut worst = 0f32;
    for (name, x) in a {
        let y =
            b.get(name).ok_or_else(|| CoreError::Param { name: name.clone(), message: "gradient missing".into() })?;
        let scale = x.iter().chain(y).fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(diff / scale);
    }
    if a.len() != b.len() {
        return Err(CoreError::Param {
            name: "gradients".into(),
            message: format!("{} vs {} tensors", a.len(), b.len()),
        });
    }
    Ok(worst)
}
