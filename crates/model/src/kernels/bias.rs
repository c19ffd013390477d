//! Bias add over rows; its backward is a column sum.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{rows_per_task, slice, written_in_full, Elem};

/// `x + bias` row by row (`x: [n, d]`, `bias: [d]`); its backward sums the gradient's
/// rows into the bias gradient in one pass (candle's generic reduction over the leading
/// dimension is several times slower).
pub(crate) struct BiasAdd;

fn bias_fwd<T: Elem>(
    x: &CpuStorage,
    lx: &Layout,
    b: &CpuStorage,
    lb: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, b) = (slice::<T>(x, lx, "bias")?, slice::<T>(b, lb, "bias")?);
    let d = b.len();
    let mut y = written_in_full(x.len());
    let rpt = rows_per_task(d);
    y.par_chunks_mut(d * rpt)
        .zip(x.par_chunks(d * rpt))
        .for_each(|(y, x)| {
            fast!({
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    for i in 0..d {
                        y[i] = x[i] + b[i];
                    }
                }
            })
        });
    Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add-cpu"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lx.dims().len() != 2 || lb.dims() != [lx.dims()[1]] {
            bail!(
                "bias-add: bias {:?} does not match input {:?}",
                lb.dims(),
                lx.dims()
            )
        }
        dispatch!(x.dtype(), bias_fwd(x, lx, b, lb))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = g.contiguous()?.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(g.clone()), Some(db)))
    }
}

/// Sum of the rows of `[n, d]`: `[d]`.
struct ColumnSum;

fn colsum<T: Elem>(g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(g, lg, "column sum")?;
    let d = *lg.dims().last().unwrap_or(&1);
    let rpt = rows_per_task(d);
    let partial: Vec<Vec<T>> = g
        .par_chunks(d * rpt)
        .map(|g| {
            fast!({
                let mut acc = vec![T::zero(); d];
                for row in g.chunks(d) {
                    for i in 0..d {
                        acc[i] = acc[i] + row[i];
                    }
                }
                acc
            })
        })
        .collect();
    let mut out = vec![T::zero(); d];
    for p in partial {
        for i in 0..d {
            out[i] = out[i] + p[i];
        }
    }
    Ok((T::to_cpu_storage_owned(out), Shape::from(d)))
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum-cpu"
    }
    fn cpu_fwd(&self, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(g.dtype(), colsum(g, lg))
    }
}
