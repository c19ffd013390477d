//! RMSNorm over the last dimension, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cast, dot, rows_per_task, slice, written_in_full, Elem};

pub(crate) struct RmsNorm {
    pub eps: f64,
}

fn rms_fwd<T: Elem>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (
        slice::<T>(x, lx, "rms-norm")?,
        slice::<T>(w, lw, "rms-norm")?,
    );
    let h = w.len();
    let mut y = written_in_full(x.len());
    let rpt = rows_per_task(h);
    y.par_chunks_mut(h * rpt)
        .zip(x.par_chunks(h * rpt))
        .for_each(|(y, x)| {
            fast!({
                for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
                    let ms: T = dot(x, Some(x)) / cast(h as f64);
                    let r = T::one() / (ms + cast(eps)).sqrt();
                    for i in 0..h {
                        y[i] = x[i] * r * w[i];
                    }
                }
            })
        });
    Ok((T::to_cpu_storage_owned(y), lx.shape().clone()))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-cpu"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lx.dims().last() != lw.dims().last() || lw.dims().len() != 1 {
            bail!(
                "rms-norm: weight {:?} does not match input {:?}",
                lw.dims(),
                lx.dims()
            )
        }
        dispatch!(x.dtype(), rms_fwd(x, lx, w, lw, self.eps))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.dim(0)?;
        let rows = x.elem_count() / h;
        let both = x.detach().apply_op3_no_bwd(
            &w.detach(),
            &g.contiguous()?,
            &RmsNormBwd { eps: self.eps },
        )?;
        let dx = both.narrow(0, 0, rows * h)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows * h, h)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Output: `dx` (flattened) followed by `dw`.
struct RmsNormBwd {
    eps: f64,
}

fn rms_bwd<T: Elem>(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    g: &CpuStorage,
    lg: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let (x, w, g) = (
        slice::<T>(x, lx, "rms-norm")?,
        slice::<T>(w, lw, "rms-norm")?,
        slice::<T>(g, lg, "rms-norm")?,
    );
    let h = w.len();
    let mut out = written_in_full(x.len() + h);
    let (dx, dw_out) = out.split_at_mut(x.len());
    dw_out.fill(T::zero());
    let rpt = rows_per_task(h);
    let partial: Vec<Vec<T>> = dx
        .par_chunks_mut(h * rpt)
        .zip(x.par_chunks(h * rpt).zip(g.par_chunks(h * rpt)))
        .map(|(dx, (x, g))| {
            fast!({
                let mut dw = vec![T::zero(); h];
                let mut gw = vec![T::zero(); h];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let ms: T = dot(x, Some(x)) / cast(h as f64);
                    let r = T::one() / (ms + cast(eps)).sqrt();
                    for i in 0..h {
                        gw[i] = g[i] * w[i];
                    }
                    let r3dot = r * r * r * (dot(&gw, Some(x)) / cast(h as f64));
                    for i in 0..h {
                        dx[i] = r * gw[i] - x[i] * r3dot;
                        dw[i] = dw[i] + g[i] * x[i] * r;
                    }
                }
                dw
            })
        })
        .collect();
    for p in partial {
        for i in 0..h {
            dw_out[i] = dw_out[i] + p[i];
        }
    }
    let n = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(x.dtype(), rms_bwd(x, lx, w, lw, g, lg, self.eps))
    }
}
