//! Products of a few rows by a weight matrix (decoding: one new position per sequence,
//! inference only). At a handful of rows a product is bound by reading the weight; gemm
//! first copies (packs) the weight into its panel layout on every call, which reads it
//! twice and writes it once. These kernels read each weight element once, in place:
//!
//! - [`rows_times`]: `x[m, k] @ w[k, n]` for a row-major `w` (the layers' `[in, out]`
//!   weights): each row of `w` is a run of output columns, broadcast-multiplied by one
//!   input value per row of `x`;
//! - [`rows_times_t`]: `x[m, k] @ w[n, k]^T` (the output projection, stored
//!   `[vocab, hidden]`): each row of `w` is dotted with each row of `x`.
//!
//! Both fix their summation order (fused multiply-adds in `k` order; for the dot products,
//! 16 interleaved partial sums and a fixed tree), so every SIMD level gives bit-identical
//! results.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;

use super::{simd_level, written_in_full, SimdLevel};

/// The most rows [`rows_times`] takes (blocks of 8 rows share each chunk of the weight
/// while it is in L2): past that a product reuses each weight element enough that
/// gemm's packing pays (`benches/decode_products.rs` on AMD Zen 4: the layers' products
/// 1.3-1.6x gemm at 32 rows, 0.85-1.16x at 64).
pub(crate) const MAX_ROWS: usize = 32;

/// The most rows [`rows_times_t`] takes (it reads the rows once per 4 weight rows).
pub(crate) const MAX_ROWS_T: usize = 8;

/// Output columns per block of [`rows_times`] (two 512-bit vectors).
const COLS: usize = 32;

/// Partial sums of [`rows_times_t`]'s dot products (one 512-bit vector).
const LANES: usize = 16;

/// Weight rows per block of [`rows_times_t`].
const VROWS: usize = 4;

/// Row blocks of at most 4 rows for [`rows_times_t`] (its accumulators hold 4 x 4
/// vectors).
const TROWS: usize = 4;

/// The rows the kernels compute at a time for `m` rows: the next of 1, 2, 4, 8, and 8
/// past that (padding rows are zero and are not written out).
fn padded_rows(m: usize) -> usize {
    m.next_power_of_two().min(8)
}

/// Tasks for `blocks` blocks of work: a few per thread, so that an uneven split evens out.
fn tasks(blocks: usize) -> (usize, usize) {
    let per = blocks.div_ceil(4 * rayon::current_num_threads()).max(1);
    (blocks.div_ceil(per), per)
}

/// `y[m, n] = x[m, k] @ w[k, n]` (row-major, contiguous): each `y[i][j]` is
/// `x[i][0] * w[0][j]`, then `+ x[i][kk] * w[kk][j]` for `kk = 1..k` in order, each step one
/// fused multiply-add. `m` is at most [`MAX_ROWS`].
pub(crate) fn rows_times(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(m <= MAX_ROWS, "rows_times: {m} rows (at most {MAX_ROWS})");
    assert_eq!(x.len(), m * k, "rows_times: x is not [{m}, {k}]");
    assert_eq!(w.len(), k * n, "rows_times: w is not [{k}, {n}]");
    if m == 0 {
        return Vec::new();
    }
    let r = padded_rows(m);
    let xt = transposed_blocks(x, m, k, r);
    by_column_ranges(m, n, COLS, |j0, j1| match r {
        1 => col_range::<1>(&xt, k, w, n, m, j0, j1),
        2 => col_range::<2>(&xt, k, w, n, m, j0, j1),
        4 => col_range::<4>(&xt, k, w, n, m, j0, j1),
        _ => col_range::<8>(&xt, k, w, n, m, j0, j1),
    })
}

/// `x: [m, k]` in blocks of `r` rows, each transposed, `[k, r]` (rows past `m` are zero):
/// one step of a sum reads `r` consecutive values.
fn transposed_blocks(x: &[f32], m: usize, k: usize, r: usize) -> Vec<f32> {
    let nb = m.div_ceil(r);
    let mut xt = vec![0f32; nb * k * r];
    for i in 0..m {
        let (b, ri) = (i / r, i % r);
        for (kk, &v) in x[i * k..(i + 1) * k].iter().enumerate() {
            xt[(b * k + kk) * r + ri] = v;
        }
    }
    xt
}

/// A `[k, n]` weight (the layers' `[in, out]` layout) repacked for [`rows_times_panels`]:
/// panels of `width` consecutive columns, each stored as one contiguous `[k, width]` run
/// (the last panel padded with zeros). A product of a few rows then reads the weight as a
/// few long sequential streams, where [`rows_times`] reads it in place as runs of 128
/// bytes a weight row apart (on AMD Zen 5, 2 threads, SmolLM2's `gate_up` at 8 rows:
/// 33 against 22 GB/s at AVX-512, 24 against 13 GB/s at AVX2, `benches/decode_products`).
/// The width is 16 columns (one 512-bit vector) where the kernels run at AVX-512, else 8.
pub struct PanelMatrix {
    k: usize,
    n: usize,
    width: usize,
    data: Vec<f32>,
}

impl PanelMatrix {
    /// Packs `w: [k, n]` (row-major) with the width of the current SIMD level.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        let width = match simd_level() {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => 16,
            _ => 8,
        };
        Self::pack_width(w, k, n, width)
    }

    /// Packs `w: [k, n]` in panels of `width` columns.
    pub(crate) fn pack_width(w: &[f32], k: usize, n: usize, width: usize) -> Self {
        assert_eq!(w.len(), k * n, "PanelMatrix: w is not [{k}, {n}]");
        assert!(width > 0 && width <= LANES, "PanelMatrix: width {width}");
        let mut data = vec![0f32; n.div_ceil(width) * k * width];
        data.par_chunks_mut((k * width).max(1))
            .enumerate()
            .for_each(|(p, d)| {
                let (c0, cols) = (p * width, width.min(n - p * width));
                for (kk, d) in d.chunks_exact_mut(width).enumerate() {
                    d[..cols].copy_from_slice(&w[kk * n + c0..kk * n + c0 + cols]);
                }
            });
        Self { k, n, width, data }
    }

    /// `(k, n)`: the shape of the weight it holds.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `x: [m, k] @ w: [k, n]` (row-major), `m` at most 32 rows.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if m > MAX_ROWS {
            bail!("panel product: {m} rows (at most {MAX_ROWS})")
        }
        if x.len() != m * self.k {
            bail!(
                "panel product: {} input values for {m} rows of {}",
                x.len(),
                self.k
            )
        }
        Ok(rows_times_panels(x, m, self))
    }
}

