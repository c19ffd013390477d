//! Token-budget micro-batches: how one optimizer step's sequences are split into
//! forward/backward passes that each fit a memory budget, packed or one a row.

use tooltrain_model::{pack_rows, Device, SeqLayout, Tensor};

/// One forward/backward pass: rows of packed sequences, all padded to `row_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Per row, the indices (into the planned batch) of the sequences it packs.
    pub rows: Vec<Vec<usize>>,
    /// Tokens per row: the longest row's total.
    pub row_len: usize,
}

/// Plans the micro-batches of one batch of sequences of lengths `lens`: with `packing`,
/// sequences are packed first-fit (longest first) into rows of at most `row_capacity`
/// tokens, else each sequence is its own row; rows (longest first) are then grouped so
/// that `rows x row_len <= token_budget`, padding each row only to the longest row of
/// its micro-batch. Every length must be `<= row_capacity <= token_budget`.
pub fn plan_micro_batches(
    lens: &[usize],
    row_capacity: usize,
    token_budget: usize,
    packing: bool,
) -> Vec<MicroBatch> {
    let rows: Vec<Vec<usize>> = if packing {
        pack_rows(lens, row_capacity)
    } else {
        (0..lens.len()).map(|i| vec![i]).collect()
    };
    let mut rows: Vec<(usize, Vec<usize>)> = rows
        .into_iter()
        .map(|r| (r.iter().map(|&i| lens[i]).sum(), r))
        .collect();
    rows.sort_by_key(|(total, _)| std::cmp::Reverse(*total));
    let mut out: Vec<MicroBatch> = Vec::new();
    for (total, row) in rows {
        match out.last_mut() {
            Some(mb) if (mb.rows.len() + 1) * mb.row_len <= token_budget => mb.rows.push(row),
            _ => out.push(MicroBatch {
                rows: vec![row],
                row_len: total,
            }),
        }
    }
    out
}

/// A token sequence with a loss mask (1 on the tokens trained on).
pub trait TokenSeq {
    fn ids(&self) -> &[u32];
    fn mask(&self) -> &[u8];
}

/// The tensors of one micro-batch.
pub struct MicroBatchTensors {
    /// `[rows, row_len]` token ids (padding: id 0).
    pub ids: Tensor,
    /// Positions and attention mask of the packed rows.
    pub layout: SeqLayout,
    /// `[kept]` flat positions (`row * row_len + column`) whose next token is a target.
    pub positions: Tensor,
    /// `[kept]` the target token of each kept position.
    pub targets: Tensor,
    /// For each kept position, the sequence (index into the planned batch) and the index
    /// of its target token in that sequence.
    pub owners: Vec<(usize, usize)>,
    /// Number of loss targets.
    pub kept: usize,
    /// Number of real (non-padding) tokens.
    pub tokens: usize,
}

/// Builds the tensors of `mb` over `seqs` (the batch the plan was made for): position
/// `j` of a sequence predicts token `j + 1`, kept when `mask[j + 1] == 1`; kept positions
/// come row by row, sequence by sequence, in token order.
pub fn build_micro_batch<S: TokenSeq>(
    seqs: &[&S],
    mb: &MicroBatch,
    device: &Device,
) -> tooltrain_model::Result<MicroBatchTensors> {
    let (b, t) = (mb.rows.len(), mb.row_len);
    let mut ids = vec![0u32; b * t];
    let (mut positions, mut targets, mut owners) = (Vec::new(), Vec::new(), Vec::new());
    let mut row_lens = Vec::with_capacity(b);
    let mut tokens = 0;
    for (r, row) in mb.rows.iter().enumerate() {
        let mut off = r * t;
        let mut lens = Vec::with_capacity(row.len());
        for &i in row {
            let (x, m) = (seqs[i].ids(), seqs[i].mask());
            let n = x.len();
            ids[off..off + n].copy_from_slice(x);
            for j in 0..n.saturating_sub(1) {
                if m[j + 1] == 1 {
                    positions.push((off + j) as u32);
                    targets.push(x[j + 1]);
                    owners.push((i, j + 1));
                }
            }
            off += n;
            tokens += n;
            lens.push(n);
        }
        row_lens.push(lens);
    }
    let kept = targets.len();
    Ok(MicroBatchTensors {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        layout: SeqLayout::packed(&row_lens, t, device)?,
        positions: Tensor::from_vec(positions, kept, device)?,
        targets: Tensor::from_vec(targets, kept, device)?,
        owners,
        kept,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_respect_the_token_budget() {
        let lens = [5, 3, 8, 2, 7, 1];
        for packing in [true, false] {
            let plan = plan_micro_batches(&lens, 8, 16, packing);
            let mut seen: Vec<usize> = plan.iter().flat_map(|m| m.rows.concat()).collect();
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
            for mb in &plan {
                assert!(mb.rows.len() * mb.row_len <= 16);
                for r in &mb.rows {
                    assert!(r.iter().map(|&i| lens[i]).sum::<usize>() <= mb.row_len);
                }
            }
        }
        // Packed: 8 | 7+1 | 5+3 | 2 -> rows of 8 tokens, two per micro-batch.
        let plan = plan_micro_batches(&lens, 8, 16, true);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].row_len, 8);
        assert_eq!(plan[0].rows.len(), 2);
        // Unpacked: one sequence a row, longest first, each micro-batch padded to its
        // first row: 8 7 (2 x 8) | 5 3 2 (3 x 5) | 1.
        let plan = plan_micro_batches(&lens, 8, 16, false);
        let rows: Vec<Vec<Vec<usize>>> = plan.iter().map(|m| m.rows.clone()).collect();
        assert_eq!(
            rows,
            vec![
                vec![vec![2], vec![4]],
                vec![vec![0], vec![1], vec![3]],
                vec![vec![5]]
            ]
        );
        assert_eq!(
            plan.iter().map(|m| m.row_len).collect::<Vec<_>>(),
            vec![8, 5, 1]
        );
    }
}
