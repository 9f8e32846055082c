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
//! moments live in one flat f32 buffer on the device and a parameter's update is two of
//! tuneforge's kernels run in place (`tf_adam_moments`, `tf_adam_apply`): no temporaries, no
//! copies. Moments and the arithmetic are f32 whatever the parameters' dtype (f32 master
//! state); gradient clipping is folded into the update as a scale. Checkpoints save and
//! restore the moments exactly.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

#[cfg(any(feature = "cuda", test))]
use tuneforge_kernels::gpu;

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

/// The optimizer state of parameters on a GPU: the moments of every parameter in one flat
/// f32 buffer on the device, each parameter's `m` then its `v`.
struct DeviceState {
    mv: Tensor,
    /// Where each slot's moments start in `mv` (its `m` there, its `v` right after).
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
                let mut total = 0;
                for s in &slots {
                    offsets.push(total);
                    total += 2 * s.var.elem_count();
                }
                Some(DeviceState { mv: Tensor::zeros(total, DType::F32, &d)?, offsets })
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
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (clipping by
    /// `clip_scale` without a pass over the gradients of its own).
    pub fn step_scaled(&mut self, grads: &HashMap<String, Tensor>, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let update = Update {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            lr,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            grad_scale,
            weight_decay: c.weight_decay,
        };
        if let Some(state) = &mut self.device {
            return device_step(&self.slots, state, grads, update);
        }
        let u = update;
        let (b1, b2, eps, scale) = (u.beta1 as f32, u.beta2 as f32, u.eps as f32, u.grad_scale as f32);
        let (bias1, bias2, lr32) = (update.bias1 as f32, update.bias2 as f32, lr as f32);
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
            let decay = update.decay(slot.decay) as f32;
            for (((p, g), m), v) in p.iter_mut().zip(&g).zip(slot.m.iter_mut()).zip(slot.v.iter_mut()) {
                let g = g * scale;
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
        for (i, s) in self.slots.iter().enumerate() {
            let shape = s.var.shape();
            let cpu = &candle_core::Device::Cpu;
            let (m, v) = match &self.device {
                Some(d) => {
                    let n = s.var.elem_count();
                    let part =
                        |at: usize| -> Result<Tensor> { Ok(d.mv.narrow(0, at, n)?.reshape(shape)?.to_device(cpu)?) };
                    (part(d.offsets[i])?, part(d.offsets[i] + n)?)
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
        let mut all = Vec::new();
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
                all.extend(m);
                all.extend(v);
            } else {
                (s.m, s.v) = (m, v);
            }
        }
        if let Some(d) = &mut self.device {
            let n = all.len();
            d.mv = Tensor::from_vec(all, n, d.mv.device())?;
        }
        self.step = step;
        Ok(())
    }
}

/// The scalars of one AdamW step.
#[derive(Debug, Clone, Copy)]
struct Update {
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr: f64,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    bias1: f64,
    bias2: f64,
    grad_scale: f64,
    weight_decay: f64,
}

impl Update {
    /// The factor of the decoupled weight decay, 1 for a parameter that does not decay.
    fn decay(&self, decays: bool) -> f64 {
        if decays { 1.0 - self.lr * self.weight_decay } else { 1.0 }
    }

    /// The two kernel launches of one parameter's update: its moments from the gradient
    /// (in place in its `[m | v]` slice of the state), then the parameter (in place).
    #[cfg(any(feature = "cuda", test))]
    fn kernel_calls(&self, n: usize, decays: bool) -> [gpu::Call; 2] {
        [
            gpu::adam_moments(n, self.beta1, self.beta2, self.grad_scale),
            gpu::adam_apply(n, self.decay(decays), self.lr, self.bias1, self.bias2, self.eps),
        ]
    }
}

/// One AdamW update of every parameter on a GPU: per parameter with a gradient, its
/// moments then its values, each one kernel in place. A parameter without a gradient keeps
/// its value and moments.
#[cfg(feature = "cuda")]
fn device_step(slots: &[Slot], state: &mut DeviceState, grads: &HashMap<String, Tensor>, update: Update) -> Result<()> {
    for (s, &off) in slots.iter().zip(&state.offsets) {
        let Some(g) = grads.get(&s.name) else { continue };
        let n = s.var.elem_count();
        if g.elem_count() != n {
            return Err(CoreError::Param {
                name: s.name.clone(),
                message: "gradient and parameter differ in size".into(),
            });
        }
        let [moments, apply] = update.kernel_calls(n, s.decay);
        let mv = state.mv.narrow(0, off, 2 * n)?;
        mv.inplace_op2(&g.contiguous()?, &InPlace(moments))?;
        s.var.as_tensor().inplace_op2(&mv, &InPlace(apply))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn device_step(slots: &[Slot], _: &mut DeviceState, _: &HashMap<String, Tensor>, _: Update) -> Result<()> {
    Err(CoreError::Param {
        name: slots.first().map(|s| s.name.clone()).unwrap_or_default(),
        message: "lives on a GPU, which this build cannot update (build with `--features cuda`)".into(),
    })
}

/// A kernel call run in place on the first tensor with the second as its input.
#[cfg(feature = "cuda")]
struct InPlace(gpu::Call);

#[cfg(feature = "cuda")]
impl candle_core::InplaceOp2 for InPlace {
    fn name(&self) -> &'static str {
        self.0.kernel
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("{}: a GPU kernel, run on the CPU", self.0.kernel)
    }

    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &candle_core::Layout,
        src: &candle_core::CudaStorage,
        src_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        gpu::run_in_place(&self.0, dst, dst_l, &[(src, src_l)])
    }
}

/// Global L2 norm of the gradients.
///
/// The squared norms are summed where the gradients live and read back once (one device
/// synchronisation per step on a GPU, not one per parameter); on CUDA each gradient's is one
/// kernel into its slot of a vector (instead of a cast, a square, a sum and a copy).
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(norm) = device_grad_norm(grads)? {
        return Ok(norm);
    }
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

/// [`grad_norm`] with `tf_sum_squares` when every gradient is on one CUDA device in f32,
/// f16 or bf16 (None otherwise).
#[cfg(feature = "cuda")]
fn device_grad_norm(grads: &HashMap<String, Tensor>) -> Result<Option<f64>> {
    let Some(first) = grads.values().next() else { return Ok(None) };
    let device = first.device();
    let on_device = |g: &Tensor| g.device().same_device(device) && g.dtype() != DType::F64;
    if !device.is_cuda() || !grads.values().all(on_device) {
        return Ok(None);
    }
    let sums = Tensor::zeros(grads.len(), DType::F32, device)?;
    for (slot, g) in grads.values().enumerate() {
        sums.inplace_op2(&g.contiguous()?, &InPlace(gpu::sum_squares(g.elem_count(), slot)))?;
    }
    Ok(Some(sums.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?.sqrt()))
}

/// The factor that brings gradients of global norm `norm` to at most `max_norm` (1 when
/// they are within it, or when `max_norm` is 0: no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
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
    fn clipping_scales_the_global_norm_down_to_the_bound() -> Result<()> {
        let mut grads = HashMap::new();
        grads.insert("a".to_owned(), Tensor::new(&[3.0f32, 4.0], &Device::Cpu)?);
        let norm = grad_norm(&grads)?;
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((norm * clip_scale(norm, 1.0) - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(norm, 10.0), 1.0);
        assert_eq!(clip_scale(norm, 0.0), 1.0, "0 turns clipping off");
        Ok(())
    }

    /// A scaled step is the step on scaled gradients.
    #[test]
    fn a_scaled_step_is_the_step_on_scaled_gradients() -> Result<()> {
        let run = |scale_in_step: bool| -> Result<Vec<f32>> {
            let w = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?;
            let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default())?;
            // Adam is invariant to one scale of every gradient: the scales differ by step.
            for (g, scale) in [([0.5f32, -1.0, 2.0], 1.0), ([0.1, 0.2, -0.3], 0.25)] {
                let g = Tensor::new(&g, &Device::Cpu)?;
                let grads = |t: Tensor| HashMap::from([("w".to_owned(), t)]);
                if scale_in_step {
                    opt.step_scaled(&grads(g), 0.1, scale)?;
                } else {
                    opt.step(&grads((g * scale)?), 0.1)?;
                }
            }
            Ok(w.as_tensor().to_vec1::<f32>()?)
        };
        assert_eq!(run(true)?, run(false)?);
        Ok(())
    }

    /// The gradient-norm kernel (through the CPU emulation, with the calls
    /// `device_grad_norm` launches) against `grad_norm` on the CPU: gradients of several
    /// sizes (a partial warp, several blocks) each in its slot, f32 and bf16.
    #[test]
    fn the_sum_of_squares_kernel_gives_the_cpu_gradient_norm() -> Result<()> {
        use tuneforge_kernels::gpu::emulated::{self, Elem, bf16};
        let sizes = [3usize, 1000, 257];
        let grads: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(k, n)| (0..*n).map(|i| ((i * 7 + k) % 13) as f32 * 0.1 - 0.6).collect())
            .collect();
        for bf16_grads in [false, true] {
            let mut sums = vec![0.0f32; sizes.len()];
            let mut by_name = HashMap::new();
            for (slot, g) in grads.iter().enumerate() {
                let call = gpu::sum_squares(g.len(), slot);
                let (name, bytes) = if bf16_grads {
                    let g: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
                    ("bf16", bf16::to_bytes(&g))
                } else {
                    ("f32", f32::to_bytes(g))
                };
                sums = f32::from_bytes(&emulated::run_bytes(&call, name, f32::to_bytes(&sums), vec![bytes]));
                let t = Tensor::new(g.as_slice(), &Device::Cpu)?;
                by_name.insert(format!("p{slot}"), if bf16_grads { t.to_dtype(DType::BF16)? } else { t });
            }
            let got = sums.iter().map(|&s| s as f64).sum::<f64>().sqrt();
            let want = grad_norm(&by_name)?;
            assert!((got - want).abs() <= 1e-5 * want, "bf16 {bf16_grads}: kernel {got}, CPU {want}");
            for (slot, g) in grads.iter().enumerate() {
                let want: f64 = by_name[&format!("p{slot}")].to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar()?;
                assert!((sums[slot] as f64 - want).abs() <= 1e-5 * want, "slot {slot} of {} elements", g.len());
            }
        }
        Ok(())
    }

    /// The GPU optimizer's kernels (through the CPU emulation, with the very calls the
    /// device step launches) against the CPU optimizer: parameters of two sizes (one
    /// decaying, one not; 300 elements span two blocks), f32 and bf16 gradients, a step
    /// where one parameter has no gradient, a clipping scale.
    #[test]
    fn the_gpu_update_kernels_match_the_cpu_optimizer() -> Result<()> {
        use tuneforge_kernels::gpu::emulated::{self, bf16};
        let sizes = [("a.weight", 300usize), ("a.bias", 37)];
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        for bf16_grads in [false, true] {
            let init = |n: usize, k: usize| (0..n).map(|i| ((i * 7 + k) % 13) as f32 * 0.1 - 0.6).collect::<Vec<f32>>();
            let vars = sizes
                .iter()
                .enumerate()
                .map(|(k, (name, n))| Ok(((*name).to_owned(), Var::from_vec(init(*n, k), *n, &Device::Cpu)?)))
                .collect::<Result<Vec<_>>>()?;
            let mut cpu = AdamW::new(vars.clone(), config)?;
            let mut params: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, (_, n))| init(*n, k)).collect();
            let mut mv: Vec<Vec<f32>> = sizes.iter().map(|(_, n)| vec![0.0; 2 * n]).collect();
            for step in 1..=3 {
                let scale = if step == 2 { 0.5 } else { 1.0 };
                let mut grads = HashMap::new();
                for (k, (name, n)) in sizes.iter().enumerate() {
                    if step == 3 && k == 1 {
                        continue;
                    }
                    let g: Vec<f32> = (0..*n).map(|i| (((i * 5 + step * 3 + k) % 11) as f32 - 5.0) * 0.07).collect();
                    let g = Tensor::from_vec(g, *n, &Device::Cpu)?;
                    let g = if bf16_grads { g.to_dtype(DType::BF16)? } else { g };
                    grads.insert((*name).to_owned(), g);
                }
                cpu.step_scaled(&grads, 1e-2, scale)?;
                let t = step as i32;
                let update = Update {
                    beta1: config.beta1,
                    beta2: config.beta2,
                    eps: config.eps,
                    lr: 1e-2,
                    bias1: 1.0 - config.beta1.powi(t),
                    bias2: 1.0 - config.beta2.powi(t),
                    grad_scale: scale,
                    weight_decay: config.weight_decay,
                };
                for (k, (name, n)) in sizes.iter().enumerate() {
                    let Some(g) = grads.get(*name) else { continue };
                    let [moments, apply] = update.kernel_calls(*n, decays(name));
                    if bf16_grads {
                        emulated::run_in_place(&moments, &mut mv[k], &[g.to_vec1::<bf16>()?.as_slice()]);
                    } else {
                        emulated::run_in_place(&moments, &mut mv[k], &[g.to_vec1::<f32>()?.as_slice()]);
                    }
                    emulated::run_in_place(&apply, &mut params[k], &[mv[k].as_slice()]);
                }
            }
            for (k, (name, _)) in sizes.iter().enumerate() {
                let want = vars[k].1.as_tensor().to_vec1::<f32>()?;
                let moved = want.iter().zip(init(want.len(), k)).any(|(a, b)| a != &b);
                assert!(moved, "{name} did not move");
                for (i, (a, b)) in params[k].iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}[{i}] (bf16 {bf16_grads}): {a} vs {b}");
                }
            }
            // The moments the kernels kept are the ones a checkpoint saves.
            let state: HashMap<String, Tensor> = cpu.state_tensors()?.into_iter().collect();
            for (k, (name, n)) in sizes.iter().enumerate() {
                let m = state[&format!("m.{name}")].to_vec1::<f32>()?;
                let v = state[&format!("v.{name}")].to_vec1::<f32>()?;
                for (i, (a, b)) in mv[k].iter().zip(m.iter().chain(&v)).enumerate() {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name} moment {i} of {}: {a} vs {b}", 2 * n);
                }
            }
        }
        Ok(())
    }
}
