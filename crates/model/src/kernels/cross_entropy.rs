//! Cross-entropy: per-row negative log-likelihood of given logits ([`Nll`]), and fused with
//! the output projection so that the logits never become a graph tensor ([`LinearNll`]).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{amx, dot, max_of, mm_par, slice, softmax_in_place, written_in_full, AmxMatrix, Elem};

/// Per-row negative log-likelihood `lse(z) - z[target]` of `logits: [n, v]` against
/// `targets: [n]` (u32); rows whose target is `ignore` give 0.
pub(crate) struct Nll {
    pub ignore: Option<u32>,
}

/// `lse(z) - z[t]` of one row of logits.
fn row_nll<T: Elem>(z: &[T], t: usize) -> T {
    row_lse(z) - z[t]
}

/// `log(sum(exp(z)))` of one row. The exponentials go through a stack buffer a block at a
/// time, so that they vectorise as a plain loop; summed in the same lanes, they did not.
fn row_lse<T: Elem>(z: &[T]) -> T {
    const BLOCK: usize = 512;
    fast!({
        let mx = max_of(z);
        let mut buf = [T::zero(); BLOCK];
        let mut sum = T::zero();
        for c in z.chunks(BLOCK) {
            let b = &mut buf[..c.len()];
            b.iter_mut().zip(c).for_each(|(e, &x)| *e = (x - mx).fexp());
            sum = sum + dot(b, None);
        }
        mx + sum.ln()
    })
}

/// Turns one row of logits into the gradient `g * (softmax(z) - onehot(t))`, in place.
fn row_nll_grad<T: Elem>(z: &mut [T], t: usize, g: T) {
    fast!({
        softmax_in_place(z, g);
    });
    z[t] = z[t] - g;
}

fn check_targets(tg: &[u32], v: usize, ignore: Option<u32>) -> Result<()> {
    match tg.iter().find(|&&t| Some(t) != ignore && t as usize >= v) {
        Some(bad) => bail!("cross-entropy: target {bad} outside the vocabulary of {v}"),
        None => Ok(()),
    }
}

fn nll_fwd<T: Elem>(
    z: &CpuStorage,
    lz: &Layout,
    tg: &[u32],
    ignore: Option<u32>,
) -> Result<(CpuStorage, Shape)> {
    let zs = slice::<T>(z, lz, "cross-entropy")?;
    let (n, v) = lz.shape().dims2()?;
    check_targets(tg, v, ignore)?;
    let mut out = vec![T::zero(); n];
    out.par_iter_mut()
        .zip(zs.par_chunks(v))
        .zip(tg.par_iter())
        .for_each(|((o, z), &t)| {
            if Some(t) != ignore {
                *o = row_nll(z, t as usize);
            }
        });
    Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
}

fn u32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    slice::<u32>(s, l, "targets")
}

impl CustomOp2 for Nll {
    fn name(&self) -> &'static str {
        "nll-cpu"
    }
    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tg = u32s(t, lt)?;
        dispatch!(z.dtype(), nll_fwd(z, lz, tg, self.ignore))
    }
    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = z.detach().apply_op3_no_bwd(
            t,
            &g.contiguous()?,
            &NllBwd {
                ignore: self.ignore,
            },
        )?;
        Ok((Some(dz), None))
    }
}

struct NllBwd {
    ignore: Option<u32>,
}

fn nll_bwd<T: Elem>(
    z: &CpuStorage,
    lz: &Layout,
    tg: &[u32],
    g: &CpuStorage,
    lg: &Layout,
    ignore: Option<u32>,
) -> Result<(CpuStorage, Shape)> {
    let (zs, gs) = (
        slice::<T>(z, lz, "cross-entropy bwd")?,
        slice::<T>(g, lg, "cross-entropy bwd")?,
    );
    let (_, v) = lz.shape().dims2()?;
    let mut dz = written_in_full(zs.len());
    dz.par_chunks_mut(v)
        .zip(zs.par_chunks(v))
        .zip(tg.par_iter().zip(gs.par_iter()))
        .for_each(|((dz, z), (&t, &g))| {
            if Some(t) != ignore {
                dz.copy_from_slice(z);
                row_nll_grad(dz, t as usize, g);
            } else {
                dz.fill(T::zero());
            }
        });
    Ok((T::to_cpu_storage_owned(dz), lz.shape().clone()))
}

