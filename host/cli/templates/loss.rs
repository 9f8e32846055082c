//! A loss plugin for tuneforge. The host adds `weight * value` to the training loss and
//! back-propagates `grad` (d value / d logits) into the model.
//!
//! This example is a confidence penalty: the mean negative entropy of the predictions,
//! which discourages over-confident outputs. Change `compute` to your loss.

use tuneforge_plugin_sdk::{Loss, LossBatch, LossOutput, PluginError, config, export_loss};

struct MyLoss {
    /// Read from the experiment's `[plugins.config]`: `scale = 1.0`.
    scale: f32,
}

impl Loss for MyLoss {
    fn new() -> Result<Self, PluginError> {
        let c = config();
        c.reject_unknown(&["scale"])?;
        Ok(Self { scale: c.f64("scale", 1.0)? as f32 })
    }

    fn compute(&mut self, batch: &LossBatch) -> Result<LossOutput, PluginError> {
        let (rows, classes) = (batch.rows as usize, batch.classes as usize);
        let mut grad = vec![0.0f32; rows * classes];
        let mut value = 0.0f32;
        for r in 0..rows {
            let z = &batch.logits[r * classes..(r + 1) * classes];
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = z.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            let p: Vec<f32> = e.iter().map(|v| v / sum).collect();
            // f = sum_j p_j ln p_j (negative entropy); df/dz_k = p_k (ln p_k - f).
            let f: f32 = p.iter().map(|&q| q * q.max(1e-12).ln()).sum();
            value += f;
            for k in 0..classes {
                grad[r * classes + k] = self.scale * p[k] * (p[k].max(1e-12).ln() - f) / rows as f32;
            }
        }
        Ok(LossOutput { value: self.scale * value / rows.max(1) as f32, grad })
    }
}

export_loss!(MyLoss);
