//! Softmax on CUDA with a backward pass: the forward runs candle-nn's fused CUDA kernel (one
//! pass, where the composed form costs six kernels, two of them broadcasting — candle's
//! broadcasting binary kernels compute strided indices per element and took most of a
//! training step's GPU time), the backward is composed of tensor ops in f32.
//!
//! candle's fused kernel has no backward; this custom op wraps it: `cuda_fwd` turns the
//! storage back into a tensor (a device copy each way, still cheaper than the composed
//! forward) and calls the kernel. A layer-norm op built the same way, a GEMM-tiled bias and a
//! pre-expanded attention mask were tried together and left ~2.7 GB per step unreleased on a
//! MiniLM-shaped model; they are not in (see ARCHITECTURE.md).

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, D, DType, Layout, Shape, Storage, Tensor};

use crate::Result;

/// A tensor over a copy of `s` (the layout must be contiguous from the buffer's start).
fn tensor_of(s: &CudaStorage, l: &Layout, what: &str) -> candle_core::Result<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{what}: expects a contiguous tensor starting at its buffer's start");
    }
    Ok(Tensor::from_storage(Storage::Cuda(s.try_clone(l)?), l.shape().clone(), BackpropOp::none(), false))
}

/// The CUDA storage of `t` (copied out of the tensor).
fn storage_of(t: &Tensor) -> candle_core::Result<(CudaStorage, Shape)> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(c) if layout.start_offset() == 0 => Ok((c.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("expected a CUDA tensor starting at its buffer's start"),
    }
}

/// `t` contiguous and starting at its buffer's start (copied when it is a view).
fn owned(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 { Ok(t.clone()) } else { Ok(t.copy()?.contiguous()?) }
}

pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(owned(x)?.apply_op1(CudaSoftmax)?)
}

struct CudaSoftmax;

impl CustomOp1 for CudaSoftmax {
    fn name(&self) -> &'static str {
        "tuneforge-cuda-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        storage_of(&candle_nn::ops::softmax_last_dim(&tensor_of(x, l, self.name())?)?)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = y · (dy − Σ dy · y), in f32.
        let yf = y.to_dtype(DType::F32)?;
        let dy = grad.to_dtype(DType::F32)?;
        let dot = (&dy * &yf)?.sum_keepdim(D::Minus1)?;
        Ok(Some((yf * dy.broadcast_sub(&dot)?)?.to_dtype(y.dtype())?))
    }
}