impl CustomOp3 for NllBwd {
    fn name(&self) -> &'static str {
        "nll-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tg = u32s(t, lt)?;
        dispatch!(z.dtype(), nll_bwd(z, lz, tg, g, lg, self.ignore))
    }
}

// ---------------------------------------------------------------- linear + cross-entropy

/// Per-row negative log-likelihood of `targets` under logits `h @ w^T`
/// (`h: [n, hidden]`, `w: [vocab, hidden]`), fused so that the logits never become a
/// graph tensor: the forward keeps them privately for the backward, which turns them
/// into `dZ` in place and returns `dh = dZ w` and `dw = dZ^T h`.
pub(crate) struct LinearNll {
    pub ignore: Option<u32>,
    pub logits: CachedLogits,
    /// The three products from bf16-rounded operands with f32 sums (f32 only; the
    /// caller checks that a bf16 kernel is available). The softmax stays f32.
    pub bf16: bool,
}

/// `a[m x k] @ b[k x n]` from bf16-rounded operands with f32 sums (AMX or
/// AVX512-BF16), operands by (row, column) strides; `T` must be f32.
fn amx_product<T: Elem>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    astr: (usize, usize),
    b: &[T],
    bstr: (usize, usize),
) -> Result<Vec<T>> {
    if T::DTYPE != DType::F32 {
        bail!(
            "linear-nll: bf16 products take f32 operands, not {:?}",
            T::DTYPE
        )
    }
    let f32s = |s: &[T]| {
        // SAFETY: T is f32 (checked above).
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) }
    };
    let c = std::mem::ManuallyDrop::new(super::amx::gemm((m, k, n), f32s(a), astr, f32s(b), bstr)?);
    // SAFETY: as above; the allocation moves over unchanged (same size and alignment).
    Ok(unsafe { Vec::from_raw_parts(c.as_ptr() as *mut T, c.len(), c.capacity()) })
}

/// The logits `h @ w^T` (`[n, v]`) of `hs: [n, hd]` and `ws: [v, hd]`; on AMX with `bf16`
/// (no copy: the tiles' result is the buffer).
fn head_logits<T: Elem>(
    bf16: bool,
    (n, v, hd): (usize, usize, usize),
    hs: &[T],
    ws: &[T],
) -> Result<Vec<T>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if bf16 {
        return amx_product((n, v, hd), hs, (hd, 1), ws, (1, hd));
    }
    let mut z = written_in_full(n * v);
    mm_par((n, v, hd), &mut z, hs, (hd, 1), ws, (1, hd));
    Ok(z)
}

/// The logits `[n, vocab]` of a [`LinearNll`] forward and their per-row log-sum-exp `[n]`,
/// kept for its backward.
pub(crate) type CachedLogits = std::sync::Arc<std::sync::Mutex<Option<(CpuStorage, CpuStorage)>>>;

