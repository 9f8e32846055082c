//! Attention over packed sequences, without padding, as one CPU op with its own backward.
//!
//! A padded batch spends a third of an encoder's work on padding in a typical batch of
//! short texts (every row as long as the longest), and its attention is a dozen candle ops
//! (head reshapes and copies, two batched products, the mask add, softmax, dropout), each a
//! pass over memory and a buffer. Here the hidden states of a batch are packed — only the
//! real tokens, row after row, `[tokens, hidden]` — so the linear layers, norms and
//! activations see no padding, and attention runs per (sequence, head) on the packed rows:
//! scores, softmax, dropout and the weighted sum in one pass that never leaves the cache,
//! sequences in parallel. A forward pass that will be differentiated keeps its probabilities
//! (a few MB a layer); the backward pass redraws the dropout mask from its seed.
//!
//! The loops are written as row updates (`row += a · other_row`) that the compiler
//! vectorises; `pulp` compiles them for the CPU's widest vector unit (AVX-512, AVX2) and
//! picks the version at run time.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::Result;

/// Which rows of a padded `[batch, seq]` grid hold real tokens, and the packed sequences.
#[derive(Debug, Clone)]
pub(crate) struct Packing {
    /// `(first packed row, length)` per batch row.
    seqs: Arc<Vec<(usize, usize)>>,
    /// For each packed row, its index in the flattened `[batch · seq]` grid (u32).
    index: Tensor,
    batch: usize,
    seq: usize,
}

impl Packing {
    /// From a `[batch, seq]` mask (non-zero = token); tokens keep their order within a row.
    pub fn from_mask(mask: &Tensor) -> Result<Self> {
        let (batch, seq) = mask.dims2()?;
        let values = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut index = Vec::with_capacity(values.len());
        let mut seqs = Vec::with_capacity(batch);
        for row in values.chunks(seq.max(1)).take(batch) {
            let start = index.len();
            let base = (seqs.len() * seq) as u32;
            index.extend(row.iter().enumerate().filter(|(_, m)| **m != 0.0).map(|(j, _)| base + j as u32));
            seqs.push((start, index.len() - start));
        }
        let n = index.len();
        let index = Tensor::from_vec(index, n, mask.device())?;
        Ok(Self { seqs: Arc::new(seqs), index, batch, seq })
    }

    /// The packing as tensors (kept by gradient checkpointing), and back.
    /// `[batch, seq, length of each row…]` and the index.
    pub fn to_tensors(&self) -> Result<[Tensor; 2]> {
        let meta: Vec<u32> =
            [self.batch, self.seq].into_iter().chain(self.seqs.iter().map(|&(_, n)| n)).map(|v| v as u32).collect();
        let n = meta.len();
        Ok([Tensor::from_vec(meta, n, self.index.device())?, self.index.clone()])
    }

    /// The packing [`Packing::to_tensors`] stored.
    pub fn from_tensors(parts: &[Tensor]) -> Result<Self> {
        let [meta, index] = parts else {
            return Err(crate::CoreError::Param { name: "packing".into(), message: "expected two tensors".into() });
        };
        let meta = meta.to_vec1::<u32>()?;
        let [batch, seq, lens @ ..] = meta.as_slice() else {
            return Err(crate::CoreError::Param { name: "packing".into(), message: "no batch shape".into() });
        };
        let (batch, seq) = (*batch as usize, *seq as usize);
        let mut start = 0;
        let seqs = lens
            .iter()
            .map(|&n| {
                let s = (start, n as usize);
                start += n as usize;
                s
            })
            .collect();
        Ok(Self { seqs: Arc::new(seqs), index: index.clone(), batch, seq })
    }

    /// `[batch, seq, hidden]` → `[tokens, hidden]` (differentiable).
    pub fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.dim(candle_core::D::Minus1)?;
        Ok(x.reshape((self.batch * self.seq, h))?.index_select(&self.index, 0)?)
    }

    /// `[tokens, hidden]` → `[batch, seq, hidden]` with zeros at the padding (differentiable).
    pub fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.dim(1)?;
        let grid = Tensor::zeros((self.batch * self.seq, h), x.dtype(), x.device())?;
        Ok(grid.index_add(&self.index, x, 0)?.reshape((self.batch, self.seq, h))?)
    }
}

