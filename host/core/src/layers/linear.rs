//! Fully connected layer: `y = x Wᵀ + b`, with `W: [out, in]`, `b: [out]`, and `x: [..., in]`,
//! optionally with a LoRA update (Hu et al. 2021):
//! `y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ` with `A: [r, in]`, `B: [out, r]`; `B` starts at
//! zero, so a fresh LoRA layer computes exactly the base layer. Names follow Hugging Face
//! PEFT: `<module>.lora_A.weight`, `<module>.lora_B.weight`.

use std::sync::Arc;

use candle_core::{Module, Tensor};
use tuneforge_kernels::Int8Matrix;

use crate::layers::ForwardCtx;
use crate::{Init, ParamBuilder, Result};

/// The low-rank update of a [`Linear`].
#[derive(Debug, Clone)]
pub struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
}

impl Lora {
    /// `lora_A` (uniform ±1/√in, as PEFT's Kaiming init with a=√5) and `lora_B` (zeros) under `pb`.
    pub fn new(in_dim: usize, out_dim: usize, config: LoraConfig, pb: &ParamBuilder) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a = pb.pp("lora_A").get_new(&[config.rank, in_dim], "weight", Init::Uniform(bound))?;
        let b = pb.pp("lora_B").get_new(&[out_dim, config.rank], "weight", Init::Zeros)?;
        Ok(Self { a, b, scale: config.alpha / config.rank as f64, dropout: config.dropout })
    }

    /// `(α/r) · B A`, shaped like the base weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    /// The int8 weight of a quantized model (inference only); `weight` is then empty.
    int8: Option<Arc<Int8Matrix>>,
    bias: Option<Tensor>,
    lora: Option<Lora>,
    /// `Wᵀ` made contiguous, kept for a weight that never changes (not a variable, e.g. a
    /// model loaded for prediction) on the CPU when the layer asks for it
    /// ([`Linear::keep_transposed`]): gemm then reads it as it is instead of transposing `W`
    /// into its panels on every product, which was half of a batch-1 forward pass. It costs
    /// a second copy of the weight.
    frozen_t: Option<Arc<std::sync::OnceLock<Tensor>>>,
}

/// `xs · Wᵀ`: the fused CPU op where it applies (it differentiates only what is tracked),
/// candle's matmul elsewhere.
fn matmul_t(xs: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if super::dense::applies(xs, w) {
        return super::dense::linear(xs, w, None);
    }
    let w = w.t()?;
    match xs.dims() {
        [b, l, d] => xs.reshape((b * l, *d))?.matmul(&w)?.reshape((*b, *l, ())),
        _ => xs.matmul(&w),
    }
}

