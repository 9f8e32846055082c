//! Typed calls into each kind of plugin, with the conversions between host types and the
//! generated WIT types, and the checks on what a plugin returns.

use crate::PluginError;
use crate::bindings::types_api;
use crate::bindings::{augment, loss, metric};
use crate::runtime::{KindBindings, PluginInstance};

/// The gradient and value a loss plugin returned, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct LossAnswer {
    pub value: f32,
    pub grad: Vec<f32>,
}

fn wrong_kind(p: &PluginInstance, function: &str) -> PluginError {
    PluginError::Call {
        plugin: p.name().into(),
        function: function.into(),
        cause: format!("is a {} plugin, not one with `{function}`", p.kind()),
    }
}

fn guest_err(p: &PluginInstance, function: &str, e: types_api::PluginError) -> PluginError {
    PluginError::Call {
        plugin: p.name().into(),
        function: function.into(),
        cause: format!("returned an error [{}]: {}", e.code, e.message),
    }
}

fn malformed(p: &PluginInstance, function: &str, what: String) -> PluginError {
    PluginError::Call { plugin: p.name().into(), function: function.into(), cause: format!("returned {what}") }
}

fn first_non_finite(v: &[f32]) -> Option<(usize, f32)> {
    v.iter().copied().enumerate().find(|(_, x)| !x.is_finite())
}

impl PluginInstance {
    /// `loss.compute`: checks that the gradient has `rows * classes` finite values and the
    /// value is finite.
    pub fn compute_loss(
        &mut self,
        rows: usize,
        classes: usize,
        logits: &[f32],
        labels: &[u32],
        texts: &[String],
    ) -> Result<LossAnswer, PluginError> {
        const F: &str = "compute";
        let batch = loss::LossBatch {
            rows: rows as u32,
            classes: classes as u32,
            logits: logits.to_vec(),
            labels: labels.to_vec(),
            texts: texts.to_vec(),
        };
        let answer = self.call(F, |b, store| match b {
            KindBindings::Loss(l) => l.call_compute(store, &batch).map(Some),
            _ => Ok(None),
        })?;
        let out = answer.ok_or_else(|| wrong_kind(self, F))?.map_err(|e| guest_err(self, F, e))?;
        if out.grad.len() != rows * classes {
            return Err(malformed(
                self,
                F,
                format!(
                    "a gradient of {} values for a {rows}x{classes} batch (expected {})",
                    out.grad.len(),
                    rows * classes
                ),
            ));
        }
        if let Some((i, x)) = first_non_finite(&out.grad) {
            return Err(malformed(
                self,
                F,
                format!("a non-finite gradient ({x} at row {}, class {})", i / classes, i % classes),
            ));
        }
        if !out.value.is_finite() {
            return Err(malformed(self, F, format!("a non-finite loss value ({})", out.value)));
        }
        Ok(LossAnswer { value: out.value, grad: out.grad })
    }

    /// `metric.evaluate`: every score must be finite and named.
    pub fn evaluate_metric(
        &mut self,
        rows: usize,
        classes: usize,
        probabilities: &[f32],
        labels: &[u32],
    ) -> Result<Vec<(String, f64)>, PluginError> {
        const F: &str = "evaluate";
        let predictions = metric::Predictions {
            rows: rows as u32,
            classes: classes as u32,
            probabilities: probabilities.to_vec(),
            labels: labels.to_vec(),
        };
        let answer = self.call(F, |b, store| match b {
            KindBindings::Metric(m) => m.call_evaluate(store, &predictions).map(Some),
            _ => Ok(None),
        })?;
        let scores = answer.ok_or_else(|| wrong_kind(self, F))?.map_err(|e| guest_err(self, F, e))?;
        for s in &scores {
            if s.name.trim().is_empty() || s.name.len() > 128 {
                return Err(malformed(self, F, "a score with an empty or over-long name".into()));
            }
            if !s.value.is_finite() {
                return Err(malformed(self, F, format!("a non-finite score `{}` = {}", s.name, s.value)));
            }
        }
        Ok(scores.into_iter().map(|s| (s.name, s.value)).collect())
    }

    /// `cleaner.clean`.
    pub fn clean(&mut self, text: &str) -> Result<String, PluginError> {
        const F: &str = "clean";
        let answer = self.call(F, |b, store| match b {
            KindBindings::Cleaner(c) => c.call_clean(store, text).map(Some),
            _ => Ok(None),
        })?;
        answer.ok_or_else(|| wrong_kind(self, F))?.map_err(|e| guest_err(self, F, e))
    }

    /// `augment.augment`: new `(text, label)` pairs.
    pub fn augment(
        &mut self,
        text: &str,
        label: Option<&str>,
        seed: u64,
    ) -> Result<Vec<(String, Option<String>)>, PluginError> {
        const F: &str = "augment";
        let example = augment::Example { text: text.to_string(), label: label.map(str::to_string) };
        let answer = self.call(F, |b, store| match b {
            KindBindings::Augment(a) => a.call_augment(store, &example, seed).map(Some),
            _ => Ok(None),
        })?;
        let out = answer.ok_or_else(|| wrong_kind(self, F))?.map_err(|e| guest_err(self, F, e))?;
        Ok(out.into_iter().map(|e| (e.text, e.label)).collect())
    }

    /// `features.describe`.
    pub fn feature_names(&mut self) -> Result<Vec<String>, PluginError> {
        const F: &str = "describe";
        let answer = self.call(F, |b, store| match b {
            KindBindings::Features(x) => x.call_describe(store).map(Some),
            _ => Ok(None),
        })?;
        answer.ok_or_else(|| wrong_kind(self, F))
    }

    /// `features.extract`: exactly `expected` finite values.
    pub fn extract_features(&mut self, record_json: &str, expected: usize) -> Result<Vec<f32>, PluginError> {
        const F: &str = "extract";
        let answer = self.call(F, |b, store| match b {
            KindBindings::Features(x) => x.call_extract(store, record_json).map(Some),
            _ => Ok(None),
        })?;
        let v = answer.ok_or_else(|| wrong_kind(self, F))?.map_err(|e| guest_err(self, F, e))?;
        if v.len() != expected {
            return Err(malformed(self, F, format!("{} features, `describe` names {expected}", v.len())));
        }
        if let Some((i, x)) = first_non_finite(&v) {
            return Err(malformed(self, F, format!("a non-finite feature ({x} at index {i})")));
        }
        Ok(v)
    }
}
