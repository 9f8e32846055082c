//! Classification metrics from (gold, predicted) class ids: accuracy, macro-F1, per-class
//! precision/recall/F1 and the confusion matrix (rows: gold, columns: predicted).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold examples of this class.
    pub support: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    pub n: u64,
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 over classes that occur in gold or predictions.
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    pub confusion: Vec<Vec<u64>>,
}

impl ClassificationMetrics {
    /// Metrics for `gold[i]` vs `predicted[i]` over `labels`. A gold id of `None` (a label the
    /// model does not know) counts as a miss and is left out of the confusion matrix.
    pub fn compute(labels: &[String], gold: &[Option<usize>], predicted: &[usize]) -> Self {
        let k = labels.len();
        let mut confusion = vec![vec![0u64; k]; k];
        let mut correct = 0u64;
        for (g, &p) in gold.iter().zip(predicted) {
            if let Some(g) = *g {
                confusion[g][p] += 1;
                if g == p {
                    correct += 1;
                }
            }
        }
        let n = gold.len() as u64;
        let mut per_class = Vec::with_capacity(k);
        let (mut f1_sum, mut f1_count) = (0.0, 0);
        for (c, label) in labels.iter().enumerate() {
            let tp = confusion[c][c] as f64;
            let support: u64 = confusion[c].iter().sum();
            let predicted_c: u64 = confusion.iter().map(|row| row[c]).sum();
            let precision = if predicted_c > 0 { tp / predicted_c as f64 } else { 0.0 };
            let recall = if support > 0 { tp / support as f64 } else { 0.0 };
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            if support > 0 || predicted_c > 0 {
                f1_sum += f1;
                f1_count += 1;
            }
            per_class.push(ClassMetrics { label: label.clone(), precision, recall, f1, support });
        }
        Self {
            n,
            accuracy: if n > 0 { correct as f64 / n as f64 } else { 0.0 },
            macro_f1: if f1_count > 0 { f1_sum / f1_count as f64 } else { 0.0 },
            per_class,
            confusion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checked against scikit-learn's definitions by hand:
    /// gold = [0,0,1,1,2], pred = [0,1,1,1,0]
    /// class 0: P=1/2 R=1/2 F1=1/2; class 1: P=2/3 R=1 F1=0.8; class 2: P=0 R=0 F1=0.
    #[test]
    fn metrics_of_a_small_confusion() {
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let m =
            ClassificationMetrics::compute(&labels, &[Some(0), Some(0), Some(1), Some(1), Some(2)], &[0, 1, 1, 1, 0]);
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.macro_f1 - (0.5 + 0.8 + 0.0) / 3.0).abs() < 1e-12);
        assert_eq!(m.confusion, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]);
        assert_eq!(m.per_class[2].support, 1);
    }

    #[test]
    fn unknown_gold_labels_count_as_misses() {
        let labels: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let m = ClassificationMetrics::compute(&labels, &[Some(0), None], &[0, 0]);
        assert_eq!(m.n, 2);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
    }
}