/// [`rows_times`] on a [`PanelMatrix`]: the same sums in the same order (fused
/// multiply-adds in `k` order from zero), so the same bits. `m` is at most [`MAX_ROWS`].
pub(crate) fn rows_times_panels(x: &[f32], m: usize, p: &PanelMatrix) -> Vec<f32> {
    let (k, n) = (p.k, p.n);
    assert!(
        m <= MAX_ROWS,
        "rows_times_panels: {m} rows (at most {MAX_ROWS})"
    );
    assert_eq!(x.len(), m * k, "rows_times_panels: x is not [{m}, {k}]");
    if m == 0 {
        return Vec::new();
    }
    let r = padded_rows(m);
    let xt = transposed_blocks(x, m, k, r);
    by_column_ranges(m, n, p.width, |j0, j1| match r {
        1 => panel_range::<1>(&xt, m, p, j0, j1),
        2 => panel_range::<2>(&xt, m, p, j0, j1),
        4 => panel_range::<4>(&xt, m, p, j0, j1),
        _ => panel_range::<8>(&xt, m, p, j0, j1),
    })
}

/// Columns `j0..j1` (`j0` a multiple of the panel width) of [`rows_times_panels`] for the
/// row blocks of `xt` (`R` padded rows each): `[m, j1 - j0]`.
fn panel_range<const R: usize>(
    xt: &[f32],
    m: usize,
    p: &PanelMatrix,
    j0: usize,
    j1: usize,
) -> Vec<f32> {
    let (k, w, cols) = (p.k, p.width, j1 - j0);
    let nb = m.div_ceil(R);
    let mut out = written_in_full::<f32>(m * cols);
    let level = simd_level();
    for c0 in (j0..j1).step_by(w) {
        let panel = &p.data[(c0 / w) * k * w..(c0 / w + 1) * k * w];
        let valid = w.min(j1 - c0);
        for b in 0..nb {
            let xb = &xt[b * k * R..(b + 1) * k * R];
            let mut acc = [[0f32; LANES]; R];
            match (level, w) {
                // SAFETY: the level never exceeds what the CPU has; the panel holds `k`
                // rows of `w` values and `xb` `k` steps of `R`.
                #[cfg(target_arch = "x86_64")]
                (SimdLevel::Avx512, 16) => unsafe { x86::panel_rows512(xb, panel, k, &mut acc) },
                #[cfg(target_arch = "x86_64")]
                (SimdLevel::Avx512 | SimdLevel::Avx2, 8) => unsafe {
                    x86::panel_rows256(xb, panel, k, &mut acc)
                },
                _ => panel_rows(xb, panel, k, w, &mut acc),
            }
            for (r, a) in acc.iter().enumerate() {
                let i = b * R + r;
                if i >= m {
                    break;
                }
                let o = i * cols + (c0 - j0);
                out[o..o + valid].copy_from_slice(&a[..valid]);
            }
        }
    }
    out
}

/// `acc[i][c] = sum_kk xt[kk][i] * panel[kk][c]` for `c < w`: the portable kernel of
/// [`rows_times_panels`] (the order of [`strip`]).
fn panel_rows<const R: usize>(
    xt: &[f32],
    panel: &[f32],
    k: usize,
    w: usize,
    acc: &mut [[f32; LANES]; R],
) {
    for (xs, wr) in xt.chunks_exact(R).zip(panel.chunks_exact(w)).take(k) {
        for (a, &xv) in acc.iter_mut().zip(xs) {
            for (a, &wv) in a.iter_mut().zip(wr) {
                *a = xv.mul_add(wv, *a);
            }
        }
    }
}

/// `[m, n]` from output column ranges computed in parallel: `part(j0, j1)` gives columns
/// `j0..j1` as `[m, j1 - j0]`; the ranges are multiples of `unit` wide (but the last).
fn by_column_ranges(
    m: usize,
    n: usize,
    unit: usize,
    part: impl Fn(usize, usize) -> Vec<f32> + Sync,
) -> Vec<f32> {
    let (ntasks, per) = tasks(n.div_ceil(unit));
    let width = per * unit;
    let parts: Vec<Vec<f32>> = (0..ntasks)
        .into_par_iter()
        .map(|t| part(t * width, ((t + 1) * width).min(n)))
        .collect();
    let mut y = written_in_full::<f32>(m * n);
    for (t, p) in parts.iter().enumerate() {
        let (j0, cols) = (t * width, ((t + 1) * width).min(n) - t * width);
        for i in 0..m {
            y[i * n + j0..i * n + j0 + cols].copy_from_slice(&p[i * cols..(i + 1) * cols]);
        }
    }
    y
}

/// Columns `j0..j1` of [`rows_times`] for the row blocks of `xt` (`R` padded rows each):
/// `[m, j1 - j0]`.
fn col_range<const R: usize>(
    xt: &[f32],
    k: usize,
    w: &[f32],
    n: usize,
    m: usize,
    j0: usize,
    j1: usize,
) -> Vec<f32> {
    let cols = j1 - j0;
    // Per row block, the full strips, then a last narrower one.
    let (full, strips) = (cols / COLS, cols.div_ceil(COLS));
    let nb = xt.len() / (k * R).max(1);
    let mut acc = vec![[[0f32; COLS]; R]; nb * strips];
    match simd_level() {
        // SAFETY: the level never exceeds what the CPU has; the strips lie within `w`
        // (`j0 + full * COLS <= n`) and `xt` holds `nb` blocks of `k * R` values.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { x86::panel512(xt, k, w, n, j0, full, &mut acc, strips) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::panel256(xt, k, w, n, j0, full, &mut acc, strips) },
        _ => {
            for b in 0..nb {
                let xb = &xt[b * k * R..(b + 1) * k * R];
                for s in 0..full {
                    strip(xb, w, n, j0 + s * COLS, COLS, &mut acc[b * strips + s]);
                }
            }
        }
    }
    if full < strips {
        for b in 0..nb {
            let xb = &xt[b * k * R..(b + 1) * k * R];
            let width = cols - full * COLS;
            strip(
                xb,
                w,
                n,
                j0 + full * COLS,
                width,
                &mut acc[b * strips + full],
            );
        }
    }
    let mut out = written_in_full::<f32>(m * cols);
    for (bs, a) in acc.iter().enumerate() {
        let (b, s) = (bs / strips, bs % strips);
        let width = COLS.min(cols - s * COLS);
        for (r, a) in a.iter().enumerate() {
            let i = b * R + r;
            if i >= m {
                break;
            }
            let o = i * cols + s * COLS;
            out[o..o + width].copy_from_slice(&a[..width]);
        }
    }
    out
}

