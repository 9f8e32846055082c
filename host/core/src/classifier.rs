//! Sequence classification: an encoder, pooling over tokens, and a linear head.
//!
//! `logits = head(dropout(pool(encoder(ids, mask))))` with `pool` the masked mean over tokens
//! (sentence-transformers' pooling) or the first token. A saved model is a directory in
//! Hugging Face layout — `config.json`, `model.safetensors` (encoder and `classifier.*`),
//! `tokenizer.json` — plus `tuneforge.json` with the labels, pooling and maximum length.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use serde::{Deserialize, Serialize};
use tuneforge_data::{EncodedBatch, TextEncoder};

use crate::bert::{BertConfig, BertEncoder, normalize_weight_name};
use crate::fs_atomic::{replace_dir, write_synced};
use crate::layers::{ForwardCtx, Linear, masked_mean};
use crate::llama::{DecoderModel, LlamaConfig};
use crate::peft::PeftSpec;
use crate::weights::{load_safetensors, to_safetensors_bytes};
use crate::{CoreError, Init, ParamBuilder, ParamStore, Result};

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over real tokens.
    #[default]
    Mean,
    /// The first token (`[CLS]`).
    Cls,
    /// The last real token: a decoder's summary of the whole text (causal attention).
    Last,
}

pub const META_FILE: &str = "tuneforge.json";
/// The plugins a saved model needs at inference.
pub const MODEL_PLUGINS_FILE: &str = "plugins.json";
/// The parameter holding the embedding rows of added tokens.
const EXTRA_ROWS: &str = "embeddings.word_embeddings.extra";
const FORMAT_VERSION: u32 = 1;

/// What `tuneforge.json` records about a fine-tuned model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub format_version: u32,
    pub task: String,
    pub architecture: String,
    pub labels: Vec<String>,
    pub pooling: Pooling,
    pub max_len: usize,
    pub classifier_dropout: f64,
    /// Where the encoder came from (a model source string).
    pub base_model: String,
    /// Adapters or LoRA the model carries.
    #[serde(default)]
    pub peft: PeftSpec,
    /// The base layers that trained besides the adapters or LoRA (the last K), if any.
    #[serde(default)]
    pub trained_last_layers: Option<usize>,
    /// Terms added to the vocabulary as whole tokens, in id order after the base vocabulary.
    #[serde(default)]
    pub extra_tokens: Vec<String>,
    /// Numeric features from a plugin fused with the text embedding, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<Fusion>,
    /// Set when the weights are quantized (`tuneforge quantize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<crate::quantize::Quantization>,
    /// Set when `model.safetensors` holds only what training changed (a decoder's LoRA or
    /// trained layers, and the head): the other weights are read from `base_model` at load,
    /// as an instruction-tuned adapter's are.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub over_base: bool,
}

/// Feature fusion: which plugin's features, how they are standardised and the layer width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fusion {
    /// The features plugin (see the model directory's `plugins.json`).
    pub plugin: String,
    /// Feature names, in order.
    pub features: Vec<String>,
    /// Training-set mean and standard deviation of each feature.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Width of the dense layer the features pass through.
    pub dim: usize,
}

impl Fusion {
    /// Standardisation statistics from training rows (a constant feature gets std 1).
    pub fn fit(plugin: &str, features: Vec<String>, rows: &[Vec<f32>], dim: usize) -> Self {
        let n = features.len();
        let count = rows.len().max(1) as f64;
        let mut mean = vec![0.0f64; n];
        for r in rows {
            for (m, &v) in mean.iter_mut().zip(r) {
                *m += v as f64 / count;
            }
        }
        let mut var = vec![0.0f64; n];
        for r in rows {
            for ((s, &v), m) in var.iter_mut().zip(r).zip(&mean) {
                *s += (v as f64 - m).powi(2) / count;
            }
        }
        let std = var.iter().map(|v| if v.sqrt() > 1e-6 { v.sqrt() as f32 } else { 1.0 }).collect();
        Self { plugin: plugin.into(), features, mean: mean.into_iter().map(|m| m as f32).collect(), std, dim }
    }
}

