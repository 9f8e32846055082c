//! Evaluation of a classifier on labelled examples: loss, classification metrics and speed.

use std::time::Instant;

use candle_core::{D, DType};
use serde::{Deserialize, Serialize};
use tuneforge_data::{BatchPlan, BatchPlanConfig, EncodedBatch, Example};

use crate::hooks::{Hooks, MetricInput};
use crate::layers::ForwardCtx;
use crate::{ClassificationMetrics, ClassifierModel, Result};

/// Everything `tuneforge eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub n: u64,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Mean cross-entropy over examples whose label the model knows.
    pub loss: f64,
    /// Examples whose gold label is not one of the model's labels (counted as wrong).
    pub unknown_labels: u64,
    pub n_tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub s_per_1k_tokens: f64,
    pub trainable_ratio: f64,
    pub metrics: ClassificationMetrics,
    /// Metrics from metric plugins, `<plugin>:<name>` -> value.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub plugin_metrics: std::collections::BTreeMap<String, f64>,
}

/// Evaluates `model` on `examples` in batches of `batch_size` (grouped by length).
pub fn evaluate(model: &ClassifierModel, examples: &[Example], batch_size: usize) -> Result<EvalReport> {
    evaluate_with(model, examples, batch_size, &mut Hooks::default())
}

/// [`evaluate`], plus the metrics of `hooks`' metric plugins (on the examples whose label the
/// model knows).
pub fn evaluate_with(
    model: &ClassifierModel,
    examples: &[Example],
    batch_size: usize,
    hooks: &mut Hooks,
) -> Result<EvalReport> {
    let labels = model.labels();
    let gold: Vec<Option<usize>> = examples.iter().map(|e| labels.iter().position(|l| *l == e.label)).collect();
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let started = Instant::now();
    let encoded = model.text_encoder().encode(&texts)?;
    let plan = BatchPlan::new(
        encoded.iter().map(|e| e.len()).collect(),
        BatchPlanConfig { batch_size, shuffle: false, group_by_length: true, seed: 0 },
    );
    let label_ids: Vec<u32> = gold.iter().map(|g| g.unwrap_or(0) as u32).collect();
    let features = match &model.meta().fusion {
        None => None,
        Some(f) => {
            if hooks.features.is_none() {
                return Err(crate::CoreError::Plugin {
                    message: format!(
                        "the model fuses features from plugin `{}`; evaluate it with that plugin",
                        f.plugin
                    ),
                });
            }
            Some(hooks.feature_rows(texts.iter().copied(), f.features.len())?)
        }
    };
    let ctx = ForwardCtx::eval();
    let mut predicted = vec![0usize; examples.len()];
    let keep_probs = !hooks.metrics.is_empty();
    let mut probs: Vec<Vec<f32>> = if keep_probs { vec![Vec::new(); examples.len()] } else { Vec::new() };
    let (mut loss_sum, mut loss_n, mut n_tokens) = (0.0f64, 0u64, 0u64);
    for indices in plan.epoch(0) {
        let mut batch = EncodedBatch::collate(&encoded, &indices, Some(&label_ids), model.text_encoder().pad_id());
        if let Some(rows) = &features {
            batch = batch.with_features(rows);
        }
        n_tokens += batch.n_tokens as u64;
        let logits = model.logits(&batch, &ctx)?.to_dtype(DType::F32)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        for (row, &i) in log_probs.iter().zip(&indices) {
            let best =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |a, (j, &v)| if v > a.1 { (j, v) } else { a }).0;
            predicted[i] = best;
            if keep_probs {
                probs[i] = row.iter().map(|v| v.exp()).collect();
            }
            if let Some(g) = gold[i] {
                loss_sum -= row[g] as f64;
                loss_n += 1;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let metrics = ClassificationMetrics::compute(labels, &gold, &predicted);
    let mut plugin_metrics = std::collections::BTreeMap::new();
    if keep_probs {
        let known: Vec<usize> = (0..examples.len()).filter(|&i| gold[i].is_some()).collect();
        let flat: Vec<f32> = known.iter().flat_map(|&i| probs[i].iter().copied()).collect();
        let gold_ids: Vec<u32> = known.iter().map(|&i| gold[i].unwrap_or(0) as u32).collect();
        let input = MetricInput { rows: known.len(), classes: labels.len(), probabilities: &flat, labels: &gold_ids };
        plugin_metrics.extend(hooks.metrics(&input)?);
    }
    Ok(EvalReport {
        n: metrics.n,
        accuracy: metrics.accuracy,
        macro_f1: metrics.macro_f1,
        loss: if loss_n > 0 { loss_sum / loss_n as f64 } else { f64::NAN },
        unknown_labels: gold.iter().filter(|g| g.is_none()).count() as u64,
        n_tokens,
        seconds,
        tokens_per_s: n_tokens as f64 / seconds.max(1e-9),
        s_per_1k_tokens: seconds / (n_tokens.max(1) as f64 / 1000.0),
        trainable_ratio: model.params().trainable_ratio(),
        metrics,
        plugin_metrics,
    })
}