/// `acc[i][c] = sum_kk xt[kk][i] * w[kk][c0 + c]` for `c < width`: the portable kernel
/// of [`rows_times`] (and its reference: the vector ones must match it bit for bit).
fn strip<const R: usize>(
    xt: &[f32],
    w: &[f32],
    n: usize,
    c0: usize,
    width: usize,
    acc: &mut [[f32; COLS]; R],
) {
    for (xs, wr) in xt.chunks_exact(R).zip(w.chunks_exact(n)) {
        let wv = &wr[c0..c0 + width];
        for (a, &xv) in acc.iter_mut().zip(xs) {
            for (a, &wv) in a.iter_mut().zip(wv) {
                *a = xv.mul_add(wv, *a);
            }
        }
    }
}

/// `y[m, n] = x[m, k] @ w[n, k]^T` (row-major, contiguous): each `y[i][j]` is the dot
/// product of `x[i]` and `w[j]`, summed as [`LANES`] partial sums (`kk` with the same
/// remainder mod [`LANES`], in order, by fused multiply-adds) folded in halves. `m` is at
/// most [`MAX_ROWS_T`].
pub(crate) fn rows_times_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(
        m <= MAX_ROWS_T,
        "rows_times_t: {m} rows (at most {MAX_ROWS_T})"
    );
    assert_eq!(x.len(), m * k, "rows_times_t: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "rows_times_t: w is not [{n}, {k}]");
    let r = padded_rows(m).min(TROWS);
    by_column_ranges(m, n, VROWS, |v0, v1| match r {
        1 => dot_range::<1>(x, m, k, w, v0, v1),
        2 => dot_range::<2>(x, m, k, w, v0, v1),
        _ => dot_range::<4>(x, m, k, w, v0, v1),
    })
}

/// Weight rows `v0..v1` of [`rows_times_t`], rows of `x` `R` at a time: `[m, v1 - v0]`.
fn dot_range<const R: usize>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    v0: usize,
    v1: usize,
) -> Vec<f32> {
    let cols = v1 - v0;
    let mut out = written_in_full::<f32>(m * cols);
    let level = simd_level();
    let mut b0 = v0;
    while b0 < v1 {
        let nv = VROWS.min(v1 - b0);
        let mut wrows: [&[f32]; VROWS] = [&[]; VROWS];
        for (v, wr) in wrows.iter_mut().enumerate() {
            // A short last block repeats its last row (computed, not written).
            let j = b0 + v.min(nv - 1);
            *wr = &w[j * k..(j + 1) * k];
        }
        for i0 in (0..m).step_by(R) {
            let mut xrows: [&[f32]; R] = [&[]; R];
            for (i, xr) in xrows.iter_mut().enumerate() {
                // Rows past `m` repeat the last one (computed, not written).
                let row = (i0 + i).min(m - 1);
                *xr = &x[row * k..(row + 1) * k];
            }
            let sums = match level {
                // SAFETY: the level never exceeds what the CPU has; every row holds `k`
                // values.
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx512 => unsafe { x86::dots512(&xrows, &wrows, k, i0 == 0) },
                #[cfg(target_arch = "x86_64")]
                SimdLevel::Avx2 => unsafe { x86::dots256(&xrows, &wrows, k) },
                _ => dots(&xrows, &wrows, k),
            };
            for (i, s) in sums.iter().enumerate() {
                if i0 + i >= m {
                    break;
                }
                let o = (i0 + i) * cols + (b0 - v0);
                out[o..o + nv].copy_from_slice(&s[..nv]);
            }
        }
        b0 += nv;
    }
    out
}

/// The dot products of `xrows` with `wrows` in [`rows_times_t`]'s order: the portable
/// kernel (and the reference the vector ones match bit for bit).
fn dots<const R: usize>(
    xrows: &[&[f32]; R],
    wrows: &[&[f32]; VROWS],
    k: usize,
) -> [[f32; VROWS]; R] {
    let mut out = [[0f32; VROWS]; R];
    for (o, xr) in out.iter_mut().zip(xrows) {
        for (o, wr) in o.iter_mut().zip(wrows) {
            let mut a = [0f32; LANES];
            for (kk, (&xv, &wv)) in xr[..k].iter().zip(&wr[..k]).enumerate() {
                a[kk % LANES] = xv.mul_add(wv, a[kk % LANES]);
            }
            *o = fold16(&a);
        }
    }
    out
}

/// `sum(a)` folded in halves: lanes `l` and `l + 8`, then `l` and `l + 4`, and so on.
#[inline(always)]
fn fold16(a: &[f32; LANES]) -> f32 {
    let mut s = *a;
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            s[l] += s[l + half];
        }
        half /= 2;
    }
    s[0]
}

/// Cached keys or values the attention kernels below read: f32, or bf16 (a `kv_bf16`
/// cache) widened in registers as it is loaded, exactly (every bf16 is an f32), so both
/// give the bits of the f32 values.
pub(crate) trait CacheLanes: Copy {
    /// Whether the element is bf16 (else f32).
    const BF16: bool;
    /// The value as f32.
    fn widen(self) -> f32;
}

impl CacheLanes for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl CacheLanes for half::bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Attention scores of a few query rows against a run of cached keys:
/// `dst[r * stride + j] = q[r] . k[j]` for `r < rows`, `j < n`, where `q[r]` is
/// `q[r * hd..][..hd]` and `k[j]` is `k[j * pos..][..hd]`. Each dot product is summed as
/// in [`rows_times_t`]: [`LANES`] partial sums, folded in halves.
pub(crate) fn key_scores<K: CacheLanes>(
    (rows, n, hd): (usize, usize, usize),
    dst: &mut [f32],
    stride: usize,
    q: &[f32],
    k: &[K],
    pos: usize,
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(q.len() >= rows * hd && k.len() >= (n - 1) * pos + hd && hd <= pos);
    assert!(dst.len() >= (rows - 1) * stride + n);
    match simd_level() {
        // SAFETY: the level never exceeds what the CPU has; the asserts above bound every
        // row read and written.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if hd % LANES == 0 => unsafe {
            x86::key_scores512((rows, n, hd), dst, stride, q, k, pos)
        },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if hd % LANES == 0 => unsafe {
            x86::key_scores256((rows, n, hd), dst, stride, q, k, pos)
        },
        _ => {
            for j in 0..n {
                let kj = &k[j * pos..j * pos + hd];
                for r in 0..rows {
                    let qr = &q[r * hd..(r + 1) * hd];
                    let mut a = [0f32; LANES];
                    for (d, (&x, &y)) in qr.iter().zip(kj).enumerate() {
                        a[d % LANES] = x.mul_add(y.widen(), a[d % LANES]);
                    }
                    dst[r * stride + j] = fold16(&a);
                }
            }
        }
    }
}