/// The widest attention head the kernels take.
const MAX_HEAD_WIDTH: usize = 256;

/// Whether [`packed_attention`] takes heads of this width.
pub(crate) fn supports_head_width(d: usize) -> bool {
    (1..=MAX_HEAD_WIDTH).contains(&d)
}

/// Multi-head attention of packed `q`, `k`, `v` (`[tokens, hidden]`, heads side by side in
/// the hidden dimension) within each sequence of `packing`; `dropout = (p, seed)` drops
/// attention probabilities. CPU, f32 or f64.
pub(crate) fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    heads: usize,
    dropout: Option<(f64, u64)>,
) -> Result<Tensor> {
    let hidden = q.dim(1)?;
    if heads == 0 || !hidden.is_multiple_of(heads) || hidden / heads > MAX_HEAD_WIDTH {
        return Err(crate::CoreError::Param {
            name: "attention".into(),
            message: format!("{hidden} columns do not split into {heads} heads of at most {MAX_HEAD_WIDTH}"),
        });
    }
    let op = PackedAttention {
        seqs: packing.seqs.clone(),
        heads,
        scale: 1.0 / ((hidden / heads) as f64).sqrt(),
        dropout: dropout.filter(|(p, _)| *p > 0.0),
        keep: q.track_op() || k.track_op() || v.track_op(),
        saved: std::sync::Mutex::new(None),
    };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct PackedAttention {
    seqs: Arc<Vec<(usize, usize)>>,
    heads: usize,
    scale: f64,
    dropout: Option<(f64, u64)>,
    /// Whether the forward keeps its probabilities for the backward (when something is
    /// differentiated: a few MB a layer, against recomputing `q kᵀ` and the exponentials).
    keep: bool,
    saved: std::sync::Mutex<Option<Saved>>,
}

/// The probabilities (before dropout) of a forward pass, per sequence `[heads, n, w]`.
enum Saved {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Lengths of the per-sequence blocks of saved probabilities.
fn saved_sizes(seqs: &[(usize, usize)], heads: usize) -> Vec<usize> {
    seqs.iter().map(|&(_, n)| heads * n * n.next_multiple_of(LANES)).collect()
}

/// Splits `buf` into consecutive blocks of the given lengths.
fn split_sizes<'a, T>(mut buf: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let (head, rest) = buf.split_at_mut(n);
        out.push(head);
        buf = rest;
    }
    out
}

/// The dropout decision for one attention probability, from its coordinates, so the
/// backward pass redraws exactly the forward's mask.
#[inline(always)]
fn kept(seed: u64, threshold: u64, seq: usize, head: usize, i: usize, j: usize) -> bool {
    let key = ((((seq as u64) << 8 | head as u64) << 16 | i as u64) << 16) | j as u64;
    super::fused::kept(seed, threshold, key)
}

/// The dropout of one call in the form the kernels use: `(threshold on 32 bits, seed,
/// 1 / (1 - p))`.
fn dropout_parts<T: Float>(dropout: Option<(f64, u64)>) -> Option<(u64, u64, T)> {
    dropout.map(|(p, seed)| (super::fused::dropout_threshold(p), seed, super::fused::dropout_scale(p)))
}

/// Rows over keys are padded to a multiple of this (one AVX-512 register of f32), so the
/// vector loops over them have no scalar tail.
const LANES: usize = 16;

/// `dst += a · src`, elementwise.
#[inline(always)]
fn axpy<T: Float>(dst: &mut [T], a: T, src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = *d + a * s;
    }
}

/// `acc += a · src` on head-width rows: with `D` known, `acc` lives in vector registers.
#[inline(always)]
fn axpy_row<T: Float, const D: usize>(acc: &mut [T; D], a: T, src: &[T]) {
    for (d, &s) in acc.iter_mut().zip(src[..D].iter()) {
        *d = *d + a * s;
    }
}

