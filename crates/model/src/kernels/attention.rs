//! Fused causal multi-head attention over the packed qkv projection (training and
//! prefill), forward and a backward that recomputes the probabilities block by block.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{cast, dot, max_of, mm, slice, softmax_in_place, written_in_full, Elem};

/// Causal multi-head attention with RoPE and grouped key/value heads, fused into one
/// op over the packed projection `qkv: [b * s, (heads + 2 kv_heads) * head_dim]`
/// (q heads, then k heads, then v heads, as HF `q_proj`/`k_proj`/`v_proj` stack).
/// `cos`/`sin: [b, s, head_dim/2]`, `mask: [b, s, s]` additive and causal (a key after
/// its query is always masked). Output `[b * s, heads * head_dim]`. The backward pass
/// recomputes the attention probabilities block by block, so no `[s x s]` tensor per
/// head is kept between the passes.
pub(crate) struct Attention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
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
        let (b, s, _) = self.mask.dims3()?;
        if n != b * s {
            bail!("attention: {n} qkv rows do not match the mask's {b} x {s} tokens")
        }
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        if d != (nh + 2 * nkv) * hd || nh % nkv != 0 || hd % 2 != 0 {
            bail!("attention: qkv width {d} does not match {nh} heads + 2 x {nkv} kv heads of {hd}")
        }
        if self.cos.dims() != [b, s, hd / 2]
            || self.sin.dims() != [b, s, hd / 2]
            || self.mask.dims() != [b, s, s]
        {
            bail!(
                "attention: cos {:?} / sin / mask {:?} do not match qkv {:?}",
                self.cos.dims(),
                self.mask.dims(),
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
                for k in 0..half {
                    dst[k] = src[k] * c[k] - src[k + half] * sn[k];
                    dst[k + half] = src[k] * sn[k] + src[k + half] * c[k];
                }
            }
        }
    }
    out
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
        for k in 0..half {
            let (a, b) = (row[k], row[k + half]);
            row[k] = a * c[k] + b * sn[k];
            row[k + half] = -a * sn[k] + b * c[k];
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
}

/// `row[j] *= k` on a slice, returning the largest result (`-inf` when empty).
#[inline(always)]
fn scale_max<T: Elem>(row: &mut [T], k: T) -> T {
    row.iter_mut().for_each(|v| *v = *v * k);
    max_of(row)
}

/// `row[j] = exp(row[j] - mx)` on a slice, returning the sum of the results. Two plain
/// loops: the exponential vectorises on its own, not unrolled by hand with the sum.
#[inline(always)]
fn exp_sum<T: Elem>(row: &mut [T], mx: T) -> T {
    row.iter_mut().for_each(|v| *v = (*v - mx).fexp());
    dot(row, None)
}

/// `softmax(scale * row)` over the keys `seen` sees (0 on the others), in three passes.
#[inline(always)]
fn seen_softmax<T: Elem>(row: &mut [T], seen: Seen, scale: T) {
    let l = row.len();
    let (pre, lo, hi) = (seen.pre.min(l), seen.lo.min(l), seen.hi.min(l));
    let (head, rest) = row.split_at_mut(lo);
    let own = &mut rest[..hi - lo];
    let mx = {
        let (a, b) = (scale_max(&mut head[..pre], scale), scale_max(own, scale));
        if a > b {
            a
        } else {
            b
        }
    };
    let sum = exp_sum(&mut head[..pre], mx) + exp_sum(own, mx);
    let f = T::one() / sum;
    head[..pre].iter_mut().for_each(|v| *v = *v * f);
    own.iter_mut().for_each(|v| *v = *v * f);
    head[pre..].fill(T::zero());
    rest[hi - lo..].fill(T::zero());
}