/// Attention outputs of a few query rows from a run of cached values:
/// `dst[r * hd + d] += sum_j p[r * p_rs + j] * v[j * pos + d]` for `r < rows`, `d < hd`,
/// summed by fused multiply-adds onto `dst` in `j` order.
pub(crate) fn weighted_values<K: CacheLanes>(
    (rows, hd, n): (usize, usize, usize),
    dst: &mut [f32],
    p: &[f32],
    p_rs: usize,
    v: &[K],
    pos: usize,
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= rows * hd && v.len() >= (n - 1) * pos + hd && hd <= pos);
    assert!(p.len() >= (rows - 1) * p_rs + n);
    match simd_level() {
        // SAFETY: the level never exceeds what the CPU has; the asserts above bound every
        // row read and written.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if hd % (4 * LANES) == 0 => unsafe {
            x86::weighted_values512((rows, hd, n), dst, p, p_rs, v, pos)
        },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if hd % 32 == 0 => unsafe {
            x86::weighted_values256((rows, hd, n), dst, p, p_rs, v, pos)
        },
        _ => {
            for r in 0..rows {
                let out = &mut dst[r * hd..(r + 1) * hd];
                for j in 0..n {
                    let pj = p[r * p_rs + j];
                    for (o, &x) in out.iter_mut().zip(&v[j * pos..j * pos + hd]) {
                        *o = pj.mul_add(x.widen(), *o);
                    }
                }
            }
        }
    }
}