/// `xs · Wᵀ` with an int8 `W`, for `xs: [..., in]` in f32.
fn int8_matmul_t(xs: &Tensor, w: &Int8Matrix) -> candle_core::Result<Tensor> {
    let dims = xs.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    if k != w.cols() {
        candle_core::bail!("int8 linear layer expects {} inputs, got shape {dims:?}", w.cols());
    }
    let m = xs.elem_count() / k.max(1);
    let x = xs.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let y = w.matmul_t(&x, m);
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap_or(&mut 0) = w.rows();
    Tensor::from_vec(y, out_dims, xs.device())?.to_dtype(xs.dtype())
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, int8: None, bias, lora: None, frozen_t: None }
    }

    /// A layer over an int8 weight `[out, in]` (inference only: no gradient reaches it).
    pub fn int8(weight: Arc<Int8Matrix>, bias: Option<Tensor>) -> Result<Self> {
        let empty = Tensor::zeros(0, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        Ok(Self { weight: empty, int8: Some(weight), bias, lora: None, frozen_t: None })
    }

    pub fn is_int8(&self) -> bool {
        self.int8.is_some()
    }

    pub fn with_lora(mut self, lora: Lora) -> Self {
        self.lora = Some(lora);
        self
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Keeps a contiguous `Wᵀ` for the products when the weight never changes (see
    /// `frozen_t`); the encoder's layers ask for it, where it doubles batch-1 inference.
    pub fn keep_transposed(mut self) -> Self {
        self.frozen_t = Some(Arc::default());
        self
    }

    /// `W`, or for a kept transpose the view `(Wᵀ)ᵀ` of it (the same values).
    fn weight_for_product(&self) -> candle_core::Result<Tensor> {
        let Some(cache) = self.frozen_t.as_ref().filter(|_| !self.weight.is_variable()) else {
            return Ok(self.weight.clone());
        };
        if let Some(t) = cache.get() {
            return t.t();
        }
        let t = self.weight.t()?.contiguous()?;
        let view = t.t()?;
        let _ = cache.set(t);
        Ok(view)
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// The layer for inference with an int8 weight: its LoRA update folded in first, one
    /// symmetric scale per output channel, the bias kept in f32. Errors name nothing: the
    /// caller says which layer.
    pub fn to_int8(&self) -> Result<Self> {
        if self.is_int8() {
            return Ok(self.clone());
        }
        let merged = self.merged()?;
        let (rows, cols) = merged.weight.dims2()?;
        let w = merged.weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let q = Int8Matrix::quantize(&w, rows, cols)
            .map_err(|message| crate::CoreError::Param { name: "weight".into(), message })?;
        let bias = merged.bias.map(|b| b.to_dtype(candle_core::DType::F32)).transpose()?;
        Self::int8(Arc::new(q), bias)
    }

    /// The layer with its LoRA update folded into the weight (`W + (α/r) B A`).
    pub fn merged(&self) -> Result<Self> {
        match &self.lora {
            None => Ok(self.clone()),
            Some(l) => Ok(Self {
                // A kept transpose is of the merged weight, made anew.
                frozen_t: self.frozen_t.as_ref().map(|_| Arc::default()),
                ..Self::new((&self.weight + l.delta_weight()?)?.detach(), self.bias.clone())
            }),
        }
    }

    /// The forward pass; LoRA's dropout follows `ctx`.
    /// With a compute dtype in `ctx` (mixed precision) the input, weight and bias are cast to
    /// it; the gradient still reaches the f32 parameters.
    pub fn forward_t(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let xs = &ctx.cast(xs)?;
        let mut y = match ctx.compute_dtype() {
            Some(_) if self.int8.is_none() => {
                let y = matmul_t(xs, &ctx.cast(&self.weight)?)?;
                match &self.bias {
                    Some(b) => super::fused::bias_add(&y, b)?,
                    None => y,
                }
            }
            _ => self.forward(xs)?,
        };
        if let Some(l) = &self.lora {
            let x = ctx.dropout(xs, l.dropout)?;
            let update = matmul_t(&matmul_t(&x, &ctx.cast(&l.a)?)?, &ctx.cast(&l.b)?)?;
            y = (y + (update * l.scale)?)?;
        }
        Ok(y)
    }
}

impl Module for Linear {
    /// The base layer only (no LoRA update); use [`Linear::forward_t`] in models.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.int8 {
            Some(q) => int8_matmul_t(xs, q)?,
            None if super::dense::applies(xs, &self.weight) => {
                return super::dense::linear(xs, &self.weight_for_product()?, self.bias.as_ref());
            }
            None => matmul_t(xs, &self.weight)?,
        };
        match &self.bias {
            Some(b) => super::fused::bias_add(&y, b),
            None => Ok(y),
        }
    }
}

/// A linear layer named `weight`/`bias` under `pb`, initialised N(0, `std`) with zero bias.
///
/// When the builder holds an int8 matrix under `weight` (a quantized model), the layer uses it.
pub fn linear(in_dim: usize, out_dim: usize, std: f64, pb: &ParamBuilder) -> Result<Linear> {
    if let Some(q) = pb.get_int8("weight", &[out_dim, in_dim])? {
        let bias = pb.get(&[out_dim], "bias", Init::Zeros)?;
        return Linear::int8(q, Some(bias));
    }
    let weight = pb.get(&[out_dim, in_dim], "weight", Init::Normal(std))?;
    let bias = pb.get(&[out_dim], "bias", Init::Zeros)?;
    Ok(Linear::new(weight, Some(bias)))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    /// `to_int8` quantizes `W + ΔW`: the same int8 layer as quantizing the folded weight,
    /// close to the f32 layer with its update.
    #[test]
    fn int8_folds_the_lora_update_in_first() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 5, &dev)?;
        let a = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        let lora = Lora { a, b: Tensor::randn(0f32, 1.0, (5, 2), &dev)?, scale: 0.5, dropout: 0.0 };
        let with = Linear::new(w.clone(), Some(bias.clone())).with_lora(lora.clone());
        let folded = Linear::new((&w + lora.delta_weight()?)?, Some(bias));
        let int8 = with.to_int8()?;
        assert!(int8.is_int8() && int8.lora().is_none());
        assert_eq!(int8.forward(&x)?.to_vec2::<f32>()?, folded.to_int8()?.forward(&x)?.to_vec2::<f32>()?);
        let f32 = with.forward_t(&x, &ForwardCtx::eval())?;
        let scale = f32.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (f32 - int8.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 0.03 * scale, "int8 differs by {diff} (scale {scale})");
        Ok(())
    }

    #[test]
    fn a_kept_transpose_computes_the_same_and_never_goes_stale() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 6), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 4, &dev)?;
        let plain = Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
        let kept = Linear::new(w.clone(), Some(b.clone())).keep_transposed();
        for _ in 0..2 {
            let y = kept.forward(&x)?;
            assert!((y - &plain)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        }
        // A variable's value can change (training): it is never cached.
        let var = Var::from_tensor(&w)?;
        let layer = Linear::new(var.as_tensor().clone(), Some(b)).keep_transposed();
        let before = layer.forward(&x)?;
        var.set(&Tensor::zeros((4, 6), DType::F32, &dev)?)?;
        let after = layer.forward(&x)?;
        assert!((before - &after)?.abs()?.max_all()?.to_scalar::<f32>()? > 1e-3);
        Ok(())
    }
}