impl ModelMeta {
    /// The metadata of a BERT classifier with a new head, as `options` describe it.
    fn for_new_head(options: &ClassifierOptions) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            task: "sequence-classification".into(),
            architecture: "bert".into(),
            labels: options.labels.clone(),
            pooling: options.pooling,
            max_len: options.max_len,
            classifier_dropout: options.classifier_dropout,
            base_model: options.base_model.clone(),
            peft: options.peft.clone(),
            trained_last_layers: options.trainability.train_last_layers,
            extra_tokens: options.extra_tokens.clone(),
            fusion: options.fusion.clone(),
            quantization: None,
            over_base: false,
        }
    }
}

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trainability {
    /// Train only the last K encoder layers (and the head); `None`: all layers.
    pub train_last_layers: Option<usize>,
    /// Train the embeddings even when layers are frozen.
    pub train_embeddings: bool,
    /// Train the adapter or LoRA parameters and the head; the base model is frozen except
    /// for the last `train_last_layers` layers, when given.
    pub peft_only: bool,
}

impl Trainability {
    fn predicate(self, n_layers: usize) -> impl Fn(&str) -> bool + Send + Sync + 'static {
        move |name: &str| match self.train_last_layers {
            _ if name == EXTRA_ROWS => true,
            _ if self.peft_only => {
                let in_trained_layer = match (self.train_last_layers, layer_index(name)) {
                    (Some(k), Some(i)) => i + k >= n_layers,
                    _ => false,
                };
                name.starts_with("classifier.")
                    || PeftSpec::is_peft_param(name)
                    || in_trained_layer
                    || (self.train_embeddings && is_embedding(name))
            }
            None => true,
            Some(k) => {
                if is_embedding(name) {
                    self.train_embeddings
                } else if let Some(i) = layer_index(name) {
                    i + k >= n_layers
                } else {
                    true
                }
            }
        }
    }
}

/// Options for a classifier over a base encoder.
#[derive(Debug, Clone)]
pub struct ClassifierOptions {
    pub labels: Vec<String>,
    pub pooling: Pooling,
    pub max_len: usize,
    pub classifier_dropout: f64,
    pub seed: u64,
    pub trainability: Trainability,
    pub base_model: String,
    pub dtype: DType,
    /// Where the parameters live and the model computes.
    pub device: Device,
    /// Adapters or LoRA to add to the base model.
    pub peft: PeftSpec,
    /// Domain terms to add to the vocabulary as whole tokens; their embedding rows start
    /// as the mean of the rows of the pieces they split into, and always train.
    pub extra_tokens: Vec<String>,
    /// Fuse plugin features with the text embedding.
    pub fusion: Option<Fusion>,
}

/// Hidden states `[batch, seq, hidden]` after the first `layers` layers, computed once by
/// [`ClassifierModel::prefix_hidden`] and reused.
#[derive(Debug, Clone)]
pub struct FrozenPrefix {
    pub layers: usize,
    pub hidden: Tensor,
}

/// One prediction: the best label and every label's probability (in label order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
    pub probabilities: Vec<(String, f32)>,
}

/// The configuration of a classifier's backbone: a BERT-family encoder or a Llama/Qwen2
/// decoder.
#[derive(Debug, Clone)]
pub enum BackboneConfig {
    Encoder(BertConfig),
    Decoder(LlamaConfig),
}

impl BackboneConfig {
    pub fn n_layers(&self) -> usize {
        match self {
            Self::Encoder(c) => c.num_hidden_layers,
            Self::Decoder(c) => c.num_hidden_layers,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Encoder(c) => c.hidden_size,
            Self::Decoder(c) => c.hidden_size,
        }
    }

    /// `bert`, or the decoder's `model_type` (`llama`, `qwen2`): `architecture` in `tuneforge.json`.
    pub fn architecture(&self) -> String {
        match self {
            Self::Encoder(_) => "bert".into(),
            Self::Decoder(c) => c.model_type.clone(),
        }
    }

    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        match self {
            Self::Encoder(c) => serde_json::to_vec_pretty(c),
            Self::Decoder(c) => serde_json::to_vec_pretty(c),
        }
    }
}

/// The network under the head.
enum Backbone {
    Encoder(BertEncoder),
    Decoder(DecoderModel),
}

/// The index of the transformer layer a parameter belongs to, in either naming.
fn layer_index(name: &str) -> Option<usize> {
    BertEncoder::layer_of(name).or_else(|| DecoderModel::layer_of(name))
}

fn is_embedding(name: &str) -> bool {
    name.starts_with("embeddings.") || name.starts_with("model.embed_tokens.")
}

