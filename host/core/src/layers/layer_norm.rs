//! Layer normalisation over the last dimension, from differentiable ops:
//! `y = (x - mean) / sqrt(var + eps) * weight + bias`.

use candle_core::{D, Module, Tensor};

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

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = xs.dim(D::Minus1)? as f64;
        let mean = (xs.sum_keepdim(D::Minus1)? / hidden)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / hidden)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// A layer norm named `weight`/`bias` under `pb` (ones and zeros when new).
pub fn layer_norm(size: usize, eps: f64, pb: &ParamBuilder) -> Result<LayerNorm> {
    let weight = pb.get(&[size], "weight", Init::Ones)?;
    let bias = pb.get(&[size], "bias", Init::Zeros)?;
    Ok(LayerNorm::new(weight, bias, eps))
}