/// `out_r = Σ_s coef(r, s) · rows_s` for `r, s < n`, rows of `D`: one accumulator per output
/// row, in registers.
#[inline(always)]
fn weighted_rows<T: Float, const D: usize>(out: &mut [T], n: usize, coef: impl Fn(usize, usize) -> T, rows: &[T]) {
    for r in 0..n {
        let mut acc = [T::zero(); D];
        for s in 0..n {
            axpy_row(&mut acc, coef(r, s), row::<T, D>(rows, s));
        }
        out[r * D..(r + 1) * D].copy_from_slice(&acc);
    }
}

/// Row `i` of a row-major matrix with rows of `D`.
#[inline(always)]
fn row<T, const D: usize>(m: &[T], i: usize) -> &[T] {
    &m[i * D..(i + 1) * D]
}

/// Columns `[head·d, (head+1)·d)` of packed rows of width `hidden`, as rows of `D ≥ d`
/// (zeros after `d`).
fn gather_head<T: Float, const D: usize>(rows: &[T], hidden: usize, head: usize, d: usize, out: &mut [T]) {
    for (o, r) in out.chunks_mut(D).zip(rows.chunks(hidden)) {
        o[..d].copy_from_slice(&r[head * d..head * d + d]);
    }
}

/// The transpose `[d, w]` of the head's columns (`w ≥ n`; columns from `n` on stay zero).
fn gather_head_t<T: Float>(rows: &[T], hidden: usize, head: usize, d: usize, w: usize, out: &mut [T]) {
    for (i, r) in rows.chunks(hidden).enumerate() {
        for t in 0..d {
            out[t * w + i] = r[head * d + t];
        }
    }
}

/// Writes rows of `D` (their first `d` values) into the head's columns of packed rows.
fn scatter_head<T: Float, const D: usize>(buf: &[T], hidden: usize, head: usize, d: usize, rows: &mut [T]) {
    for (r, b) in rows.chunks_mut(hidden).zip(buf.chunks(D)) {
        r[head * d..head * d + d].copy_from_slice(&b[..d]);
    }
}

/// Row-wise softmax of `scale · q kᵀ` into `p: [n, w]`, with `q` in rows of `D` and
/// `kt: [d, w]` (entries from `n` on are zero in both).
#[inline(always)]
fn probabilities<T: Float, const D: usize>(q: &[T], kt: &[T], n: usize, d: usize, w: usize, scale: T, p: &mut [T]) {
    for i in 0..n {
        let prow = &mut p[i * w..(i + 1) * w];
        prow.iter_mut().for_each(|v| *v = T::zero());
        for t in 0..d {
            axpy(prow, q[i * D + t] * scale, &kt[t * w..(t + 1) * w]);
        }
        let prow = &mut prow[..n];
        let max = prow.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for v in prow.iter_mut() {
            *v = (*v - max).exp();
            sum = sum + *v;
        }
        let inv = sum.recip();
        prow.iter_mut().for_each(|v| *v = *v * inv);
    }
}

/// The dropout multipliers (`1/(1-p)` or 0) of row `i` into `out`, one per key.
#[inline(always)]
fn dropout_row<T: Float>(out: &mut [T], (threshold, seed, inv_keep): (u64, u64, T), seq: usize, head: usize, i: usize) {
    for (j, m) in out.iter_mut().enumerate() {
        *m = if kept(seed, threshold, seq, head, i, j) { inv_keep } else { T::zero() };
    }
}

/// `row *= mask`, elementwise.
#[inline(always)]
fn scale_by<T: Float>(row: &mut [T], mask: &[T]) {
    row.iter_mut().zip(mask).for_each(|(v, &m)| *v = *v * m);
}

/// What a (sequence) task computes on: the sequence's index (for the dropout mask), its
/// length, the hidden width and head count, the score scale and the dropout.
#[derive(Clone, Copy)]
struct Task<T> {
    seq: usize,
    n: usize,
    hidden: usize,
    heads: usize,
    scale: T,
    dropout: Option<(u64, u64, T)>,
}

