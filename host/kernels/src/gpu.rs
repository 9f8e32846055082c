//! tuneforge's CUDA kernels (`cuda/kernels.cu`): for each op, which kernel, its launch shape
//! and its arguments in order ([`Call`]). With the `cuda` feature `launch::run` runs a call
//! on candle's CUDA storages (the PTX is built by `build.rs` with nvcc); with `emulate`,
//! `emulated::run` runs the same call on the CPU through `cuda/emulate.h`, so the kernels and
//! their calls are tested against the CPU ops on machines without a GPU.

#[cfg(feature = "emulate")]
pub mod emulated;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub use launch::{run, run_in_place, run_to};

/// One kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// The op's input `i` (a device pointer).
    In(usize),
    /// The op's output (a device pointer): a new buffer as long as the first input for
    /// `run`, the destination updated in place for `run_in_place`.
    Out,
    /// A null pointer (an absent weight or bias).
    Null,
    I32(i32),
    I64(i64),
    U64(u64),
    F64(f64),
}

/// A kernel launch: `<kernel>_<dtype>` over `grid` blocks of `block` threads, `<dtype>`
/// being the type of the operand `named_by` (an input or the output).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub kernel: &'static str,
    pub grid: u32,
    pub block: (u32, u32),
    pub args: Vec<Arg>,
    pub named_by: Arg,
}

/// Rows per block of a row kernel (one warp each).
const ROWS_PER_BLOCK: u32 = 4;
/// Threads per block of an elementwise kernel, and the most blocks its grid-stride loop uses.
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 1 << 16;

fn row_call(kernel: &'static str, rows: usize, args: Vec<Arg>) -> Call {
    let grid = rows.div_ceil(ROWS_PER_BLOCK as usize).max(1) as u32;
    Call { kernel, grid, block: (32, ROWS_PER_BLOCK), args, named_by: Arg::In(0) }
}

fn elementwise_call(kernel: &'static str, n: usize, args: Vec<Arg>) -> Call {
    let grid = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    Call { kernel, grid, block: (THREADS, 1), args, named_by: Arg::In(0) }
}

fn optional(present: bool, input: usize) -> Arg {
    if present { Arg::In(input) } else { Arg::Null }
}

fn len(n: usize) -> Arg {
    Arg::I64(n as i64)
}

fn width(w: usize) -> Arg {
    Arg::I32(w as i32)
}

/// Layer norm (`center`) or RMS norm of `rows` rows of width `w`: inputs `x`, then the
/// weight (input 1) and the bias (input 2) when present.
pub fn norm_fwd(rows: usize, w: usize, weight: bool, bias: bool, center: bool, eps: f64) -> Call {
    row_call(
        "tf_norm_fwd",
        rows,
        vec![
            Arg::In(0),
            optional(weight, 1),
            optional(bias, 2),
            Arg::Out,
            len(rows),
            width(w),
            Arg::I32(center.into()),
            Arg::F64(eps),
        ],
    )
}

/// The norm's input gradient: inputs `x`, the weight (or none), `dy` (input 2).
pub fn norm_grad(rows: usize, w: usize, weight: bool, center: bool, eps: f64) -> Call {
    row_call(
        "tf_norm_grad",
        rows,
        vec![
            Arg::In(0),
            optional(weight, 1),
            Arg::In(2),
            Arg::Out,
            len(rows),
            width(w),
            Arg::I32(center.into()),
            Arg::F64(eps),
        ],
    )
}

/// How a softmax's additive bias (an attention mask) lines up with the rows of its scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BiasRows {
    /// Rows per batch are `heads × queries`.
    pub heads: usize,
    pub queries: usize,
    /// Whether the bias has one row set per batch element, and one row per query.
    pub per_batch: bool,
    pub per_query: bool,
}

impl BiasRows {
    /// The bias row that score row `r` adds (the kernel's own formula).
    pub fn row(&self, r: usize) -> usize {
        let per_batch = self.heads * self.queries;
        let batch = if self.per_batch { r / per_batch.max(1) } else { 0 };
        let query = if self.per_query { r % self.queries.max(1) } else { 0 };
        batch * if self.per_query { self.queries } else { 1 } + query
    }
}

/// `softmax(scale · x + bias)` over rows of width `w`: inputs `x` and the bias (input 1).
pub fn softmax_fwd(rows: usize, w: usize, scale: f64, bias: Option<BiasRows>) -> Call {
    let b = bias.unwrap_or(BiasRows { heads: 1, queries: 1, per_batch: false, per_query: false });
    row_call(
        "tf_softmax_fwd",
        rows,
        vec![
            Arg::In(0),
            optional(bias.is_some(), 1),
            Arg::Out,
            len(rows),
            width(w),
            Arg::F64(scale),
            len(b.heads),
            len(b.queries),
            Arg::I32(b.per_batch.into()),
            Arg::I32(b.per_query.into()),
        ],
    )
}

/// The softmax's input gradient `scale · y · (dy - Σ dy·y)`: inputs `y`, `dy`.
pub fn softmax_grad(rows: usize, w: usize, scale: f64) -> Call {
    row_call("tf_softmax_grad", rows, vec![Arg::In(0), Arg::In(1), Arg::Out, len(rows), width(w), Arg::F64(scale)])
}

pub fn gelu_fwd(n: usize) -> Call {
    elementwise_call("tf_gelu_fwd", n, vec![Arg::In(0), Arg::Out, len(n)])
}

/// Inputs `x`, `dy`.
pub fn gelu_grad(n: usize) -> Call {
    elementwise_call("tf_gelu_grad", n, vec![Arg::In(0), Arg::In(1), Arg::Out, len(n)])
}

