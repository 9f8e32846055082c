//! Exports of a fine-tuned model: LoRA weights in Hugging Face PEFT's layout
//! (`adapter_config.json` + `adapter_model.safetensors`, tensors named
//! `base_model.model.<module>.lora_A.weight` for a `BertModel` base, or for a
//! `LlamaForCausalLM`/`Qwen2ForCausalLM` one from an instruction-tuned adapter), and a plain
//! model with the LoRA updates folded into the base weights (`W + (α/r) B A`) — for an
//! instruction-tuned decoder, a Hugging Face model directory (config, safetensors, tokenizer,
//! chat template).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::classifier::{META_FILE, ModelMeta};
use crate::fs_atomic::{replace_dir, write_synced};
use crate::peft::PeftSpec;
use crate::weights::to_safetensors_bytes;
use crate::{CoreError, Result};

/// A run directory's `best/`, or the directory itself when it is a model.
pub fn model_dir_of(path: &Path) -> PathBuf {
    if path.join(META_FILE).exists() { path.to_path_buf() } else { path.join("best") }
}

pub(crate) fn read_model(dir: &Path) -> Result<(ModelMeta, BTreeMap<String, Tensor>)> {
    let meta = crate::classifier::read_meta(dir)?;
    let tensors = crate::classifier::load_weights(dir, &meta)?.into_iter().collect();
    Ok((meta, tensors))
}

