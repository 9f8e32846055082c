//! CPU kernels that candle does not offer, behind a safe API. Today: the int8 matrix
//! product used by quantized models (`tuneforge quantize`).
//!
//! Weights are int8 with one symmetric scale per output channel (row of `W: [n, k]`);
//! activations are quantized per row on the fly (dynamic quantization), so
//! `y[i, j] ≈ sx[i] · sw[j] · Σ_t xq[i, t] · wq[j, t]`.
//!
//! On x86-64 CPUs with AVX-512 VNNI the product runs in `x86.rs`, the only place in the
//! workspace with `unsafe` (intrinsics, chosen at run time); elsewhere a portable loop
//! gives the same integers. Tests check both against each other and against f32.

mod int8;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use int8::{Int8Matrix, KernelPath, quantize_row};
