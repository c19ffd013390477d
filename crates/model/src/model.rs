//! The decoder LLM (Llama, Qwen2/2.5, Qwen3): trainable forward pass with packed
//! variable-length batches, KV-cached inference, and optional per-layer activation
//! recomputation (gradient checkpointing).

use crate::config::{Arch, ModelConfig};
use crate::error::{invalid, Error, Result};
use crate::kernels::{AmxMatrix, PanelMatrix};
use crate::ops;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use half::bf16;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where each token of a batch sits: its position id and which keys it may attend to.
///
/// Built by [`SeqLayout::packed`] (training: several sequences per row) or
/// [`SeqLayout::left_padded`] (generation: one sequence per row, padded on the left).
#[derive(Debug, Clone)]
pub struct SeqLayout {
    /// `[b, t]` position of each token inside its own sequence (f32).
    pub positions: Tensor,
    /// `[b, 1, t, t]` additive attention mask (0 or -inf), f32.
    pub mask: Tensor,
    /// Per row, for each token, `Some(sequence index)` or `None` for padding.
    pub segments: Vec<Vec<Option<usize>>>,
    /// With a KV cache, per row `(leader, columns)`: the row's first `columns` cached keys
    /// and values are row `leader`'s, which attention reads once for the group (so the
    /// row need not store them, [`KvCache`]). A leader names itself; with 0 columns it
    /// takes no part in its group (a finished row that still holds what the others
    /// read). Empty: no such sharing.
    pub kv_share: Vec<(usize, usize)>,
}

impl SeqLayout {
    /// Rows that each pack several sequences back to back (`rows[r]` = the lengths of the
    /// sequences of row `r`), padded at the end to `t` tokens. Each token attends causally
    /// within its own sequence only and positions restart at 0 for every sequence.
    pub fn packed(rows: &[Vec<usize>], t: usize, device: &Device) -> Result<Self> {
        let rows: Vec<Vec<(usize, usize)>> = rows
            .iter()
            .map(|r| r.iter().map(|&len| (len, 0)).collect())
            .collect();
        Self::shared(&rows, t, device)
    }

    /// Packed rows whose sequences may continue the row's first sequence (prefix sharing):
    /// `rows[r][k] = (placed, shared)` places `placed` tokens of sequence `k` of row `r`,
    /// which are its tokens after the first `shared` ones; those `shared` tokens are the
    /// first `shared` tokens of the row's first sequence (whose own `shared` is 0), placed
    /// once. A placed token attends causally to its own placed tokens and to those
    /// `shared` tokens, and its position continues from `shared`. With every `shared` 0
    /// this is [`SeqLayout::packed`].
    pub fn shared(rows: &[Vec<(usize, usize)>], t: usize, device: &Device) -> Result<Self> {
        let mut segments = Vec::with_capacity(rows.len());
        let mut positions = Vec::with_capacity(rows.len() * t);
        // Per row and token: how many leading tokens of the row it may also see.
        let mut prefixes = Vec::with_capacity(rows.len());
        for (r, seqs) in rows.iter().enumerate() {
            let total: usize = seqs.iter().map(|&(len, _)| len).sum();
            if total > t {
                invalid!("row {r} packs {total} tokens, more than the row length {t}");
            }
            let first = seqs.first().map_or(0, |&(len, _)| len);
            let mut seg = Vec::with_capacity(t);
            let mut prefix = Vec::with_capacity(t);
            for (s, &(len, shared)) in seqs.iter().enumerate() {
                if shared > 0 && (s == 0 || shared > first) {
                    invalid!(
                        "row {r}: sequence {s} shares {shared} tokens, but the row's first \
                         sequence has {first} (and shares none itself)"
                    );
                }
                for p in 0..len {
                    seg.push(Some(s));
                    prefix.push(shared);
                    positions.push((shared + p) as f32);
                }
            }
            for p in total..t {
                seg.push(None);
                prefix.push(0);
                positions.push((p - total) as f32);
            }
            segments.push(seg);
            prefixes.push(prefix);
        }
        let b = rows.len();
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (r, (seg, prefix)) in segments.iter().zip(&prefixes).enumerate() {
            for i in 0..t {
                let m = &mut mask[(r * t + i) * t..(r * t + i) * t + t];
                // The shared tokens lie at the start of the row (the first sequence).
                for v in m.iter_mut().take(prefix[i]) {
                    *v = 0.0;
                }
                for j in 0..=i {
                    // Padding attends to itself only, so no row is fully masked.
                    let ok = match (seg[i], seg[j]) {
                        (Some(a), Some(c)) => a == c,
                        (None, _) => i == j,
                        _ => false,
                    };
                    if ok {
                        m[j] = 0.0;
                    }
                }
            }
        }
        Ok(SeqLayout {
            positions: Tensor::from_vec(positions, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, 1, t, t), device)?,
            segments,
            kv_share: vec![],
        })
    }

    /// One sequence per row, right-aligned (padding on the left): the layout for prompts
    /// of different lengths in batched generation.
    pub fn left_padded(lens: &[usize], t: usize, device: &Device) -> Result<Self> {
        let mut segments = Vec::new();
        let mut positions = Vec::new();
        let mut mask = vec![f32::NEG_INFINITY; lens.len() * t * t];
        for (r, &len) in lens.iter().enumerate() {
            if len > t {
                invalid!("sequence {r} has {len} tokens, more than {t}");
            }
            let pad = t - len;
            let mut seg = vec![None; pad];
            seg.extend(std::iter::repeat_n(Some(0), len));
            for i in 0..t {
                positions.push(i.saturating_sub(pad) as f32);
                for j in 0..=i {
                    if (i < pad && i == j) || (i >= pad && j >= pad) {
                        mask[(r * t + i) * t + j] = 0.0;
                    }
                }
            }
            segments.push(seg);
        }
        Ok(SeqLayout {
            positions: Tensor::from_vec(positions, (lens.len(), t), device)?,
            mask: Tensor::from_vec(mask, (lens.len(), 1, t, t), device)?,
            segments,
            kv_share: vec![],
        })
    }
}

/// A pass's attention mask `[b, 1, s, keys]`, with the fused attention's reading of it
/// ([`ops::AttentionMask`]) made at the first layer that takes that kernel and shared by
/// the other layers, their backward and a checkpointed pass's recomputation.
struct PassMask<'a> {
    mask: &'a Tensor,
    fused: std::sync::OnceLock<ops::AttentionMask>,
}

impl<'a> PassMask<'a> {
    fn new(mask: &'a Tensor) -> Self {
        PassMask {
            mask,
            fused: Default::default(),
        }
    }

    fn fused(&self) -> Result<&ops::AttentionMask> {
        if let Some(m) = self.fused.get() {
            return Ok(m);
        }
        let m = ops::AttentionMask::new(&self.mask.squeeze(1)?)?;
        Ok(self.fused.get_or_init(|| m))
    }
}

/// Keys and values of past tokens, per layer. Each layer's are preallocated buffers
/// `[b, kv_heads, capacity, head_dim]` that a decoding step appends to in place (no copy of
/// the past per step); attention reads views of their filled part.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions to reserve beyond the first (prefill) pass, e.g. the tokens to generate.
    reserve: usize,
    /// The passes through this cache run their linear layers in bf16 (AMX tiles or
    /// AVX512-BF16), when the CPU has either ([`KvCache::with_bf16`]).
    bf16: bool,
    /// The keys and values are stored in bf16 ([`KvCache::with_kv_bf16`]).
    kv_bf16: bool,
    /// Per row, the leading positions that are not stored (empty: none): the row reads
    /// them from the row its passes' [`SeqLayout::kv_share`] names, which holds them.
    /// A group of samples of one prompt stores that prompt once.
    skip: Vec<usize>,
}

