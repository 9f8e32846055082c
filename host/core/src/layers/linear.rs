//! Fully connected layer: `y = x Wᵀ + b`, with `W: [out, in]`, `b: [out]`, and `x: [..., in]`.

use candle_core::{Module, Tensor};

use crate::{Init, ParamBuilder, Result};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.t()?;
        let y = match xs.dims() {
            [b, l, d] => xs.reshape((b * l, *d))?.matmul(&w)?.reshape((*b, *l, ()))?,
            _ => xs.matmul(&w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// A linear layer named `weight`/`bias` under `pb`, initialised N(0, `std`) with zero bias.
pub fn linear(in_dim: usize, out_dim: usize, std: f64, pb: &ParamBuilder) -> Result<Linear> {
    let weight = pb.get(&[out_dim, in_dim], "weight", Init::Normal(std))?;
    let bias = pb.get(&[out_dim], "bias", Init::Zeros)?;
    Ok(Linear::new(weight, Some(bias)))
}
