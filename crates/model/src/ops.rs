//! Differentiable fused ops.
//!
//! candle-nn's fused `rms_norm`, `rope` and `softmax_last_dim` have fast CPU and CUDA
//! kernels but no backward pass: gradients through them are silently dropped. Each op
//! here runs the fused kernel for the forward pass (on any device) and attaches a
//! hand-written backward pass through a custom op ([`Attach1`] / [`Attach2`]), whose
//! forward only hands the already computed result through. In f64 the forward uses an
//! exact composed path (candle's fused RMSNorm accumulates in f32), so the
//! finite-difference tests in this module check the backward passes to ~1e-7.

use crate::kernels;
pub use crate::kernels::AttentionMask;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

type Bwd1 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
pub(crate) type Bwd2 =
    Box<dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync>;

fn pass_through<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("attach: the precomputed result must be a fresh contiguous tensor")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

/// Gives a precomputed `result` of `f(a)` the backward `bwd(a, result, grad) -> grad_a`.
struct Attach1 {
    name: &'static str,
    bwd: Bwd1,
}

impl CustomOp2 for Attach1 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s1, l1)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn bwd(
        &self,
        _res_in: &Tensor,
        a: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            None,
            Some((self.bwd)(&a.detach(), &res.detach(), &grad.detach())?),
        ))
    }
}

/// Gives a precomputed `result` of `f(a, b)` the backward `bwd(a, b, result, grad)`.
struct Attach2 {
    name: &'static str,
    bwd: Bwd2,
}

impl CustomOp3 for Attach2 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s1, l1)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        pass_through(s1, l1)
    }
    fn bwd(
        &self,
        _res_in: &Tensor,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (self.bwd)(&a.detach(), &b.detach(), &res.detach(), &grad.detach())?;
        Ok((None, Some(ga), Some(gb)))
    }
}

fn tracked(t: &Tensor) -> bool {
    t.is_variable() || t.track_op()
}

fn attach1(name: &'static str, fast: Tensor, a: &Tensor, bwd: Bwd1) -> Result<Tensor> {
    if !tracked(a) {
        return Ok(fast);
    }
    fast.contiguous()?.apply_op2(a, Attach1 { name, bwd })
}

pub(crate) fn attach2(
    name: &'static str,
    fast: Tensor,
    a: &Tensor,
    b: &Tensor,
    bwd: Bwd2,
) -> Result<Tensor> {
    if !tracked(a) && !tracked(b) {
        return Ok(fast);
    }
    fast.contiguous()?.apply_op3(a, b, Attach2 { name, bwd })
}

/// Compute dtype of backward passes: half types are promoted to f32.
fn upcast(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// Sums `t` over every dimension but the last: `[.., n] -> [n]`.
fn sum_leading(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(D::Minus1)?;
    t.reshape(((), n))?.sum(0)
}

/// True when the fused CPU kernels of [`crate::kernels`] handle this tensor.
fn cpu_kernel(t: &Tensor) -> bool {
    cpu_kernel_for(t.device(), t.dtype())
}

/// [`cpu_kernel`] for a device and type.
fn cpu_kernel_for(dev: &candle_core::Device, dtype: DType) -> bool {
    dev.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// `x: [m, k] @ w` for a weight `w: [k, n]`, or with `transposed` `x @ w^T` for `w: [n, k]`.
/// An untracked f32 product on the CPU of at most 32 rows (8 with `transposed`: a
/// decoding step) runs on the few-row kernels, which read the weight once in place instead
/// of packing it; anything else is a plain matmul.
pub fn linear_product(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    linear_product_on(x, w, transposed, None)
}

/// [`linear_product`] where the few-row kernel reads `panels` (the same `w: [k, n]`
/// repacked in column panels, not transposed) instead of `w` in place: the same bits.
pub(crate) fn linear_product_on(
    x: &Tensor,
    w: &Tensor,
    transposed: bool,
    panels: Option<&std::sync::Arc<kernels::PanelMatrix>>,
) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    let fits = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.device().is_cpu()
        && !tracked(x)
        && !tracked(w)
        && rows
            <= if transposed {
                kernels::SKINNY_MAX_ROWS_T
            } else {
                kernels::SKINNY_MAX_ROWS
            };
    if fits {
        return match panels {
            Some(p) if !transposed => x
                .contiguous()?
                .apply_op1_no_bwd(&kernels::PanelLinear(p.clone())),
            _ => x
                .contiguous()?
                .apply_op2_no_bwd(&w.contiguous()?, &kernels::SkinnyLinear { transposed }),
        };
    }
    if transposed {
        x.matmul(&w.t()?)
    } else {
        x.matmul(w)
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_kernel(x) {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, kernels::RmsNorm { eps });
    }
    rms_norm_generic(x, weight, eps)
}

/// Any-device RMSNorm: candle-nn's fused forward plus a composed backward.
pub(crate) fn rms_norm_generic(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (xd, wd) = (x.detach(), weight.detach());
    let fast = if x.dtype() == DType::F64 {
        // candle's fused kernel accumulates in f32: compose exactly in f64.
        let r = (xd.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        xd.broadcast_mul(&r)?.broadcast_mul(&wd)?
    } else {
        candle_nn::ops::rms_norm(&xd.contiguous()?, &wd, eps as f32)?
    };
    attach2(
        "rms-norm-bwd",
        fast,
        x,
        weight,
        Box::new(move |x, w, _res, g| {
            let dtype = x.dtype();
            let (x, w, g) = (upcast(x)?, upcast(w)?, upcast(g)?);
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let gw = g.broadcast_mul(&w)?;
            let dot = (&gw * &x)?.mean_keepdim(D::Minus1)?;
            let r3dot = (r.powf(3.0)? * dot)?;
            let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&r3dot)?)?;
            let dw = sum_leading(&(g * x.broadcast_mul(&r)?)?)?;
            Ok((dx.to_dtype(dtype)?, dw.to_dtype(dtype)?))
        }),
    )
}

/// Rotary position embedding (the `rotate_half` convention of HF Llama/Qwen) fused with
/// the head transpose: `x: [b, t, heads, d]` -> `[b, heads, t, d]`, with per-sequence
/// `cos`/`sin: [b, t, d/2]`.
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cpu_kernel(x) && cos.dtype() == x.dtype() {
        let op = kernels::RopeBthd {
            cos: cos.contiguous()?.copy()?,
            sin: sin.contiguous()?.copy()?,
        };
        return x.contiguous()?.apply_op1(op);
    }
    rope_generic(&x.transpose(1, 2)?.contiguous()?, cos, sin)
}