/// One row of [`KvCache::from_rows`]: positions `0..len` of its `parts` laid end to end
/// (each per layer `(k, v)`, `[1, kv_heads, n, head_dim]`), of which the first `skip` are
/// not stored (read from another row, [`SeqLayout::kv_share`]).
pub(crate) struct RowKv<'a> {
    pub parts: Vec<&'a [(Tensor, Tensor)]>,
    pub len: usize,
    pub skip: usize,
}

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    /// An empty cache whose first pass reserves room for `extra` more positions, so that
    /// decoding up to that many tokens never reallocates.
    pub fn reserving(extra: usize) -> Self {
        Self {
            layers: vec![],
            reserve: extra,
            bf16: false,
            kv_bf16: false,
            skip: vec![],
        }
    }

    /// With `on`, the passes through this cache (f32 weights on a CPU with AMX or
    /// AVX512-BF16) compute their linear layers from bf16-rounded weights and activations
    /// with f32 sums, faster than f32; without either they stay f32. Inference only.
    pub fn with_bf16(mut self, on: bool) -> Self {
        self.bf16 = on;
        self
    }

    /// With `on`, keys and values are stored rounded to bf16 (f32 models on the CPU):
    /// half the memory. The attention kernel widens them back to f32 run by run; the
    /// other paths convert. Inference only; set it before the first pass (the buffers
    /// take their type then).
    pub fn with_kv_bf16(mut self, on: bool) -> Self {
        self.kv_bf16 = on;
        self
    }

    /// The type the keys and values are stored in, for a model computing in `dtype`.
    fn kv_dtype(&self, dtype: DType) -> DType {
        if self.kv_bf16 && dtype == DType::F32 {
            DType::BF16
        } else {
            dtype
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keeps only the given batch rows (drops finished sequences). Rows that leave out
    /// positions keep doing so: the rows they read those from must be kept too.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        let idx: Vec<u32> = rows.to_vec1()?;
        let skip = match self.skip.is_empty() {
            true => vec![],
            false => idx
                .iter()
                .map(|&i| self.skip.get(i as usize).copied().unwrap_or(0))
                .collect(),
        };
        self.pick_rows(rows, &idx, skip)
    }

    /// [`KvCache::select_rows`] from rows that store every position, where new row `r`
    /// need not store its first `skip[r]` (it reads them from another row,
    /// [`SeqLayout::kv_share`]): rows repeated from one (the samples of a prompt) store it
    /// once. Only f32 or bf16 caches on the CPU take skips.
    pub(crate) fn select_rows_storing(&mut self, idx: &[u32], skip: &[usize]) -> Result<()> {
        if skip.len() != idx.len() {
            invalid!("{} skips for {} rows", skip.len(), idx.len());
        }
        if idx
            .iter()
            .any(|&i| self.skip.get(i as usize).is_some_and(|&s| s > 0))
        {
            invalid!("repeated rows must store every position");
        }
        let dev = match self.layers.iter().flatten().next() {
            Some(l) => l.k.device().clone(),
            None => Device::Cpu,
        };
        let rows = Tensor::new(idx, &dev)?;
        self.pick_rows(&rows, idx, skip.to_vec())
    }

    /// Rows `idx` (also as the tensor `rows`), the new rows' `skip`.
    fn pick_rows(&mut self, rows: &Tensor, idx: &[u32], skip: Vec<usize>) -> Result<()> {
        // Kept rows in increasing order (finished rows dropped) move down in place.
        let in_place = idx.windows(2).all(|w| w[0] < w[1]);
        let from = |r: usize| skip.get(r).copied().unwrap_or(0);
        let pick = |t: &mut Tensor, len: usize| -> Result<()> {
            let new = match (pooled(t), in_place) {
                // A view of the same storage: nothing to recycle.
                (Some(DType::F32), true) => return compact_rows::<f32>(t, idx, len, from),
                (Some(_), true) => return compact_rows::<bf16>(t, idx, len, from),
                (Some(DType::F32), false) => gather_rows::<f32>(t, idx, len, from)?,
                (Some(_), false) => gather_rows::<bf16>(t, idx, len, from)?,
                (None, _) => {
                    if skip.iter().any(|&s| s > 0) {
                        invalid!("rows that skip positions need a CPU cache");
                    }
                    t.index_select(rows, 0)?
                }
            };
            crate::kvbuf::recycle(&std::mem::replace(t, new));
            Ok(())
        };
        self.layers
            .par_iter_mut()
            .flatten()
            .try_for_each(|l| -> Result<()> {
                pick(&mut l.k, l.len)?;
                pick(&mut l.v, l.len)
            })?;
        self.skip = skip;
        Ok(())
    }

    /// Copies row `from`'s first `n` positions to row `to`, which then stores them: a
    /// row that read them from `from` ([`SeqLayout::kv_share`]) takes its place. Caches
    /// that store every row's own (off the CPU) are left as they are.
    pub(crate) fn copy_first_positions(&mut self, from: usize, to: usize, n: usize) -> Result<()> {
        if self.skip.get(from).is_some_and(|&s| s > 0) {
            invalid!("row {from} does not store its first positions");
        }
        let left_out = self.skip.get(to).copied().unwrap_or(0);
        if left_out == 0 {
            return Ok(());
        }
        if n < left_out {
            invalid!("row {to} leaves out {left_out} positions, more than the {n} copied");
        }
        let n = n.min(self.len());
        let copy = |t: &Tensor| -> Result<()> {
            match pooled(t) {
                Some(DType::F32) => first_positions::<f32>(t, from, to, n),
                Some(_) => first_positions::<bf16>(t, from, to, n),
                None => invalid!("rows that skip positions need a CPU cache"),
            }
        };
        self.layers
            .par_iter()
            .flatten()
            .try_for_each(|l| -> Result<()> {
                copy(&l.k)?;
                copy(&l.v)
            })?;
        self.skip[to] = 0;
        Ok(())
    }

    /// A cache of `rows.len()` rows whose row `r` holds `rows[r]`'s first `len` positions
    /// (`None`: nothing), at positions `0..len`, but for its first `skip` ones (not stored;
    /// only f32 or bf16 caches on the CPU take skips); buffers have room for `width + reserve`
    /// positions and the cache counts `width` (rows shorter than `width` are masked there
    /// by the caller, and hold zeros). The buffers take the type a model computing in
    /// `model_dtype` stores (bf16 with `kv_bf16`), converting rows kept in another.
    pub(crate) fn from_rows(
        rows: &[Option<RowKv<'_>>],
        width: usize,
        reserve: usize,
        (model_dtype, kv_bf16): (DType, bool),
    ) -> Result<Self> {
        let mut out = KvCache::reserving(reserve).with_kv_bf16(kv_bf16);
        // The type the model's passes store, whatever type the given rows are in.
        let dt = out.kv_dtype(model_dtype);
        let template = rows
            .iter()
            .flatten()
            .flat_map(|r| r.parts.first())
            .next()
            .ok_or_else(|| crate::Error::Invalid("no cached row".into()))?;
        for row in rows.iter().flatten() {
            let have: usize = row
                .parts
                .iter()
                .map(|p| p[0].0.dim(2))
                .sum::<candle_core::Result<usize>>()?;
            if row.len > have
                || row.len > width
                || row.parts.iter().any(|p| p.len() != template.len())
            {
                invalid!(
                    "a cached row of {have} positions cannot fill {} of {width}",
                    row.len
                );
            }
        }
        let cpu = template[0].0.device().is_cpu() && matches!(dt, DType::F32 | DType::BF16);
        if !cpu && rows.iter().flatten().any(|r| r.skip > 0) {
            invalid!("rows that skip positions need an f32 or bf16 cache on the CPU");
        }
        let layer = |li: usize, pick: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
            let t = pick(&template[li]);
            let (_, h, _, d) = t.dims4()?;
            let shape = (rows.len(), h, width + reserve, d);
            // Each row's parts with their first positions, in the stored type.
            let parts = |row: &RowKv<'_>| -> Result<Vec<(Tensor, usize)>> {
                let mut at = 0;
                let mut out = vec![];
                for p in &row.parts {
                    let t = pick(&p[li]);
                    let n = t.dim(2)?;
                    if at + n > row.skip && at < row.len {
                        out.push((t.to_dtype(dt)?.contiguous()?, at));
                    }
                    at += n;
                }
                Ok(out)
            };
            if cpu {
                let srcs: Vec<Option<(Vec<(Tensor, usize)>, usize, usize)>> = rows
                    .iter()
                    .map(|row| {
                        row.as_ref()
                            .map(|r| Ok((parts(r)?, r.skip, r.len)))
                            .transpose()
                    })
                    .collect::<Result<_>>()?;
                return match dt {
                    DType::F32 => rows_into::<f32>(&srcs, shape, width),
                    _ => rows_into::<bf16>(&srcs, shape, width),
                };
            }
            let buf = Tensor::zeros(shape, dt, t.device())?;
            for (r, row) in rows.iter().enumerate() {
                let Some(row) = row else { continue };
                let mut at = 0;
                for p in &row.parts {
                    let p = pick(&p[li]);
                    let n = p.dim(2)?.min(row.len.saturating_sub(at));
                    if n > 0 {
                        let p = p.narrow(2, 0, n)?.to_dtype(dt)?.contiguous()?;
                        // Row r of the buffer is a contiguous view sharing its storage.
                        buf.narrow(0, r, 1)?.slice_set(&p, 2, at)?;
                    }
                    at += n;
                }
            }
            Ok(buf)
        };
        let layers = (0..template.len())
            .into_par_iter()
            .map(|li| {
                Ok(Some(LayerKv {
                    k: layer(li, |kv| &kv.0)?,
                    v: layer(li, |kv| &kv.1)?,
                    len: width,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        out.layers = layers;
        if cpu {
            out.skip = rows
                .iter()
                .map(|r| r.as_ref().map_or(0, |r| r.skip))
                .collect();
        }
        Ok(out)
    }

    /// Row `r`'s keys and values at the given position ranges, concatenated: per layer
    /// `[1, kv_heads, total, head_dim]`.
    pub(crate) fn extract_row(
        &self,
        r: usize,
        ranges: &[(usize, usize)],
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let ranges: Vec<(usize, usize)> = ranges.iter().copied().filter(|(a, b)| b > a).collect();
        let part = |t: &Tensor| -> Result<Tensor> {
            match pooled(t) {
                Some(DType::F32) => row_ranges::<f32>(t, r, &ranges),
                Some(_) => row_ranges::<bf16>(t, r, &ranges),
                None => {
                    let t = t.narrow(0, r, 1)?;
                    let ps: Vec<Tensor> = ranges
                        .iter()
                        .map(|&(a, b)| t.narrow(2, a, b - a))
                        .collect::<candle_core::Result<_>>()?;
                    Ok(Tensor::cat(&ps, 2)?.contiguous()?)
                }
            }
        };
        self.layers
            .par_iter()
            .flatten()
            .map(|l| Ok((part(&l.k)?, part(&l.v)?)))
            .collect()
    }
}

/// A deep copy: the copy's buffers are its own (decoding appends to them in place).
impl Clone for KvCache {
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| LayerKv {
                    k: l.k.copy().expect("copying a KV buffer"),
                    v: l.v.copy().expect("copying a KV buffer"),
                    len: l.len,
                })
            })
            .collect();
        KvCache {
            layers,
            reserve: self.reserve,
            bf16: self.bf16,
            kv_bf16: self.kv_bf16,
            skip: self.skip.clone(),
        }
    }
}