/// One sequence's attention, all heads: `out` (its `[n, hidden]` rows) from its rows of
/// `q`, `k`, `v`, with heads processed in rows of `D` (the head width rounded up).
struct SeqForward<'a, T, const D: usize> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    out: &'a mut [T],
    /// Where to keep the probabilities, `[heads, n, w]`, if anywhere.
    saved: Option<&'a mut [T]>,
    task: Task<T>,
}

impl<T: Float, const D: usize> pulp::WithSimd for SeqForward<'_, T, D> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Self { q, k, v, out, mut saved, task } = self;
        let Task { seq, n, hidden, heads, scale, dropout } = task;
        let (d, w) = (hidden / heads, n.next_multiple_of(LANES));
        let zeros = |len: usize| vec![T::zero(); len];
        let (mut qh, mut kt, mut vh, mut p, mut o) =
            (zeros(n * D), zeros(d * w), zeros(n * D), zeros(n * w), zeros(n * D));
        let mut mask = zeros(n);
        for head in 0..heads {
            gather_head::<T, D>(q, hidden, head, d, &mut qh);
            gather_head_t(k, hidden, head, d, w, &mut kt);
            gather_head::<T, D>(v, hidden, head, d, &mut vh);
            probabilities::<T, D>(&qh, &kt, n, d, w, scale, &mut p);
            if let Some(saved) = saved.as_deref_mut() {
                saved[head * n * w..(head + 1) * n * w].copy_from_slice(&p);
            }
            if let Some(drop) = dropout {
                for i in 0..n {
                    dropout_row(&mut mask, drop, seq, head, i);
                    scale_by(&mut p[i * w..i * w + n], &mask);
                }
            }
            weighted_rows::<T, D>(&mut o, n, |i, j| p[i * w + j], &vh);
            scatter_head::<T, D>(&o, hidden, head, d, out);
        }
    }
}

/// One sequence's gradients, all heads: `dq`, `dk`, `dv` (its rows) from `dout`.
struct SeqBackward<'a, T, const D: usize> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dout: &'a [T],
    /// The forward's probabilities `[heads, n, w]`.
    saved: &'a [T],
    dq: &'a mut [T],
    dk: &'a mut [T],
    dv: &'a mut [T],
    task: Task<T>,
}

impl<T: Float, const D: usize> pulp::WithSimd for SeqBackward<'_, T, D> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Self { q, k, v, dout, saved, dq, dk, dv, task } = self;
        let Task { seq, n, hidden, heads, scale, dropout } = task;
        let (d, w) = (hidden / heads, n.next_multiple_of(LANES));
        let zeros = |len: usize| vec![T::zero(); len];
        let (mut qh, mut kh, mut vt, mut go) = (zeros(n * D), zeros(n * D), zeros(d * w), zeros(n * D));
        // Per head: the dropped probabilities, then the gradient of the scores.
        let (mut pd, mut ds, mut g, mut mask) = (zeros(n * w), zeros(n * w), zeros(n * D), zeros(n));
        for head in 0..heads {
            gather_head::<T, D>(q, hidden, head, d, &mut qh);
            gather_head::<T, D>(k, hidden, head, d, &mut kh);
            gather_head_t(v, hidden, head, d, w, &mut vt);
            gather_head::<T, D>(dout, hidden, head, d, &mut go);
            let p = &saved[head * n * w..(head + 1) * n * w];
            for i in 0..n {
                // d(dropped p)_ij = dout_i · v_j, through the dropout, then softmax's backward.
                let dsrow = &mut ds[i * w..(i + 1) * w];
                dsrow.iter_mut().for_each(|x| *x = T::zero());
                for t in 0..d {
                    axpy(dsrow, go[i * D + t], &vt[t * w..(t + 1) * w]);
                }
                let pdrow = &mut pd[i * w..i * w + n];
                pdrow.copy_from_slice(&p[i * w..i * w + n]);
                if let Some(drop) = dropout {
                    dropout_row(&mut mask, drop, seq, head, i);
                    scale_by(pdrow, &mask);
                    scale_by(&mut dsrow[..n], &mask);
                }
                let prow = &p[i * w..i * w + n];
                let dot = prow.iter().zip(&dsrow[..n]).fold(T::zero(), |a, (&p, &g)| a + p * g);
                for (x, &p) in dsrow[..n].iter_mut().zip(prow) {
                    *x = p * (*x - dot) * scale;
                }
            }
            // dq_i = Σ_j ds_ij k_j (row i of ds), dk_j = Σ_i ds_ij q_i and dv_j = Σ_i pd_ij dout_i
            // (column j).
            weighted_rows::<T, D>(&mut g, n, |i, j| ds[i * w + j], &kh);
            scatter_head::<T, D>(&g, hidden, head, d, dq);
            weighted_rows::<T, D>(&mut g, n, |j, i| ds[i * w + j], &qh);
            scatter_head::<T, D>(&g, hidden, head, d, dk);
            weighted_rows::<T, D>(&mut g, n, |j, i| pd[i * w + j], &go);
            scatter_head::<T, D>(&g, hidden, head, d, dv);
        }
    }
}

