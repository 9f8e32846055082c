//! Layer normalisation over the last dimension:
//! `y = (x - mean) / sqrt(var + eps) * weight + bias`: our fused op with its own backward
//! (`fused::layer_norm`) when the pass may be differentiated, candle's kernel otherwise; the
//! composed form is kept as the reference the tests compare with.

use candle_core::Tensor;

use crate::layers::ForwardCtx;
use crate::{Init, ParamBuilder, Result};

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl LayerNorm {
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        // candle's kernel has no f64 (models in f64 are for gradient checks).
        if !ctx.is_differentiable() && xs.dtype() == self.weight.dtype() && xs.dtype() != candle_core::DType::F64 {
            return Ok(candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)?);
        }
        super::fused::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// A layer norm named `weight`/`bias` under `pb` (ones and zeros when new).
pub fn layer_norm(size: usize, eps: f64, pb: &ParamBuilder) -> Result<LayerNorm> {
    let weight = pb.get(&[size], "weight", Init::Ones)?;
    let bias = pb.get(&[size], "bias", Init::Zeros)?;
    Ok(LayerNorm::new(weight, bias, eps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn fused_and_composed_layer_norm_agree() -> Result<()> {
        let pb = ParamBuilder::random(3, DType::F32, &Device::Cpu);
        let ln = LayerNorm::new(pb.get(&[8], "w", Init::Normal(1.0))?, pb.get(&[8], "b", Init::Normal(1.0))?, 1e-12);
        let x = pb.get(&[2, 3, 8], "x", Init::Normal(2.0))?;
        let fused = ln.forward(&x, &ForwardCtx::eval_differentiable())?.flatten_all()?.to_vec1::<f32>()?;
        let candle = ln.forward(&x, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
        let composed = super::super::fused::layer_norm_composed(&x, &ln.weight, &ln.bias, ln.eps)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in fused.iter().zip(&candle) {
            assert!((a - b).abs() < 1e-5, "{a} vs candle {b}");
        }
        for (a, b) in fused.iter().zip(&composed) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        Ok(())
    }
}
