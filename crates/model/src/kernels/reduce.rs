//! Reductions over whole tensors: the sum of squares of a gradient (for its global norm).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{dot, slice};

/// `sum(x^2)` of an f32 tensor, in f64, without copying it when it is contiguous on the
/// CPU (chunks summed in f32 in parallel, the chunk sums added in f64 in order, so the
/// result does not depend on the thread count). `None` for other tensors.
pub(crate) fn sum_squares_f32(x: &Tensor) -> Option<f64> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return None;
    }
    let (st, l) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*st else {
        return None;
    };
    let xs = slice::<f32>(cpu, l, "sum of squares").ok()?;
    let parts: Vec<f64> = xs
        .par_chunks(4096)
        .map(|c| fast!(dot(c, Some(c))) as f64)
        .collect();
    Some(parts.iter().sum())
}
