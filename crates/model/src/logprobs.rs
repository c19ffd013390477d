//! Per-token log-probabilities and entropies, computed in vocabulary chunks so that the
//! full `[tokens x vocab]` softmax never exists at once (forward and backward).

use crate::error::{invalid, Result};
use crate::kernels::{AmxGemm, Trans};
use crate::model::{CausalLM, SeqLayout};
use crate::ops;
use candle_core::{DType, Tensor, D};

/// Default number of vocabulary rows per chunk.
pub const DEFAULT_VOCAB_CHUNK: usize = 8192;

/// Log-probability of `targets` and entropy of the next-token distribution for each row
/// of `hidden: [n, h]`, where logits are `hidden @ weight^T` (`weight: [vocab, h]`).
/// Returns `[n, 2]` in f32: column 0 the log-prob, column 1 the entropy. Differentiable
/// with respect to `hidden` and `weight`; both passes work chunk by chunk over the
/// vocabulary (`chunk` rows of `weight` at a time), recomputing logits in the backward.
pub fn chunked_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    chunked_logprobs_with(hidden, weight, targets, chunk, false)
}

/// `op(a) @ op(b)` (`trans` says which is transposed), with `bf16` from bf16-rounded
/// operands with f32 sums (f32 CPU tensors; the caller checked for a bf16 kernel).
fn product(a: &Tensor, b: &Tensor, trans: Trans, bf16: bool) -> candle_core::Result<Tensor> {
    if bf16 {
        return a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &AmxGemm(trans));
    }
    match trans {
        Trans::None => a.matmul(b),
        Trans::B => a.matmul(&b.t()?),
        Trans::A => a.t()?.matmul(b),
    }
}

/// [`chunked_logprobs`], with `bf16`: the logits and both gradients' products from
/// bf16-rounded operands with f32 sums (AMX or AVX512-BF16; mixed-precision training, as
/// [`CausalLM::bf16_matmuls_active`] says), the log-sum-exp and entropy in f32. Without
/// a bf16 kernel, or for other dtypes or devices, `bf16` changes nothing.
pub fn chunked_logprobs_with(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    chunk: usize,
    bf16: bool,
) -> Result<Tensor> {
    let bf16 = bf16
        && hidden.device().is_cpu()
        && hidden.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && crate::kernels::bf16_available();
    let (n, h) = hidden.dims2()?;
    let (vocab, h2) = weight.dims2()?;
    if h != h2 {
        invalid!("hidden size {h} does not match the output projection [{vocab}, {h2}]");
    }
    if targets.dims() != [n] {
        invalid!("targets {:?} do not match {n} hidden rows", targets.dims());
    }
    let targets = targets.to_dtype(DType::U32)?;
    if n > 0 {
        let max = targets.max(0)?.to_scalar::<u32>()? as usize;
        if max >= vocab {
            invalid!("target id {max} is outside the vocabulary of {vocab}");
        }
    }
    let chunk = chunk.max(1);
    let (hd, wd) = (hidden.detach(), weight.detach());
    let dev = hidden.device();
    let neg_inf = Tensor::full(f32::NEG_INFINITY, n, dev)?;
    let (mut m, mut s, mut t, mut zt) = (
        neg_inf,
        Tensor::zeros(n, DType::F32, dev)?,
        Tensor::zeros(n, DType::F32, dev)?,
        Tensor::zeros(n, DType::F32, dev)?,
    );
    let tcol = targets.unsqueeze(1)?;
    for c0 in (0..vocab).step_by(chunk) {
        let c = chunk.min(vocab - c0);
        let z = product(&hd, &wd.narrow(0, c0, c)?, Trans::B, bf16)?.to_dtype(DType::F32)?;
        let m_new = m.maximum(&z.max(D::Minus1)?)?;
        let scale = (&m - &m_new)?.exp()?;
        let e = z.broadcast_sub(&m_new.unsqueeze(1)?)?.exp()?;
        s = ((s * &scale)? + e.sum(D::Minus1)?)?;
        t = ((t * &scale)? + (&e * &z)?.sum(D::Minus1)?)?;
        m = m_new;
        zt = (zt + pick(&z, &tcol, c0, c)?)?;
    }
    let lse = (&m + s.log()?)?;
    let lp = (&zt - &lse)?;
    let ent = (&lse - (t / s)?)?;
    let out = Tensor::stack(&[&lp, &ent], 1)?;
    let (lse_c, ent_c, tcol_c) = (lse, ent, tcol);
    Ok(ops::attach2(
        "chunked-logprobs-bwd",
        out,
        hidden,
        weight,
        Box::new(move |hid, w, _res, g| {
            let (g_lp, g_ent) = (
                g.narrow(1, 0, 1)?.to_dtype(DType::F32)?,
                g.narrow(1, 1, 1)?.to_dtype(DType::F32)?,
            );
            let hid32 = hid.to_dtype(DType::F32)?;
            let mut dh = hid32.zeros_like()?;
            let mut dws = Vec::new();
            let (lse, ent) = (lse_c.unsqueeze(1)?, ent_c.unsqueeze(1)?);
            for c0 in (0..vocab).step_by(chunk) {
                let c = chunk.min(vocab - c0);
                let wc = w.narrow(0, c0, c)?.to_dtype(DType::F32)?;
                let logp = product(&hid32, &wc, Trans::B, bf16)?.broadcast_sub(&lse)?;
                let p = logp.exp()?;
                // d lp / dz = onehot - p ; d H / dz = -p (log p + H)
                let onehot = onehot(&tcol_c, c0, c)?;
                let dz = ((onehot - &p)?.broadcast_mul(&g_lp)?
                    - (p * logp.broadcast_add(&ent)?)?.broadcast_mul(&g_ent)?)?;
                dh = (dh + product(&dz, &wc, Trans::None, bf16)?)?;
                dws.push(product(&dz, &hid32, Trans::A, bf16)?);
            }
            let dw = Tensor::cat(&dws, 0)?;
            Ok((dh.to_dtype(hid.dtype())?, dw.to_dtype(w.dtype())?))
        }),
    )?)
}