pub(crate) fn stage(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("export");
    let staging = out.with_file_name(format!(".{name}.staging-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(CoreError::io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(CoreError::io(&staging))?;
    Ok(staging)
}

fn lora_params(meta: &ModelMeta, dir: &Path) -> Result<(usize, f64, f64, Vec<String>, usize)> {
    match &meta.peft {
        PeftSpec::Lora { rank, alpha, dropout, target_modules, first_layer } => {
            Ok((*rank, *alpha, *dropout, target_modules.clone(), *first_layer))
        }
        other => Err(CoreError::file(
            dir,
            format!("the model was trained with {}, not LoRA; only LoRA exports to PEFT or merges", method_name(other)),
        )),
    }
}

fn method_name(spec: &PeftSpec) -> &'static str {
    match spec {
        PeftSpec::None => "no adapters (full or frozen fine-tuning)",
        PeftSpec::Adapter { .. } => "bottleneck adapters",
        PeftSpec::Lora { .. } => "LoRA",
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (the LoRA tensors for a
/// `BertModel` base) plus `classifier_head.safetensors` and `tuneforge.json` into `out`.
/// `model` is a model directory or a run directory (its `best/`).
pub fn export_peft(model: &Path, out: &Path) -> Result<()> {
    let model_dir = &model_dir_of(model);
    if crate::sft::is_adapter_dir(model_dir) {
        return export_lm_peft(model_dir, out);
    }
    let (meta, tensors) = read_model(model_dir)?;
    let (rank, alpha, dropout, targets, first_layer) = lora_params(&meta, model_dir)?;
    if let Some(k) = meta.trained_last_layers {
        return Err(CoreError::file(
            model_dir,
            format!(
                "the run also trained the base weights of the last {k} layers, which PEFT's LoRA files cannot \
                 carry; use `tuneforge export --merged`"
            ),
        ));
    }
    let n_layers = tensors.keys().filter_map(|k| crate::bert::BertEncoder::layer_of(k)).max().map_or(0, |m| m + 1);
    let mut config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": meta.base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    // BertModel's pooler is not part of tuneforge's classifier; keep PEFT from adding LoRA there.
    if targets.iter().any(|t| t == "dense") {
        config["exclude_modules"] = serde_json::json!(["pooler.dense"]);
    }
    if first_layer > 0 {
        config["layers_to_transform"] = serde_json::json!((first_layer..n_layers).collect::<Vec<_>>());
        config["layers_pattern"] = serde_json::json!("layer");
    }
    let lora: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k.contains(".lora_A.") || k.contains(".lora_B."))
        .map(|(k, t)| (format!("base_model.model.{k}"), t.clone()))
        .collect();
    let head: Vec<(String, Tensor)> =
        tensors.iter().filter(|(k, _)| k.starts_with("classifier.")).map(|(k, t)| (k.clone(), t.clone())).collect();
    let staging = stage(out)?;
    let json = serde_json::to_vec_pretty(&config).map_err(|e| CoreError::file(out, e.to_string()))?;
    write_synced(&staging.join("adapter_config.json"), &json)?;
    write_synced(&staging.join("adapter_model.safetensors"), &to_safetensors_bytes(&lora)?)?;
    write_synced(&staging.join("classifier_head.safetensors"), &to_safetensors_bytes(&head)?)?;
    let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| CoreError::file(out, e.to_string()))?;
    write_synced(&staging.join(META_FILE), &meta_json)?;
    replace_dir(&staging, out)
}

/// Writes a model directory with every LoRA update folded into its base weight; it loads in
/// `eval`, `predict` and the server like any tuneforge model, without LoRA. `model` is a
/// model directory or a run directory (its `best/`).
pub fn export_merged(model: &Path, out: &Path) -> Result<()> {
    let model_dir = &model_dir_of(model);
    if crate::sft::is_adapter_dir(model_dir) {
        return export_lm_merged(model_dir, out);
    }
    let (mut meta, mut tensors) = read_model(model_dir)?;
    lora_params(&meta, model_dir)?;
    merge_lora(&mut meta, &mut tensors, model_dir)?;
    let staging = stage(out)?;
    for file in ["config.json", "tokenizer.json"] {
        let from = model_dir.join(file);
        let bytes = std::fs::read(&from).map_err(CoreError::io(&from))?;
        write_synced(&staging.join(file), &bytes)?;
    }
    copy_model_plugins(model_dir, &staging)?;
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_synced(&staging.join("model.safetensors"), &to_safetensors_bytes(&list)?)?;
    let meta_json = serde_json::to_vec_pretty(&meta).map_err(|e| CoreError::file(out, e.to_string()))?;
    write_synced(&staging.join(META_FILE), &meta_json)?;
    replace_dir(&staging, out)
}

/// Folds every LoRA update into its base weight (`W + (α/r) B A`) and clears the model's
/// PEFT spec; a model without LoRA is left as it is.
pub(crate) fn merge_lora(meta: &mut ModelMeta, tensors: &mut BTreeMap<String, Tensor>, dir: &Path) -> Result<()> {
    if !matches!(meta.peft, PeftSpec::Lora { .. }) {
        return Ok(());
    }
    let (rank, alpha, ..) = lora_params(meta, dir)?;
    fold_lora(tensors, alpha / rank as f64)?;
    meta.peft = PeftSpec::None;
    Ok(())
}

/// Replaces every `<m>.lora_A.weight`/`<m>.lora_B.weight` pair by its update folded into
/// `<m>.weight`: `W + scale · B A`.
fn fold_lora(tensors: &mut BTreeMap<String, Tensor>, scale: f64) -> Result<()> {
    let modules: Vec<String> =
        tensors.keys().filter_map(|k| k.strip_suffix(".lora_A.weight").map(str::to_owned)).collect();
    for m in modules {
        let missing = |what: &str| CoreError::Param { name: format!("{m}.{what}"), message: "is missing".into() };
        let a = tensors.remove(&format!("{m}.lora_A.weight")).ok_or_else(|| missing("lora_A.weight"))?;
        let b = tensors.remove(&format!("{m}.lora_B.weight")).ok_or_else(|| missing("lora_B.weight"))?;
        let w = tensors.get(&format!("{m}.weight")).ok_or_else(|| missing("weight"))?;
        let merged = (w + (b.matmul(&a)? * scale)?)?;
        tensors.insert(format!("{m}.weight"), merged);
    }
    Ok(())
}

/// An instruction-tuned adapter: its base model (a source), its LoRA settings and tensors.
struct LmAdapter {
    base_model: String,
    rank: usize,
    alpha: f64,
    dropout: f64,
    targets: Vec<String>,
    first_layer: usize,
    tensors: BTreeMap<String, Tensor>,
}

fn read_lm_adapter(dir: &Path) -> Result<LmAdapter> {
    let meta: crate::sft::AdapterMeta = crate::classifier::read_json(&dir.join(META_FILE))?;
    let PeftSpec::Lora { rank, alpha, dropout, target_modules, first_layer } = meta.peft else {
        return Err(CoreError::file(dir, format!("was tuned with {}, not LoRA", method_name(&meta.peft))));
    };
    Ok(LmAdapter {
        base_model: meta.base_model,
        rank,
        alpha,
        dropout,
        targets: target_modules,
        first_layer,
        tensors: crate::weights::load_safetensors(&dir.join(crate::sft::ADAPTER_FILE))?.into_iter().collect(),
    })
}

/// PEFT's files for an instruction-tuned decoder: `task_type` `CAUSAL_LM`, the LoRA tensors
/// under `base_model.model.` (the names of `LlamaForCausalLM`/`Qwen2ForCausalLM`).
fn export_lm_peft(dir: &Path, out: &Path) -> Result<()> {
    let a = read_lm_adapter(dir)?;
    let mut config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": a.base_model,
        "r": a.rank,
        "lora_alpha": a.alpha,
        "lora_dropout": a.dropout,
        "target_modules": a.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    if a.first_layer > 0 {
        let mut layers: Vec<usize> = a.tensors.keys().filter_map(|k| crate::llama::DecoderModel::layer_of(k)).collect();
        layers.sort_unstable();
        layers.dedup();
        config["layers_to_transform"] = serde_json::json!(layers);
        config["layers_pattern"] = serde_json::json!("layers");
    }
    let lora: Vec<(String, Tensor)> =
        a.tensors.into_iter().map(|(k, t)| (format!("base_model.model.{k}"), t)).collect();
    let staging = stage(out)?;
    let json = serde_json::to_vec_pretty(&config).map_err(|e| CoreError::file(out, e.to_string()))?;
    write_synced(&staging.join("adapter_config.json"), &json)?;
    write_synced(&staging.join("adapter_model.safetensors"), &to_safetensors_bytes(&lora)?)?;
    replace_dir(&staging, out)
}

/// A Hugging Face model directory of the tuned decoder: `config.json` (with its
/// `architectures`), `model.safetensors` (the base's weights, dequantised from a GGUF file,
/// with the LoRA updates folded in), `tokenizer.json` and `tokenizer_config.json` with the
/// chat template. `generate`, `chat`, `eval` and Hugging Face transformers load it.
fn export_lm_merged(dir: &Path, out: &Path) -> Result<()> {
    let a = read_lm_adapter(dir)?;
    let source = crate::ModelSource::parse(&a.base_model)?
        .resolve()
        .map_err(|e| CoreError::file(dir, format!("its base model `{}`: {e}", a.base_model)))?;
    let base = crate::sft::Base::load(&source, candle_core::DType::F32)?;
    let mut tensors: BTreeMap<String, Tensor> = base.weights.into_iter().collect();
    tensors.extend(a.tensors);
    fold_lora(&mut tensors, a.alpha / a.rank as f64)?;
    let mut config = serde_json::to_value(&base.config).map_err(|e| CoreError::file(out, e.to_string()))?;
    let arch = if base.config.model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
    config["architectures"] = serde_json::json!([arch]);
    config["torch_dtype"] = serde_json::json!("float32");
    let tokenizer = base.tokenizer.to_string(true).map_err(|e| CoreError::file(out, format!("the tokenizer: {e}")))?;
    let tokenizer_config = serde_json::json!({ "chat_template": base.chat.jinja() });
    let staging = stage(out)?;
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).map_err(|e| CoreError::file(out, e.to_string()));
    write_synced(&staging.join("config.json"), &pretty(&config)?)?;
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_synced(&staging.join("model.safetensors"), &to_safetensors_bytes(&list)?)?;
    write_synced(&staging.join("tokenizer.json"), tokenizer.as_bytes())?;
    write_synced(&staging.join("tokenizer_config.json"), &pretty(&tokenizer_config)?)?;
    replace_dir(&staging, out)
}

/// Copies the inference plugins a model carries (`plugins.json`, `plugins/`) into `to`.
pub(crate) fn copy_model_plugins(from: &Path, to: &Path) -> Result<()> {
    let list = from.join(crate::MODEL_PLUGINS_FILE);
    if !list.exists() {
        return Ok(());
    }
    let bytes = std::fs::read(&list).map_err(CoreError::io(&list))?;
    write_synced(&to.join(crate::MODEL_PLUGINS_FILE), &bytes)?;
    let dir = from.join("plugins");
    let entries = std::fs::read_dir(&dir).map_err(CoreError::io(&dir))?;
    for entry in entries {
        let entry = entry.map_err(CoreError::io(&dir))?;
        let name = entry.file_name();
        for file in ["plugin.wasm", "plugin.toml"] {
            let src = entry.path().join(file);
            let bytes = std::fs::read(&src).map_err(CoreError::io(&src))?;
            let dst_dir = to.join("plugins").join(&name);
            std::fs::create_dir_all(&dst_dir).map_err(CoreError::io(&dst_dir))?;
            write_synced(&dst_dir.join(file), &bytes)?;
        }
    }
    Ok(())
}
