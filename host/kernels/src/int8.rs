//! Per-output-channel symmetric int8 matrices and their product with f32 activations.

use rayon::prelude::*;

/// Which implementation [`Int8Matrix::matmul_t`] uses on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// AVX-512 VNNI (`vpdpbusd`), weights packed in 16-column panels.
    Avx512Vnni,
    /// Portable Rust.
    Portable,
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Avx512Vnni => "avx512-vnni",
            Self::Portable => "portable",
        })
    }
}

impl KernelPath {
    /// The fastest path this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::x86::has_vnni() {
            return Self::Avx512Vnni;
        }
        Self::Portable
    }
}

/// Symmetric int8 quantization of one row: returns `scale` with `x ≈ scale · q`, `|q| ≤ 127`.
/// A zero row gets scale 0; a row holding NaN or infinity gets a NaN scale (so the product
/// is NaN, as it would be in f32).
pub fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    debug_assert_eq!(x.len(), q.len());
    let max = x.iter().fold(0f32, |m, v| if m.is_nan() || v.is_nan() { f32::NAN } else { m.max(v.abs()) });
    if max == 0.0 || !max.is_finite() {
        q.fill(0);
        return if max == 0.0 { 0.0 } else { f32::NAN };
    }
    let inv = 127.0 / max;
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    max / 127.0
}

/// An `[n, k]` int8 matrix with one scale per row (output channel).
#[derive(Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
    path: KernelPath,
    /// `Avx512Vnni` only: 16-row panels, `[rows/16][cols_pad/4][16][4]`, zero-padded.
    packed: Vec<i8>,
    /// `Avx512Vnni` only: `Σ_t q[j, t]` per row, to undo the +128 offset of activations.
    row_sums: Vec<i32>,
}

impl std::fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("path", &self.path)
            .finish()
    }
}

/// Rows of activations handled per parallel task.
const ROW_CHUNK: usize = 32;

impl Int8Matrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix, one scale per row.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        if w.len() != rows * cols {
            return Err(format!("{} values for a {rows}x{cols} matrix", w.len()));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(format!("non-finite weight at row {}, column {}", i / cols.max(1), i % cols.max(1)));
        }
        let mut q = vec![0i8; rows * cols];
        let scales = if cols == 0 {
            vec![1.0; rows]
        } else {
            w.chunks(cols).zip(q.chunks_mut(cols)).map(|(r, q)| quantize_row(r, q)).collect()
        };
        Self::from_parts(q, scales, rows, cols)
    }

    /// A matrix from stored int8 values and per-row scales.
    pub fn from_parts(q: Vec<i8>, scales: Vec<f32>, rows: usize, cols: usize) -> Result<Self, String> {
        Self::from_parts_on(q, scales, rows, cols, KernelPath::detect())
    }

    /// Like [`Int8Matrix::from_parts`] on a chosen path (tests compare paths).
    pub fn from_parts_on(
        q: Vec<i8>,
        scales: Vec<f32>,
        rows: usize,
        cols: usize,
        path: KernelPath,
    ) -> Result<Self, String> {
        if q.len() != rows * cols {
            return Err(format!("{} int8 values for a {rows}x{cols} matrix", q.len()));
        }
        if scales.len() != rows {
            return Err(format!("{} scales for {rows} rows", scales.len()));
        }
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(format!("scale of row {i} is {} (must be finite and non-negative)", scales[i]));
        }
        if q.contains(&i8::MIN) {
            return Err("int8 value -128 found; symmetric quantization uses -127..=127".into());
        }
        let path = if path == KernelPath::Avx512Vnni && KernelPath::detect() != KernelPath::Avx512Vnni {
            KernelPath::Portable
        } else {
            path
        };
        let (packed, row_sums) = match path {
            KernelPath::Avx512Vnni => pack_panels(&q, rows, cols),
            KernelPath::Portable => (Vec::new(), Vec::new()),
        };
        Ok(Self { rows, cols, q, scales, path, packed, row_sums })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The int8 values, row-major.
    pub fn values(&self) -> &[i8] {
        &self.q
    }

    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// Bytes held (values, scales and the packed copy).
    pub fn memory_bytes(&self) -> usize {
        self.q.len() + self.packed.len() + 4 * (self.scales.len() + self.row_sums.len())
    }

    /// Row `r` in f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let s = self.scales[r];
        for (o, q) in out.iter_mut().zip(&self.q[r * self.cols..(r + 1) * self.cols]) {
            *o = f32::from(*q) * s;
        }
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, o) in out.chunks_mut(self.cols).enumerate() {
                self.dequantize_row(r, o);
            }
        }
        out
    }

    /// `x · Wᵀ` for row-major `x: [m, cols]`: returns `[m, rows]`.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation length must be m * cols");
        let (n, k) = (self.rows, self.cols);
        let mut out = vec![0f32; m * n];
        if n == 0 || m == 0 {
            return out;
        }
        out.par_chunks_mut(ROW_CHUNK * n).enumerate().for_each(|(chunk, out)| {
            let r0 = chunk * ROW_CHUNK;
            let mr = out.len() / n;
            self.rows_into(&x[r0 * k..(r0 + mr) * k], mr, out);
        });
        out
    }

    /// One chunk of activation rows, sequentially.
    fn rows_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.path == KernelPath::Avx512Vnni {
            return crate::x86::matmul_vnni(
                x,
                m,
                self.cols,
                &self.packed,
                &self.row_sums,
                &self.scales,
                self.rows,
                out,
            );
        }
        let k = self.cols;
        let mut xq = vec![0i8; m * k];
        let sx: Vec<f32> = if k == 0 {
            vec![0.0; m]
        } else {
            x.chunks(k).zip(xq.chunks_mut(k)).map(|(r, q)| quantize_row(r, q)).collect()
        };
        self.portable(&xq, &sx, m, out);
    }

    fn portable(&self, xq: &[i8], sx: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        for i in 0..m {
            let xr = &xq[i * k..(i + 1) * k];
            for j in 0..n {
                out[i * n + j] = dot_i8(xr, &self.q[j * k..(j + 1) * k]) as f32 * sx[i] * self.scales[j];
            }
        }
    }
}

