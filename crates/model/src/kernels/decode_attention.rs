//! Attention of a few new query positions to a KV cache (decoding, inference only).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::amx::{bf16_kernel, product_here, Bf16Kernel};
use super::bf16_layout::{rows_on, tiles_on, Strided};
use super::{cast, mm, skinny, slice, softmax_in_place, Elem};

/// Attention of a few new query positions to a KV cache (inference only): `q: [b, heads, s,
/// head_dim]` (roped, contiguous), `k`, `v: [b, kv_heads, len, head_dim]` views whose rows
/// are contiguous (e.g. the filled part of a preallocated cache), `mask: [b, s, len]`
/// additive. Output `[b, s, heads, head_dim]`. Each task is one (row, kv head) pair: it
/// streams that head's keys and values once for all the query heads sharing it, where a
/// batched matrix product would first copy (pack) them.
pub(crate) struct DecodeAttention {
    pub mask: Tensor,
    pub scale: f64,
    /// Per row `(leader, columns)`: the row's first `columns` keys and values are row
    /// `leader`'s (copies of one shared prefix, or not stored in the row at all), so they
    /// are read once for the group, from the leader. A leader names itself; with 0
    /// columns it is not one of its group's rows (a finished row that still holds what
    /// the others read). Empty: every row reads its own.
    pub share: Vec<(usize, usize)>,
    /// Tasks with more than [`FEW_ROWS`] query rows per row of the batch (prefill chunks,
    /// not decoding steps) compute their products from bf16-rounded operands with f32
    /// sums (queries, keys, probabilities and values rounded, as PyTorch's autocast
    /// attention), on AMX or AVX512-BF16 when the CPU has either ([`bf16_task`]); f32
    /// otherwise.
    pub bf16: bool,
}

/// Element types of a KV cache that queries of type `T` read: `T` itself, or bf16 under
/// f32 queries (a cache kept in bf16 to halve what each decoding step reads).
pub(crate) trait KvOf<T>: WithDType {
    /// The values as `T` without a copy, when they are `T`.
    fn same(s: &[Self]) -> Option<&[T]>;
    /// The values as bf16, when they are (the few-row kernels widen them as they load).
    fn as_bf16(_: &[Self]) -> Option<&[half::bf16]> {
        None
    }
    /// One value as `T` (exact: every bf16 is an f32).
    fn widen(self) -> T;
}

