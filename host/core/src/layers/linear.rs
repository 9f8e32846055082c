//! Fully connected layer: `y = x Wᵀ + b`, with `W: [out, in]`, `b: [out]`, and `x: [..., in]`,
//! optionally with a LoRA update (Hu et al. 2021):
//! `y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ` with `A: [r, in]`, `B: [out, r]`; `B` starts at
//! zero, so a fresh LoRA layer computes exactly the base layer. Names follow Hugging Face
//! PEFT: `<module>.lora_A.weight`, `<module>.lora_B.weight`.

use candle_core::{Module, Tensor};

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
    bias: Option<Tensor>,
    lora: Option<Lora>,
}

fn matmul_t(xs: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let w = w.t()?;
    match xs.dims() {
        [b, l, d] => xs.reshape((b * l, *d))?.matmul(&w)?.reshape((*b, *l, ())),
        _ => xs.matmul(&w),
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, lora: None }
    }

    pub fn with_lora(mut self, lora: Lora) -> Self {
        self.lora = Some(lora);
        self
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// The layer with its LoRA update folded into the weight (`W + (α/r) B A`).
    pub fn merged(&self) -> Result<Self> {
        match &self.lora {
            None => Ok(self.clone()),
            Some(l) => Ok(Self::new((&self.weight + l.delta_weight()?)?.detach(), self.bias.clone())),
        }
    }

    /// The forward pass; LoRA's dropout follows `ctx`.
    pub fn forward_t(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut y = self.forward(xs)?;
        if let Some(l) = &self.lora {
            let x = ctx.dropout(xs, l.dropout)?;
            let update = matmul_t(&matmul_t(&x, &l.a)?, &l.b)?;
            y = (y + (update * l.scale)?)?;
        }
        Ok(y)
    }
}

impl Module for Linear {
    /// The base layer only (no LoRA update); use [`Linear::forward_t`] in models.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let y = matmul_t(xs, &self.weight)?;
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
