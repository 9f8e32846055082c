//! A metric plugin for tuneforge: scores on the validation predictions, reported as
//! `<plugin>:<name>` in metrics.jsonl and the run's summary.
//!
//! This example reports the mean confidence (top probability). Change `evaluate`.

use tuneforge_plugin_sdk::{Metric, PluginError, Predictions, Score, export_metric};

struct MyMetric;

impl Metric for MyMetric {
    fn new() -> Result<Self, PluginError> {
        Ok(Self)
    }

    fn evaluate(&mut self, p: &Predictions) -> Result<Vec<Score>, PluginError> {
        let classes = p.classes.max(1) as usize;
        let rows = p.rows as usize;
        let total: f32 =
            p.probabilities.chunks(classes).map(|row| row.iter().copied().fold(0.0f32, f32::max)).sum();
        Ok(vec![Score { name: "mean_confidence".into(), value: f64::from(total) / rows.max(1) as f64 }])
    }
}

export_metric!(MyMetric);
