//! Token-budget micro-batches: how one optimizer step's sequences are split into
//! forward/backward passes that each fit a memory budget, packed or one a row.

use tooltrain_model::pack_rows;

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
