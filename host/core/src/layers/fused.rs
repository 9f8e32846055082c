//! Fused kernels with their own backward pass: layer norm, softmax over the last dimension
//! and GELU (erf form), as candle custom ops.
//!
//! candle 0.11's fused layer norm and softmax have no backward, and the composed versions
//! cost 8-10 ops, each a pass over memory and a fresh buffer. These do one pass forward and
//! one backward (itself a fused op) per call, on f32 and f64, rows in parallel. The
//! gradient checks in `tests/training.rs` (every parameter against finite differences in
//! f64) run through them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor};
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

/// Maps rows of width `w` of the inputs (all as long as the output) in parallel:
/// `f(input rows, output row)`.
fn map_rows<T: Float + Send + Sync, const N: usize>(
    inputs: [&[T]; N],
    w: usize,
    f: impl Fn([&[T]; N], &mut [T]) + Sync,
) -> Vec<T> {
    let n = inputs.first().map_or(0, |x| x.len());
    let mut out = vec![T::zero(); n];
    out.par_chunks_mut(w * ROWS_PER_TASK).enumerate().for_each(|(c, block)| {
        let base = c * w * ROWS_PER_TASK;
        for (r, o) in block.chunks_mut(w).enumerate() {
            let at = base + r * w;
            f(inputs.map(|x| &x[at..at + o.len()]), o);
        }
    });
    out
}

