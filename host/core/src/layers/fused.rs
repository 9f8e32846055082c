//! Fused kernels with their own backward pass: layer norm, RMS norm, softmax over the last
//! dimension (with a scale and an attention mask), GELU (erf form), dropout, the bias add
//! and (on CUDA) the embedding lookup, as candle custom ops.
//!
//! candle 0.11's fused layer norm and softmax have no backward, and the composed versions
//! cost 8-10 ops, each a pass over memory and a fresh buffer (on a GPU, broadcasting
//! kernels that compute strided indices per element). These do one pass forward and one
//! backward (itself a fused op) per call: on the CPU in f32 and f64, rows in parallel; on
//! CUDA through tuneforge's kernels (`tuneforge_kernels::gpu`, feature `cuda`) in f32, f64,
//! f16 and bf16, statistics in f32. The gradient checks in `tests/training.rs` (every
//! parameter against finite differences in f64) run through the CPU ops; the tests below run
//! the CUDA kernels' calls through the CPU emulation and compare them with the CPU ops.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;
use tuneforge_kernels::gpu;

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
/// `f(row index, input rows, output row)`.
fn map_rows<T: Float + Send + Sync, const N: usize>(
    inputs: [&[T]; N],
    w: usize,
    f: impl Fn(usize, [&[T]; N], &mut [T]) + Sync,
) -> Vec<T> {
    let n = inputs.first().map_or(0, |x| x.len());
    let mut out = vec![T::zero(); n];
    out.par_chunks_mut(w * ROWS_PER_TASK).enumerate().for_each(|(c, block)| {
        let base = c * w * ROWS_PER_TASK;
        for (r, o) in block.chunks_mut(w).enumerate() {
            let at = base + r * w;
            f(c * ROWS_PER_TASK + r, inputs.map(|x| &x[at..at + o.len()]), o);
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

/// An op's `cuda_fwd` over its inputs `(storage, layout)`: launches the kernel call its
/// `gpu_call` builds from the layouts (tuneforge's kernels, `tuneforge_kernels::gpu`).
macro_rules! cuda_fwd {
    ($( $s:ident $l:ident ),+) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, $( $s: &CudaStorage, $l: &Layout ),+) -> candle_core::Result<(CudaStorage, Shape)> {
            gpu::run(&self.gpu_call(&[$( $l ),+])?, &[$( ($s, $l) ),+])
        }
    };
}

// ---------------------------------------------------------------- layer norm, RMS norm

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` over the last dimension.
///
/// One fused op where `fused_here` (the CPU in f32/f64, CUDA in any float type, with the
/// statistics in f32 there); elsewhere the composed form of differentiable primitives.
/// A weight or bias of another dtype than `x` (f32 master weights under bf16) is cast.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused_here(x) {
        return layer_norm_composed(x, gamma, beta, eps);
    }
    let (gamma, beta) = (same_dtype(gamma, x)?, same_dtype(beta, x)?);
    Ok(x.contiguous()?.apply_op3(&gamma, &beta, LayerNormOp { eps })?)
}

/// `y = x / sqrt(mean(x²) + eps) * gamma` over the last dimension (Llama's RMSNorm); fused
/// where `fused_here`, composed elsewhere, like [`layer_norm`].
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused_here(x) {
        return rms_norm_composed(x, gamma, eps);
    }
    Ok(x.contiguous()?.apply_op2(&same_dtype(gamma, x)?, RmsNormOp { eps })?)
}

/// True where the fused ops apply: CPU tensors in f32 or f64; CUDA tensors of any float
/// type when built with the `cuda` feature (tuneforge's kernels, `tuneforge_kernels::gpu`).
pub(crate) fn fused_here(x: &Tensor) -> bool {
    if x.device().is_cuda() {
        return cfg!(feature = "cuda") && matches!(x.dtype(), DType::F32 | DType::F64 | DType::F16 | DType::BF16);
    }
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `t` in `like`'s dtype (a differentiable cast; `t` itself when it already is).
fn same_dtype(t: &Tensor, like: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == like.dtype() { Ok(t.clone()) } else { t.to_dtype(like.dtype()) }
}

/// The compute dtype of the composed forms: f32 for half types, else `x`'s own.
fn wide(x: &Tensor) -> DType {
    match x.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Layer norm composed of differentiable primitives (the reference, and the path where no
/// fused op applies).
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

/// RMS norm composed of differentiable primitives.
pub fn rms_norm_composed(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let xw = x.to_dtype(wide(x))?;
    let inv = (xw.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(xw.broadcast_mul(&inv)?.broadcast_mul(&gamma.to_dtype(xw.dtype())?)?.to_dtype(x.dtype())?)
}

/// Mean (0 unless `center`) and `1 / sqrt(var + eps)` of a row.
fn row_stats<T: Float>(row: &[T], eps: f64, center: bool) -> (T, T) {
    let n = T::from(row.len()).unwrap_or_else(T::one);
    let mean = if center { row.iter().fold(T::zero(), |a, &v| a + v) / n } else { T::zero() };
    let var = row.iter().fold(T::zero(), |a, &v| a + (v - mean) * (v - mean)) / n;
    (mean, (var + T::from(eps).unwrap_or_else(T::zero)).sqrt().recip())
}

/// Rows of `x` normalised, then `* g` and `+ b` when given.
fn normalize_rows<T: Float + Send + Sync>(
    x: &[T],
    w: usize,
    eps: f64,
    center: bool,
    g: Option<&[T]>,
    b: Option<&[T]>,
) -> Vec<T> {
    map_rows([x], w, |_, r, o| {
        let (mean, rstd) = row_stats(r[0], eps, center);
        for i in 0..w {
            let mut v = (r[0][i] - mean) * rstd;
            if let Some(g) = g {
                v = v * g[i];
            }
            if let Some(b) = b {
                v = v + b[i];
            }
            o[i] = v;
        }
    })
}

fn check_params(name: &str, w: usize, params: &[&Layout]) -> candle_core::Result<()> {
    if params.iter().any(|l| l.shape().elem_count() != w) {
        candle_core::bail!("{name}: weight and bias must have {w} values, one per column");
    }
    Ok(())
}

struct LayerNormOp {
    eps: f64,
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
        check_params(self.name(), w, &[lg, lb])?;
        let out =
            float_op!(self.name(); (x, lx), (g, lg), (b, lb); normalize_rows(x, w, self.eps, true, Some(g), Some(b)));
        Ok((out, lx.shape().clone()))
    }

    cuda_fwd!(x lx, g lg, b lb);

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma, dbeta) = norm_bwd(x, gamma, Some(beta), grad, self.eps, true)?;
        Ok((dx, dgamma, dbeta))
    }
}

struct RmsNormOp {
    eps: f64,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "tuneforge-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(lx);
        check_params(self.name(), w, &[lg])?;
        let out = float_op!(self.name(); (x, lx), (g, lg); normalize_rows(x, w, self.eps, false, Some(g), None));
        Ok((out, lx.shape().clone()))
    }

    cuda_fwd!(x lx, g lg);

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma, _) = norm_bwd(x, gamma, None, grad, self.eps, false)?;
        Ok((dx, dgamma))
    }
}

/// The gradients of a layer norm (`center`, with a bias) or RMS norm with respect to its
/// input, weight and bias, each only when tracked.
fn norm_bwd(
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    grad: &Tensor,
    eps: f64,
    center: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let dx = if x.track_op() { Some(x.apply_op3_no_bwd(gamma, &grad, &NormGradX { eps, center })?) } else { None };
    let w = x.dim(D::Minus1)?;
    let rows = x.elem_count() / w.max(1);
    let grad = grad.reshape((rows, w))?;
    let dgamma = if gamma.track_op() {
        let xhat = x.apply_op1_no_bwd(&Normalize { eps, center })?;
        Some(column_sums(&(&grad * xhat.reshape((rows, w))?)?)?)
    } else {
        None
    };
    let dbeta = match beta {
        Some(b) if b.track_op() => Some(column_sums(&grad)?),
        _ => None,
    };
    Ok((dx, dgamma, dbeta))
}

/// The sums of the columns of `m: [rows, w]`, as a product with a row of ones (a strided
/// reduction over the rows is slow on the CPU; on a GPU it is one GEMM).
fn column_sums(m: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, w) = m.dims2()?;
    Tensor::ones((1, rows), m.dtype(), m.device())?.matmul(m)?.reshape(w)
}

/// `(x - mean) · rstd` per row, `mean` 0 unless `center` (no gradient; used by the norms'
/// backward).
struct Normalize {
    eps: f64,
    center: bool,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "tuneforge-normalize"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l);
        Ok((float_op!(self.name(); (x, l); normalize_rows(x, w, self.eps, self.center, None, None)), l.shape().clone()))
    }

    cuda_fwd!(x l);
}

/// A norm's input gradient: with `g = dy · gamma` and `x̂` the normalised row,
/// `dx = rstd · (g - mean(g) - x̂ · mean(g · x̂))`, the `mean(g)` term only when centred.
/// Inputs `x`, `gamma`, `dy`.
struct NormGradX {
    eps: f64,
    center: bool,
}

fn norm_grad_rows<T: Float + Send + Sync>(x: &[T], gamma: &[T], dy: &[T], w: usize, eps: f64, center: bool) -> Vec<T> {
    let n = T::from(w).unwrap_or_else(T::one);
    map_rows([x, dy], w, |_, r, o| {
        let (x, dy) = (r[0], r[1]);
        let (mean, rstd) = row_stats(x, eps, center);
        let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
        for i in 0..w {
            let g = dy[i] * gamma[i];
            sum_g = sum_g + g;
            sum_gx = sum_gx + g * (x[i] - mean) * rstd;
        }
        let (mg, mgx) = (if center { sum_g / n } else { T::zero() }, sum_gx / n);
        for i in 0..w {
            o[i] = rstd * (dy[i] * gamma[i] - mg - (x[i] - mean) * rstd * mgx);
        }
    })
}

impl CustomOp3 for NormGradX {
    fn name(&self) -> &'static str {
        "tuneforge-norm-grad"
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
        let out = float_op!(self.name(); (x, lx), (g, lg), (d, ld); norm_grad_rows(x, g, d, w, self.eps, self.center));
        Ok((out, lx.shape().clone()))
    }

    cuda_fwd!(x lx, g lg, d ld);
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension (max-subtracted), with a backward pass.
/// Fused where `fused_here`; elsewhere composed, in f32 for half types.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    softmax_scaled(x, 1.0, None)
}

/// `softmax(scale · x + bias)` over the last dimension, the attention's softmax: `x` the
/// scores `[batch, heads, queries, keys]` (or any shape without a bias), `bias` an additive
/// mask that broadcasts to them with one value per head (`[batch or 1, 1, queries or 1,
/// keys]`, or `[queries, keys]`). One fused op where `fused_here` (the mask is read in
/// place, not expanded); composed elsewhere. The bias is not differentiated.
pub fn softmax_scaled(x: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    if fused_here(x) {
        let x = x.contiguous()?;
        match bias {
            None => return Ok(x.apply_op1(SoftmaxOp { scale })?),
            Some(b) => {
                if let Some(rows) = bias_rows(x.dims(), b.dims()) {
                    let b = same_dtype(&b.detach(), &x)?.contiguous()?;
                    return Ok(x.apply_op2(&b, MaskedSoftmaxOp { scale, rows })?);
                }
            }
        }
    }
    let xw = x.to_dtype(wide(x))?;
    let mut v = if scale == 1.0 { xw } else { (xw * scale)? };
    if let Some(b) = bias {
        v = v.broadcast_add(&b.to_dtype(v.dtype())?)?;
    }
    let max = v.max_keepdim(D::Minus1)?.detach();
    let e = v.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(x.dtype())?)
}

/// How a bias of dims `bias` lines up with scores of dims `x` (`[b, h, q, k]`), if the fused
/// op can read it: left-padded to 4 dims it must be `[b or 1, 1, q or 1, k]`.
fn bias_rows(x: &[usize], bias: &[usize]) -> Option<gpu::BiasRows> {
    let &[b, h, q, k] = x else { return None };
    if bias.len() > 4 {
        return None;
    }
    let mut d = [1usize; 4];
    d[4 - bias.len()..].copy_from_slice(bias);
    let ok = (d[0] == 1 || d[0] == b) && d[1] == 1 && (d[2] == 1 || d[2] == q) && d[3] == k;
    ok.then_some(gpu::BiasRows { heads: h, queries: q, per_batch: d[0] != 1, per_query: d[2] != 1 })
}

/// Rows of `softmax(scale · x + bias)`, the bias row of row `r` given by `bias`.
fn softmax_rows<T: Float + Send + Sync>(x: &[T], w: usize, scale: f64, bias: Option<(&[T], gpu::BiasRows)>) -> Vec<T> {
    let s = T::from(scale).unwrap_or_else(T::one);
    map_rows([x], w, |r, x, o| {
        let x = x[0];
        match bias {
            Some((b, rows)) => {
                let b = &b[rows.row(r) * w..][..w];
                o.iter_mut().zip(x.iter().zip(b)).for_each(|(o, (&x, &b))| *o = x * s + b);
            }
            None => o.iter_mut().zip(x).for_each(|(o, &x)| *o = x * s),
        }
        let max = o.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for v in o.iter_mut() {
            *v = (*v - max).exp();
            sum = sum + *v;
        }
        let inv = sum.recip();
        o.iter_mut().for_each(|v| *v = *v * inv);
    })
}

struct SoftmaxOp {
    scale: f64,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "tuneforge-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(l);
        Ok((float_op!(self.name(); (x, l); softmax_rows(x, w, self.scale, None)), l.shape().clone()))
    }

    cuda_fwd!(x l);

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale: self.scale })?))
    }
}