/// The buffers go back to the pool of [`crate::kvbuf`] for the next cache.
impl Drop for KvCache {
    fn drop(&mut self) {
        for l in self.layers.iter().flatten() {
            crate::kvbuf::recycle(&l.k);
            crate::kvbuf::recycle(&l.v);
        }
    }
}

/// The type of a whole cache buffer the CPU copies handle (f32 or bf16 on the CPU).
fn pooled(t: &Tensor) -> Option<DType> {
    crate::kvbuf::pooled_dtype(t).filter(|_| t.rank() == 4)
}

/// Copies positions `from..from + n` of each of `heads` heads of `src` (`[heads, src_cap,
/// d]`) to positions `to..` of `dst` (`[heads, dst_cap, d]`).
fn copy_positions<T: Copy>(
    dst: &mut [T],
    dst_cap: usize,
    src: &[T],
    src_cap: usize,
    (heads, d): (usize, usize),
    (from, n, to): (usize, usize, usize),
) {
    for hh in 0..heads {
        let s = (hh * src_cap + from) * d;
        let t = (hh * dst_cap + to) * d;
        dst[t..t + n * d].copy_from_slice(&src[s..s + n * d]);
    }
}

/// A pooled buffer `[b, heads, cap, d]` whose row `r` holds, for `srcs[r] = (parts, skip,
/// len)`, positions `skip..len` of its parts (`[1, heads, n, d]` each, contiguous, with
/// their first positions) and zeros from `len` up to `width` (all zeros for `None`);
/// positions `0..skip`, and from `width` on, are left as they are (not read, or written
/// before they are read).
fn rows_into<T: crate::kvbuf::Pooled>(
    srcs: &[Option<(Vec<(Tensor, usize)>, usize, usize)>],
    (b, heads, cap, d): (usize, usize, usize, usize),
    width: usize,
) -> Result<Tensor> {
    let mut buf = crate::kvbuf::take::<T>(b * heads * cap * d);
    for (row, src) in buf.chunks_mut(heads * cap * d).zip(srcs) {
        let len = match src {
            Some((parts, skip, len)) => {
                for (t, at) in parts {
                    let n = t.dim(2)?;
                    let (from, to) = ((*skip).max(*at), (*len).min(at + n));
                    if to > from {
                        crate::kvbuf::with_slice::<T, _>(t, |s| {
                            copy_positions(row, cap, s, n, (heads, d), (from - at, to - from, from))
                        })?;
                    }
                }
                *len
            }
            None => 0,
        };
        for hh in 0..heads {
            row[(hh * cap + len) * d..(hh * cap + width) * d].fill(T::zero());
        }
    }
    Ok(Tensor::from_vec(buf, (b, heads, cap, d), &Device::Cpu)?)
}

/// Rows `idx` (increasing) of the buffer `t` (`[b, heads, cap, d]`), positions
/// `skip(r)..len` of new row `r`, moved down to rows `0..idx.len()` of the same storage;
/// `t` becomes a view of those rows.
fn compact_rows<T: crate::kvbuf::Pooled>(
    t: &mut Tensor,
    idx: &[u32],
    len: usize,
    skip: impl Fn(usize) -> usize,
) -> Result<()> {
    let (b, heads, cap, d) = t.dims4()?;
    if let Some(&i) = idx.iter().find(|&&i| i as usize >= b) {
        invalid!("row {i} of a {b}-row KV cache");
    }
    if idx.iter().enumerate().all(|(r, &i)| r == i as usize) && idx.len() == b {
        return Ok(());
    }
    crate::kvbuf::with_storage_mut::<T>(t, |s| {
        for (r, &i) in idx.iter().enumerate() {
            if i as usize != r {
                move_positions(s, (heads, cap, d), (i as usize, r), (skip(r).min(len), len));
            }
        }
    })?;
    *t = t.narrow(0, 0, idx.len())?;
    Ok(())
}

/// Row `from`'s positions `0..n` copied to row `to` of the buffer `t` (`[b, heads, cap,
/// d]`), in place.
fn first_positions<T: crate::kvbuf::Pooled>(
    t: &Tensor,
    from: usize,
    to: usize,
    n: usize,
) -> Result<()> {
    let (b, heads, cap, d) = t.dims4()?;
    if from >= b || to >= b {
        invalid!("rows {from} and {to} of a {b}-row KV cache");
    }
    crate::kvbuf::with_storage_mut::<T>(t, |s| {
        move_positions(s, (heads, cap, d), (from, to), (0, n))
    })?;
    Ok(())
}

/// Positions `a..b` of row `from` copied to the same positions of row `to`, within one
/// buffer `[rows, heads, cap, d]`.
fn move_positions<T: Copy>(
    s: &mut [T],
    (heads, cap, d): (usize, usize, usize),
    (from, to): (usize, usize),
    (a, b): (usize, usize),
) {
    let stride = heads * cap * d;
    for hh in 0..heads {
        let at = hh * cap * d + a * d;
        s.copy_within(
            from * stride + at..from * stride + at + (b - a) * d,
            to * stride + at,
        );
    }
}

/// Rows `idx` of the buffer `t` (`[b, heads, cap, d]`), positions `skip(r)..len` of new
/// row `r`, in a pooled buffer of the same capacity.
fn gather_rows<T: crate::kvbuf::Pooled>(
    t: &Tensor,
    idx: &[u32],
    len: usize,
    skip: impl Fn(usize) -> usize,
) -> Result<Tensor> {
    let (b, heads, cap, d) = t.dims4()?;
    let stride = heads * cap * d;
    let mut buf = crate::kvbuf::take::<T>(idx.len() * stride);
    crate::kvbuf::with_slice::<T, _>(t, |s| -> Result<()> {
        for (r, (row, &i)) in buf.chunks_mut(stride).zip(idx).enumerate() {
            let i = i as usize;
            if i >= b {
                invalid!("row {i} of a {b}-row KV cache");
            }
            let from = skip(r).min(len);
            let src = &s[i * stride..];
            copy_positions(row, cap, src, cap, (heads, d), (from, len - from, from));
        }
        Ok(())
    })??;
    Ok(Tensor::from_vec(
        buf,
        (idx.len(), heads, cap, d),
        &Device::Cpu,
    )?)
}

/// Row `r` of the buffer `t` (`[b, heads, cap, d]`) at the position ranges, concatenated:
/// `[1, heads, total, d]` in a pooled buffer.
fn row_ranges<T: crate::kvbuf::Pooled>(
    t: &Tensor,
    r: usize,
    ranges: &[(usize, usize)],
) -> Result<Tensor> {
    let (_, heads, cap, d) = t.dims4()?;
    let total: usize = ranges.iter().map(|(a, b)| b - a).sum();
    let mut buf = crate::kvbuf::take::<T>(heads * total * d);
    crate::kvbuf::with_slice::<T, _>(t, |s| {
        let row = &s[r * heads * cap * d..(r + 1) * heads * cap * d];
        let mut to = 0;
        for &(a, b) in ranges {
            copy_positions(&mut buf, total, row, cap, (heads, d), (a, b - a, to));
            to += b - a;
        }
    })?;
    Ok(Tensor::from_vec(buf, (1, heads, total, d), &Device::Cpu)?)
}

/// Appends this step's keys and values `[b, kv_heads, s, head_dim]` to a layer's cache
/// and returns views of everything cached, the new positions included.
fn append_kv(
    slot: &mut Option<LayerKv>,
    (reserve, kv_bf16): (usize, bool),
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (k, v) = if kv_bf16 && k.dtype() == DType::F32 {
        (k.to_dtype(DType::BF16)?, v.to_dtype(DType::BF16)?)
    } else {
        (k.clone(), v.clone())
    };
    let (k, v) = (&k, &v);
    let (b, h, s, d) = k.dims4()?;
    let len = slot.as_ref().map_or(0, |c| c.len);
    let need = len + s;
    let cap = match slot {
        Some(c) => c.k.dim(2)?,
        None => 0,
    };
    if need > cap {
        // First pass: the reserve; later growth by half again (amortised O(1) copies).
        let cap = if cap == 0 {
            need + reserve
        } else {
            need + need / 2
        };
        // Positions from `len` on are written before they are read.
        let alloc = |like: &Tensor| -> Result<Tensor> {
            Ok(match (like.device().is_cpu(), like.dtype()) {
                (true, DType::F32) => crate::kvbuf::tensor::<f32>((b, h, cap, d))?,
                (true, DType::BF16) => crate::kvbuf::tensor::<bf16>((b, h, cap, d))?,
                _ => Tensor::zeros((b, h, cap, d), like.dtype(), like.device())?,
            })
        };
        let (nk, nv) = (alloc(k)?, alloc(v)?);
        if let Some(c) = slot.as_ref().filter(|c| c.len > 0) {
            nk.slice_set(&c.k.narrow(2, 0, c.len)?.contiguous()?, 2, 0)?;
            nv.slice_set(&c.v.narrow(2, 0, c.len)?.contiguous()?, 2, 0)?;
        }
        if let Some(old) = slot.replace(LayerKv { k: nk, v: nv, len }) {
            crate::kvbuf::recycle(&old.k);
            crate::kvbuf::recycle(&old.v);
        }
    }
    let c = slot.as_mut().expect("allocated above");
    c.k.slice_set(&k.contiguous()?, 2, len)?;
    c.v.slice_set(&v.contiguous()?, 2, len)?;
    c.len = need;
    Ok((c.k.narrow(2, 0, need)?, c.v.narrow(2, 0, need)?))
}