/// Any-device RoPE on `[b, heads, t, d]`: candle-nn's fused kernel both ways (the
/// rotation's transpose is the rotation by the opposite angle).
pub(crate) fn rope_generic(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let fast = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach1(
        "rope-bwd",
        fast,
        x,
        Box::new(move |_x, _res, g| candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)),
    )
}

/// Attention probabilities `softmax(scale * scores + mask)` over the last dimension.
/// `scores: [b, heads, t, s]`, `mask: [b, t, s]` (additive, shared by all heads).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_kernel(scores) {
        let mask = mask.to_dtype(scores.dtype())?.contiguous()?;
        return scores
            .contiguous()?
            .apply_op2(&mask, kernels::MaskedSoftmax { scale });
    }
    let x = (scores * scale)?.broadcast_add(&mask.to_dtype(scores.dtype())?.unsqueeze(1)?)?;
    softmax_generic(&x)
}

/// Queries per step up to which [`cached_attention`] uses the CPU kernel (small matrix
/// products against the cache in place, masked keys skipped): decoding, and the chunks of
/// a suffix (a tool result) appended to cached conversations; longer ones go to the
/// batched matrix products.
const KERNEL_MAX_QUERIES: usize = 256;

/// The new positions per pass that [`cached_attention`] takes without holding all of a
/// pass's scores at once, for queries of `dtype` on `dev` with `bf16` products: the CPU
/// kernel's bf16 path (f32 queries, a bf16 kernel in this process) scores blocks of 32
/// rows, so it takes the most it serves. `None`: the other paths, whose scores grow with
/// the chunk.
pub(crate) fn cached_attention_blocked(
    dev: &candle_core::Device,
    dtype: DType,
    bf16: bool,
) -> Option<usize> {
    (bf16 && dtype == DType::F32 && cpu_kernel_for(dev, dtype) && crate::kernels::bf16_available())
        .then_some(KERNEL_MAX_QUERIES)
}

/// Attention of new positions to cached keys and values, for inference (no gradient):
/// `q: [b, heads, s, head_dim]` (roped), `k`, `v: [b, kv_heads, len, head_dim]` (grouped
/// query heads share a kv head), `mask: [b, s, len]` additive. Returns `[b * s, heads *
/// head_dim]`. On the CPU, for up to 256 new positions, a kernel reads the cache in place
/// (views of a preallocated cache, where a batched matrix product would copy them first),
/// skipping masked keys, with small matrix products per kv head; otherwise
/// [`grouped_attention`].
///
/// `share` (per row `(leader, columns)`, or empty) says which rows' first keys and values
/// are another row's (the samples of one prompt): on the CPU every path reads them from
/// the leader (the kernel once per group, the others by copying them into each row's
/// keys and values), so a row need not store them ([`crate::KvCache`]); elsewhere,
/// where every row stores its own, each row reads its own.
///
/// `bf16`: the kernel's products of more than a few query rows per kv head (prefill
/// chunks, not decoding steps) take bf16-rounded operands with f32 sums, on AMX or
/// AVX512-BF16 where the CPU has either (the passes of a cache whose linear layers run
/// in bf16).
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    share: &[(usize, usize)],
    bf16: bool,
) -> Result<Tensor> {
    let (b, nh, s, hd) = q.dims4()?;
    // The kernel reads a cache of the queries' type, or a bf16 one under f32 queries.
    let readable = k.dtype() == v.dtype()
        && (k.dtype() == q.dtype() || (q.dtype() == DType::F32 && k.dtype() == DType::BF16));
    // The kernel has no backward: anything tracked takes the differentiable path.
    let untracked = !(tracked(q) || tracked(k) || tracked(v));
    if !(cpu_kernel(q) && readable && untracked && s <= KERNEL_MAX_QUERIES) {
        let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
        // Caches off the CPU store every row's own (`KvCache`): read them in place there.
        let (k, v) = match q.device().is_cpu() {
            true => (leaders_columns(&k, share)?, leaders_columns(&v, share)?),
            false => (k, v),
        };
        return grouped_attention(q, &k, &v, mask, scale);
    }
    // The kernel reads any view whose head_dim is contiguous (a cache's filled part).
    let rows = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.stride()[3] == 1 {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let op = kernels::DecodeAttention {
        mask: mask.to_dtype(q.dtype())?.contiguous()?,
        scale,
        share: share.to_vec(),
        bf16,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&rows(k)?, &rows(v)?, &op)?
        .reshape((b * s, nh * hd))
}

/// `t` (`[b, kv_heads, len, head_dim]`) with each row's first columns taken from its
/// leader's (`share`, as [`cached_attention`]'s), where a row need not store them.
fn leaders_columns(t: &Tensor, share: &[(usize, usize)]) -> Result<Tensor> {
    let (b, _, len, _) = t.dims4()?;
    if share
        .iter()
        .enumerate()
        .all(|(r, &(l, c))| l == r || c == 0)
    {
        return Ok(t.clone());
    }
    if share.len() != b {
        candle_core::bail!("{} share entries for {b} rows", share.len());
    }
    let rows = share
        .iter()
        .enumerate()
        .map(|(r, &(l, c))| {
            let (own, c) = (t.narrow(0, r, 1)?, c.min(len));
            if l == r || c == 0 {
                return Ok(own);
            }
            if l >= b {
                candle_core::bail!("row {r} shares with row {l} of {b}");
            }
            let lead = t.narrow(0, l, 1)?.narrow(2, 0, c)?;
            Ok(Tensor::cat(&[lead, own.narrow(2, c, len - c)?], 2)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Attention from batched matrix products (differentiable), same arguments and result as
/// [`cached_attention`]. The query heads that share a kv head are grouped into one product,
/// so `k` and `v` are not repeated per head.
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, nh, s, hd) = q.dims4()?;
    let (_, nkv, len, _) = k.dims4()?;
    let g = nh / nkv;
    let q = q.reshape((b, nkv, g * s, hd))?;
    let scores = q.matmul(&k.t()?)?.reshape((b, nh, s, len))?;
    let probs = masked_softmax(&scores, mask, scale)?;
    probs
        .reshape((b, nkv, g * s, len))?
        .matmul(v)?
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((b * s, nh * hd))
}

/// Whether [`attention`] has a fused kernel for this tensor (CPU, f32 or f64).
pub fn has_fused_attention(qkv: &Tensor) -> bool {
    cpu_kernel(qkv)
}

/// Causal attention with RoPE and grouped kv heads, fused: `qkv: [b * s, (heads + 2
/// kv_heads) * head_dim]` (the stacked q/k/v projections of every token), `cos`/`sin:
/// [b, s, head_dim/2]`, `mask: [b, s, s]` additive and causal, read once into an
/// [`AttentionMask`] that every layer of a pass shares. Returns `[b * s, heads *
/// head_dim]`. Only where [`has_fused_attention`] holds; the model composes the same
/// computation from the other ops elsewhere. With `bf16` (f32 tensors, a CPU with a
/// [`crate::bf16_kernel`]), the products of both passes take bf16-rounded operands with
/// f32 sums, the softmax stays in f32; otherwise it is ignored.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttentionMask,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    bf16: bool,
) -> Result<Tensor> {
    if !has_fused_attention(qkv) {
        candle_core::bail!("fused attention runs on the CPU in f32/f64 only")
    }
    let dt = qkv.dtype();
    let op = kernels::Attention {
        heads,
        kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f64).sqrt(),
        cos: cos.to_dtype(dt)?.contiguous()?,
        sin: sin.to_dtype(dt)?.contiguous()?,
        mask: mask.to_dtype(dt)?,
        bf16: if bf16 && dt == DType::F32 {
            kernels::bf16_kernel()
        } else {
            None
        },
        lse: Default::default(),
    };
    qkv.contiguous()?.apply_op1(op)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu_kernel(x) {
        return x.contiguous()?.apply_op1(kernels::Softmax);
    }
    softmax_generic(x)
}

/// Any-device softmax: candle-nn's fused forward plus a composed backward.
pub(crate) fn softmax_generic(x: &Tensor) -> Result<Tensor> {
    let fast = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    attach1(
        "softmax-bwd",
        fast,
        x,
        Box::new(|_x, y, g| {
            let dtype = y.dtype();
            let (y, g) = (upcast(y)?, upcast(g)?);
            let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
            (y * g.broadcast_sub(&dot)?)?.to_dtype(dtype)
        }),
    )
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let fast = candle_nn::ops::log_softmax(&x.detach(), D::Minus1)?;
    attach1(
        "log-softmax-bwd",
        fast,
        x,
        Box::new(|_x, y, g| {
            let dtype = y.dtype();
            let (y, g) = (upcast(y)?, upcast(g)?);
            let gsum = g.sum_keepdim(D::Minus1)?;
            (g - y.exp()?.broadcast_mul(&gsum)?)?.to_dtype(dtype)
        }),
    )
}

/// `x + bias` over the rows of `x: [n, d]` (`bias: [d]`), as a linear layer adds its bias.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if cpu_kernel(x) && x.rank() == 2 && bias.dtype() == x.dtype() {
        return x
            .contiguous()?
            .apply_op2(&bias.contiguous()?, kernels::BiasAdd);
    }
    x.broadcast_add(bias)
}

