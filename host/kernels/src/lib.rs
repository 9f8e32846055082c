//! Kernels that candle does not offer, behind a safe API: the int8 matrix product used by
//! quantized models (`tuneforge quantize`), the allocator settings that keep candle's
//! per-op buffers from being unmapped and re-zeroed on every step (`tune_allocator`), the
//! thread settings candle reads from the environment (`tune_threads`), and the CUDA kernels
//! of the fused training ops (`gpu`: layer/RMS norm, softmax with scale and mask, GELU,
//! dropout, bias; launched with the `cuda` feature, emulated on the CPU for tests with
//! `emulate`).
//!
//! Weights are int8 with one symmetric scale per output channel (row of `W: [n, k]`);
//! activations are quantized per row on the fly (dynamic quantization), so
//! `y[i, j] ≈ sx[i] · sw[j] · Σ_t xq[i, t] · wq[j, t]`.
//!
//! On x86-64 CPUs with AVX-512 VNNI the product runs in `x86.rs` (intrinsics, chosen at run
//! time); elsewhere a portable loop gives the same integers. `x86.rs`, `alloc.rs`
//! (`mallopt`), `threads.rs` (`set_var` before threads start) and `gpu/launch.rs` (kernel
//! launches) are the only places in the workspace with `unsafe`. Tests check both against each other and against f32.

mod alloc;
pub mod gpu;
mod int8;
mod threads;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use alloc::tune_allocator;
pub use int8::{Int8Matrix, KernelPath, quantize_row};
pub use threads::tune_threads;