fn linear_nll_fwd<T: Elem>(
    op: &LinearNll,
    h: &CpuStorage,
    lh: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    tg: &[u32],
) -> Result<(CpuStorage, Shape)> {
    let (hs, ws) = (
        slice::<T>(h, lh, "linear-nll")?,
        slice::<T>(w, lw, "linear-nll")?,
    );
    let (n, hd) = lh.shape().dims2()?;
    let (v, hd2) = lw.shape().dims2()?;
    if hd != hd2 || tg.len() != n {
        bail!(
            "linear-nll: hidden {:?}, weight {:?} and {} targets do not match",
            lh.dims(),
            lw.dims(),
            tg.len()
        )
    }
    check_targets(tg, v, op.ignore)?;
    let z = head_logits(op.bf16, (n, v, hd), hs, ws)?;
    let lse: Vec<T> = z.par_chunks(v).map(row_lse).collect();
    let out: Vec<T> = (0..n)
        .map(|i| match tg[i] {
            t if Some(t) == op.ignore => T::zero(),
            t => lse[i] - z[i * v + t as usize],
        })
        .collect();
    *op.logits.lock().expect("lock") =
        Some((T::to_cpu_storage_owned(z), T::to_cpu_storage_owned(lse)));
    Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
}

impl CustomOp3 for LinearNll {
    fn name(&self) -> &'static str {
        "linear-nll-cpu"
    }
    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tg = u32s(t, lt)?;
        dispatch!(h.dtype(), linear_nll_fwd(self, h, lh, w, lw, tg))
    }
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, hd) = h.dims2()?;
        let v = w.dim(0)?;
        // The row gradients travel with the targets: [n] u32 + [n] grad in one op call.
        let bwd = LinearNllBwd {
            ignore: self.ignore,
            bf16: self.bf16,
            logits: self.logits.clone(),
            targets: t.clone(),
        };
        let both = h
            .detach()
            .apply_op3_no_bwd(&w.detach(), &g.contiguous()?, &bwd)?;
        let dh = both.narrow(0, 0, n * hd)?.reshape((n, hd))?;
        let dw = both.narrow(0, n * hd, v * hd)?.reshape((v, hd))?;
        Ok((Some(dh), Some(dw), None))
    }
}

struct LinearNllBwd {
    ignore: Option<u32>,
    bf16: bool,
    logits: CachedLogits,
    targets: Tensor,
}

fn linear_nll_bwd<T: Elem>(
    op: &LinearNllBwd,
    h: &CpuStorage,
    lh: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (hs, ws, gs) = (
        slice::<T>(h, lh, "linear-nll bwd")?,
        slice::<T>(w, lw, "linear-nll bwd")?,
        slice::<T>(g, lg, "linear-nll bwd")?,
    );
    let (n, hd) = lh.shape().dims2()?;
    let (v, _) = lw.shape().dims2()?;
    let (tst, tl) = op.targets.storage_and_layout();
    let candle_core::Storage::Cpu(tcpu) = &*tst else {
        bail!("linear-nll: targets must be on the CPU")
    };
    let tg = u32s(tcpu, tl)?;
    // The forward's logits, or recomputed when this backward runs a second time.
    let (mut z, lse): (Vec<T>, Vec<T>) = match op.logits.lock().expect("lock").take() {
        Some((z, lse)) => match (T::into_vec(z), T::into_vec(lse)) {
            (Some(z), Some(lse)) => (z, lse),
            _ => bail!("linear-nll: cached logits have another dtype"),
        },
        None => {
            let z = head_logits(op.bf16, (n, v, hd), hs, ws)?;
            let lse = z.par_chunks(v).map(row_lse).collect();
            (z, lse)
        }
    };
    // With no rows, the weight's gradient is zero; otherwise both products write all of it.
    let mut out = if n > 0 {
        written_in_full(n * hd + v * hd)
    } else {
        vec![T::zero(); v * hd]
    };
    if n > 0 {
        let (dh, dw) = out.split_at_mut(n * hd);
        if op.bf16 {
            if T::DTYPE != DType::F32 {
                bail!("linear-nll: bf16 products take f32, not {:?}", T::DTYPE)
            }
            fn f<T: Elem>(x: &[T]) -> &[f32] {
                T::as_f32(x).expect("T is f32")
            }
            let head = BwdHead {
                z: f(&z),
                lse: f(&lse),
                tg,
                gs: f(gs),
                ignore: op.ignore,
            };
            let dh = T::as_f32_mut(dh).expect("T is f32");
            let dw = T::as_f32_mut(dw).expect("T is f32");
            bf16_head_bwd(&head, (n, v, hd), f(hs), f(ws), dh, dw, HEAD_CHUNK)?;
        } else {
            // dZ = g * (exp(z - lse) - onehot(t)), in place: one pass over the logits.
            z.par_chunks_mut(v)
                .zip(tg.par_iter().zip(gs.par_iter().zip(lse.par_iter())))
                .for_each(|(z, (&t, (&g, &lse)))| {
                    if Some(t) == op.ignore {
                        z.iter_mut().for_each(|x| *x = T::zero());
                    } else {
                        fast!(z.iter_mut().for_each(|x| *x = (*x - lse).fexp() * g));
                        z[t as usize] = z[t as usize] - g;
                    }
                });
            mm_par((n, hd, v), dh, &z, (v, 1), ws, (hd, 1));
            mm_par((v, hd, n), dw, &z, (1, v), hs, (hd, 1));
        }
    }
    let len = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
}

