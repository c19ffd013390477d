//! Rounding f32 operands to bf16 in the two layouts the bf16 kernels read ([`super::amx`]):
//! - **tiles** ([`tiles`]): the right-hand operand `[k, n]`, padded to multiples of 32, as
//!   tiles of 32 rows x 16 columns, a column block's tiles contiguous; tile row `p` holds
//!   the pairs `(b[2p][j], b[2p + 1][j])` of its 16 columns `j`;
//! - **rows** ([`rows`]): the left-hand operand `[m, k]` as rows of `kp` values.
//!
//! Either reads its source by (row, column) strides: the products of a training step take
//! weights, activations and gradients both as stored and transposed (`dy @ w^T`,
//! `x^T @ dy`). Every element, padding included, is written once.
//!
//! A training step rounds about 1.2 G values this way (SmolLM2-135M at 2,048 tokens), so
//! the AVX-512 path rounds 16 values per instruction sequence and reads every source
//! along its contiguous dimension: a transposed source is read 32 values down its rows
//! and its pairs scattered into place, never one element per cache line. The portable
//! path (any other level, or strides where neither dimension is contiguous) computes each
//! element on its own; both give the same bits ([`bf16_bits`]).

use rayon::prelude::*;

use super::{simd_level, SimdLevel};

/// `x` rounded to the nearest bf16, ties to even (NaN stays NaN, made quiet).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    // Branch-free, so that the portable loops vectorise too.
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if b & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }) as u16
}

/// A buffer the caller writes in full ([`super::written_in_full`]); a bf16 NaN pattern in
/// builds with debug assertions, so a missed element shows.
fn written_in_full(n: usize) -> Vec<u16> {
    super::written_in_full_or(n, 0x7fc1)
}

/// The f32 value of bf16 bits.
#[cfg(test)]
pub(crate) fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A source matrix: element `(r, c)` is `data[r * rs + c * cs]`, for `r < rows`,
/// `c < cols`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    /// The rounded element `(r, c)`, 0 outside the matrix (the padding).
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> u16 {
        if r < self.rows && c < self.cols {
            bf16_bits(self.data[r * self.rs + c * self.cs])
        } else {
            0
        }
    }
}

/// The tiles of `b` (`[k, n]`, padded to `kp x np`, multiples of 32): `kp * np` values,
/// tile `(nb, kb)` at `(nb * kp / 32 + kb) * 512`. The caller checks that every element
/// of `b` lies within its data.
pub(crate) fn tiles(b: Strided<'_>) -> (Vec<u16>, usize, usize) {
    tiles_on(b, true)
}

/// [`tiles`] on rayon's threads (`par`) or on the calling thread (small operands inside
/// a parallel task).
pub(crate) fn tiles_on(b: Strided<'_>, par: bool) -> (Vec<u16>, usize, usize) {
    let (kp, np) = (b.rows.div_ceil(32) * 32, b.cols.div_ceil(32) * 32);
    let kbs = kp / 32;
    let mut data = written_in_full(kp * np);
    if data.is_empty() {
        return (data, kp, np);
    }
    let wide = simd_level() == SimdLevel::Avx512;
    let column = |(nb, col): (usize, &mut [u16])| {
        for (kb, tile) in col.chunks_mut(512).enumerate() {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the level is AVX-512, so the CPU has AVX-512F.
                if unsafe { x86::tile(b, nb, kb, tile) } {
                    continue;
                }
            }
            let _ = wide;
            for (t, v) in tile.iter_mut().enumerate() {
                let (p, j, h) = (t / 32, (t % 32) / 2, t % 2);
                *v = b.at(kb * 32 + 2 * p + h, nb * 16 + j);
            }
        }
    };
    if par {
        data.par_chunks_mut(kbs * 512).enumerate().for_each(column);
    } else {
        data.chunks_mut(kbs * 512).enumerate().for_each(column);
    }
    (data, kp, np)
}

/// The rows of `a` (`[m, k]`) as `mp` rows of `kp` values (`mp >= m`, `kp >= k` a
/// multiple of 32), zero-padded. The caller checks that every element of `a` lies within
/// its data.
pub(crate) fn rows(a: Strided<'_>, mp: usize, kp: usize) -> Vec<u16> {
    rows_on(a, mp, kp, true)
}

