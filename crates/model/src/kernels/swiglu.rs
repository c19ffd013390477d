//! SwiGLU (`silu(gate) * up`) of a packed gate/up projection, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, written_in_full, Elem};

/// `silu(gate) * up` where `gate_up = [.., 2 * i]` holds gate then up in each row.
pub(crate) struct SwiGlu;

#[inline(always)]
fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).fexp())
}

fn swiglu_fwd<T: Elem>(gu: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(gu, l, "swiglu")?;
    let dims = l.dims();
    let i2 = *dims.last().unwrap_or(&0);
    if i2 % 2 != 0 {
        bail!("swiglu: last dimension {i2} is odd")
    }
    let i = i2 / 2;
    let mut y = written_in_full(x.len() / 2);
    y.par_chunks_mut(i)
        .zip(x.par_chunks(i2))
        .for_each(|(y, x)| {
            fast!({
                let (g, u) = x.split_at(i);
                for k in 0..i {
                    y[k] = g[k] * sigmoid(g[k]) * u[k];
                }
            })
        });
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = i;
    Ok((T::to_cpu_storage_owned(y), Shape::from(out)))
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-cpu"
    }
    fn cpu_fwd(&self, gu: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(gu.dtype(), swiglu_fwd(gu, l))
    }
    fn bwd(&self, gu: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            gu.detach().apply_op2_no_bwd(&g.contiguous()?, &SwiGluBwd)?,
        ))
    }
}

struct SwiGluBwd;

fn swiglu_bwd<T: Elem>(
    gu: &CpuStorage,
    l: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, gs) = (
        slice::<T>(gu, l, "swiglu bwd")?,
        slice::<T>(g, lg, "swiglu bwd")?,
    );
    let i2 = *l.dims().last().unwrap_or(&0);
    let i = i2 / 2;
    let mut dx = written_in_full(x.len());
    dx.par_chunks_mut(i2)
        .zip(x.par_chunks(i2).zip(gs.par_chunks(i)))
        .for_each(|(dx, (x, g))| {
            fast!({
                let (a, u) = x.split_at(i);
                let (da, du) = dx.split_at_mut(i);
                for k in 0..i {
                    let s = sigmoid(a[k]);
                    let silu = a[k] * s;
                    da[k] = g[k] * u[k] * s * (T::one() + a[k] * (T::one() - s));
                    du[k] = g[k] * silu;
                }
            })
        });
    Ok((T::to_cpu_storage_owned(dx), l.shape().clone()))
}

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        gu: &CpuStorage,
        l: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(gu.dtype(), swiglu_bwd(gu, l, g, lg))
    }
}
