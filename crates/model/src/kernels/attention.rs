//! Fused causal multi-head attention over the packed qkv projection (training and
//! prefill), forward and a backward that recomputes the probabilities block by block.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use rayon::prelude::*;
use std::sync::Arc;

use super::amx::{product_here, product_prefix, Bf16Kernel};
use super::bf16_layout::{bf16_bits, rows_on, tiles_on, Strided};
use super::{
    cast, dot, max_of, mm, slice, softmax_in_place, written_in_full, written_in_full_or, Elem,
};

/// Causal multi-head attention with RoPE and grouped key/value heads, fused into one
/// op over the packed projection `qkv: [b * s, (heads + 2 kv_heads) * head_dim]`
/// (q heads, then k heads, then v heads, as HF `q_proj`/`k_proj`/`v_proj` stack).
/// `cos`/`sin: [b, s, head_dim/2]`, `mask: [b, s, s]` additive and causal (a key after
/// its query is always masked). Output `[b * s, heads * head_dim]`. The backward pass
/// recomputes the attention probabilities block by block, so no `[s x s]` tensor per
/// head is kept between the passes.
///
/// The forward pass keeps each query row's log-sum-exp of its scaled, masked scores
/// ([`Attention::lse`]), so the backward pass turns recomputed scores into probabilities in
/// one pass, `exp(score - lse)`, and takes the softmax gradient's row sums from the output,
/// `rowdot(dP, P) = rowdot(dO, O)` (`hd` values per row instead of one per seen key).
///
/// With `bf16` (f32 tensors only), every product of both passes (scores, weighted values,
/// and the four of the backward) takes bf16-rounded operands with f32 sums on that kernel,
/// as mixed-precision training does; the softmax and its gradient stay in f32.
pub(crate) struct Attention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub cos: Tensor,
    pub sin: Tensor,
    /// In the dtype of `qkv`.
    pub mask: AttentionMask,
    pub bf16: Option<Bf16Kernel>,
    /// Set by the forward pass: the log-sum-exp of each query row's scaled, masked scores,
    /// `[b, heads, s]` (an op is applied once, so its backward reads its own forward's).
    pub lse: std::sync::Mutex<Option<Vec<f64>>>,
}

const QBLOCK: usize = 64;

/// Runs `f` on the CPU slices of three constant tensors (cos, sin, mask).
fn with_consts<T: WithDType, R>(
    ts: [&Tensor; 3],
    f: impl FnOnce([&[T]; 3]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = ts
        .iter()
        .map(|t| (t.storage_and_layout(), t.is_contiguous(), t.elem_count()))
        .collect();
    let mut slices: Vec<&[T]> = Vec::with_capacity(3);
    for ((st, l), contiguous, n) in &guards {
        let candle_core::Storage::Cpu(c) = &**st else {
            bail!("attention: cos, sin and mask must be on the CPU")
        };
        if !contiguous {
            bail!("attention: cos, sin and mask must be contiguous")
        }
        let o = l.start_offset();
        slices.push(&T::cpu_storage_as_slice(c)?[o..o + n]);
    }
    f([slices[0], slices[1], slices[2]])
}

struct Geometry {
    b: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    d: usize,
}

impl Attention {
    fn geometry(&self, l: &Layout) -> Result<Geometry> {
        let (n, d) = l.shape().dims2()?;
        let (b, s, _) = self.mask.mask.dims3()?;
        if n != b * s {
            bail!("attention: {n} qkv rows do not match the mask's {b} x {s} tokens")
        }
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        if d != (nh + 2 * nkv) * hd || nh % nkv != 0 || hd % 2 != 0 {
            bail!("attention: qkv width {d} does not match {nh} heads + 2 x {nkv} kv heads of {hd}")
        }
        // The softmax takes the largest scaled score as `scale` times the largest score.
        if self.scale.is_nan() || self.scale <= 0.0 {
            bail!(
                "attention: the score scale must be positive, not {}",
                self.scale
            )
        }
        if self.cos.dims() != [b, s, hd / 2]
            || self.sin.dims() != [b, s, hd / 2]
            || self.mask.mask.dims() != [b, s, s]
        {
            bail!(
                "attention: cos {:?} / sin / mask {:?} do not match qkv {:?}",
                self.cos.dims(),
                self.mask.mask.dims(),
                l.dims()
            )
        }
        Ok(Geometry {
            b,
            s,
            nh,
            nkv,
            hd,
            d,
        })
    }
}

/// Rows of one head of `qkv` (batch `bi`, column offset `col`) with RoPE applied (or
/// just copied when `cs` is `None`): `[s, hd]`.
#[inline(always)]
fn head_rows<T: Elem>(
    qkv: &[T],
    g: &Geometry,
    bi: usize,
    col: usize,
    cs: Option<(&[T], &[T])>,
) -> Vec<T> {
    let (s, hd, half) = (g.s, g.hd, g.hd / 2);
    let mut out = written_in_full(s * hd);
    for t in 0..s {
        let src = &qkv[(bi * s + t) * g.d + col..(bi * s + t) * g.d + col + hd];
        let dst = &mut out[t * hd..(t + 1) * hd];
        match cs {
            None => dst.copy_from_slice(src),
            Some((cos, sin)) => {
                let (c, sn) = (
                    &cos[(bi * s + t) * half..(bi * s + t + 1) * half],
                    &sin[(bi * s + t) * half..(bi * s + t + 1) * half],
                );
                let (a, b) = src.split_at(half);
                let (da, db) = dst.split_at_mut(half);
                rope_halves((da, db), (a, b), (c, sn));
            }
        }
    }
    out
}

/// RoPE of one row's halves `(a, b)` into `(da, db)`. Separate slices as arguments: the
/// compiler then knows that the output does not overlap the input, and vectorises the
/// loop without a run-time overlap check (which kept it scalar inline).
#[inline(always)]
fn rope_halves<T: Elem>(
    (da, db): (&mut [T], &mut [T]),
    (a, b): (&[T], &[T]),
    (c, sn): (&[T], &[T]),
) {
    let n = da.len();
    let (db, a, b, c, sn) = (&mut db[..n], &a[..n], &b[..n], &c[..n], &sn[..n]);
    for k in 0..n {
        da[k] = a[k] * c[k] - b[k] * sn[k];
        db[k] = a[k] * sn[k] + b[k] * c[k];
    }
}

/// Inverse RoPE of a head's gradient rows, in place.
#[inline(always)]
fn unrope<T: Elem>(x: &mut [T], g: &Geometry, bi: usize, cos: &[T], sin: &[T]) {
    let (s, hd, half) = (g.s, g.hd, g.hd / 2);
    for t in 0..s {
        let row = &mut x[t * hd..(t + 1) * hd];
        let (c, sn) = (
            &cos[(bi * s + t) * half..(bi * s + t + 1) * half],
            &sin[(bi * s + t) * half..(bi * s + t + 1) * half],
        );
        let (ra, rb) = row.split_at_mut(half);
        for (((a, b), &c), &sn) in ra.iter_mut().zip(rb).zip(c).zip(sn) {
            let (x, y) = (*a, *b);
            *a = x * c + y * sn;
            *b = -x * sn + y * c;
        }
    }
}

/// The keys one query sees, when its mask row is 0 exactly on `[0, pre) ∪ [lo, hi)` and
/// `-inf` elsewhere (`pre <= lo < hi`): causal rows, packed sequences, padding that sees
/// itself, and a shared prefix plus the query's own sequence all have this form.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Seen {
    pre: usize,
    lo: usize,
    hi: usize,
}

