//! Decoder language models of the Llama family — Llama (RMSNorm, rotary position embeddings,
//! SwiGLU, grouped-query attention, tied or untied embeddings) and Qwen2 (the same with q/k/v
//! biases) — the architectures of DeepSeek's distilled models. Built from differentiable
//! candle ops (RMSNorm and rope composed, softmax our fused op), so every weight can train;
//! with a KV cache for generation.
//!
//! Parameter names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, …);
//! `gguf.rs` maps llama.cpp's names onto them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::fused::{rms_norm, softmax_scaled};
use crate::layers::{CheckpointRecord, ForwardCtx, Linear};
use crate::{CoreError, Init, ParamBuilder, ParamStore, PeftSpec, Result};

/// The hyper-parameters of a Llama/Qwen2 decoder (a Hugging Face `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama` or `qwen2` (other Llama-like types load as Llama).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: key/value heads (default: as many as query heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 has them without saying so in its config).
    // Absent rather than null when unset, as Hugging Face's configs have them (transformers
    // refuses a null `attention_bias`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// End-of-sequence ids named by the config (`eos_token_id` may be a number or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
            _ => Vec::new(),
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let (h, nh, kv) = (self.hidden_size, self.num_attention_heads, self.kv_heads());
        if h == 0 || nh == 0 || kv == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err("sizes must be positive".into());
        }
        if !h.is_multiple_of(nh) {
            return Err(format!("hidden_size {h} is not a multiple of num_attention_heads {nh}"));
        }
        if !nh.is_multiple_of(kv) {
            return Err(format!("num_attention_heads {nh} is not a multiple of num_key_value_heads {kv}"));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head dimension {} must be even for rotary embeddings", self.head_dim()));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        Ok(())
    }

    /// A tiny config for tests.
    pub fn tiny(model_type: &str, vocab_size: usize) -> Self {
        Self {
            model_type: model_type.into(),
            vocab_size,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 512,
            tie_word_embeddings: model_type == "llama",
            attention_bias: None,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Reads a `config.json`, errors naming the file and line.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(CoreError::io(path))?;
        serde_json::from_str(&text).map_err(|e| CoreError::file(path, format!("line {}: {e}", e.line())))
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `x / sqrt(mean(x²) + eps) * weight`: the fused op with its backward (CPU f32/f64,
    /// CUDA), composed elsewhere; statistics in f32 for half-precision inputs.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// Rotary embeddings in Hugging Face's "rotate half" layout.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let d = cfg.head_dim();
        let inv: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * d / 2);
        let mut sin = Vec::with_capacity(n * d / 2);
        for p in 0..n {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (n, d / 2), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, d / 2), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// `x: [b, heads, l, d]` at positions `start..start + l`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, _, l, _) = x.dims4()?;
        if start + l > self.cos.dim(0)? {
            return Err(CoreError::Param {
                name: "max_position_embeddings".into(),
                message: format!("position {} is past the model's {} positions", start + l, self.cos.dim(0)?),
            });
        }
        let cos = self.cos.narrow(0, start, l)?;
        let sin = self.sin.narrow(0, start, l)?;
        crate::layers::fused::rope(x, &cos, &sin)
    }

    /// `x: [b, heads, l, d]` where `at` says.
    fn apply_at(&self, x: &Tensor, at: At<'_>) -> Result<Tensor> {
        match at {
            At::Start(start) => self.apply(x, start),
            At::Tables(cos, sin) => {
                // The rotation composed over the whole batch, the tables broadcast over heads.
                let d = x.dim(3)?;
                let (cos, sin) = (cos.unsqueeze(1)?.to_dtype(x.dtype())?, sin.unsqueeze(1)?.to_dtype(x.dtype())?);
                let x1 = x.narrow(3, 0, d / 2)?;
                let x2 = x.narrow(3, d / 2, d / 2)?;
                let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let b = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
                Ok(Tensor::cat(&[a, b], 3)?)
            }
        }
    }

    /// Per-row tables `[b, l, d/2]` of `positions` (`[b][l]`).
    fn tables(&self, positions: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let (b, l) = (positions.len(), positions.first().map_or(0, Vec::len));
        let max = self.cos.dim(0)?;
        if let Some(p) = positions.iter().flatten().find(|&&p| p as usize >= max) {
            return Err(CoreError::Param {
                name: "max_position_embeddings".into(),
                message: format!("position {p} is past the model's {max} positions"),
            });
        }
        let at = Tensor::from_vec(positions.concat(), b * l, self.cos.device())?;
        let half = self.cos.dim(1)?;
        Ok((
            self.cos.index_select(&at, 0)?.reshape((b, l, half))?,
            self.sin.index_select(&at, 0)?.reshape((b, l, half))?,
        ))
    }
}

