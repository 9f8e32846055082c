//! `classification-metrics`: accuracy, macro and micro F1, per-class recall, top-k accuracy
//! and expected calibration error, from the probabilities the host sends.
//!
//! Config: `top_k` (3), `ece_bins` (10), `per_class_recall` (true).

use tuneforge_plugin_sdk::{Config, Metric, PluginError, Predictions, Score, config, export_metric, label_names};

/// The metric's settings and the label names it reports recall under.
#[derive(Debug, Clone)]
pub struct ClassificationMetrics {
    top_k: usize,
    ece_bins: usize,
    per_class_recall: bool,
    labels: Vec<String>,
}

fn score(name: impl Into<String>, value: f64) -> Score {
    Score { name: name.into(), value }
}

impl ClassificationMetrics {
    pub fn from_config(c: &Config, labels: Vec<String>) -> Result<Self, PluginError> {
        c.reject_unknown(&["top_k", "ece_bins", "per_class_recall"])?;
        let top_k = c.usize("top_k", 3)?;
        let ece_bins = c.usize("ece_bins", 10)?;
        if top_k == 0 || ece_bins == 0 {
            return Err(PluginError::bad_config("`top_k` and `ece_bins` must be at least 1"));
        }
        Ok(Self { top_k, ece_bins, per_class_recall: c.bool("per_class_recall", true)?, labels })
    }

    pub fn compute(&self, rows: usize, classes: usize, probs: &[f32], gold: &[u32]) -> Result<Vec<Score>, PluginError> {
        if probs.len() != rows * classes || gold.len() != rows || gold.iter().any(|&g| g as usize >= classes) {
            return Err(PluginError::bad_input("probabilities, labels and sizes disagree"));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut tp = vec![0usize; classes];
        let mut fp = vec![0usize; classes];
        let mut support = vec![0usize; classes];
        let (mut correct, mut in_top_k) = (0usize, 0usize);
        let mut bins = vec![(0usize, 0.0f64, 0.0f64); self.ece_bins];
        for r in 0..rows {
            let p = &probs[r * classes..(r + 1) * classes];
            let g = gold[r] as usize;
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let pred = order[0];
            support[g] += 1;
            if pred == g {
                correct += 1;
                tp[g] += 1;
            } else {
                fp[pred] += 1;
            }
            if order.iter().take(self.top_k).any(|&c| c == g) {
                in_top_k += 1;
            }
            let confidence = p[pred] as f64;
            let bin = ((confidence * self.ece_bins as f64) as usize).min(self.ece_bins - 1);
            bins[bin].0 += 1;
            bins[bin].1 += confidence;
            bins[bin].2 += f64::from(u8::from(pred == g));
        }
        let n = rows as f64;
        let f1 = |c: usize| {
            let (t, f, s) = (tp[c] as f64, fp[c] as f64, support[c] as f64);
            let precision = if t + f > 0.0 { t / (t + f) } else { 0.0 };
            let recall = if s > 0.0 { t / s } else { 0.0 };
            if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 }
        };
        let present: Vec<usize> = (0..classes).filter(|&c| support[c] > 0 || fp[c] > 0).collect();
        let macro_f1 = present.iter().map(|&c| f1(c)).sum::<f64>() / present.len().max(1) as f64;
        let ece = bins.iter().filter(|b| b.0 > 0).map(|b| (b.1 - b.2).abs() / n).sum::<f64>();
        let mut out = vec![
            score("accuracy", correct as f64 / n),
            score("macro_f1", macro_f1),
            // Single-label: every wrong prediction is one FP and one FN, so micro F1 = accuracy.
            score("micro_f1", correct as f64 / n),
            score(format!("top{}_accuracy", self.top_k), in_top_k as f64 / n),
            score("ece", ece),
        ];
        if self.per_class_recall {
            for c in (0..classes).filter(|&c| support[c] > 0) {
                let name = self.labels.get(c).cloned().unwrap_or_else(|| c.to_string());
                out.push(score(format!("recall:{name}"), tp[c] as f64 / support[c] as f64));
            }
        }
        Ok(out)
    }
}

impl Metric for ClassificationMetrics {
    fn new() -> Result<Self, PluginError> {
        Self::from_config(&config(), label_names())
    }

    fn evaluate(&mut self, p: &Predictions) -> Result<Vec<Score>, PluginError> {
        self.compute(p.rows as usize, p.classes as usize, &p.probabilities, &p.labels)
    }
}

export_metric!(ClassificationMetrics);

#[cfg(test)]
mod tests {
    use super::*;

    fn get(scores: &[Score], name: &str) -> f64 {
        scores.iter().find(|s| s.name == name).map(|s| s.value).unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn hand_checked_scores() {
        let m = ClassificationMetrics::from_config(
            &Config::from_pairs([("top_k", "2"), ("ece_bins", "2")]),
            vec!["a".into(), "b".into(), "c".into()],
        )
        .expect("config");
        // Rows: gold a (pred a, 0.9), gold b (pred a, 0.6; b second), gold c (pred c, 0.7), gold c (pred b, 0.5).
        let probs = [0.9, 0.05, 0.05, 0.6, 0.3, 0.1, 0.1, 0.2, 0.7, 0.1, 0.5, 0.4];
        let s = m.compute(4, 3, &probs, &[0, 1, 2, 2]).expect("scores");
        assert_eq!(get(&s, "accuracy"), 0.5);
        assert_eq!(get(&s, "top2_accuracy"), 1.0);
        // F1: a = 2*(1/2*1)/(1.5) = 2/3; b = 0; c = 2*(1*0.5)/1.5 = 2/3.
        assert!((get(&s, "macro_f1") - 4.0 / 9.0).abs() < 1e-12);
        assert_eq!(get(&s, "recall:c"), 0.5);
        // Bins [0,0.5): none; [0.5,1]: all four, mean confidence 0.675, accuracy 0.5.
        assert!((get(&s, "ece") - 0.175).abs() < 1e-6, "{}", get(&s, "ece"));
    }

    #[test]
    fn mismatched_sizes_are_refused() {
        let m = ClassificationMetrics::from_config(&Config::default(), vec![]).expect("config");
        assert!(m.compute(2, 2, &[0.5; 3], &[0, 1]).is_err());
        assert!(m.compute(1, 2, &[0.5; 2], &[7]).is_err());
    }
}