/// The rows of a `[b * s]` grid that hold tokens (`layout.segments`), as u32 indices;
/// `None` when every position does (nothing to skip).
fn real_tokens(layout: &SeqLayout, dev: &Device) -> Result<Option<Tensor>> {
    let rows: Vec<u32> = layout
        .segments
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, seg)| seg.is_some())
        .map(|(i, _)| i as u32)
        .collect();
    let total: usize = layout.segments.iter().map(Vec::len).sum();
    if rows.len() == total {
        return Ok(None);
    }
    Ok(Some(Tensor::new(rows, dev)?))
}

/// `x: [k, d]` (the rows `keep` of an `[n, d]` grid) back on that grid, zeros elsewhere.
fn spread(x: &Tensor, keep: &Tensor, n: usize) -> Result<Tensor> {
    let d = x.dim(1)?;
    Ok(Tensor::zeros((n, d), x.dtype(), x.device())?.index_add(keep, x, 0)?)
}

struct Attention {
    /// q, k and v projections stacked: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv: Var,
    qkv_bias: Option<Var>,
    o: Var,
    q_norm: Option<Var>,
    k_norm: Option<Var>,
}

struct Layer {
    input_norm: Var,
    attn: Attention,
    post_norm: Var,
    /// gate and up projections stacked: `[2 * intermediate, hidden]`.
    gate_up: Var,
    down: Var,
}

/// How a layer's matrices are stored: the HF tensors `parts` stacked along their
/// dimension 0 (one matrix product instead of several) and, for `transposed`, kept as
/// `[in, out]` so that `x @ w` needs no transpose in the forward or backward pass.
struct Packed {
    internal: &'static str,
    parts: &'static [&'static str],
    transposed: bool,
}

const PACKED: [Packed; 5] = [
    Packed {
        internal: "self_attn.qkv_proj.weight_t",
        parts: &[
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
        ],
        transposed: true,
    },
    Packed {
        internal: "self_attn.qkv_proj.bias",
        parts: &[
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
        ],
        transposed: false,
    },
    Packed {
        internal: "self_attn.o_proj.weight_t",
        parts: &["self_attn.o_proj.weight"],
        transposed: true,
    },
    Packed {
        internal: "mlp.gate_up_proj.weight_t",
        parts: &["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        transposed: true,
    },
    Packed {
        internal: "mlp.down_proj.weight_t",
        parts: &["mlp.down_proj.weight"],
        transposed: true,
    },
];

/// Whether a forward pass records the autograd graph.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Track {
    Yes,
    No,
}

fn w(v: &Var, t: Track) -> Tensor {
    match t {
        Track::Yes => v.as_tensor().clone(),
        Track::No => v.as_tensor().detach(),
    }
}