/// Where a block's rows sit, for the rotary embeddings.
#[derive(Clone, Copy)]
enum At<'a> {
    /// Positions `start..` in every row.
    Start(usize),
    /// Per-row tables `[b, l, d/2]`: left-padded rows counting from their first real index,
    /// packed sequences restarting in each segment.
    Tables(&'a Tensor, &'a Tensor),
}

/// How the rows of a forward pass are laid out.
#[derive(Clone, Copy)]
enum Layout<'a> {
    /// Each row one sequence, left-padded by `pads[r]` (`&[]`: no padding).
    Padded(&'a [usize]),
    /// Each row several sequences one after another, of these lengths (the rest of the row
    /// padding): no position attends across sequences, and positions restart in each.
    Packed(&'a [Vec<usize>]),
}

struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    in_norm: RmsNorm,
    post_norm: RmsNorm,
}

/// Keys and values of the positions seen so far, per layer (`[b, kv_heads, len, head_dim]`).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.layers.iter().flatten().next().and_then(|(k, _)| k.dim(2).ok()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts `n` zero positions before every sequence (left padding, to be masked).
    pub fn pad_front(&mut self, n: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            for t in [k, v] {
                let (b, h, _, d) = t.dims4()?;
                let zeros = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
                *t = Tensor::cat(&[&zeros, &*t], 2)?;
            }
        }
        Ok(())
    }

    /// Drops the first `n` positions of every sequence (padding that no row needs).
    pub fn trim_front(&mut self, n: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            for t in [k, v] {
                let len = t.dim(2)?;
                *t = t.narrow(2, n.min(len), len - n.min(len))?;
            }
        }
        Ok(())
    }

    /// Appends the sequences of `other` (of the same length) after this cache's.
    pub fn append_rows(&mut self, other: &KvCache) -> Result<()> {
        if self.layers.is_empty() {
            self.layers = other.layers.clone();
            return Ok(());
        }
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            if let (Some((k, v)), Some((ok, ov))) = (mine.as_mut(), theirs) {
                *k = Tensor::cat(&[&*k, ok], 0)?;
                *v = Tensor::cat(&[&*v, ov], 0)?;
            }
        }
        Ok(())
    }

    /// Keeps the sequences `rows` of a batched cache, in that order (the others finished).
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect(), rows.len(), k.device())?;
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