impl KvOf<f32> for f32 {
    fn same(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KvOf<f64> for f64 {
    fn same(s: &[f64]) -> Option<&[f64]> {
        Some(s)
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
}

impl KvOf<f32> for half::bf16 {
    fn same(_: &[half::bf16]) -> Option<&[f32]> {
        None
    }
    fn as_bf16(s: &[half::bf16]) -> Option<&[half::bf16]> {
        Some(s)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        // Branch-free (the loops that widen a run vectorise).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// The storage of a `[b, h, len, d]` view whose `d` elements per position are contiguous
/// (any batch, head and position strides), with those strides and its start offset.
struct CacheView<'a, T> {
    data: &'a [T],
    batch: usize,
    head: usize,
    pos: usize,
    start: usize,
}

impl<'a, T: WithDType> CacheView<'a, T> {
    fn new(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Self> {
        let st = l.stride();
        if st[3] != 1 {
            bail!("decode attention: {what} must have contiguous head_dim (strides {st:?})")
        }
        Ok(Self {
            data: T::cpu_storage_as_slice(s)?,
            batch: st[0],
            head: st[1],
            pos: st[2],
            start: l.start_offset(),
        })
    }

    /// Everything from position `j` of row `b`, head `h` on (a matrix of positions with
    /// row stride `pos`).
    #[inline(always)]
    fn tail_at(&self, b: usize, h: usize, j: usize) -> &'a [T] {
        &self.data[self.start + b * self.batch + h * self.head + j * self.pos..]
    }

    /// Positions `j..j + n` of row `b`, head `h` (`d` values each) as `E` rows, with their
    /// row stride: the cache in place when it holds `E`, else widened into `buf`.
    #[inline(always)]
    fn run_as<'s, E: Elem>(
        &self,
        (b, h, j, n, d): (usize, usize, usize, usize, usize),
        buf: &'s mut Vec<E>,
    ) -> (&'s [E], usize)
    where
        'a: 's,
        T: KvOf<E>,
    {
        let tail = self.tail_at(b, h, j);
        if let Some(same) = T::same(tail) {
            return (same, self.pos);
        }
        buf.clear();
        for t in 0..n {
            buf.extend(
                tail[t * self.pos..t * self.pos + d]
                    .iter()
                    .map(|&x| x.widen()),
            );
        }
        (buf.as_slice(), d)
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_attn_fwd<T: Elem, K: KvOf<T>>(
    op: &DecodeAttention,
    q: &CpuStorage,
    lq: &Layout,
    k: &CpuStorage,
    lk: &Layout,
    v: &CpuStorage,
    lv: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let qs = slice::<T>(q, lq, "decode attention q")?;
    let (b, nh, s, hd) = lq.shape().dims4()?;
    let (bk, nkv, len, hdk) = lk.shape().dims4()?;
    if lv.dims() != lk.dims() || bk != b || hdk != hd || nkv == 0 || nh % nkv != 0 {
        bail!(
            "decode attention: q {:?}, k {:?}, v {:?} do not fit together",
            lq.dims(),
            lk.dims(),
            lv.dims()
        )
    }
    if op.mask.dims() != [b, s, len] || !op.mask.is_contiguous() {
        bail!(
            "decode attention: mask {:?} must be a contiguous [{b}, {s}, {len}]",
            op.mask.dims()
        )
    }
    let (kc, vc) = (
        CacheView::<K>::new(k, lk, "k")?,
        CacheView::<K>::new(v, lv, "v")?,
    );
    let (mst, ml) = op.mask.storage_and_layout();
    let candle_core::Storage::Cpu(mc) = &*mst else {
        bail!("decode attention: the mask must be on the CPU")
    };
    let ms = &T::cpu_storage_as_slice(mc)?[ml.start_offset()..ml.start_offset() + b * s * len];
    let g = nh / nkv;
    let nq = s * g;
    let scale: T = cast(op.scale);
    let neg = T::neg_infinity();
    let bf = if op.bf16 { bf16_kernel() } else { None };
    let masks = |bi: usize| &ms[bi * s * len..(bi + 1) * s * len];
    // Each group's keys, the same for every kv head (and layer): only the keys some query
    // may see are read; the masked ones (padding, other rows' prefixes, a finished row's
    // whole cache) would get weight exactly 0.
    let groups: Vec<GroupKeys> = share_groups(&op.share, b, len)?
        .into_par_iter()
        .map(|(source, members, cols)| {
            let seen = |bi: usize, j: usize| (0..s).any(|i| masks(bi)[i * len + j] != neg);
            let shared: Vec<usize> = (0..cols)
                .filter(|&j| members.iter().any(|&bi| seen(bi, j)))
                .collect();
            let own: Vec<Vec<usize>> = members
                .iter()
                .map(|&bi| (cols..len).filter(|&j| seen(bi, j)).collect())
                .collect();
            GroupKeys {
                shared_runs: runs(&shared),
                own_runs: own.iter().map(|o| runs(o)).collect(),
                source,
                members,
                shared,
                own,
            }
        })
        .collect();
    // One task per (group of rows, kv head): the group's shared columns are read once for
    // all of its rows' query vectors, each row's own columns for its own.
    let parts: Vec<Vec<(usize, Vec<T>)>> = (0..groups.len() * nkv)
        .into_par_iter()
        .map(|task| {
            let (gi, h) = (task / nkv, task % nkv);
            let GroupKeys {
                source: lead,
                members,
                shared,
                own,
                shared_runs,
                own_runs,
            } = &groups[gi];
            let lead = *lead;
            let qv = |bi: usize, qi: usize| {
                let (i, gq) = (qi / g, qi % g);
                let o = ((bi * nh + h * g + gq) * s + i) * hd;
                &qs[o..o + hd]
            };
            let ns = shared.len();
            let own_max = own.iter().map(Vec::len).max().unwrap_or(0);
            let stride = ns + own_max;
            let rows = members.len() * nq;
            // The group's query vectors, one row each (member, query).
            let mut qg = Vec::with_capacity(rows * hd);
            for &bi in members {
                for qi in 0..nq {
                    qg.extend_from_slice(qv(bi, qi));
                }
            }
            fast!({
                if let (Some(kernel), true) = (bf, nq > FEW_ROWS) {
                    if let (Some(qf), Some(mf)) = (T::as_f32(&qg), T::as_f32(ms)) {
                        let dims = (s, len, g, hd);
                        let sc = op.scale as f32;
                        let outs = bf16_task(kernel, &groups[gi], h, (&kc, &vc), qf, mf, dims, sc);
                        return members.iter().copied().zip(outs).collect::<Vec<_>>();
                    }
                }
                // Scores: row (member, query) holds its shared keys, then its own. Runs of
                // consecutive keys are matrix products against the cache in place (a bf16
                // cache: against the run widened to f32).
                let mut p = vec![T::zero(); rows * stride];
                let mut buf = Vec::new();
                for &(c0, j0, n) in shared_runs {
                    let at = (&kc, lead, h, j0);
                    let dst = &mut p[c0..];
                    scores((rows, n, hd), SHARED_ROWS, dst, stride, &qg, at, &mut buf);
                }
                for (m, &bi) in members.iter().enumerate() {
                    for &(c0, j0, n) in &own_runs[m] {
                        let dst = &mut p[m * nq * stride + ns + c0..];
                        let lhs = &qg[m * nq * hd..];
                        let at = (&kc, bi, h, j0);
                        scores((nq, n, hd), FEW_ROWS, dst, stride, lhs, at, &mut buf);
                    }
                }
                for (m, &bi) in members.iter().enumerate() {
                    let nk = ns + own[m].len();
                    for qi in 0..nq {
                        let mrow = &masks(bi)[(qi / g) * len..(qi / g + 1) * len];
                        let r = m * nq + qi;
                        let row = &mut p[r * stride..r * stride + nk];
                        // Scale and mask run by run: contiguous slices of the scores and
                        // of the mask row, so the loop vectorises.
                        let own_at = own_runs[m].iter().map(|&(c0, j0, n)| (ns + c0, j0, n));
                        for (c0, j0, n) in shared_runs.iter().copied().chain(own_at) {
                            for (x, &mk) in row[c0..c0 + n].iter_mut().zip(&mrow[j0..j0 + n]) {
                                *x = *x * scale + mk;
                            }
                        }
                        softmax_in_place(row, T::one());
                    }
                }
                // Outputs: the same runs, weights times values.
                let mut out = vec![T::zero(); rows * hd];
                for &(c0, j0, n) in shared_runs {
                    let at = (&vc, lead, h, j0);
                    let lhs = &p[c0..];
                    values(
                        (rows, hd, n),
                        SHARED_ROWS,
                        &mut out,
                        lhs,
                        stride,
                        at,
                        &mut buf,
                    );
                }
                for (m, &bi) in members.iter().enumerate() {
                    for &(c0, j0, n) in &own_runs[m] {
                        let lhs = &p[m * nq * stride + ns + c0..];
                        let dst = &mut out[m * nq * hd..];
                        let at = (&vc, bi, h, j0);
                        values((nq, hd, n), FEW_ROWS, dst, lhs, stride, at, &mut buf);
                    }
                }
                members
                    .iter()
                    .enumerate()
                    .map(|(m, &bi)| (bi, out[m * nq * hd..(m + 1) * nq * hd].to_vec()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut y = vec![T::zero(); b * s * nh * hd];
    for (task, part) in parts.iter().enumerate() {
        let h = task % nkv;
        for (bi, out) in part {
            for qi in 0..nq {
                let (i, gq) = (qi / g, qi % g);
                let o = ((bi * s + i) * nh + h * g + gq) * hd;
                y[o..o + hd].copy_from_slice(&out[qi * hd..(qi + 1) * hd]);
            }
        }
    }
    Ok((T::to_cpu_storage_owned(y), Shape::from((b, s, nh, hd))))
}

/// Most query rows (of one task) whose products with the cache run on the few-row
/// kernels; more reuse each key enough for gemm's packing to pay.
const FEW_ROWS: usize = 16;

/// Most query rows of a group's products with its shared columns on the few-row kernels:
/// they stream a bf16 cache as it is, where gemm takes a widened and packed copy. Decoding
/// steps of groups of 8 samples (24 rows with 3 query heads per kv head) read their shared
/// prompt about 7% faster in total there; a group of 64 (192 rows) is faster on gemm.
const SHARED_ROWS: usize = 96;

/// `dst[r][j] = q[r] . k[j]` for `r < rows`, `j < n` (`dst` row stride `stride`, `q` rows
/// of `hd`, `k[j]` the cached key at position `j0 + j` of row `bi`, head `h`): with at
/// most `few` rows on [`skinny::key_scores`] (f32 queries; a bf16 cache read as it is), else gemm
/// (a bf16 cache widened into `buf` first).
#[inline(always)]
fn scores<T: Elem, K: KvOf<T>>(
    (rows, n, hd): (usize, usize, usize),
    few: usize,
    dst: &mut [T],
    stride: usize,
    q: &[T],
    (c, bi, h, j0): (&CacheView<'_, K>, usize, usize, usize),
    buf: &mut Vec<T>,
) {
    if rows <= few {
        if let (Some(d), Some(qf)) = (T::as_f32_mut(dst), T::as_f32(q)) {
            let tail = c.tail_at(bi, h, j0);
            if let Some(kb) = K::as_bf16(tail) {
                return skinny::key_scores((rows, n, hd), d, stride, qf, kb, c.pos);
            }
            if let Some(kf) = K::same(tail).and_then(T::as_f32) {
                return skinny::key_scores((rows, n, hd), d, stride, qf, kf, c.pos);
            }
        }
    }
    let (k, pos) = c.run_as((bi, h, j0, n, hd), buf);
    mm((rows, n, hd), dst, stride, q, (hd, 1), k, (1, pos), false)
}

/// `dst[r] += sum_j p[r][j] v[j]` for `r < rows`, `j < n` (`dst` rows of `hd`, `p` row
/// stride `p_rs`, `v[j]` the cached value at position `j0 + j` of row `bi`, head `h`):
/// with few rows on [`skinny::weighted_values`], else gemm, as [`scores`].
#[inline(always)]
fn values<T: Elem, K: KvOf<T>>(
    (rows, hd, n): (usize, usize, usize),
    few: usize,
    dst: &mut [T],
    p: &[T],
    p_rs: usize,
    (c, bi, h, j0): (&CacheView<'_, K>, usize, usize, usize),
    buf: &mut Vec<T>,
) {
    if rows <= few {
        if let (Some(d), Some(pf)) = (T::as_f32_mut(dst), T::as_f32(p)) {
            let tail = c.tail_at(bi, h, j0);
            if let Some(vb) = K::as_bf16(tail) {
                return skinny::weighted_values((rows, hd, n), d, pf, p_rs, vb, c.pos);
            }
            if let Some(vf) = K::same(tail).and_then(T::as_f32) {
                return skinny::weighted_values((rows, hd, n), d, pf, p_rs, vf, c.pos);
            }
        }
    }
    let (v, pos) = c.run_as((bi, h, j0, n, hd), buf);
    mm((rows, hd, n), dst, hd, p, (p_rs, 1), v, (pos, 1), true)
}

/// Query rows per block of [`bf16_task`]: the block's scores against all of its keys
/// (32 x 2.5k f32 = 320 KB) stay in L2 through the softmax and the weighted values.
const BF16_ROWS: usize = 32;

/// Keys and values of a list of cached positions, rounded to bf16 once per task: the keys
/// as the right-hand operand `[hd, n]` of the scores, the values as that of the outputs
/// `[n, hd]`.
struct PackedKv {
    n: usize,
    k: Vec<u16>,
    v: Vec<u16>,
}

impl PackedKv {
    /// Positions `runs` (`(_, first, count)`) of row `bi`, kv head `h`.
    fn new<T: Elem, K: KvOf<T>>(
        (kc, vc): (&CacheView<'_, K>, &CacheView<'_, K>),
        (bi, h, hd): (usize, usize, usize),
        runs: &[(usize, usize, usize)],
    ) -> PackedKv {
        let n: usize = runs.iter().map(|r| r.2).sum();
        // The positions side by side (`[n, hd]`, widened from a bf16 cache).
        let gather = |c: &CacheView<'_, K>| -> Vec<T> {
            let mut out = Vec::with_capacity(n * hd);
            for &(_, j0, cnt) in runs {
                let tail = c.tail_at(bi, h, j0);
                for t in 0..cnt {
                    out.extend(tail[t * c.pos..t * c.pos + hd].iter().map(|&x| x.widen()));
                }
            }
            out
        };
        let (kt, vt) = (gather(kc), gather(vc));
        let f32s = "the bf16 path runs on f32";
        let (kf, vf) = (T::as_f32(&kt).expect(f32s), T::as_f32(&vt).expect(f32s));
        let (k, _, _) = tiles_on(
            Strided {
                data: kf,
                rows: hd,
                cols: n,
                rs: 1,
                cs: hd,
            },
            false,
        );
        let (v, _, _) = tiles_on(
            Strided {
                data: vf,
                rows: n,
                cols: hd,
                rs: hd,
                cs: 1,
            },
            false,
        );
        PackedKv { n, k, v }
    }

    /// The padded number of positions.
    fn np(&self) -> usize {
        self.n.div_ceil(32) * 32
    }
}

/// One (group, kv head) task of [`DecodeAttention`] with bf16 products: the group's
/// shared keys and values and each member's own are rounded and laid out once, then each
/// member's query rows go in blocks of [`BF16_ROWS`] through scores, scale and mask,
/// softmax, and weighted values, so the block's probabilities stay in cache. `qg` holds
/// the group's query rows (member, query), `mf` the mask. Returns each member's outputs,
/// `[nq, hd]` (`T` is f32 here).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bf16_task<T: Elem, K: KvOf<T>>(
    kernel: Bf16Kernel,
    keys: &GroupKeys,
    h: usize,
    kv: (&CacheView<'_, K>, &CacheView<'_, K>),
    qg: &[f32],
    mf: &[f32],
    (s, len, g, hd): (usize, usize, usize, usize),
    scale: f32,
) -> Vec<Vec<T>> {
    let GroupKeys {
        members,
        shared_runs,
        own_runs,
        ..
    } = keys;
    let (nq, rb) = (s * g, kernel.row_block());
    let rows = members.len() * nq;
    let shared = PackedKv::new::<T, K>(kv, (keys.source, h, hd), shared_runs);
    let kq = hd.div_ceil(32) * 32;
    // Room for a block's padded rows past the last member's.
    let mp = rows.div_ceil(rb) * rb + rb;
    let qs = Strided {
        data: qg,
        rows,
        cols: hd,
        rs: hd,
        cs: 1,
    };
    let qb = rows_on(qs, mp, kq, false);
    let mut outs = Vec::with_capacity(members.len());
    for (m, &bi) in members.iter().enumerate() {
        let own = PackedKv::new::<T, K>(kv, (bi, h, hd), &own_runs[m]);
        let (ns, no) = (shared.n, own.n);
        let w = ns + no;
        let mut out_t = vec![T::zero(); nq * hd];
        let out = T::as_f32_mut(&mut out_t).expect("the bf16 path runs on f32");
        let mut p = vec![0f32; BF16_ROWS * w];
        for r0 in (0..nq).step_by(BF16_ROWS) {
            let nr = BF16_ROWS.min(nq - r0);
            let mpb = nr.div_ceil(rb) * rb;
            let qblk = &qb[(m * nq + r0) * kq..];
            let score = |pk: &PackedKv| {
                (pk.n > 0).then(|| product_here(kernel, qblk, (mpb, kq, pk.np()), &pk.k))
            };
            let (cs, co) = (score(&shared), score(&own));
            for (i, row) in p.chunks_mut(w).take(nr).enumerate() {
                let qi = r0 + i;
                let mrow = &mf[(bi * s + qi / g) * len..(bi * s + qi / g + 1) * len];
                let parts = [
                    (&cs, shared_runs, 0, shared.np()),
                    (&co, &own_runs[m], ns, own.np()),
                ];
                for (c, runs, base, np) in parts {
                    let Some(c) = c else { continue };
                    for &(c0, j0, n) in runs.iter() {
                        let src = &c[i * np + c0..i * np + c0 + n];
                        let dst = &mut row[base + c0..base + c0 + n];
                        for ((x, &y), &mk) in dst.iter_mut().zip(src).zip(&mrow[j0..j0 + n]) {
                            *x = y * scale + mk;
                        }
                    }
                }
                softmax_in_place(row, 1.0f32);
            }
            // Weighted values: the block's probabilities of each key list, rounded.
            for (pk, base) in [(&shared, 0), (&own, ns)] {
                if pk.n == 0 {
                    continue;
                }
                let ps = Strided {
                    data: &p[base..],
                    rows: nr,
                    cols: pk.n,
                    rs: w,
                    cs: 1,
                };
                let a = rows_on(ps, mpb, pk.np(), false);
                let c = product_here(kernel, &a, (mpb, pk.np(), kq), &pk.v);
                for (i, o) in out[r0 * hd..].chunks_mut(hd).take(nr).enumerate() {
                    for (x, &y) in o.iter_mut().zip(&c[i * kq..i * kq + hd]) {
                        *x += y;
                    }
                }
            }
        }
        outs.push(out_t);
    }
    outs
}

/// The rows of one group and the keys they read: `shared` (from row `source`) and each
/// member's `own`, ascending, with their runs of consecutive keys ([`runs`]).
struct GroupKeys {
    source: usize,
    members: Vec<usize>,
    shared: Vec<usize>,
    own: Vec<Vec<usize>>,
    shared_runs: Vec<(usize, usize, usize)>,
    own_runs: Vec<Vec<(usize, usize, usize)>>,
}

/// Runs of consecutive keys in an ascending list: `(index in the list, first key, count)`.
fn runs(keys: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for (c, &j) in keys.iter().enumerate() {
        match out.last_mut() {
            Some((_, j0, n)) if *j0 + *n == j => *n += 1,
            _ => out.push((c, j, 1)),
        }
    }
    out
}

/// The rows of a batch in groups that read their first columns from one row:
/// `share[r] = (leader, columns)` (empty: every row alone), as `(source, members,
/// columns)`. A group reads `min(columns of its members, len)` columns from its leader,
/// which is one of its members unless it names itself with 0 columns (then it is also a
/// group of its own).
fn share_groups(
    share: &[(usize, usize)],
    b: usize,
    len: usize,
) -> Result<Vec<(usize, Vec<usize>, usize)>> {
    if share.is_empty() {
        return Ok((0..b).map(|r| (r, vec![r], 0)).collect());
    }
    if share.len() != b {
        bail!(
            "decode attention: {} share entries for {b} rows",
            share.len()
        )
    }
    // Each leader's group (other than its own group when it takes no part).
    let mut slot = vec![usize::MAX; b];
    let mut groups: Vec<(usize, Vec<usize>, usize)> = Vec::new();
    for (r, &(lead, cols)) in share.iter().enumerate() {
        if lead > r || share[lead].0 != lead {
            bail!(
                "decode attention: row {r} shares with row {lead}, which is not a leader before it"
            )
        }
        if lead == r && cols == 0 {
            groups.push((r, vec![r], 0));
            continue;
        }
        if slot[lead] == usize::MAX {
            slot[lead] = groups.len();
            groups.push((lead, vec![], len));
        }
        let gr = &mut groups[slot[lead]];
        gr.1.push(r);
        gr.2 = gr.2.min(cols);
    }
    Ok(groups)
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention-cpu"
    }
    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if k.dtype() != v.dtype() {
            bail!(
                "decode attention: keys {:?} and values {:?} differ in type",
                k.dtype(),
                v.dtype()
            )
        }
        match (q.dtype(), k.dtype()) {
            (DType::F32, DType::BF16) => {
                decode_attn_fwd::<f32, half::bf16>(self, q, lq, k, lk, v, lv)
            }
            (DType::F32, DType::F32) => decode_attn_fwd::<f32, f32>(self, q, lq, k, lk, v, lv),
            (DType::F64, DType::F64) => decode_attn_fwd::<f64, f64>(self, q, lq, k, lk, v, lv),
            (dq, dk) => bail!("decode attention: {dq:?} queries cannot read a {dk:?} cache"),
        }
    }
}