/// How a linear layer computes its product.
#[derive(Clone, Copy)]
enum Product<'a> {
    /// f32 (any device and dtype).
    F32,
    /// Inference on the weight's bf16 AMX tiles.
    Packed(&'a Arc<AmxMatrix>),
    /// f32 inference: products of few rows (decoding steps) on the weight repacked in
    /// column panels, larger ones on the weight itself.
    Panels(&'a Arc<PanelMatrix>),
    /// Training with bf16-rounded operands on AMX, forward and backward; `need_dw`: the
    /// weight takes a gradient.
    Bf16 { need_dw: bool },
}

/// How a pass computes its linear layers.
#[derive(Clone, Copy)]
enum Prec<'a> {
    F32,
    /// Inference on a layer's weights packed as bf16 AMX tiles (qkv, o, gate-up, down).
    Packed(&'a [Arc<AmxMatrix>; 4]),
    /// f32 inference with a layer's weights also repacked in column panels (qkv, o,
    /// gate-up, down) for the products of few rows.
    Panels(&'a [Arc<PanelMatrix>; 4]),
    /// bf16-rounded operands on AMX, with a backward ([`CausalLM::set_bf16_matmuls`]).
    Bf16,
}

/// `x: [n, in] @ weight_t: [in, out]`, plus an optional bias, computed as `how` says.
fn linear(x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>, how: Product) -> Result<Tensor> {
    let y = match how {
        Product::Packed(m) => x
            .contiguous()?
            .apply_op1_no_bwd(&crate::kernels::AmxLinear(m.clone()))?,
        Product::Bf16 { need_dw } => x.contiguous()?.apply_op2(
            &weight_t.contiguous()?,
            crate::kernels::AmxMatmul { need_dw },
        )?,
        Product::Panels(p) => ops::linear_product_on(x, weight_t, false, Some(p))?,
        Product::F32 => ops::linear_product(x, weight_t, false)?,
    };
    Ok(match bias {
        Some(b) => ops::add_bias(&y, b)?,
        None => y,
    })
}

/// A decoder-only causal language model whose weights are trainable [`Var`]s named
/// exactly as in Hugging Face checkpoints.
pub struct CausalLM {
    cfg: ModelConfig,
    dtype: DType,
    device: Device,
    params: BTreeMap<String, Var>,
    embed: Var,
    layers: Vec<Layer>,
    norm: Var,
    lm_head: Option<Var>,
    inv_freq: Tensor,
    /// Identifies the current weights ([`CausalLM::weights_version`]).
    version: std::sync::atomic::AtomicU64,
    /// LoRA adapters; with them the base weights are frozen.
    lora: Option<crate::lora::Lora>,
    /// Seed of the LoRA dropout masks of the next training passes.
    dropout_seed: std::sync::atomic::AtomicU64,
    /// The linear weights packed for bf16 AMX products, for the weights version they were
    /// packed from (made on first use by a [`KvCache::with_bf16`] pass).
    amx: std::sync::Mutex<Option<Arc<AmxWeights>>>,
    /// The linear weights repacked in column panels for f32 decoding steps, for the
    /// weights version they were packed from (made on first use by an f32 cached pass).
    panels: std::sync::Mutex<Option<Arc<PanelWeights>>>,
    /// Training passes compute the linear layers from bf16-rounded operands on AMX
    /// ([`CausalLM::set_bf16_matmuls`]).
    bf16_matmuls: std::sync::atomic::AtomicBool,
}

/// A model's linear weights as bf16 AMX tiles: per layer the qkv, o, gate-up and down
/// projections, then the output projection.
pub(crate) struct AmxWeights {
    version: u64,
    layers: Vec<[Arc<AmxMatrix>; 4]>,
    pub(crate) lm_head: Arc<AmxMatrix>,
}

/// A model's layer weights in column panels ([`PanelMatrix`]): per layer the qkv, o,
/// gate-up and down projections.
pub(crate) struct PanelWeights {
    version: u64,
    layers: Vec<[Arc<PanelMatrix>; 4]>,
}

/// Source of weight versions: unique across every model of the process.
static NEXT_WEIGHTS_VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_weights_version() -> u64 {
    NEXT_WEIGHTS_VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl CausalLM {
    /// The HF names and shapes of every tensor of a checkpoint of `cfg`, in checkpoint
    /// order.
    pub fn param_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
        )];
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            out.push((p("input_layernorm.weight"), vec![h]));
            out.push((p("self_attn.q_proj.weight"), vec![nq, h]));
            out.push((p("self_attn.k_proj.weight"), vec![nkv, h]));
            out.push((p("self_attn.v_proj.weight"), vec![nkv, h]));
            out.push((p("self_attn.o_proj.weight"), vec![h, nq]));
            if cfg.attention_bias {
                out.push((p("self_attn.q_proj.bias"), vec![nq]));
                out.push((p("self_attn.k_proj.bias"), vec![nkv]));
                out.push((p("self_attn.v_proj.bias"), vec![nkv]));
            }
            if cfg.arch == Arch::Qwen3 {
                out.push((p("self_attn.q_norm.weight"), vec![hd]));
                out.push((p("self_attn.k_norm.weight"), vec![hd]));
            }
            out.push((p("post_attention_layernorm.weight"), vec![h]));
            out.push((p("mlp.gate_proj.weight"), vec![cfg.intermediate_size, h]));
            out.push((p("mlp.up_proj.weight"), vec![cfg.intermediate_size, h]));
            out.push((p("mlp.down_proj.weight"), vec![h, cfg.intermediate_size]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
        }
        out
    }

    /// A freshly initialised model (normal(0, 0.02) matrices, unit norms, zero biases).
    pub fn new_random(cfg: &ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        crate::tune_runtime();
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in Self::param_shapes(cfg) {
            let cpu = &Device::Cpu;
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, DType::F32, cpu)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, cpu)?
            } else {
                // Box-Muller normal(0, 0.02) from a seeded generator: same weights on
                // every device.
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                        (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                    })
                    .collect();
                Tensor::from_vec(v, shape, cpu)?
            };
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg.clone(), tensors, dtype, device, "random init")
    }

    /// Builds a model from named tensors (converted to `dtype` on `device`). `source`
    /// names where they came from in errors.
    pub fn from_tensors(
        cfg: ModelConfig,
        mut tensors: BTreeMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        source: &str,
    ) -> Result<Self> {
        check_dtype(dtype)?;
        crate::tune_runtime();
        let mut params = BTreeMap::new();
        for (name, shape) in Self::param_shapes(&cfg) {
            let t = tensors.remove(&name).ok_or_else(|| Error::BadFile {
                path: source.into(),
                msg: format!("missing tensor `{name}`"),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::BadFile {
                    path: source.into(),
                    msg: format!(
                        "tensor `{name}` has shape {:?}, config implies {shape:?}",
                        t.dims()
                    ),
                });
            }
            params.insert(name, t.to_device(device)?.to_dtype(dtype)?);
        }
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            for pk in &PACKED {
                let parts: Vec<String> = pk.parts.iter().map(|n| p(n)).collect();
                if parts.iter().all(|n| params.contains_key(n)) {
                    let ts: Vec<Tensor> = parts
                        .iter()
                        .map(|n| params.remove(n).expect("present"))
                        .collect();
                    let t = Tensor::cat(&ts, 0)?;
                    let t = if pk.transposed {
                        t.t()?.contiguous()?
                    } else {
                        t
                    };
                    params.insert(p(pk.internal), t);
                }
            }
        }
        let params: BTreeMap<String, Var> = params
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        let get = |n: &str| params[n].clone();
        let opt = |n: &str| params.get(n).cloned();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| format!("model.layers.{i}.{s}");
                Layer {
                    input_norm: get(&p("input_layernorm.weight")),
                    attn: Attention {
                        qkv: get(&p("self_attn.qkv_proj.weight_t")),
                        qkv_bias: opt(&p("self_attn.qkv_proj.bias")),
                        o: get(&p("self_attn.o_proj.weight_t")),
                        q_norm: opt(&p("self_attn.q_norm.weight")),
                        k_norm: opt(&p("self_attn.k_norm.weight")),
                    },
                    post_norm: get(&p("post_attention_layernorm.weight")),
                    gate_up: get(&p("mlp.gate_up_proj.weight_t")),
                    down: get(&p("mlp.down_proj.weight_t")),
                }
            })
            .collect();
        let hd = cfg.head_dim;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32)
            .collect();
        Ok(CausalLM {
            embed: get("model.embed_tokens.weight"),
            norm: get("model.norm.weight"),
            lm_head: opt("lm_head.weight"),
            inv_freq: Tensor::new(inv, device)?,
            layers,
            params,
            dtype,
            device: device.clone(),
            cfg,
            version: std::sync::atomic::AtomicU64::new(next_weights_version()),
            lora: None,
            dropout_seed: std::sync::atomic::AtomicU64::new(0),
            amx: std::sync::Mutex::new(None),
            panels: std::sync::Mutex::new(None),
            bf16_matmuls: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Adds fresh LoRA adapters (`A` seeded by `seed`, `B` zero: the model computes what
    /// it did) and freezes the base weights. Adapters already present are an error.
    pub fn add_lora(&mut self, cfg: &crate::LoraConfig, seed: u64) -> Result<()> {
        if self.lora.is_some() {
            invalid!("the model already has LoRA adapters");
        }
        if !cfg.enabled() {
            invalid!("lora.rank must be >= 1 to add adapters");
        }
        self.lora = Some(crate::lora::init(
            &self.cfg,
            cfg,
            self.dtype,
            &self.device,
            seed,
        )?);
        self.weights_changed();
        Ok(())
    }

    /// The adapters' settings, when the model has adapters.
    pub fn lora_config(&self) -> Option<&crate::LoraConfig> {
        self.lora.as_ref().map(|l| &l.cfg)
    }

    /// The parameters an optimizer updates: the adapters (PEFT names) when the model has
    /// them, else every parameter.
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        match &self.lora {
            Some(l) => &l.params,
            None => &self.params,
        }
    }

    /// Writes the adapters as a PEFT directory (`base` names the base model in its
    /// config).
    pub fn save_adapter(&self, base: &str, dir: &std::path::Path) -> Result<()> {
        match &self.lora {
            Some(l) => crate::lora::save_adapter(l, base, dir),
            None => Err(Error::Invalid("the model has no LoRA adapters".into())),
        }
    }

    /// Reads adapter matrices written by [`CausalLM::save_adapter`] (same rank and
    /// targets as the model's adapters).
    pub fn load_adapter(&self, dir: &std::path::Path) -> Result<()> {
        match &self.lora {
            Some(l) => crate::lora::load_adapter(l, dir)?,
            None => return Err(Error::Invalid("the model has no LoRA adapters".into())),
        }
        self.weights_changed();
        Ok(())
    }

    /// A base weight in a forward pass: frozen (no graph) when the model has adapters.
    fn bw(&self, v: &Var, t: Track) -> Tensor {
        if self.lora.is_some() {
            w(v, Track::No)
        } else {
            w(v, t)
        }
    }

    /// Sets the seed of the LoRA dropout masks of the following training passes
    /// (`forward_backward`); trainers derive one per micro-batch, so that a resumed run
    /// draws the same masks. Without adapters or with `dropout = 0` it changes nothing.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed
            .store(seed, std::sync::atomic::Ordering::SeqCst);
    }

    /// The dropout seed of a training pass: `None` when nothing drops.
    fn training_dropout(&self) -> Option<u64> {
        let l = self.lora.as_ref()?;
        (l.cfg.dropout > 0.0).then(|| self.dropout_seed.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// `x @ (scale B A)^T` for layer `li`'s adapter on `TARGETS[k]`, if there is one;
    /// `drop` (a training pass's dropout seed) applies the adapter's dropout to `x`.
    fn adapter(
        &self,
        li: usize,
        k: usize,
        x: &Tensor,
        t: Track,
        drop: Option<u64>,
    ) -> Result<Option<Tensor>> {
        let Some(l) = &self.lora else { return Ok(None) };
        let Some(ad) = &l.layers[li][k] else {
            return Ok(None);
        };
        let dropped;
        // `drop` is only set when the adapters have dropout (`training_dropout`).
        let x = match drop {
            Some(seed) => {
                let seed = tooltrain_util::derive_seed(&[seed, li as u64, k as u64]);
                let mask = crate::lora::dropout_mask(seed, x.elem_count(), l.cfg.dropout);
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                dropped = (x * mask)?;
                &dropped
            }
            _ => x,
        };
        let down = x.matmul(&w(&ad.a, t).t()?)?;
        let up = down.matmul(&w(&ad.b, t).t()?)?;
        Ok(Some((up * l.cfg.scale())?))
    }

    /// The sum of the adapters on `ks` (consecutive parts of a packed projection whose
    /// outputs are `outs` wide), as one `[n, sum(outs)]` tensor; `None` without any.
    fn packed_adapters(
        &self,
        li: usize,
        ks: &[usize],
        outs: &[usize],
        x: &Tensor,
        t: Track,
        drop: Option<u64>,
    ) -> Result<Option<Tensor>> {
        let deltas = ks
            .iter()
            .map(|&k| self.adapter(li, k, x, t, drop))
            .collect::<Result<Vec<_>>>()?;
        if deltas.iter().all(Option::is_none) {
            // No adapter on this projection: nothing to add (and no zeros to allocate).
            return Ok(None);
        }
        let parts = deltas
            .into_iter()
            .zip(outs)
            .map(|(d, &out)| match d {
                Some(d) => Ok(d),
                None => Ok(Tensor::zeros((x.dim(0)?, out), x.dtype(), x.device())?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 1)?))
    }

    /// With `on`, the training passes (`forward_hidden`, `forward_backward`) compute the
    /// products of the linear layers and of the fused attention (scores, weighted values
    /// and their backward) from bf16-rounded operands with f32 sums (mixed precision; the
    /// weights, their gradients, softmax and the optimizer stay f32), when the model is
    /// f32 on a CPU with AMX or AVX512-BF16; otherwise it changes nothing. Returns
    /// whether the products now run in bf16.
    pub fn set_bf16_matmuls(&self, on: bool) -> bool {
        self.bf16_matmuls
            .store(on, std::sync::atomic::Ordering::SeqCst);
        self.bf16_matmuls_active()
    }

    /// Whether training passes run their linear layers in bf16:
    /// [`Self::set_bf16_matmuls`] is on and the model can (f32 weights, a CPU with AMX or
    /// AVX512-BF16). The fused loss head ([`crate::ops::linear_cross_entropy_with`])
    /// follows it.
    pub fn bf16_matmuls_active(&self) -> bool {
        self.bf16_matmuls.load(std::sync::atomic::Ordering::SeqCst) && self.bf16_usable()
    }

    /// Whether this model can run its products in bf16: f32 weights on a CPU with AMX or
    /// AVX512-BF16 ([`crate::bf16_kernel`]).
    fn bf16_usable(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32 && crate::kernels::bf16_available()
    }

    /// Each layer's linear weights (qkv, o, gate-up, down; `[in, out]`) packed by
    /// `pack(w, in, out)`.
    fn pack_layers<T>(
        &self,
        pack: impl Fn(&[f32], usize, usize) -> Result<T>,
    ) -> Result<Vec<[Arc<T>; 4]>> {
        let one = |v: &Var| -> Result<Arc<T>> {
            let (k, n) = v.dims2()?;
            let w = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            Ok(Arc::new(pack(&w, k, n)?))
        };
        self.layers
            .iter()
            .map(|l| {
                Ok([
                    one(&l.attn.qkv)?,
                    one(&l.attn.o)?,
                    one(&l.gate_up)?,
                    one(&l.down)?,
                ])
            })
            .collect()
    }

    /// The linear weights packed as bf16 AMX tiles for the current weights version
    /// (packed now when stale); `None` without a bf16 kernel or the model is not f32 on
    /// a CPU.
    pub(crate) fn amx_weights(&self) -> Result<Option<Arc<AmxWeights>>> {
        if !self.bf16_usable() {
            return Ok(None);
        }
        let version = self.weights_version();
        let mut slot = self.amx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = slot.as_ref().filter(|w| w.version == version) {
            return Ok(Some(w.clone()));
        }
        // The old copy goes first: two copies of the weights would be held otherwise.
        *slot = None;
        let layers = self.pack_layers(|w, k, n| Ok(AmxMatrix::pack(w, k, n)?))?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let (n, k) = head.dims2()?;
        let w = head.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let w = Arc::new(AmxWeights {
            version,
            layers,
            lm_head: Arc::new(AmxMatrix::pack_transposed(&w, n, k)?),
        });
        *slot = Some(w.clone());
        Ok(Some(w))
    }

    /// The layer weights repacked in column panels for the current weights version
    /// (packed now when stale), for f32 decoding on the CPU: `None` unless the model is
    /// f32 on a CPU whose kernels run at AVX2 or above, and with `TOOLTRAIN_F32_PANELS=0`
    /// (read once per process). The products of few rows then read the weights as
    /// sequential streams (one SmolLM2 step's products 1.22x faster at AVX-512, 1.48x at
    /// AVX2 in `benches/decode_products.rs`), at the cost of a second copy of the layer
    /// weights while it is held.
    pub(crate) fn panel_weights(&self) -> Result<Option<Arc<PanelWeights>>> {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off =
            *OFF.get_or_init(|| std::env::var("TOOLTRAIN_F32_PANELS").is_ok_and(|v| v == "0"));
        let usable = !off
            && self.device.is_cpu()
            && self.dtype == DType::F32
            && crate::kernels::simd_level() != crate::kernels::SimdLevel::Baseline;
        if !usable {
            return Ok(None);
        }
        let version = self.weights_version();
        let mut slot = self.panels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = slot.as_ref().filter(|w| w.version == version) {
            return Ok(Some(w.clone()));
        }
        // The old copy goes first: two copies of the weights would be held otherwise.
        *slot = None;
        let layers = self.pack_layers(|w, k, n| Ok(PanelMatrix::pack(w, k, n)))?;
        let w = Arc::new(PanelWeights { version, layers });
        *slot = Some(w.clone());
        Ok(Some(w))
    }

    /// Drops the copies of the weights that decoding made (bf16 tiles, f32 panels); the
    /// next decoding pass makes them again. A trainer calls it before an update, which
    /// makes them stale anyway, so that they do not take memory the update needs.
    pub fn release_decoding_weights(&self) {
        *self.amx.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.panels.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A number that identifies this model's current weights: unique in the process,
    /// changed by [`CausalLM::weights_changed`]. Caches of values computed with the
    /// weights (a [`crate::PrefixCache`]) compare it to know they are stale.
    pub fn weights_version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Declares that the weights were updated in place (an optimizer step): every value
    /// computed with the old weights is stale.
    pub fn weights_changed(&self) {
        self.version
            .store(next_weights_version(), std::sync::atomic::Ordering::SeqCst);
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    /// The dtype weights and activations use.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Every trainable parameter by name. Names are those of HF checkpoints, except for
    /// the layer matrices, which are stored packed for speed: q/k/v stacked and
    /// transposed as `self_attn.qkv_proj.weight_t` (`[hidden, q+k+v]`) with
    /// `self_attn.qkv_proj.bias`, `self_attn.o_proj.weight_t`, gate/up stacked as
    /// `mlp.gate_up_proj.weight_t` and `mlp.down_proj.weight_t`, all `[in, out]`. See
    /// [`CausalLM::hf_tensors`] and [`CausalLM::hf_grads`] for the HF view.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// Splits packed tensors (parameters or their gradients) back into HF-named parts.
    fn split_fused(
        &self,
        named: impl Iterator<Item = (String, Tensor)>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let shapes: BTreeMap<String, Vec<usize>> =
            Self::param_shapes(&self.cfg).into_iter().collect();
        let mut out = BTreeMap::new();
        for (name, t) in named {
            let Some(pk) = PACKED
                .iter()
                .find(|pk| name.ends_with(&format!(".{}", pk.internal)))
            else {
                out.insert(name, t);
                continue;
            };
            let prefix = &name[..name.len() - pk.internal.len()];
            let t = if pk.transposed { t.t()? } else { t };
            let mut off = 0;
            for part in pk.parts {
                let hf = format!("{prefix}{part}");
                let n = shapes[&hf][0];
                out.insert(hf, t.narrow(0, off, n)?.contiguous()?);
                off += n;
            }
        }
        Ok(out)
    }

    /// The weights under their HF checkpoint names (what [`crate::save`] writes).
    pub fn hf_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = self.split_fused(
            self.params
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().detach())),
        )?;
        // With adapters: the merged weights W + scale B A.
        if let Some(l) = &self.lora {
            for (i, slots) in l.layers.iter().enumerate() {
                for (k, ad) in slots.iter().enumerate() {
                    let Some(ad) = ad else { continue };
                    let name = crate::lora::hf_name(i, crate::lora::TARGETS[k]);
                    let base = &out[&name];
                    let delta = (ad
                        .b
                        .as_tensor()
                        .to_dtype(DType::F32)?
                        .matmul(&ad.a.as_tensor().to_dtype(DType::F32)?)?
                        * l.cfg.scale())?;
                    let merged = (base.to_dtype(DType::F32)? + delta)?.to_dtype(base.dtype())?;
                    out.insert(name, merged);
                }
            }
        }
        Ok(out)
    }

    /// The gradients in `grads` under HF parameter names (parameters without a gradient
    /// are absent); adapters' under their PEFT names.
    pub fn hf_grads(&self, grads: &GradStore) -> Result<BTreeMap<String, Tensor>> {
        let named = self
            .params
            .iter()
            .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())));
        let mut out = self.split_fused(named)?;
        if let Some(l) = &self.lora {
            for (n, v) in &l.params {
                if let Some(g) = grads.get(v.as_tensor()) {
                    out.insert(n.clone(), g.clone());
                }
            }
        }
        Ok(out)
    }
    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// The output projection `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self, track: bool) -> Tensor {
        let t = if track { Track::Yes } else { Track::No };
        self.bw(self.lm_head.as_ref().unwrap_or(&self.embed), t)
    }

    fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let dt = self.dtype;
        Ok((
            freqs.cos()?.to_dtype(dt)?.contiguous()?,
            freqs.sin()?.to_dtype(dt)?.contiguous()?,
        ))
    }

    fn embed_ids(&self, ids: &Tensor, t: Track) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let max = flat.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            invalid!(
                "token id {max} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            );
        }
        let _ = (b, s);
        Ok(self.bw(&self.embed, t).index_select(&flat, 0)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        li: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &PassMask,
        kv_share: &[(usize, usize)],
        cache: Option<(&mut Option<LayerKv>, (usize, bool))>,
        t: Track,
        drop: Option<u64>,
        prec: Prec<'_>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let l = &self.layers[li];
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        // Passes with bf16 linear layers take bf16 attention products too (inference and
        // mixed-precision training).
        let packed = matches!(prec, Prec::Packed(_));
        let bf16 = !matches!(prec, Prec::F32 | Prec::Panels(_));
        let how = |i: usize| match prec {
            Prec::Packed(m) => Product::Packed(&m[i]),
            Prec::Panels(m) => Product::Panels(&m[i]),
            Prec::Bf16 => Product::Bf16 {
                need_dw: self.lora.is_none(),
            },
            Prec::F32 => Product::F32,
        };
        // Activations are 2-D `[b * s, hidden]` inside the layers.
        let (b, _, s, _) = mask.mask.dims4()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let a = &l.attn;
        let h = ops::rms_norm(x, &self.bw(&l.input_norm, t), eps)?;
        let mut qkv = linear(
            &h,
            &self.bw(&a.qkv, t),
            a.qkv_bias.as_ref().map(|b| self.bw(b, t)).as_ref(),
            how(0),
        )?;
        if let Some(d) =
            self.packed_adapters(li, &[0, 1, 2], &[nh * hd, nkv * hd, nkv * hd], &h, t, drop)?
        {
            qkv = (qkv + d)?;
        }
        if let Some(keep) = keep {
            // Attention works on the padded `[b, s]` grid: padding gets zero q, k and v.
            qkv = spread(&qkv, keep, b * s)?;
        }
        let mask3 = mask.mask.squeeze(1)?;
        // The fused kernel serves training and a cache's first (prefill) pass, which then
        // stores the roped keys and values; later cached steps attend to past keys.
        let prefill = matches!(&cache, Some((slot, _)) if slot.is_none());
        // Views of this step's keys and values, `[b, s, kv_heads, head_dim]`.
        let k = qkv.narrow(1, nh * hd, nkv * hd)?.reshape((b, s, nkv, hd))?;
        let v = qkv
            .narrow(1, (nh + nkv) * hd, nkv * hd)?
            .reshape((b, s, nkv, hd))?;
        let ctx =
            if (cache.is_none() || prefill) && a.q_norm.is_none() && ops::has_fused_attention(&qkv)
            {
                if let Some((slot, reserve)) = cache {
                    let k = ops::rope_bthd(&k, cos, sin)?;
                    append_kv(slot, reserve, &k, &v.transpose(1, 2)?)?;
                }
                ops::attention(&qkv, cos, sin, mask.fused()?, nh, nkv, hd, bf16)?
            } else {
                let q = qkv.narrow(1, 0, nh * hd)?.reshape((b, s, nh, hd))?;
                let (q, k) = match (&a.q_norm, &a.k_norm) {
                    (Some(qn), Some(kn)) => (
                        ops::rms_norm(&q, &self.bw(qn, t), eps)?,
                        ops::rms_norm(&k, &self.bw(kn, t), eps)?,
                    ),
                    _ => (q, k),
                };
                let q = ops::rope_bthd(&q, cos, sin)?;
                let mut k = ops::rope_bthd(&k, cos, sin)?;
                let mut v = v.transpose(1, 2)?.contiguous()?;
                let cached = cache.is_some();
                if let Some((slot, reserve)) = cache {
                    (k, v) = append_kv(slot, reserve, &k, &v)?;
                }
                let scale = 1.0 / (hd as f64).sqrt();
                if cached {
                    ops::cached_attention(&q, &k, &v, &mask3, scale, kv_share, packed)?
                } else {
                    ops::grouped_attention(&q, &k, &v, &mask3, scale)?
                }
            };
        let ctx = match keep {
            Some(keep) => ctx.index_select(keep, 0)?,
            None => ctx,
        };
        let mut o = linear(&ctx, &self.bw(&a.o, t), None, how(1))?;
        if let Some(d) = self.adapter(li, 3, &ctx, t, drop)? {
            o = (o + d)?;
        }
        let x = (x + o)?;
        let h = ops::rms_norm(&x, &self.bw(&l.post_norm, t), eps)?;
        let inter = cfg.intermediate_size;
        let mut gu = linear(&h, &self.bw(&l.gate_up, t), None, how(2))?;
        if let Some(d) = self.packed_adapters(li, &[4, 5], &[inter, inter], &h, t, drop)? {
            gu = (gu + d)?;
        }
        let act = ops::swiglu(&gu)?;
        let mut down = linear(&act, &self.bw(&l.down, t), None, how(3))?;
        if let Some(d) = self.adapter(li, 6, &act, t, drop)? {
            down = (down + d)?;
        }
        Ok((x + down)?)
    }

    fn check_layout(&self, ids: &Tensor, layout: &SeqLayout, past: usize) -> Result<()> {
        let (b, s) = ids.dims2()?;
        if layout.positions.dims() != [b, s] {
            invalid!(
                "layout positions {:?} do not match input ids [{b}, {s}]",
                layout.positions.dims()
            );
        }
        if layout.mask.dims() != [b, 1, s, past + s] {
            invalid!(
                "layout mask {:?} does not match [{b}, 1, {s}, {}]",
                layout.mask.dims(),
                past + s
            );
        }
        Ok(())
    }

    /// Final hidden states `[b, t, hidden]` (after the last norm), with autograd graph
    /// (no LoRA dropout: that is `forward_backward`'s).
    pub fn forward_hidden(&self, ids: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        self.hidden(ids, layout, None, Track::Yes, None)
    }

    fn hidden(
        &self,
        ids: &Tensor,
        layout: &SeqLayout,
        mut cache: Option<&mut KvCache>,
        t: Track,
        drop: Option<u64>,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        self.check_layout(ids, layout, past)?;
        let amx = match &cache {
            Some(c) if c.bf16 => self.amx_weights()?,
            _ => None,
        };
        let panels = match &cache {
            Some(c) if !c.bf16 => self.panel_weights()?,
            _ => None,
        };
        let bf16 = cache.is_none() && self.bf16_matmuls_active();
        let (cos, sin) = self.rope_tables(&layout.positions)?;
        let mask = PassMask::new(&layout.mask);
        let mut x = self.embed_ids(ids, t)?;
        // Passes through a cache (inference) skip padding tokens everywhere but in the
        // attention: norms, linear layers and the MLP run on the real tokens only.
        let keep = match cache {
            Some(_) => real_tokens(layout, ids.device())?,
            None => None,
        };
        if let Some(keep) = &keep {
            x = x.index_select(keep, 0)?;
        }
        if let Some(c) = cache.as_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        for li in 0..self.layers.len() {
            let slot = cache.as_mut().map(|c| {
                let how = (c.reserve, c.kv_bf16);
                (&mut c.layers[li], how)
            });
            x = self.layer_forward(
                li,
                &x,
                &cos,
                &sin,
                &mask,
                &layout.kv_share,
                slot,
                t,
                drop,
                match (&amx, &panels) {
                    (Some(a), _) => Prec::Packed(&a.layers[li]),
                    (None, _) if bf16 => Prec::Bf16,
                    (None, Some(p)) => Prec::Panels(&p.layers[li]),
                    (None, None) => Prec::F32,
                },
                keep.as_ref(),
            )?;
        }
        let (b, s) = ids.dims2()?;
        let mut x = ops::rms_norm(&x, &self.bw(&self.norm, t), self.cfg.rms_norm_eps)?;
        if let Some(keep) = &keep {
            // Padding positions hold zeros.
            x = spread(&x, keep, b * s)?;
        }
        Ok(x.reshape((b, s, ()))?)
    }

    /// Final hidden states `[b, t, hidden]` without autograd graph (inference).
    pub fn hidden_states(&self, ids: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        self.hidden(ids, layout, None, Track::No, None)
    }

    /// Logits `[b, t, vocab]` without autograd graph (inference).
    pub fn logits(&self, ids: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        let hid = self.hidden(ids, layout, None, Track::No, None)?;
        Ok(hid.broadcast_matmul(&self.lm_head_weight(false).t()?)?)
    }

    /// Inference step with a KV cache: runs `ids: [b, t]` after the cached positions.
    /// `layout.mask` must be `[b, 1, t, cached + t]`. Returns hidden states `[b, t, hidden]`.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        layout: &SeqLayout,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.hidden(ids, layout, Some(cache), Track::No, None)
    }

    /// Runs the forward pass, applies `head` (final hidden states with graph -> scalar
    /// loss) and back-propagates. With `checkpoint`, only each layer's input is kept during
    /// the forward pass and the layer is recomputed during the backward pass (less memory,
    /// one more forward; gradients are identical). LoRA dropout (when configured) applies
    /// here, with the masks of [`CausalLM::set_dropout_seed`]'s seed. Returns the loss and
    /// the gradients.
    pub fn forward_backward(
        &self,
        ids: &Tensor,
        layout: &SeqLayout,
        checkpoint: bool,
        head: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(f64, GradStore)> {
        let drop = self.training_dropout();
        if !checkpoint {
            let hid = self.hidden(ids, layout, None, Track::Yes, drop)?;
            let loss = head(&hid)?;
            let grads = backward(&loss)?;
            return Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads));
        }
        self.check_layout(ids, layout, 0)?;
        let (cos, sin) = self.rope_tables(&layout.positions)?;
        let mask = PassMask::new(&layout.mask);
        // The recomputed layers must compute what the forward pass did.
        let prec = if self.bf16_matmuls_active() {
            Prec::Bf16
        } else {
            Prec::F32
        };
        // Forward without graph, keeping each layer's input.
        let mut inputs = Vec::with_capacity(self.layers.len() + 1);
        let mut x = self.embed_ids(ids, Track::No)?;
        for li in 0..self.layers.len() {
            let next = self.layer_forward(
                li,
                &x,
                &cos,
                &sin,
                &mask,
                &[],
                None,
                Track::No,
                drop,
                prec,
                None,
            )?;
            inputs.push(x);
            x = next;
        }
        // Head with graph from the last layer's output.
        let xv = Var::from_tensor(&x)?;
        let (b, s) = ids.dims2()?;
        let hid = ops::rms_norm(
            xv.as_tensor(),
            &self.bw(&self.norm, Track::Yes),
            self.cfg.rms_norm_eps,
        )?;
        let loss = head(&hid.reshape((b, s, ()))?)?;
        let mut grads = backward(&loss)?;
        let mut dx = take_grad(&mut grads, xv.as_tensor())?;
        for li in (0..self.layers.len()).rev() {
            let xin = Var::from_tensor(&inputs[li])?;
            let y = self.layer_forward(
                li,
                xin.as_tensor(),
                &cos,
                &sin,
                &mask,
                &[],
                None,
                Track::Yes,
                drop,
                prec,
                None,
            )?;
            let g = backward(&(y * dx.detach())?.sum_all()?)?;
            merge_grads(&mut grads, g, self.trainable(), Some(xin.as_tensor()))?;
            dx = take_grad(&mut grads, xin.as_tensor())?;
        }
        let emb = self.embed_ids(ids, Track::Yes)?;
        let g = backward(&(emb * dx)?.sum_all()?)?;
        merge_grads(&mut grads, g, self.trainable(), None)?;
        Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads))
    }
}