/// Each mask row's [`Seen`] keys, or `None` when some row is not of that form (other
/// values, more runs, nothing seen): the kernels then read the dense mask. Reading the
/// ranges instead of a `[b, s, s]` mask saves that mask's traffic for every head of every
/// layer (75 MB at 8 x 1536) and the exponentials of unseen keys.
fn seen_ranges<T: Elem>(mask: &[T], len: usize) -> Option<Vec<Seen>> {
    let (zero, neg) = (T::zero(), T::neg_infinity());
    mask.par_chunks(len)
        .map(|row| {
            let mut runs = [(0usize, 0usize); 2];
            let mut n = 0;
            let mut j = 0;
            while j < len {
                let v = row[j];
                if v == zero {
                    let start = j;
                    while j < len && row[j] == zero {
                        j += 1;
                    }
                    if n == 2 {
                        return None;
                    }
                    runs[n] = (start, j);
                    n += 1;
                } else if v == neg {
                    j += 1;
                } else {
                    return None;
                }
            }
            match n {
                1 => Some(Seen {
                    pre: 0,
                    lo: runs[0].0,
                    hi: runs[0].1,
                }),
                2 if runs[0].0 == 0 => Some(Seen {
                    pre: runs[0].1,
                    lo: runs[1].0,
                    hi: runs[1].1,
                }),
                _ => None,
            }
        })
        .collect()
}

/// An additive attention mask `[b, s, s]` for [`Attention`] (0 where a query sees a key,
/// `-inf` or other values elsewhere), read once into the form the kernels take: each
/// row's [`Seen`] ranges when every row has that form, else the dense mask. A pass builds
/// it once and every layer's forward and backward reads it: scanning the mask (`b s^2`
/// values) in each of them took about 5% of the attention's time.
#[derive(Clone, Debug)]
pub struct AttentionMask {
    mask: Tensor,
    ranges: Arc<Option<Vec<Seen>>>,
}

impl AttentionMask {
    /// Reads `mask: [b, s, s]`; the ranges are read from a CPU mask in f32 or f64 (any
    /// other mask keeps the dense form).
    pub fn new(mask: &Tensor) -> Result<Self> {
        let (_, s, keys) = mask.dims3()?;
        if s != keys {
            bail!(
                "attention mask {:?}: queries and keys must be the same tokens, [b, s, s]",
                mask.dims()
            )
        }
        let mask = mask.contiguous()?;
        let ranges = {
            let (st, l) = mask.storage_and_layout();
            let span = l.start_offset()..l.start_offset() + mask.elem_count();
            match &*st {
                Storage::Cpu(CpuStorage::F32(v)) => seen_ranges(&v[span], s),
                Storage::Cpu(CpuStorage::F64(v)) => seen_ranges(&v[span], s),
                _ => None,
            }
        };
        Ok(AttentionMask {
            mask,
            ranges: Arc::new(ranges),
        })
    }

    /// The mask tensor, `[b, s, s]`.
    pub fn tensor(&self) -> &Tensor {
        &self.mask
    }

    /// Whether the kernels read the mask as ranges of seen keys.
    #[cfg(test)]
    pub(crate) fn reads_ranges(&self) -> bool {
        self.ranges.is_some()
    }

    /// The same mask in `dtype`, with the ranges already read.
    pub(crate) fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(AttentionMask {
            mask: self.mask.to_dtype(dtype)?.contiguous()?,
            ranges: self.ranges.clone(),
        })
    }
}

/// How the kernels mask scores: the dense additive mask `[b, s, s]`, or its rows as
/// [`Seen`] ranges.
#[derive(Clone, Copy)]
enum Masking<'a, T> {
    Dense(&'a [T]),
    Ranges(&'a [Seen]),
}

impl<'a, T: Elem> Masking<'a, T> {
    fn new(mask: &'a [T], len: usize, ranges: &'a Option<Vec<Seen>>) -> Self {
        debug_assert!(ranges.as_ref().is_none_or(|r| r.len() * len == mask.len()));
        match ranges {
            Some(r) => Masking::Ranges(r),
            None => Masking::Dense(mask),
        }
    }

    /// How query row `t` of batch row `bi` (sequence length `s`) is masked, over its first
    /// `l` keys.
    #[inline(always)]
    fn row(self, s: usize, bi: usize, t: usize, l: usize) -> RowMask<'a, T> {
        match self {
            Masking::Ranges(seen) => RowMask::Seen(seen[bi * s + t]),
            Masking::Dense(mask) => RowMask::Dense(&mask[(bi * s + t) * s..(bi * s + t) * s + l]),
        }
    }

    /// The same masking of f32 scores, if `T` is f32.
    fn as_f32(self) -> Option<Masking<'a, f32>> {
        Some(match self {
            Masking::Ranges(r) => Masking::Ranges(r),
            Masking::Dense(m) => Masking::Dense(T::as_f32(m)?),
        })
    }
}

/// A block of query rows `r0..r1` of batch row `bi` (sequences of `s`), whose scores
/// against keys `0..r1` are multiplied by `scale` and masked by `mask`.
#[derive(Clone, Copy)]
struct Block<'a, T> {
    mask: Masking<'a, T>,
    s: usize,
    bi: usize,
    r0: usize,
    r1: usize,
    scale: T,
}

impl<'a, T: Elem> Block<'a, T> {
    #[rustfmt::skip]
    #[inline(always)]
    fn new(mask: Masking<'a, T>, s: usize, bi: usize, (r0, r1): (usize, usize), scale: T) -> Self {
        Block { mask, s, bi, r0, r1, scale }
    }

    /// How the block's `i`-th query row is masked over its `r1` keys.
    #[inline(always)]
    fn row_mask(&self, i: usize) -> RowMask<'_, T> {
        self.mask.row(self.s, self.bi, self.r0 + i, self.r1)
    }
}