/// True when `path` holds a decoder (a `.gguf` file, or a directory whose `config.json` names
/// a Llama or Qwen2 model).
pub fn is_decoder_source(path: &Path) -> bool {
    if path.extension().is_some_and(|x| x == "gguf") {
        return true;
    }
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["model_type"].as_str().map(|m| matches!(m, "llama" | "qwen2")))
        .unwrap_or(false)
}

/// An encoder or decoder with a classification head and its tokenizer.
pub struct ClassifierModel {
    backbone: Backbone,
    backbone_config: BackboneConfig,
    head: Linear,
    /// With feature fusion: the dense layer, and the standardisation as tensors.
    fusion: Option<(Linear, Tensor, Tensor)>,
    params: ParamStore,
    text: TextEncoder,
    meta: ModelMeta,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for ClassifierModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifierModel").field("meta", &self.meta).field("params", &self.params).finish()
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(CoreError::io(path))?;
    serde_json::from_str(&text).map_err(|e| CoreError::file(path, format!("line {}: {e}", e.line())))
}

/// `dir`'s `model.safetensors`, names normalised.
fn read_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join("model.safetensors");
    if !path.exists() {
        return Err(CoreError::file(&path, "not found (tuneforge reads safetensors weights)"));
    }
    Ok(load_safetensors(&path)?.into_iter().map(|(k, v)| (normalize_weight_name(&k), v)).collect())
}

/// The weights of the model directory `dir`: `model.safetensors`, over the base model's
/// when the model was saved over its base ([`ModelMeta::over_base`]).
pub(crate) fn load_weights(dir: &Path, meta: &ModelMeta) -> Result<HashMap<String, Tensor>> {
    let saved = read_weights(dir)?;
    if !meta.over_base {
        return Ok(saved);
    }
    let base = crate::ModelSource::parse(&meta.base_model)?.resolve().map_err(|e| {
        CoreError::file(dir, format!("holds only the trained weights; its base model `{}`: {e}", meta.base_model))
    })?;
    let mut weights = crate::sft::Base::load(&base, DType::F32)?.weights;
    weights.extend(saved);
    Ok(weights)
}

/// The `tuneforge.json` of the model directory `dir`.
pub(crate) fn read_meta(dir: &Path) -> Result<ModelMeta> {
    read_json(&dir.join(META_FILE))
}

