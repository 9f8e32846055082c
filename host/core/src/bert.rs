//! A BERT-family encoder (BERT, MiniLM, …) built from differentiable candle ops.
//!
//! Shapes: `ids`, `type_ids`: `[batch, seq]` u32; `mask`: `[batch, seq]` (1 = token, 0 = pad);
//! output: `[batch, seq, hidden]`. Parameter names follow Hugging Face's `BertModel`
//! (`embeddings.word_embeddings.weight`, `encoder.layer.{i}.attention.self.query.weight`, …),
//! so the same code loads published weights and trains from a seeded random start.

use std::sync::Arc;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use tuneforge_kernels::Int8Matrix;

use crate::layers::attention::{Packing, packed_attention, supports_head_width};
use crate::layers::fused::softmax_scaled;
use crate::layers::{Adapter, CheckpointRecord, ForwardCtx, LayerNorm, Linear, Lora, layer_norm, linear};
use crate::peft::{AdapterPlacement, PeftSpec};
use crate::{CoreError, Init, ParamBuilder, Result};

/// The activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// GELU with the exact erf form (BERT's `gelu`).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU with the tanh approximation.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

fn default_dropout() -> f64 {
    0.1
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> Activation {
    Activation::Gelu
}

/// `config.json` of a BERT-family model; fields tuneforge does not use are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BertConfig {
    /// Checks the numbers that the layers rely on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return Err("num_hidden_layers, vocab_size and intermediate_size must be positive".into());
        }
        Ok(())
    }

    /// A tiny configuration for tests.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            hidden_act: Activation::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            extra: serde_json::Map::new(),
        }
    }
}

impl BertConfig {
    /// Reads a `config.json`, errors naming the file and line.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(CoreError::io(path))?;
        serde_json::from_str(&text).map_err(|e| CoreError::file(path, format!("line {}: {e}", e.line())))
    }
}

const INIT_STD: f64 = 0.02;

/// The word-embedding table: f32, or int8 rows with a scale each (a quantized model).
enum WordTable {
    Float(Tensor),
    Int8(Arc<Int8Matrix>),
}

impl WordTable {
    fn n_rows(&self) -> candle_core::Result<usize> {
        match self {
            Self::Float(t) => t.dim(0),
            Self::Int8(m) => Ok(m.rows()),
        }
    }

    fn width(&self) -> candle_core::Result<usize> {
        match self {
            Self::Float(t) => t.dim(1),
            Self::Int8(m) => Ok(m.cols()),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Self::Float(t) => t.dtype(),
            Self::Int8(_) => DType::F32,
        }
    }

    /// Rows `[n, hidden]` for flat ids (dequantized for int8).
    fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(t) => t.embedding_rows(ids),
            Self::Int8(m) => {
                let ids = ids.to_vec1::<u32>()?;
                let h = m.cols();
                let mut out = vec![0f32; ids.len() * h];
                for (i, id) in ids.iter().enumerate() {
                    let r = *id as usize;
                    if r >= m.rows() {
                        candle_core::bail!("token id {r} is outside the {}-row embedding table", m.rows());
                    }
                    m.dequantize_row(r, &mut out[i * h..(i + 1) * h]);
                }
                Tensor::from_vec(out, (ids.len(), h), &candle_core::Device::Cpu)
            }
        }
    }
}