/// The masking of one query row ([`Masking::row`]).
enum RowMask<'a, T> {
    Seen(Seen),
    Dense(&'a [T]),
}

/// `row[j] = exp(row[j] * k - mx)` on a slice, returning the sum of the results. Two
/// plain loops: the exponential vectorises on its own, not unrolled by hand with the sum.
#[inline(always)]
fn exp_sum<T: Elem>(row: &mut [T], k: T, mx: T) -> T {
    row.iter_mut().for_each(|v| *v = (*v * k - mx).fexp());
    dot(row, None)
}

/// The keys `seen` sees in a row of `l` scores: `[0, pre) ∪ [lo, hi)`, clipped to `l`.
#[inline(always)]
fn clipped(seen: Seen, l: usize) -> (usize, usize, usize) {
    (seen.pre.min(l), seen.lo.min(l), seen.hi.min(l))
}

/// The exponentials `exp(scale * row[j] - m)` in place on the keys `seen` sees (the
/// others are left as they are), `m` the largest scaled score: with `scale > 0` that is
/// `scale` times the largest score, the same bits as the largest of the scaled scores, so
/// the scores are not scaled in a pass of their own. Returns the sum and `m`.
#[inline(always)]
fn seen_exp<T: Elem>(row: &mut [T], seen: Seen, scale: T) -> (T, T) {
    let (pre, lo, hi) = clipped(seen, row.len());
    let (head, rest) = row.split_at_mut(lo);
    let (a, b) = (&mut head[..pre], &mut rest[..hi - lo]);
    let (ma, mb) = (max_of(a), max_of(b));
    let mx = if ma > mb { ma } else { mb } * scale;
    let sum = exp_sum(a, scale, mx) + exp_sum(b, scale, mx);
    (sum, mx)
}

/// `softmax(scale * row)` over the keys `seen` sees (0 on the others; `scale > 0`);
/// returns the log-sum-exp of the scaled scores it saw.
#[inline(always)]
fn seen_softmax<T: Elem>(row: &mut [T], seen: Seen, scale: T) -> T {
    let (sum, mx) = seen_exp(row, seen, scale);
    let f = T::one() / sum;
    let (pre, lo, hi) = clipped(seen, row.len());
    let (head, rest) = row.split_at_mut(lo);
    head[..pre].iter_mut().for_each(|v| *v = *v * f);
    rest[..hi - lo].iter_mut().for_each(|v| *v = *v * f);
    head[pre..].fill(T::zero());
    rest[hi - lo..].fill(T::zero());
    mx + sum.ln()
}

/// `out[j] = bf16(src[j] * f)`.
#[inline(always)]
fn round_scaled(out: &mut [u16], src: &[f32], f: f32) {
    for (o, &v) in out.iter_mut().zip(src) {
        *o = bf16_bits(v * f);
    }
}

/// [`softmax_rows`] of f32 scores whose probabilities are only read rounded to bf16 (the
/// forward's weighted values): the normalising pass writes them straight into `pb`, the
/// `mpb` bf16 rows of `stride` values the kernel reads (zeros where a key is unseen and
/// in the padding), instead of into `p` for a separate layout pass. The same bits as
/// rounding [`softmax_rows`]'s output.
#[inline(always)]
fn softmax_rows_bf16(
    p: &mut [f32],
    pb: &mut [u16],
    stride: usize,
    blk: Block<'_, f32>,
    lse: &mut [f64],
) {
    let (l, nr, scale) = (blk.r1, blk.r1 - blk.r0, blk.scale);
    for (i, (row, out)) in p.chunks_mut(stride).zip(pb.chunks_mut(stride)).enumerate() {
        if i >= nr {
            out.fill(0);
            continue;
        }
        let prow = &mut row[..l];
        let z = match blk.row_mask(i) {
            RowMask::Seen(seen) => {
                let (sum, mx) = seen_exp(prow, seen, scale);
                let (pre, lo, hi) = clipped(seen, l);
                round_scaled(&mut out[..pre], &prow[..pre], 1.0 / sum);
                out[pre..lo].fill(0);
                round_scaled(&mut out[lo..hi], &prow[lo..hi], 1.0 / sum);
                out[hi..].fill(0);
                mx + sum.ln()
            }
            RowMask::Dense(mrow) => {
                for j in 0..l {
                    prow[j] = prow[j] * scale + mrow[j];
                }
                let mx = max_of(prow);
                let sum = exp_sum(prow, 1.0, mx);
                round_scaled(&mut out[..l], prow, 1.0 / sum);
                out[l..].fill(0);
                mx + sum.ln()
            }
        };
        lse[blk.r0 + i] = z as f64;
    }
}

/// `row[j] = exp(row[j] * scale - lse)` on the keys `seen` sees, 0 on the others: the
/// probabilities of scores whose log-sum-exp is known, in one pass.
#[inline(always)]
fn seen_probs<T: Elem>(row: &mut [T], seen: Seen, scale: T, lse: T) {
    let (pre, lo, hi) = clipped(seen, row.len());
    let (head, rest) = row.split_at_mut(lo);
    let (own, tail) = rest.split_at_mut(hi - lo);
    let (seen_pre, gap) = head.split_at_mut(pre);
    for part in [seen_pre, own] {
        part.iter_mut().for_each(|v| *v = (*v * scale - lse).fexp());
    }
    gap.fill(T::zero());
    tail.fill(T::zero());
}

/// The probabilities of the block's queries (`q: [s, hd]`) against keys `0..r1` (`k: [s,
/// hd]`), in `p: [r1 - r0, r1]`.
#[inline(always)]
fn probs_block<T: Elem>(
    p: &mut [T],
    q: &[T],
    k: &[T],
    hd: usize,
    blk: Block<'_, T>,
    lse: &mut [f64],
) {
    let (r0, r1) = (blk.r0, blk.r1);
    mm(
        (r1 - r0, r1, hd),
        p,
        r1,
        &q[r0 * hd..],
        (hd, 1),
        k,
        (1, hd),
        false,
    );
    softmax_rows(p, r1, blk, lse);
}

/// The scores of query rows `r0..r1` against keys `0..r1` (row `i` the first `r1` values
/// at `p[i * stride..]`) scaled, masked and turned into probabilities, in place; each
/// row's log-sum-exp goes to `lse[r0 + i]` (`lse` the head's `[s]`).
#[inline(always)]
fn softmax_rows<T: Elem>(p: &mut [T], stride: usize, blk: Block<'_, T>, lse: &mut [f64]) {
    let (l, scale) = (blk.r1, blk.scale);
    for (i, row) in p.chunks_mut(stride).take(blk.r1 - blk.r0).enumerate() {
        let prow = &mut row[..l];
        let z = match blk.row_mask(i) {
            RowMask::Seen(seen) => seen_softmax(prow, seen, scale),
            RowMask::Dense(mrow) => {
                for j in 0..l {
                    prow[j] = prow[j] * scale + mrow[j];
                }
                softmax_in_place(prow, T::one())
            }
        };
        lse[blk.r0 + i] = z.to_f64();
    }
}

