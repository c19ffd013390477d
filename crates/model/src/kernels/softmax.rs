//! Softmax over the last dimension, plain or scaled with an additive mask, and its backward.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cast, dot, slice, softmax_in_place, written_in_full, Elem};

/// `softmax(scale * x + mask)` over the last dimension. `x: [b, h, t, s]`; the optional
/// mask `[b, t, s]` is shared by the `h` heads (no gradient flows into it).
pub(crate) struct MaskedSoftmax {
    pub scale: f64,
}

fn softmax_rows<T: Elem>(y: &mut [T], x: &[T], m: Option<&[T]>, scale: T) {
    fast!({
        match m {
            Some(m) => {
                for i in 0..x.len() {
                    y[i] = x[i] * scale + m[i];
                }
            }
            None => {
                for i in 0..x.len() {
                    y[i] = x[i] * scale;
                }
            }
        }
        softmax_in_place(y, T::one());
    })
}

fn softmax_fwd<T: Elem>(
    x: &CpuStorage,
    lx: &Layout,
    mask: Option<(&CpuStorage, &Layout)>,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let xs = slice::<T>(x, lx, "softmax")?;
    let s = *lx.dims().last().unwrap_or(&1);
    let mut y = written_in_full(xs.len());
    let scale: T = cast(scale);
    match mask {
        None => y
            .par_chunks_mut(s)
            .zip(xs.par_chunks(s))
            .for_each(|(y, x)| softmax_rows(y, x, None, scale)),
        Some((m, lm)) => {
            let ms = slice::<T>(m, lm, "softmax mask")?;
            let (b, h, t, s2) = lx.shape().dims4()?;
            if lm.dims() != [b, t, s2] {
                bail!(
                    "masked softmax: mask {:?} does not match scores {:?}",
                    lm.dims(),
                    lx.dims()
                )
            }
            y.par_chunks_mut(s)
                .zip(xs.par_chunks(s))
                .enumerate()
                .for_each(|(row, (y, x))| {
                    let (bi, ti) = (row / (h * t), row % t);
                    let mrow = &ms[(bi * t + ti) * s..(bi * t + ti + 1) * s];
                    softmax_rows(y, x, Some(mrow), scale)
                });
        }
    }
    Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax-cpu"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        m: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(x.dtype(), softmax_fwd(x, lx, Some((m, lm)), self.scale))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _m: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(
                y.detach()
                    .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd { scale: self.scale })?,
            ),
            None,
        ))
    }
}

/// Softmax over the last dimension (no mask, no scale).
pub(crate) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-cpu"
    }
    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(x.dtype(), softmax_fwd(x, lx, None, 1.0))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.detach().apply_op2_no_bwd(
            &g.contiguous()?,
            &SoftmaxBwd { scale: 1.0 },
        )?))
    }
}

/// `dx = scale * y * (g - sum(g * y))` per row.
struct SoftmaxBwd {
    scale: f64,
}

fn softmax_bwd<T: Elem>(
    y: &CpuStorage,
    ly: &Layout,
    g: &CpuStorage,
    lg: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let (ys, gs) = (
        slice::<T>(y, ly, "softmax bwd")?,
        slice::<T>(g, lg, "softmax bwd")?,
    );
    let s = *ly.dims().last().unwrap_or(&1);
    let mut dx = written_in_full(ys.len());
    let scale: T = cast(scale);
    dx.par_chunks_mut(s)
        .zip(ys.par_chunks(s).zip(gs.par_chunks(s)))
        .for_each(|(dx, (y, g))| {
            fast!({
                let d = dot(y, Some(g));
                for i in 0..s {
                    dx[i] = scale * y[i] * (g[i] - d);
                }
            })
        });
    Ok((T::to_cpu_storage_owned(dx), ly.shape().clone()))
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(y.dtype(), softmax_bwd(y, ly, g, lg, self.scale))
    }
}