struct Embeddings {
    word: WordTable,
    /// Rows of tokens added by vocabulary extension (ids from `word.dim(0)` on), kept apart
    /// so that they can train while the original rows stay frozen.
    word_extra: Option<Tensor>,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn new(cfg: &BertConfig, pb: &ParamBuilder, n_extra_tokens: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let word_pb = pb.pp("word_embeddings");
        Ok(Self {
            word: match word_pb.get_int8("weight", &[cfg.vocab_size, h])? {
                Some(m) => WordTable::Int8(m),
                None => WordTable::Float(word_pb.get(&[cfg.vocab_size, h], "weight", Init::Normal(INIT_STD))?),
            },
            word_extra: match n_extra_tokens {
                0 => None,
                n => Some(word_pb.get_new(&[n, h], "extra", Init::Normal(INIT_STD))?),
            },
            position: pb.pp("position_embeddings").get(
                &[cfg.max_position_embeddings, h],
                "weight",
                Init::Normal(INIT_STD),
            )?,
            token_type: pb.pp("token_type_embeddings").get(
                &[cfg.type_vocab_size, h],
                "weight",
                Init::Normal(INIT_STD),
            )?,
            norm: layer_norm(h, cfg.layer_norm_eps, &pb.pp("LayerNorm"))?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, ids: &Tensor, type_ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let max_pos = self.position.dim(0)?;
        if l > max_pos {
            return Err(CoreError::Param {
                name: "embeddings.position_embeddings.weight".into(),
                message: format!("sequence of {l} tokens is longer than the model's {max_pos} positions"),
            });
        }
        let h = self.word.width()?;
        let words = self.word_rows(&ids.flatten_all()?)?.reshape((b, l, h))?;
        let types = self.token_type.embedding_rows(&type_ids.flatten_all()?)?.reshape((b, l, h))?;
        let positions = self.position.narrow(0, 0, l)?.unsqueeze(0)?;
        let x = words.add(&types)?.broadcast_add(&positions)?;
        let x = self.norm.forward(&x, ctx)?;
        ctx.dropout(&x, self.dropout)
    }
}

impl Embeddings {
    /// Word vectors `[n, hidden]` for flat ids, from the original or the added rows.
    fn word_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let Some(extra) = &self.word_extra else { return Ok(self.word.rows(ids)?) };
        let v = self.word.n_rows()? as u32;
        let ids = ids.to_vec1::<u32>()?;
        let n = ids.len();
        let base: Vec<u32> = ids.iter().map(|&i| if i < v { i } else { 0 }).collect();
        let added: Vec<u32> = ids.iter().map(|&i| i.saturating_sub(v)).collect();
        let is_added: Vec<f32> = ids.iter().map(|&i| if i >= v { 1.0 } else { 0.0 }).collect();
        let device = extra.device();
        let m = Tensor::from_vec(is_added, (n, 1), device)?.to_dtype(self.word.dtype())?;
        let from_base = self.word.rows(&Tensor::from_vec(base, n, device)?)?;
        let from_added = extra.embedding_rows(&Tensor::from_vec(added, n, device)?)?;
        Ok((from_base.broadcast_mul(&(1.0 - &m)?)? + from_added.broadcast_mul(&m)?)?)
    }
}

/// Rows of an embedding table ([`crate::layers::fused::embedding`]: `index_select`, with a
/// fast backward on CUDA), as an extension so embedding lookups read clearly.
trait EmbeddingRows {
    fn embedding_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor>;
}

impl EmbeddingRows for Tensor {
    fn embedding_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        crate::layers::fused::embedding(self, ids)
    }
}

struct Layer {
    attn_adapter: Option<Adapter>,
    ffn_adapter: Option<Adapter>,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    n_heads: usize,
    act: Activation,
    hidden_dropout: f64,
    attn_dropout: f64,
}

