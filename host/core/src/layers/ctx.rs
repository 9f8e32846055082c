//! The context of one forward pass: whether it will be differentiated, whether dropout is on,
//! and the seeded generator that draws dropout masks (so a step's masks depend only on the
//! seed and the step).
//!
//! A pass that may be differentiated uses our fused softmax and layer norm (`fused.rs`, with
//! a backward); one that will not uses candle's, which are faster and have none. The context
//! also carries the compute dtype of mixed precision (parameters are cast where they are
//! used) and, with gradient checkpointing, what the recomputation in the backward pass needs.

use std::sync::Mutex;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::Result;

/// What a checkpointed forward pass keeps for the recomputation in the backward pass
/// (`[train] gradient_checkpointing`): the input of each transformer layer (detached), the
/// tensor the layers started from (with its graph, e.g. the embeddings) and the variable
/// standing for the last layer's output.
#[derive(Debug)]
pub struct CheckpointRecord {
    /// What the first recorded layer read, with its graph (e.g. the embeddings' output): the
    /// recomputation ends by differentiating it.
    pub start: Tensor,
    /// `(layer index, input)`, in forward order.
    pub inputs: Vec<(usize, Tensor)>,
    /// Per-pass tensors the layers need besides their input (masks, rope tables).
    pub extras: Vec<Tensor>,
    /// The last layer's output as a leaf variable: the loss is differentiated up to it.
    pub top: Var,
}

/// Whether a forward pass trains (dropout on, differentiable), where its randomness comes
/// from, the dtype it computes in and whether it checkpoints its layers.
#[derive(Debug)]
pub struct ForwardCtx {
    rng: Option<Mutex<StdRng>>,
    seed: u64,
    differentiable: bool,
    compute_dtype: Option<DType>,
    checkpointing: bool,
    record: Mutex<Option<CheckpointRecord>>,
}

impl ForwardCtx {
    fn new(rng: Option<u64>, differentiable: bool) -> Self {
        Self {
            rng: rng.map(|s| Mutex::new(StdRng::seed_from_u64(s))),
            seed: rng.unwrap_or(0),
            differentiable,
            compute_dtype: None,
            checkpointing: false,
            record: Mutex::new(None),
        }
    }

    /// Inference: dropout off, fused kernels.
    pub fn eval() -> Self {
        Self::new(None, false)
    }

    /// Dropout off but differentiable ops (gradient checks, deterministic training steps).
    pub fn eval_differentiable() -> Self {
        Self::new(None, true)
    }

    /// Training with dropout masks drawn from `seed`.
    pub fn train(seed: u64) -> Self {
        Self::new(Some(seed), true)
    }

    /// Mixed precision: activations and matrix products in `dtype` (bf16), parameters kept in
    /// their own dtype and cast where they are used; `None` computes in the parameters' dtype.
    pub fn with_compute_dtype(mut self, dtype: Option<DType>) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// Gradient checkpointing: the transformer layers keep only their inputs; the caller runs
    /// the model's checkpointed backward after differentiating the loss.
    pub fn with_checkpointing(mut self, on: bool) -> Self {
        self.checkpointing = on && self.differentiable;
        self
    }

    pub fn is_train(&self) -> bool {
        self.rng.is_some()
    }

