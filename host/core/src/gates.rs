//! Gates: thresholds from the experiment that a model must pass.

use serde::{Deserialize, Serialize};

use crate::EvalReport;
use crate::experiment::GatesConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub name: String,
    pub threshold: f64,
    pub value: f64,
    pub passed: bool,
}

impl std::fmt::Display for GateResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed { "passed" } else { "FAILED" };
        write!(f, "gate {} {verdict}: value {:.4}, threshold {:.4}", self.name, self.value, self.threshold)
    }
}

/// Checks every configured gate against an evaluation.
pub fn check_gates(gates: &GatesConfig, report: &EvalReport) -> Vec<GateResult> {
    let mut out = Vec::new();
    let mut min = |name: &str, threshold: Option<f64>, value: f64| {
        if let Some(t) = threshold {
            out.push(GateResult { name: name.into(), threshold: t, value, passed: value >= t });
        }
    };
    min("min_accuracy", gates.min_accuracy, report.accuracy);
    min("min_macro_f1", gates.min_macro_f1, report.macro_f1);
    let mut max = |name: &str, threshold: Option<f64>, value: f64| {
        if let Some(t) = threshold {
            out.push(GateResult { name: name.into(), threshold: t, value, passed: value <= t });
        }
    };
    max("max_s_per_1k_tokens", gates.max_s_per_1k_tokens, report.s_per_1k_tokens);
    max("max_trainable_ratio", gates.max_trainable_ratio, report.trainable_ratio);
    out
}