/// SwiGLU on a fused gate/up projection: `gate_up: [.., 2i]` (gate in the first half of
/// each row, up in the second) -> `silu(gate) * up: [.., i]`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    if cpu_kernel(gate_up) {
        return gate_up.contiguous()?.apply_op1(kernels::SwiGlu);
    }
    let i = gate_up.dim(D::Minus1)? / 2;
    gate_up.narrow(D::Minus1, 0, i)?.silu()? * gate_up.narrow(D::Minus1, i, i)?
}

/// Mean next-token cross-entropy of `logits: [n, vocab]` against `targets: [n]` (u32),
/// ignoring targets equal to `ignore` (or none when `ignore` is `None`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore: Option<u32>) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?;
    let per_row = if cpu_kernel(logits) {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, kernels::Nll { ignore })?
    } else {
        let lp = log_softmax_last_dim(logits)?;
        let safe = match ignore {
            Some(ig) => targets
                .ne(ig)?
                .where_cond(&targets, &targets.zeros_like()?)?,
            None => targets.clone(),
        };
        let picked = lp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        match ignore {
            Some(ig) => (picked * targets.ne(ig)?.to_dtype(lp.dtype())?)?,
            None => picked,
        }
    };
    mean_over_kept(&per_row, &targets, ignore)
}

/// Sum of per-row losses divided by the number of targets that are not `ignore`.
fn mean_over_kept(per_row: &Tensor, targets: &Tensor, ignore: Option<u32>) -> Result<Tensor> {
    let n = match ignore {
        Some(ig) => targets
            .ne(ig)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?,
        None => targets.elem_count() as f64,
    };
    per_row.sum_all()? / n.max(1.0)
}

/// Mean cross-entropy of `targets: [n]` under the logits `hidden @ weight^T`
/// (`hidden: [n, h]`, `weight: [vocab, h]`), ignoring `ignore` targets. On the CPU the
/// projection and the loss are one op: the logits are no graph tensor and their gradient
/// is formed in place (the same memory as the logits, like PyTorch's eager mode). For a
/// vocabulary or sequence too large for `[n, vocab]` at once, use
/// [`crate::chunked_logprobs`].
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Tensor> {
    linear_cross_entropy_with(hidden, weight, targets, ignore, false)
}