/// [`softmax_rows`] for scores whose rows' log-sum-exp `lse` the forward pass kept:
/// one exponential per seen key, no maximum or sum.
#[inline(always)]
fn probs_rows<T: Elem>(p: &mut [T], stride: usize, blk: Block<'_, T>, lse: &[f64]) {
    let (l, scale) = (blk.r1, blk.scale);
    for (i, row) in p.chunks_mut(stride).take(blk.r1 - blk.r0).enumerate() {
        let prow = &mut row[..l];
        let z: T = cast(lse[blk.r0 + i]);
        match blk.row_mask(i) {
            RowMask::Seen(seen) => seen_probs(prow, seen, scale, z),
            RowMask::Dense(mrow) => {
                for j in 0..l {
                    prow[j] = (prow[j] * scale + mrow[j] - z).fexp();
                }
            }
        }
    }
}

/// `rowdot(dO, O)` of one head: `[s]`, from the output gradient and the output (row
/// stride `od`, the head's columns first): the softmax gradient's row sums.
#[inline(always)]
fn out_dots<T: Elem>(dout: &[T], out: &[T], s: usize, hd: usize, od: usize) -> Vec<T> {
    (0..s)
        .map(|t| dot(&dout[t * od..t * od + hd], Some(&out[t * od..t * od + hd])))
        .collect()
}

/// `[rows, cols]` at row stride `rs` (contiguous rows) as a bf16 layout source.
fn mat(data: &[f32], rows: usize, cols: usize, rs: usize) -> Strided<'_> {
    Strided {
        data,
        rows,
        cols,
        rs,
        cs: 1,
    }
}

/// The transpose of `[cols, rows]` at row stride `stride`: element `(r, c)` is
/// `data[c * stride + r]`.
fn mat_t(data: &[f32], rows: usize, cols: usize, stride: usize) -> Strided<'_> {
    Strided {
        data,
        rows,
        cols,
        rs: 1,
        cs: stride,
    }
}

const F32_ONLY: &str = "the bf16 attention runs on f32";

/// What a bf16 buffer that the kernels write in full holds before, in builds with debug
/// assertions (a NaN, so that a missed element shows in the tests).
const BF16_UNSET: u16 = 0x7fc1;

/// What the query heads of one (batch, kv head) group share in the forward pass: the
/// roped keys `[s, hd]`, or with bf16 products the tiles of the keys' transpose and of
/// the values (and the tiles' padded key count), laid out once for the group.
enum KvShared<T> {
    Keys(Vec<T>),
    Tiles(Vec<u16>, Vec<u16>, usize),
}

/// One (batch, head) task of the forward pass with bf16 products ([`Attention::bf16`]):
/// `q` the head's roped rows `[s, hd]`, `kt` and `vt` its group's tiles ([`KvShared`]).
/// The scores of a block of queries against the keys it can see are one product from
/// the rounded queries and the keys' tiles; their softmax is rounded and multiplied by
/// the first keys' rows of the values' tiles. Returns `[s, hd]`, and the rows'
/// log-sum-exp in `lse: [s]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fwd_bf16<T: Elem>(
    kernel: Bf16Kernel,
    q: &[T],
    (kt, vt, sp): (&[u16], &[u16], usize),
    mask: Masking<'_, T>,
    g: &Geometry,
    bi: usize,
    scale: f64,
    lse: &mut [f64],
) -> Vec<T> {
    let q = T::as_f32(q).expect(F32_ONLY);
    let mask = mask.as_f32().expect(F32_ONLY);
    let (s, hd, rb) = (g.s, g.hd, kernel.row_block());
    let kq = hd.div_ceil(32) * 32;
    let qb = rows_on(mat(q, s, hd, hd), s.div_ceil(rb) * rb, kq, false);
    let mut out = written_in_full::<T>(s * hd);
    let o = T::as_f32_mut(&mut out).expect(F32_ONLY);
    for r0 in (0..s).step_by(QBLOCK) {
        let r1 = (r0 + QBLOCK).min(s);
        let (nr, lp) = (r1 - r0, r1.div_ceil(32) * 32);
        let mpb = nr.div_ceil(rb) * rb;
        let mut p = product_here(kernel, &qb[r0 * kq..], (mpb, kq, lp), kt);
        let mut pb = written_in_full_or(mpb * lp, BF16_UNSET);
        let blk = Block::new(mask, s, bi, (r0, r1), scale as f32);
        softmax_rows_bf16(&mut p, &mut pb, lp, blk, lse);
        let y = product_prefix(kernel, &pb, (mpb, lp, kq), vt, sp);
        for (orow, yrow) in o[r0 * hd..r1 * hd].chunks_mut(hd).zip(y.chunks(kq)) {
            orow.copy_from_slice(&yrow[..hd]);
        }
    }
    out
}

/// `acc[i][..hd] += y[i][..hd]` for the first `rows` rows of `y` (row stride `ys`).
#[inline(always)]
fn add_rows(acc: &mut [f32], y: &[f32], rows: usize, hd: usize, ys: usize) {
    for (a, yrow) in acc.chunks_mut(hd).zip(y.chunks(ys)).take(rows) {
        for (x, &v) in a.iter_mut().zip(&yrow[..hd]) {
            *x += v;
        }
    }
}

