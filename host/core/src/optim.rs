//! AdamW with decoupled weight decay (Loshchilov & Hutter), PyTorch's update rule:
//!
//! ```text
//! θ ← θ − lr·λ·θ                      (decoupled decay, only for parameters that decay)
//! m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
//! θ ← θ − lr · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)
//! ```
//!
//! The update is one fused pass per parameter over f32 buffers (the moments live in plain
//! vectors, the parameters are read and written once), which avoids the dozen full-size
//! temporaries that composing it from tensor ops allocates every step. Moments and the
//! arithmetic are f32 whatever the parameters' dtype (f32 master state). Checkpoints save and
//! restore the moments exactly.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::{CoreError, Result};

/// Hyper-parameters of [`AdamW`]; the learning rate comes per step from the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Vec<f32>,
    v: Vec<f32>,
}

fn to_f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// AdamW over named variables.
pub struct AdamW {
    slots: Vec<Slot>,
    config: AdamWConfig,
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW").field("config", &self.config).field("step", &self.step).finish()
    }
}

/// Biases and normalisation weights do not decay (the usual BERT recipe).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm") || name.contains("norm."))
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                Ok(Slot { decay: decays(&name), name, var, m: vec![0.0; n], v: vec![0.0; n] })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, config, step: 0 })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Applies one update with gradients by name (a missing gradient leaves a variable as is).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let (bias1, bias2, lr32) = (bias1 as f32, bias2 as f32, lr as f32);
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.name) else { continue };
            let g = to_f32_vec(g)?;
            let mut p = to_f32_vec(slot.var.as_tensor())?;
            if g.len() != p.len() {
                return Err(CoreError::Param {
                    name: slot.name.clone(),
                    message: "gradient and parameter differ in size".into(),
                });
            }
            let decay = if slot.decay { 1.0 - (lr * c.weight_decay) as f32 } else { 1.0 };
            for (((p, g), m), v) in p.iter_mut().zip(&g).zip(slot.m.iter_mut()).zip(slot.v.iter_mut()) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p = *p * decay - lr32 * (*m / bias1) / ((*v / bias2).sqrt() + eps);
            }
            let value = Tensor::from_vec(p, slot.var.shape(), slot.var.device())?.to_dtype(slot.var.dtype())?;
            slot.var.set(&value)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            let shape = s.var.shape();
            out.push((format!("m.{}", s.name), Tensor::from_slice(&s.m, shape, &candle_core::Device::Cpu)?));
            out.push((format!("v.{}", s.name), Tensor::from_slice(&s.v, shape, &candle_core::Device::Cpu)?));
        }
        Ok(out)
    }

    /// Restores moments and the step count saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            for (prefix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let t = tensors.get(&key).ok_or_else(|| CoreError::Param {
                    name: key.clone(),
                    message: "is missing from the optimizer state".into(),
                })?;
                let values = to_f32_vec(t)?;
                if values.len() != slot.len() {
                    return Err(CoreError::Param {
                        name: key,
                        message: "has the wrong shape in the optimizer state".into(),
                    });
                }
                *slot = values;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.values() {
        total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The update against an independent scalar implementation of PyTorch's documented
    /// AdamW algorithm (torch.optim.AdamW, decoupled decay applied before the moment update).
    #[test]
    fn adamw_matches_the_reference_update() -> Result<()> {
        let w = Var::new(&[1.0f64, -2.0, 3.0], &Device::Cpu)?;
        let mut opt =
            AdamW::new(vec![("w".into(), w.clone())], AdamWConfig { weight_decay: 0.1, ..Default::default() })?;
        for g in [[0.5f64, -1.0, 2.0], [0.1, 0.2, -0.3]] {
            let mut grads = HashMap::new();
            grads.insert("w".to_owned(), Tensor::new(&g, &Device::Cpu)?);
            opt.step(&grads, 0.1)?;
        }
        // Independent scalar implementation of the same rule.
        let mut expected = [1.0f64, -2.0, 3.0];
        let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
        for (t, g) in [[0.5f64, -1.0, 2.0], [0.1, 0.2, -0.3]].iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..3 {
                expected[i] *= 1.0 - 0.1 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                expected[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = w.as_tensor().to_vec1::<f64>()?;
        for (a, b) in got.iter().zip(expected) {
            // The optimizer computes in f32.
            assert!((a - b).abs() < 5e-6, "{got:?} vs {expected:?}");
        }
        Ok(())
    }

    #[test]
    fn bias_and_norm_weights_do_not_decay() {
        assert!(decays("encoder.layer.0.attention.self.query.weight"));
        assert!(!decays("encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("embeddings.LayerNorm.weight"));
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let mut grads = HashMap::new();
        grads.insert("a".to_owned(), Tensor::new(&[3.0f32, 4.0], &Device::Cpu)?);
        let before = clip_grad_norm(&mut grads, 1.0)?;
        assert!((before - 5.0).abs() < 1e-6);
        assert!((grad_norm(&grads)? - 1.0).abs() < 1e-5);
        Ok(())
    }
}
