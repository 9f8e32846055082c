//! The context of one forward pass: whether it will be differentiated, whether dropout is on,
//! and the seeded generator that draws dropout masks (so a step's masks depend only on the
//! seed and the step).
//!
//! A pass that may be differentiated uses our fused softmax and layer norm (`fused.rs`, with
//! a backward); one that will not uses candle's, which are faster and have none.

use std::sync::Mutex;

use candle_core::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::Result;

/// Whether a forward pass trains (dropout on, differentiable) and where its randomness
/// comes from.
#[derive(Debug)]
pub struct ForwardCtx {
    rng: Option<Mutex<StdRng>>,
    differentiable: bool,
}

impl ForwardCtx {
    /// Inference: dropout off, fused kernels.
    pub fn eval() -> Self {
        Self { rng: None, differentiable: false }
    }

    /// Dropout off but differentiable ops (gradient checks, deterministic training steps).
    pub fn eval_differentiable() -> Self {
        Self { rng: None, differentiable: true }
    }

    /// Training with dropout masks drawn from `seed`.
    pub fn train(seed: u64) -> Self {
        Self { rng: Some(Mutex::new(StdRng::seed_from_u64(seed))), differentiable: true }
    }

    pub fn is_train(&self) -> bool {
        self.rng.is_some()
    }

    /// True when the pass may be differentiated, so only ops with a backward may be used.
    pub fn is_differentiable(&self) -> bool {
        self.differentiable
    }

    /// Softmax over the last dimension: our fused op with its backward when the pass may be
    /// differentiated, candle's (faster, no backward) otherwise.
    pub fn softmax_last(&self, xs: &Tensor) -> Result<Tensor> {
        if self.differentiable {
            super::fused::softmax_last(xs)
        } else {
            Ok(candle_nn::ops::softmax_last_dim(&xs.contiguous()?)?)
        }
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)`. The identity at inference or when `p` is 0.
    pub fn dropout(&self, xs: &Tensor, p: f64) -> Result<Tensor> {
        let Some(rng) = &self.rng else { return Ok(xs.clone()) };
        if p <= 0.0 {
            return Ok(xs.clone());
        }
        let n = xs.elem_count();
        let scale = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * (u32::MAX as f64)) as u32;
        let mask: Vec<f32> = {
            let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..n).map(|_| if rng.random::<u32>() < threshold { 0.0 } else { scale }).collect()
        };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        Ok(xs.mul(&mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_is_seeded_scaled_and_off_at_inference() -> Result<()> {
        let x = Tensor::ones(&[1000], candle_core::DType::F32, &Device::Cpu)?;
        let a = ForwardCtx::train(5).dropout(&x, 0.25)?.to_vec1::<f32>()?;
        let b = ForwardCtx::train(5).dropout(&x, 0.25)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        let zeros = a.iter().filter(|&&v| v == 0.0).count();
        assert!((200..300).contains(&zeros), "{zeros} zeros of 1000");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(ForwardCtx::eval().dropout(&x, 0.25)?.to_vec1::<f32>()?, vec![1.0; 1000]);
        assert_eq!(ForwardCtx::eval_differentiable().dropout(&x, 0.25)?.to_vec1::<f32>()?, vec![1.0; 1000]);
        Ok(())
    }
}