/// `softmax(scale · x + bias)` with the bias's rows given by `rows`; inputs `x`, `bias`.
struct MaskedSoftmaxOp {
    scale: f64,
    rows: gpu::BiasRows,
}

impl CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "tuneforge-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(lx);
        let out = float_op!(self.name(); (x, lx), (b, lb); softmax_rows(x, w, self.scale, Some((b, self.rows))));
        Ok((out, lx.shape().clone()))
    }

    cuda_fwd!(x lx, b lb);

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale: self.scale })?), None))
    }
}

/// `dx = scale · y · (dy - Σ dy·y)` per row; inputs `y`, `dy`.
struct SoftmaxGrad {
    scale: f64,
}

fn softmax_grad_rows<T: Float + Send + Sync>(y: &[T], dy: &[T], w: usize, scale: f64) -> Vec<T> {
    let s = T::from(scale).unwrap_or_else(T::one);
    map_rows([y, dy], w, |_, r, o| {
        let dot = r[0].iter().zip(r[1]).fold(T::zero(), |a, (&y, &d)| a + y * d);
        for i in 0..w {
            o[i] = s * r[0][i] * (r[1][i] - dot);
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
        Ok((float_op!(self.name(); (y, ly), (d, ld); softmax_grad_rows(y, d, w, self.scale)), ly.shape().clone()))
    }

    cuda_fwd!(y ly, d ld);
}

// ---------------------------------------------------------------- rotary embeddings

/// Rotary position embeddings in the halves layout (Llama's, Hugging Face's): for
/// `x: [b, heads, l, d]` and `cos`, `sin: [l, d/2]` (the rows of the positions),
/// `[x₁·cos − x₂·sin, x₁·sin + x₂·cos]` with `x₁`, `x₂` the halves of each row. One fused op
/// where `fused_here` (its backward the inverse rotation, one pass), composed elsewhere.
/// The tables are not differentiated.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, l, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [l, d / 2] || sin.dims() != [l, d / 2] {
        return Err(crate::CoreError::Param {
            name: "rope".into(),
            message: format!("tables {:?} / {:?} for rows {:?}", cos.dims(), sin.dims(), x.dims()),
        });
    }
    let (cos, sin) = (same_dtype(&cos.detach(), x)?, same_dtype(&sin.detach(), x)?);
    if fused_here(x) {
        return Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeOp { inverse: false })?);
    }
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