/// One (batch, kv head `j`) task of the backward pass with bf16 products: the same
/// gradients as the f32 task ((dQ of each group member, dK, dV), unroped), every product
/// from bf16-rounded operands with f32 sums. `out` is the forward's output and `lse` its
/// rows' log-sum-exp (`[b, heads, s]`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_bf16<T: Elem>(
    kernel: Bf16Kernel,
    (x, dout, out): (&[T], &[T], &[T]),
    (cos, sin): (&[T], &[T]),
    mask: Masking<'_, T>,
    g: &Geometry,
    (bi, j): (usize, usize),
    scale: f64,
    lse: &[f64],
) -> (Vec<Vec<T>>, Vec<T>, Vec<T>) {
    let (s, hd, nh, nkv) = (g.s, g.hd, g.nh, g.nkv);
    let (grp, od, rb) = (nh / nkv, nh * hd, kernel.row_block());
    let kq = hd.div_ceil(32) * 32;
    let kr = head_rows(x, g, bi, (nh + j) * hd, Some((cos, sin)));
    let k = T::as_f32(&kr).expect(F32_ONLY);
    let v = T::as_f32(&x[(bi * s) * g.d + (nh + nkv + j) * hd..]).expect(F32_ONLY);
    let dout = T::as_f32(dout).expect(F32_ONLY);
    let fmask = mask.as_f32().expect(F32_ONLY);
    let scale = scale as f32;
    // K^T for the scores, K for dQ = dS K, V^T for dP = dO V^T.
    let (kt, _, sp) = tiles_on(mat_t(k, hd, s, hd), false);
    let (kn, _, _) = tiles_on(mat(k, s, hd, hd), false);
    let (vt, _, _) = tiles_on(mat_t(v, hd, s, g.d), false);
    let mut dk_t = vec![T::zero(); s * hd];
    let mut dv_t = vec![T::zero(); s * hd];
    let (dk, dv) = (
        T::as_f32_mut(&mut dk_t).expect(F32_ONLY),
        T::as_f32_mut(&mut dv_t).expect(F32_ONLY),
    );
    let mut dqs = Vec::with_capacity(grp);
    for h in j * grp..(j + 1) * grp {
        let qr = head_rows(x, g, bi, h * hd, Some((cos, sin)));
        let q = T::as_f32(&qr).expect(F32_ONLY);
        let qb = rows_on(mat(q, s, hd, hd), s.div_ceil(rb) * rb, kq, false);
        let dob = &dout[(bi * s) * od + h * hd..];
        let dd = out_dots(
            dob,
            T::as_f32(&out[(bi * s) * od + h * hd..]).expect(F32_ONLY),
            s,
            hd,
            od,
        );
        let lse_h = &lse[(bi * nh + h) * s..(bi * nh + h + 1) * s];
        let mut dq_t = written_in_full::<T>(s * hd);
        let dq = T::as_f32_mut(&mut dq_t).expect(F32_ONLY);
        for r0 in (0..s).step_by(QBLOCK) {
            let r1 = (r0 + QBLOCK).min(s);
            let (nr, lp) = (r1 - r0, r1.div_ceil(32) * 32);
            let (mpb, nrp) = (nr.div_ceil(rb) * rb, nr.div_ceil(32) * 32);
            let mut p = product_here(kernel, &qb[r0 * kq..], (mpb, kq, lp), &kt);
            let blk = Block::new(fmask, s, bi, (r0, r1), scale);
            probs_rows(&mut p, lp, blk, lse_h);
            let dob_blk = mat(&dob[r0 * od..], nr, hd, od);
            // dV[0..r1] += P^T dO
            let (do_tiles, _, _) = tiles_on(dob_blk, false);
            let pt = rows_on(mat_t(&p, r1, nr, lp), lp, nrp, false);
            add_rows(
                dv,
                &product_here(kernel, &pt, (lp, nrp, kq), &do_tiles),
                r1,
                hd,
                kq,
            );
            // dP = dO V^T
            let do_rows = rows_on(dob_blk, mpb, kq, false);
            let dp = product_here(kernel, &do_rows, (mpb, kq, lp), &vt);
            // dS = P (dP - rowdot(dO, O)) * scale, in place of P (for its transpose) and
            // rounded into the rows `ds` of dQ's product in the same pass.
            let mut ds = written_in_full_or(mpb * lp, BF16_UNSET);
            let rows = p.chunks_mut(lp).zip(dp.chunks(lp)).zip(ds.chunks_mut(lp));
            for (i, ((prow, dprow), dsrow)) in rows.enumerate() {
                if i >= nr {
                    dsrow.fill(0);
                    continue;
                }
                let d = dd[r0 + i];
                let (prow, dprow) = (&mut prow[..r1], &dprow[..r1]);
                let (dsrow, pad) = dsrow.split_at_mut(r1);
                for ((v, &dpv), o) in prow.iter_mut().zip(dprow).zip(dsrow) {
                    *v = *v * (dpv - d) * scale;
                    *o = bf16_bits(*v);
                }
                pad.fill(0);
            }
            // dQ[r0..r1] = dS K[0..r1]
            let y = product_prefix(kernel, &ds, (mpb, lp, kq), &kn, sp);
            for (dqrow, yrow) in dq[r0 * hd..r1 * hd].chunks_mut(hd).zip(y.chunks(kq)) {
                dqrow.copy_from_slice(&yrow[..hd]);
            }
            // dK[0..r1] += dS^T Q[r0..r1]
            let dst = rows_on(mat_t(&p, r1, nr, lp), lp, nrp, false);
            let (q_tiles, _, _) = tiles_on(mat(&q[r0 * hd..], nr, hd, hd), false);
            add_rows(
                dk,
                &product_here(kernel, &dst, (lp, nrp, kq), &q_tiles),
                r1,
                hd,
                kq,
            );
        }
        unrope(&mut dq_t, g, bi, cos, sin);
        dqs.push(dq_t);
    }
    unrope(&mut dk_t, g, bi, cos, sin);
    (dqs, dk_t, dv_t)
}

fn attn_fwd<T: Elem>(op: &Attention, qkv: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    with_consts([&op.cos, &op.sin, &op.mask.mask], |[cos, sin, mask]| {
        attn_fwd_with::<T>(op, qkv, l, cos, sin, mask)
    })
}