/// Runs `$body` with each `(storage, layout)` bound as a contiguous slice of one float type
/// (f32 or f64, all the same); the result is that type's storage.
macro_rules! float_op {
    ($name:expr; $( ($s:ident, $l:ident) ),+ ; $body:expr) => {
        match ($( $s, )+) {
            ($( CpuStorage::F32($s), )+) => {
                $( let $s = slice($s, $l, $name)?; )+
                CpuStorage::F32($body)
            }
            ($( CpuStorage::F64($s), )+) => {
                $( let $s = slice($s, $l, $name)?; )+
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: only f32 and f64 (all inputs the same dtype)", $name),
        }
    };
}

// ---------------------------------------------------------------- layer norm

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` over the last dimension.
///
/// On the CPU in f32/f64 this is one fused op; elsewhere (CUDA, bf16) the composed form of
/// differentiable primitives, with the statistics in f32 whatever `x`'s dtype.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused_here(x) {
        return layer_norm_composed(x, gamma, beta, eps);
    }
    Ok(x.contiguous()?.apply_op3(gamma, beta, LayerNormOp { eps })?)
}

/// True where the fused CPU ops apply: CPU tensors in f32 or f64.
fn fused_here(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The compute dtype of the composed forms: f32 for half types, else `x`'s own.
fn wide(x: &Tensor) -> DType {
    match x.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Layer norm composed of differentiable primitives (the reference, and the CUDA path).
pub fn layer_norm_composed(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xw = x.to_dtype(wide(x))?;
    let hidden = xw.dim(D::Minus1)? as f64;
    let mean = (xw.sum_keepdim(D::Minus1)? / hidden)?;
    let centred = xw.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / hidden)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let out = normed.broadcast_mul(&gamma.to_dtype(xw.dtype())?)?.broadcast_add(&beta.to_dtype(xw.dtype())?)?;
    Ok(out.to_dtype(dtype)?)
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

/// Rows of `x` normalised, then `* g + b` when given.
fn normalize_rows<T: Float + Send + Sync>(x: &[T], w: usize, eps: f64, affine: Option<(&[T], &[T])>) -> Vec<T> {
    map_rows([x], w, |r, o| {
        let (mean, rstd) = ln_row_stats(r[0], eps);
        for i in 0..w {
            let xhat = (r[0][i] - mean) * rstd;
            o[i] = match affine {
                Some((g, b)) => xhat * g[i] + b[i],
                None => xhat,
            };
        }
    })
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tuneforge-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(lx);
        if lg.shape().elem_count() != w || lb.shape().elem_count() != w {
            candle_core::bail!("{}: weight and bias must have {w} values, one per column", self.name());
        }
        let out = float_op!(self.name(); (x, lx), (g, lg), (b, lb); normalize_rows(x, w, self.eps, Some((g, b))));
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(gamma, &grad, &LayerNormGradX { eps: self.eps })?)
        } else {
            None
        };
        let w = x.dim(D::Minus1)?;
        let rows = x.elem_count() / w.max(1);
        let grad = grad.reshape((rows, w))?;
        // Column sums as a product with a row of ones (a strided reduction over the rows is
        // slow on the CPU); only for a trainable weight and bias.
        let ones = Tensor::ones((1, rows), grad.dtype(), grad.device())?;
        let dgamma = if gamma.track_op() {
            let xhat = x.apply_op1_no_bwd(&Normalize { eps: self.eps })?;
            Some(ones.matmul(&(&grad * xhat.reshape((rows, w))?)?)?.reshape(w)?)
        } else {
            None
        };
        let dbeta = if beta.track_op() { Some(ones.matmul(&grad)?.reshape(w)?) } else { None };
        Ok((dx, dgamma, dbeta))
    }
}

/// `(x - mean) · rstd` per row (no gradient; used by the layer norm's backward).
struct Normalize {
    eps: f64,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "tuneforge-normalize"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l);
        Ok((float_op!(self.name(); (x, l); normalize_rows(x, w, self.eps, None)), l.shape().clone()))
    }
}

/// The layer norm's input gradient: with `g = dy · gamma` and `x̂` the normalised row,
/// `dx = rstd · (g - mean(g) - x̂ · mean(g · x̂))`.
struct LayerNormGradX {
    eps: f64,
}

fn layer_norm_grad_rows<T: Float + Send + Sync>(x: &[T], gamma: &[T], dy: &[T], w: usize, eps: f64) -> Vec<T> {
    let n = T::from(w).unwrap_or_else(T::one);
    map_rows([x, dy], w, |r, o| {
        let (x, dy) = (r[0], r[1]);
        let (mean, rstd) = ln_row_stats(x, eps);
        let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
        for i in 0..w {
            let g = dy[i] * gamma[i];
            sum_g = sum_g + g;
            sum_gx = sum_gx + g * (x[i] - mean) * rstd;
        }
        let (mg, mgx) = (sum_g / n, sum_gx / n);
        for i in 0..w {
            o[i] = rstd * (dy[i] * gamma[i] - mg - (x[i] - mean) * rstd * mgx);
        }
    })
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "tuneforge-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        d: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(lx);
        let out = float_op!(self.name(); (x, lx), (g, lg), (d, ld); layer_norm_grad_rows(x, g, d, w, self.eps));
        Ok((out, lx.shape().clone()))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension (max-subtracted), with a backward pass.
/// Fused on the CPU in f32/f64; on CUDA candle-nn's fused kernel with our backward
/// (`cuda_ops.rs`); elsewhere composed, in f32 for half types.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda_ops::softmax_last(x);
    }
    if !fused_here(x) {
        let xw = x.to_dtype(wide(x))?;
        let max = xw.max_keepdim(D::Minus1)?.detach();
        let e = xw.broadcast_sub(&max)?.exp()?;
        return Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(x.dtype())?);
    }
    Ok(x.contiguous()?.apply_op1(SoftmaxOp)?)
}

struct SoftmaxOp;

fn softmax_rows<T: Float + Send + Sync>(x: &[T], w: usize) -> Vec<T> {
    map_rows([x], w, |r, o| {
        let max = r[0].iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for i in 0..w {
            o[i] = (r[0][i] - max).exp();
            sum = sum + o[i];
        }
        let inv = sum.recip();
        o.iter_mut().for_each(|v| *v = *v * inv);
    })
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "tuneforge-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l);
        Ok((float_op!(self.name(); (x, l); softmax_rows(x, w)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `dx = y · (dy - Σ dy·y)` per row.
struct SoftmaxGrad;

fn softmax_grad_rows<T: Float + Send + Sync>(y: &[T], dy: &[T], w: usize) -> Vec<T> {
    map_rows([y, dy], w, |r, o| {
        let dot = r[0].iter().zip(r[1]).fold(T::zero(), |a, (&y, &d)| a + y * d);
        for i in 0..w {
            o[i] = r[0][i] * (r[1][i] - dot);
        }
    })
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "tuneforge-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        d: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(ly);
        Ok((float_op!(self.name(); (y, ly), (d, ld); softmax_grad_rows(y, d, w)), ly.shape().clone()))
    }
}

// ---------------------------------------------------------------- GELU

/// GELU, erf form: `x · Φ(x) = 0.5 x (1 + erf(x / √2))`, with a backward pass.
/// Fused on the CPU in f32/f64; elsewhere candle's `gelu_erf` (which has a backward).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused_here(x) {
        return Ok(x.gelu_erf()?);
    }
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

/// Elementwise, in parallel blocks: `out[i] = f(inputs[..][i])`.
fn map_elems<T: Float + Send + Sync, const N: usize>(inputs: [&[T]; N], f: impl Fn([T; N]) -> T + Sync) -> Vec<T> {
    map_rows(inputs, 4096.min(inputs.first().map_or(1, |x| x.len()).max(1)), |r, o| {
        for (i, o) in o.iter_mut().enumerate() {
            *o = f(r.map(|x| x[i]));
        }
    })
}

fn gelu<T: Erf>(v: T) -> T {
    let half = T::from(0.5).unwrap_or_else(T::zero);
    half * v * (T::one() + (v * T::from(std::f64::consts::FRAC_1_SQRT_2).unwrap_or_else(T::zero)).erf())
}

/// `d gelu / dx = Φ(x) + x φ(x)`.
fn gelu_grad<T: Erf>(v: T) -> T {
    let half = T::from(0.5).unwrap_or_else(T::zero);
    let cdf = half * (T::one() + (v * T::from(std::f64::consts::FRAC_1_SQRT_2).unwrap_or_else(T::zero)).erf());
    let pdf = T::from(0.398_942_280_401_432_7).unwrap_or_else(T::zero) * (-half * v * v).exp();
    cdf + v * pdf
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "tuneforge-gelu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((float_op!(self.name(); (x, l); map_elems([x], |[a]| gelu(a))), l.shape().clone()))
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
        x: &CpuStorage,
        lx: &Layout,
        d: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((float_op!(self.name(); (x, lx), (d, ld); map_elems([x, d], |[a, g]| g * gelu_grad(a))), lx.shape().clone()))
    }
}

// ---------------------------------------------------------------- dropout

/// Whether element `key` of a dropout drawn with `seed` is kept: a counter-based hash
/// (splitmix64's finaliser) of the two, compared with `threshold` (`p` on 32 bits). The
/// mask is a function of its coordinates, so it is drawn in parallel and redrawn in the
/// backward pass instead of being stored.
#[inline(always)]
pub(crate) fn kept(seed: u64, threshold: u64, key: u64) -> bool {
    let mut z = seed.wrapping_add(key.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) >= threshold
}

/// The factor `1 / (1 - p)` that inverted dropout scales kept elements by.
pub(crate) fn dropout_scale<T: Float>(p: f64) -> T {
    T::from(1.0 / (1.0 - p).max(1e-12)).unwrap_or_else(T::one)
}

/// `p` as the threshold [`kept`] compares with.
pub(crate) fn dropout_threshold(p: f64) -> u64 {
    (p.clamp(0.0, 1.0) * (u32::MAX as f64)) as u64
}

/// Inverted dropout with the mask drawn from `seed` (see [`kept`]); the backward pass
/// applies the same mask to the gradient. CPU, f32/f64.
pub(crate) fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(DropoutOp { p, seed })?)
}

struct DropoutOp {
    p: f64,
    seed: u64,
}

/// Elements per parallel task.
const DROPOUT_CHUNK: usize = 1 << 14;

fn dropout_values<T: Float + Send + Sync>(x: &[T], p: f64, seed: u64) -> Vec<T> {
    let threshold = dropout_threshold(p);
    let scale = dropout_scale::<T>(p);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(DROPOUT_CHUNK).zip(x.par_chunks(DROPOUT_CHUNK)).enumerate().for_each(|(c, (o, x))| {
        let base = (c * DROPOUT_CHUNK) as u64;
        for (i, (o, &x)) in o.iter_mut().zip(x).enumerate() {
            if kept(seed, threshold, base + i as u64) {
                *o = x * scale;
            }
        }
    });
    out
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "tuneforge-dropout"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((float_op!(self.name(); (x, l); dropout_values(x, self.p, self.seed)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&DropoutOp { p: self.p, seed: self.seed })?))
    }
}

#[cfg(test)]
mod dropout_tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The backward applies the forward's mask and scale: `d/dx Σ w · dropout(x)` is `w`
    /// where the forward kept an element, scaled by `1 / (1 - p)`, and 0 where it dropped one.
    #[test]
    fn dropout_backward_applies_the_forward_mask() -> Result<()> {
        let x = Var::from_tensor(&Tensor::ones(4096, DType::F64, &Device::Cpu)?)?;
        let w = Tensor::randn(0f64, 1.0, 4096, &Device::Cpu)?;
        let y = dropout(&x, 0.3, 11)?;
        let grad = y.mul(&w)?.sum_all()?.backward()?.get(&x).expect("grad").to_vec1::<f64>()?;
        let (y, w) = (y.to_vec1::<f64>()?, w.to_vec1::<f64>()?);
        let dropped = y.iter().filter(|&&v| v == 0.0).count();
        assert!((1000..1460).contains(&dropped), "{dropped} of 4096 dropped at p = 0.3");
        for ((y, g), w) in y.iter().zip(&grad).zip(&w) {
            let expected = if *y == 0.0 { 0.0 } else { w / 0.7 };
            assert!((g - expected).abs() < 1e-12 && (*y == 0.0 || (y - 1.0 / 0.7).abs() < 1e-12));
        }
        assert_ne!(y, dropout(&x, 0.3, 12)?.to_vec1::<f64>()?, "another seed draws another mask");
        Ok(())
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

    /// Elementwise ops over a length that is not a multiple of their block size.
    #[test]
    fn gelu_handles_ragged_lengths() -> Result<()> {
        let x = randn(&[5003], 9)?.to_dtype(DType::F32)?;
        let ours = gelu_erf(&x)?.to_vec1::<f32>()?;
        let candle = x.gelu_erf()?.to_vec1::<f32>()?;
        assert_eq!(ours.len(), 5003);
        for (a, b) in ours.iter().zip(&candle) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
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
