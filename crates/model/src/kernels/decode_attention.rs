//! Attention of a few new query positions to a KV cache (decoding, inference only).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{cast, dot, slice, softmax_in_place, Elem};

/// Attention of a few new query positions to a KV cache (inference only): `q: [b, heads, s,
/// head_dim]` (roped, contiguous), `k`, `v: [b, kv_heads, len, head_dim]` views whose rows
/// are contiguous (e.g. the filled part of a preallocated cache), `mask: [b, s, len]`
/// additive. Output `[b, s, heads, head_dim]`. Each task is one (row, kv head) pair: it
/// streams that head's keys and values once for all the query heads sharing it, where a
/// batched matrix product would first copy (pack) them.
pub(crate) struct DecodeAttention {
    pub mask: Tensor,
    pub scale: f64,
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

    /// Position `j` of row `b`, head `h`: `d` elements.
    #[inline(always)]
    fn at(&self, b: usize, h: usize, j: usize, d: usize) -> &'a [T] {
        let o = self.start + b * self.batch + h * self.head + j * self.pos;
        &self.data[o..o + d]
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_attn_fwd<T: Elem>(
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
        CacheView::<T>::new(k, lk, "k")?,
        CacheView::<T>::new(v, lv, "v")?,
    );
    let (mst, ml) = op.mask.storage_and_layout();
    let candle_core::Storage::Cpu(mc) = &*mst else {
        bail!("decode attention: the mask must be on the CPU")
    };
    let ms = &T::cpu_storage_as_slice(mc)?[ml.start_offset()..ml.start_offset() + b * s * len];
    let g = nh / nkv;
    let nq = s * g;
    let scale: T = cast(op.scale);
    // One task per (row, kv head): its nq query vectors, in (position, group) order.
    let parts: Vec<Vec<T>> = (0..b * nkv)
        .into_par_iter()
        .map(|task| {
            let (bi, h) = (task / nkv, task % nkv);
            let qv = |qi: usize| {
                let (i, gi) = (qi / g, qi % g);
                let o = ((bi * nh + h * g + gi) * s + i) * hd;
                &qs[o..o + hd]
            };
            // Only the keys some query of the row may see are read: the masked ones
            // (padding, other rows' prefixes, a finished row's whole cache) would get
            // weight exactly 0.
            let masks = &ms[bi * s * len..(bi + 1) * s * len];
            let keys: Vec<usize> = (0..len)
                .filter(|&j| (0..s).any(|i| masks[i * len + j] != T::neg_infinity()))
                .collect();
            let nk = keys.len();
            fast!({
                let mut p = vec![T::zero(); nq * nk];
                for (c, &j) in keys.iter().enumerate() {
                    let kr = kc.at(bi, h, j, hd);
                    for qi in 0..nq {
                        p[qi * nk + c] = dot(qv(qi), Some(kr));
                    }
                }
                for qi in 0..nq {
                    let m = &masks[(qi / g) * len..(qi / g + 1) * len];
                    let row = &mut p[qi * nk..(qi + 1) * nk];
                    for (x, &j) in row.iter_mut().zip(&keys) {
                        *x = *x * scale + m[j];
                    }
                    softmax_in_place(row, T::one());
                }
                let mut out = vec![T::zero(); nq * hd];
                for (c, &j) in keys.iter().enumerate() {
                    let vr = vc.at(bi, h, j, hd);
                    for qi in 0..nq {
                        let pj = p[qi * nk + c];
                        for (o, &x) in out[qi * hd..(qi + 1) * hd].iter_mut().zip(vr) {
                            *o = *o + pj * x;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut y = vec![T::zero(); b * s * nh * hd];
    for (task, part) in parts.iter().enumerate() {
        let (bi, h) = (task / nkv, task % nkv);
        for qi in 0..nq {
            let (i, gi) = (qi / g, qi % g);
            let o = ((bi * s + i) * nh + h * g + gi) * hd;
            y[o..o + hd].copy_from_slice(&part[qi * hd..(qi + 1) * hd]);
        }
    }
    Ok((T::to_cpu_storage_owned(y), Shape::from((b, s, nh, hd))))
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
        dispatch!(q.dtype(), decode_attn_fwd(self, q, lq, k, lk, v, lv))
    }
}
