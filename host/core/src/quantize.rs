//! int8 models for serving: `tuneforge quantize --to int8`.
//!
//! An encoder's linear layers (query, key, value, attention output, intermediate, output)
//! and the word-embedding table become int8 with one symmetric scale per output channel
//! (per row of the table); position and token-type embeddings, layer norms, biases, the head,
//! adapters and the fusion layer stay f32. A decoder classifier's attention projections and
//! MLP gate and up projections become int8, as for generation (`DecoderModel::quantize_int8`:
//! the down projection, the norms, the embedding table and the head stay f32), and a model
//! saved over its base becomes a whole one. LoRA is merged first. Products run on
//! `tuneforge_kernels::Int8Matrix` (activations quantized per token on the fly).
//!
//! A quantized model is a normal model directory: `tuneforge.json` gains `quantization`, and
//! `model.safetensors` holds `<name>.int8` (I8) and `<name>.scale` (F32) in place of each
//! quantized `<name>`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use tuneforge_kernels::{Int8Matrix, KernelPath};

use crate::classifier::META_FILE;
use crate::export::{copy_model_plugins, merge_lora, model_dir_of, read_model, stage};
use crate::fs_atomic::{replace_dir, write_synced};
use crate::{CoreError, Result};

/// How a model's weights were quantized (`tuneforge.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    /// `int8-symmetric-per-channel`.
    pub scheme: String,
    /// Full names of the quantized tensors.
    pub tensors: Vec<String>,
}

pub const INT8_SCHEME: &str = "int8-symmetric-per-channel";
const INT8_SUFFIX: &str = ".int8";
const SCALE_SUFFIX: &str = ".scale";

/// What a quantization did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub tensors: usize,
    pub quantized_params: usize,
    pub float_params: usize,
    /// Largest `|w - dequant(w)| / scale` seen (at most 0.5 by construction).
    pub max_error_in_steps: f32,
    /// The f32 model's size: its directory, or, for a model saved over its base, the
    /// directory with the whole model's weights in f32 in place of the trained ones.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Whether the model was saved over its base (the int8 copy is whole).
    pub from_over_base: bool,
}

/// Whether a parameter is quantized: the encoder's linear weights and the word embeddings.
pub fn is_quantized_name(name: &str, keep_embeddings_float: bool) -> bool {
    const LINEARS: [&str; 6] = [
        ".attention.self.query.weight",
        ".attention.self.key.weight",
        ".attention.self.value.weight",
        ".attention.output.dense.weight",
        ".intermediate.dense.weight",
        ".output.dense.weight",
    ];
    (name.starts_with("encoder.layer.") && LINEARS.iter().any(|s| name.ends_with(s)) && !name.contains("adapter"))
        || (!keep_embeddings_float && name == "embeddings.word_embeddings.weight")
}

/// Whether a decoder classifier's parameter is quantized: the attention projections and the
/// MLP's gate and up projections (the down projection's inputs carry outliers that per-token
/// int8 flattens; see `DecoderModel::quantize_int8`).
pub fn is_quantized_decoder_name(name: &str) -> bool {
    const LINEARS: [&str; 6] = [
        ".self_attn.q_proj.weight",
        ".self_attn.k_proj.weight",
        ".self_attn.v_proj.weight",
        ".self_attn.o_proj.weight",
        ".mlp.gate_proj.weight",
        ".mlp.up_proj.weight",
    ];
    name.starts_with("model.layers.") && LINEARS.iter().any(|s| name.ends_with(s))
}

/// Quantizes the model in `model` (a model or run directory) into `out`.
pub fn quantize_int8(model: &Path, out: &Path, keep_embeddings_float: bool) -> Result<QuantizeReport> {
    let dir = model_dir_of(model);
    // Checked before the weights are read: candle cannot read an int8 file.
    let meta = crate::classifier::read_meta(&dir)?;
    if meta.quantization.is_some() {
        return Err(CoreError::file(&dir, "is already quantized"));
    }
    let decoder = meta.architecture != "bert";
    let quantized = |name: &str| {
        if decoder { is_quantized_decoder_name(name) } else { is_quantized_name(name, keep_embeddings_float) }
    };
    // A model saved over its base is read whole (its base from `[model] source`).
    let (mut meta, mut tensors) = read_model(&dir)?;
    let from_over_base = std::mem::take(&mut meta.over_base);
    merge_lora(&mut meta, &mut tensors, &dir)?;
    let mut raw: Vec<(String, RawTensor)> = Vec::new();
    let mut names = Vec::new();
    let (mut qp, mut fp, mut worst) = (0usize, 0usize, 0f32);
    for (name, t) in &tensors {
        if quantized(name) {
            let (rows, cols) = t.dims2().map_err(|_| CoreError::Param {
                name: name.clone(),
                message: format!("has shape {:?}; only matrices are quantized", t.dims()),
            })?;
            let w = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let q = Int8Matrix::quantize(&w, rows, cols)
                .map_err(|message| CoreError::Param { name: name.clone(), message })?;
            let d = q.dequantize();
            for (r, s) in q.scales().iter().enumerate() {
                if *s > 0.0 {
                    let e = (0..cols).map(|c| (w[r * cols + c] - d[r * cols + c]).abs()).fold(0f32, f32::max);
                    worst = worst.max(e / s);
                }
            }
            qp += rows * cols;
            raw.push((format!("{name}{INT8_SUFFIX}"), RawTensor::int8(q.values(), &[rows, cols])));
            raw.push((format!("{name}{SCALE_SUFFIX}"), RawTensor::f32(q.scales(), &[rows])));
            names.push(name.clone());
        } else {
            fp += t.elem_count();
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            raw.push((name.clone(), RawTensor::f32(&v, t.dims())));
        }
    }
    if names.is_empty() {
        return Err(CoreError::file(&dir, "has no linear layers to quantize"));
    }
    meta.quantization = Some(Quantization { scheme: INT8_SCHEME.into(), tensors: names.clone() });
    let staging = stage(out)?;
    for file in ["config.json", "tokenizer.json"] {
        let from = dir.join(file);
        let bytes = std::fs::read(&from).map_err(CoreError::io(&from))?;
        write_synced(&staging.join(file), &bytes)?;
    }
    copy_model_plugins(&dir, &staging)?;
    let bytes = safetensors::tensor::serialize(raw.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| CoreError::file(out, format!("serialising weights: {e}")))?;
    write_synced(&staging.join("model.safetensors"), &bytes)?;
    let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| CoreError::file(out, e.to_string()))?;
    write_synced(&staging.join(META_FILE), &meta_json)?;
    let mut bytes_before = dir_size(&dir)?;
    if from_over_base {
        let weights = dir.join("model.safetensors");
        let saved = std::fs::metadata(&weights).map_err(CoreError::io(&weights))?.len();
        bytes_before = bytes_before - saved.min(bytes_before) + 4 * (qp + fp) as u64;
    }
    replace_dir(&staging, out)?;
    Ok(QuantizeReport {
        tensors: names.len(),
        quantized_params: qp,
        float_params: fp,
        max_error_in_steps: worst,
        bytes_before,
        bytes_after: dir_size(out)?,
        from_over_base,
    })
}

