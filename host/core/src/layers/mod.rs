//! Building blocks that have a backward pass.
//!
//! candle 0.11's fused `LayerNorm`, `softmax_last_dim`, `rms_norm` and rope have no backward:
//! gradients silently stop at them. Everything here that training touches is either composed
//! of differentiable primitives or one of our own fused ops with its backward (`fused.rs`:
//! layer norm, softmax, GELU; `dense.rs`: the linear layer's product), and the gradient tests check it against finite differences.

mod adapter;
pub(crate) mod attention;
mod ctx;
#[cfg(feature = "cuda")]
mod cuda_ops;
mod dense;
pub mod fused;
mod layer_norm;
mod linear;
mod ops;

pub use adapter::Adapter;
pub use ctx::{CheckpointRecord, ForwardCtx};
pub use layer_norm::{LayerNorm, layer_norm};
pub use linear::{Linear, Lora, LoraConfig, linear};
pub use ops::{masked_mean, softmax_last};