/// Runs `$body` with `const D` the head width `$d` rounded up to a power of two (8 to 256).
macro_rules! with_head_width {
    ($d:expr, $D:ident => $body:expr) => {
        match $d {
            0..=8 => {
                const $D: usize = 8;
                $body
            }
            9..=16 => {
                const $D: usize = 16;
                $body
            }
            17..=32 => {
                const $D: usize = 32;
                $body
            }
            33..=64 => {
                const $D: usize = 64;
                $body
            }
            65..=128 => {
                const $D: usize = 128;
                $body
            }
            _ => {
                const $D: usize = 256;
                $body
            }
        }
    };
}

/// Splits `buf` into the consecutive `[n · hidden]` blocks of the sequences.
fn split_seqs<'a, T>(buf: &'a mut [T], seqs: &[(usize, usize)], hidden: usize) -> Vec<&'a mut [T]> {
    split_sizes(buf, &seqs.iter().map(|&(_, n)| n * hidden).collect::<Vec<_>>())
}

impl PackedAttention {
    fn check(&self, rows: usize) -> candle_core::Result<()> {
        let total: usize = self.seqs.iter().map(|s| s.1).sum();
        if total != rows {
            candle_core::bail!("packed attention: {rows} rows for sequences of {total} tokens");
        }
        Ok(())
    }

    /// The output, and the probabilities when the op keeps them.
    fn forward<T: Float + Send + Sync>(&self, q: &[T], k: &[T], v: &[T], hidden: usize) -> (Vec<T>, Option<Vec<T>>) {
        let mut out = vec![T::zero(); q.len()];
        let sizes = saved_sizes(&self.seqs, self.heads);
        let mut saved = self.keep.then(|| vec![T::zero(); sizes.iter().sum()]);
        let blocks = split_seqs(&mut out, &self.seqs, hidden);
        let saved_blocks: Vec<Option<&mut [T]>> = match saved.as_deref_mut() {
            Some(buf) => split_sizes(buf, &sizes).into_iter().map(Some).collect(),
            None => self.seqs.iter().map(|_| None).collect(),
        };
        let scale = T::from(self.scale).unwrap_or_else(T::one);
        let dropout = dropout_parts::<T>(self.dropout);
        blocks.into_par_iter().zip(saved_blocks).zip(self.seqs.par_iter()).enumerate().for_each(
            |(seq, ((out, saved), &(start, n)))| {
                let rows = start * hidden..(start + n) * hidden;
                let task = Task { seq, n, hidden, heads: self.heads, scale, dropout };
                let (q, k, v) = (&q[rows.clone()], &k[rows.clone()], &v[rows]);
                with_head_width!(hidden / self.heads, D => {
                    pulp::Arch::new().dispatch(SeqForward::<T, D> { q, k, v, out, saved, task })
                });
            },
        );
        (out, saved)
    }