/// Logit-gradient elements per vocabulary chunk of the bf16 head backward: 4 Mi, 16 MiB
/// of f32 (below glibc's mmap threshold, so the chunk buffers are heap memory, reused).
const HEAD_CHUNK: usize = 1 << 22;

/// What the head's backward reads per row: the forward's logits `[n, v]` and their
/// log-sum-exp, the targets, and the loss gradient of each row.
struct BwdHead<'a> {
    z: &'a [f32],
    lse: &'a [f32],
    tg: &'a [u32],
    gs: &'a [f32],
    ignore: Option<u32>,
}

/// The head's two gradients in bf16 products, a vocabulary chunk at a time: each chunk's
/// logit gradients `dZ[:, v0..v1]` are computed into one reused f32 buffer of about
/// `chunk` elements, then `dh += dZc @ w[v0..v1]` and `dw[v0..v1] = dZc^T @ h` (`h`
/// packed once for all chunks). The whole `dZ` (as large as the logits) is never
/// written, nor its two bf16 layouts: at SmolLM2's vocabulary and 2,048 tokens those
/// were 400 MB and 2 x 201 MB of fresh pages a step, and the transposed one read rows
/// 196 KB apart. Every product takes the same bf16-rounded operands as over the whole
/// vocabulary at once; `dh` sums the chunks' partial products.
#[allow(clippy::too_many_arguments)]
fn bf16_head_bwd(
    head: &BwdHead<'_>,
    (n, v, hd): (usize, usize, usize),
    hs: &[f32],
    ws: &[f32],
    dh: &mut [f32],
    dw: &mut [f32],
    chunk: usize,
) -> Result<()> {
    let vc = (chunk / n.max(1) / 32 * 32).max(32).min(v);
    let h_tiles = AmxMatrix::pack(hs, n, hd)?;
    let mut dz = written_in_full::<f32>(n * vc);
    for v0 in (0..v).step_by(vc) {
        let c = vc.min(v - v0);
        let dz = &mut dz[..n * c];
        dz.par_chunks_mut(c).enumerate().for_each(|(i, row)| {
            let (t, g) = (head.tg[i], head.gs[i]);
            if Some(t) == head.ignore {
                row.fill(0.0);
                return;
            }
            let (z, lse) = (&head.z[i * v + v0..i * v + v0 + c], head.lse[i]);
            fast!(row
                .iter_mut()
                .zip(z)
                .for_each(|(d, &x)| *d = (x - lse).fexp() * g));
            if let Some(j) = (t as usize).checked_sub(v0).filter(|&j| j < c) {
                row[j] -= g;
            }
        });
        let dh_c = amx::gemm((n, c, hd), dz, (c, 1), &ws[v0 * hd..(v0 + c) * hd], (hd, 1))?;
        if v0 == 0 {
            dh.copy_from_slice(&dh_c);
        } else {
            dh.par_chunks_mut(1 << 14)
                .zip(dh_c.par_chunks(1 << 14))
                .for_each(|(a, b)| fast!(a.iter_mut().zip(b).for_each(|(a, &b)| *a += b)));
        }
        let dw_c = h_tiles.matmul_strided(dz, c, (1, c))?;
        dw[v0 * hd..(v0 + c) * hd].copy_from_slice(&dw_c);
    }
    Ok(())
}