/// The AVX-512 and AVX2 kernels: the portable ones' arithmetic, step for step, in
/// vectors.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CacheLanes, COLS, LANES, VROWS};
    use std::arch::x86_64::*;

    /// 16 cached values from `p` as f32 lanes (bf16 widened).
    ///
    /// # Safety
    /// AVX-512F; 16 elements readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<K: CacheLanes>(p: *const K) -> __m512 {
        if K::BF16 {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    /// 8 cached values from `p` as f32 lanes (bf16 widened).
    ///
    /// # Safety
    /// AVX2; 8 elements readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8<K: CacheLanes>(p: *const K) -> __m256 {
        if K::BF16 {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// Weight rows per chunk of [`panel512`].
    const CHUNK: usize = 64;

    /// [`super::strip`] for the first `full` of each row block's `strips` strips from
    /// column `c0` on (`acc[b * strips + s]`: block `b` of `xt`, strip `s`), two 512-bit
    /// vectors of columns per row. The weight rows are taken [`CHUNK`] at a time, every
    /// block and strip for each chunk (the sums are stored and reloaded between chunks,
    /// which changes no value): each weight row is read as one run of contiguous columns,
    /// from memory once, the other row blocks finding the chunk in L2; the next chunk's
    /// lines are prefetched into L2 meanwhile.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `c0 + full * COLS <= n`, `full <= strips`, `w` holds `k`
    /// rows of `n` and `xt` `acc.len() / strips` blocks of `k * R` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn panel512<const R: usize>(
        xt: &[f32],
        k: usize,
        w: &[f32],
        n: usize,
        c0: usize,
        full: usize,
        acc: &mut [[[f32; COLS]; R]],
        strips: usize,
    ) {
        let nb = acc.len() / strips.max(1);
        assert!(c0 + full * COLS <= n && full <= strips && w.len() >= k * n);
        assert!(xt.len() >= nb * k * R);
        let mut k0 = 0;
        while k0 < k {
            let kn = CHUNK.min(k - k0);
            let ahead = k0 + CHUNK + kn <= k;
            for b in 0..nb {
                for s in 0..full {
                    let o = &mut acc[b * strips + s];
                    let mut a = [[_mm512_setzero_ps(); 2]; R];
                    if k0 > 0 {
                        for (a, o) in a.iter_mut().zip(o.iter()) {
                            a[0] = _mm512_loadu_ps(o.as_ptr());
                            a[1] = _mm512_loadu_ps(o.as_ptr().add(16));
                        }
                    }
                    let mut wp = w.as_ptr().add(k0 * n + c0 + s * COLS);
                    let mut xp = xt.as_ptr().add((b * k + k0) * R);
                    for _ in 0..kn {
                        if ahead && b == 0 {
                            let p = wp.add(CHUNK * n) as *const i8;
                            _mm_prefetch::<_MM_HINT_T1>(p);
                            _mm_prefetch::<_MM_HINT_T1>(p.add(64));
                        }
                        let w0 = _mm512_loadu_ps(wp);
                        let w1 = _mm512_loadu_ps(wp.add(16));
                        for (r, a) in a.iter_mut().enumerate() {
                            let xv = _mm512_set1_ps(*xp.add(r));
                            a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                            a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                        }
                        wp = wp.add(n);
                        xp = xp.add(R);
                    }
                    for (o, a) in o.iter_mut().zip(&a) {
                        _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                        _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
                    }
                }
            }
            k0 += kn;
        }
    }

    /// [`panel512`] in 256-bit vectors: each strip's chunk as four 8-column parts one
    /// after the other (the first brings the chunk's lines in, the others read them from
    /// L1), a row block of 8 filling half the registers.
    ///
    /// # Safety
    /// As [`panel512`], with AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel256<const R: usize>(
        xt: &[f32],
        k: usize,
        w: &[f32],
        n: usize,
        c0: usize,
        full: usize,
        acc: &mut [[[f32; COLS]; R]],
        strips: usize,
    ) {
        let nb = acc.len() / strips.max(1);
        assert!(c0 + full * COLS <= n && full <= strips && w.len() >= k * n);
        assert!(xt.len() >= nb * k * R);
        let mut k0 = 0;
        while k0 < k {
            let kn = CHUNK.min(k - k0);
            let ahead = k0 + CHUNK + kn <= k;
            for b in 0..nb {
                for s in 0..full {
                    let o = &mut acc[b * strips + s];
                    for part in 0..COLS / 8 {
                        let mut a = [_mm256_setzero_ps(); R];
                        if k0 > 0 {
                            for (a, o) in a.iter_mut().zip(o.iter()) {
                                *a = _mm256_loadu_ps(o.as_ptr().add(8 * part));
                            }
                        }
                        let mut wp = w.as_ptr().add(k0 * n + c0 + s * COLS + 8 * part);
                        let mut xp = xt.as_ptr().add((b * k + k0) * R);
                        for _ in 0..kn {
                            if ahead && b == 0 && part == 0 {
                                let p = wp.add(CHUNK * n) as *const i8;
                                _mm_prefetch::<_MM_HINT_T1>(p);
                                _mm_prefetch::<_MM_HINT_T1>(p.add(64));
                            }
                            let wv = _mm256_loadu_ps(wp);
                            for (r, a) in a.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(_mm256_set1_ps(*xp.add(r)), wv, *a);
                            }
                            wp = wp.add(n);
                            xp = xp.add(R);
                        }
                        for (o, a) in o.iter_mut().zip(&a) {
                            _mm256_storeu_ps(o.as_mut_ptr().add(8 * part), *a);
                        }
                    }
                }
            }
            k0 += kn;
        }
    }

    /// Weight bytes a panel kernel prefetches ahead of its loads.
    const PANEL_AHEAD: usize = 2048;

    /// [`super::panel_rows`] for a panel 16 columns wide: one 512-bit vector of sums per
    /// row, the panel read as one sequential stream, prefetched [`PANEL_AHEAD`] bytes
    /// ahead.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `panel` holds `k` rows of 16 values and `xt` `k` steps
    /// of `R`.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn panel_rows512<const R: usize>(
        xt: &[f32],
        panel: &[f32],
        k: usize,
        acc: &mut [[f32; LANES]; R],
    ) {
        assert!(panel.len() >= k * 16 && xt.len() >= k * R);
        let mut a = [_mm512_setzero_ps(); R];
        let (mut wp, mut xp) = (panel.as_ptr(), xt.as_ptr());
        for _ in 0..k {
            // A prefetch past the end is a hint that cannot fault.
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_byte_add(PANEL_AHEAD) as *const i8);
            let wv = _mm512_loadu_ps(wp);
            for (r, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(r)), wv, *a);
            }
            wp = wp.add(16);
            xp = xp.add(R);
        }
        for (o, a) in acc.iter_mut().zip(&a) {
            _mm512_storeu_ps(o.as_mut_ptr(), *a);
        }
    }

    /// [`super::panel_rows`] for a panel 8 columns wide, in 256-bit vectors.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `panel` holds `k` rows of 8 values and `xt` `k`
    /// steps of `R`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel_rows256<const R: usize>(
        xt: &[f32],
        panel: &[f32],
        k: usize,
        acc: &mut [[f32; LANES]; R],
    ) {
        assert!(panel.len() >= k * 8 && xt.len() >= k * R);
        let mut a = [_mm256_setzero_ps(); R];
        let (mut wp, mut xp) = (panel.as_ptr(), xt.as_ptr());
        for _ in 0..k {
            // A prefetch past the end is a hint that cannot fault.
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_byte_add(PANEL_AHEAD) as *const i8);
            let wv = _mm256_loadu_ps(wp);
            for (r, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_set1_ps(*xp.add(r)), wv, *a);
            }
            wp = wp.add(8);
            xp = xp.add(R);
        }
        for (o, a) in acc.iter_mut().zip(&a) {
            _mm256_storeu_ps(o.as_mut_ptr(), *a);
        }
    }

    /// [`super::dots`] with each row's 16 partial sums in one 512-bit vector.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every row holds at least `k` values.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn dots512<const R: usize>(
        xrows: &[&[f32]; R],
        wrows: &[&[f32]; VROWS],
        k: usize,
        prefetch: bool,
    ) -> [[f32; VROWS]; R] {
        assert!(xrows.iter().chain(wrows).all(|r| r.len() >= k));
        let full = k / LANES * LANES;
        let mut acc = [[_mm512_setzero_ps(); VROWS]; R];
        let mut c = 0;
        while c < full {
            if prefetch {
                // The next block's rows, one line each per 16 values read here.
                for wr in wrows {
                    _mm_prefetch::<_MM_HINT_T0>(wr.as_ptr().add(c + VROWS * k) as *const i8);
                }
            }
            let wv = wrows.map(|wr| _mm512_loadu_ps(wr.as_ptr().add(c)));
            for (a, xr) in acc.iter_mut().zip(xrows) {
                let xv = _mm512_loadu_ps(xr.as_ptr().add(c));
                for (a, wv) in a.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *wv, *a);
                }
            }
            c += LANES;
        }
        let mut out = [[0f32; VROWS]; R];
        for ((o, a), xr) in out.iter_mut().zip(&acc).zip(xrows) {
            for ((o, a), wr) in o.iter_mut().zip(a).zip(wrows) {
                let mut lanes = [0f32; LANES];
                _mm512_storeu_ps(lanes.as_mut_ptr(), *a);
                for l in 0..k - full {
                    lanes[l] = xr[full + l].mul_add(wr[full + l], lanes[l]);
                }
                *o = fold512(&lanes);
            }
        }
        out
    }

    /// [`super::key_scores`] with each dot product's partial sums in one 512-bit vector:
    /// blocks of 16 keys (which stay in L1 across the rows), whose 16 sums per row are
    /// folded together ([`fold512x16`]); the keys after the last block one at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `hd` is a multiple of [`LANES`] and the slices hold
    /// every row [`super::key_scores`] asserts.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn key_scores512<K: CacheLanes>(
        (rows, n, hd): (usize, usize, usize),
        dst: &mut [f32],
        stride: usize,
        q: &[f32],
        k: &[K],
        pos: usize,
    ) {
        let (qp, kp, dp) = (q.as_ptr(), k.as_ptr(), dst.as_mut_ptr());
        let full = n - n % LANES;
        for j0 in (0..full).step_by(LANES) {
            for r in 0..rows {
                let qr = qp.add(r * hd);
                let mut acc = [_mm512_setzero_ps(); LANES];
                for c in (0..hd).step_by(LANES) {
                    let qv = _mm512_loadu_ps(qr.add(c));
                    for (j, a) in acc.iter_mut().enumerate() {
                        let kv = load16(kp.add((j0 + j) * pos + c));
                        *a = _mm512_fmadd_ps(qv, kv, *a);
                    }
                }
                _mm512_storeu_ps(dp.add(r * stride + j0), fold512x16(&acc));
            }
        }
        let mut lanes = [0f32; LANES];
        for j in full..n {
            let kj = kp.add(j * pos);
            for r in 0..rows {
                let qr = qp.add(r * hd);
                let mut a = _mm512_setzero_ps();
                for c in (0..hd).step_by(LANES) {
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qr.add(c)), load16(kj.add(c)), a);
                }
                _mm512_storeu_ps(lanes.as_mut_ptr(), a);
                *dp.add(r * stride + j) = fold512(&lanes);
            }
        }
    }

    /// Lane `j` = [`super::fold16`] of `a[j]`, for 16 vectors at once: each step adds the
    /// same pairs of lanes as `fold16` (halves, quarters, ...), with two vectors' halves
    /// shuffled side by side, so the bits are the same; a last permutation puts the sums
    /// in order.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn fold512x16(a: &[__m512; LANES]) -> __m512 {
        // Lanes l and l + 8 of vectors 2i, 2i + 1: each 256-bit half holds one's 8 sums.
        let b: [__m512; 8] = std::array::from_fn(|i| {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            )
        });
        // Then l and l + 4: each 128-bit quarter holds one vector's 4 sums.
        let c: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        });
        // Then l and l + 2, within quarters.
        let d: [__m512; 2] = std::array::from_fn(|i| {
            let (x, y) = (c[2 * i], c[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
                _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
            )
        });
        // Then lanes 0 and 1: lane 4q + t holds the sum of vector 4t + q.
        let e = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(d[0], d[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(d[0], d[1]),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, e)
    }

    /// [`super::weighted_values`] for up to 4 rows at a time, 64 values of the head at a
    /// time (four 512-bit vectors).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `hd` is a multiple of 64 and the slices hold every row
    /// [`super::weighted_values`] asserts.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn weighted_values512<K: CacheLanes>(
        (rows, hd, n): (usize, usize, usize),
        dst: &mut [f32],
        p: &[f32],
        p_rs: usize,
        v: &[K],
        pos: usize,
    ) {
        for c in (0..hd).step_by(4 * LANES) {
            for r0 in (0..rows).step_by(4) {
                let at = (r0, c, hd, n, p_rs, pos);
                match rows - r0 {
                    1 => values_block::<1, K>(at, dst, p, v),
                    2 => values_block::<2, K>(at, dst, p, v),
                    3 => values_block::<3, K>(at, dst, p, v),
                    _ => values_block::<4, K>(at, dst, p, v),
                }
            }
        }
    }

    /// Rows `r0..r0 + NR`, head values `c..c + 64` of [`weighted_values512`].
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn values_block<const NR: usize, K: CacheLanes>(
        (r0, c, hd, n, p_rs, pos): (usize, usize, usize, usize, usize, usize),
        dst: &mut [f32],
        p: &[f32],
        v: &[K],
    ) {
        let (pp, vp, dp) = (p.as_ptr(), v.as_ptr(), dst.as_mut_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; NR];
        for (r, a) in acc.iter_mut().enumerate() {
            for (e, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(dp.add((r0 + r) * hd + c + e * LANES));
            }
        }
        for j in 0..n {
            let vj = vp.add(j * pos + c);
            let vv = [0, 1, 2, 3].map(|e| load16(vj.add(e * LANES)));
            for (r, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*pp.add((r0 + r) * p_rs + j));
                for (a, x) in a.iter_mut().zip(&vv) {
                    *a = _mm512_fmadd_ps(w, *x, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (e, a) in a.iter().enumerate() {
                _mm512_storeu_ps(dp.add((r0 + r) * hd + c + e * LANES), *a);
            }
        }
    }

    /// [`super::key_scores`] with each dot product's partial sums in two 256-bit vectors
    /// (lanes 0-7 and 8-15).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `hd` is a multiple of [`LANES`] and the slices hold
    /// every row [`super::key_scores`] asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn key_scores256<K: CacheLanes>(
        (rows, n, hd): (usize, usize, usize),
        dst: &mut [f32],
        stride: usize,
        q: &[f32],
        k: &[K],
        pos: usize,
    ) {
        let (qp, kp, dp) = (q.as_ptr(), k.as_ptr(), dst.as_mut_ptr());
        for j in 0..n {
            let kj = kp.add(j * pos);
            for r in 0..rows {
                let qr = qp.add(r * hd);
                let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for c in (0..hd).step_by(LANES) {
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(c)), load8(kj.add(c)), lo);
                    hi = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(c + 8)), load8(kj.add(c + 8)), hi);
                }
                *dp.add(r * stride + j) = fold8(_mm256_add_ps(lo, hi));
            }
        }
    }

    /// [`super::weighted_values`] for up to 2 rows at a time, 32 values of the head at a
    /// time (four 256-bit vectors).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `hd` is a multiple of 32 and the slices hold every
    /// row [`super::weighted_values`] asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_values256<K: CacheLanes>(
        (rows, hd, n): (usize, usize, usize),
        dst: &mut [f32],
        p: &[f32],
        p_rs: usize,
        v: &[K],
        pos: usize,
    ) {
        let (pp, vp, dp) = (p.as_ptr(), v.as_ptr(), dst.as_mut_ptr());
        for c in (0..hd).step_by(32) {
            for r0 in (0..rows).step_by(2) {
                let nr = 2.min(rows - r0);
                let mut acc = [[_mm256_setzero_ps(); 4]; 2];
                for (r, a) in acc.iter_mut().enumerate().take(nr) {
                    for (e, a) in a.iter_mut().enumerate() {
                        *a = _mm256_loadu_ps(dp.add((r0 + r) * hd + c + 8 * e));
                    }
                }
                for j in 0..n {
                    let vj = vp.add(j * pos + c);
                    let vv = [0, 1, 2, 3].map(|e| load8(vj.add(8 * e)));
                    for (r, a) in acc.iter_mut().enumerate().take(nr) {
                        let w = _mm256_set1_ps(*pp.add((r0 + r) * p_rs + j));
                        for (a, x) in a.iter_mut().zip(&vv) {
                            *a = _mm256_fmadd_ps(w, *x, *a);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate().take(nr) {
                    for (e, a) in a.iter().enumerate() {
                        _mm256_storeu_ps(dp.add((r0 + r) * hd + c + 8 * e), *a);
                    }
                }
            }
        }
    }

    /// The last three steps of [`super::fold16`] on its first step's 8 sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fold8(s8: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    /// [`super::fold16`] in vectors: halves, then quarters, and so on.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn fold512(a: &[f32; LANES]) -> f32 {
        let s8 = _mm256_add_ps(
            _mm256_loadu_ps(a.as_ptr()),
            _mm256_loadu_ps(a.as_ptr().add(8)),
        );
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    /// [`super::dots`] with each row's 16 partial sums in two 256-bit vectors, one weight
    /// row at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every row holds at least `k` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots256<const R: usize>(
        xrows: &[&[f32]; R],
        wrows: &[&[f32]; VROWS],
        k: usize,
    ) -> [[f32; VROWS]; R] {
        assert!(xrows.iter().chain(wrows).all(|r| r.len() >= k));
        let full = k / LANES * LANES;
        let mut out = [[0f32; VROWS]; R];
        for (v, wr) in wrows.iter().enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut c = 0;
            while c < full {
                let w0 = _mm256_loadu_ps(wr.as_ptr().add(c));
                let w1 = _mm256_loadu_ps(wr.as_ptr().add(c + 8));
                for (a, xr) in acc.iter_mut().zip(xrows) {
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.as_ptr().add(c)), w0, a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.as_ptr().add(c + 8)), w1, a[1]);
                }
                c += LANES;
            }
            for ((o, a), xr) in out.iter_mut().zip(&acc).zip(xrows) {
                let mut lanes = [0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), a[1]);
                for l in 0..k - full {
                    lanes[l] = xr[full + l].mul_add(wr[full + l], lanes[l]);
                }
                o[v] = super::fold16(&lanes);
            }
        }
        out
    }
}