    /// True when the pass may be differentiated, so only ops with a backward may be used.
    pub fn is_differentiable(&self) -> bool {
        self.differentiable
    }

    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute_dtype
    }

    pub fn is_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// `t` in the compute dtype (differentiable: the gradient flows back to `t`'s dtype).
    pub fn cast(&self, t: &Tensor) -> Result<Tensor> {
        match self.compute_dtype {
            Some(d) if t.dtype() != d && t.dtype().is_float() => Ok(t.to_dtype(d)?),
            _ => Ok(t.clone()),
        }
    }

    /// Called at the start of transformer layer `index`: its dropout masks come from a
    /// generator seeded by (step seed, layer), so recomputing the layer (gradient
    /// checkpointing) draws the same masks.
    pub fn enter_layer(&self, index: usize) {
        let Some(rng) = &self.rng else { return };
        let seed = self.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        *rng.lock().unwrap_or_else(|e| e.into_inner()) = StdRng::seed_from_u64(seed);
    }

    /// Stores what the checkpointed backward needs (see [`CheckpointRecord`]).
    pub fn set_record(&self, record: CheckpointRecord) {
        *self.record.lock().unwrap_or_else(|e| e.into_inner()) = Some(record);
    }

    /// Takes the record a checkpointed forward pass left.
    pub fn take_record(&self) -> Option<CheckpointRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The backward pass of a checkpointed forward, once `store` holds the loss's gradients
    /// (up to the record's `top`): each recorded layer is recomputed from its saved input by
    /// `layer(index, input, extras)` — with the same dropout masks — and differentiated, last
    /// to first, then the tensor the layers started from. Trainable gradients are added to
    /// `grads`. Nothing to do when the pass kept no record.
    pub fn checkpointed_backward(
        &self,
        store: &candle_core::backprop::GradStore,
        trainable: &[(String, Var)],
        grads: &mut std::collections::HashMap<String, Tensor>,
        layer: impl Fn(usize, &Tensor, &[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let Some(record) = self.take_record() else { return Ok(()) };
        let Some(mut g) = store.get(record.top.as_tensor()).cloned() else { return Ok(()) };
        for (i, input) in record.inputs.iter().rev() {
            let x = Var::from_tensor(input)?;
            self.enter_layer(*i);
            let out = layer(*i, x.as_tensor(), &record.extras)?;
            let step = out.mul(&g)?.sum_all()?.backward()?;
            crate::train::accumulate_grads(&step, trainable, grads)?;
            match step.get(x.as_tensor()) {
                Some(gx) => g = gx.clone(),
                None => return Ok(()),
            }
        }
        if record.start.track_op() {
            let step = record.start.mul(&g)?.sum_all()?.backward()?;
            crate::train::accumulate_grads(&step, trainable, grads)?;
        }
        Ok(())
    }

    /// Softmax over the last dimension: our fused op with its backward when the pass may be
    /// differentiated, candle's (faster, no backward) otherwise. Half-precision inputs are
    /// normalised in f32.
    pub fn softmax_last(&self, xs: &Tensor) -> Result<Tensor> {
        if self.differentiable || !matches!(xs.dtype(), DType::F32 | DType::F64) {
            super::fused::softmax_last(xs)
        } else {
            Ok(candle_nn::ops::softmax_last_dim(&xs.contiguous()?)?)
        }
    }

    /// The `(p, seed)` of a dropout that a fused op draws itself (e.g. on attention
    /// probabilities): `None` at inference or when `p` is 0; the seed comes from the
    /// context's generator, so it follows the step and the layer like [`ForwardCtx::dropout`].
    pub fn dropout_seed(&self, p: f64) -> Option<(f64, u64)> {
        let rng = self.rng.as_ref().filter(|_| p > 0.0)?;
        Some((p, rng.lock().unwrap_or_else(|e| e.into_inner()).random::<u64>()))
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)`. The identity at inference or when `p` is 0. Where the fused ops apply
    /// (the CPU in f32/f64, CUDA) the mask is a hash of a seed from the context's generator
    /// and the element's index: one op, drawn in parallel, redrawn in the backward pass, the
    /// same on the CPU and the GPU. Elsewhere (CPU bf16) the same mask is built as a tensor.
    pub fn dropout(&self, xs: &Tensor, p: f64) -> Result<Tensor> {
        let Some((p, seed)) = self.dropout_seed(p) else { return Ok(xs.clone()) };
        if super::fused::fused_here(xs) {
            return super::fused::dropout(xs, p, seed);
        }
        // The same mask as a mask tensor (CPU bf16).
        let (threshold, scale) = (super::fused::dropout_threshold(p), super::fused::dropout_scale::<f32>(p));
        let mask: Vec<f32> = (0..xs.elem_count() as u64)
            .map(|i| if super::fused::kept(seed, threshold, i) { scale } else { 0.0 })
            .collect();
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

    /// Where no fused op applies (CPU bf16) the mask is built as a tensor: the same mask.
    #[test]
    fn bf16_dropout_draws_the_f32_mask() -> Result<()> {
        let x = Tensor::ones(&[777], candle_core::DType::F32, &Device::Cpu)?;
        let a = ForwardCtx::train(3).dropout(&x, 0.3)?.to_vec1::<f32>()?;
        let b = ForwardCtx::train(3).dropout(&x.to_dtype(candle_core::DType::BF16)?, 0.3)?;
        let b = b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        assert_eq!(a.iter().map(|v| *v == 0.0).collect::<Vec<_>>(), b.iter().map(|v| *v == 0.0).collect::<Vec<_>>());
        assert!(a.contains(&0.0) && a.iter().any(|v| *v > 1.0));
        Ok(())
    }
}
