//! AVX-512 VNNI int8 product: the only `unsafe` in the workspace.
//!
//! `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds groups of four into
//! 16 i32 lanes. Activations are shifted to `u8` by +128 and the shift is taken back out with
//! the weights' row sums: `Σ (x+128)·w = Σ x·w + 128·Σ w`. Weights are packed so that one
//! 64-byte load holds 4 consecutive columns of 16 output rows (a panel); each activation row
//! contributes a broadcast 4-byte group, so one instruction advances 16 outputs by 4 terms and
//! no horizontal sums are needed. Up to 8 activation rows share each weight load.
//!
//! Safety: every function here checks slice lengths before touching memory through
//! pointers, and the `target_feature` functions are only called after [`has_vnni`].
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m512i, __mmask16, _mm_storeu_si128, _mm512_abs_ps, _mm512_add_epi32, _mm512_cvtepi32_epi8, _mm512_cvtepi32_ps,
    _mm512_cvtps_epi32, _mm512_dpbusd_epi32, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps,
    _mm512_max_epi32, _mm512_max_ps, _mm512_min_epi32, _mm512_mul_ps, _mm512_reduce_max_ps, _mm512_set1_epi32,
    _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512, _mm512_sub_epi32,
};

/// Whether this CPU (and OS) supports the instructions the kernel uses.
pub(crate) fn has_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

const ROWS: usize = 8;

/// `out[i, j] ≈ x[i, :] · w[j, :]` for `m` rows of `x: [m, k]` (f32, quantized here per
/// row); `packed`/`row_sums` come from `pack_panels` for an `[n, k]` weight with scales `sw`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_vnni(
    x: &[f32],
    m: usize,
    k: usize,
    packed: &[i8],
    row_sums: &[i32],
    sw: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(has_vnni(), "the VNNI kernel was chosen on a CPU without AVX-512 VNNI");
    let groups = k.div_ceil(4);
    let panels = n.div_ceil(16);
    assert_eq!(x.len(), m * k);
    assert_eq!(sw.len(), n);
    assert_eq!(packed.len(), panels * groups * 64);
    assert_eq!(row_sums.len(), panels * 16);
    assert!(out.len() >= m * n);
    // Activations as u8 (q + 128), each row padded to a whole number of 4-byte groups.
    let kp = groups * 4;
    let mut xu = vec![128u8; m * kp];
    let mut sx = vec![0f32; m];
    for i in 0..m {
        // SAFETY: `has_vnni` was checked above.
        sx[i] = unsafe { quantize_row_u8(&x[i * k..(i + 1) * k], &mut xu[i * kp..i * kp + k]) };
    }
    // Panel outer, rows inner: a panel (k·16 bytes) stays in L1 while every row block of
    // this chunk passes over it.
    for p in 0..panels {
        let w = &packed[p * groups * 64..(p + 1) * groups * 64];
        let cols = 16.min(n - p * 16);
        // Per-column terms of this panel, padded to 16 lanes.
        let mut scale = [0f32; 16];
        scale[..cols].copy_from_slice(&sw[p * 16..p * 16 + cols]);
        let offset: [i32; 16] = std::array::from_fn(|l| 128 * row_sums[p * 16 + l]);
        let epilogue = Epilogue { scale: &scale, offset: &offset, cols, n, col0: p * 16 };
        for i0 in (0..m).step_by(ROWS) {
            let rows = ROWS.min(m - i0);
            let x = &xu[i0 * kp..(i0 + rows) * kp];
            let sx = &sx[i0..i0 + rows];
            let out = &mut out[i0 * n..];
            // SAFETY: `has_vnni` was checked above; `block` checks the slice lengths it uses.
            unsafe {
                match rows {
                    8 => block::<8>(x, kp, w, sx, &epilogue, out),
                    7 => block::<7>(x, kp, w, sx, &epilogue, out),
                    6 => block::<6>(x, kp, w, sx, &epilogue, out),
                    5 => block::<5>(x, kp, w, sx, &epilogue, out),
                    4 => block::<4>(x, kp, w, sx, &epilogue, out),
                    3 => block::<3>(x, kp, w, sx, &epilogue, out),
                    2 => block::<2>(x, kp, w, sx, &epilogue, out),
                    _ => block::<1>(x, kp, w, sx, &epilogue, out),
                }
            }
        }
    }
}