/// Probabilities of query rows `r0..r1` against keys `0..r1` (causal), in `p: [rows, r1]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn probs_block<T: Elem>(
    p: &mut [T],
    q: &[T],
    k: &[T],
    mask: Masking<'_, T>,
    g: &Geometry,
    bi: usize,
    (r0, r1): (usize, usize),
    scale: T,
) {
    let (hd, s, l) = (g.hd, g.s, r1);
    let rows = r1 - r0;
    mm(
        (rows, l, hd),
        p,
        l,
        &q[r0 * hd..],
        (hd, 1),
        k,
        (1, hd),
        false,
    );
    for (i, prow) in p.chunks_mut(l).take(rows).enumerate() {
        match mask {
            Masking::Ranges(seen) => seen_softmax(prow, seen[bi * s + r0 + i], scale),
            Masking::Dense(mask) => {
                let mrow = &mask[(bi * s + r0 + i) * s..(bi * s + r0 + i) * s + l];
                for j in 0..l {
                    prow[j] = prow[j] * scale + mrow[j];
                }
                softmax_in_place(prow, T::one());
            }
        }
    }
}

fn attn_fwd<T: Elem>(op: &Attention, qkv: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    with_consts([&op.cos, &op.sin, &op.mask], |[cos, sin, mask]| {
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
    let ranges = seen_ranges(mask, s);
    let mask = Masking::new(mask, s, &ranges);
    let heads: Vec<Vec<T>> = (0..g.b * nh)
        .into_par_iter()
        .map(|task| {
            fast!({
                let (bi, h) = (task / nh, task % nh);
                let j = h / grp;
                let q = head_rows(x, &g, bi, h * hd, Some((cos, sin)));
                let k = head_rows(x, &g, bi, (nh + j) * hd, Some((cos, sin)));
                let v = &x[(bi * s) * g.d + (nh + g.nkv + j) * hd..];
                let mut o = written_in_full(s * hd);
                let mut p = written_in_full(QBLOCK * s);
                for r0 in (0..s).step_by(QBLOCK) {
                    let r1 = (r0 + QBLOCK).min(s);
                    probs_block(&mut p, &q, &k, mask, &g, bi, (r0, r1), scale);
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
    fn bwd(&self, qkv: &Tensor, _out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let bwd = AttentionBwd(self);
        Ok(Some(qkv.detach().apply_op2_no_bwd(&g.contiguous()?, &bwd)?))
    }
}

/// Gradient of [`Attention`] with respect to `qkv`, given the output gradient.
struct AttentionBwd<'a>(&'a Attention);

fn attn_bwd<T: Elem>(
    op: &Attention,
    qkv: &CpuStorage,
    l: &Layout,
    go: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    with_consts([&op.cos, &op.sin, &op.mask], |[cos, sin, mask]| {
        attn_bwd_with::<T>(op, qkv, l, go, lg, cos, sin, mask)
    })
}

#[allow(clippy::too_many_arguments)]
fn attn_bwd_with<T: Elem>(
    op: &Attention,
    qkv: &CpuStorage,
    l: &Layout,
    go: &CpuStorage,
    lg: &Layout,
    cos: &[T],
    sin: &[T],
    mask: &[T],
) -> Result<(CpuStorage, Shape)> {
    let g = op.geometry(l)?;
    let x = slice::<T>(qkv, l, "attention bwd")?;
    let dout = slice::<T>(go, lg, "attention bwd")?;
    let (s, hd, nh, nkv, grp) = (g.s, g.hd, g.nh, g.nkv, g.nh / g.nkv);
    let od = nh * hd;
    let scale: T = cast(op.scale);
    let ranges = seen_ranges(mask, s);
    let mask = Masking::new(mask, s, &ranges);
    // One task per (batch, kv head): it owns dK and dV of that head and dQ of its group.
    let parts: Vec<(Vec<Vec<T>>, Vec<T>, Vec<T>)> = (0..g.b * nkv)
        .into_par_iter()
        .map(|task| {
            fast!({
                let (bi, j) = (task / nkv, task % nkv);
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
                    for r0 in (0..s).step_by(QBLOCK) {
                        let r1 = (r0 + QBLOCK).min(s);
                        let (rows, lk) = (r1 - r0, r1);
                        probs_block(&mut p, &q, &k, mask, &g, bi, (r0, r1), scale);
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
                        // dS = P (dP - rowdot(dP, P)) * scale
                        for (prow, dprow) in p.chunks_mut(lk).zip(dp.chunks(lk)).take(rows) {
                            let d = dot(prow, Some(dprow));
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

impl CustomOp2 for AttentionBwd<'_> {
    fn name(&self) -> &'static str {
        "attention-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        l: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(qkv.dtype(), attn_bwd(self.0, qkv, l, g, lg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