/// [`rows`] on rayon's threads (`par`) or on the calling thread.
pub(crate) fn rows_on(a: Strided<'_>, mp: usize, kp: usize, par: bool) -> Vec<u16> {
    debug_assert!(mp >= a.rows && kp >= a.cols && kp.is_multiple_of(32));
    let mut out = written_in_full(mp * kp);
    if mp == 0 {
        return out;
    }
    let wide = simd_level() == SimdLevel::Avx512;
    // Blocks of 64 rows: a transposed source is read 64 values (256 bytes) per row.
    const BLOCK: usize = 64;
    let block = |(blk, dst): (usize, &mut [u16])| {
        let r0 = blk * BLOCK;
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the level is AVX-512, so the CPU has AVX-512F.
            if unsafe { x86::rows(a, r0, kp, dst) } {
                return;
            }
        }
        let _ = wide;
        for (i, row) in dst.chunks_mut(kp).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = a.at(r0 + i, j);
            }
        }
    };
    if par {
        out.par_chunks_mut(BLOCK * kp).enumerate().for_each(block);
    } else {
        out.chunks_mut(BLOCK * kp).enumerate().for_each(block);
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Strided;
    use std::arch::x86_64::*;

    /// [`super::bf16_bits`] of 16 lanes of f32 bits, in the low halves of 16 u32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round16(b: __m512i) -> __m512i {
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// The mask of the first `n` of 16 lanes.
    #[inline(always)]
    fn first(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// The transpose of a 16 x 16 matrix of u32 (`m[q]` lane `l` is element `(q, l)`):
    /// lane `q` of row `l` of the result is `m[q]` lane `l`. Pairs of 32-bit lanes, then
    /// 64-bit lanes, are interleaved within each 128-bit block, then the 128-bit blocks
    /// are gathered across vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(m: [__m512i; 16]) -> [__m512i; 16] {
        let mut t = [_mm512_setzero_si512(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_epi32(m[2 * k], m[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_epi32(m[2 * k], m[2 * k + 1]);
        }
        // u[4k + j], 128-bit block b: elements (4k..4k + 4, 4b + j).
        let mut u = [_mm512_setzero_si512(); 16];
        for k in 0..4 {
            let (a, b, c, d) = (t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3]);
            u[4 * k] = _mm512_unpacklo_epi64(a, c);
            u[4 * k + 1] = _mm512_unpackhi_epi64(a, c);
            u[4 * k + 2] = _mm512_unpacklo_epi64(b, d);
            u[4 * k + 3] = _mm512_unpackhi_epi64(b, d);
        }
        // Row 4b + j is block b of u[j], u[4 + j], u[8 + j], u[12 + j], in that order.
        let mut out = [_mm512_setzero_si512(); 16];
        for j in 0..4 {
            let w0 = _mm512_shuffle_i32x4::<0x44>(u[j], u[4 + j]);
            let w1 = _mm512_shuffle_i32x4::<0xee>(u[j], u[4 + j]);
            let w2 = _mm512_shuffle_i32x4::<0x44>(u[8 + j], u[12 + j]);
            let w3 = _mm512_shuffle_i32x4::<0xee>(u[8 + j], u[12 + j]);
            out[j] = _mm512_shuffle_i32x4::<0x88>(w0, w2);
            out[4 + j] = _mm512_shuffle_i32x4::<0xdd>(w0, w2);
            out[8 + j] = _mm512_shuffle_i32x4::<0x88>(w1, w3);
            out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(w1, w3);
        }
        out
    }

    /// Rounded lanes of the `n` (<= 16) contiguous values at `data[at..]`, zeros after.
    ///
    /// # Safety
    /// AVX-512F; `data[at..at + n]` in bounds when `n > 0`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(data: &[f32], at: usize, n: usize) -> __m512i {
        if n == 0 {
            return _mm512_setzero_si512();
        }
        debug_assert!(at + n <= data.len());
        round16(_mm512_maskz_loadu_epi32(
            first(n),
            data.as_ptr().add(at) as *const i32,
        ))
    }

    /// One tile `(nb, kb)` of [`super::tiles`], when a dimension of `b` is contiguous;
    /// `false` (nothing written) otherwise.
    ///
    /// # Safety
    /// AVX-512F; the elements of `b` lie within its data; `tile` is 512 values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(b: Strided<'_>, nb: usize, kb: usize, tile: &mut [u16]) -> bool {
        debug_assert_eq!(tile.len(), 512);
        let (c0, r0) = (nb * 16, kb * 32);
        let out = tile.as_mut_ptr();
        if b.cs == 1 {
            // Rows contiguous: tile row p is rows r0 + 2p and r0 + 2p + 1, interleaved.
            let nc = b.cols.saturating_sub(c0).min(16);
            for p in 0..16 {
                let (ra, rb) = (r0 + 2 * p, r0 + 2 * p + 1);
                let lo = load16(b.data, ra * b.rs + c0, if ra < b.rows { nc } else { 0 });
                let hi = load16(b.data, rb * b.rs + c0, if rb < b.rows { nc } else { 0 });
                let pair = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                _mm512_storeu_si512(out.add(32 * p) as *mut __m512i, pair);
            }
            true
        } else if b.rs == 1 {
            // Columns contiguous: column j's 32 rows are one run; its pairs go down the
            // tile, 64 bytes apart.
            let nr = b.rows.saturating_sub(r0).min(32);
            let at = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(16),
            );
            for j in 0..16 {
                let c = c0 + j;
                let (na, nb2) = if c < b.cols {
                    (nr.min(16), nr.saturating_sub(16))
                } else {
                    (0, 0)
                };
                let base = c * b.cs + r0;
                let lo = _mm512_cvtepi32_epi16(load16(b.data, base, na));
                let hi = _mm512_cvtepi32_epi16(load16(b.data, base + 16, nb2));
                let pairs = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                // Pair p (u32) goes to u16 offset 32 p + 2 j, u32 offset 16 p + j.
                _mm512_i32scatter_epi32::<4>(out.add(2 * j) as *mut i32, at, pairs);
            }
            true
        } else {
            false
        }
    }

    /// Rows `r0..r0 + dst.len() / kp` of [`super::rows`], when a dimension of `a` is
    /// contiguous; `false` (nothing written) otherwise.
    ///
    /// # Safety
    /// AVX-512F; the elements of `a` lie within its data; `dst` holds whole rows of `kp`
    /// (a multiple of 32).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(a: Strided<'_>, r0: usize, kp: usize, dst: &mut [u16]) -> bool {
        let nrows = dst.len() / kp;
        let out = dst.as_mut_ptr();
        if a.cs == 1 {
            for i in 0..nrows {
                let r = r0 + i;
                let row = out.add(i * kp);
                for c in (0..kp).step_by(16) {
                    let n = if r < a.rows {
                        a.cols.saturating_sub(c).min(16)
                    } else {
                        0
                    };
                    let v = _mm512_cvtepi32_epi16(load16(a.data, r * a.rs + c, n));
                    _mm256_storeu_si256(row.add(c) as *mut __m256i, v);
                }
            }
            true
        } else if a.rs == 1 {
            // Columns contiguous: 16 rows x 32 columns at a time. A column's 16 values
            // are one load, each pair of columns makes a vector of 16 u32 (lane l: row
            // l), and a 16 x 16 transpose in registers turns the 16 pairs into each row's
            // 64-byte run, stored whole. The row blocks are the inner loop, so a column's
            // run over all of `dst`'s rows (up to 256 bytes) is read at once and the
            // columns (far apart in a large source) are walked once per call.
            for c0 in (0..kp).step_by(32) {
                for i0 in (0..nrows).step_by(16) {
                    let (r, live) = (r0 + i0, (nrows - i0).min(16));
                    let n = a.rows.saturating_sub(r).min(live);
                    let mut v = [_mm512_setzero_si512(); 16];
                    for (q, v) in v.iter_mut().enumerate() {
                        let c = c0 + 2 * q;
                        let lo = load16(a.data, c * a.cs + r, if c < a.cols { n } else { 0 });
                        let hi = load16(
                            a.data,
                            (c + 1) * a.cs + r,
                            if c + 1 < a.cols { n } else { 0 },
                        );
                        *v = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                    }
                    let v = transpose16(v);
                    for (l, v) in v.iter().enumerate().take(live) {
                        _mm512_storeu_si512(out.add((i0 + l) * kp + c0) as *mut __m512i, *v);
                    }
                }
            }
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::at_every_level;

    /// Values with every rounding case: ties either way, NaNs (quiet and signalling, both
    /// signs), infinities, subnormals, zeros of both signs, and the largest finite value,
    /// which rounds up to infinity.
    fn awkward(n: usize, seed: u64) -> Vec<f32> {
        let mut r = tooltrain_util::Rng::new(seed);
        let special = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -(1.0 + 1.0 / 256.0),
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(1),
            f32::from_bits(0x0000_8000),
            -f32::from_bits(0x007f_ffff),
            0.0,
            -0.0,
            f32::MAX,
        ];
        (0..n)
            .map(|i| match r.next_u64() % 4 {
                0 => special[i % special.len()],
                _ => f32::from_bits(r.next_u64() as u32),
            })
            .collect()
    }

    /// Both layouts, from sources stored as is and transposed, match the element-wise
    /// reference ([`bf16_bits`] of each element, 0 in the padding) at every SIMD level,
    /// for sizes that need padding in each dimension and row counts that are not
    /// multiples of 16 or 64.
    #[test]
    fn layouts_match_the_elementwise_rounding_at_every_level() {
        for &(rows, cols) in &[(1, 1), (3, 17), (32, 16), (45, 70), (70, 33), (129, 40)] {
            let data = awkward(rows * cols, (rows * 1000 + cols) as u64);
            // The same matrix stored row-major, column-major, and with both strides > 1.
            let col_major: Vec<f32> = (0..rows * cols)
                .map(|i| data[(i % rows) * cols + i / rows])
                .collect();
            let mut spread = vec![0.0f32; rows * cols * 2];
            for r in 0..rows {
                for c in 0..cols {
                    spread[2 * (r * cols + c)] = data[r * cols + c];
                }
            }
            let sources = [
                Strided {
                    data: &data,
                    rows,
                    cols,
                    rs: cols,
                    cs: 1,
                },
                Strided {
                    data: &col_major,
                    rows,
                    cols,
                    rs: 1,
                    cs: rows,
                },
                Strided {
                    data: &spread,
                    rows,
                    cols,
                    rs: 2 * cols,
                    cs: 2,
                },
            ];
            let want = |r: usize, c: usize| {
                if r < rows && c < cols {
                    bf16_bits(data[r * cols + c])
                } else {
                    0
                }
            };
            for src in sources {
                let (base, others) = at_every_level(|| {
                    let mp = rows.div_ceil(8) * 8;
                    (tiles(src), super::rows(src, mp, cols.div_ceil(32) * 32))
                });
                for (level, got) in others {
                    assert_eq!(got, base, "{level:?} [{rows},{cols}] rs {}", src.rs);
                }
                let ((t, kp, np), a) = base;
                assert_eq!((kp, np), (rows.div_ceil(32) * 32, cols.div_ceil(32) * 32));
                for (i, &v) in t.iter().enumerate() {
                    let (tile, e) = (i / 512, i % 512);
                    let (nb, kb) = (tile / (kp / 32), tile % (kp / 32));
                    let (p, j, h) = (e / 32, (e % 32) / 2, e % 2);
                    let (r, c) = (kb * 32 + 2 * p + h, nb * 16 + j);
                    assert_eq!(v, want(r, c), "tile element ({r},{c}) of [{rows},{cols}]");
                }
                let kp = cols.div_ceil(32) * 32;
                assert_eq!(a.len(), rows.div_ceil(8) * 8 * kp);
                for (i, &v) in a.iter().enumerate() {
                    assert_eq!(
                        v,
                        want(i / kp, i % kp),
                        "row element {i} of [{rows},{cols}]"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_and_keeps_nans() {
        let v = |x: f32| bf16_value(bf16_bits(x));
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(v(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3 * 2^-8 is halfway as well; the even neighbour is 1 + 2^-6.
        assert_eq!(v(1.0 + 3.0 / 256.0), 1.015625);
        assert_eq!(v(1.0 + 1.5 / 256.0), 1.0078125);
        assert_eq!(v(-2.5), -2.5);
        assert!(v(f32::NAN).is_nan());
        // A signalling NaN whose payload lies in the dropped bits stays a NaN.
        assert!(v(f32::from_bits(0x7f80_0001)).is_nan());
        assert_eq!(v(f32::INFINITY), f32::INFINITY);
        assert_eq!(v(f32::MAX), f32::INFINITY);
    }
}
