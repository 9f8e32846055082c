//! The fully connected product `y = x Wᵀ (+ b)` as one CPU op with its own backward.
//!
//! candle's `matmul` + `broadcast_add` differentiate every input whatever it is: the
//! gradient of a frozen weight (LoRA, adapters, frozen layers under a trainable one) is
//! computed and thrown away, the gradient of a constant input (a cached frozen prefix) too,
//! and the bias gradient is a strided reduction over the batch dimensions, slow on the CPU.
//! This op adds the bias in the product's output in one pass, and its backward computes only
//! the gradients that something needs — `x`, `W`, `b` each only when it is tracked (a
//! variable or computed from one) — with the bias gradient as a matrix product by a row of
//! ones. Where it does not apply (GPUs, half precision, int8) [`Linear`](super::Linear) keeps
//! candle's ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// True where the fused op applies: CPU tensors, all f32 or all f64.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu() && w.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == w.dtype()
}

/// `x Wᵀ + b` for `x: [..., in]`, `w: [out, in]`, `b: [out]`, differentiable in all three.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    // `W` row-major, or the transposed view of a contiguous `Wᵀ` (both are what the CPU
    // matmul reads without a copy).
    let w = if w.is_contiguous() || w.t()?.is_contiguous() { w.clone() } else { w.contiguous()? };
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, DenseOp),
        None => x.apply_op2(&w, DenseOp),
    }
}

struct DenseOp;

/// The product's shape and the layouts the CPU matmul reads: `x` as `[m, k]`, `Wᵀ` as `[k, n]`.
fn product_layouts(lx: &Layout, lw: &Layout) -> candle_core::Result<(usize, usize, usize, Layout, Layout, Shape)> {
    let (n, k) = lw.shape().dims2()?;
    let xdims = lx.dims();
    if xdims.last() != Some(&k) {
        candle_core::bail!("linear layer expects inputs of width {k}, got shape {xdims:?}");
    }
    let m = lx.shape().elem_count() / k.max(1);
    let x2 = Layout::contiguous_with_offset((m, k), lx.start_offset());
    let wt = lw.transpose(0, 1)?;
    let mut out = xdims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    Ok((m, n, k, x2, wt, Shape::from(out)))
}

fn product(x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
    let (m, n, k, x2, wt, shape) = product_layouts(lx, lw)?;
    Ok((x.matmul(w, (1, m, n, k), &x2, &wt)?, shape))
}

fn add_rows<T: Copy + std::ops::AddAssign + Send + Sync>(y: &mut [T], b: &[T]) {
    let n = b.len().max(1);
    y.par_chunks_mut(n * 64).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
        }
    });
}

/// The gradients of `x Wᵀ (+ b)` that are needed, from `dy: [..., out]`.
fn backward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor) -> candle_core::Result<[Option<Tensor>; 3]> {
    let (n, k) = w.dims2()?;
    let dy = dy.contiguous()?.reshape(((), n))?;
    let dx = if x.track_op() { Some(dy.matmul(&w.detach())?.reshape(x.shape())?) } else { None };
    let dw = if w.track_op() { Some(dy.t()?.matmul(&x.detach().reshape(((), k))?)?) } else { None };
    let db = match b {
        Some(b) if b.track_op() => {
            let ones = Tensor::ones((1, dy.dim(0)?), dy.dtype(), dy.device())?;
            Some(ones.matmul(&dy)?.reshape(n)?)
        }
        _ => None,
    };
    Ok([dx, dw, db])
}

impl CustomOp2 for DenseOp {
    fn name(&self) -> &'static str {
        "tuneforge-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        product(x, lx, w, lw)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = backward(x, w, None, dy)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for DenseOp {
    fn name(&self) -> &'static str {
        "tuneforge-linear-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (mut y, shape) = product(x, lx, w, lw)?;
        let n = lw.shape().dims2()?.0;
        let Some((b0, b1)) = lb.contiguous_offsets() else { candle_core::bail!("linear layer: bias not contiguous") };
        if b1 - b0 != n {
            candle_core::bail!("linear layer: bias has {} values for {n} outputs", b1 - b0);
        }
        match (&mut y, b) {
            (CpuStorage::F32(y), CpuStorage::F32(b)) => add_rows(y, &b[b0..b1]),
            (CpuStorage::F64(y), CpuStorage::F64(b)) => add_rows(y, &b[b0..b1]),
            _ => candle_core::bail!("linear layer: input, weight and bias must share one float dtype"),
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = backward(x, w, Some(b), dy)?;
        Ok((dx, dw, db))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::Result;

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (bs, l, k) = x.dims3()?;
        Ok(x.reshape((bs * l, k))?.matmul(&w.t()?)?.broadcast_add(b)?.reshape((bs, l, ()))?)
    }

    #[test]
    fn matches_candle_forward_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 5), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 5), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &dev)?)?;
        let dy = Tensor::randn(0f64, 1.0, (2, 3, 4), &dev)?;
        let ours = linear(&x, &w, Some(&b))?;
        let theirs = reference(&x, &w, &b)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g1 = ours.mul(&dy)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&dy)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let (a, e) = (g1.get(v).expect("grad"), g2.get(v).expect("grad"));
            let diff = (a - e)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "gradient differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn computes_only_the_gradients_something_needs() -> Result<()> {
        let dev = Device::Cpu;
        // A constant input and a frozen weight: only the bias trains.
        let x = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let b = Var::zeros(4, DType::F32, &dev)?;
        let y = linear(&x, &w, Some(&b))?;
        let grads = y.sum_all()?.backward()?;
        assert_eq!(grads.get(&b).expect("bias grad").to_vec1::<f32>()?, vec![6.0; 4]);
        assert!(grads.get(&x).is_none() && grads.get(&w).is_none());
        // No bias, a trainable weight.
        let w = Var::from_tensor(&w)?;
        let y = linear(&x, &w, None)?;
        let grads = y.sum_all()?.backward()?;
        let expected = Tensor::ones((4, 6), DType::F32, &dev)?.matmul(&x)?;
        let diff = (grads.get(&w).expect("weight grad") - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5);
        Ok(())
    }
}