fn attn_fwd_with<T: Elem>(
    op: &Attention,
    qkv: &CpuStorage,
    l: &Layout,
    cos: &[T],
    sin: &[T],
    mask: &[T],
) -> Result<(CpuStorage, Shape)> {
    let g = op.geometry(l)?;
    let x = slice::<T>(qkv, l, "attention")?;
    let (s, hd, nh, grp) = (g.s, g.hd, g.nh, g.nh / g.nkv);
    let scale: T = cast(op.scale);
    let mask = Masking::new(mask, s, &op.mask.ranges);
    let bf16 = op.bf16.filter(|_| T::as_f32(x).is_some());
    let shared: Vec<KvShared<T>> = (0..g.b * g.nkv)
        .into_par_iter()
        .map(|task| {
            fast!({
                let (bi, j) = (task / g.nkv, task % g.nkv);
                let k = head_rows(x, &g, bi, (nh + j) * hd, Some((cos, sin)));
                if bf16.is_none() {
                    return KvShared::Keys(k);
                }
                let k = T::as_f32(&k).expect(F32_ONLY);
                let v = T::as_f32(&x[(bi * s) * g.d + (nh + g.nkv + j) * hd..]).expect(F32_ONLY);
                let (kt, _, sp) = tiles_on(mat_t(k, hd, s, hd), false);
                let (vt, _, _) = tiles_on(mat(v, s, hd, g.d), false);
                KvShared::Tiles(kt, vt, sp)
            })
        })
        .collect();
    let mut lse = written_in_full::<f64>(g.b * nh * s);
    let heads: Vec<Vec<T>> = lse
        .par_chunks_mut(s.max(1))
        .enumerate()
        .map(|(task, lse)| {
            fast!({
                let (bi, h) = (task / nh, task % nh);
                let j = h / grp;
                let q = head_rows(x, &g, bi, h * hd, Some((cos, sin)));
                let v = &x[(bi * s) * g.d + (nh + g.nkv + j) * hd..];
                let k = match &shared[bi * g.nkv + j] {
                    KvShared::Tiles(kt, vt, sp) => {
                        let kernel = bf16.expect("tiles are laid out for bf16 products only");
                        let tiles = (&kt[..], &vt[..], *sp);
                        return fwd_bf16(kernel, &q, tiles, mask, &g, bi, op.scale, lse);
                    }
                    KvShared::Keys(k) => k,
                };
                let mut o = written_in_full(s * hd);
                let mut p = written_in_full(QBLOCK * s);
                for r0 in (0..s).step_by(QBLOCK) {
                    let r1 = (r0 + QBLOCK).min(s);
                    let blk = Block::new(mask, s, bi, (r0, r1), scale);
                    probs_block(&mut p, &q, k, hd, blk, lse);
                    mm(
                        (r1 - r0, hd, r1),
                        &mut o[r0 * hd..],
                        hd,
                        &p,
                        (r1, 1),
                        v,
                        (g.d, 1),
                        false,
                    );
                }
                o
            })
        })
        .collect();
    let mut out = written_in_full(g.b * s * nh * hd);
    for (task, o) in heads.iter().enumerate() {
        let (bi, h) = (task / nh, task % nh);
        for t in 0..s {
            let row = (bi * s + t) * nh * hd + h * hd;
            out[row..row + hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
    }
    *op.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((g.b * s, nh * hd)),
    ))
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention-cpu"
    }
    fn cpu_fwd(&self, qkv: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(qkv.dtype(), attn_fwd(self, qkv, l))
    }
    fn bwd(&self, qkv: &Tensor, out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let bwd = AttentionBwd(self);
        let dx =
            qkv.detach()
                .apply_op3_no_bwd(&g.contiguous()?, &out.detach().contiguous()?, &bwd)?;
        Ok(Some(dx))
    }
}

/// Gradient of [`Attention`] with respect to `qkv`, given the output gradient and the
/// output.
struct AttentionBwd<'a>(&'a Attention);

fn attn_bwd<T: Elem>(
    op: &Attention,
    (qkv, l): (&CpuStorage, &Layout),
    (go, lg): (&CpuStorage, &Layout),
    (out, lo): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    with_consts([&op.cos, &op.sin, &op.mask.mask], |[cos, sin, mask]| {
        attn_bwd_with::<T>(op, (qkv, l), (go, lg), (out, lo), cos, sin, mask)
    })
}

fn attn_bwd_with<T: Elem>(
    op: &Attention,
    (qkv, l): (&CpuStorage, &Layout),
    (go, lg): (&CpuStorage, &Layout),
    (out, lo): (&CpuStorage, &Layout),
    cos: &[T],
    sin: &[T],
    mask: &[T],
) -> Result<(CpuStorage, Shape)> {
    let g = op.geometry(l)?;
    let x = slice::<T>(qkv, l, "attention bwd")?;
    let dout = slice::<T>(go, lg, "attention bwd")?;
    let out = slice::<T>(out, lo, "attention bwd")?;
    let (s, hd, nh, nkv, grp) = (g.s, g.hd, g.nh, g.nkv, g.nh / g.nkv);
    let od = nh * hd;
    if dout.len() != g.b * s * od || out.len() != dout.len() {
        bail!(
            "attention bwd: output gradient {:?} / output {:?} do not match {} x {s} tokens of {nh} heads x {hd}",
            lg.dims(),
            lo.dims(),
            g.b
        )
    }
    let lse_guard = op.lse.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lse) = lse_guard.as_deref().filter(|v| v.len() == g.b * nh * s) else {
        bail!("attention bwd: no log-sum-exp from this op's forward pass (apply it once, forward first)")
    };
    let scale: T = cast(op.scale);
    let mask = Masking::new(mask, s, &op.mask.ranges);
    let bf16 = op.bf16.filter(|_| T::as_f32(x).is_some());
    // One task per (batch, kv head): it owns dK and dV of that head and dQ of its group.
    let parts: Vec<(Vec<Vec<T>>, Vec<T>, Vec<T>)> = (0..g.b * nkv)
        .into_par_iter()
        .map(|task| {
            fast!({
                let (bi, j) = (task / nkv, task % nkv);
                if let Some(kernel) = bf16 {
                    let ops = (x, dout, out);
                    let ij = (bi, j);
                    return bwd_bf16(kernel, ops, (cos, sin), mask, &g, ij, op.scale, lse);
                }
                let k = head_rows(x, &g, bi, (nh + j) * hd, Some((cos, sin)));
                let v = &x[(bi * s) * g.d + (nh + nkv + j) * hd..];
                let mut dk = vec![T::zero(); s * hd];
                let mut dv = vec![T::zero(); s * hd];
                let mut p = written_in_full(QBLOCK * s);
                let mut dp = written_in_full(QBLOCK * s);
                let mut dqs = Vec::with_capacity(grp);
                for h in j * grp..(j + 1) * grp {
                    let q = head_rows(x, &g, bi, h * hd, Some((cos, sin)));
                    let mut dq = written_in_full(s * hd);
                    let dob = &dout[(bi * s) * od + h * hd..];
                    let dd = out_dots(dob, &out[(bi * s) * od + h * hd..], s, hd, od);
                    let lse_h = &lse[(bi * nh + h) * s..(bi * nh + h + 1) * s];
                    for r0 in (0..s).step_by(QBLOCK) {
                        let r1 = (r0 + QBLOCK).min(s);
                        let (rows, lk) = (r1 - r0, r1);
                        mm(
                            (rows, lk, hd),
                            &mut p,
                            lk,
                            &q[r0 * hd..],
                            (hd, 1),
                            &k,
                            (1, hd),
                            false,
                        );
                        let blk = Block::new(mask, s, bi, (r0, r1), scale);
                        probs_rows(&mut p, lk, blk, lse_h);
                        let dob_blk = &dob[r0 * od..];
                        // dV[0..lk] += P^T dO
                        mm(
                            (lk, hd, rows),
                            &mut dv,
                            hd,
                            &p,
                            (1, lk),
                            dob_blk,
                            (od, 1),
                            true,
                        );
                        // dP = dO V^T
                        mm(
                            (rows, lk, hd),
                            &mut dp,
                            lk,
                            dob_blk,
                            (od, 1),
                            v,
                            (1, g.d),
                            false,
                        );
                        // dS = P (dP - rowdot(dO, O)) * scale
                        let dd = &dd[r0..r1];
                        for ((prow, dprow), &d) in p.chunks_mut(lk).zip(dp.chunks(lk)).zip(dd) {
                            for c in 0..lk {
                                prow[c] = prow[c] * (dprow[c] - d) * scale;
                            }
                        }
                        // dQ[r0..r1] = dS K[0..lk] ; dK[0..lk] += dS^T Q[r0..r1]
                        mm(
                            (rows, hd, lk),
                            &mut dq[r0 * hd..],
                            hd,
                            &p,
                            (lk, 1),
                            &k,
                            (hd, 1),
                            false,
                        );
                        mm(
                            (lk, hd, rows),
                            &mut dk,
                            hd,
                            &p,
                            (1, lk),
                            &q[r0 * hd..],
                            (hd, 1),
                            true,
                        );
                    }
                    unrope(&mut dq, &g, bi, cos, sin);
                    dqs.push(dq);
                }
                unrope(&mut dk, &g, bi, cos, sin);
                (dqs, dk, dv)
            })
        })
        .collect();
    let mut dx = written_in_full(x.len());
    for (task, (dqs, dk, dv)) in parts.iter().enumerate() {
        let (bi, j) = (task / nkv, task % nkv);
        for t in 0..s {
            let row = (bi * s + t) * g.d;
            for (i, dq) in dqs.iter().enumerate() {
                let h = j * grp + i;
                dx[row + h * hd..row + (h + 1) * hd].copy_from_slice(&dq[t * hd..(t + 1) * hd]);
            }
            dx[row + (nh + j) * hd..row + (nh + j + 1) * hd]
                .copy_from_slice(&dk[t * hd..(t + 1) * hd]);
            dx[row + (nh + nkv + j) * hd..row + (nh + nkv + j + 1) * hd]
                .copy_from_slice(&dv[t * hd..(t + 1) * hd]);
        }
    }
    Ok((T::to_cpu_storage_owned(dx), l.shape().clone()))
}