/// `loss.backward()`, with every returned gradient detached. candle leaves the gradients
/// of variables attached to the graph that computed them (`dW = x^T dy` refers to the
/// activation `x`), so a kept gradient would keep the whole forward graph, every
/// activation of the pass, alive: through accumulation over micro-batches, the optimizer
/// step, and across the layers of a recomputed (checkpointed) backward.
fn backward(loss: &Tensor) -> Result<GradStore> {
    let mut grads = loss.backward()?;
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id) {
            let g = g.detach();
            grads.insert_id(id, g);
        }
    }
    Ok(grads)
}

fn take_grad(grads: &mut GradStore, t: &Tensor) -> Result<Tensor> {
    grads
        .remove(t)
        .ok_or_else(|| Error::Invalid("checkpointed backward: activation got no gradient".into()))
}

/// Adds the parameter gradients of `from` into `into` (and the activation `extra`).
fn merge_grads(
    into: &mut GradStore,
    mut from: GradStore,
    params: &BTreeMap<String, Var>,
    extra: Option<&Tensor>,
) -> Result<()> {
    let mut ts: Vec<&Tensor> = params.values().map(|v| v.as_tensor()).collect();
    ts.extend(extra);
    for t in ts {
        if let Some(g) = from.remove(t) {
            let g = match into.remove(t) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            into.insert(t, g);
        }
    }
    Ok(())
}