/// [`linear_cross_entropy`], with `bf16`: the logits and both gradients' products from
/// bf16-rounded operands with f32 sums (AMX or AVX512-BF16; mixed-precision training, as
/// [`crate::CausalLM::bf16_matmuls_active`] says), the softmax in f32. Without a bf16 kernel, or
/// for other dtypes, `bf16` changes nothing.
pub fn linear_cross_entropy_with(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    bf16: bool,
) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?;
    if !(cpu_kernel(hidden) && weight.dtype() == hidden.dtype()) {
        return cross_entropy(&hidden.matmul(&weight.t()?)?, &targets, ignore);
    }
    let op = kernels::LinearNll {
        ignore,
        logits: Default::default(),
        bf16: bf16 && hidden.dtype() == DType::F32 && kernels::bf16_available(),
    };
    let per_row =
        hidden
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &targets.contiguous()?, op)?;
    mean_over_kept(&per_row, &targets, ignore)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Random f64 tensor with a fixed seed (deterministic across runs).
    pub fn rand64(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Largest absolute elementwise difference (f64 tensors); infinite where either side
    /// has a NaN (a plain max over the tensor would skip it).
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d: Vec<f64> = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        d.iter().fold(
            0f64,
            |m, &x| if x.is_nan() { f64::INFINITY } else { m.max(x) },
        )
    }

    /// Checks d/d inputs of `sum(f(inputs) * r)` against central finite differences.
    pub fn check_grads(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let r = rand64(out.dims(), 99);
        let loss = |ts: &[Tensor]| -> f64 {
            (f(ts).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("input {i} got no gradient"));
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
            let n = base.len();
            for j in (0..n).step_by((n / 17).max(1)) {
                let h = 1e-6;
                let eval = |delta: f64| {
                    let mut b = base.clone();
                    b[j] += delta;
                    let mut ts: Vec<Tensor> = inputs.to_vec();
                    ts[i] = Tensor::from_vec(b, inputs[i].dims(), &Device::Cpu).unwrap();
                    loss(&ts)
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                let err = (fd - g[j]).abs() / (1e-6 + fd.abs().max(g[j].abs()));
                assert!(
                    err < 1e-5,
                    "input {i} elem {j}: autograd {} vs finite diff {fd}",
                    g[j]
                );
            }
        }
    }

    #[test]
    fn rms_norm_grad() {
        check_grads(&[rand64(&[3, 5, 8], 1), rand64(&[8], 2)], &|t| {
            rms_norm(&t[0], &t[1], 1e-6)
        });
        check_grads(&[rand64(&[3, 5, 8], 1), rand64(&[8], 2)], &|t| {
            rms_norm_generic(&t[0], &t[1], 1e-6)
        });
    }

    #[test]
    fn rope_grad() {
        let cos = rand64(&[2, 5, 4], 3);
        let sin = rand64(&[2, 5, 4], 4);
        check_grads(&[rand64(&[2, 5, 3, 8], 5)], &|t| {
            rope_bthd(&t[0], &cos, &sin)
        });
        check_grads(&[rand64(&[2, 3, 5, 8], 5)], &|t| {
            rope_generic(&t[0], &cos, &sin)
        });
    }

    #[test]
    fn softmax_and_log_softmax_grad() {
        check_grads(&[rand64(&[4, 7], 6)], &|t| softmax_last_dim(&t[0]));
        check_grads(&[rand64(&[4, 7], 6)], &|t| softmax_generic(&t[0]));
        check_grads(&[rand64(&[2, 3, 7], 7)], &|t| log_softmax_last_dim(&t[0]));
        // Masked and scaled, mask shared by the heads (one entry per row stays open).
        let mut m = rand64(&[2, 4, 5], 8).to_vec3::<f64>().unwrap();
        m[0][1][3] = f64::NEG_INFINITY;
        m[1][2][0] = f64::NEG_INFINITY;
        let mask = Tensor::new(m, &Device::Cpu).unwrap();
        check_grads(&[rand64(&[2, 3, 4, 5], 9)], &|t| {
            masked_softmax(&t[0], &mask, 0.7)
        });
        let a = masked_softmax(&rand64(&[2, 3, 4, 5], 9), &mask, 0.7).unwrap();
        let x = (rand64(&[2, 3, 4, 5], 9) * 0.7)
            .unwrap()
            .broadcast_add(&mask.unsqueeze(1).unwrap())
            .unwrap();
        let b = softmax_generic(&x).unwrap();
        let d = max_abs_diff(&a, &b);
        assert!(
            d < 1e-12,
            "masked softmax differs from composed reference by {d}"
        );
    }

    #[test]
    fn fused_attention_grad_and_value() {
        // 2 sequences packed in row 0, one sequence plus padding in row 1; 4 heads over
        // 2 kv heads of size 4; s = 70 crosses a query block boundary.
        // The kernel reads masks of packed rows as ranges of keys, those whose rows share
        // a prefix as two ranges, and any other mask densely: all three are checked.
        let (b, s) = (2, 70);
        let packed = crate::SeqLayout::packed(&[vec![40, 30], vec![50]], s, &Device::Cpu).unwrap();
        let shared =
            crate::SeqLayout::shared(&[vec![(40, 0), (20, 25)], vec![(50, 0)]], s, &Device::Cpu)
                .unwrap();
        let mut irregular = packed.mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        irregular[(s + 45) * s + 10] = f32::NEG_INFINITY; // a hole in a causal row
        irregular[45 * s + 41] = -0.5; // a soft bias
        let irregular = Tensor::from_vec(irregular, (b, 1, s, s), &Device::Cpu).unwrap();
        for (what, mask, layout) in [
            ("packed", &packed.mask, &packed),
            ("shared prefix", &shared.mask, &shared),
            ("irregular", &irregular, &packed),
        ] {
            fused_attention_case(what, mask, layout);
        }
    }

    fn fused_attention_case(what: &str, mask: &Tensor, layout: &crate::SeqLayout) {
        let (nh, nkv, hd) = (4, 2, 4);
        let (b, _, s, _) = mask.dims4().unwrap();
        let mask =
            AttentionMask::new(&mask.squeeze(1).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
        // Packed and shared-prefix rows read as ranges of keys, the irregular mask densely.
        assert_eq!(mask.reads_ranges(), what != "irregular", "{what}");
        let pos = layout
            .positions
            .to_dtype(DType::F64)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let inv = Tensor::new(&[1.0f64, 0.01], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2))
            .unwrap();
        let freqs = pos.broadcast_mul(&inv).unwrap();
        let (cos, sin) = (freqs.cos().unwrap(), freqs.sin().unwrap());
        let qkv = rand64(&[b, s, (nh + 2 * nkv) * hd], 21);
        let flat = |t: &Tensor| t.reshape((b * s, ())).unwrap();
        check_grads(&[flat(&qkv)], &|t| {
            attention(&t[0], &cos, &sin, &mask, nh, nkv, hd, false)
        });
        // Against the composed computation (rope, grouped scores, masked softmax).
        let got = attention(&flat(&qkv), &cos, &sin, &mask, nh, nkv, hd, false)
            .unwrap()
            .reshape((b, s, ()))
            .unwrap();
        let q = qkv
            .narrow(2, 0, nh * hd)
            .unwrap()
            .reshape((b, s, nh, hd))
            .unwrap();
        let k = qkv
            .narrow(2, nh * hd, nkv * hd)
            .unwrap()
            .reshape((b, s, nkv, hd))
            .unwrap();
        let v = qkv
            .narrow(2, (nh + nkv) * hd, nkv * hd)
            .unwrap()
            .reshape((b, s, nkv, hd))
            .unwrap();
        let q = rope_generic(
            &q.transpose(1, 2).unwrap().contiguous().unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
        let k = rope_generic(
            &k.transpose(1, 2).unwrap().contiguous().unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
        let v = v.transpose(1, 2).unwrap().contiguous().unwrap();
        let mut outs = vec![];
        for h in 0..nh {
            let qh = q.narrow(1, h, 1).unwrap().squeeze(1).unwrap();
            let kh = k.narrow(1, h / (nh / nkv), 1).unwrap().squeeze(1).unwrap();
            let vh = v.narrow(1, h / (nh / nkv), 1).unwrap().squeeze(1).unwrap();
            let sc = (qh.matmul(&kh.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
            let p = softmax_generic(&(sc + mask.tensor()).unwrap()).unwrap();
            outs.push(p.matmul(&vh).unwrap());
        }
        let want = Tensor::cat(&outs, 2).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(
            d < 1e-12,
            "fused attention ({what} mask) differs from the composed one by {d}"
        );
    }

    /// The streaming kernel equals the batched products on views of a larger cache
    /// buffer (grouped heads, several new positions, masked keys), in f64 and f32.
    #[test]
    fn cached_attention_kernel_matches_grouped_products() {
        let (b, nh, nkv, hd, cap) = (2, 6, 2, 8, 40);
        for (s, len, heads_inner) in [(1, 29, false), (3, 17, true)] {
            let q = rand64(&[b, nh, s, hd], 1);
            // The filled part of a `[b, kv_heads, cap, hd]` buffer, or (heads_inner) of a
            // `[b, cap, kv_heads, hd]` one seen as `[b, kv_heads, len, hd]`: position
            // stride kv_heads * hd.
            let view = |seed| {
                if heads_inner {
                    let t = rand64(&[b, cap, nkv, hd], seed);
                    t.narrow(1, 0, len).unwrap().transpose(1, 2).unwrap()
                } else {
                    rand64(&[b, nkv, cap, hd], seed).narrow(2, 0, len).unwrap()
                }
            };
            let (k, v) = (view(2), view(3));
            assert!(!k.is_contiguous());
            assert_eq!(k.stride()[2], if heads_inner { nkv * hd } else { hd });
            // Row 0 sees everything; row 1 has its first 5 keys masked (left padding).
            let mut m = vec![0f64; b * s * len];
            for i in 0..s {
                for j in 0..5 {
                    m[(s + i) * len + j] = f64::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(m, (b, s, len), &Device::Cpu).unwrap();
            let scale = 0.35;
            let (kc, vc) = (k.contiguous().unwrap(), v.contiguous().unwrap());
            let want = grouped_attention(&q, &kc, &vc, &mask, scale).unwrap();
            let got = cached_attention(&q, &k, &v, &mask, scale, &[], false).unwrap();
            assert_eq!(got.dims(), [b * s, nh * hd]);
            let e = max_abs_diff(&got, &want);
            assert!(e < 1e-12, "s={s}: f64 difference {e}");
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let got32 =
                cached_attention(&f(&q), &f(&k), &f(&v), &f(&mask), scale, &[], false).unwrap();
            let e = max_abs_diff(&got32.to_dtype(DType::F64).unwrap(), &want);
            assert!(e < 1e-5, "s={s}: f32 difference {e}");
            // A bf16 cache under f32 queries (same strided views): the f32 result of the
            // rounded keys and values, which differs from the unrounded one.
            let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let (kb, vb) = if heads_inner {
                let w = |seed| {
                    bf(&rand64(&[b, cap, nkv, hd], seed))
                        .narrow(1, 0, len)
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                };
                (w(2), w(3))
            } else {
                let w = |seed| {
                    bf(&rand64(&[b, nkv, cap, hd], seed))
                        .narrow(2, 0, len)
                        .unwrap()
                };
                (w(2), w(3))
            };
            assert!(!kb.is_contiguous() && kb.dtype() == DType::BF16);
            let gotb = cached_attention(&f(&q), &kb, &vb, &f(&mask), scale, &[], false).unwrap();
            let rounded =
                cached_attention(&f(&q), &f(&kb), &f(&vb), &f(&mask), scale, &[], false).unwrap();
            let d = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let e = max_abs_diff(&d(&gotb), &d(&rounded));
            assert!(e < 1e-6, "s={s}: bf16 cache against its f32 values: {e}");
            let e = max_abs_diff(&d(&gotb), &d(&got32));
            assert!(e > 1e-4, "s={s}: the bf16 cache gave the f32 result ({e})");
        }
    }

    /// `t: [b, kv_heads, len, hd]` with row 0's first `cols` positions copied into `rows`
    /// (copies of one shared prompt).
    fn copy_prefix(t: Tensor, cols: usize, rows: &[usize]) -> Tensor {
        let p = t.narrow(0, 0, 1).unwrap().narrow(2, 0, cols).unwrap();
        for &r in rows {
            t.narrow(0, r, 1)
                .unwrap()
                .slice_set(&p.contiguous().unwrap(), 2, 0)
                .unwrap();
        }
        t
    }

    /// Rows that share their first columns with a leader row (copies of one prompt's keys
    /// and values) give the same attention when the kernel reads those columns once for
    /// the group, with masked keys and a finished row (a hole) among them, and when the
    /// rows but the leader do not store them.
    #[test]
    fn grouped_rows_read_shared_columns_once_with_the_same_result() {
        let (b, nh, nkv, hd, len, cols) = (4, 6, 2, 8, 30, 20);
        for s in [1, 3, 40] {
            let q = rand64(&[b, nh, s, hd], 11);
            // Rows 0, 2 and 3 hold the same first 20 positions; row 1 is other.
            let k = copy_prefix(rand64(&[b, nkv, len, hd], 12), cols, &[2, 3]);
            let v = copy_prefix(rand64(&[b, nkv, len, hd], 13), cols, &[2, 3]);
            let mut m = vec![0f64; b * s * len];
            for i in 0..s {
                // Row 2 has positions 5..8 masked; row 3 has finished (sees its last key).
                for j in 5..8 {
                    m[(2 * s + i) * len + j] = f64::NEG_INFINITY;
                }
                for j in 0..len - 1 {
                    m[(3 * s + i) * len + j] = f64::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(m, (b, s, len), &Device::Cpu).unwrap();
            let want = grouped_attention(&q, &k, &v, &mask, 0.3).unwrap();
            let share = [(0, cols), (1, 0), (0, cols), (0, cols)];
            let got = cached_attention(&q, &k, &v, &mask, 0.3, &share, false).unwrap();
            let e = max_abs_diff(&got, &want);
            assert!(e < 1e-12, "s={s}: difference {e}");
            // Rows 2 and 3 need not store the shared columns: NaN there changes nothing,
            // on the kernel or on the other path (which tracked operands take).
            let hide = |t: &Tensor| {
                let t = t.copy().unwrap();
                let nan = Tensor::full(f64::NAN, (1, nkv, cols, hd), &Device::Cpu).unwrap();
                for r in [2, 3] {
                    t.narrow(0, r, 1).unwrap().slice_set(&nan, 2, 0).unwrap();
                }
                t
            };
            let (kh, vh) = (hide(&k), hide(&v));
            let got = cached_attention(&q, &kh, &vh, &mask, 0.3, &share, false).unwrap();
            let e = max_abs_diff(&got, &want);
            assert!(e < 1e-12, "s={s}: kernel, columns left out: {e}");
            let qt = candle_core::Var::from_tensor(&q).unwrap();
            let got = cached_attention(qt.as_tensor(), &kh, &vh, &mask, 0.3, &share, false);
            let e = max_abs_diff(&got.unwrap().detach(), &want);
            assert!(e < 1e-12, "s={s}: other path, columns left out: {e}");
            // Row 0 (all of whose keys row 0 still sees here) as a leader that is not one
            // of its group's rows: the same result.
            let apart = [(0, 0), (1, 0), (0, cols), (0, cols)];
            let got = cached_attention(&q, &kh, &vh, &mask, 0.3, &apart, false).unwrap();
            let e = max_abs_diff(&got, &want);
            assert!(e < 1e-12, "s={s}: a leader apart from its group: {e}");
            let unshared = cached_attention(&q, &kh, &vh, &mask, 0.3, &[], false).unwrap();
            let vals = unshared.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(
                vals.iter().any(|x| x.is_nan()),
                "s={s}: rows read their own columns"
            );
            // A row naming a leader after it is refused.
            let bad = [(0, cols), (2, 5), (2, 5), (3, 0)];
            assert!(cached_attention(&q, &k, &v, &mask, 0.3, &bad, false).is_err());
        }
    }

    /// In f32, with a bf16 cache or an f32 one, a group's shared columns give the f64
    /// attention whether its products run on the few-row kernels (9 and 72 query rows per
    /// kv head) or on gemm (108): each member's columns there are NaN, so a row that read
    /// its own would show.
    #[test]
    fn grouped_rows_in_f32_read_shared_columns_on_either_kernel() {
        let (b, nh, nkv, hd, len, cols) = (4, 6, 2, 64, 40, 24);
        for s in [1, 8, 12] {
            let q = rand64(&[b, nh, s, hd], 31);
            // Rows 1, 2 and 3 share row 0's first 24 positions.
            let k = copy_prefix(rand64(&[b, nkv, len, hd], 32), cols, &[1, 2, 3]);
            let v = copy_prefix(rand64(&[b, nkv, len, hd], 33), cols, &[1, 2, 3]);
            let mut m = vec![0f64; b * s * len];
            for i in 0..s {
                // Row 1 has positions 3..6 masked, row 2 its positions 30..33.
                for j in 3..6 {
                    m[(s + i) * len + j] = f64::NEG_INFINITY;
                }
                for j in 30..33 {
                    m[(2 * s + i) * len + j] = f64::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(m, (b, s, len), &Device::Cpu).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let nan = Tensor::full(f32::NAN, (1, nkv, cols, hd), &Device::Cpu).unwrap();
            let hide = |t: Tensor| {
                for r in 1..b {
                    let nan = nan.to_dtype(t.dtype()).unwrap();
                    t.narrow(0, r, 1).unwrap().slice_set(&nan, 2, 0).unwrap();
                }
                t
            };
            let share = [(0, cols), (0, cols), (0, cols), (0, cols)];
            for cache in [f, bf] {
                let (kc, vc) = (cache(&k), cache(&v));
                // The reference: the f64 attention of the cache's values.
                let d = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let want = grouped_attention(&q, &d(&kc), &d(&vc), &mask, 0.125).unwrap();
                let (kh, vh) = (hide(kc.copy().unwrap()), hide(vc.copy().unwrap()));
                let got =
                    cached_attention(&f(&q), &kh, &vh, &f(&mask), 0.125, &share, false).unwrap();
                let e = max_abs_diff(&d(&got), &want);
                assert!(e < 1e-5, "s={s}, {:?} cache: difference {e}", kc.dtype());
            }
        }
    }

    /// With `bf16`, prefill chunks (more than 16 query rows per kv head) take the products
    /// of bf16-rounded queries, keys, probabilities and values with f32 sums: the result
    /// is the f64 attention of those rounded operands (probabilities rounded after the
    /// softmax), far closer to it than to the unrounded attention, for rows that read a
    /// shared prefix once and rows alone with masked keys. Without a bf16 kernel (or
    /// `TOOLTRAIN_BF16=off`) it stays the f32 result.
    #[test]
    fn bf16_prefill_attention_is_the_attention_of_rounded_operands() {
        let (b, nh, nkv, hd, s, len, cols) = (3, 6, 2, 64, 8, 50, 20);
        let g = nh / nkv;
        let q = rand64(&[b, nh, s, hd], 21);
        // Rows 0 and 2 hold the same first 20 positions (a shared prompt); row 1 is other.
        let k = copy_prefix(rand64(&[b, nkv, len, hd], 22), cols, &[2]);
        let v = copy_prefix(rand64(&[b, nkv, len, hd], 23), cols, &[2]);
        // Row 1 has its first 5 keys masked; row 2 its keys 30..33.
        let mut m = vec![0f64; b * s * len];
        for i in 0..s {
            for j in 0..5 {
                m[(s + i) * len + j] = f64::NEG_INFINITY;
            }
            for j in 30..33 {
                m[(2 * s + i) * len + j] = f64::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(m.clone(), (b, s, len), &Device::Cpu).unwrap();
        let scale = 0.125;
        // The reference: every operand rounded to bf16 (ties to even, `half`), sums and
        // the softmax in f64, the probabilities rounded before they weight the values.
        let r = |x: f64| half::bf16::from_f32(x as f32).to_f64();
        let (qv, kv, vv) = (
            q.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            k.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            v.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        let mut want = vec![0f64; b * s * nh * hd];
        for bi in 0..b {
            for h in 0..nh {
                let j0 = h / g;
                for i in 0..s {
                    let qa = |d: usize| r(qv[((bi * nh + h) * s + i) * hd + d]);
                    let at =
                        |t: &[f64], j: usize, d: usize| r(t[((bi * nkv + j0) * len + j) * hd + d]);
                    let sc: Vec<f64> = (0..len)
                        .map(|j| {
                            (0..hd).map(|d| qa(d) * at(&kv, j, d)).sum::<f64>() * scale
                                + m[(bi * s + i) * len + j]
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        want[((bi * s + i) * nh + h) * hd + d] =
                            (0..len).map(|j| r(e[j] / z) * at(&vv, j, d)).sum();
                    }
                }
            }
        }
        let want = Tensor::from_vec(want, (b * s, nh * hd), &Device::Cpu).unwrap();
        let exact = grouped_attention(&q, &k, &v, &mask, scale).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let d = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let mean = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for share in [vec![], vec![(0, cols), (1, 0), (0, cols)]] {
            let got =
                cached_attention(&f(&q), &f(&k), &f(&v), &f(&mask), scale, &share, true).unwrap();
            let got = d(&got);
            if crate::kernels::bf16_kernel().is_some() {
                // Rounding the f32 probabilities can differ from rounding the f64 ones in
                // the last bit now and then: a bound on the mean, and the largest error
                // below the one of the unrounded attention.
                let (e, e0) = (mean(&got, &want), mean(&exact, &want));
                assert!(
                    e < e0 / 20.0,
                    "share {share:?}: mean error {e} against {e0}"
                );
                let (e, e0) = (max_abs_diff(&got, &want), max_abs_diff(&exact, &want));
                assert!(
                    e < e0 / 4.0,
                    "share {share:?}: largest error {e} against {e0}"
                );
            } else {
                let e = max_abs_diff(&got, &exact);
                assert!(e < 1e-5, "share {share:?}: f32 fallback off by {e}");
            }
        }
    }

    #[test]
    fn add_bias_grad() {
        check_grads(&[rand64(&[5, 7], 11), rand64(&[7], 12)], &|t| {
            add_bias(&t[0], &t[1])
        });
        let (x, b) = (rand64(&[5, 7], 13), rand64(&[7], 14));
        let d = max_abs_diff(&add_bias(&x, &b).unwrap(), &x.broadcast_add(&b).unwrap());
        assert_eq!(d, 0.0);
    }

    #[test]
    fn swiglu_grad() {
        check_grads(&[rand64(&[3, 12], 8)], &|t| swiglu(&t[0]));
        // Against the composed formula silu(gate) * up.
        let x = rand64(&[3, 12], 8);
        let want =
            (x.narrow(1, 0, 6).unwrap().silu().unwrap() * x.narrow(1, 6, 6).unwrap()).unwrap();
        assert!(max_abs_diff(&swiglu(&x).unwrap(), &want) < 1e-12);
    }

    #[test]
    fn cross_entropy_grad_and_value() {
        let targets = Tensor::new(&[1u32, 0, 3, 2], &Device::Cpu).unwrap();
        check_grads(&[rand64(&[4, 5], 10)], &|t| {
            cross_entropy(&t[0], &targets, Some(3))
        });
        check_grads(&[rand64(&[4, 5], 10)], &|t| {
            cross_entropy(&t[0], &targets, None)
        });
        // Fused CPU kernel against the composed path (log-softmax + gather).
        let x = rand64(&[4, 5], 10);
        let a = cross_entropy(&x, &targets, Some(3))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let lp = log_softmax_last_dim(&x).unwrap().to_vec2::<f64>().unwrap();
        let want = -(lp[0][1] + lp[1][0] + lp[3][2]) / 3.0;
        assert!((a - want).abs() < 1e-12, "{a} vs {want}");
        // Hand-computed: uniform logits over 5 classes give ln 5.
        let z = Tensor::zeros((4, 5), DType::F64, &Device::Cpu).unwrap();
        let ce = cross_entropy(&z, &targets, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((ce - 5f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn linear_cross_entropy_grad_and_value() {
        let targets = Tensor::new(&[1u32, 0, 6, 2, 6], &Device::Cpu).unwrap();
        check_grads(&[rand64(&[5, 4], 30), rand64(&[7, 4], 31)], &|t| {
            linear_cross_entropy(&t[0], &t[1], &targets, Some(6))
        });
        let (h, w) = (rand64(&[5, 4], 30), rand64(&[7, 4], 31));
        let a = linear_cross_entropy(&h, &w, &targets, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let b = cross_entropy(&h.matmul(&w.t().unwrap()).unwrap(), &targets, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// The fused head in mixed precision: its loss is the f32 loss of the bf16-rounded
    /// hidden states and weight (only the summation order differs), and its gradients
    /// are theirs up to the rounding of the logits' gradient. Without AMX it is f32.
    #[test]
    fn bf16_head_is_the_f32_head_of_rounded_operands() {
        let round = |t: &Tensor| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let r: Vec<f32> = v
                .iter()
                .map(|&x| kernels::amx::bf16_value(kernels::amx::bf16_bits(x)))
                .collect();
            Tensor::from_vec(r, t.shape(), t.device()).unwrap()
        };
        let f32t = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        // Sizes that are not multiples of the 16 x 32 tiles.
        let (h, w) = (f32t(rand64(&[37, 40], 41)), f32t(rand64(&[70, 40], 42)));
        let targets = Tensor::new(
            &(0..37u32).map(|i| (i * 29 + 3) % 70).collect::<Vec<_>>()[..],
            &Device::Cpu,
        )
        .unwrap();
        let run = |h: &Tensor, w: &Tensor, bf16: bool| {
            let (hv, wv) = (Var::from_tensor(h).unwrap(), Var::from_tensor(w).unwrap());
            let loss =
                linear_cross_entropy_with(hv.as_tensor(), wv.as_tensor(), &targets, None, bf16)
                    .unwrap();
            let g = loss.backward().unwrap();
            let grads = [hv.as_tensor(), wv.as_tensor()].map(|v| g.get(v).unwrap().clone());
            (loss.to_scalar::<f32>().unwrap() as f64, grads)
        };
        let (l32, _) = run(&h, &w, false);
        let (l16, g16) = run(&h, &w, true);
        if !kernels::bf16_available() {
            assert_eq!(l16, l32);
            return;
        }
        let (lr, gr) = run(&round(&h), &round(&w), false);
        assert!((l16 - lr).abs() < 1e-6 * lr, "loss {l16} vs {lr}");
        assert!(
            (l16 - l32).abs() > 1e-6 * l32,
            "the bf16 head gave the f32 loss"
        );
        for (i, (a, b)) in g16.iter().zip(&gr).enumerate() {
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let d = max_abs_diff(
                &a.to_dtype(DType::F64).unwrap(),
                &b.to_dtype(DType::F64).unwrap(),
            );
            assert!(d < 1e-2 * scale, "gradient {i}: {d} off (scale {scale})");
        }
    }

    #[test]
    fn fused_forward_matches_composed_reference() {
        // f32 fused kernels against straightforward composed formulas.
        let x = rand64(&[2, 3, 4, 8], 11).to_dtype(DType::F32).unwrap();
        let w = rand64(&[8], 12).to_dtype(DType::F32).unwrap();
        let a = rms_norm(&x, &w, 1e-5).unwrap();
        let b = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap();
        assert!(
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );
        let cos = rand64(&[4, 4], 13).to_dtype(DType::F32).unwrap();
        let sin = rand64(&[4, 4], 14).to_dtype(DType::F32).unwrap();
        let a = rope_bthd(
            &x.transpose(1, 2).unwrap().contiguous().unwrap(),
            &cos.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap(),
            &sin.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap(),
        )
        .unwrap();
        let b = candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap();
        assert!(
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );
    }

    /// Every kernel, forward and backward, in f32 at every SIMD level this CPU has: the
    /// results are bit-identical to the baseline level's (only the vector width differs).
    #[test]
    fn every_kernel_is_bit_identical_at_every_simd_level() {
        let f32t = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let flat = |t: &Tensor| -> Vec<u32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        // The output and the gradient of `sum(out * r)` for every input.
        let fwd_bwd =
            |inputs: Vec<Tensor>, f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Vec<Vec<u32>> {
                let vars: Vec<Var> = inputs
                    .iter()
                    .map(|t| Var::from_tensor(t).unwrap())
                    .collect();
                let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let out = f(&ts).unwrap();
                let r = f32t(rand64(out.dims(), 77));
                let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let mut v = vec![flat(&out)];
                v.extend(vars.iter().map(|x| flat(grads.get(x).expect("gradient"))));
                v
            };
        let suite = || -> Vec<Vec<u32>> {
            let mut out = Vec::new();
            out.extend(fwd_bwd(
                vec![f32t(rand64(&[3, 7, 40], 1)), f32t(rand64(&[40], 2))],
                &|t| rms_norm(&t[0], &t[1], 1e-6),
            ));
            let (cos, sin) = (f32t(rand64(&[2, 5, 4], 3)), f32t(rand64(&[2, 5, 4], 4)));
            out.extend(fwd_bwd(vec![f32t(rand64(&[2, 5, 3, 8], 5))], &|t| {
                rope_bthd(&t[0], &cos, &sin)
            }));
            let mask = f32t(
                (rand64(&[2, 6, 6], 6)
                    .ge(0.8)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    * -1e9)
                    .unwrap(),
            );
            out.extend(fwd_bwd(vec![f32t(rand64(&[2, 3, 6, 6], 7))], &|t| {
                masked_softmax(&t[0], &mask, 0.5)
            }));
            out.extend(fwd_bwd(vec![f32t(rand64(&[5, 7, 33], 8))], &|t| {
                softmax_last_dim(&t[0])
            }));
            out.extend(fwd_bwd(vec![f32t(rand64(&[5, 48], 9))], &|t| swiglu(&t[0])));
            out.extend(fwd_bwd(
                vec![f32t(rand64(&[6, 33], 10)), f32t(rand64(&[33], 11))],
                &|t| add_bias(&t[0], &t[1]),
            ));
            let targets = Tensor::new(&[3u32, 0, 49, 7, 7, 12, 30, 1, 2], &Device::Cpu).unwrap();
            out.extend(fwd_bwd(vec![f32t(rand64(&[9, 50], 12))], &|t| {
                cross_entropy(&t[0], &targets, Some(7))
            }));
            out.extend(fwd_bwd(
                vec![f32t(rand64(&[9, 16], 13)), f32t(rand64(&[50, 16], 14))],
                &|t| linear_cross_entropy(&t[0], &t[1], &targets, Some(7)),
            ));
            let (b, sq, nh, nkv, hd) = (2, 37, 4, 2, 8);
            let layout =
                crate::SeqLayout::packed(&[vec![20, 17], vec![30]], sq, &Device::Cpu).unwrap();
            let amask = AttentionMask::new(&f32t(layout.mask.squeeze(1).unwrap())).unwrap();
            let pos = layout
                .positions
                .to_dtype(DType::F64)
                .unwrap()
                .unsqueeze(2)
                .unwrap();
            let inv = Tensor::new(&[1.0f64, 0.1, 0.01, 0.001], &Device::Cpu)
                .unwrap()
                .reshape((1, 1, 4))
                .unwrap();
            let freqs = pos.broadcast_mul(&inv).unwrap();
            let (acos, asin) = (f32t(freqs.cos().unwrap()), f32t(freqs.sin().unwrap()));
            let qkv = f32t(rand64(&[b * sq, (nh + 2 * nkv) * hd], 15));
            out.extend(fwd_bwd(vec![qkv], &|t| {
                attention(&t[0], &acos, &asin, &amask, nh, nkv, hd, false)
            }));
            let q = f32t(rand64(&[2, 6, 3, 8], 16));
            let (k, v) = (
                f32t(rand64(&[2, 2, 21, 8], 17)),
                f32t(rand64(&[2, 2, 21, 8], 18)),
            );
            let dmask = f32t(Tensor::zeros((2, 3, 21), DType::F64, &Device::Cpu).unwrap());
            out.push(flat(
                &cached_attention(&q, &k, &v, &dmask, 0.35, &[], false).unwrap(),
            ));
            let g = f32t(rand64(&[1000, 3], 19));
            let sq = crate::kernels::sum_squares_f32(&g).unwrap();
            out.push(vec![
                (sq as f32).to_bits(),
                (sq.to_bits() >> 32) as u32,
                sq.to_bits() as u32,
            ]);
            out
        };
        let (reference, others) = crate::kernels::at_every_level(suite);
        for (level, got) in others {
            for (i, (a, b)) in reference.iter().zip(&got).enumerate() {
                assert!(
                    a == b,
                    "{level:?}: result {i} differs from the baseline level's"
                );
            }
        }
    }
}