impl CustomOp3 for AttentionBwd<'_> {
    fn name(&self) -> &'static str {
        "attention-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        l: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        out: &CpuStorage,
        lo: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(qkv.dtype(), attn_bwd(self.0, (qkv, l), (g, lg), (out, lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Values uniform in `[-a, a)`.
    fn values(n: usize, a: f64, seed: u64) -> Vec<f64> {
        let mut r = tooltrain_util::Rng::new(seed);
        (0..n)
            .map(|_| ((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * a)
            .collect()
    }

    /// `rms(got - want) / rms(want)` and `max |got - want| / max |want|`.
    fn rel_errors(got: &Tensor, want: &Tensor) -> (f64, f64) {
        let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = want.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(g.len(), w.len());
        let (mut e2, mut w2, mut emax, mut wmax) = (0.0, 0.0, 0.0f64, 0.0f64);
        for (&a, &b) in g.iter().zip(&w) {
            let e = a as f64 - b;
            assert!(e.is_finite(), "{a} against {b}");
            e2 += e * e;
            w2 += b * b;
            emax = emax.max(e.abs());
            wmax = wmax.max(b.abs());
        }
        ((e2 / w2).sqrt(), emax / wmax)
    }

    /// With bf16 products, both passes of the fused attention stay within bf16 rounding
    /// of the f64 kernel (itself checked against finite differences and the composed ops
    /// in `ops`), on every bf16 kernel this machine has: causal rows, a left-padded row,
    /// and a mask that is not of the ranges form (the dense path); 150 positions, so that
    /// the last query block and the padded key tiles are partial.
    #[test]
    fn bf16_products_stay_within_rounding_of_the_f64_kernel() {
        let kernels = super::super::amx::kernels_on_this_cpu();
        if kernels.is_empty() {
            eprintln!("skipped: neither AMX tiles nor AVX512-BF16 on this machine");
            return;
        }
        let (b, s, nh, nkv, hd) = (2, 150, 4, 2, 64);
        let d = (nh + 2 * nkv) * hd;
        let dev = &Device::Cpu;
        let qkv = Tensor::from_vec(values(b * s * d, 1.7, 1), (b * s, d), dev).unwrap();
        let dout =
            Tensor::from_vec(values(b * s * nh * hd, 1.0, 2), (b * s, nh * hd), dev).unwrap();
        let half = hd / 2;
        let mut cos = Vec::with_capacity(b * s * half);
        let mut sin = Vec::with_capacity(b * s * half);
        for _ in 0..b {
            for p in 0..s {
                for i in 0..half {
                    let th = p as f64 * 10000f64.powf(-2.0 * i as f64 / hd as f64);
                    cos.push(th.cos());
                    sin.push(th.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, s, half), dev).unwrap();
        let sin = Tensor::from_vec(sin, (b, s, half), dev).unwrap();
        let inf = f64::NEG_INFINITY;
        let causal = |_: usize, i: usize, j: usize| if j <= i { 0.0 } else { inf };
        // Row 1 left-padded by 20: padding sees itself, the rest sees 20..=i.
        let padded = |bi: usize, i: usize, j: usize| match (bi, i < 20) {
            (1, true) if i == j => 0.0,
            (1, true) => inf,
            (1, false) if (20..=i).contains(&j) => 0.0,
            (1, false) => inf,
            _ => causal(bi, i, j),
        };
        let biased =
            |bi: usize, i: usize, j: usize| causal(bi, i, j) - 0.01 * (i - j.min(i)) as f64;
        let masks: [(&str, &dyn Fn(usize, usize, usize) -> f64); 3] = [
            ("causal", &causal),
            ("left-padded", &padded),
            ("dense", &biased),
        ];
        for (what, f) in masks {
            let m: Vec<f64> = (0..b * s * s)
                .map(|x| f(x / (s * s), (x / s) % s, x % s))
                .collect();
            let mask = AttentionMask::new(&Tensor::from_vec(m, (b, s, s), dev).unwrap()).unwrap();
            // The causal and padded masks take the ranges path, the biased one the dense.
            assert_eq!(mask.ranges.is_some(), what != "dense", "{what}");
            let op = |dt: DType, bf16| Attention {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / (hd as f64).sqrt(),
                cos: cos.to_dtype(dt).unwrap(),
                sin: sin.to_dtype(dt).unwrap(),
                mask: mask.to_dtype(dt).unwrap(),
                bf16,
                lse: Default::default(),
            };
            let run = |op: &Attention, dt: DType| {
                let x = qkv.to_dtype(dt).unwrap();
                let y = x.apply_op1_no_bwd(op).unwrap();
                let dx = x
                    .apply_op3_no_bwd(&dout.to_dtype(dt).unwrap(), &y, &AttentionBwd(op))
                    .unwrap();
                (y, dx)
            };
            let (y64, dx64) = run(&op(DType::F64, None), DType::F64);
            for &kernel in &kernels {
                let (y, dx) = run(&op(DType::F32, Some(kernel)), DType::F32);
                // Each gradient part on its own: dQ, dK and dV differ in scale.
                let parts = [
                    ("out", 0, nh * hd),
                    ("dq", 0, nh * hd),
                    ("dk", nh * hd, nkv * hd),
                ];
                let parts = parts.into_iter().chain([("dv", (nh + nkv) * hd, nkv * hd)]);
                for (name, c0, w) in parts {
                    let (got, want) = if name == "out" {
                        (y.clone(), y64.clone())
                    } else {
                        (dx.narrow(1, c0, w).unwrap(), dx64.narrow(1, c0, w).unwrap())
                    };
                    let (rms, max) = rel_errors(&got, &want);
                    assert!(
                        rms < 1e-2 && max < 2e-2,
                        "{kernel:?} {what} {name}: relative error rms {rms:.2e}, max {max:.2e}"
                    );
                }
            }
        }
    }

    #[test]
    fn mask_rows_read_as_ranges_of_seen_keys() {
        let (o, n) = (0.0f32, f32::NEG_INFINITY);
        let seen = |pre, lo, hi| Seen { pre, lo, hi };
        // Causal, padding that sees itself, a shared prefix plus the own sequence.
        let mask = [
            [o, n, n, n, n],
            [o, o, n, n, n],
            [n, n, o, n, n],
            [o, n, n, o, n],
            [o, o, n, o, o],
        ];
        let flat: Vec<f32> = mask.concat();
        assert_eq!(
            seen_ranges(&flat, 5),
            Some(vec![
                seen(0, 0, 1),
                seen(0, 0, 2),
                seen(0, 2, 3),
                seen(1, 3, 4),
                seen(2, 3, 5),
            ])
        );
        // Any other value, a third run, a second run after a gap at the start, or a row
        // that sees nothing: the dense mask.
        for row in [
            [o, -0.5, n, n, n],
            [o, n, o, n, o],
            [n, o, n, o, n],
            [n, n, n, n, n],
        ] {
            let mut m = flat.clone();
            m[10..15].copy_from_slice(&row);
            assert_eq!(seen_ranges(&m, 5), None, "row {row:?}");
        }
    }

    /// The forward's normalise-and-round pass (`softmax_rows_bf16`) writes the bits of
    /// rounding `softmax_rows`'s probabilities into the kernel's rows, zeros at unseen
    /// keys, in the padded columns and in the padding rows, and the same log-sum-exp: on
    /// key ranges (causal, a prefix plus the own sequence) and on a dense biased mask, for
    /// a full and a partial block of queries.
    #[test]
    fn probabilities_rounded_in_the_softmax_are_the_rounded_softmax() {
        let s = 70;
        let causal: Vec<Seen> = (0..s)
            .map(|t| Seen {
                pre: 0,
                lo: 0,
                hi: t + 1,
            })
            .collect();
        let prefixed: Vec<Seen> = (0..s)
            .map(|t| match t {
                0..30 => Seen {
                    pre: 0,
                    lo: 0,
                    hi: t + 1,
                },
                _ => Seen {
                    pre: 12,
                    lo: 30,
                    hi: t + 1,
                },
            })
            .collect();
        let dense: Vec<f32> = (0..s * s)
            .map(|x| {
                let (i, j) = (x / s, x % s);
                if j > i || (j + 5..j + 9).contains(&i) {
                    f32::NEG_INFINITY
                } else {
                    -0.03 * (i - j) as f32
                }
            })
            .collect();
        let masks = [
            ("causal", Masking::Ranges(&causal[..])),
            ("prefixed", Masking::Ranges(&prefixed[..])),
            ("dense", Masking::Dense(&dense[..])),
        ];
        let scores: Vec<f32> = values(64 * 96, 9.0, 7).iter().map(|&v| v as f32).collect();
        for (what, mask) in masks {
            for (r0, r1) in [(0usize, 64usize), (64, 70)] {
                let (nr, lp) = (r1 - r0, r1.div_ceil(32) * 32);
                let mpb = nr.div_ceil(32) * 32;
                let p = &scores[..mpb * lp];
                let (mut want_p, mut want_lse) = (p.to_vec(), vec![0.0; s]);
                let blk = Block::new(mask, s, 0, (r0, r1), 0.125);
                softmax_rows(&mut want_p, lp, blk, &mut want_lse);
                let want = rows_on(mat(&want_p, nr, r1, lp), mpb, lp, false);
                let (mut got_p, mut got_lse) = (p.to_vec(), vec![0.0; s]);
                let mut got = vec![BF16_UNSET; mpb * lp];
                softmax_rows_bf16(&mut got_p, &mut got, lp, blk, &mut got_lse);
                assert_eq!(
                    got, want,
                    "{what}, queries {r0}..{r1}: rounded probabilities"
                );
                assert_eq!(got_lse, want_lse, "{what}, queries {r0}..{r1}: log-sum-exp");
            }
        }
    }

    #[test]
    fn seen_softmax_is_the_masked_softmax() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.3 - 3.0)
            .collect();
        for seen in [
            Seen {
                pre: 0,
                lo: 0,
                hi: 37,
            },
            Seen {
                pre: 0,
                lo: 0,
                hi: 20,
            },
            Seen {
                pre: 0,
                lo: 11,
                hi: 12,
            },
            Seen {
                pre: 9,
                lo: 17,
                hi: 33,
            },
        ] {
            let scale = 0.7f32;
            let want: Vec<f64> = {
                let on = |j: usize| j < seen.pre || (seen.lo..seen.hi).contains(&j);
                let e: Vec<f64> = (0..37)
                    .map(|j| {
                        if on(j) {
                            (x[j] as f64 * scale as f64).exp()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let z: f64 = e.iter().sum();
                e.iter().map(|v| v / z).collect()
            };
            let mut got = x.clone();
            seen_softmax(&mut got, seen, scale);
            for j in 0..37 {
                assert!(
                    (got[j] as f64 - want[j]).abs() < 1e-6,
                    "{seen:?}: key {j}: {} against {}",
                    got[j],
                    want[j]
                );
            }
        }
    }
}