fn rope_rows<T: Float + Send + Sync>(x: &[T], cos: &[T], sin: &[T], d: usize, inverse: bool) -> Vec<T> {
    let half = d / 2;
    let positions = (cos.len() / half.max(1)).max(1);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d * ROWS_PER_TASK).zip(x.par_chunks(d * ROWS_PER_TASK)).enumerate().for_each(
        |(task, (o, x))| {
            for (r, (o, x)) in o.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                let at = ((task * ROWS_PER_TASK + r) % positions) * half;
                let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                let (o1, o2) = o.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2, s) = (x[i], x[half + i], if inverse { -s[i] } else { s[i] });
                    o1[i] = x1 * c[i] - x2 * s;
                    o2[i] = x1 * s + x2 * c[i];
                }
            }
        },
    );
    out
}

/// Inputs `x: [.., l, d]`, `cos`, `sin: [l, d/2]`; `inverse` rotates back.
struct RopeOp {
    inverse: bool,
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "tuneforge-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        c: &CpuStorage,
        lc: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(lx);
        let out = float_op!(self.name(); (x, lx), (c, lc), (s, ls); rope_rows(x, c, s, d, self.inverse));
        Ok((out, lx.shape().clone()))
    }

    cuda_fwd!(x lx, c lc, s ls);

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &RopeOp { inverse: !self.inverse })?;
        Ok((Some(back), None, None))
    }
}

// ---------------------------------------------------------------- cross-entropy

/// `−log softmax(x)[t]` for each row of logits `x: [rows, classes]` and targets
/// `t: [rows]`: `[rows]` in `x`'s dtype. One fused op where `fused_here` — its backward,
/// `(softmax(x) − one-hot(t)) · dy`, one pass that writes the gradient and nothing else —,
/// composed elsewhere. A target outside the classes is an error (NaN from a GPU kernel).
pub fn cross_entropy(x: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, _) = x.dims2()?;
    if targets.dims() != [rows] {
        return Err(crate::CoreError::Param {
            name: "targets".into(),
            message: format!("have shape {:?} for {rows} rows of logits", targets.dims()),
        });
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    if fused_here(x) {
        return Ok(x.contiguous()?.apply_op2(&targets, CrossEntropyOp)?);
    }
    let xw = x.to_dtype(wide(x))?;
    let max = xw.max_keepdim(D::Minus1)?.detach();
    let z = xw.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = z.gather(&targets.unsqueeze(1)?, 1)?;
    Ok((lse - picked)?.squeeze(1)?.to_dtype(x.dtype())?)
}

/// The max of a row and `Σ exp(x − max)`.
fn row_lse<T: Float>(row: &[T]) -> (T, T) {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    (max, row.iter().fold(T::zero(), |s, &v| s + (v - max).exp()))
}

fn check_targets(t: &[u32], w: usize) -> candle_core::Result<()> {
    match t.iter().find(|&&t| t as usize >= w) {
        Some(bad) => candle_core::bail!("cross-entropy: target {bad} outside the {w} classes"),
        None => Ok(()),
    }
}

fn xent_rows<T: Float + Send + Sync>(x: &[T], t: &[u32], w: usize) -> candle_core::Result<Vec<T>> {
    check_targets(t, w)?;
    Ok(x.par_chunks(w)
        .zip(t.par_iter())
        .map(|(row, &t)| {
            let (max, sum) = row_lse(row);
            sum.ln() + max - row[t as usize]
        })
        .collect())
}

fn xent_grad_rows<T: Float + Send + Sync>(x: &[T], t: &[u32], dy: &[T], w: usize) -> candle_core::Result<Vec<T>> {
    check_targets(t, w)?;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(w).zip(x.par_chunks(w)).zip(t.par_iter().zip(dy.par_iter())).for_each(|((o, row), (&t, &g))| {
        let (max, sum) = row_lse(row);
        let scale = g / sum;
        o.iter_mut().zip(row).for_each(|(o, &v)| *o = (v - max).exp() * scale);
        o[t as usize] = o[t as usize] - g;
    });
    Ok(out)
}

/// The targets of a cross-entropy op (u32).
fn targets<'a>(t: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [u32]> {
    match t {
        CpuStorage::U32(t) => slice(t, l, op),
        _ => candle_core::bail!("{op}: the targets must be u32"),
    }
}

