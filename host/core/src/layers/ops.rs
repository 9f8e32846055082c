//! Differentiable tensor functions used by the models.

use candle_core::{D, Tensor};

use crate::Result;

/// Softmax over the last dimension. The row maximum is subtracted for stability and
/// detached: softmax does not depend on it, so its gradient is zero anyway.
pub fn softmax_last(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    Ok(exp.broadcast_div(&sum)?)
}

/// Mean of `hidden: [batch, seq, dim]` over the positions where `mask: [batch, seq]` is 1.
pub fn masked_mean(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(summed.broadcast_div(&counts)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_matches_the_fused_kernel() -> Result<()> {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [-5.0, 0.0, 100.0]], &Device::Cpu)?;
        let ours = softmax_last(&x)?.to_vec2::<f32>()?;
        let fused = candle_nn::ops::softmax_last_dim(&x)?.to_vec2::<f32>()?;
        for (a, b) in ours.iter().flatten().zip(fused.iter().flatten()) {
            assert!((a - b).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn masked_mean_ignores_padding() -> Result<()> {
        let h = Tensor::new(&[[[1.0f32, 2.0], [3.0, 4.0], [100.0, 100.0]]], &Device::Cpu)?;
        let m = Tensor::new(&[[1.0f32, 1.0, 0.0]], &Device::Cpu)?;
        assert_eq!(masked_mean(&h, &m)?.to_vec2::<f32>()?, [[2.0, 3.0]]);
        Ok(())
    }
}