/// A Llama/Qwen2 decoder with its language-model head.
pub struct DecoderModel {
    config: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None`: tied to the embeddings.
    lm_head: Option<Linear>,
    rope: Rope,
    params: ParamStore,
}

impl std::fmt::Debug for DecoderModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderModel").field("config", &self.config).finish_non_exhaustive()
    }
}

impl DecoderModel {
    /// Builds the model from parameters under `pb` (Hugging Face names).
    pub fn new(config: &LlamaConfig, pb: ParamBuilder) -> Result<Self> {
        Self::with_peft(config, pb, &PeftSpec::None)
    }

    /// [`DecoderModel::new`] with LoRA on the block projections `peft` targets (module names
    /// as in PEFT: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub fn with_peft(config: &LlamaConfig, pb: ParamBuilder, peft: &PeftSpec) -> Result<Self> {
        let mut model = Self::in_builder(config, &pb, peft, true)?;
        let (params, unused) = pb.finish();
        if !unused.is_empty() {
            tracing::debug!(?unused, "weights not used by the decoder");
        }
        model.params = params;
        Ok(model)
    }

    /// The decoder's parameters taken from `pb`, which the caller goes on using (a model that
    /// adds its own parameters, such as a classifier's head, and finishes the builder); the
    /// model's own [`DecoderModel::params`] stay empty. Without `lm_head` the untied output
    /// layer is not asked for.
    pub fn in_builder(config: &LlamaConfig, pb: &ParamBuilder, peft: &PeftSpec, lm_head: bool) -> Result<Self> {
        if matches!(peft, PeftSpec::Adapter { .. }) {
            return Err(CoreError::Param {
                name: "peft.method".into(),
                message: "bottleneck adapters are for encoders; decoders take LoRA".into(),
            });
        }
        config.validate().map_err(|message| CoreError::Param { name: "config.json".into(), message })?;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (d, kv) = (config.head_dim(), config.kv_heads());
        let std = 0.02;
        // An int8 matrix under the name (a quantized classifier) stands for the weight.
        let linear = |pb: &ParamBuilder, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let bias = || -> Result<Option<Tensor>> {
                if bias { Ok(Some(pb.get(&[out], "bias", Init::Zeros)?)) } else { Ok(None) }
            };
            if let Some(q) = pb.get_int8("weight", &[out, inp])? {
                return Linear::int8(q, bias()?);
            }
            let w = pb.get(&[out, inp], "weight", Init::Normal(std))?;
            Ok(Linear::new(w, bias()?))
        };
        // A block projection at `path` (e.g. `self_attn.q_proj`) of layer `l`, with LoRA when
        // the spec targets it.
        let proj = |b: &ParamBuilder, l: usize, path: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let mpb = path.split('.').fold(b.clone(), |p, part| p.pp(part));
            let lin = linear(&mpb, out, inp, bias)?;
            match peft.lora_for(l, path) {
                Some(cfg) => Ok(lin.with_lora(crate::layers::Lora::new(inp, out, cfg, &mpb)?)),
                None => Ok(lin),
            }
        };
        let norm = |pb: &ParamBuilder| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: pb.get(&[h], "weight", Init::Ones)?, eps: config.rms_norm_eps })
        };
        let m = pb.pp("model");
        let embed = m.pp("embed_tokens").get(&[config.vocab_size, h], "weight", Init::Normal(std))?;
        let bias = config.qkv_bias();
        let blocks = (0..config.num_hidden_layers)
            .map(|l| {
                let b = m.pp("layers").pp(l);
                Ok(Block {
                    q: proj(&b, l, "self_attn.q_proj", config.num_attention_heads * d, h, bias)?,
                    k: proj(&b, l, "self_attn.k_proj", kv * d, h, bias)?,
                    v: proj(&b, l, "self_attn.v_proj", kv * d, h, bias)?,
                    o: proj(&b, l, "self_attn.o_proj", h, config.num_attention_heads * d, false)?,
                    gate: proj(&b, l, "mlp.gate_proj", i, h, false)?,
                    up: proj(&b, l, "mlp.up_proj", i, h, false)?,
                    down: proj(&b, l, "mlp.down_proj", h, i, false)?,
                    in_norm: norm(&b.pp("input_layernorm"))?,
                    post_norm: norm(&b.pp("post_attention_layernorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = norm(&m.pp("norm"))?;
        let lm_head = if config.tie_word_embeddings || !lm_head {
            None
        } else {
            Some(linear(&pb.pp("lm_head"), config.vocab_size, h, false)?)
        };
        let rope = Rope::new(config, pb.dtype(), pb.device())?;
        let params = ParamStore::default();
        Ok(Self { config: config.clone(), embed, blocks, norm: final_norm, lm_head, rope, params })
    }

    /// A model with random weights (tests).
    pub fn random(config: &LlamaConfig, seed: u64, dtype: DType) -> Result<Self> {
        Self::random_on(config, seed, dtype, &Device::Cpu)
    }

    /// [`DecoderModel::random`] on `device` (the same values on every device for a seed).
    pub fn random_on(config: &LlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::new(config, ParamBuilder::random(seed, dtype, device))
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Loads weights by name (every parameter must be there), frozen.
    pub fn from_weights(config: &LlamaConfig, weights: HashMap<String, Tensor>, dtype: DType) -> Result<Self> {
        Self::from_weights_on(config, weights, dtype, &Device::Cpu)
    }

    /// [`DecoderModel::from_weights`] onto `device`.
    pub fn from_weights_on(
        config: &LlamaConfig,
        weights: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let pb = ParamBuilder::with_loaded(weights, true, 0, dtype, device);
        pb.set_trainable(|_| false);
        pb.set_strict();
        Self::new(config, pb)
    }

    /// A Hugging Face directory: `config.json` and `model.safetensors` or shards
    /// (`model-00001-of-00002.safetensors`, …).
    pub fn from_hf_dir(dir: &Path, dtype: DType) -> Result<Self> {
        let config = LlamaConfig::read(&dir.join("config.json"))?;
        Self::from_weights(&config, read_hf_weights(dir)?, dtype)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The model for CPU inference with int8 weights: the attention projections, the MLP's
    /// gate and up projections (LoRA folded in) and the output layer — the tied embedding's
    /// copy when the head is tied, the lookup table itself staying f32 — take one symmetric
    /// scale per output channel, their activations quantized per token on the fly
    /// (`tuneforge_kernels::Int8Matrix`). The MLP's down projection (LoRA folded in), the
    /// norms, biases and the embedding lookup stay f32.
    pub fn quantize_int8(mut self) -> Result<Self> {
        if !self.embed.device().is_cpu() {
            return Err(CoreError::Device {
                device: format!("{:?}", self.embed.device()),
                message: "int8 decoders run on the CPU".into(),
            });
        }
        let q = |lin: &Linear, name: String| -> Result<Linear> {
            lin.to_int8().map_err(|e| match e {
                CoreError::Param { message, .. } => CoreError::Param { name, message },
                other => other,
            })
        };
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let name = |p: &str| format!("model.layers.{l}.{p}.weight");
            b.q = q(&b.q, name("self_attn.q_proj"))?;
            b.k = q(&b.k, name("self_attn.k_proj"))?;
            b.v = q(&b.v, name("self_attn.v_proj"))?;
            b.o = q(&b.o, name("self_attn.o_proj"))?;
            b.gate = q(&b.gate, name("mlp.gate_proj"))?;
            b.up = q(&b.up, name("mlp.up_proj"))?;
            // `down_proj` stays f32: its inputs (the gated MLP's activations) carry outliers
            // that per-token int8 flattens (SmolLM2-135M: perplexity 8.51 → 10.39 with it
            // quantized alone, `cargo xtask bench generate --int8`).
            b.down = b.down.merged()?;
        }
        let head = match &self.lm_head {
            Some(head) => head.clone(),
            None => Linear::new(self.embed.to_dtype(DType::F32)?, None),
        };
        self.lm_head = Some(q(&head, "lm_head.weight".into())?);
        Ok(self)
    }

    /// The model for inference only: each projection keeps a contiguous `Wᵀ` for its
    /// products ([`Linear::keep_transposed`]; the weights never change). Batched generation
    /// multiplies a few rows at a time, where gemm would otherwise transpose every weight into
    /// its panels at every step (SmolLM2's MLP down projection for 8 rows: 1.05 → 0.22 ms).
    pub fn keep_transposed(mut self) -> Self {
        for b in &mut self.blocks {
            for l in [&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down] {
                *l = l.clone().keep_transposed();
            }
        }
        self.lm_head = self.lm_head.map(Linear::keep_transposed);
        self
    }

    /// Whether the projections run int8 ([`DecoderModel::quantize_int8`]).
    pub fn is_int8(&self) -> bool {
        self.lm_head.as_ref().is_some_and(Linear::is_int8)
    }

    /// Logits `[b, l, vocab]` for `ids: [b, l]` at positions `cache.len()..`, appending the
    /// new keys and values to `cache` when one is given.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let h = self.config.hidden_size;
        let x = self.hidden_states(ids, cache, ctx)?.reshape((b * l, h))?;
        Ok(self.head_logits(&x, ctx)?.reshape((b, l, self.config.vocab_size))?)
    }

    /// The output layer on hidden states `[rows, hidden]`: logits `[rows, vocab]` in the
    /// parameters' dtype (under mixed precision the loss and sampling see f32 logits).
    fn head_logits(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward_t(x, ctx)?,
            None => x.matmul(&ctx.cast(&self.embed)?.t()?)?,
        };
        Ok(logits.to_dtype(self.embed.dtype())?)
    }

    /// The last hidden states `[b, l, hidden]` (after the final norm, in the compute dtype),
    /// for `ids: [b, l]` at positions `cache.len()..`: what the language-model head or a
    /// classifier reads.
    pub fn hidden_states(&self, ids: &Tensor, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> Result<Tensor> {
        self.hidden_states_in(ids, cache, Layout::Padded(&[]), ctx)
    }

    /// Logits `[b, vocab]` at the last position of left-padded sequences `ids: [b, l]` at
    /// positions `cache.len()..`, appending to `cache`: the first `pads[r]` positions of row
    /// `r` (counted over the whole cache) are padding that no real position attends to, and
    /// the row counts its positions from its first real one: each row computes what it
    /// would alone. What batched generation runs.
    pub fn last_logits(&self, ids: &Tensor, cache: &mut KvCache, pads: &[usize], ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let x = self.hidden_states_in(ids, Some(cache), Layout::Padded(pads), ctx)?;
        let last = x.narrow(1, l - 1, 1)?.reshape((b, self.config.hidden_size))?;
        self.head_logits(&last, ctx)
    }

    /// [`DecoderModel::hidden_states`] of rows laid out as `layout` says.
    fn hidden_states_in(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        layout: Layout<'_>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.len());
        let h = self.config.hidden_size;
        let ids = ids.to_device(self.device())?;
        let x = ctx.cast(&crate::layers::fused::embedding(&self.embed, &ids.flatten_all()?)?.reshape((b, l, h))?)?;
        if let Some(c) = cache.as_mut()
            && c.layers.len() != self.blocks.len()
        {
            c.layers = vec![None; self.blocks.len()];
        }
        let (mask, tables) = match layout {
            Layout::Padded(pads) if pads.iter().any(|&p| p > 0) => {
                // Row `r` counts its positions from its first real index `pads[r]` (a padding
                // index takes position 0; it is never attended to), so it is embedded as it
                // would be alone. The tables serve every layer.
                let positions: Vec<Vec<u32>> = pads
                    .iter()
                    .map(|&pad| (start..start + l).map(|i| i.saturating_sub(pad) as u32).collect())
                    .collect();
                (Some(padded_causal_mask(l, start, pads, x.dtype(), x.device())?), Some(self.rope.tables(&positions)?))
            }
            Layout::Padded(_) => (causal_mask(l, start, x.dtype(), x.device())?, None),
            Layout::Packed(segments) => {
                if cache.is_some() || segments.len() != b {
                    return Err(CoreError::Param {
                        name: "segments".into(),
                        message: format!("{} rows of segments for {b} rows, without a cache", segments.len()),
                    });
                }
                let (mask, positions) = packed_layout(segments, l, x.dtype(), x.device())?;
                (Some(mask), Some(self.rope.tables(&positions)?))
            }
        };
        // In the compute dtype once, for every layer.
        let tables = match tables {
            Some((cos, sin)) => Some((ctx.cast(&cos)?, ctx.cast(&sin)?)),
            None => None,
        };
        let at = match &tables {
            Some((cos, sin)) => At::Tables(cos, sin),
            None => At::Start(start),
        };
        let x = match cache {
            None if ctx.is_checkpointing() => {
                let record_start = x.clone();
                let mut x = x.detach();
                let mut inputs = Vec::with_capacity(self.blocks.len());
                for (i, block) in self.blocks.iter().enumerate() {
                    ctx.enter_layer(i);
                    inputs.push((i, x.clone()));
                    x = self.block_forward(block, &x, at, mask.as_ref(), None, ctx)?.detach();
                }
                let top = candle_core::Var::from_tensor(&x)?;
                let out = top.as_tensor().clone();
                ctx.set_record(CheckpointRecord {
                    start: record_start,
                    inputs,
                    // The mask, and a packed batch's position tables.
                    extras: mask.into_iter().chain(tables.iter().flat_map(|(c, s)| [c.clone(), s.clone()])).collect(),
                    top,
                });
                out
            }
            mut cache => {
                let mut x = x;
                for (i, block) in self.blocks.iter().enumerate() {
                    ctx.enter_layer(i);
                    let slot = cache.as_mut().map(|c| &mut c.layers[i]);
                    x = self.block_forward(block, &x, at, mask.as_ref(), slot, ctx)?;
                }
                x
            }
        };
        self.norm.forward(&x)
    }

    /// The index of the block a parameter name belongs to (`model.layers.{i}.…`), if any.
    pub fn layer_of(name: &str) -> Option<usize> {
        let rest = name.strip_prefix("model.layers.")?;
        rest.split('.').next()?.parse().ok()
    }

    pub fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Finishes the backward pass of a checkpointed forward (see
    /// [`crate::bert::BertEncoder::checkpointed_backward`]): each block is recomputed from
    /// its saved input and differentiated, last to first; trainable gradients go to `grads`.
    pub fn checkpointed_backward(
        &self,
        ctx: &ForwardCtx,
        store: &candle_core::backprop::GradStore,
        trainable: &[(String, candle_core::Var)],
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<()> {
        ctx.checkpointed_backward(store, trainable, grads, |i, x, extras| {
            let at = match extras {
                [_, cos, sin] => At::Tables(cos, sin),
                _ => At::Start(0),
            };
            self.block_forward(&self.blocks[i], x, at, extras.first(), None, ctx)
        })
    }

    /// Mean next-token cross-entropy over the positions where `loss_mask` is 1:
    /// `ids: [b, l]`, `loss_mask: [b, l]` marks the tokens to predict (response tokens);
    /// position `t`'s logits predict token `t + 1`. Returns `(loss, n_predicted)`.
    pub fn lm_loss(&self, ids: &Tensor, loss_mask: &Tensor, ctx: &ForwardCtx) -> Result<(Tensor, usize)> {
        self.lm_loss_in(ids, loss_mask, Layout::Padded(&[]), ctx)
    }

    /// [`DecoderModel::lm_loss`] of packed rows: row `r` holds sequences of the lengths
    /// `segments[r]` one after another (then padding); no position attends across them and
    /// positions restart in each, so the loss is that of the sequences in rows of their own.
    pub fn lm_loss_packed(
        &self,
        ids: &Tensor,
        loss_mask: &Tensor,
        segments: &[Vec<usize>],
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, usize)> {
        self.lm_loss_in(ids, loss_mask, Layout::Packed(segments), ctx)
    }

    fn lm_loss_in(
        &self,
        ids: &Tensor,
        loss_mask: &Tensor,
        layout: Layout<'_>,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, usize)> {
        let (b, l) = ids.dims2()?;
        if l < 2 {
            return Err(CoreError::Param { name: "batch".into(), message: "needs at least 2 tokens".into() });
        }
        if loss_mask.dims() != ids.dims() {
            return Err(CoreError::Param {
                name: "loss_mask".into(),
                message: format!("has shape {:?}, the ids {:?}", loss_mask.dims(), ids.dims()),
            });
        }
        // Only the positions that predict a masked-in token get logits: the output layer is
        // the widest product of a small decoder, and prompts are often most of the tokens.
        let mask = loss_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let tokens = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (i, (m, t)) in mask.iter().zip(&tokens).enumerate() {
            for p in 1..l {
                if m[p] != 0.0 {
                    rows.push((i * l + p - 1) as u32);
                    targets.push(t[p]);
                }
            }
        }
        let n = rows.len();
        // With nothing to predict the loss is 0, still a function of the parameters (their
        // gradients zero), as every rank of a data-parallel step needs.
        let weight = if n == 0 {
            (rows, targets) = (vec![0], vec![tokens[0][0]]);
            0.0
        } else {
            1.0 / n as f64
        };
        let device = self.device();
        let x = self.hidden_states_in(ids, None, layout, ctx)?.reshape((b * l, self.config.hidden_size))?;
        let x = x.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
        let logits = self.head_logits(&x, ctx)?;
        let nll = crate::layers::fused::cross_entropy(&logits, &Tensor::new(targets.as_slice(), device)?)?;
        Ok(((nll.sum_all()? * weight)?, n))
    }

    fn block_forward(
        &self,
        blk: &Block,
        x: &Tensor,
        at: At<'_>,
        mask: Option<&Tensor>,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (nh, kv, d) = (self.config.num_attention_heads, self.config.kv_heads(), self.config.head_dim());
        let xn = blk.in_norm.forward(x)?;
        let heads =
            |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, l, n, d))?.transpose(1, 2)?.contiguous()?) };
        let q = self.rope.apply_at(&heads(blk.q.forward_t(&xn, ctx)?, nh)?, at)?;
        let mut k = self.rope.apply_at(&heads(blk.k.forward_t(&xn, ctx)?, kv)?, at)?;
        let mut v = heads(blk.v.forward_t(&xn, ctx)?, kv)?;
        if let Some(slot) = slot {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(&[&pk, &k], 2)?;
                v = Tensor::cat(&[&pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let total = k.dim(2)?;
        let rep = nh / kv;
        // Grouped-query attention without copying keys and values for each query head: the
        // `rep` query heads that share a key/value head are one batch of `rep · l` rows
        // against it (query head `h` reads key/value head `h / rep`, as Hugging Face's
        // `repeat_kv` arranges them).
        let scores = q.reshape((b, kv, rep * l, d))?.matmul(&k.t()?)?.reshape((b, nh, l, total))?;
        let probs = softmax_scaled(&scores, 1.0 / (d as f64).sqrt(), mask)?;
        let attn = probs.reshape((b, kv, rep * l, total))?.matmul(&v)?.reshape((b, nh, l, d))?;
        let attn = attn.transpose(1, 2)?.reshape((b, l, nh * d))?;
        let x = (x + blk.o.forward_t(&attn, ctx)?)?;
        let xn = blk.post_norm.forward(&x)?;
        let act = crate::layers::fused::swiglu(&blk.gate.forward_t(&xn, ctx)?, &blk.up.forward_t(&xn, ctx)?)?;
        let mlp = blk.down.forward_t(&act, ctx)?;
        Ok((x + mlp)?)
    }
}

/// Every tensor of every `.safetensors` file in `dir` (one file or shards).
pub fn read_hf_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(CoreError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CoreError::file(dir, "holds no .safetensors weights"));
    }
    let mut weights = HashMap::new();
    for f in files {
        weights.extend(crate::weights::load_safetensors(&f)?);
    }
    Ok(weights)
}

/// `[l, start + l]`: 0 where query `i` (at position `start + i`) may look, -inf after it;
/// `None` for a single new position (it may look at everything).
fn causal_mask(l: usize, start: usize, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
    if l <= 1 {
        return Ok(None);
    }
    let total = start + l;
    let v: Vec<f32> =
        (0..l).flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Some(Tensor::from_vec(v, (l, total), device)?.to_dtype(dtype)?))
}

/// A packed batch's mask `[b, 1, l, l]` (causal within each sequence, nothing across) and
/// positions `[b][l]` (from 0 in each sequence; the padding after the last is one more).
fn packed_layout(segments: &[Vec<usize>], l: usize, dtype: DType, device: &Device) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let mut mask = Vec::with_capacity(segments.len() * l * l);
    let mut positions = Vec::with_capacity(segments.len());
    for lens in segments {
        if lens.iter().sum::<usize>() > l {
            return Err(CoreError::Param {
                name: "segments".into(),
                message: format!("lengths {lens:?} exceed the row's {l} positions"),
            });
        }
        let (mut seg, mut pos) = (Vec::with_capacity(l), Vec::with_capacity(l));
        for (s, &n) in lens.iter().enumerate() {
            seg.extend(std::iter::repeat_n(s, n));
            pos.extend(0..n as u32);
        }
        let rest = l - seg.len();
        seg.extend(std::iter::repeat_n(lens.len(), rest));
        pos.extend(0..rest as u32);
        for q in 0..l {
            mask.extend((0..l).map(|k| if k <= q && seg[k] == seg[q] { 0f32 } else { f32::NEG_INFINITY }));
        }
        positions.push(pos);
    }
    Ok((Tensor::from_vec(mask, (segments.len(), 1, l, l), device)?.to_dtype(dtype)?, positions))
}

/// `[b, 1, l, start + l]`: [`causal_mask`] for each row, with the row's first `pads[r]`
/// positions masked as keys too; a padding position still sees itself, so that no row of
/// scores is all -inf (its output is never read).
fn padded_causal_mask(l: usize, start: usize, pads: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let total = start + l;
    let v: Vec<f32> = pads
        .iter()
        .flat_map(|&pad| {
            (0..l).flat_map(move |i| {
                (0..total).map(move |j| {
                    let q = start + i;
                    if j <= q && (j >= pad || j == q) { 0.0 } else { f32::NEG_INFINITY }
                })
            })
        })
        .collect();
    Ok(Tensor::from_vec(v, (pads.len(), 1, l, total), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(v, &Device::Cpu)?.unsqueeze(0)?)
    }

    /// Logits of the KV-cached path (prompt, then one token at a time) equal one uncached
    /// forward over the whole sequence, for Llama (tied, GQA) and Qwen2 (biases, untied).
    #[test]
    fn cached_generation_equals_the_uncached_forward() -> Result<()> {
        for kind in ["llama", "qwen2"] {
            let cfg = LlamaConfig::tiny(kind, 40);
            let model = DecoderModel::random(&cfg, 3, DType::F64)?;
            if kind == "qwen2" {
                assert!(model.params().get("model.layers.0.self_attn.q_proj.bias").is_some());
                assert!(model.params().get("lm_head.weight").is_some());
            }
            let seq = [1u32, 7, 3, 22, 9, 14, 30];
            let ctx = ForwardCtx::eval();
            let full = model.forward(&ids(&seq)?, None, &ctx)?.squeeze(0)?.to_vec2::<f64>()?;
            let mut cache = KvCache::new();
            let mut got = model.forward(&ids(&seq[..4])?, Some(&mut cache), &ctx)?.squeeze(0)?.to_vec2::<f64>()?;
            for &t in &seq[4..] {
                let step = model.forward(&ids(&[t])?, Some(&mut cache), &ctx)?.squeeze(0)?.to_vec2::<f64>()?;
                got.extend(step);
            }
            assert_eq!(cache.len(), seq.len());
            for (a, b) in full.iter().flatten().zip(got.iter().flatten()) {
                assert!((a - b).abs() < 1e-10, "{kind}: cached {b} vs uncached {a}");
            }
        }
        Ok(())
    }

    /// A later token cannot change an earlier position's logits (the mask is causal).
    #[test]
    fn attention_is_causal() -> Result<()> {
        let model = DecoderModel::random(&LlamaConfig::tiny("llama", 40), 5, DType::F64)?;
        let ctx = ForwardCtx::eval();
        let a = model.forward(&ids(&[1, 2, 3, 4])?, None, &ctx)?.squeeze(0)?.to_vec2::<f64>()?;
        let b = model.forward(&ids(&[1, 2, 3, 39])?, None, &ctx)?.squeeze(0)?.to_vec2::<f64>()?;
        assert_eq!(a[..3], b[..3]);
        assert_ne!(a[3], b[3]);
        Ok(())
    }

    /// Sequences packed into one row (then padding) give the loss and the gradients they give
    /// in rows of their own — with gradient checkpointing too (the recomputed blocks read the
    /// packed positions) — for Llama and Qwen2.
    #[test]
    fn packed_sequences_learn_as_separate_rows() -> Result<()> {
        use std::collections::HashMap;
        for kind in ["llama", "qwen2"] {
            let cfg = LlamaConfig::tiny(kind, 40);
            let model = DecoderModel::random(&cfg, 4, DType::F64)?;
            let seqs: [&[u32]; 3] = [&[1, 5, 9, 2, 7], &[3, 3, 8], &[4, 11, 6, 9, 20, 13, 2]];
            // Loss on every token after each sequence's first (its first is never predicted).
            let masks: Vec<Vec<f64>> = seqs.iter().map(|s| (0..s.len()).map(|i| f64::from(i > 0)).collect()).collect();
            let grads_of = |loss: Tensor| -> Result<HashMap<String, Tensor>> {
                let store = loss.backward()?;
                let mut grads = HashMap::new();
                crate::train::accumulate_grads(&store, &model.params().trainable(), &mut grads)?;
                Ok(grads)
            };
            // Separate rows, right-padded.
            let l = 7;
            let (mut ids_v, mut mask_v) = (Vec::new(), Vec::new());
            for (s, m) in seqs.iter().zip(&masks) {
                ids_v.extend(s.iter().copied().chain(std::iter::repeat_n(0, l - s.len())));
                mask_v.extend(m.iter().copied().chain(std::iter::repeat_n(0.0, l - s.len())));
            }
            let ids_sep = Tensor::from_vec(ids_v, (3, l), &Device::Cpu)?;
            let mask_sep = Tensor::from_vec(mask_v, (3, l), &Device::Cpu)?;
            let (loss_sep, n_sep) = model.lm_loss(&ids_sep, &mask_sep, &ForwardCtx::eval_differentiable())?;
            let grads_sep = grads_of(loss_sep.clone())?;
            // One packed row of 15 + 2 padding, and a second row with one sequence.
            let row: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).chain([0, 0]).collect();
            let row_mask: Vec<f64> = masks.iter().flatten().copied().chain([0.0, 0.0]).collect();
            let ids_packed = Tensor::from_vec(row, (1, 17), &Device::Cpu)?;
            let mask_packed = Tensor::from_vec(row_mask, (1, 17), &Device::Cpu)?;
            let segments = vec![vec![5, 3, 7]];
            for checkpointing in [false, true] {
                let ctx = ForwardCtx::train(1).with_checkpointing(checkpointing);
                let (loss, n) = model.lm_loss_packed(&ids_packed, &mask_packed, &segments, &ctx)?;
                assert_eq!(n, n_sep);
                let diff = (loss.to_scalar::<f64>()? - loss_sep.to_scalar::<f64>()?).abs();
                assert!(diff < 1e-10, "{kind} checkpointing {checkpointing}: loss differs by {diff}");
                let store = loss.backward()?;
                let mut grads = HashMap::new();
                let trainable = model.params().trainable();
                crate::train::accumulate_grads(&store, &trainable, &mut grads)?;
                model.checkpointed_backward(&ctx, &store, &trainable, &mut grads)?;
                for (name, g) in &grads_sep {
                    let d = (g - &grads[name])?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(d < 1e-10, "{kind} checkpointing {checkpointing}: {name} differs by {d}");
                }
            }
            // Unpacked, the same row attends across its sequences: another loss.
            let (crossed, _) = model.lm_loss(&ids_packed, &mask_packed, &ForwardCtx::eval_differentiable())?;
            assert!((crossed.to_scalar::<f64>()? - loss_sep.to_scalar::<f64>()?).abs() > 1e-6);
            let bad = model.lm_loss_packed(&ids_packed, &mask_packed, &[vec![10, 10]], &ForwardCtx::eval());
            assert!(bad.is_err_and(|e| e.to_string().contains("segments")));
        }
        Ok(())
    }

    #[test]
    fn every_weight_gets_a_gradient() -> Result<()> {
        let cfg = LlamaConfig::tiny("qwen2", 40);
        let model = DecoderModel::random(&cfg, 2, DType::F64)?;
        let logits = model.forward(&ids(&[1, 5, 9, 2])?, None, &ForwardCtx::eval_differentiable())?;
        let grads = logits.sqr()?.sum_all()?.backward()?;
        for (name, var) in model.params().trainable() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            assert!(g.abs()?.sum_all()?.to_scalar::<f64>()? > 0.0, "{name}: zero gradient");
        }
        Ok(())
    }
}