/// Inputs: logits `[rows, classes]`, targets `[rows]` (u32); output `[rows]`.
struct CrossEntropyOp;

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "tuneforge-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w, t) = (last_dim(lx), targets(t, lt, self.name())?);
        let out = match x {
            CpuStorage::F32(x) => CpuStorage::F32(xent_rows(slice(x, lx, self.name())?, t, w)?),
            CpuStorage::F64(x) => CpuStorage::F64(xent_rows(slice(x, lx, self.name())?, t, w)?),
            _ => candle_core::bail!("{}: only f32 and f64 logits", self.name()),
        };
        Ok((out, Shape::from(t.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        t: &CudaStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, _) = rows(&[lx]);
        gpu::run_to(&self.gpu_call(&[lx, lt])?, &[(x, lx), (t, lt)], &Shape::from(rows))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(x.apply_op3_no_bwd(t, &grad.contiguous()?, &CrossEntropyGrad)?), None))
    }
}

/// Inputs: logits, targets (u32), `dy` (`[rows]`); output the logits' gradient.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "tuneforge-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        dy: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w, t, name) = (last_dim(lx), targets(t, lt, self.name())?, self.name());
        let out = match (x, dy) {
            (CpuStorage::F32(x), CpuStorage::F32(dy)) => {
                CpuStorage::F32(xent_grad_rows(slice(x, lx, name)?, t, slice(dy, ld, name)?, w)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(dy)) => {
                CpuStorage::F64(xent_grad_rows(slice(x, lx, name)?, t, slice(dy, ld, name)?, w)?)
            }
            _ => candle_core::bail!("{name}: only f32 and f64 (logits and gradient the same)"),
        };
        Ok((out, lx.shape().clone()))
    }

    cuda_fwd!(x lx, t lt, dy ld);
}

// ---------------------------------------------------------------- bias

/// `x + b` with `b: [w]` repeated over the rows of `x: [..., w]`: one op where
/// `fused_here` (its backward sums the gradient's columns with one product), candle's
/// broadcasting add elsewhere. A bias of another dtype is cast.
pub fn bias_add(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let b = same_dtype(b, x)?;
    if !fused_here(x) || b.rank() != 1 || b.dim(0)? != x.dim(D::Minus1)? {
        return x.broadcast_add(&b);
    }
    x.contiguous()?.apply_op2(&b, BiasAddOp)
}

struct BiasAddOp;

impl CustomOp2 for BiasAddOp {
    fn name(&self) -> &'static str {
        "tuneforge-bias-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = last_dim(lx);
        let out = float_op!(self.name(); (x, lx), (b, lb); map_rows([x], w, |_, r, o| {
            o.iter_mut().zip(r[0].iter().zip(b)).for_each(|(o, (&x, &b))| *o = x + b);
        }));
        Ok((out, lx.shape().clone()))
    }

    cuda_fwd!(x lx, b lb);

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = if b.track_op() {
            let w = b.dim(0)?;
            Some(column_sums(&grad.contiguous()?.reshape((grad.elem_count() / w.max(1), w))?)?)
        } else {
            None
        };
        Ok((x.track_op().then(|| grad.clone()), db))
    }
}

// ---------------------------------------------------------------- embedding

/// Rows `ids` (u32, one dimension) of an embedding table `[rows, w]`: `index_select`, whose
/// backward on CUDA is candle's `index_add` — one block of threads walking every id in turn,
/// 2 ms per table for 4,096 tokens on an H200, longer with the batch. Where the table trains
/// on CUDA this is one op whose backward adds each looked-up row's gradient into its table
/// row with tuneforge's kernel (atomic adds, one warp per row); elsewhere `index_select`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let fused = table.device().is_cuda()
        && fused_here(table)
        && table.track_op()
        && table.rank() == 2
        && ids.rank() == 1
        && ids.dtype() == DType::U32;
    if !fused {
        return table.index_select(ids, 0);
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, EmbeddingOp)
}

struct EmbeddingOp;

/// Rows `ids` of `table` on any backend (its `index_select`), with the output's shape.
fn select_rows<S: candle_core::backend::BackendStorage>(
    table: &S,
    lt: &Layout,
    ids: &S,
    li: &Layout,
) -> candle_core::Result<(S, Shape)> {
    Ok((table.index_select(ids, lt, li, 0)?, Shape::from((li.dims()[0], last_dim(lt)))))
}

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "tuneforge-embedding"
    }

    fn cpu_fwd(
        &self,
        table: &CpuStorage,
        lt: &Layout,
        ids: &CpuStorage,
        li: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        select_rows(table, lt, ids, li)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        table: &CudaStorage,
        lt: &Layout,
        ids: &CudaStorage,
        li: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        select_rows(table, lt, ids, li)
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dw = if table.device().is_cuda() {
            let acc = if grad.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            let dw = Tensor::zeros(table.shape(), acc, table.device())?;
            dw.inplace_op3(ids, &grad, &EmbeddingGrad)?;
            dw.to_dtype(table.dtype())?
        } else {
            table.zeros_like()?.index_add(ids, &grad, 0)?
        };
        Ok((Some(dw), None))
    }
}

/// The table's gradient, added in place into zeros (CUDA only: the CPU's `index_add` is a
/// plain loop already).
struct EmbeddingGrad;

