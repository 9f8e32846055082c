//! AdamW with decoupled weight decay (Loshchilov & Hutter), PyTorch's update rule:
//!
//! ```text
//! θ ← θ − lr·λ·θ                      (decoupled decay, only for parameters that decay)
//! m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
//! θ ← θ − lr · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)
//! ```
//!
//! On the CPU the update is one fused pass per parameter over f32 buffers (the moments live
//! in plain vectors, the parameters are read and written once), which avoids the dozen
//! full-size temporaries that composing it from tensor ops allocates every step. On a GPU the
//! moments stay on the device and the update is composed of tensor ops there. Moments and the
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

/// The optimizer state of parameters on a GPU: the moments of every parameter in two flat f32
/// buffers on the device, so one step is a few dozen kernels whatever the number of
/// parameters (a kernel launch per op and parameter would dominate a small model's step).
struct DeviceState {
    m: Tensor,
    v: Tensor,
    /// 1 where the element's parameter decays, 0 elsewhere.
    decay_mask: Tensor,
    /// Where each slot's elements start in the flat buffers.
    offsets: Vec<usize>,
}

fn to_f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// AdamW over named variables.
pub struct AdamW {
    slots: Vec<Slot>,
    device: Option<DeviceState>,
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
        let gpu = vars.first().map(|(_, v)| v.device().clone()).filter(|d| !d.is_cpu());
        if let Some(d) = &gpu
            && let Some((name, _)) = vars.iter().find(|(_, v)| !v.device().same_device(d))
        {
            return Err(CoreError::Param { name: name.clone(), message: "parameters on different devices".into() });
        }
        let slots: Vec<Slot> = vars
            .into_iter()
            .map(|(name, var)| {
                let n = if gpu.is_some() { 0 } else { var.elem_count() };
                Slot { decay: decays(&name), name, var, m: vec![0.0; n], v: vec![0.0; n] }
            })
            .collect();
        let device = match gpu {
            None => None,
            Some(d) => {
                let mut offsets = Vec::with_capacity(slots.len());
                let mut mask = Vec::new();
                for s in &slots {
                    offsets.push(mask.len());
                    mask.extend(std::iter::repeat_n(if s.decay { 1f32 } else { 0.0 }, s.var.elem_count()));
                }
                let n = mask.len();
                let zeros = Tensor::zeros(n, DType::F32, &d)?;
                Some(DeviceState { m: zeros.clone(), v: zeros, decay_mask: Tensor::from_vec(mask, n, &d)?, offsets })
            }
        };
        Ok(Self { slots, device, config, step: 0 })
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
        let (bias1_32, bias2_32, lr32) = (bias1 as f32, bias2 as f32, lr as f32);
        if let Some(state) = &mut self.device {
            return device_step(&self.slots, state, grads, c, lr, bias1, bias2);
        }
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
                *p = *p * decay - lr32 * (*m / bias1_32) / ((*v / bias2_32).sqrt() + eps);
            }
            let value = Tensor::from_vec(p, slot.var.shape(), slot.var.device())?.to_dtype(slot.var.dtype())?;
            slot.var.set(&value)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for (i, s) in self.slots.iter().enumerate() {
            let shape = s.var.shape();
            let cpu = &candle_core::Device::Cpu;
            let (m, v) = match &self.device {
                Some(d) => {
                    let part = |t: &Tensor| -> Result<Tensor> {
                        Ok(t.narrow(0, d.offsets[i], s.var.elem_count())?.reshape(shape)?.to_device(cpu)?)
                    };
                    (part(&d.m)?, part(&d.v)?)
                }
                None => (Tensor::from_slice(&s.m, shape, cpu)?, Tensor::from_slice(&s.v, shape, cpu)?),
            };
            out.push((format!("m.{}", s.name), m));
            out.push((format!("v.{}", s.name), v));
        }
        Ok(out)
    }

    /// Restores moments and the step count saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        let (mut all_m, mut all_v) = (Vec::new(), Vec::new());
        for s in &mut self.slots {
            let n = s.var.elem_count();
            let mut restored = Vec::with_capacity(2);
            for prefix in ["m", "v"] {
                let key = format!("{prefix}.{}", s.name);
                let t = tensors.get(&key).ok_or_else(|| CoreError::Param {
                    name: key.clone(),
                    message: "is missing from the optimizer state".into(),
                })?;
                let values = to_f32_vec(t)?;
                if values.len() != n {
                    return Err(CoreError::Param {
                        name: key,
                        message: "has the wrong shape in the optimizer state".into(),
                    });
                }
                restored.push(values);
            }
            let (v, m) = (restored.pop().unwrap_or_default(), restored.pop().unwrap_or_default());
            if self.device.is_some() {
                all_m.extend(m);
                all_v.extend(v);
            } else {
                (s.m, s.v) = (m, v);
            }
        }
        if let Some(d) = &mut self.device {
            let device = d.m.device().clone();
            let n = all_m.len();
            d.m = Tensor::from_vec(all_m, n, &device)?;
            d.v = Tensor::from_vec(all_v, n, &device)?;
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW update of every parameter on a GPU through the flat state: the gradients and
/// parameters are concatenated, updated in a handful of kernels, and written back. A
/// parameter without a gradient keeps its value and moments.
fn device_step(
    slots: &[Slot],
    state: &mut DeviceState,
    grads: &HashMap<String, Tensor>,
    c: AdamWConfig,
    lr: f64,
    bias1: f64,
    bias2: f64,
) -> Result<()> {
    let device = state.m.device().clone();
    let missing = slots.iter().any(|s| !grads.contains_key(&s.name));
    let mut gs = Vec::with_capacity(slots.len());
    for s in slots {
        let n = s.var.elem_count();
        match grads.get(&s.name) {
            Some(g) if g.elem_count() != n => {
                return Err(CoreError::Param {
                    name: s.name.clone(),
                    message: "gradient and parameter differ in size".into(),
                });
            }
            Some(g) => gs.push(g.to_dtype(DType::F32)?.flatten_all()?),
            None => gs.push(Tensor::zeros(n, DType::F32, &device)?),
        }
    }
    let ps =
        slots.iter().map(|s| Ok(s.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?)).collect::<Result<Vec<_>>>()?;
    let g = Tensor::cat(&gs, 0)?;
    let p = Tensor::cat(&ps, 0)?;
    let mut m = (state.m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
    let mut v = (state.v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let decay = state.decay_mask.affine(-lr * c.weight_decay, 1.0)?;
    let denom = v.affine(1.0 / bias2, 0.0)?.sqrt()?.affine(1.0, c.eps)?;
    let mut new_p = ((p.mul(&decay)?) - m.affine(lr / bias1, 0.0)?.div(&denom)?)?;
    if missing {
        // 1 where the parameter had a gradient: only those elements take the update.
        let present: Vec<f32> = slots
            .iter()
            .flat_map(|s| std::iter::repeat_n(f32::from(u8::from(grads.contains_key(&s.name))), s.var.elem_count()))
            .collect();
        let keep = Tensor::from_vec(present, p.elem_count(), &device)?;
        let pick = |new: &Tensor, old: &Tensor| -> Result<Tensor> { Ok((old + (new - old)?.mul(&keep)?)?) };
        new_p = pick(&new_p, &p)?;
        m = pick(&m, &state.m)?;
        v = pick(&v, &state.v)?;
    }
    for (s, &off) in slots.iter().zip(&state.offsets) {
        if !grads.contains_key(&s.name) {
            continue;
        }
        let value = new_p.narrow(0, off, s.var.elem_count())?.reshape(s.var.shape())?.to_dtype(s.var.dtype())?;
        s.var.set(&value)?;
    }
    state.m = m;
    state.v = v;
    Ok(())
}

/// Global L2 norm of the gradients.
///
/// The squared norms are summed where the gradients live and read back once (one device
/// synchronisation per step on a GPU, not one per parameter).
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let squares = grads
        .values()
        .map(|g| Ok(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.reshape(1)?))
        .collect::<Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::cat(&squares, 0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
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
