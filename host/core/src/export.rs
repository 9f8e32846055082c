//! Exports of a fine-tuned model: LoRA weights in Hugging Face PEFT's layout
//! (`adapter_config.json` + `adapter_model.safetensors`, tensors named
//! `base_model.model.<module>.lora_A.weight` for a `BertModel` base), and a plain model with
//! the LoRA updates folded into the base weights (`W + (α/r) B A`).

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
    let scale = alpha / rank as f64;
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
    meta.peft = PeftSpec::None;
    Ok(())
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