/// Total size of the files in a model directory (plugins included).
pub fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(CoreError::io(dir))? {
        let entry = entry.map_err(CoreError::io(dir))?;
        let meta = entry.metadata().map_err(CoreError::io(entry.path()))?;
        total += if meta.is_dir() { dir_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// int8 matrices by the name of the f32 tensor each stands for.
pub(crate) type Int8Tensors = HashMap<String, Arc<Int8Matrix>>;

/// Reads a quantized model's weights: float tensors by name, and int8 matrices by the name
/// of the tensor they replace. Every name `meta` lists must be there with its scales.
pub(crate) fn load_int8_weights(path: &Path, q: &Quantization) -> Result<(HashMap<String, Tensor>, Int8Tensors)> {
    if q.scheme != INT8_SCHEME {
        return Err(CoreError::file(
            path,
            format!("quantization scheme `{}` is not supported (only {INT8_SCHEME})", q.scheme),
        ));
    }
    let bytes = std::fs::read(path).map_err(CoreError::io(path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| CoreError::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut floats = HashMap::new();
    let mut int8: BTreeMap<String, (Vec<i8>, Vec<usize>)> = BTreeMap::new();
    let mut scales: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let bad = |m: String| CoreError::file(path, format!("tensor `{name}`: {m}"));
        match view.dtype() {
            safetensors::Dtype::I8 => {
                let stem =
                    name.strip_suffix(INT8_SUFFIX).ok_or_else(|| bad("an int8 tensor must end in `.int8`".into()))?;
                int8.insert(stem.to_owned(), (view.data().iter().map(|b| *b as i8).collect(), view.shape().to_vec()));
            }
            safetensors::Dtype::F32 => {
                let values: Vec<f32> =
                    view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                if let Some(stem) = name.strip_suffix(SCALE_SUFFIX) {
                    scales.insert(stem.to_owned(), values);
                } else {
                    floats.insert(name.clone(), Tensor::from_vec(values, view.shape(), &Device::Cpu)?);
                }
            }
            other => return Err(bad(format!("dtype {other:?}; a quantized model holds I8 and F32"))),
        }
    }
    let mut matrices = HashMap::new();
    for name in &q.tensors {
        let missing =
            |what: &str| CoreError::file(path, format!("quantized tensor `{name}`: `{name}{what}` is missing"));
        let (values, shape) = int8.remove(name).ok_or_else(|| missing(INT8_SUFFIX))?;
        let s = scales.remove(name).ok_or_else(|| missing(SCALE_SUFFIX))?;
        let [rows, cols] = shape[..] else {
            return Err(CoreError::file(path, format!("quantized tensor `{name}` has shape {shape:?}, not a matrix")));
        };
        // Tables are read row by row, never multiplied: no packed copy for them.
        let kernel = if name.ends_with("word_embeddings.weight") { KernelPath::Portable } else { KernelPath::detect() };
        let m = Int8Matrix::from_parts_on(values, s, rows, cols, kernel)
            .map_err(|e| CoreError::file(path, format!("quantized tensor `{name}`: {e}")))?;
        matrices.insert(name.clone(), Arc::new(m));
    }
    if let Some(extra) = int8.keys().next() {
        return Err(CoreError::file(path, format!("int8 tensor `{extra}` is not listed in {META_FILE}")));
    }
    Ok((floats, matrices))
}

/// A tensor to write: dtype, shape and little-endian bytes.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawTensor {
    fn int8(values: &[i8], shape: &[usize]) -> Self {
        Self { dtype: safetensors::Dtype::I8, shape: shape.to_vec(), bytes: values.iter().map(|v| *v as u8).collect() }
    }

    fn f32(values: &[f32], shape: &[usize]) -> Self {
        Self {
            dtype: safetensors::Dtype::F32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
