//! Fused kernels with their own backward pass: layer norm, softmax over the last dimension
//! and GELU (erf form), as candle custom ops.
//!
//! candle 0.11's fused layer norm and softmax have no backward, and the composed versions
//! cost 8-10 ops, each a pass over memory and a fresh buffer. These do one pass forward and
//! one backward (itself a fused op) per call, on f32 and f64, rows in parallel. The
//! gradient checks in `tests/training.rs` (every parameter against finite differences in
//! f64) run through them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::Result;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// The contiguous slice of `storage` that `layout` describes.
fn slice<'a, T: candle_core::WithDType>(s: &'a [T], layout: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1).max(1)
}

// ---------------------------------------------------------------- layer norm

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(gamma, beta, LayerNormOp { eps })?)
}

struct LayerNormOp {
    eps: f64,
}

fn ln_row_stats<T: Float>(row: &[T], eps: f64) -> (T, T) {
    let n = T::from(row.len()).unwrap_or_else(T::one);
    let mean = row.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = row.iter().fold(T::zero(), |a, &v| a + (v - mean) * (v - mean)) / n;
    (mean, (var + T::from(eps).unwrap_or_else(T::zero)).sqrt().recip())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tuneforge-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l1);
        let eps = self.eps;
        fn run<T: Float + Send + Sync + candle_core::WithDType>(
            x: &[T],
            g: &[T],
            b: &[T],
            w: usize,
            eps: f64,
        ) -> Vec<T> {
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(w * ROWS_PER_TASK).zip(x.par_chunks(w * ROWS_PER_TASK)).for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(w).zip(x.chunks(w)) {
                    let (mean, rstd) = ln_row_stats(x, eps);
                    for i in 0..w {
                        o[i] = (x[i] - mean) * rstd * g[i] + b[i];
                    }
                }
            });
            out
        }
        let (x, g, b) = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                let (x, g, b) = (slice(x, l1, self.name())?, slice(g, l2, self.name())?, slice(b, l3, self.name())?);
                check_param(g.len(), b.len(), w)?;
                return Ok((CpuStorage::F32(run(x, g, b, w, eps)), l1.shape().clone()));
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => (x, g, b),
            _ => candle_core::bail!("tuneforge-layer-norm: only f32 and f64 (all inputs the same dtype)"),
        };
        let (x, g, b) = (slice(x, l1, self.name())?, slice(g, l2, self.name())?, slice(b, l3, self.name())?);
        check_param(g.len(), b.len(), w)?;
        Ok((CpuStorage::F64(run(x, g, b, w, eps)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(gamma, &grad, &LayerNormGradX { eps: self.eps })?;
        let xhat = x.apply_op1_no_bwd(&Normalize { eps: self.eps })?;
        let w = x.dim(D::Minus1)?;
        let rows = x.elem_count() / w.max(1);
        let dgamma = (grad.reshape((rows, w))? * xhat.reshape((rows, w))?)?.sum(0)?;
        let dbeta = grad.reshape((rows, w))?.sum(0)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

fn check_param(g: usize, b: usize, w: usize) -> candle_core::Result<()> {
    if g != w || b != w {
        candle_core::bail!("tuneforge-layer-norm: weight and bias have {g} and {b} values for rows of {w}");
    }
    Ok(())
}

/// `(x - mean) · rstd` per row (no gradient; used by the layer norm's backward).
struct Normalize {
    eps: f64,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "tuneforge-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l);
        let eps = self.eps;
        fn run<T: Float + Send + Sync>(x: &[T], w: usize, eps: f64) -> Vec<T> {
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(w * ROWS_PER_TASK).zip(x.par_chunks(w * ROWS_PER_TASK)).for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(w).zip(x.chunks(w)) {
                    let (mean, rstd) = ln_row_stats(x, eps);
                    for i in 0..w {
                        o[i] = (x[i] - mean) * rstd;
                    }
                }
            });
            out
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(run(slice(x, l, self.name())?, w, eps)),
            CpuStorage::F64(x) => CpuStorage::F64(run(slice(x, l, self.name())?, w, eps)),
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        Ok((out, l.shape().clone()))
    }
}

/// The layer norm's input gradient: with `g = dy · gamma` and `x̂` the normalised row,
/// `dx = rstd · (g - mean(g) - x̂ · mean(g · x̂))`.
struct LayerNormGradX {
    eps: f64,
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "tuneforge-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l1);
        let eps = self.eps;
        fn run<T: Float + Send + Sync>(x: &[T], gamma: &[T], dy: &[T], w: usize, eps: f64) -> Vec<T> {
            let n = T::from(w).unwrap_or_else(T::one);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(w * ROWS_PER_TASK)
                .zip(x.par_chunks(w * ROWS_PER_TASK).zip(dy.par_chunks(w * ROWS_PER_TASK)))
                .for_each(|(o, (x, dy))| {
                    for (o, (x, dy)) in o.chunks_mut(w).zip(x.chunks(w).zip(dy.chunks(w))) {
                        let (mean, rstd) = ln_row_stats(x, eps);
                        let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
                        for i in 0..w {
                            let g = dy[i] * gamma[i];
                            sum_g = sum_g + g;
                            sum_gx = sum_gx + g * (x[i] - mean) * rstd;
                        }
                        let (mg, mgx) = (sum_g / n, sum_gx / n);
                        for i in 0..w {
                            let xhat = (x[i] - mean) * rstd;
                            o[i] = rstd * (dy[i] * gamma[i] - mg - xhat * mgx);
                        }
                    }
                });
            out
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(d)) => CpuStorage::F32(run(
                slice(x, l1, self.name())?,
                slice(g, l2, self.name())?,
                slice(d, l3, self.name())?,
                w,
                eps,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(d)) => CpuStorage::F64(run(
                slice(x, l1, self.name())?,
                slice(g, l2, self.name())?,
                slice(d, l3, self.name())?,
                w,
                eps,
            )),
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension (max-subtracted), with a backward pass.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(SoftmaxOp)?)
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "tuneforge-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l);
        fn run<T: Float + Send + Sync>(x: &[T], w: usize) -> Vec<T> {
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(w * ROWS_PER_TASK).zip(x.par_chunks(w * ROWS_PER_TASK)).for_each(|(o, x)| {
                for (o, x) in o.chunks_mut(w).zip(x.chunks(w)) {
                    let max = x.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                    let mut sum = T::zero();
                    for i in 0..w {
                        o[i] = (x[i] - max).exp();
                        sum = sum + o[i];
                    }
                    let inv = sum.recip();
                    o.iter_mut().for_each(|v| *v = *v * inv);
                }
            });
            out
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(run(slice(x, l, self.name())?, w)),
            CpuStorage::F64(x) => CpuStorage::F64(run(slice(x, l, self.name())?, w)),
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `dx = y · (dy - Σ dy·y)` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "tuneforge-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l1);
        fn run<T: Float + Send + Sync>(y: &[T], dy: &[T], w: usize) -> Vec<T> {
            let mut out = vec![T::zero(); y.len()];
            out.par_chunks_mut(w * ROWS_PER_TASK)
                .zip(y.par_chunks(w * ROWS_PER_TASK).zip(dy.par_chunks(w * ROWS_PER_TASK)))
                .for_each(|(o, (y, dy))| {
                    for (o, (y, dy)) in o.chunks_mut(w).zip(y.chunks(w).zip(dy.chunks(w))) {
                        let dot = y.iter().zip(dy).fold(T::zero(), |a, (&y, &d)| a + y * d);
                        for i in 0..w {
                            o[i] = y[i] * (dy[i] - dot);
                        }
                    }
                });
            out
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(d)) => {
                CpuStorage::F32(run(slice(y, l1, self.name())?, slice(d, l2, self.name())?, w))
            }
            (CpuStorage::F64(y), CpuStorage::F64(d)) => {
                CpuStorage::F64(run(slice(y, l1, self.name())?, slice(d, l2, self.name())?, w))
            }
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- GELU

/// GELU, erf form: `x · Φ(x) = 0.5 x (1 + erf(x / √2))`, with a backward pass.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GeluOp)?)
}

/// erf: a rational approximation for f32 (max error under 5e-7, vectorisable, no `exp`), the
/// precise one for f64.
trait Erf: Float + Send + Sync {
    fn erf(self) -> Self;
}

impl Erf for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

impl Erf for f32 {
    fn erf(self) -> Self {
        // Odd numerator, even denominator (the minimax fit used by Eigen and XLA); beyond
        // |x| = 4, erf is ±1 in single precision.
        let x = self.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
        p = x2 * p + -2.101_024e-6;
        p = x2 * p + -5.692_506_4e-5;
        p = x2 * p + -7.349_906_3e-4;
        p = x2 * p + -2.954_6e-3;
        p = x2 * p + -1.609_603_3e-2;
        let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
        q = x2 * q + -1.682_827e-3;
        q = x2 * q + -7.373_329e-3;
        q = x2 * q + -1.426_473_9e-2;
        x * p / q
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "tuneforge-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Erf>(x: &[T]) -> Vec<T> {
            let half = T::from(0.5).unwrap_or_else(T::zero);
            let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).unwrap_or_else(T::zero);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = half * v * (T::one() + (v * inv_sqrt2).erf());
                }
            });
            out
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(run(slice(x, l, self.name())?)),
            CpuStorage::F64(x) => CpuStorage::F64(run(slice(x, l, self.name())?)),
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// `dx = dy · (Φ(x) + x φ(x))`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "tuneforge-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Erf>(x: &[T], dy: &[T]) -> Vec<T> {
            let half = T::from(0.5).unwrap_or_else(T::zero);
            let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).unwrap_or_else(T::zero);
            let inv_sqrt_2pi = T::from(0.398_942_280_401_432_7).unwrap_or_else(T::zero);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(dy.par_chunks(4096))).for_each(|(o, (x, dy))| {
                for ((o, &v), &d) in o.iter_mut().zip(x).zip(dy) {
                    let cdf = half * (T::one() + (v * inv_sqrt2).erf());
                    let pdf = inv_sqrt_2pi * (-half * v * v).exp();
                    *o = d * (cdf + v * pdf);
                }
            });
            out
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(d)) => {
                CpuStorage::F32(run(slice(x, l1, self.name())?, slice(d, l2, self.name())?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(d)) => {
                CpuStorage::F64(run(slice(x, l1, self.name())?, slice(d, l2, self.name())?))
            }
            _ => candle_core::bail!("{}: only f32 and f64", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn close(a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
        let a = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let b = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
        Ok(())
    }

    /// Forward values and gradients equal those of the composed ops (which candle
    /// differentiates itself), in f64 and f32.
    #[test]
    fn fused_ops_match_the_composed_ones_forward_and_backward() -> Result<()> {
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-10 } else { 2e-5 };
            let x = Var::from_tensor(&randn(&[3, 5, 24], 1)?.to_dtype(dtype)?)?;
            let g = Var::from_tensor(&(randn(&[24], 2)? + 1.0)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&randn(&[24], 3)?.to_dtype(dtype)?)?;
            let w = randn(&[3, 5, 24], 4)?.to_dtype(dtype)?;
            // Layer norm.
            let composed = {
                let xs = x.as_tensor();
                let mean = (xs.sum_keepdim(D::Minus1)? / 24.0)?;
                let c = xs.broadcast_sub(&mean)?;
                let var = (c.sqr()?.sum_keepdim(D::Minus1)? / 24.0)?;
                c.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(g.as_tensor())?.broadcast_add(b.as_tensor())?
            };
            let fused = layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5)?;
            close(&fused, &composed, tol)?;
            let gc = (composed * &w)?.sum_all()?.backward()?;
            let gf = (fused * &w)?.sum_all()?.backward()?;
            for v in [&x, &g, &b] {
                close(gf.get(v.as_tensor()).expect("grad"), gc.get(v.as_tensor()).expect("grad"), tol * 10.0)?;
            }
            // Softmax.
            let composed = crate::layers::ops::softmax_last(x.as_tensor())?;
            let fused = softmax_last(x.as_tensor())?;
            close(&fused, &composed, tol)?;
            let gc = (composed * &w)?.sum_all()?.backward()?;
            let gf = (fused * &w)?.sum_all()?.backward()?;
            close(gf.get(x.as_tensor()).expect("grad"), gc.get(x.as_tensor()).expect("grad"), tol * 10.0)?;
            // GELU: candle's own erf is good to ~1e-8, so compare at that level (the
            // finite-difference checks of whole models hold ours to f64 precision).
            let tol = tol.max(1e-7);
            let composed = x.as_tensor().gelu_erf()?;
            let fused = gelu_erf(x.as_tensor())?;
            close(&fused, &composed, tol)?;
            let gc = (composed * &w)?.sum_all()?.backward()?;
            let gf = (fused * &w)?.sum_all()?.backward()?;
            close(gf.get(x.as_tensor()).expect("grad"), gc.get(x.as_tensor()).expect("grad"), tol * 10.0)?;
        }
        Ok(())
    }

    #[test]
    fn the_f32_erf_is_within_6e7_of_libm() {
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((f64::from(Erf::erf(x)) - libm::erf(f64::from(x))).abs());
        }
        assert!(worst < 6e-7, "worst error {worst}");
    }
}