/// `x: [.., k] @ w` as a candle op (f32, CPU, contiguous operands, at most [`MAX_ROWS`]
/// rows, no backward): `w` is `[k, n]`, or with `transposed` `[n, k]` (the product is then
/// with its transpose).
pub(crate) struct SkinnyLinear {
    pub transposed: bool,
}

impl CustomOp2 for SkinnyLinear {
    fn name(&self) -> &'static str {
        "skinny-linear"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xv), CpuStorage::F32(wv)) = (xs, ws) else {
            bail!("skinny linear: f32 operands only")
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            bail!("skinny linear: the operands must be contiguous")
        };
        let dims = xl.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let (wr, wc) = wl.shape().dims2()?;
        let (wk, n) = if self.transposed { (wc, wr) } else { (wr, wc) };
        if k != wk {
            bail!(
                "skinny linear: input width {k} does not fit the weight {:?}{}",
                wl.dims(),
                if self.transposed { " (transposed)" } else { "" }
            )
        }
        let m = xl.shape().elem_count() / k.max(1);
        let most = if self.transposed {
            MAX_ROWS_T
        } else {
            MAX_ROWS
        };
        if m > most {
            bail!("skinny linear: {m} rows (at most {most})")
        }
        let (x, w) = (&xv[x0..x1], &wv[w0..w1]);
        let y = if self.transposed {
            rows_times_t(x, m, k, w, n)
        } else {
            rows_times(x, m, k, w, n)
        };
        let mut out = dims.to_vec();
        *out.last_mut().expect("k") = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// `x: [.., k] @ w` on a [`PanelMatrix`] of `w: [k, n]` as a candle op (f32, CPU, at most