impl ClassifierModel {
    /// A classifier with a new head over the pretrained encoder in `dir`
    /// (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub fn from_base(dir: &Path, options: &ClassifierOptions) -> Result<Self> {
        Self::from_base_layers(dir, options, None)
    }

    /// [`ClassifierModel::from_base`] keeping only the encoder layers `keep` (in order,
    /// renumbered from 0): a smaller student initialised from chosen layers.
    pub fn from_base_layers(dir: &Path, options: &ClassifierOptions, keep: Option<&[usize]>) -> Result<Self> {
        if let Ok(meta) = read_meta(dir)
            && meta.quantization.is_some()
        {
            return Err(CoreError::file(
                dir,
                "is an int8 model for serving; fine-tune from the f32 model it came from",
            ));
        }
        if is_decoder_source(dir) {
            return Self::from_decoder_base(dir, options, keep);
        }
        let mut config: BertConfig = read_json(&dir.join("config.json"))?;
        let mut weights = read_weights(dir)?;
        if let Some(keep) = keep {
            if keep.is_empty() || keep.iter().any(|&l| l >= config.num_hidden_layers) {
                return Err(CoreError::file(
                    dir,
                    format!("cannot keep layers {keep:?} of a {}-layer model", config.num_hidden_layers),
                ));
            }
            weights = weights
                .into_iter()
                .filter_map(|(name, t)| match BertEncoder::layer_of(&name) {
                    None => Some((name, t)),
                    Some(l) => keep.iter().position(|&k| k == l).map(|new| {
                        let rest = &name[format!("encoder.layer.{l}.").len()..];
                        (format!("encoder.layer.{new}.{rest}"), t)
                    }),
                })
                .collect();
            config.num_hidden_layers = keep.len();
        }
        let mut text = TextEncoder::from_file(&dir.join("tokenizer.json"), options.max_len)?;
        Self::check_sizes(&config, &text, options.max_len, dir, 0)?;
        if !options.extra_tokens.is_empty() {
            let pieces = text.add_terms(&options.extra_tokens)?;
            let word = weights.get("embeddings.word_embeddings.weight").ok_or_else(|| CoreError::Param {
                name: "embeddings.word_embeddings.weight".into(),
                message: "is missing from the weights file".into(),
            })?;
            let rows = pieces
                .iter()
                .zip(&options.extra_tokens)
                .map(|(ids, term)| {
                    if ids.is_empty() {
                        return Err(CoreError::Param {
                            name: EXTRA_ROWS.into(),
                            message: format!("term `{term}` tokenizes to nothing"),
                        });
                    }
                    let idx = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                    Ok(word.index_select(&idx, 0)?.mean_keepdim(0)?)
                })
                .collect::<Result<Vec<_>>>()?;
            weights.insert(EXTRA_ROWS.into(), Tensor::cat(&rows, 0)?);
        }
        let pb = ParamBuilder::with_loaded(weights, true, options.seed, options.dtype, &options.device);
        Self::build(BackboneConfig::Encoder(config), pb, text, ModelMeta::for_new_head(options), options.trainability)
    }

    /// A classifier over a pretrained decoder (a `.gguf` file or a Hugging Face Llama/Qwen2
    /// directory): last-token pooling by default, a new head; the decoder's LoRA, frozen or
    /// full training as `options` say.
    fn from_decoder_base(path: &Path, options: &ClassifierOptions, keep: Option<&[usize]>) -> Result<Self> {
        let unsupported = |what: &str| CoreError::file(path, format!("is a decoder: {what} is for encoders"));
        if keep.is_some() {
            return Err(unsupported("keeping chosen layers (a distilled student)"));
        }
        if !options.extra_tokens.is_empty() {
            return Err(unsupported("vocabulary extension (data.extra_tokens)"));
        }
        if let Ok(meta) = read_meta(path)
            && meta.over_base
        {
            return Err(CoreError::file(
                path,
                format!("is a classifier saved over its base model; fine-tune from that base, `{}`", meta.base_model),
            ));
        }
        let base = crate::sft::Base::load(path, DType::F32)?;
        let text = TextEncoder::new(base.tokenizer, options.max_len)?;
        let config = base.config;
        if options.max_len > config.max_position_embeddings {
            return Err(CoreError::file(
                path,
                format!("max_len {} exceeds the model's {} positions", options.max_len, config.max_position_embeddings),
            ));
        }
        let mut meta = ModelMeta::for_new_head(options);
        meta.architecture = config.model_type.clone();
        let pb = ParamBuilder::with_loaded(base.weights, true, options.seed, options.dtype, &options.device);
        Self::build(BackboneConfig::Decoder(config), pb, text, meta, options.trainability)
    }

    /// A classifier with random weights (tests and benchmarks).
    pub fn random(config: BertConfig, mut text: TextEncoder, options: &ClassifierOptions) -> Result<Self> {
        if !options.extra_tokens.is_empty() {
            text.add_terms(&options.extra_tokens)?;
        }
        let pb = ParamBuilder::random(options.seed, options.dtype, &options.device);
        Self::build(BackboneConfig::Encoder(config), pb, text, ModelMeta::for_new_head(options), options.trainability)
    }

    /// A fine-tuned model saved by [`ClassifierModel::save`], for inference on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, &Device::Cpu)
    }

    /// [`ClassifierModel::load`] onto `device` (an int8 model runs on the CPU only).
    pub fn load_on(dir: &Path, device: &Device) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.exists() {
            return Err(CoreError::file(
                dir,
                format!("not a tuneforge model directory ({META_FILE} is missing); train one with `tuneforge train`"),
            ));
        }
        let meta: ModelMeta = read_json(&meta_path)?;
        if meta.format_version != FORMAT_VERSION {
            return Err(CoreError::file(
                &meta_path,
                format!("format_version {} is not supported", meta.format_version),
            ));
        }
        let text = TextEncoder::from_file(&dir.join("tokenizer.json"), meta.max_len)?;
        let config = if meta.architecture == "bert" {
            let config: BertConfig = read_json(&dir.join("config.json"))?;
            Self::check_sizes(&config, &text, meta.max_len, dir, meta.extra_tokens.len())?;
            BackboneConfig::Encoder(config)
        } else {
            BackboneConfig::Decoder(LlamaConfig::read(&dir.join("config.json"))?)
        };
        let pb = match &meta.quantization {
            None => ParamBuilder::with_loaded(load_weights(dir, &meta)?, true, 0, DType::F32, device),
            Some(_) if !device.is_cpu() => {
                return Err(CoreError::file(dir, "is an int8 model; its kernels run on the CPU (use `--device cpu`)"));
            }
            Some(q) => {
                let (floats, int8) = crate::quantize::load_int8_weights(&dir.join("model.safetensors"), q)?;
                let pb = ParamBuilder::with_loaded(floats, true, 0, DType::F32, &Device::Cpu);
                pb.set_int8(int8);
                pb
            }
        };
        pb.set_trainable(|_| false);
        pb.set_strict();
        Self::build_inner(config, pb, text, meta)
    }

    fn check_sizes(config: &BertConfig, text: &TextEncoder, max_len: usize, dir: &Path, n_extra: usize) -> Result<()> {
        if max_len > config.max_position_embeddings {
            return Err(CoreError::file(
                dir,
                format!(
                    "max_len {max_len} exceeds the model's max_position_embeddings {}",
                    config.max_position_embeddings
                ),
            ));
        }
        if text.vocab_size() > config.vocab_size + n_extra {
            return Err(CoreError::file(
                dir,
                format!(
                    "tokenizer has {} tokens, the model has {} embedding rows",
                    text.vocab_size(),
                    config.vocab_size + n_extra
                ),
            ));
        }
        Ok(())
    }

    fn build(
        config: BackboneConfig,
        pb: ParamBuilder,
        text: TextEncoder,
        meta: ModelMeta,
        t: Trainability,
    ) -> Result<Self> {
        if let Some(k) = t.train_last_layers
            && k > config.n_layers()
        {
            return Err(CoreError::Config {
                file: "experiment".into(),
                field: "peft.train_last_layers".into(),
                message: format!("is {k}, but the model has only {} layers", config.n_layers()),
            });
        }
        pb.set_trainable(t.predicate(config.n_layers()));
        Self::build_inner(config, pb, text, meta)
    }

    fn build_inner(config: BackboneConfig, pb: ParamBuilder, text: TextEncoder, meta: ModelMeta) -> Result<Self> {
        if meta.labels.len() < 2 {
            return Err(CoreError::Config {
                file: "data".into(),
                field: "label".into(),
                message: format!("a classifier needs at least 2 labels, found {}", meta.labels.len()),
            });
        }
        let dtype = pb.dtype();
        let pb_device = pb.device().clone();
        let backbone = match &config {
            BackboneConfig::Encoder(c) => {
                Backbone::Encoder(BertEncoder::new(c, &pb, &meta.peft, meta.extra_tokens.len())?)
            }
            BackboneConfig::Decoder(c) => {
                if text.vocab_size() > c.vocab_size {
                    return Err(CoreError::Param {
                        name: "model.embed_tokens.weight".into(),
                        message: format!(
                            "the tokenizer has {} tokens, the model {} rows",
                            text.vocab_size(),
                            c.vocab_size
                        ),
                    });
                }
                Backbone::Decoder(DecoderModel::in_builder(c, &pb, &meta.peft, false)?)
            }
        };
        let h = config.hidden_size();
        let n = meta.labels.len();
        let fusion = match &meta.fusion {
            None => None,
            Some(f) => {
                let k = f.features.len();
                if k == 0 || f.mean.len() != k || f.std.len() != k || f.dim == 0 {
                    return Err(CoreError::Config {
                        file: META_FILE.into(),
                        field: "fusion".into(),
                        message: format!("{k} features, {} means, {} stds, width {}", f.mean.len(), f.std.len(), f.dim),
                    });
                }
                let fp = pb.pp("fusion.dense");
                let dense = Linear::new(
                    fp.get_new(&[f.dim, k], "weight", Init::Normal(0.1))?,
                    Some(fp.get_new(&[f.dim], "bias", Init::Zeros)?),
                );
                let mean = Tensor::from_slice(&f.mean, (1, k), pb.device())?.to_dtype(dtype)?;
                let std = Tensor::from_slice(&f.std, (1, k), pb.device())?.to_dtype(dtype)?;
                Some((dense, mean, std))
            }
        };
        let head_in = h + meta.fusion.as_ref().map_or(0, |f| f.dim);
        let hp = pb.pp("classifier");
        let head = Linear::new(
            hp.get_new(&[n, head_in], "weight", Init::Normal(0.02))?,
            Some(hp.get_new(&[n], "bias", Init::Zeros)?),
        );
        let (params, unused) = pb.finish();
        if !unused.is_empty() {
            tracing::debug!(?unused, "weights not used by the model");
        }
        if let (PeftSpec::Lora { target_modules, .. }, BackboneConfig::Decoder(_)) = (&meta.peft, &config)
            && !params.tensors().iter().any(|(n, _)| n.contains(".lora_A."))
        {
            return Err(CoreError::Config {
                file: "experiment".into(),
                field: "peft.target_modules".into(),
                message: format!(
                    "{target_modules:?} names no projection of this decoder: use q_proj, k_proj, v_proj, o_proj, \
                     gate_proj, up_proj or down_proj"
                ),
            });
        }
        let device = pb_device;
        Ok(Self { backbone, backbone_config: config, head, fusion, params, text, meta, device, dtype })
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }

    /// The encoder's configuration (`None` for a decoder backbone).
    pub fn config(&self) -> Option<&BertConfig> {
        match &self.backbone_config {
            BackboneConfig::Encoder(c) => Some(c),
            BackboneConfig::Decoder(_) => None,
        }
    }

    pub fn backbone_config(&self) -> &BackboneConfig {
        &self.backbone_config
    }

    pub fn labels(&self) -> &[String] {
        &self.meta.labels
    }

    /// Pooled sentence vectors `[batch, hidden]` (before the head's dropout).
    fn pooled(&self, batch: &EncodedBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        self.pooled_from(batch, None, ctx)
    }

    fn batch_tensors(&self, batch: &EncodedBatch) -> Result<(Tensor, Tensor, Tensor)> {
        let shape = (batch.batch_size, batch.seq_len);
        let ids = Tensor::from_slice(&batch.ids, shape, &self.device)?;
        let type_ids = Tensor::from_slice(&batch.type_ids, shape, &self.device)?;
        let mask = Tensor::from_slice(&batch.mask, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((ids, type_ids, mask))
    }

    /// Pooled vectors; with `prefix = (k, hidden)`, starts from the hidden states after the
    /// first `k` layers instead of the tokens.
    fn pooled_from(&self, batch: &EncodedBatch, prefix: Option<&FrozenPrefix>, ctx: &ForwardCtx) -> Result<Tensor> {
        let (ids, type_ids, mask) = self.batch_tensors(batch)?;
        let hidden = match (&self.backbone, prefix) {
            (Backbone::Encoder(e), None) => e.forward(&ids, &type_ids, &mask, ctx)?,
            (Backbone::Encoder(e), Some(p)) => e.forward_from(
                p.hidden.to_device(&self.device)?.to_dtype(self.dtype)?,
                &mask,
                p.layers..e.n_layers(),
                ctx,
            )?,
            // Causal attention: padding after a row's last token cannot reach it.
            (Backbone::Decoder(d), None) => d.hidden_states(&ids, None, ctx)?,
            (Backbone::Decoder(_), Some(_)) => {
                return Err(CoreError::Param {
                    name: "prefix".into(),
                    message: "decoders have no prefix cache".into(),
                });
            }
        };
        // Mixed precision: pooling, head and loss in the parameters' dtype.
        let hidden = hidden.to_dtype(self.dtype)?;
        match self.meta.pooling {
            Pooling::Mean => masked_mean(&hidden, &mask),
            Pooling::Cls => Ok(hidden.i((.., 0))?),
            Pooling::Last => {
                let (b, l) = (batch.batch_size, batch.seq_len);
                let last: Vec<u32> = (0..b)
                    .map(|r| {
                        let n = batch.mask[r * l..(r + 1) * l].iter().filter(|&&m| m > 0.0).count().max(1);
                        (r * l + n - 1) as u32
                    })
                    .collect();
                let idx = Tensor::from_vec(last, b, &self.device)?;
                Ok(hidden.reshape((b * l, hidden.dim(2)?))?.index_select(&idx, 0)?)
            }
        }
    }

    /// How many leading layers (with the embeddings) have nothing to train: their outputs
    /// can be computed once per example and reused every epoch.
    pub fn frozen_prefix_layers(&self) -> usize {
        let trainable: Vec<String> = self.params.trainable().into_iter().map(|(n, _)| n).collect();
        if trainable.iter().any(|n| n.starts_with("embeddings.")) {
            return 0;
        }
        let Backbone::Encoder(encoder) = &self.backbone else { return 0 };
        let first_trainable_layer =
            trainable.iter().filter_map(|n| BertEncoder::layer_of(n)).min().unwrap_or(encoder.n_layers());
        first_trainable_layer.min(encoder.n_layers())
    }

    /// The hidden states `[batch, seq, hidden]` after the first `n_layers` layers, in
    /// inference mode (no dropout, no gradient).
    pub fn prefix_hidden(&self, batch: &EncodedBatch, n_layers: usize) -> Result<Tensor> {
        let (ids, type_ids, mask) = self.batch_tensors(batch)?;
        match &self.backbone {
            Backbone::Encoder(e) => {
                Ok(e.forward_layers(&ids, &type_ids, &mask, n_layers, &ForwardCtx::eval())?.detach())
            }
            Backbone::Decoder(_) => {
                Err(CoreError::Param { name: "prefix".into(), message: "decoders have no prefix cache".into() })
            }
        }
    }

    /// Sentence embeddings (the pooled encoder output) of texts, in their order.
    pub fn embeddings<S: AsRef<str>>(&self, texts: &[S], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let encoded = self.text.encode(texts)?;
        let all: Vec<usize> = (0..encoded.len()).collect();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in all.chunks(batch_size.max(1)) {
            let batch = EncodedBatch::collate(&encoded, chunk, None, self.text.pad_id());
            out.extend(self.pooled(&batch, &ForwardCtx::eval())?.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// Logits `[batch, n_labels]` for a padded batch.
    pub fn logits(&self, batch: &EncodedBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        self.logits_from(batch, None, ctx)
    }

    /// Logits, starting from cached hidden states of a frozen prefix when given.
    pub fn logits_from(&self, batch: &EncodedBatch, prefix: Option<&FrozenPrefix>, ctx: &ForwardCtx) -> Result<Tensor> {
        let pooled = ctx.dropout(&self.pooled_from(batch, prefix, ctx)?, self.meta.classifier_dropout)?;
        let input = match (&self.fusion, &self.meta.fusion) {
            (Some((dense, mean, std)), Some(f)) => {
                let k = f.features.len();
                if batch.features.len() != batch.batch_size * k {
                    return Err(CoreError::Param {
                        name: "fusion".into(),
                        message: format!(
                            "the model fuses {k} features from plugin `{}`, the batch carries {} values for {} rows",
                            f.plugin,
                            batch.features.len(),
                            batch.batch_size
                        ),
                    });
                }
                let x =
                    Tensor::from_slice(&batch.features, (batch.batch_size, k), &self.device)?.to_dtype(self.dtype)?;
                let x = x.broadcast_sub(mean)?.broadcast_div(std)?;
                let g = crate::layers::fused::gelu_erf(&dense.forward(&x)?)?;
                Tensor::cat(&[&pooled, &g], 1)?
            }
            _ => pooled,
        };
        Ok(self.head.forward(&input)?)
    }

    /// Finishes the backward pass of a forward run with gradient checkpointing
    /// ([`ForwardCtx::with_checkpointing`]): `store` holds the loss's gradients; the encoder's
    /// layers are recomputed and differentiated, adding to `grads`. Nothing to do otherwise.
    pub fn checkpointed_backward(
        &self,
        ctx: &ForwardCtx,
        store: &candle_core::backprop::GradStore,
        trainable: &[(String, candle_core::Var)],
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<()> {
        match &self.backbone {
            Backbone::Encoder(e) => e.checkpointed_backward(ctx, store, trainable, grads),
            Backbone::Decoder(d) => d.checkpointed_backward(ctx, store, trainable, grads),
        }
    }

    /// The device the model's parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Mean cross-entropy of a labelled batch, and the logits.
    pub fn loss(&self, batch: &EncodedBatch, ctx: &ForwardCtx) -> Result<(Tensor, Tensor)> {
        self.loss_from(batch, None, ctx)
    }

    /// [`ClassifierModel::loss`], starting from a frozen prefix's hidden states when given.
    pub fn loss_from(
        &self,
        batch: &EncodedBatch,
        prefix: Option<&FrozenPrefix>,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Tensor)> {
        let logits = self.logits_from(batch, prefix, ctx)?;
        let labels = Tensor::from_slice(&batch.labels, batch.labels.len(), &self.device)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        Ok((loss, logits))
    }

    /// Predictions for texts, in their order.
    pub fn predict<S: AsRef<str>>(&self, texts: &[S], batch_size: usize) -> Result<Vec<Prediction>> {
        self.predict_with_features(texts, None, batch_size)
    }

    /// Predictions for texts with their fused features (one row per text), for a model
    /// with feature fusion.
    pub fn predict_with_features<S: AsRef<str>>(
        &self,
        texts: &[S],
        features: Option<&[Vec<f32>]>,
        batch_size: usize,
    ) -> Result<Vec<Prediction>> {
        let ctx = ForwardCtx::eval();
        let probs = ctx.softmax_last(&self.logits_for(texts, features, batch_size)?)?.to_vec2::<f32>()?;
        Ok(probs
            .into_iter()
            .map(|row| {
                let (best, score) = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc });
                Prediction {
                    label: self.meta.labels[best].clone(),
                    score,
                    probabilities: self.meta.labels.iter().cloned().zip(row).collect(),
                }
            })
            .collect())
    }

    /// Raw logits `[texts, labels]` in f32 (inference mode), in batches of `batch_size`;
    /// `features` holds one row per text when the model fuses plugin features.
    pub fn logits_for<S: AsRef<str>>(
        &self,
        texts: &[S],
        features: Option<&[Vec<f32>]>,
        batch_size: usize,
    ) -> Result<Tensor> {
        let encoded = self.text.encode(texts)?;
        let ctx = ForwardCtx::eval();
        let all: Vec<usize> = (0..encoded.len()).collect();
        let mut parts = Vec::new();
        for chunk in all.chunks(batch_size.max(1)) {
            let mut batch = EncodedBatch::collate(&encoded, chunk, None, self.text.pad_id());
            if let Some(f) = features {
                batch = batch.with_features(f);
            }
            parts.push(self.logits(&batch, &ctx)?.to_dtype(DType::F32)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, self.meta.labels.len()), DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Saves the whole model into `dir` atomically (staged next to it, then renamed in).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with_plugins(dir, &[])
    }

    /// [`ClassifierModel::save`], with the plugins the model needs at inference (cleaners,
    /// features) copied into `plugins/<name>/` and listed in `plugins.json`.
    pub fn save_with_plugins(&self, dir: &Path, plugins: &[crate::hooks::InferencePlugin]) -> Result<()> {
        if self.meta.quantization.is_some() {
            return Err(CoreError::file(dir, "a quantized model is saved by `tuneforge quantize`, not re-saved"));
        }
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
        let staging = dir.with_file_name(format!(".{name}.staging-{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(CoreError::io(&staging))?;
        }
        std::fs::create_dir_all(&staging).map_err(CoreError::io(&staging))?;
        let config = self.backbone_config.to_json().map_err(|e| CoreError::file(dir, e.to_string()))?;
        write_synced(&staging.join("config.json"), &config)?;
        // A decoder that trained only part of itself (LoRA, the last layers, the head) is
        // saved over its base: the trained tensors only (megabytes, not the whole decoder).
        let trainable = self.params.trainable();
        let over_base = matches!(self.backbone_config, BackboneConfig::Decoder(_))
            && !trainable.is_empty()
            && self.params.n_trainable() < self.params.n_params();
        let tensors = if over_base {
            trainable.into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
        } else {
            self.params.tensors()
        };
        let meta = ModelMeta { over_base, ..self.meta.clone() };
        let meta = serde_json::to_vec_pretty(&meta).map_err(|e| CoreError::file(dir, e.to_string()))?;
        write_synced(&staging.join(META_FILE), &meta)?;
        write_synced(&staging.join("model.safetensors"), &to_safetensors_bytes(&tensors)?)?;
        write_synced(&staging.join("tokenizer.json"), self.text.to_json()?.as_bytes())?;
        if !plugins.is_empty() {
            let mut entries = Vec::new();
            for p in plugins {
                let pdir = staging.join("plugins").join(&p.name);
                std::fs::create_dir_all(&pdir).map_err(CoreError::io(&pdir))?;
                let wasm = std::fs::read(&p.wasm_path).map_err(CoreError::io(&p.wasm_path))?;
                write_synced(&pdir.join("plugin.wasm"), &wasm)?;
                write_synced(&pdir.join("plugin.toml"), p.manifest_toml.as_bytes())?;
                entries.push(crate::hooks::ModelPluginEntry {
                    name: p.name.clone(),
                    kind: p.kind.clone(),
                    sha256: p.sha256.clone(),
                    config: p.config.clone(),
                });
            }
            let json = serde_json::to_vec_pretty(&entries).map_err(|e| CoreError::file(dir, e.to_string()))?;
            write_synced(&staging.join(MODEL_PLUGINS_FILE), &json)?;
        }
        replace_dir(&staging, dir)
    }
}