/// `Σ a·b` over int8 slices in i32 (written so that compilers vectorise it).
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(a, b)| i32::from(*a) * i32::from(*b)).sum()
}

/// 16-row panels for the VNNI kernel: `[panel][group of 4 columns][16 rows][4]`.
fn pack_panels(q: &[i8], rows: usize, cols: usize) -> (Vec<i8>, Vec<i32>) {
    let panels = rows.div_ceil(16);
    let groups = cols.div_ceil(4);
    let mut packed = vec![0i8; panels * groups * 64];
    for r in 0..rows {
        let (p, lane) = (r / 16, r % 16);
        for c in 0..cols {
            packed[(p * groups + c / 4) * 64 + lane * 4 + c % 4] = q[r * cols + c];
        }
    }
    let mut row_sums: Vec<i32> = q.chunks(cols.max(1)).map(|r| r.iter().map(|v| i32::from(*v)).sum()).collect();
    row_sums.resize(panels * 16, 0);
    (packed, row_sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn quantize_dequantize_error_is_within_half_a_step_per_channel() {
        let (n, k) = (37, 53);
        let mut w = random(n * k, 1);
        // Channels of very different ranges: each gets its own scale.
        for (r, row) in w.chunks_mut(k).enumerate() {
            row.iter_mut().for_each(|v| *v *= (r + 1) as f32 * 0.1);
        }
        let m = Int8Matrix::quantize(&w, n, k).expect("quantize");
        let d = m.dequantize();
        for r in 0..n {
            let max = w[r * k..(r + 1) * k].iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!((m.scales()[r] - max / 127.0).abs() <= 1e-7 * max);
            for c in 0..k {
                let err = (w[r * k + c] - d[r * k + c]).abs();
                assert!(
                    err <= m.scales()[r] * 0.5 + 1e-7,
                    "row {r} col {c}: error {err} > half a step {}",
                    m.scales()[r] / 2.0
                );
            }
        }
    }

    #[test]
    fn zero_rows_and_bad_parts_are_handled() {
        let m = Int8Matrix::quantize(&[0.0; 6], 2, 3).expect("zeros");
        assert_eq!(m.dequantize(), vec![0.0; 6]);
        assert!(Int8Matrix::quantize(&[f32::NAN, 0.0], 1, 2).expect_err("NaN").contains("row 0, column 0"));
        assert!(Int8Matrix::from_parts(vec![0; 5], vec![1.0, 1.0], 2, 3).is_err());
        assert!(Int8Matrix::from_parts(vec![0; 6], vec![1.0], 2, 3).is_err());
        assert!(Int8Matrix::from_parts(vec![-128, 0, 0, 0, 0, 0], vec![1.0, 1.0], 2, 3).is_err());
        assert!(Int8Matrix::from_parts(vec![0; 6], vec![1.0, f32::NAN], 2, 3).is_err());
    }

    fn check_product(path: KernelPath, m: usize, n: usize, k: usize) {
        let w = random(n * k, 2);
        let x = random(m * k, 3);
        let q = Int8Matrix::quantize(&w, n, k).expect("quantize");
        let q = Int8Matrix::from_parts_on(q.values().to_vec(), q.scales().to_vec(), n, k, path).expect("parts");
        let y = q.matmul_t(&x, m);
        // Exact reference for the integer product, and the f32 product for the error bound.
        let mut xq = vec![0i8; m * k];
        for i in 0..m {
            let sx = quantize_row(&x[i * k..(i + 1) * k], &mut xq[i * k..(i + 1) * k]);
            for j in 0..n {
                let exact =
                    dot_i8(&xq[i * k..(i + 1) * k], &q.values()[j * k..(j + 1) * k]) as f32 * sx * q.scales()[j];
                let got = y[i * n + j];
                assert!((got - exact).abs() <= 1e-4 * exact.abs().max(1.0), "{path}: ({i},{j}) {got} vs {exact}");
                let f: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                assert!((got - f).abs() < 0.02 * (k as f32).sqrt(), "{path}: ({i},{j}) {got} vs f32 {f}");
            }
        }
    }

    #[test]
    fn portable_product_matches_the_integer_reference() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (33, 17, 64), (70, 40, 130)] {
            check_product(KernelPath::Portable, m, n, k);
        }
    }

    #[test]
    fn detected_product_matches_the_integer_reference_on_odd_shapes() {
        // On a VNNI machine this runs the intrinsics, padding included; elsewhere the
        // portable path again (the detected path is what models use).
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (9, 16, 4), (33, 17, 64), (70, 40, 130), (65, 48, 384)] {
            check_product(KernelPath::detect(), m, n, k);
        }
    }
}