/// [`MAX_ROWS`] rows, no backward).
pub(crate) struct PanelLinear(pub std::sync::Arc<PanelMatrix>);

impl candle_core::CustomOp1 for PanelLinear {
    fn name(&self) -> &'static str {
        "panel-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            bail!("panel linear: f32 input only")
        };
        let Some((o0, o1)) = l.contiguous_offsets() else {
            bail!("panel linear: the input must be contiguous")
        };
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let (wk, n) = self.0.dims();
        if k != wk {
            bail!("panel linear: input width {k}, weight has {wk} rows")
        }
        let m = l.shape().elem_count() / k.max(1);
        let y = self.0.matmul(&v[o0..o1], m)?;
        let mut out = dims.to_vec();
        *out.last_mut().expect("k") = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed in panels of 8 and of 16 columns, widths that are and are not multiples of
    /// the panel, 1 to 32 rows: the products equal the in-place kernel's bit for bit at
    /// the same level, and every level gives the baseline level's bits.
    #[test]
    fn panel_products_equal_the_in_place_kernel_at_every_simd_level() {
        let shapes = [
            (1, 7, 5),
            (3, 33, 70),
            (8, 130, 64),
            (5, 96, 100),
            (2, 576, 45),
        ];
        let run = || -> Vec<Vec<u32>> {
            let mut out = Vec::new();
            for (si, &(m0, k, n)) in shapes.iter().enumerate() {
                let w = values(k * n, 200 + si as u64);
                let packed = [
                    PanelMatrix::pack(&w, k, n),
                    PanelMatrix::pack_width(&w, k, n, 8),
                    PanelMatrix::pack_width(&w, k, n, 16),
                ];
                for m in [m0, 1, 2, 4, 7, 8, 9, 21, 32] {
                    let x = values(m * k, 20 * si as u64 + m as u64);
                    let y = rows_times(&x, m, k, &w, n);
                    for p in &packed {
                        let yp = rows_times_panels(&x, m, p);
                        assert!(
                            yp.iter()
                                .map(|v| v.to_bits())
                                .eq(y.iter().map(|v| v.to_bits())),
                            "[{m}, {k}] x [{k}, {n}] in panels of {}: differs from rows_times",
                            p.width
                        );
                    }
                    out.push(y.iter().map(|v| v.to_bits()).collect());
                }
            }
            out
        };
        let (reference, others) = crate::kernels::at_every_level(run);
        for (level, got) in others {
            assert!(
                got == reference,
                "{level:?}: differs from the baseline level"
            );
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every shape (rows 1..=8 and blocks of 8 up to 32, widths that are and are not
    /// multiples of the blocks, sums longer than a chunk)
    /// against an f64 product, and at every SIMD level against the baseline level's bits.
    #[test]
    fn few_row_products_match_f64_and_every_simd_level() {
        let shapes = [
            (1, 7, 5),
            (2, 64, 32),
            (3, 33, 70),
            (5, 96, 100),
            (8, 130, 64),
        ];
        let run = || -> Vec<Vec<u32>> {
            let mut out = Vec::new();
            for (si, &(m0, k, n)) in shapes.iter().enumerate() {
                for m in [m0, 1, 4, 6, 7, 8, 9, 21, 32] {
                    let x = values(m * k, 10 * si as u64 + m as u64);
                    let w = values(k * n, 100 + si as u64);
                    let y = rows_times(&x, m, k, &w, n);
                    // The transposed product takes at most 8 rows: past that, the first 8.
                    let mt = m.min(MAX_ROWS_T);
                    let yt = rows_times_t(&x[..mt * k], mt, k, &w, n);
                    for i in 0..m {
                        for j in 0..n {
                            // w as [k, n], then as [n, k].
                            let (mut r, mut rt) = (0f64, 0f64);
                            for kk in 0..k {
                                r += x[i * k + kk] as f64 * w[kk * n + j] as f64;
                                rt += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                            }
                            let tol = 1e-5 * k as f64;
                            assert!(
                                (y[i * n + j] as f64 - r).abs() < tol,
                                "rows_times [{m}, {k}] x [{k}, {n}] at ({i}, {j}): {} vs {r}",
                                y[i * n + j]
                            );
                            assert!(
                                i >= mt || (yt[i * n + j] as f64 - rt).abs() < tol,
                                "rows_times_t [{m}, {k}] x [{n}, {k}]^T at ({i}, {j}): {} vs {rt}",
                                yt[i * n + j]
                            );
                        }
                    }
                    out.push(y.iter().chain(&yt).map(|v| v.to_bits()).collect());
                }
            }
            out
        };
        let (reference, others) = crate::kernels::at_every_level(run);
        for (level, got) in others {
            assert!(
                got == reference,
                "{level:?}: differs from the baseline level"
            );
        }
    }

    /// The attention products on strided key and value runs (`pos > hd`), head sizes that
    /// do and do not fit the vector kernels, against f64 and at every SIMD level against
    /// the baseline level's bits.
    #[test]
    fn attention_products_match_f64_and_every_simd_level() {
        let run = || -> Vec<u32> {
            let mut bits = Vec::new();
            for (si, &(rows, n, hd, pos)) in [
                (3, 37, 64, 192),
                (1, 5, 64, 64),
                (7, 20, 128, 128),
                (4, 9, 24, 40),
                (16, 3, 64, 64),
            ]
            .iter()
            .enumerate()
            {
                let seed = 1000 + 10 * si as u64;
                let q = values(rows * hd, seed);
                let k = values(n * pos, seed + 1);
                let v = values(n * pos, seed + 2);
                let stride = n + 3;
                let mut p = vec![f32::NAN; rows * stride];
                key_scores((rows, n, hd), &mut p, stride, &q, &k, pos);
                let start = values(rows * hd, seed + 3);
                let mut out = start.clone();
                weighted_values((rows, hd, n), &mut out, &p, stride, &v, pos);
                for r in 0..rows {
                    let mut o64: Vec<f64> = start[r * hd..(r + 1) * hd]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    for j in 0..n {
                        let s: f64 = (0..hd)
                            .map(|d| q[r * hd + d] as f64 * k[j * pos + d] as f64)
                            .sum();
                        let got = p[r * stride + j];
                        assert!(
                            (got as f64 - s).abs() < 1e-5 * hd as f64,
                            "score ({r}, {j})"
                        );
                        for (d, o) in o64.iter_mut().enumerate() {
                            *o += got as f64 * v[j * pos + d] as f64;
                        }
                    }
                    for (d, &o) in o64.iter().enumerate() {
                        let got = out[r * hd + d] as f64;
                        assert!((got - o).abs() < 1e-4 * n as f64, "value ({r}, {d})");
                    }
                }
                // A bf16 cache: the bits of the f32 kernels on the widened values.
                let (kb, vb): (Vec<half::bf16>, Vec<half::bf16>) = (
                    k.iter().map(|&x| half::bf16::from_f32(x)).collect(),
                    v.iter().map(|&x| half::bf16::from_f32(x)).collect(),
                );
                let (kw, vw): (Vec<f32>, Vec<f32>) = (
                    kb.iter().map(|x| x.to_f32()).collect(),
                    vb.iter().map(|x| x.to_f32()).collect(),
                );
                let (mut pb, mut pw) =
                    (vec![f32::NAN; rows * stride], vec![f32::NAN; rows * stride]);
                key_scores((rows, n, hd), &mut pb, stride, &q, &kb, pos);
                key_scores((rows, n, hd), &mut pw, stride, &q, &kw, pos);
                let (mut ob, mut ow) = (start.clone(), start.clone());
                weighted_values((rows, hd, n), &mut ob, &pw, stride, &vb, pos);
                weighted_values((rows, hd, n), &mut ow, &pw, stride, &vw, pos);
                let same =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same(&pb, &pw), "bf16 keys ({rows}, {n}, {hd})");
                assert!(same(&ob, &ow), "bf16 values ({rows}, {n}, {hd})");
                assert!(!same(&pw, &p), "the bf16 keys gave the f32 scores");
                bits.extend(
                    p.iter()
                        .chain(&out)
                        .chain(&pb)
                        .chain(&ob)
                        .map(|x| x.to_bits()),
                );
            }
            bits
        };
        let (reference, others) = crate::kernels::at_every_level(run);
        for (level, got) in others {
            assert!(
                got == reference,
                "{level:?}: differs from the baseline level"
            );
        }
    }

    /// The summation order is the documented one: a hand-computed case where the order
    /// shows (a large term cancels, so rounding of the partial sums is visible).
    #[test]
    fn sums_follow_the_documented_order() {
        // rows_times: x = [1e8, 1, -1e8] (k = 3), w column = [1, 1, 1]: in k order the
        // fused sums are 1e8, 1e8 + 1 = 1e8 (rounded), then 0.
        let y = rows_times(&[1e8, 1.0, -1e8], 1, 3, &[1.0, 1.0, 1.0], 1);
        assert_eq!(y, vec![0.0]);
        // rows_times_t: k = 17: lane 0 gets x[0] w[0] then x[16] w[16]; lanes 1..16 one
        // product each. x[0] = 1e8, x[16] = -1e8, x[1] = 1: lane 0 is exactly 0, so the
        // fold gives 1 (a left-to-right sum would give 0).
        let mut x = vec![0f32; 17];
        (x[0], x[1], x[16]) = (1e8, 1.0, -1e8);
        let y = rows_times_t(&x, 1, 17, &[1f32; 17], 1);
        assert_eq!(y, vec![1.0]);
    }
}