impl CustomOp3 for LinearNllBwd {
    fn name(&self) -> &'static str {
        "linear-nll-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(h.dtype(), linear_nll_bwd(self, h, lh, w, lw, g, lg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::amx::{bf16_available, bf16_bits, bf16_value};

    /// The chunked bf16 backward of the fused head against a reference in f64 from the
    /// same bf16-rounded operands over the whole vocabulary: chunks of 32 columns (the
    /// last one short), a target in each chunk, one on a chunk's first and one on its
    /// last column, and an ignored row (zero gradients).
    #[test]
    fn bf16_head_backward_in_vocabulary_chunks_is_the_product_of_rounded_gradients() {
        if !bf16_available() {
            return;
        }
        let (n, v, hd, ignore) = (37usize, 100usize, 40usize, 7u32);
        let mut rng = tooltrain_util::Rng::new(5);
        let mut rand = |k: usize, s: f32| -> Vec<f32> {
            (0..k)
                .map(|_| (rng.next_u64() % 20001) as f32 / 10000.0 * s - s)
                .collect()
        };
        let (z, hs, ws, gs) = (
            rand(n * v, 4.0),
            rand(n * hd, 1.0),
            rand(v * hd, 1.0),
            rand(n, 1.0),
        );
        let lse: Vec<f32> = z.chunks(v).map(row_lse).collect();
        let mut tg: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
        (tg[0], tg[1], tg[2]) = (32, 63, ignore);
        let head = BwdHead {
            z: &z,
            lse: &lse,
            tg: &tg,
            gs: &gs,
            ignore: Some(ignore),
        };
        let (mut dh, mut dw) = (vec![f32::NAN; n * hd], vec![f32::NAN; v * hd]);
        bf16_head_bwd(&head, (n, v, hd), &hs, &ws, &mut dh, &mut dw, n * 32).unwrap();
        // The reference: dZ in f32 as the forward defines it, rounded, products in f64.
        let r = |x: f32| bf16_value(bf16_bits(x)) as f64;
        let dz: Vec<f64> = (0..n * v)
            .map(|e| {
                let (i, j) = (e / v, e % v);
                if tg[i] == ignore {
                    return 0.0;
                }
                let mut d = (z[e] - lse[i]).fexp() * gs[i];
                if j == tg[i] as usize {
                    d -= gs[i];
                }
                r(d)
            })
            .collect();
        // dh = dZ @ w over the vocabulary, dw = dZ^T @ h over the tokens: `got[a, k]`
        // against the f64 sum over `inner` of dZ(a, b) * other[b, k].
        let check = |name: &str,
                     got: &[f32],
                     rows: usize,
                     inner: usize,
                     other: &[f32],
                     dz_at: &dyn Fn(usize, usize) -> f64| {
            for a in 0..rows {
                for k in 0..hd {
                    let want: f64 = (0..inner).map(|b| dz_at(a, b) * r(other[b * hd + k])).sum();
                    let got = got[a * hd + k] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{name}[{a},{k}]: {got} vs {want}"
                    );
                }
            }
        };
        check("dh", &dh, n, v, &ws, &|i, j| dz[i * v + j]);
        check("dw", &dw, v, n, &hs, &|j, i| dz[i * v + j]);
        assert!(
            dh[2 * hd..3 * hd].iter().all(|&x| x == 0.0),
            "the ignored row"
        );
    }
}