    fn backward<T: Float + Send + Sync>(&self, [q, k, v, dout]: [&[T]; 4], saved: &[T], hidden: usize) -> [Vec<T>; 3] {
        let (mut dq, mut dk, mut dv) = (vec![T::zero(); q.len()], vec![T::zero(); q.len()], vec![T::zero(); q.len()]);
        let scale = T::from(self.scale).unwrap_or_else(T::one);
        let dropout = dropout_parts::<T>(self.dropout);
        let blocks = split_seqs(&mut dq, &self.seqs, hidden)
            .into_iter()
            .zip(split_seqs(&mut dk, &self.seqs, hidden))
            .zip(split_seqs(&mut dv, &self.seqs, hidden))
            .collect::<Vec<_>>();
        let sizes = saved_sizes(&self.seqs, self.heads);
        let starts: Vec<usize> = sizes.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        blocks.into_par_iter().zip(self.seqs.par_iter()).enumerate().for_each(
            |(seq, (((dq, dk), dv), &(start, n)))| {
                let rows = start * hidden..(start + n) * hidden;
                let task = Task { seq, n, hidden, heads: self.heads, scale, dropout };
                let (q, k, v, dout) = (&q[rows.clone()], &k[rows.clone()], &v[rows.clone()], &dout[rows]);
                let saved = &saved[starts[seq]..starts[seq] + sizes[seq]];
                with_head_width!(hidden / self.heads, D => {
                    pulp::Arch::new().dispatch(SeqBackward::<T, D> { q, k, v, dout, saved, dq, dk, dv, task })
                });
            },
        );
        [dq, dk, dv]
    }
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("packed attention: inputs must be contiguous"),
    }
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "tuneforge-packed-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, hidden) = lq.shape().dims2()?;
        if lk.shape() != lq.shape() || lv.shape() != lq.shape() {
            candle_core::bail!("packed attention: q, k and v must have one shape");
        }
        self.check(rows)?;
        let (out, saved) = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (out, p) = self.forward(contiguous(q, lq)?, contiguous(k, lk)?, contiguous(v, lv)?, hidden);
                (CpuStorage::F32(out), p.map(Saved::F32))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (out, p) = self.forward(contiguous(q, lq)?, contiguous(k, lk)?, contiguous(v, lv)?, hidden);
                (CpuStorage::F64(out), p.map(Saved::F64))
            }
            _ => candle_core::bail!("packed attention: only f32 and f64 (q, k, v of one dtype)"),
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, hidden) = q.dims2()?;
        self.check(rows)?;
        let dev = q.device();
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let grads = match q.dtype() {
            DType::F32 => {
                let [a, b, c, d] = [q, k, v, dout].map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()));
                let Some(Saved::F32(p)) = &*saved else {
                    candle_core::bail!("packed attention: no saved probabilities")
                };
                self.backward([&a?, &b?, &c?, &d?], p, hidden).map(|g| Tensor::from_vec(g, (rows, hidden), dev))
            }
            DType::F64 => {
                let [a, b, c, d] = [q, k, v, dout].map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f64>()));
                let Some(Saved::F64(p)) = &*saved else {
                    candle_core::bail!("packed attention: no saved probabilities")
                };
                self.backward([&a?, &b?, &c?, &d?], p, hidden).map(|g| Tensor::from_vec(g, (rows, hidden), dev))
            }
            other => candle_core::bail!("packed attention: no backward for {other:?}"),
        };
        let [dq, dk, dv] = grads;
        Ok((Some(dq?), Some(dk?), Some(dv?)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Attention of a padded batch with candle's ops: the reference.
    fn padded_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, h) = q.dims3()?;
        let d = h / heads;
        let split = |t: &Tensor| t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let bias = ((mask - 1.0)? * 1e9)?.unsqueeze(1)?.unsqueeze(1)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&bias)?;
        let probs = crate::layers::fused::softmax_last(&scores)?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?)
    }

    #[test]
    fn packed_attention_matches_the_padded_computation_and_its_gradients() -> Result<()> {
        // Head widths 4, 32 and 48: rounded up to 8, exact, rounded up to 64.
        for (h, heads) in [(8, 2), (64, 2), (96, 2)] {
            packed_matches_padded(h, heads)?;
        }
        Ok(())
    }

    fn packed_matches_padded(h: usize, heads: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (b, l) = (3, 5);
        let mask = Tensor::from_vec(vec![1f64, 1., 1., 1., 1., 1., 1., 0., 0., 0., 1., 1., 1., 1., 0.], (b, l), &dev)?;
        let vars: Vec<Var> = (0..3)
            .map(|_| Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, l, h), &dev)?))
            .collect::<candle_core::Result<_>>()?;
        let packing = Packing::from_mask(&mask)?;
        let [q, k, v] = [0, 1, 2].map(|i| packing.pack(vars[i].as_tensor()));
        let ours = packing.unpack(&packed_attention(&q?, &k?, &v?, &packing, heads, None)?)?;
        let theirs = padded_reference(&vars[0], &vars[1], &vars[2], &mask, heads)?;
        let m = mask.unsqueeze(2)?;
        let weights = Tensor::randn(0f64, 1.0, (b, l, h), &dev)?.broadcast_mul(&m)?;
        let diff = (ours.broadcast_mul(&m)? - theirs.broadcast_mul(&m)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g1 = ours.mul(&weights)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&weights)?.sum_all()?.backward()?;
        for v in &vars {
            let (a, e) = (g1.get(v).expect("grad"), g2.get(v).expect("grad"));
            let diff = (a.broadcast_mul(&m)? - e.broadcast_mul(&m)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-10, "gradient differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn dropout_is_seeded_redrawn_in_the_backward_and_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let mask = Tensor::ones((2, 6), DType::F64, &dev)?;
        let packing = Packing::from_mask(&mask)?;
        let (q, k, v) = (
            Tensor::randn(0f64, 1.0, (12, 4), &dev)?,
            Tensor::randn(0f64, 1.0, (12, 4), &dev)?,
            Tensor::randn(0f64, 1.0, (12, 4), &dev)?,
        );
        let w = Tensor::randn(0f64, 1.0, (12, 4), &dev)?;
        let f = |q: &Tensor| -> Result<f64> {
            Ok(packed_attention(q, &k, &v, &packing, 2, Some((0.3, 7)))?.mul(&w)?.sum_all()?.to_scalar::<f64>()?)
        };
        let a = packed_attention(&q, &k, &v, &packing, 2, Some((0.3, 7)))?;
        let b = packed_attention(&q, &k, &v, &packing, 2, Some((0.3, 7)))?;
        let c = packed_attention(&q, &k, &v, &packing, 2, Some((0.3, 8)))?;
        assert_eq!(a.to_vec2::<f64>()?, b.to_vec2::<f64>()?);
        assert_ne!(a.to_vec2::<f64>()?, c.to_vec2::<f64>()?);
        let qv = Var::from_tensor(&q)?;
        let grads = packed_attention(&qv, &k, &v, &packing, 2, Some((0.3, 7)))?.mul(&w)?.sum_all()?.backward()?;
        let analytic = grads.get(&qv).expect("grad").flatten_all()?.to_vec1::<f64>()?;
        let base = q.flatten_all()?.to_vec1::<f64>()?;
        for idx in [0, 5, 17, 30, 47] {
            let eps = 1e-6;
            let mut plus = base.clone();
            plus[idx] += eps;
            let mut minus = base.clone();
            minus[idx] -= eps;
            let numeric = (f(&Tensor::from_vec(plus, (12, 4), &dev)?)? - f(&Tensor::from_vec(minus, (12, 4), &dev)?)?)
                / (2.0 * eps);
            assert!((numeric - analytic[idx]).abs() < 1e-6, "element {idx}: {numeric} vs {}", analytic[idx]);
        }
        Ok(())
    }

    #[test]
    fn packing_round_trips_through_tensors() -> Result<()> {
        let mask = Tensor::from_vec(vec![1f32, 1., 0., 1., 0., 0.], (2, 3), &Device::Cpu)?;
        let p = Packing::from_mask(&mask)?;
        assert_eq!(*p.seqs, vec![(0, 2), (2, 1)]);
        assert_eq!(p.index.to_vec1::<u32>()?, vec![0, 1, 3]);
        let back = Packing::from_tensors(&p.to_tensors()?)?;
        assert_eq!(*back.seqs, *p.seqs);
        assert_eq!((back.batch, back.seq), (2, 3));
        Ok(())
    }
}
