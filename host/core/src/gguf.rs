//! GGUF files (llama.cpp): a decoder's hyper-parameters from the metadata, its weights
//! dequantised to the training dtype under Hugging Face names (with llama.cpp's permuted
//! Q/K rows put back for Llama), its tokenizer rebuilt from the BPE vocabulary and merges
//! through the `tokenizers` crate, and its chat template.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::llama::{DecoderModel, LlamaConfig};
use crate::{CoreError, Result};

/// An opened GGUF file: its metadata and tensor index.
pub struct GgufFile {
    path: std::path::PathBuf,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).finish_non_exhaustive()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(CoreError::io(path))?;
        let content = Content::read(&mut f).map_err(|e| CoreError::file(path, format!("not a GGUF file: {e}")))?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    fn err(&self, m: impl std::fmt::Display) -> CoreError {
        CoreError::file(&self.path, m.to_string())
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| self.err(format!("metadata `{key}` is missing")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u64()
            .map(|v| v as usize)
            .or_else(|_| v.to_u32().map(|v| v as usize))
            .or_else(|_| v.to_i32().map(|v| v.max(0) as usize))
            .map_err(|e| self.err(format!("metadata `{key}`: {e}")))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?.to_f32().map(f64::from).map_err(|e| self.err(format!("metadata `{key}`: {e}")))
    }

    fn string(&self, key: &str) -> Result<String> {
        self.get(key)?.to_string().cloned().map_err(|e| self.err(format!("metadata `{key}`: {e}")))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = self.get(key)?.to_vec().map_err(|e| self.err(format!("metadata `{key}`: {e}")))?;
        arr.iter().map(|v| v.to_string().cloned().map_err(|e| self.err(format!("metadata `{key}`: {e}")))).collect()
    }

    /// `general.architecture`: `llama` or `qwen2`.
    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")
    }

    /// The decoder's hyper-parameters from `<arch>.*` metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if arch != "llama" && arch != "qwen2" {
            return Err(self.err(format!("architecture `{arch}` is not supported (llama, qwen2)")));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let heads = self.usize(&k("attention.head_count"))?;
        let vocab = match self.usize(&k("vocab_size")) {
            Ok(v) => v,
            Err(_) => self.strings("tokenizer.ggml.tokens")?.len(),
        };
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let eos = self.usize("tokenizer.ggml.eos_token_id").ok().map(|v| serde_json::json!(v));
        Ok(LlamaConfig {
            model_type: arch.clone(),
            vocab_size: vocab,
            hidden_size: self.usize(&k("embedding_length"))?,
            intermediate_size: self.usize(&k("feed_forward_length"))?,
            num_hidden_layers: self.usize(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: Some(self.usize(&k("attention.head_count_kv")).unwrap_or(heads)),
            rms_norm_eps: self.f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            rope_theta: self.f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: self.usize(&k("context_length")).unwrap_or(4096),
            tie_word_embeddings: tied,
            attention_bias: Some(self.content.tensor_infos.contains_key("blk.0.attn_q.bias")),
            bos_token_id: self.usize("tokenizer.ggml.bos_token_id").ok().map(|v| v as u32),
            eos_token_id: eos,
        })
    }

    /// Every tensor dequantised to `dtype`, under Hugging Face names.
    pub fn weights(&self, config: &LlamaConfig, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut file = std::fs::File::open(&self.path).map_err(CoreError::io(&self.path))?;
        let permuted = config.model_type == "llama";
        let mut out = HashMap::new();
        for name in self.content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else {
                tracing::debug!(tensor = %name, "GGUF tensor not used");
                continue;
            };
            let q = self
                .content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
            let mut t = q.dequantize(&Device::Cpu).map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
            if permuted && name.ends_with("attn_q.weight") {
                t = unpermute(&t, config.num_attention_heads)?;
            } else if permuted && name.ends_with("attn_k.weight") {
                t = unpermute(&t, config.kv_heads())?;
            }
            out.insert(hf, t.to_dtype(dtype)?);
        }
        Ok(out)
    }

    /// The model, dequantised to `dtype`.
    pub fn model(&self, dtype: DType) -> Result<DecoderModel> {
        let config = self.config()?;
        DecoderModel::from_weights(&config, self.weights(&config, dtype)?, dtype)
    }

    /// The tokenizer from `tokenizer.ggml.*`: byte-level BPE (`gpt2` model) with the
    /// pre-tokenizer its `pre` names (smollm, llama3, qwen2, gpt2), control tokens as
    /// special tokens.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(self.err(format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)")));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = self
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| self.err(format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe =
            BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| self.err(format!("tokenizer: {e}")))?;
        let mut tok = Tokenizer::new(bpe);
        let pre = self.string("tokenizer.ggml.pre").unwrap_or_else(|_| "gpt2".into());
        tok.with_pre_tokenizer(Some(pre_tokenizer(&pre).map_err(|e| self.err(e))?));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        if let Ok(Value::Array(types)) = self.get("tokenizer.ggml.token_type") {
            let specials: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| matches!(t.to_i32(), Ok(3 | 4)) || matches!(t.to_u32(), Ok(3 | 4)))
                .filter_map(|(i, _)| tokens.get(i).map(|t| AddedToken::from(t.clone(), true)))
                .collect();
            tok.add_special_tokens(specials).map_err(|e| self.err(format!("tokenizer: {e}")))?;
        }
        Ok(tok)
    }

    /// `tokenizer.chat_template`, if the file has one.
    pub fn chat_template(&self) -> Option<String> {
        self.string("tokenizer.chat_template").ok()
    }
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` stands for.
fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |re: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let s = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| format!("pre-tokenizer: {e}"))?;
        Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    match pre {
        // Hugging Face's SmolLM tokenizer: digits one by one, then GPT-2's byte-level split.
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()),
        "llama3" | "llama-bpe" | "smaug-bpe" => split(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2),
        "gpt2" | "default" => split(GPT2),
        other => Err(format!("pre-tokenizer `{other}` is not supported (smollm, llama3, qwen2, gpt2)")),
    }
}

/// Whole-model tensors: llama.cpp's name and Hugging Face's.
const MODEL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-block tensors: llama.cpp's `blk.{i}.<a>` is Hugging Face's `model.layers.{i}.<b>`.
const BLOCK_NAMES: [(&str, &str); 12] = [
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

/// Maps a tensor name between the conventions: `forward` = llama.cpp to Hugging Face.
fn map_name(name: &str, forward: bool) -> Option<String> {
    let pick = |(g, h): &(&'static str, &'static str)| if forward { (*g, *h) } else { (*h, *g) };
    if let Some((_, to)) = MODEL_NAMES.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_owned());
    }
    let (prefix, to_prefix) = if forward { ("blk.", "model.layers.") } else { ("model.layers.", "blk.") };
    let (layer, part) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, to) = BLOCK_NAMES.iter().map(pick).find(|(from, _)| *from == part)?;
    Some(format!("{to_prefix}{layer}.{to}"))
}

/// llama.cpp tensor names to Hugging Face ones.
fn hf_name(name: &str) -> Option<String> {
    map_name(name, true)
}

/// llama.cpp's converter permutes Q/K rows per head (`[heads, 2, d/2] -> [heads, d/2, 2]`)
/// to suit its interleaved rope; this puts Hugging Face's order back.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || !out.is_multiple_of(2 * heads) {
        return Err(CoreError::Param {
            name: "attn_q/attn_k".into(),
            message: format!("{out} rows do not split into {heads} heads"),
        });
    }
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The inverse of `unpermute` (what llama.cpp's converter does), for writing test files.
pub fn permute_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, 2, half, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The Hugging Face name's llama.cpp name (for writing test files).
pub fn gguf_name(hf: &str) -> Option<String> {
    map_name(hf, false)
}
