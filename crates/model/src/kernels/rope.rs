//! Rotary position embedding fused with the head transpose, and its inverse (the backward).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, written_in_full, Elem};

/// Rotary embedding fused with the head transpose: `x: [b, t, h, d]` ->
/// `[b, h, t, d]` (`rotate_half` convention), `cos`/`sin: [b, t, d/2]`.
pub(crate) struct RopeBthd {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// `inverse`: read `[b, h, t, d]`, rotate by `-angle`, write `[b, t, h, d]`.
fn rope_kernel<T: Elem>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize),
    inverse: bool,
) -> Vec<T> {
    let (_, t, h, d) = dims;
    let half = d / 2;
    let mut y = written_in_full(x.len());
    // Output-major iteration: each output row is one contiguous slice of d.
    y.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
        // Output layout: inverse -> [b, t, h, d]; forward -> [b, h, t, d].
        let (bi, ti, hi) = if inverse {
            (row / (t * h), (row / h) % t, row % h)
        } else {
            (row / (h * t), row % t, (row / t) % h)
        };
        let src_row = if inverse {
            (bi * h + hi) * t + ti
        } else {
            (bi * t + ti) * h + hi
        };
        let src = &x[src_row * d..(src_row + 1) * d];
        let cs = &cos[(bi * t + ti) * half..(bi * t + ti + 1) * half];
        let sn = &sin[(bi * t + ti) * half..(bi * t + ti + 1) * half];
        for k in 0..half {
            let (c, s) = (cs[k], if inverse { -sn[k] } else { sn[k] });
            let (x1, x2) = (src[k], src[k + half]);
            out[k] = x1 * c - x2 * s;
            out[k + half] = x1 * s + x2 * c;
        }
    });
    y
}

fn rope_apply<T: Elem>(
    x: &CpuStorage,
    lx: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<(CpuStorage, Shape)> {
    let xs = slice::<T>(x, lx, "rope")?;
    let (d0, d1, d2, d) = lx.shape().dims4()?;
    // Forward input is [b, t, h, d]; inverse input is [b, h, t, d].
    let (b, t, h) = if inverse { (d0, d2, d1) } else { (d0, d1, d2) };
    let (cs, _) = cos.storage_and_layout();
    let (sn, _) = sin.storage_and_layout();
    let (candle_core::Storage::Cpu(cs), candle_core::Storage::Cpu(sn)) = (&*cs, &*sn) else {
        bail!("rope: cos/sin must be on the CPU")
    };
    let (cs, sn) = (T::cpu_storage_as_slice(cs)?, T::cpu_storage_as_slice(sn)?);
    if cos.dims() != [b, t, d / 2]
        || !cos.is_contiguous()
        || !sin.is_contiguous()
        || cos.layout().start_offset() != 0
        || sin.layout().start_offset() != 0
    {
        bail!(
            "rope: cos {:?} must be a fresh contiguous [{b}, {t}, {}]",
            cos.dims(),
            d / 2
        )
    }
    let y = rope_kernel(xs, cs, sn, (b, t, h, d), inverse);
    let shape = if inverse {
        Shape::from((b, t, h, d))
    } else {
        Shape::from((b, h, t, d))
    };
    Ok((T::to_cpu_storage_owned(y), shape))
}

impl CustomOp1 for RopeBthd {
    fn name(&self) -> &'static str {
        "rope-bthd-cpu"
    }
    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(x.dtype(), rope_apply(x, lx, &self.cos, &self.sin, false))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv = RopeInverse {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

struct RopeInverse {
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for RopeInverse {
    fn name(&self) -> &'static str {
        "rope-inverse-cpu"
    }
    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(x.dtype(), rope_apply(x, lx, &self.cos, &self.sin, true))
    }
}