/// `[n, c]` one-hot rows for targets that fall into the chunk `[c0, c0 + c)`.
fn onehot(tcol: &Tensor, c0: usize, c: usize) -> candle_core::Result<Tensor> {
    let ids = Tensor::arange(c0 as u32, (c0 + c) as u32, tcol.device())?.unsqueeze(0)?;
    ids.broadcast_eq(tcol)?.to_dtype(DType::F32)
}

/// The logit of each row's target if it falls into this chunk, else 0.
fn pick(z: &Tensor, tcol: &Tensor, c0: usize, c: usize) -> Result<Tensor> {
    Ok((z * onehot(tcol, c0, c)?)?.sum(D::Minus1)?)
}

/// Log-probs and entropies of whole token sequences, as scored by `tooltrain score`.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceScores {
    /// `logprobs[i]` = log p(token i+1 | tokens 0..=i); one fewer than the tokens.
    pub logprobs: Vec<f32>,
    /// Entropy of the next-token distribution after tokens 0..=i.
    pub entropies: Vec<f32>,
}

/// Groups sequence lengths into rows of at most `capacity` tokens (first fit,
/// longest first). Returns the indices of the sequences of each row.
pub fn pack_rows(lens: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        match rows.iter_mut().find(|(used, _)| used + lens[i] <= capacity) {
            Some((used, r)) => {
                *used += lens[i];
                r.push(i);
            }
            None => rows.push((lens[i], vec![i])),
        }
    }
    rows.into_iter().map(|(_, r)| r).collect()
}

impl CausalLM {
    /// Scores whole sequences (no gradient): packs them into rows as long as the longest
    /// one and returns per-token log-probs and entropies, computed in vocabulary chunks.
    pub fn score(&self, seqs: &[Vec<u32>], vocab_chunk: usize) -> Result<Vec<SequenceScores>> {
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let cap = lens.iter().copied().max().unwrap_or(0);
        let mut out = vec![None; seqs.len()];
        let w = self.lm_head_weight(false);
        for row in pack_rows(&lens, cap) {
            let ids: Vec<u32> = row.iter().flat_map(|&i| seqs[i].iter().copied()).collect();
            let n = ids.len();
            let layout =
                SeqLayout::packed(&[row.iter().map(|&i| lens[i]).collect()], n, self.device())?;
            let x = Tensor::new(ids.as_slice(), self.device())?.unsqueeze(0)?;
            let hid = self.hidden_states(&x, &layout)?.squeeze(0)?;
            // Targets: the next token inside the same sequence (the last token of each
            // sequence has none; its row is computed and dropped).
            let mut targets = ids[1..].to_vec();
            targets.push(0);
            let res = chunked_logprobs(
                &hid,
                &w,
                &Tensor::new(targets.as_slice(), self.device())?,
                vocab_chunk,
            )?;
            let res: Vec<Vec<f32>> = res.to_vec2()?;
            let mut off = 0;
            for &i in &row {
                let len = lens[i];
                let rows = &res[off..off + len.saturating_sub(1)];
                out[i] = Some(SequenceScores {
                    logprobs: rows.iter().map(|r| r[0]).collect(),
                    entropies: rows.iter().map(|r| r[1]).collect(),
                });
                off += len;
            }
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every sequence is packed"))
            .collect())
    }
}
