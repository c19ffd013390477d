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
    /// Prefix sharing: `shared[r][k]` leading tokens of sequence `rows[r][k]` are those of
    /// the row's first sequence and are not placed again (all 0 without sharing).
    pub shared: Vec<Vec<usize>>,
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
    let rows = rows
        .into_iter()
        .map(|r| {
            let total = r.iter().map(|&i| lens[i]).sum();
            let shared = vec![0; r.len()];
            (total, r, shared)
        })
        .collect();
    group_rows(rows, token_budget)
}

/// Rows `(tokens placed, sequences, shared)`, longest first, grouped into micro-batches of
/// at most `token_budget` tokens (rows x row_len) each.
fn group_rows(
    mut rows: Vec<(usize, Vec<usize>, Vec<usize>)>,
    token_budget: usize,
) -> Vec<MicroBatch> {
    rows.sort_by_key(|(total, _, _)| std::cmp::Reverse(*total));
    let mut out: Vec<MicroBatch> = Vec::new();
    for (total, row, shared) in rows {
        match out.last_mut() {
            Some(mb) if (mb.rows.len() + 1) * mb.row_len <= token_budget => {
                mb.rows.push(row);
                mb.shared.push(shared);
            }
            _ => out.push(MicroBatch {
                rows: vec![row],
                row_len: total,
                shared: vec![shared],
            }),
        }
    }
    out
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Plans micro-batches with prefix sharing: sequences that start like another one (the
/// samples of one RL group share their prompt) go into that one's row, which places only
/// their tokens after the common prefix; the prefix is computed once and attended to by
/// all of them (an exact computation, see [`SeqLayout::shared`]). Longest first, each
/// sequence joins the row where it places the fewest tokens (at least one) within
/// `row_capacity`, or starts a new row. Every length must be `<= row_capacity <=
/// token_budget`.
pub fn plan_shared_micro_batches<S: TokenSeq>(
    seqs: &[&S],
    row_capacity: usize,
    token_budget: usize,
) -> Vec<MicroBatch> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].ids().len()));
    // (tokens placed, sequences, shared) per row; the first sequence is the row's trunk.
    let mut rows: Vec<(usize, Vec<usize>, Vec<usize>)> = Vec::new();
    for i in order {
        let ids = seqs[i].ids();
        let best = rows
            .iter()
            .enumerate()
            .map(|(r, (used, row, _))| {
                let trunk = seqs[row[0]].ids();
                // At least one token is placed, so every sequence owns a segment.
                let shared = common_prefix(ids, trunk).min(ids.len().saturating_sub(1));
                (r, ids.len() - shared, shared, *used)
            })
            .filter(|&(_, cost, _, used)| used + cost <= row_capacity)
            .min_by_key(|&(r, cost, _, _)| (cost, r));
        match best {
            Some((r, cost, shared, _)) => {
                rows[r].0 += cost;
                rows[r].1.push(i);
                rows[r].2.push(shared);
            }
            None => rows.push((ids.len(), vec![i], vec![0])),
        }
    }
    group_rows(rows, token_budget)
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
    /// Number of real (non-padding) tokens: shared prefixes count once.
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
        for (k, &i) in row.iter().enumerate() {
            let (x, m) = (seqs[i].ids(), seqs[i].mask());
            let s = mb.shared[r][k];
            let n = x.len();
            ids[off..off + n - s].copy_from_slice(&x[s..]);
            for j in 0..n.saturating_sub(1) {
                if m[j + 1] == 1 {
                    // Token j of a sequence sits at column j - s, or in the shared prefix
                    // (the row's first sequence, at column j) when j < s.
                    let at = if j < s { r * t + j } else { off + j - s };
                    positions.push(at as u32);
                    targets.push(x[j + 1]);
                    owners.push((i, j + 1));
                }
            }
            off += n - s;
            tokens += n - s;
            lens.push((n - s, s));
        }
        row_lens.push(lens);
    }
    let kept = targets.len();
    Ok(MicroBatchTensors {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        layout: SeqLayout::shared(&row_lens, t, device)?,
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

    struct Seq(Vec<u32>, Vec<u8>);
    impl TokenSeq for Seq {
        fn ids(&self) -> &[u32] {
            &self.0
        }
        fn mask(&self) -> &[u8] {
            &self.1
        }
    }

    #[test]
    fn shared_prefixes_are_placed_once_and_targets_keep_their_context() {
        let seq = |ids: &[u32], prompt: usize| {
            let mut m = vec![0u8; ids.len()];
            m[prompt..].fill(1);
            Seq(ids.to_vec(), m)
        };
        // Two groups: prompt [1 2 3 4] with three continuations (one repeats the prompt
        // only plus a token), prompt [9 8] with two, and an unrelated sequence.
        let seqs = [
            seq(&[1, 2, 3, 4, 10, 11, 12], 4),
            seq(&[1, 2, 3, 4, 20, 21], 4),
            seq(&[9, 8, 30, 31, 32], 2),
            seq(&[1, 2, 3, 4, 10, 13], 4),
            seq(&[9, 8, 40], 2),
            seq(&[5, 6, 7], 1),
        ];
        let refs: Vec<&Seq> = seqs.iter().collect();
        let plan = plan_shared_micro_batches(&refs, 12, 12);
        // Longest first: row [0, 1 (shares 4), 3 (shares 5)] = 7 + 2 + 1 = 10 tokens;
        // row [2, 4 (shares 2)] = 5 + 1, then 5 6 7 fits there (no sharing): 9 tokens.
        let rows: Vec<(Vec<usize>, Vec<usize>)> = plan
            .iter()
            .flat_map(|mb| mb.rows.iter().cloned().zip(mb.shared.iter().cloned()))
            .collect();
        assert_eq!(
            rows,
            vec![
                (vec![0, 1, 3], vec![0, 4, 5]),
                (vec![2, 4, 5], vec![0, 2, 0])
            ]
        );
        let mut owners = Vec::new();
        for mb in &plan {
            let t = build_micro_batch(&refs, mb, &Device::Cpu).unwrap();
            let ids: Vec<u32> = t.ids.flatten_all().unwrap().to_vec1().unwrap();
            let pos: Vec<f32> = t.layout.positions.flatten_all().unwrap().to_vec1().unwrap();
            let at: Vec<u32> = t.positions.to_vec1().unwrap();
            let tg: Vec<u32> = t.targets.to_vec1().unwrap();
            let mask: Vec<f32> = t.layout.mask.flatten_all().unwrap().to_vec1().unwrap();
            let w = mb.row_len;
            for (k, &(i, j)) in t.owners.iter().enumerate() {
                let x = &seqs[i].0;
                // The target is token j, predicted from a column holding token j - 1 at
                // position j - 1 ...
                assert_eq!(tg[k], x[j]);
                let c = at[k] as usize;
                assert_eq!(ids[c], x[j - 1]);
                assert_eq!(pos[c] as usize, j - 1);
                // ... that sees exactly the tokens x[..j], each at its own position.
                let (r, col) = (c / w, c % w);
                let mut seen: Vec<(usize, u32)> = (0..w)
                    .filter(|&q| mask[(r * w + col) * w + q] == 0.0)
                    .map(|q| (pos[r * w + q] as usize, ids[r * w + q]))
                    .collect();
                seen.sort_unstable();
                let want: Vec<(usize, u32)> = x[..j].iter().copied().enumerate().collect();
                assert_eq!(seen, want, "sequence {i} token {j}");
            }
            owners.extend(t.owners);
        }
        let n_targets: usize = seqs
            .iter()
            .map(|s| s.1.iter().skip(1).filter(|&&m| m == 1).count())
            .sum();
        assert_eq!(owners.len(), n_targets);
        assert_eq!(
            plan.iter().map(|m| m.rows.len() * m.row_len).max(),
            Some(10)
        );
    }
}