/// Rejects dtypes the device cannot run.
pub(crate) fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(Error::Unsupported(format!("weight dtype {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An f32 decoding pass makes the panels of the current weights version; a weight
    /// change makes the next pass repack (a new version); `release_decoding_weights`
    /// empties both copies' slots.
    #[test]
    fn decoding_copies_follow_the_weights_version_and_are_released() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/fixtures/tiny-qwen2/config.json");
        let cfg = ModelConfig::from_file(&p).unwrap();
        let m = CausalLM::new_random(&cfg, DType::F32, &Device::Cpu, 5).unwrap();
        let params = crate::SamplingParams {
            max_new_tokens: 3,
            ..Default::default()
        };
        let held = |m: &CausalLM| m.panels.lock().unwrap().as_ref().map(|w| w.version);
        assert_eq!(held(&m), None);
        m.generate(&[vec![5, 17, 99]], &params, None).unwrap();
        if crate::kernels::simd_level() == crate::kernels::SimdLevel::Baseline {
            assert_eq!(held(&m), None, "no panels without vector kernels");
            return;
        }
        let first = m.weights_version();
        assert_eq!(held(&m), Some(first));
        m.weights_changed();
        m.generate(&[vec![5, 17, 99]], &params, None).unwrap();
        assert_eq!(held(&m), Some(m.weights_version()));
        assert_ne!(m.weights_version(), first);
        m.release_decoding_weights();
        assert_eq!(held(&m), None);
        assert!(m.amx.lock().unwrap().is_none());
    }

    /// `[1, heads, len, d]` whose element `(h, p, j)` is `base + 100 h + p + j / 100`.
    fn row(base: f32, (heads, len, d): (usize, usize, usize), dt: DType) -> Tensor {
        let v: Vec<f32> = (0..heads * len * d)
            .map(|i| {
                base + 100.0 * (i / (len * d)) as f32
                    + ((i / d) % len) as f32
                    + (i % d) as f32 / 100.0
            })
            .collect();
        Tensor::from_vec(v, (1, heads, len, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// Positions `0..n` of row `r` of a cache layer, as f32 `[heads, n, d]`.
    fn filled(t: &Tensor, r: usize, n: usize) -> Vec<Vec<Vec<f32>>> {
        t.narrow(0, r, 1)
            .unwrap()
            .narrow(2, 0, n)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec3()
            .unwrap()
    }

    /// The CPU copies of the cache (rows in, rows compacted or repeated, a row's ranges
    /// out) against the values written in, for both stored types and a row kept in the
    /// other type; rows shorter than the width hold zeros up to it.
    #[test]
    fn cache_rows_copy_in_compact_repeat_and_copy_out() {
        let (heads, d, width, reserve) = (3, 4, 6, 5);
        for (dt, kv_bf16) in [(DType::F32, false), (DType::BF16, true)] {
            let a = vec![(row(1.0, (heads, 6, d), dt), row(2.0, (heads, 6, d), dt))];
            let b = vec![(
                row(3.0, (heads, 4, d), DType::F32),
                row(4.0, (heads, 4, d), DType::F32),
            )];
            let c = vec![(row(5.0, (heads, 9, d), dt), row(6.0, (heads, 9, d), dt))];
            let whole = |kv: &'static str, len| {
                let parts = match kv {
                    "a" => vec![&a[..]],
                    "b" => vec![&b[..]],
                    _ => vec![&c[..]],
                };
                Some(RowKv {
                    parts,
                    len,
                    skip: 0,
                })
            };
            let rows = [whole("a", 6), None, whole("b", 4), whole("c", 5)];
            let mut cache =
                KvCache::from_rows(&rows, width, reserve, (DType::F32, kv_bf16)).unwrap();
            assert_eq!(cache.len(), width);
            // In the cache's type (row b is kept in f32).
            let want = |src: &Tensor, n: usize| {
                let mut v = filled(&src.to_dtype(dt).unwrap(), 0, n);
                for h in &mut v {
                    h.resize(width, vec![0.0; d]);
                }
                v
            };
            let k = |c: &KvCache| c.layers[0].as_ref().unwrap().k.clone();
            let v = |c: &KvCache| c.layers[0].as_ref().unwrap().v.clone();
            assert_eq!(k(&cache).dtype(), dt);
            assert_eq!(k(&cache).dims(), [4, heads, width + reserve, d]);
            assert_eq!(filled(&k(&cache), 0, width), want(&a[0].0, 6));
            assert_eq!(
                filled(&k(&cache), 1, width),
                vec![vec![vec![0.0; d]; width]; heads]
            );
            assert_eq!(filled(&v(&cache), 2, width), want(&b[0].1, 4));
            assert_eq!(filled(&k(&cache), 3, width), want(&c[0].0, 5));
            // A row's two ranges, concatenated.
            let out = cache.extract_row(3, &[(0, 2), (3, 3), (4, 6)]).unwrap();
            let got = filled(&out[0].1, 0, 4);
            let all = want(&c[0].1, 5);
            let expect: Vec<Vec<Vec<f32>>> =
                all.iter().map(|h| [&h[0..2], &h[4..6]].concat()).collect();
            assert_eq!(got, expect);
            // Finished rows dropped (in place), then rows repeated (a new buffer).
            cache
                .select_rows(&Tensor::new(&[2u32, 3], &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(k(&cache).dim(0).unwrap(), 2);
            assert_eq!(filled(&v(&cache), 0, width), want(&b[0].1, 4));
            assert_eq!(filled(&k(&cache), 1, width), want(&c[0].0, 5));
            cache
                .select_rows(&Tensor::new(&[1u32, 1, 0], &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(filled(&k(&cache), 0, width), want(&c[0].0, 5));
            assert_eq!(filled(&k(&cache), 1, width), want(&c[0].0, 5));
            assert_eq!(filled(&v(&cache), 2, width), want(&b[0].1, 4));
            assert!(cache
                .select_rows(&Tensor::new(&[0u32, 7], &Device::Cpu).unwrap())
                .is_err());
        }
    }

    /// Rows that leave out their first positions (read from another row): a row made of
    /// two parts stores only the positions from its skip on, a repeated row only what its
    /// skip leaves, and compacting keeps the skips. What is left out is never written (NaN
    /// in test builds, where taken buffers are filled with NaN).
    #[test]
    fn cache_rows_leave_out_what_they_share() {
        // Builds with debug assertions fill taken buffers with NaN; others leave them stale.
        let unwritten = |x: f32| x.is_nan() || !cfg!(debug_assertions);
        let (heads, d, width, reserve) = (2, 4, 8, 3);
        for (dt, kv_bf16) in [(DType::F32, false), (DType::BF16, true)] {
            let a = vec![(row(1.0, (heads, 6, d), dt), row(2.0, (heads, 6, d), dt))];
            let b = vec![(row(3.0, (heads, 4, d), dt), row(4.0, (heads, 4, d), dt))];
            let rows = [
                Some(RowKv {
                    parts: vec![&a[..], &b[..]],
                    len: 8,
                    skip: 0,
                }),
                Some(RowKv {
                    parts: vec![&a[..], &b[..]],
                    len: 7,
                    skip: 3,
                }),
            ];
            let mut cache =
                KvCache::from_rows(&rows, width, reserve, (DType::F32, kv_bf16)).unwrap();
            let k = |c: &KvCache| c.layers[0].as_ref().unwrap().k.clone();
            // a's 6 positions, then b's first ones.
            let joined = |n: usize| -> Vec<Vec<Vec<f32>>> {
                let (x, y) = (filled(&a[0].0, 0, 6), filled(&b[0].0, 0, 4));
                (0..heads)
                    .map(|h| [&x[h][..], &y[h][..n - 6]].concat())
                    .collect()
            };
            assert_eq!(filled(&k(&cache), 0, width), joined(8));
            let got = filled(&k(&cache), 1, width);
            for (h, want) in joined(7).iter().enumerate() {
                assert!(
                    got[h][..3].iter().flatten().all(|x| unwritten(*x)),
                    "head {h}"
                );
                assert_eq!(&got[h][3..7], &want[3..7]);
                assert_eq!(got[h][7], vec![0.0; d], "padding up to the width");
            }
            // Row 0 twice, the copy storing positions from 5 on (row 1 is dropped).
            let err = cache.select_rows_storing(&[1, 0], &[0, 0]);
            assert!(err.is_err(), "a row that skips cannot be repeated");
            cache.select_rows_storing(&[0, 0], &[0, 5]).unwrap();
            let rep = filled(&k(&cache), 1, width);
            assert_eq!(filled(&k(&cache), 0, width), joined(8));
            for (h, want) in joined(8).iter().enumerate() {
                assert!(
                    rep[h][..5].iter().flatten().all(|x| unwritten(*x)),
                    "head {h}"
                );
                assert_eq!(&rep[h][5..], &want[5..]);
            }
            assert_eq!(cache.skip, vec![0, 5]);
            // Row 1 takes over row 0's first positions (and stores them from then on); a
            // row that leaves its out cannot hand them on.
            let mut copy = cache.clone();
            copy.copy_first_positions(0, 1, 5).unwrap();
            assert_eq!(copy.skip, vec![0, 0]);
            assert_eq!(filled(&k(&copy), 1, width), joined(8));
            let mut other = cache.clone();
            assert!(other.copy_first_positions(1, 0, 5).is_err());
            // Row 1 moved down in place keeps its skip; its positions from 5 on move.
            cache
                .select_rows(&Tensor::new(&[1u32], &Device::Cpu).unwrap())
                .unwrap();
            assert_eq!(cache.skip, vec![5]);
            let moved = filled(&k(&cache), 0, width);
            for (h, want) in joined(8).iter().enumerate() {
                assert_eq!(&moved[h][5..], &want[5..]);
                // Positions it leaves out are not copied: row 0's stay.
                assert_eq!(&moved[h][..5], &want[..5]);
            }
        }
    }
}