impl Layer {
    fn new(cfg: &BertConfig, pb: &ParamBuilder, peft: &PeftSpec, index: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        // A linear module at `path` inside the layer, with LoRA when the spec targets it.
        let module = |path: &str, in_dim: usize, out_dim: usize| -> Result<Linear> {
            let mpb = path.split('.').fold(pb.clone(), |b, part| b.pp(part));
            let l = linear(in_dim, out_dim, INIT_STD, &mpb)?.keep_transposed();
            match peft.lora_for(index, path) {
                Some(cfg) => Ok(l.with_lora(Lora::new(in_dim, out_dim, cfg, &mpb)?)),
                None => Ok(l),
            }
        };
        let adapter = |place: AdapterPlacement, at: ParamBuilder| -> Result<Option<Adapter>> {
            peft.adapter_for(index, place).map(|rf| Adapter::new(h, rf, &at.pp("adapter"))).transpose()
        };
        Ok(Self {
            attn_adapter: adapter(AdapterPlacement::Attention, pb.pp("attention").pp("output"))?,
            ffn_adapter: adapter(AdapterPlacement::Ffn, pb.pp("output"))?,
            query: module("attention.self.query", h, h)?,
            key: module("attention.self.key", h, h)?,
            value: module("attention.self.value", h, h)?,
            attn_out: module("attention.output.dense", h, h)?,
            attn_norm: layer_norm(h, cfg.layer_norm_eps, &pb.pp("attention").pp("output").pp("LayerNorm"))?,
            intermediate: module("intermediate.dense", h, cfg.intermediate_size)?,
            output: module("output.dense", cfg.intermediate_size, h)?,
            out_norm: layer_norm(h, cfg.layer_norm_eps, &pb.pp("output").pp("LayerNorm"))?,
            n_heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
            hidden_dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// `x`: `[b, l, h]` with a padded mask, or the packed `[tokens, h]`.
    fn forward(&self, x: &Tensor, mask: &LayerMask, ctx: &ForwardCtx) -> Result<Tensor> {
        let q = self.query.forward_t(x, ctx)?;
        let k = self.key.forward_t(x, ctx)?;
        let v = self.value.forward_t(x, ctx)?;
        let context = match mask {
            LayerMask::Packed(packing) => {
                packed_attention(&q, &k, &v, packing, self.n_heads, ctx.dropout_seed(self.attn_dropout))?
            }
            LayerMask::Padded(mask_bias) => {
                let (b, l, h) = x.dims3()?;
                let d = h / self.n_heads;
                let heads = |t: Tensor| -> candle_core::Result<Tensor> {
                    t.reshape((b, l, self.n_heads, d))?.transpose(1, 2)?.contiguous()
                };
                let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
                let scores = q.matmul(&k.t()?)?;
                let probs = softmax_scaled(&scores, 1.0 / (d as f64).sqrt(), Some(mask_bias))?;
                let probs = ctx.dropout(&probs, self.attn_dropout)?;
                probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?
            }
        };
        let mut attn = ctx.dropout(&self.attn_out.forward_t(&context, ctx)?, self.hidden_dropout)?;
        if let Some(a) = &self.attn_adapter {
            attn = a.forward(&attn, ctx)?;
        }
        let x = self.attn_norm.forward(&attn.add(x)?, ctx)?;
        let inter = self.intermediate.forward_t(&x, ctx)?;
        let inter = match self.act {
            Activation::Gelu => crate::layers::fused::gelu_erf(&inter)?,
            Activation::GeluTanh => inter.gelu()?,
            Activation::Relu => inter.relu()?,
        };
        let mut out = ctx.dropout(&self.output.forward_t(&inter, ctx)?, self.hidden_dropout)?;
        if let Some(a) = &self.ffn_adapter {
            out = a.forward(&out, ctx)?;
        }
        self.out_norm.forward(&out.add(&x)?, ctx)
    }
}

/// How a layer's attention sees the batch: padded, with `[b, 1, 1, l]` mask biases (0 for
/// tokens, a large negative for pads), or packed (CPU: only real tokens, see
/// `layers/attention.rs`).
enum LayerMask {
    Padded(Tensor),
    Packed(Packing),
}

impl LayerMask {
    /// The tensors a checkpointed pass keeps, and back.
    fn to_extras(&self) -> Result<Vec<Tensor>> {
        match self {
            Self::Padded(bias) => Ok(vec![bias.clone()]),
            Self::Packed(p) => Ok(p.to_tensors()?.to_vec()),
        }
    }

    fn from_extras(extras: &[Tensor]) -> Result<Self> {
        match extras {
            [bias] => Ok(Self::Padded(bias.clone())),
            parts => Ok(Self::Packed(Packing::from_tensors(parts)?)),
        }
    }
}

/// The encoder: embeddings and `num_hidden_layers` transformer layers.
pub struct BertEncoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    config: BertConfig,
}

impl std::fmt::Debug for BertEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEncoder").field("config", &self.config).finish()
    }
}