/// Inverted dropout with the mask of `fused::kept(seed, threshold, index)`.
pub fn dropout(n: usize, seed: u64, threshold: u64, scale: f64) -> Call {
    elementwise_call(
        "tf_dropout",
        n,
        vec![Arg::In(0), Arg::Out, len(n), Arg::U64(seed), Arg::U64(threshold), Arg::F64(scale)],
    )
}

/// `x + b` with `b` (input 1) of width `w` repeated over the rows.
pub fn bias_add(n: usize, w: usize) -> Call {
    elementwise_call("tf_bias_add", n, vec![Arg::In(0), Arg::In(1), Arg::Out, len(n), width(w)])
}

/// Blocks of a [`sum_squares`] grid: enough to keep the memory busy, few enough that the
/// warps' atomic adds into one slot do not queue.
const SUM_BLOCKS: usize = 512;

/// `Σ g²` over the `n` elements of input 0 (naming the kernel), added into element `slot` of
/// the destination (f32, or f64 for f64 input), which holds one slot per gradient.
pub fn sum_squares(n: usize, slot: usize) -> Call {
    let mut call = elementwise_call("tf_sum_squares", n, vec![Arg::In(0), Arg::Out, len(n), len(slot)]);
    call.grid = n.div_ceil(THREADS as usize).clamp(1, SUM_BLOCKS) as u32;
    call
}

/// The gradient of looking up `rows` rows of width `w` in a table of `vocab` rows: inputs the
/// ids (u32) and the rows' gradient `dy` (naming the kernel); the destination, a zeroed table
/// in `dy`'s accumulation type (f32, or f64 for f64), receives `dy[r]` at row `ids[r]`.
pub fn embedding_grad(rows: usize, w: usize, vocab: usize) -> Call {
    let mut call =
        row_call("tf_embedding_grad", rows, vec![Arg::In(0), Arg::In(1), Arg::Out, len(rows), width(w), len(vocab)]);
    call.named_by = Arg::In(1);
    call
}

/// AdamW's moments of one parameter of `n` elements, in place: the destination holds its
/// f32 `m` then `v` (2n values), input 0 is the gradient (any float type, naming the kernel),
/// scaled by `grad_scale` before use.
pub fn adam_moments(n: usize, beta1: f64, beta2: f64, grad_scale: f64) -> Call {
    elementwise_call(
        "tf_adam_moments",
        n,
        vec![Arg::In(0), Arg::Out, len(n), Arg::F64(beta1), Arg::F64(beta2), Arg::F64(grad_scale)],
    )
}

/// AdamW's parameter update in place: the destination is the parameter (naming the
/// kernel), input 0 its f32 moments as [`adam_moments`] leaves them.
/// `p ← p · decay − lr · (m / bias1) / (√(v / bias2) + eps)`.
pub fn adam_apply(n: usize, decay: f64, lr: f64, bias1: f64, bias2: f64, eps: f64) -> Call {
    let mut call = elementwise_call(
        "tf_adam_apply",
        n,
        vec![
            Arg::Out,
            Arg::In(0),
            len(n),
            Arg::F64(decay),
            Arg::F64(lr),
            Arg::F64(bias1),
            Arg::F64(bias2),
            Arg::F64(eps),
        ],
    );
    call.named_by = Arg::Out;
    call
}

/// Cross-entropy of `rows` rows of logits of width `w` against u32 targets (input 1): one
/// value per row, `log Σ exp(x) − x[t]`.
pub fn xent_fwd(rows: usize, w: usize) -> Call {
    row_call("tf_xent_fwd", rows, vec![Arg::In(0), Arg::In(1), Arg::Out, len(rows), width(w)])
}

/// Its gradient `(softmax(x) − one-hot(t)) · dy`: inputs the logits, the targets (u32) and
/// `dy` (one value per row).
pub fn xent_grad(rows: usize, w: usize) -> Call {
    row_call("tf_xent_grad", rows, vec![Arg::In(0), Arg::In(1), Arg::In(2), Arg::Out, len(rows), width(w)])
}

/// Rotary embeddings of `rows` rows of width `2 · half` (the halves layout) at positions
/// `row % positions`: inputs `x`, `cos` and `sin` (`[positions, half]`); `inverse` rotates
/// back (the backward).
pub fn rope(rows: usize, half: usize, positions: usize, inverse: bool) -> Call {
    let pairs = rows * half;
    elementwise_call(
        "tf_rope",
        pairs,
        vec![
            Arg::In(0),
            Arg::In(1),
            Arg::In(2),
            Arg::Out,
            len(pairs),
            width(half),
            len(positions),
            Arg::I32(inverse.into()),
        ],
    )
}

/// `silu(g) · u` over `n` elements: inputs `g`, `u`.
pub fn swiglu(n: usize) -> Call {
    elementwise_call("tf_swiglu", n, vec![Arg::In(0), Arg::In(1), Arg::Out, len(n)])
}

/// The gradient of SwiGLU's gate: inputs `g`, `u`, `dy`.
pub fn swiglu_grad_gate(n: usize) -> Call {
    elementwise_call("tf_swiglu_grad_gate", n, vec![Arg::In(0), Arg::In(1), Arg::In(2), Arg::Out, len(n)])
}

/// The gradient of SwiGLU's up projection: inputs `g`, `dy`.
pub fn swiglu_grad_up(n: usize) -> Call {
    elementwise_call("tf_swiglu_grad_up", n, vec![Arg::In(0), Arg::In(1), Arg::Out, len(n)])
}
