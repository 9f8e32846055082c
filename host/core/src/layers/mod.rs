//! Building blocks that have a backward pass.
//!
//! candle 0.11's fused `LayerNorm`, `softmax_last_dim`, `rms_norm` and rope have no backward:
//! gradients silently stop at them. Everything here that training touches is either composed
//! of differentiable primitives or one of our own fused ops with its backward (`fused.rs`:
//! layer and RMS norm, softmax with scale and mask, GELU, dropout, bias — on the CPU and,
//! through `tuneforge_kernels::gpu`, on CUDA; `dense.rs`: the linear layer's product on the
//! CPU), and the gradient tests check it against finite differences.

mod adapter;
pub(crate) mod attention;
mod ctx;
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