impl candle_core::InplaceOp3 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "tuneforge-embedding-grad"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("{}: a GPU kernel, run on the CPU", self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dw: &mut CudaStorage,
        lw: &Layout,
        ids: &CudaStorage,
        li: &Layout,
        dy: &CudaStorage,
        ld: &Layout,
    ) -> candle_core::Result<()> {
        let call = gpu::embedding_grad(li.dims()[0], last_dim(lw), lw.dims()[0]);
        gpu::run_in_place(&call, dw, lw, &[(ids, li), (dy, ld)])
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
    map_rows(inputs, 4096.min(inputs.first().map_or(1, |x| x.len()).max(1)), |_, r, o| {
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

    cuda_fwd!(x l);

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

    cuda_fwd!(x lx, d ld);
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(g) · u = g σ(g) u` (the gated MLP of Llama and Qwen2), differentiable in both. One
/// fused op where `fused_here` (the backward one pass for each input), composed elsewhere.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fused_here(g) && g.dtype() == u.dtype() && g.dims() == u.dims() {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SwiGluOp)?);
    }
    Ok(((g * candle_nn::ops::sigmoid(g)?)? * u)?)
}

fn sigmoid<T: Float>(v: T) -> T {
    (T::one() + (-v).exp()).recip()
}

/// `d (silu(g) u) / dg · dy`.
fn gate_grad<T: Float>(g: T, u: T, dy: T) -> T {
    let s = sigmoid(g);
    dy * u * s * (T::one() + g * (T::one() - s))
}

/// Inputs `g`, `u`.
struct SwiGluOp;

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "tuneforge-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = float_op!(self.name(); (g, lg), (u, lu); map_elems([g, u], |[g, u]| g * sigmoid(g) * u));
        Ok((out, lg.shape().clone()))
    }

    cuda_fwd!(g lg, u lu);

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        Ok((Some(g.apply_op3_no_bwd(u, &dy, &SwiGluGradGate)?), Some(g.apply_op2_no_bwd(&dy, &SwiGluGradUp)?)))
    }
}

/// `dg = dy · u · σ(g) (1 + g (1 − σ(g)))`; inputs `g`, `u`, `dy`.
struct SwiGluGradGate;

impl CustomOp3 for SwiGluGradGate {
    fn name(&self) -> &'static str {
        "tuneforge-swiglu-grad-gate"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        d: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out =
            float_op!(self.name(); (g, lg), (u, lu), (d, ld); map_elems([g, u, d], |[g, u, d]| gate_grad(g, u, d)));
        Ok((out, lg.shape().clone()))
    }

    cuda_fwd!(g lg, u lu, d ld);
}

/// `du = dy · silu(g)`; inputs `g`, `dy`.
struct SwiGluGradUp;

impl CustomOp2 for SwiGluGradUp {
    fn name(&self) -> &'static str {
        "tuneforge-swiglu-grad-up"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        d: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = float_op!(self.name(); (g, lg), (d, ld); map_elems([g, d], |[g, d]| d * g * sigmoid(g)));
        Ok((out, lg.shape().clone()))
    }

    cuda_fwd!(g lg, d ld);
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
/// applies the same mask to the gradient. Where `fused_here`: the CPU in f32/f64 and CUDA
/// draw the same mask.
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

    cuda_fwd!(x l);

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&DropoutOp { p: self.p, seed: self.seed })?))
    }
}

// ---------------------------------------------------------------- CUDA calls

// Each op's launch of its CUDA kernel (`cuda_fwd`), given its inputs' layouts (checked
// contiguous by the launch); the emulated tests below run the same calls on the CPU.

/// Rows and width of the first layout (normalised over its last dimension); the rest
/// (weights, biases) must hold one value per column.
#[cfg(any(test, feature = "cuda"))]
fn rows_and_params(name: &str, ls: &[&Layout]) -> candle_core::Result<(usize, usize)> {
    let Some((first, params)) = ls.split_first() else { candle_core::bail!("{name}: no input") };
    let w = last_dim(first);
    check_params(name, w, params)?;
    Ok((first.shape().elem_count() / w, w))
}

/// The first layout's rows and width.
#[cfg(any(test, feature = "cuda"))]
fn rows(ls: &[&Layout]) -> (usize, usize) {
    let w = ls.first().map_or(1, |l| last_dim(l));
    (ls.first().map_or(0, |l| l.shape().elem_count()) / w, w)
}

/// The first layout's element count.
#[cfg(any(test, feature = "cuda"))]
fn elems(ls: &[&Layout]) -> usize {
    ls.first().map_or(0, |l| l.shape().elem_count())
}

#[cfg(any(test, feature = "cuda"))]
impl LayerNormOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows_and_params(self.name(), ls)?;
        Ok(gpu::norm_fwd(rows, w, true, true, true, self.eps))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl RmsNormOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows_and_params(self.name(), ls)?;
        Ok(gpu::norm_fwd(rows, w, true, false, false, self.eps))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl Normalize {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows(ls);
        Ok(gpu::norm_fwd(rows, w, false, false, self.center, self.eps))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl NormGradX {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows_and_params(self.name(), &ls[..ls.len().min(2)])?;
        Ok(gpu::norm_grad(rows, w, true, self.center, self.eps))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl SoftmaxOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows(ls);
        Ok(gpu::softmax_fwd(rows, w, self.scale, None))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl MaskedSoftmaxOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows(ls);
        Ok(gpu::softmax_fwd(rows, w, self.scale, Some(self.rows)))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl SoftmaxGrad {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows(ls);
        Ok(gpu::softmax_grad(rows, w, self.scale))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl SwiGluOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        Ok(gpu::swiglu(elems(ls)))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl SwiGluGradGate {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        Ok(gpu::swiglu_grad_gate(elems(ls)))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl SwiGluGradUp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        Ok(gpu::swiglu_grad_up(elems(ls)))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl RopeOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, d) = rows(ls);
        let positions = ls.get(1).map_or(1, |l| l.dims().first().copied().unwrap_or(1));
        Ok(gpu::rope(rows, d / 2, positions, self.inverse))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl CrossEntropyOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows(ls);
        Ok(gpu::xent_fwd(rows, w))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl CrossEntropyGrad {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (rows, w) = rows(ls);
        Ok(gpu::xent_grad(rows, w))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl BiasAddOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        let (_, w) = rows_and_params(self.name(), ls)?;
        Ok(gpu::bias_add(elems(ls), w))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl GeluOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        Ok(gpu::gelu_fwd(elems(ls)))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl GeluGrad {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        Ok(gpu::gelu_grad(elems(ls)))
    }
}

#[cfg(any(test, feature = "cuda"))]
impl DropoutOp {
    fn gpu_call(&self, ls: &[&Layout]) -> candle_core::Result<gpu::Call> {
        Ok(gpu::dropout(elems(ls), self.seed, dropout_threshold(self.p), dropout_scale::<f64>(self.p)))
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

/// The CUDA kernels, run through the CPU emulation (`tuneforge_kernels::gpu::emulated`)
/// with the very calls `cuda_fwd` launches, against the CPU ops: rows that do not fill a
/// block, widths that do not fill a warp, bf16 storage.
#[cfg(test)]
mod gpu_kernel_tests {
    use candle_core::{Device, WithDType};
    use tuneforge_kernels::gpu::emulated::{self, Elem};

    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f64> = (0..shape.iter().product()).map(|_| rng.random_range(-3.0..3.0)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// `call` on the inputs, emulated in `T`; the output as an f64 tensor of `inputs[0]`'s shape.
    fn emulate<T: Elem + WithDType>(call: &gpu::Call, inputs: &[&Tensor]) -> Result<Tensor> {
        let data = inputs
            .iter()
            .map(|t| Ok(t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?))
            .collect::<Result<Vec<Vec<T>>>>()?;
        let out = emulated::run(call, &data.iter().map(Vec::as_slice).collect::<Vec<_>>());
        Ok(Tensor::from_vec(out, inputs[0].shape(), &Device::Cpu)?.to_dtype(DType::F64)?)
    }

    fn close(name: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
        let got = got.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let want = want.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{name}, element {i}: kernel {a}, CPU {b}");
        }
        Ok(())
    }

    /// Runs `check(dtype, tolerance)` for f64, f32 and bf16 (the last against the f32 CPU op).
    fn in_each_dtype(mut check: impl FnMut(DType, f64) -> Result<()>) -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6), (DType::BF16, 2e-2)] {
            check(dtype, tol)?;
        }
        Ok(())
    }

    /// The emulated kernel of the op whose `gpu_call` is `call`, in `dtype` (bf16 runs the
    /// kernel in bf16, the reference in f32).
    fn kernel(
        call: impl FnOnce(&[&Layout]) -> candle_core::Result<gpu::Call>,
        inputs: &[&Tensor],
        dtype: DType,
    ) -> Result<Tensor> {
        let call = call(&inputs.iter().map(|t| t.layout()).collect::<Vec<_>>())?;
        match dtype {
            DType::F64 => emulate::<f64>(&call, inputs),
            DType::F32 => emulate::<f32>(&call, inputs),
            _ => emulate::<emulated::bf16>(&call, inputs),
        }
    }

    /// The emulated kernel (see [`kernel`]) gives `want`, the CPU op's output.
    fn agree(
        name: &str,
        call: impl FnOnce(&[&Layout]) -> candle_core::Result<gpu::Call>,
        inputs: &[&Tensor],
        want: &Tensor,
        dtype: DType,
        tol: f64,
    ) -> Result<()> {
        close(name, &kernel(call, inputs, dtype)?, want, tol)
    }

    fn cpu_dtype(dtype: DType) -> DType {
        if dtype == DType::BF16 { DType::F32 } else { dtype }
    }

    #[test]
    fn norm_kernels_match_the_cpu_ops() -> Result<()> {
        // 7 rows (blocks hold 4), widths below and above a warp's 32 lanes.
        for w in [20, 77] {
            in_each_dtype(|dtype, tol| {
                let cd = cpu_dtype(dtype);
                let x = (randn(&[7, w], 1)? + 0.7)?.to_dtype(cd)?;
                let g = randn(&[w], 2)?.to_dtype(cd)?;
                let b = randn(&[w], 3)?.to_dtype(cd)?;
                let dy = randn(&[7, w], 4)?.to_dtype(cd)?;
                let ln = LayerNormOp { eps: 1e-5 };
                agree(
                    "layer norm",
                    |ls| ln.gpu_call(ls),
                    &[&x, &g, &b],
                    &x.apply_op3_no_bwd(&g, &b, &ln)?,
                    dtype,
                    tol,
                )?;
                let rms = RmsNormOp { eps: 1e-6 };
                agree("RMS norm", |ls| rms.gpu_call(ls), &[&x, &g], &x.apply_op2_no_bwd(&g, &rms)?, dtype, tol)?;
                for center in [true, false] {
                    let n = Normalize { eps: 1e-5, center };
                    agree("normalize", |ls| n.gpu_call(ls), &[&x], &x.apply_op1_no_bwd(&n)?, dtype, tol)?;
                    let grad = NormGradX { eps: 1e-5, center };
                    let want = x.apply_op3_no_bwd(&g, &dy, &grad)?;
                    agree("norm gradient", |ls| grad.gpu_call(ls), &[&x, &g, &dy], &want, dtype, tol * 4.0)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    #[test]
    fn softmax_kernels_match_the_cpu_ops() -> Result<()> {
        in_each_dtype(|dtype, tol| {
            let cd = cpu_dtype(dtype);
            let x = randn(&[2, 3, 5, 37], 5)?.to_dtype(cd)?;
            let dy = randn(&[2, 3, 5, 37], 6)?.to_dtype(cd)?;
            let plain = SoftmaxOp { scale: 0.3 };
            agree("softmax", |ls| plain.gpu_call(ls), &[&x], &x.apply_op1_no_bwd(&plain)?, dtype, tol)?;
            // A padding mask per batch element ([b, 1, 1, k]) and a causal one per query ([q, k]).
            let padding = Tensor::from_vec(
                (0..2 * 37).map(|i| if i % 37 < 30 - 10 * (i / 37) { 0f64 } else { -1e4 }).collect::<Vec<_>>(),
                (2, 1, 1, 37),
                &Device::Cpu,
            )?;
            let causal = Tensor::from_vec(
                (0..5 * 37).map(|i| if i % 37 <= 32 + i / 37 { 0f64 } else { f64::NEG_INFINITY }).collect::<Vec<_>>(),
                (5, 37),
                &Device::Cpu,
            )?;
            for bias in [padding, causal] {
                let bias = bias.to_dtype(cd)?;
                let rows = bias_rows(x.dims(), bias.dims()).expect("a bias the fused op reads");
                let masked = MaskedSoftmaxOp { scale: 0.3, rows };
                let want = x.apply_op2_no_bwd(&bias, &masked)?;
                let composed = softmax_last(
                    &x.broadcast_mul(&Tensor::new(0.3, &Device::Cpu)?.to_dtype(cd)?)?.broadcast_add(&bias)?,
                )?;
                close("masked softmax (CPU op vs composed)", &want, &composed, 1e-5)?;
                agree("masked softmax", |ls| masked.gpu_call(ls), &[&x, &bias], &want, dtype, tol)?;
            }
            let y = x.apply_op1_no_bwd(&plain)?;
            let grad = SoftmaxGrad { scale: 0.3 };
            agree("softmax gradient", |ls| grad.gpu_call(ls), &[&y, &dy], &y.apply_op2_no_bwd(&dy, &grad)?, dtype, tol)
        })
    }

    #[test]
    fn elementwise_kernels_match_the_cpu_ops() -> Result<()> {
        in_each_dtype(|dtype, tol| {
            let cd = cpu_dtype(dtype);
            // Not a multiple of the 256 threads of a block.
            let x = randn(&[5003], 7)?.to_dtype(cd)?;
            let dy = randn(&[5003], 8)?.to_dtype(cd)?;
            // The CPU's f32 erf is a rational approximation (within 6e-7 of libm's).
            let tol = tol.max(if dtype == DType::F32 { 2e-6 } else { 0.0 });
            agree("GELU", |ls| GeluOp.gpu_call(ls), &[&x], &x.apply_op1_no_bwd(&GeluOp)?, dtype, tol)?;
            agree(
                "GELU gradient",
                |ls| GeluGrad.gpu_call(ls),
                &[&x, &dy],
                &x.apply_op2_no_bwd(&dy, &GeluGrad)?,
                dtype,
                tol,
            )?;
            let drop = DropoutOp { p: 0.1, seed: 42 };
            let (got, want) = (kernel(|ls| drop.gpu_call(ls), &[&x], dtype)?, x.apply_op1_no_bwd(&drop)?);
            close("dropout", &got, &want, tol)?;
            let zeros = |t: &Tensor| -> Result<Vec<bool>> {
                Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().map(|v| *v == 0.0).collect())
            };
            assert_eq!(zeros(&got)?, zeros(&want)?, "the GPU draws the CPU's dropout mask");
            let xs = randn(&[7, 45], 9)?.to_dtype(cd)?;
            let b = randn(&[45], 10)?.to_dtype(cd)?;
            agree(
                "bias add",
                |ls| BiasAddOp.gpu_call(ls),
                &[&xs, &b],
                &xs.apply_op2_no_bwd(&b, &BiasAddOp)?,
                dtype,
                tol,
            )
        })
    }

    /// The SwiGLU kernels (value and both input gradients) against the CPU ops.
    #[test]
    fn swiglu_kernels_match_the_cpu_ops() -> Result<()> {
        in_each_dtype(|dtype, tol| {
            let cd = cpu_dtype(dtype);
            let (g, u, dy) = (
                randn(&[3001], 41)?.to_dtype(cd)?,
                randn(&[3001], 42)?.to_dtype(cd)?,
                randn(&[3001], 43)?.to_dtype(cd)?,
            );
            agree("SwiGLU", |ls| SwiGluOp.gpu_call(ls), &[&g, &u], &g.apply_op2_no_bwd(&u, &SwiGluOp)?, dtype, tol)?;
            let want = g.apply_op3_no_bwd(&u, &dy, &SwiGluGradGate)?;
            agree("SwiGLU gate gradient", |ls| SwiGluGradGate.gpu_call(ls), &[&g, &u, &dy], &want, dtype, tol)?;
            let want = g.apply_op2_no_bwd(&dy, &SwiGluGradUp)?;
            agree("SwiGLU up gradient", |ls| SwiGluGradUp.gpu_call(ls), &[&g, &dy], &want, dtype, tol)
        })
    }

    /// The fused SwiGLU against `g σ(g) u` composed, in value and in both gradients.
    #[test]
    fn swiglu_matches_the_composed_form() -> Result<()> {
        use candle_core::Var;
        let g = Var::from_tensor(&(randn(&[4, 9], 44)? * 2.0)?)?;
        let u = Var::from_tensor(&randn(&[4, 9], 45)?)?;
        let w = randn(&[4, 9], 46)?;
        let fused = swiglu(g.as_tensor(), u.as_tensor())?;
        let composed = ((g.as_tensor() * candle_nn::ops::sigmoid(g.as_tensor())?)? * u.as_tensor())?;
        close("SwiGLU", &fused, &composed, 1e-12)?;
        let grads = |y: &Tensor| -> Result<(Tensor, Tensor)> {
            let s = (y * &w)?.sum_all()?.backward()?;
            Ok((s.get(g.as_tensor()).expect("dg").clone(), s.get(u.as_tensor()).expect("du").clone()))
        };
        let ((fg, fu), (cg, cu)) = (grads(&fused)?, grads(&composed)?);
        close("SwiGLU gate gradient", &fg, &cg, 1e-12)?;
        close("SwiGLU up gradient", &fu, &cu, 1e-12)
    }

    /// The rotary-embedding kernel (forward and inverse) against the CPU op: rows over
    /// several positions, heads and batches; a head size whose half is not a warp.
    #[test]
    fn rope_kernel_matches_the_cpu_op() -> Result<()> {
        in_each_dtype(|dtype, tol| {
            let cd = cpu_dtype(dtype);
            let x = randn(&[2, 3, 5, 18], 31)?.to_dtype(cd)?;
            let angles = (randn(&[5, 9], 32)? * 2.0)?;
            let (cos, sin) = (angles.cos()?.to_dtype(cd)?, angles.sin()?.to_dtype(cd)?);
            for inverse in [false, true] {
                let op = RopeOp { inverse };
                let want = x.apply_op3_no_bwd(&cos, &sin, &op)?;
                agree("rope", |ls| op.gpu_call(ls), &[&x, &cos, &sin], &want, dtype, tol)?;
            }
            Ok(())
        })
    }

    /// The fused rotary embeddings against the composed form in value and gradient, and
    /// the inverse rotation undoing the forward one.
    #[test]
    fn rope_matches_the_composed_form() -> Result<()> {
        use candle_core::Var;
        let x = Var::from_tensor(&randn(&[2, 3, 4, 8], 33)?)?;
        let angles = randn(&[4, 4], 34)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let fused = rope(x.as_tensor(), &cos, &sin)?;
        let (x1, x2) = (x.as_tensor().narrow(D::Minus1, 0, 4)?, x.as_tensor().narrow(D::Minus1, 4, 4)?);
        let composed = Tensor::cat(
            &[
                (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?,
                (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?,
            ],
            D::Minus1,
        )?;
        close("rope", &fused, &composed, 1e-12)?;
        let w = randn(&[2, 3, 4, 8], 35)?;
        let grad = |y: &Tensor| -> Result<Tensor> {
            Ok((y * &w)?.sum_all()?.backward()?.get(x.as_tensor()).expect("a gradient").clone())
        };
        close("rope gradient", &grad(&fused)?, &grad(&composed)?, 1e-12)?;
        let back = fused.apply_op3_no_bwd(&cos, &sin, &RopeOp { inverse: true })?;
        close("rope, then its inverse", &back, x.as_tensor(), 1e-12)?;
        Ok(())
    }

    /// The cross-entropy kernels (u32 targets beside the logits, an output of one value
    /// per row) against the CPU op: 7 rows, widths under a warp and over several.
    #[test]
    fn cross_entropy_kernels_match_the_cpu_op() -> Result<()> {
        fn run<T: Elem + WithDType>(call: &gpu::Call, x: &Tensor, t: &[u32], dy: Option<&Tensor>) -> Result<Tensor> {
            let bytes = |t: &Tensor| -> Result<Vec<u8>> { Ok(T::to_bytes(&t.flatten_all()?.to_vec1::<T>()?)) };
            let mut inputs = vec![bytes(x)?, u32::to_bytes(t)];
            let out_len = match dy {
                Some(dy) => {
                    inputs.push(bytes(dy)?);
                    x.elem_count()
                }
                None => t.len(),
            };
            let out = emulated::run_bytes(call, T::NAME, vec![0xff; out_len * T::DTYPE.size_in_bytes()], inputs);
            Ok(Tensor::from_vec(T::from_bytes(&out), out_len, &Device::Cpu)?.to_dtype(DType::F64)?)
        }
        for w in [20, 300] {
            let t: Vec<u32> = (0..7).map(|r| (r * 37 % w) as u32).collect();
            let targets = Tensor::new(t.as_slice(), &Device::Cpu)?;
            in_each_dtype(|dtype, tol| {
                let cd = cpu_dtype(dtype);
                let x = (randn(&[7, w], 21)? * 3.0)?.to_dtype(dtype)?.to_dtype(cd)?;
                let dy = randn(&[7], 22)?.to_dtype(dtype)?.to_dtype(cd)?;
                let want = x.apply_op2_no_bwd(&targets, &CrossEntropyOp)?;
                let want_grad = x.apply_op3_no_bwd(&targets, &dy, &CrossEntropyGrad)?;
                let fwd = CrossEntropyOp.gpu_call(&[x.layout(), targets.layout()])?;
                let grad = CrossEntropyGrad.gpu_call(&[x.layout(), targets.layout(), dy.layout()])?;
                let (x, dy) = (x.to_dtype(dtype)?, dy.to_dtype(dtype)?);
                let (got, got_grad) = match dtype {
                    DType::F64 => (run::<f64>(&fwd, &x, &t, None)?, run::<f64>(&grad, &x, &t, Some(&dy))?),
                    DType::F32 => (run::<f32>(&fwd, &x, &t, None)?, run::<f32>(&grad, &x, &t, Some(&dy))?),
                    _ => (run::<emulated::bf16>(&fwd, &x, &t, None)?, run::<emulated::bf16>(&grad, &x, &t, Some(&dy))?),
                };
                close("cross-entropy", &got, &want, tol)?;
                close("cross-entropy gradient", &got_grad, &want_grad, tol)
            })?;
        }
        Ok(())
    }

    /// The embedding gradient kernel (u32 ids, rows' gradients in f64, f32 or bf16, a table
    /// in the accumulation type) against candle's `index_add`: ids repeated (atomic adds
    /// meeting), a row count that does not fill a block, widths under a warp and over
    /// several, an id outside the table adding nothing; the op's own backward on the CPU
    /// against `index_select`'s.
    #[test]
    fn the_embedding_gradient_kernel_matches_index_add() -> Result<()> {
        use candle_core::Var;
        let (vocab, ids) = (9usize, [3u32, 0, 3, 8, 3, 5, 0, 99, 3, 1, 2]);
        for w in [5, 70] {
            let rows = ids.len();
            in_each_dtype(|dtype, tol| {
                let dy = randn(&[rows, w], 31)?.to_dtype(dtype)?.to_dtype(cpu_dtype(dtype))?;
                let valid: Vec<(u32, usize)> =
                    ids.iter().enumerate().filter(|&(_, &i)| (i as usize) < vocab).map(|(r, &i)| (i, r)).collect();
                let (keep, at): (Vec<u32>, Vec<u32>) = valid.iter().map(|&(i, r)| (i, r as u32)).unzip();
                let want = Tensor::zeros((vocab, w), DType::F64, &Device::Cpu)?.index_add(
                    &Tensor::new(keep.as_slice(), &Device::Cpu)?,
                    &dy.to_dtype(DType::F64)?.index_select(&Tensor::new(at.as_slice(), &Device::Cpu)?, 0)?,
                    0,
                )?;
                let call = gpu::embedding_grad(rows, w, vocab);
                let acc_len = vocab * w;
                let got = match dtype {
                    DType::F64 => {
                        let dy = f64::to_bytes(&dy.flatten_all()?.to_vec1::<f64>()?);
                        let out = emulated::run_bytes(
                            &call,
                            "f64",
                            f64::to_bytes(&vec![0.0; acc_len]),
                            vec![u32::to_bytes(&ids), dy],
                        );
                        Tensor::new(f64::from_bytes(&out), &Device::Cpu)?
                    }
                    _ => {
                        let (name, dy) = match dtype {
                            DType::F32 => ("f32", f32::to_bytes(&dy.flatten_all()?.to_vec1::<f32>()?)),
                            _ => {
                                ("bf16", emulated::bf16::to_bytes(&dy.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?))
                            }
                        };
                        let out = emulated::run_bytes(
                            &call,
                            name,
                            f32::to_bytes(&vec![0.0; acc_len]),
                            vec![u32::to_bytes(&ids), dy],
                        );
                        Tensor::new(f32::from_bytes(&out), &Device::Cpu)?
                    }
                };
                close("embedding gradient", &got, &want, tol.max(1e-6))
            })?;
            // The op itself on the CPU: the same rows and gradient as index_select.
            let table = Var::from_tensor(&randn(&[vocab, w], 32)?)?;
            let ids = Tensor::new(&[3u32, 0, 3, 8, 1], &Device::Cpu)?;
            let fused = table.as_tensor().apply_op2(&ids, EmbeddingOp)?;
            let plain = table.as_tensor().index_select(&ids, 0)?;
            close("embedding rows", &fused, &plain, 0.0)?;
            let weights = randn(&[5, w], 33)?;
            let grad = |y: &Tensor| -> Result<Tensor> {
                Ok((y * &weights)?.sum_all()?.backward()?.get(table.as_tensor()).expect("a gradient").clone())
            };
            close("embedding table gradient", &grad(&fused)?, &grad(&plain)?, 1e-12)?;
        }
        Ok(())
    }

    /// The fused cross-entropy against the composed form, in value and gradient; a target
    /// outside the classes is an error.
    #[test]
    fn cross_entropy_matches_the_composed_form() -> Result<()> {
        use candle_core::Var;
        let x = Var::from_tensor(&(randn(&[6, 11], 23)? * 4.0)?)?;
        let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu)?;
        let weights = randn(&[6], 24)?;
        let fused = cross_entropy(x.as_tensor(), &targets)?;
        let m = x.as_tensor().max_keepdim(D::Minus1)?.detach();
        let z = x.as_tensor().broadcast_sub(&m)?;
        let logp = z.broadcast_sub(&z.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
        let composed = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        close("cross-entropy", &fused, &composed, 1e-12)?;
        let grad = |y: &Tensor| -> Result<Tensor> {
            let store = (y * &weights)?.sum_all()?.backward()?;
            Ok(store.get(x.as_tensor()).expect("a gradient").clone())
        };
        close("cross-entropy gradient", &grad(&fused)?, &grad(&composed)?, 1e-12)?;
        let bad = Tensor::new(&[0u32, 11, 3, 3, 7, 1], &Device::Cpu)?;
        let e = cross_entropy(x.as_tensor(), &bad).expect_err("target 11 of 11 classes");
        assert!(e.to_string().contains("target 11"), "{e}");
        Ok(())
    }

    /// The new CPU ops (RMS norm, the masked softmax, the bias add) against the composed
    /// forms in value and gradient.
    #[test]
    fn rms_norm_masked_softmax_and_bias_add_match_the_composed_ops() -> Result<()> {
        use candle_core::Var;
        let x = Var::from_tensor(&randn(&[2, 3, 4, 9], 11)?)?;
        let g = Var::from_tensor(&randn(&[9], 12)?)?;
        let w = randn(&[2, 3, 4, 9], 13)?;
        let mask = Tensor::from_vec(
            (0..18).map(|i| if i % 9 < 7 { 0f64 } else { -1e4 }).collect::<Vec<_>>(),
            (2, 1, 1, 9),
            &Device::Cpu,
        )?;
        type Pair = (Tensor, Tensor);
        let cases: Vec<(&str, Pair)> = vec![
            (
                "RMS norm",
                (rms_norm(x.as_tensor(), g.as_tensor(), 1e-6)?, rms_norm_composed(x.as_tensor(), g.as_tensor(), 1e-6)?),
            ),
            ("bias add", (bias_add(x.as_tensor(), g.as_tensor())?, x.as_tensor().broadcast_add(g.as_tensor())?)),
            ("masked softmax", {
                let composed = crate::layers::ops::softmax_last(&(x.as_tensor() * 0.5)?.broadcast_add(&mask)?)?;
                (softmax_scaled(x.as_tensor(), 0.5, Some(&mask))?, composed)
            }),
        ];
        for (name, (fused, composed)) in cases {
            close(name, &fused, &composed, 1e-12)?;
            let gf = (fused * &w)?.sum_all()?.backward()?;
            let gc = (composed * &w)?.sum_all()?.backward()?;
            for v in [&x, &g] {
                match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                    (Some(a), Some(b)) => close(name, a, b, 1e-10)?,
                    (None, None) => {}
                    _ => panic!("{name}: one form has a gradient the other lacks"),
                }
            }
        }
        Ok(())
    }
}