/// Symmetric int8 quantization of one row, written as `q + 128` bytes; returns the scale
/// (0 for a zero row, NaN when the row holds NaN or infinity — as `quantize_row`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantize_row_u8(x: &[f32], out: &mut [u8]) -> f32 {
    assert_eq!(x.len(), out.len());
    let n = x.len();
    let full = n / 16 * 16;
    let xp = x.as_ptr();
    let mut vmax = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        // SAFETY: i + 16 <= full <= x.len().
        let v = unsafe { _mm512_loadu_ps(xp.add(i)) };
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    let mut max = _mm512_reduce_max_ps(vmax);
    let mut bad = false;
    for v in x {
        bad |= !v.is_finite();
    }
    for v in &x[full..] {
        max = max.max(v.abs());
    }
    if bad {
        out.fill(128);
        return f32::NAN;
    }
    if max == 0.0 {
        out.fill(128);
        return 0.0;
    }
    let inv = _mm512_set1_ps(127.0 / max);
    let (lo, hi, off) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127), _mm512_set1_epi32(128));
    let op = out.as_mut_ptr();
    for i in (0..full).step_by(16) {
        // SAFETY: i + 16 <= full <= x.len() == out.len().
        unsafe {
            let v = _mm512_mul_ps(_mm512_loadu_ps(xp.add(i)), inv);
            // Round to nearest (even), clamp, shift to 1..=255, narrow to bytes.
            let q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), lo), hi);
            _mm_storeu_si128(op.add(i).cast(), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
        }
    }
    let inv = 127.0 / max;
    for i in full..n {
        out[i] = ((x[i] * inv).round_ties_even().clamp(-127.0, 127.0) as i32 + 128) as u8;
    }
    max / 127.0
}

/// What turns a panel's integer sums into outputs: `(acc - offset) · scale · sx[row]`,
/// written to columns `col0..col0 + cols` of rows `n` apart.
struct Epilogue<'a> {
    scale: &'a [f32; 16],
    offset: &'a [i32; 16],
    cols: usize,
    n: usize,
    col0: usize,
}

/// `R` activation rows (`x: [R, kp]` bytes) against one panel (`w: [kp/4][16][4]`), then the
/// epilogue into `out` (row `r` at `r * n + col0`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block<const R: usize>(x: &[u8], kp: usize, w: &[i8], sx: &[f32], e: &Epilogue<'_>, out: &mut [f32]) {
    let groups = kp / 4;
    assert!(x.len() >= R * kp && w.len() >= groups * 64 && sx.len() >= R && e.cols <= 16);
    assert!(R == 0 || out.len() >= (R - 1) * e.n + e.col0 + e.cols);
    let mut acc: [__m512i; R] = [_mm512_setzero_si512(); R];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for g in 0..groups {
        // SAFETY: g * 64 + 64 <= groups * 64 <= w.len().
        let wv = unsafe { _mm512_loadu_si512(wp.add(g * 64).cast()) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r * kp + g * 4 + 4 <= R * kp <= x.len().
            let four = unsafe { xp.add(r * kp + g * 4).cast::<i32>().read_unaligned() };
            *acc = _mm512_dpbusd_epi32(*acc, _mm512_set1_epi32(four), wv);
        }
    }
    // SAFETY: both arrays are 16 lanes = 64 bytes.
    let (scale, offset) = unsafe { (_mm512_loadu_ps(e.scale.as_ptr()), _mm512_loadu_si512(e.offset.as_ptr().cast())) };
    let mask: __mmask16 = if e.cols == 16 { 0xffff } else { (1u16 << e.cols) - 1 };
    for (r, acc) in acc.iter().enumerate() {
        let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(*acc, offset));
        let y = _mm512_mul_ps(_mm512_mul_ps(exact, scale), _mm512_set1_ps(sx[r]));
        // SAFETY: the masked lanes r * n + col0 .. + cols lie in `out` (asserted above).
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(r * e.n + e.col0), mask, y) };
    }
}