impl BertEncoder {
    /// Builds the encoder from parameters under `pb` (`embeddings.*`, `encoder.layer.*`),
    /// with the adapters or LoRA updates that `peft` asks for.
    /// `n_extra_tokens` rows follow the vocabulary for tokens added by vocabulary extension.
    pub fn new(config: &BertConfig, pb: &ParamBuilder, peft: &PeftSpec, n_extra_tokens: usize) -> Result<Self> {
        config.validate().map_err(|message| CoreError::Param { name: "config.json".into(), message })?;
        let embeddings = Embeddings::new(config, &pb.pp("embeddings"), n_extra_tokens)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(config, &pb.pp("encoder").pp("layer").pp(i), peft, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers, config: config.clone() })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.forward_layers(ids, type_ids, mask, self.layers.len(), ctx)
    }

    /// The hidden states after the embeddings and the first `n_layers` layers.
    pub fn forward_layers(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        n_layers: usize,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let x = self.embeddings.forward(ids, type_ids, ctx)?;
        self.forward_from(x, mask, 0..n_layers.min(self.layers.len()), ctx)
    }

    /// Runs `layers` on hidden states `x: [batch, seq, hidden]`, in the context's compute
    /// dtype. With gradient checkpointing the layers keep only their inputs (see
    /// [`BertEncoder::checkpointed_backward`]).
    pub fn forward_from(
        &self,
        x: Tensor,
        mask: &Tensor,
        layers: std::ops::Range<usize>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let dtype = ctx.compute_dtype().unwrap_or(self.embeddings.word.dtype());
        let range = layers.start.min(self.layers.len())..layers.end.min(self.layers.len());
        let mut x = ctx.cast(&x)?;
        // On the CPU the layers run on the packed real tokens; elsewhere on the padded batch
        // with mask biases: 0 where attended, -10000 at padding, broadcast over heads and
        // query positions.
        let head_width = self.config.hidden_size / self.config.num_attention_heads.max(1);
        let packs = x.device().is_cpu() && matches!(dtype, DType::F32 | DType::F64) && supports_head_width(head_width);
        let packing = packs.then(|| Packing::from_mask(mask)).transpose()?;
        let layer_mask = match &packing {
            Some(p) => {
                x = p.pack(&x)?;
                LayerMask::Packed(p.clone())
            }
            None => LayerMask::Padded(((mask.to_dtype(dtype)? - 1.0)? * 10_000.0)?.unsqueeze(1)?.unsqueeze(1)?),
        };
        let unpack = |x: Tensor| -> Result<Tensor> {
            match &packing {
                Some(p) => p.unpack(&x),
                None => Ok(x),
            }
        };
        if ctx.is_checkpointing() {
            let start = x.clone();
            let mut inputs = Vec::with_capacity(range.len());
            x = x.detach();
            for i in range {
                ctx.enter_layer(i);
                inputs.push((i, x.clone()));
                x = self.layers[i].forward(&x, &layer_mask, ctx)?.detach();
            }
            let top = Var::from_tensor(&x)?;
            let out = top.as_tensor().clone();
            ctx.set_record(CheckpointRecord { start, inputs, extras: layer_mask.to_extras()?, top });
            return unpack(out);
        }
        for i in range {
            ctx.enter_layer(i);
            x = self.layers[i].forward(&x, &layer_mask, ctx)?;
        }
        unpack(x)
    }

    /// The backward pass of a checkpointed forward: `store` holds the gradients of the loss
    /// (up to the record's `top`); each layer is recomputed from its saved input, with the
    /// same dropout masks, and differentiated in turn, from the last to the first. The
    /// gradients of `trainable` are added to `grads`.
    pub fn checkpointed_backward(
        &self,
        ctx: &ForwardCtx,
        store: &GradStore,
        trainable: &[(String, Var)],
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<()> {
        ctx.checkpointed_backward(store, trainable, grads, |i, x, extras| {
            self.layers[i].forward(x, &LayerMask::from_extras(extras)?, ctx)
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The index of the layer a parameter name belongs to (`encoder.layer.{i}.…`), if any.
    pub fn layer_of(name: &str) -> Option<usize> {
        let rest = name.strip_prefix("encoder.layer.")?;
        rest.split('.').next()?.parse().ok()
    }
}

/// Renames keys of published checkpoints to `BertModel` names: drops a leading `bert.` and
/// maps old `gamma`/`beta` LayerNorm names to `weight`/`bias`.
pub fn normalize_weight_name(name: &str) -> String {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    if let Some(stem) = name.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = name.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        name.to_owned()
    }
}
