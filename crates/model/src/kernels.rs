//! Fused CPU kernels (f32 and f64) of the ops in [`crate::ops`]: each forward and each
//! backward is a single pass over its data, parallel over rows with rayon. They are
//! candle custom ops, so autograd calls the backward kernels.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use num_traits::Float;
use rayon::prelude::*;

/// Element types of the CPU kernels.
pub(crate) trait Elem: WithDType + Float + Send + Sync + std::iter::Sum {
    /// `exp(x)`: a branch-free polynomial for f32 (vectorises; within 2 ulp of `expf`,
    /// exactly 0 below -87.3), the exact `exp` for f64 (the finite-difference checks).
    fn fexp(self) -> Self;
    /// The storage's elements by value (no copy), if it holds this type.
    fn into_vec(s: CpuStorage) -> Option<Vec<Self>>;
}

impl Elem for f32 {
    fn into_vec(s: CpuStorage) -> Option<Vec<f32>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn fexp(self) -> f32 {
        // Cephes expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial.
        const ROUND: f32 = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer.
        let x = self.clamp(-87.33, 88.72);
        let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 5.000_000_1e-1;
        let e = p * r * r + r + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
        if self < -87.33 {
            0.0
        } else {
            e * scale
        }
    }
}

impl Elem for f64 {
    fn into_vec(s: CpuStorage) -> Option<Vec<f64>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn fexp(self) -> f64 {
        self.exp()
    }
}

// ---------------------------------------------------------------- vector width

/// `fast!(expr)` evaluates `expr` compiled for AVX2 (+FMA) when the CPU has it, decided at
/// run time so that the build stays portable to any x86-64; elsewhere as compiled. Only
/// the vector width changes: Rust never fuses `a * b + c` on its own and the reductions
/// below fix their summation order, so both paths give bit-identical results.
///
/// The code must be inlined into the `#[target_feature]` function to get the wider
/// vectors: helpers are `#[inline(always)]`, and the macro wraps `expr` in an
/// `#[inline(always)]` closure. (A plain closure is not inlined when large: LLVM compiles
/// it once for the baseline target and the AVX2 entry merely jumps to it; measured, every
/// kernel ran on 128-bit SSE that way until 2026-11-24.)
macro_rules! fast {
    ($body:expr) => {
        $crate::kernels::run_wide(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use fast;

/// What [`fast!`] expands to; call it through the macro.
#[inline(always)]
pub(crate) fn run_wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has every feature `wide` is compiled with.
        return unsafe { wide(f) };
    }
    f()
}

/// Independent accumulators of the reductions: the compiler keeps them in vector
/// registers (a plain sequential sum of floats cannot be vectorised).
const LANES: usize = 8;

#[inline(always)]
fn fold_lanes<T: Elem>(acc: [T; LANES], tail: T, f: impl Fn(T, T) -> T) -> T {
    let a = [
        f(acc[0], acc[4]),
        f(acc[1], acc[5]),
        f(acc[2], acc[6]),
        f(acc[3], acc[7]),
    ];
    f(f(f(a[0], a[2]), f(a[1], a[3])), tail)
}

/// `sum(a[i] * b[i])` (`b = None`: `sum(a[i])`).
#[inline(always)]
fn dot<T: Elem>(a: &[T], b: Option<&[T]>) -> T {
    let mut acc = [T::zero(); LANES];
    let mut tail = T::zero();
    let n = a.len() / LANES * LANES;
    match b {
        Some(b) => {
            let b = &b[..a.len()];
            for (ca, cb) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] = acc[l] + ca[l] * cb[l];
                }
            }
            for i in n..a.len() {
                tail = tail + a[i] * b[i];
            }
        }
        None => {
            for ca in a[..n].chunks_exact(LANES) {
                for l in 0..LANES {
                    acc[l] = acc[l] + ca[l];
                }
            }
            for &v in &a[n..] {
                tail = tail + v;
            }
        }
    }
    fold_lanes(acc, tail, |x, y| x + y)
}

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

/// Largest element (`-inf` for an empty slice; NaNs are skipped).
#[inline(always)]
fn max_of<T: Elem>(a: &[T]) -> T {
    let pick = |x: T, y: T| if y > x { y } else { x };
    let mut acc = [T::neg_infinity(); LANES];
    let n = a.len() / LANES * LANES;
    for c in a[..n].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = pick(acc[l], c[l]);
        }
    }
    let tail = a[n..].iter().fold(T::neg_infinity(), |m, &v| pick(m, v));
    fold_lanes(acc, tail, pick)
}

/// `row <- k * softmax(row)` in place.
#[inline(always)]
fn softmax_in_place<T: Elem>(row: &mut [T], k: T) {
    let mx = max_of(row);
    row.iter_mut().for_each(|v| *v = (*v - mx).fexp());
    let f = k / dot(row, None);
    row.iter_mut().for_each(|v| *v = *v * f);
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

fn cast<T: Elem>(x: f64) -> T {
    T::from(x).expect("finite constant")
}

/// Rows per rayon task: enough work to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            d => bail!("CPU kernel: unsupported dtype {d:?}"),
        }
    };
}

// ---------------------------------------------------------------- RMSNorm

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
    let mut y = vec![T::zero(); x.len()];
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
    let mut out = vec![T::zero(); x.len() + h];
    let (dx, dw_out) = out.split_at_mut(x.len());
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

// ---------------------------------------------------------------- bias

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
    let mut y = vec![T::zero(); x.len()];
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

// ---------------------------------------------------------------- softmax

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
        softmax_in_place(y, T::one())
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
    let mut y = vec![T::zero(); xs.len()];
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
    let mut dx = vec![T::zero(); ys.len()];
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

// ---------------------------------------------------------------- SwiGLU

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
    let mut y = vec![T::zero(); x.len() / 2];
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
    let mut dx = vec![T::zero(); x.len()];
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

// ---------------------------------------------------------------- RoPE

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
    let mut y = vec![T::zero(); x.len()];
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

// ---------------------------------------------------------------- cross-entropy

/// Per-row negative log-likelihood `lse(z) - z[target]` of `logits: [n, v]` against
/// `targets: [n]` (u32); rows whose target is `ignore` give 0.
pub(crate) struct Nll {
    pub ignore: Option<u32>,
}

/// `lse(z) - z[t]` of one row of logits.
fn row_nll<T: Elem>(z: &[T], t: usize) -> T {
    row_lse(z) - z[t]
}

/// `log(sum(exp(z)))` of one row.
fn row_lse<T: Elem>(z: &[T]) -> T {
    fast!({
        let mx = max_of(z);
        let mut acc = [T::zero(); LANES];
        let n = z.len() / LANES * LANES;
        for c in z[..n].chunks_exact(LANES) {
            for l in 0..LANES {
                acc[l] = acc[l] + (c[l] - mx).fexp();
            }
        }
        let tail = z[n..].iter().fold(T::zero(), |s, &x| s + (x - mx).fexp());
        mx + fold_lanes(acc, tail, |a, b| a + b).ln()
    })
}

/// Turns one row of logits into the gradient `g * (softmax(z) - onehot(t))`, in place.
fn row_nll_grad<T: Elem>(z: &mut [T], t: usize, g: T) {
    fast!(softmax_in_place(z, g));
    z[t] = z[t] - g;
}

fn check_targets(tg: &[u32], v: usize, ignore: Option<u32>) -> Result<()> {
    match tg.iter().find(|&&t| Some(t) != ignore && t as usize >= v) {
        Some(bad) => bail!("cross-entropy: target {bad} outside the vocabulary of {v}"),
        None => Ok(()),
    }
}

fn nll_fwd<T: Elem>(
    z: &CpuStorage,
    lz: &Layout,
    tg: &[u32],
    ignore: Option<u32>,
) -> Result<(CpuStorage, Shape)> {
    let zs = slice::<T>(z, lz, "cross-entropy")?;
    let (n, v) = lz.shape().dims2()?;
    check_targets(tg, v, ignore)?;
    let mut out = vec![T::zero(); n];
    out.par_iter_mut()
        .zip(zs.par_chunks(v))
        .zip(tg.par_iter())
        .for_each(|((o, z), &t)| {
            if Some(t) != ignore {
                *o = row_nll(z, t as usize);
            }
        });
    Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
}

fn u32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    slice::<u32>(s, l, "targets")
}

impl CustomOp2 for Nll {
    fn name(&self) -> &'static str {
        "nll-cpu"
    }
    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tg = u32s(t, lt)?;
        dispatch!(z.dtype(), nll_fwd(z, lz, tg, self.ignore))
    }
    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = z.detach().apply_op3_no_bwd(
            t,
            &g.contiguous()?,
            &NllBwd {
                ignore: self.ignore,
            },
        )?;
        Ok((Some(dz), None))
    }
}

struct NllBwd {
    ignore: Option<u32>,
}

fn nll_bwd<T: Elem>(
    z: &CpuStorage,
    lz: &Layout,
    tg: &[u32],
    g: &CpuStorage,
    lg: &Layout,
    ignore: Option<u32>,
) -> Result<(CpuStorage, Shape)> {
    let (zs, gs) = (
        slice::<T>(z, lz, "cross-entropy bwd")?,
        slice::<T>(g, lg, "cross-entropy bwd")?,
    );
    let (_, v) = lz.shape().dims2()?;
    let mut dz = vec![T::zero(); zs.len()];
    dz.par_chunks_mut(v)
        .zip(zs.par_chunks(v))
        .zip(tg.par_iter().zip(gs.par_iter()))
        .for_each(|((dz, z), (&t, &g))| {
            if Some(t) != ignore {
                dz.copy_from_slice(z);
                row_nll_grad(dz, t as usize, g);
            }
        });
    Ok((T::to_cpu_storage_owned(dz), lz.shape().clone()))
}

impl CustomOp3 for NllBwd {
    fn name(&self) -> &'static str {
        "nll-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tg = u32s(t, lt)?;
        dispatch!(z.dtype(), nll_bwd(z, lz, tg, g, lg, self.ignore))
    }
}

// ---------------------------------------------------------------- attention

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, every operand strided (row stride, column
/// stride), single-threaded (callers parallelise over heads) or, with [`mm_par`], on
/// rayon's threads.
#[allow(clippy::too_many_arguments)]
fn mm_with<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds the raw-pointer product below touches.
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above keep every index in bounds; dst does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn mm<T: Elem>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
    accumulate: bool,
) {
    mm_with(
        dims,
        dst,
        dst_rs,
        lhs,
        ls,
        rhs,
        rs,
        accumulate,
        gemm::Parallelism::None,
    )
}

/// `dst[m x n] = lhs * rhs` (dst row-major, contiguous) on rayon's threads.
fn mm_par<T: Elem>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
) {
    mm_with(
        dims,
        dst,
        dims.1,
        lhs,
        ls,
        rhs,
        rs,
        false,
        gemm::Parallelism::Rayon(rayon::current_num_threads()),
    )
}

/// Causal multi-head attention with RoPE and grouped key/value heads, fused into one
/// op over the packed projection `qkv: [b * s, (heads + 2 kv_heads) * head_dim]`
/// (q heads, then k heads, then v heads, as HF `q_proj`/`k_proj`/`v_proj` stack).
/// `cos`/`sin: [b, s, head_dim/2]`, `mask: [b, s, s]` additive and causal (a key after
/// its query is always masked). Output `[b * s, heads * head_dim]`. The backward pass
/// recomputes the attention probabilities block by block, so no `[s x s]` tensor per
/// head is kept between the passes.
pub(crate) struct Attention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}

const QBLOCK: usize = 64;

/// Runs `f` on the CPU slices of three constant tensors (cos, sin, mask).
fn with_consts<T: WithDType, R>(
    ts: [&Tensor; 3],
    f: impl FnOnce([&[T]; 3]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = ts
        .iter()
        .map(|t| (t.storage_and_layout(), t.is_contiguous(), t.elem_count()))
        .collect();
    let mut slices: Vec<&[T]> = Vec::with_capacity(3);
    for ((st, l), contiguous, n) in &guards {
        let candle_core::Storage::Cpu(c) = &**st else {
            bail!("attention: cos, sin and mask must be on the CPU")
        };
        if !contiguous {
            bail!("attention: cos, sin and mask must be contiguous")
        }
        let o = l.start_offset();
        slices.push(&T::cpu_storage_as_slice(c)?[o..o + n]);
    }
    f([slices[0], slices[1], slices[2]])
}

struct Geometry {
    b: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    d: usize,
}

impl Attention {
    fn geometry(&self, l: &Layout) -> Result<Geometry> {
        let (n, d) = l.shape().dims2()?;
        let (b, s, _) = self.mask.dims3()?;
        if n != b * s {
            bail!("attention: {n} qkv rows do not match the mask's {b} x {s} tokens")
        }
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        if d != (nh + 2 * nkv) * hd || nh % nkv != 0 || hd % 2 != 0 {
            bail!("attention: qkv width {d} does not match {nh} heads + 2 x {nkv} kv heads of {hd}")
        }
        if self.cos.dims() != [b, s, hd / 2]
            || self.sin.dims() != [b, s, hd / 2]
            || self.mask.dims() != [b, s, s]
        {
            bail!(
                "attention: cos {:?} / sin / mask {:?} do not match qkv {:?}",
                self.cos.dims(),
                self.mask.dims(),
                l.dims()
            )
        }
        Ok(Geometry {
            b,
            s,
            nh,
            nkv,
            hd,
            d,
        })
    }
}

/// Rows of one head of `qkv` (batch `bi`, column offset `col`) with RoPE applied (or
/// just copied when `cs` is `None`): `[s, hd]`.
#[inline(always)]
fn head_rows<T: Elem>(
    qkv: &[T],
    g: &Geometry,
    bi: usize,
    col: usize,
    cs: Option<(&[T], &[T])>,
) -> Vec<T> {
    let (s, hd, half) = (g.s, g.hd, g.hd / 2);
    let mut out = vec![T::zero(); s * hd];
    for t in 0..s {
        let src = &qkv[(bi * s + t) * g.d + col..(bi * s + t) * g.d + col + hd];
        let dst = &mut out[t * hd..(t + 1) * hd];
        match cs {
            None => dst.copy_from_slice(src),
            Some((cos, sin)) => {
                let (c, sn) = (
                    &cos[(bi * s + t) * half..(bi * s + t + 1) * half],
                    &sin[(bi * s + t) * half..(bi * s + t + 1) * half],
                );
                for k in 0..half {
                    dst[k] = src[k] * c[k] - src[k + half] * sn[k];
                    dst[k + half] = src[k] * sn[k] + src[k + half] * c[k];
                }
            }
        }
    }
    out
}

/// Inverse RoPE of a head's gradient rows, in place.
#[inline(always)]
fn unrope<T: Elem>(x: &mut [T], g: &Geometry, bi: usize, cos: &[T], sin: &[T]) {
    let (s, hd, half) = (g.s, g.hd, g.hd / 2);
    for t in 0..s {
        let row = &mut x[t * hd..(t + 1) * hd];
        let (c, sn) = (
            &cos[(bi * s + t) * half..(bi * s + t + 1) * half],
            &sin[(bi * s + t) * half..(bi * s + t + 1) * half],
        );
        for k in 0..half {
            let (a, b) = (row[k], row[k + half]);
            row[k] = a * c[k] + b * sn[k];
            row[k + half] = -a * sn[k] + b * c[k];
        }
    }
}

/// Probabilities of query rows `r0..r1` against keys `0..r1` (causal), in `p: [rows, r1]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn probs_block<T: Elem>(
    p: &mut [T],
    q: &[T],
    k: &[T],
    mask: &[T],
    g: &Geometry,
    bi: usize,
    (r0, r1): (usize, usize),
    scale: T,
) {
    let (hd, s, l) = (g.hd, g.s, r1);
    let rows = r1 - r0;
    mm(
        (rows, l, hd),
        p,
        l,
        &q[r0 * hd..],
        (hd, 1),
        k,
        (1, hd),
        false,
    );
    for (i, prow) in p.chunks_mut(l).take(rows).enumerate() {
        let mrow = &mask[(bi * s + r0 + i) * s..(bi * s + r0 + i) * s + l];
        for j in 0..l {
            prow[j] = prow[j] * scale + mrow[j];
        }
        softmax_in_place(prow, T::one());
    }
}

fn attn_fwd<T: Elem>(op: &Attention, qkv: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    with_consts([&op.cos, &op.sin, &op.mask], |[cos, sin, mask]| {
        attn_fwd_with::<T>(op, qkv, l, cos, sin, mask)
    })
}

fn attn_fwd_with<T: Elem>(
    op: &Attention,
    qkv: &CpuStorage,
    l: &Layout,
    cos: &[T],
    sin: &[T],
    mask: &[T],
) -> Result<(CpuStorage, Shape)> {
    let g = op.geometry(l)?;
    let x = slice::<T>(qkv, l, "attention")?;
    let (s, hd, nh, grp) = (g.s, g.hd, g.nh, g.nh / g.nkv);
    let scale: T = cast(op.scale);
    let heads: Vec<Vec<T>> = (0..g.b * nh)
        .into_par_iter()
        .map(|task| {
            fast!({
                let (bi, h) = (task / nh, task % nh);
                let j = h / grp;
                let q = head_rows(x, &g, bi, h * hd, Some((cos, sin)));
                let k = head_rows(x, &g, bi, (nh + j) * hd, Some((cos, sin)));
                let v = &x[(bi * s) * g.d + (nh + g.nkv + j) * hd..];
                let mut o = vec![T::zero(); s * hd];
                let mut p = vec![T::zero(); QBLOCK * s];
                for r0 in (0..s).step_by(QBLOCK) {
                    let r1 = (r0 + QBLOCK).min(s);
                    probs_block(&mut p, &q, &k, mask, &g, bi, (r0, r1), scale);
                    mm(
                        (r1 - r0, hd, r1),
                        &mut o[r0 * hd..],
                        hd,
                        &p,
                        (r1, 1),
                        v,
                        (g.d, 1),
                        false,
                    );
                }
                o
            })
        })
        .collect();
    let mut out = vec![T::zero(); g.b * s * nh * hd];
    for (task, o) in heads.iter().enumerate() {
        let (bi, h) = (task / nh, task % nh);
        for t in 0..s {
            let row = (bi * s + t) * nh * hd + h * hd;
            out[row..row + hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
    }
    Ok((
        T::to_cpu_storage_owned(out),
        Shape::from((g.b * s, nh * hd)),
    ))
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention-cpu"
    }
    fn cpu_fwd(&self, qkv: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(qkv.dtype(), attn_fwd(self, qkv, l))
    }
    fn bwd(&self, qkv: &Tensor, _out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let bwd = AttentionBwd(self);
        Ok(Some(qkv.detach().apply_op2_no_bwd(&g.contiguous()?, &bwd)?))
    }
}

/// Gradient of [`Attention`] with respect to `qkv`, given the output gradient.
struct AttentionBwd<'a>(&'a Attention);

fn attn_bwd<T: Elem>(
    op: &Attention,
    qkv: &CpuStorage,
    l: &Layout,
    go: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    with_consts([&op.cos, &op.sin, &op.mask], |[cos, sin, mask]| {
        attn_bwd_with::<T>(op, qkv, l, go, lg, cos, sin, mask)
    })
}

#[allow(clippy::too_many_arguments)]
fn attn_bwd_with<T: Elem>(
    op: &Attention,
    qkv: &CpuStorage,
    l: &Layout,
    go: &CpuStorage,
    lg: &Layout,
    cos: &[T],
    sin: &[T],
    mask: &[T],
) -> Result<(CpuStorage, Shape)> {
    let g = op.geometry(l)?;
    let x = slice::<T>(qkv, l, "attention bwd")?;
    let dout = slice::<T>(go, lg, "attention bwd")?;
    let (s, hd, nh, nkv, grp) = (g.s, g.hd, g.nh, g.nkv, g.nh / g.nkv);
    let od = nh * hd;
    let scale: T = cast(op.scale);
    // One task per (batch, kv head): it owns dK and dV of that head and dQ of its group.
    let parts: Vec<(Vec<Vec<T>>, Vec<T>, Vec<T>)> = (0..g.b * nkv)
        .into_par_iter()
        .map(|task| {
            fast!({
                let (bi, j) = (task / nkv, task % nkv);
                let k = head_rows(x, &g, bi, (nh + j) * hd, Some((cos, sin)));
                let v = &x[(bi * s) * g.d + (nh + nkv + j) * hd..];
                let mut dk = vec![T::zero(); s * hd];
                let mut dv = vec![T::zero(); s * hd];
                let mut p = vec![T::zero(); QBLOCK * s];
                let mut dp = vec![T::zero(); QBLOCK * s];
                let mut dqs = Vec::with_capacity(grp);
                for h in j * grp..(j + 1) * grp {
                    let q = head_rows(x, &g, bi, h * hd, Some((cos, sin)));
                    let mut dq = vec![T::zero(); s * hd];
                    let dob = &dout[(bi * s) * od + h * hd..];
                    for r0 in (0..s).step_by(QBLOCK) {
                        let r1 = (r0 + QBLOCK).min(s);
                        let (rows, lk) = (r1 - r0, r1);
                        probs_block(&mut p, &q, &k, mask, &g, bi, (r0, r1), scale);
                        let dob_blk = &dob[r0 * od..];
                        // dV[0..lk] += P^T dO
                        mm(
                            (lk, hd, rows),
                            &mut dv,
                            hd,
                            &p,
                            (1, lk),
                            dob_blk,
                            (od, 1),
                            true,
                        );
                        // dP = dO V^T
                        mm(
                            (rows, lk, hd),
                            &mut dp,
                            lk,
                            dob_blk,
                            (od, 1),
                            v,
                            (1, g.d),
                            false,
                        );
                        // dS = P (dP - rowdot(dP, P)) * scale
                        for (prow, dprow) in p.chunks_mut(lk).zip(dp.chunks(lk)).take(rows) {
                            let d = dot(prow, Some(dprow));
                            for c in 0..lk {
                                prow[c] = prow[c] * (dprow[c] - d) * scale;
                            }
                        }
                        // dQ[r0..r1] = dS K[0..lk] ; dK[0..lk] += dS^T Q[r0..r1]
                        mm(
                            (rows, hd, lk),
                            &mut dq[r0 * hd..],
                            hd,
                            &p,
                            (lk, 1),
                            &k,
                            (hd, 1),
                            false,
                        );
                        mm(
                            (lk, hd, rows),
                            &mut dk,
                            hd,
                            &p,
                            (1, lk),
                            &q[r0 * hd..],
                            (hd, 1),
                            true,
                        );
                    }
                    unrope(&mut dq, &g, bi, cos, sin);
                    dqs.push(dq);
                }
                unrope(&mut dk, &g, bi, cos, sin);
                (dqs, dk, dv)
            })
        })
        .collect();
    let mut dx = vec![T::zero(); x.len()];
    for (task, (dqs, dk, dv)) in parts.iter().enumerate() {
        let (bi, j) = (task / nkv, task % nkv);
        for t in 0..s {
            let row = (bi * s + t) * g.d;
            for (i, dq) in dqs.iter().enumerate() {
                let h = j * grp + i;
                dx[row + h * hd..row + (h + 1) * hd].copy_from_slice(&dq[t * hd..(t + 1) * hd]);
            }
            dx[row + (nh + j) * hd..row + (nh + j + 1) * hd]
                .copy_from_slice(&dk[t * hd..(t + 1) * hd]);
            dx[row + (nh + nkv + j) * hd..row + (nh + nkv + j + 1) * hd]
                .copy_from_slice(&dv[t * hd..(t + 1) * hd]);
        }
    }
    Ok((T::to_cpu_storage_owned(dx), l.shape().clone()))
}

impl CustomOp2 for AttentionBwd<'_> {
    fn name(&self) -> &'static str {
        "attention-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        l: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(qkv.dtype(), attn_bwd(self.0, qkv, l, g, lg))
    }
}

#[cfg(test)]
mod tests {
    use super::Elem;

    #[test]
    fn fast_exp_is_within_two_ulp_of_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (x.fexp(), x.exp());
            worst = worst.max(((a - b) / b).abs() as f64);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(f32::NEG_INFINITY.fexp(), 0.0);
        assert_eq!((-100f32).fexp(), 0.0);
        assert_eq!(0f32.fexp(), 1.0);
    }
}

// ---------------------------------------------------------------- linear + cross-entropy

/// Per-row negative log-likelihood of `targets` under logits `h @ w^T`
/// (`h: [n, hidden]`, `w: [vocab, hidden]`), fused so that the logits never become a
/// graph tensor: the forward keeps them privately for the backward, which turns them
/// into `dZ` in place and returns `dh = dZ w` and `dw = dZ^T h`.
pub(crate) struct LinearNll {
    pub ignore: Option<u32>,
    pub logits: CachedLogits,
}

/// The logits `[n, vocab]` of a [`LinearNll`] forward and their per-row log-sum-exp `[n]`,
/// kept for its backward.
pub(crate) type CachedLogits = std::sync::Arc<std::sync::Mutex<Option<(CpuStorage, CpuStorage)>>>;

fn linear_nll_fwd<T: Elem>(
    op: &LinearNll,
    h: &CpuStorage,
    lh: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    tg: &[u32],
) -> Result<(CpuStorage, Shape)> {
    let (hs, ws) = (
        slice::<T>(h, lh, "linear-nll")?,
        slice::<T>(w, lw, "linear-nll")?,
    );
    let (n, hd) = lh.shape().dims2()?;
    let (v, hd2) = lw.shape().dims2()?;
    if hd != hd2 || tg.len() != n {
        bail!(
            "linear-nll: hidden {:?}, weight {:?} and {} targets do not match",
            lh.dims(),
            lw.dims(),
            tg.len()
        )
    }
    check_targets(tg, v, op.ignore)?;
    let mut z = vec![T::zero(); n * v];
    if n > 0 {
        mm_par((n, v, hd), &mut z, hs, (hd, 1), ws, (1, hd));
    }
    let lse: Vec<T> = z.par_chunks(v).map(row_lse).collect();
    let out: Vec<T> = (0..n)
        .map(|i| match tg[i] {
            t if Some(t) == op.ignore => T::zero(),
            t => lse[i] - z[i * v + t as usize],
        })
        .collect();
    *op.logits.lock().expect("lock") =
        Some((T::to_cpu_storage_owned(z), T::to_cpu_storage_owned(lse)));
    Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
}

impl CustomOp3 for LinearNll {
    fn name(&self) -> &'static str {
        "linear-nll-cpu"
    }
    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tg = u32s(t, lt)?;
        dispatch!(h.dtype(), linear_nll_fwd(self, h, lh, w, lw, tg))
    }
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, hd) = h.dims2()?;
        let v = w.dim(0)?;
        // The row gradients travel with the targets: [n] u32 + [n] grad in one op call.
        let bwd = LinearNllBwd {
            ignore: self.ignore,
            logits: self.logits.clone(),
            targets: t.clone(),
        };
        let both = h
            .detach()
            .apply_op3_no_bwd(&w.detach(), &g.contiguous()?, &bwd)?;
        let dh = both.narrow(0, 0, n * hd)?.reshape((n, hd))?;
        let dw = both.narrow(0, n * hd, v * hd)?.reshape((v, hd))?;
        Ok((Some(dh), Some(dw), None))
    }
}

struct LinearNllBwd {
    ignore: Option<u32>,
    logits: CachedLogits,
    targets: Tensor,
}

fn linear_nll_bwd<T: Elem>(
    op: &LinearNllBwd,
    h: &CpuStorage,
    lh: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    g: &CpuStorage,
    lg: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (hs, ws, gs) = (
        slice::<T>(h, lh, "linear-nll bwd")?,
        slice::<T>(w, lw, "linear-nll bwd")?,
        slice::<T>(g, lg, "linear-nll bwd")?,
    );
    let (n, hd) = lh.shape().dims2()?;
    let (v, _) = lw.shape().dims2()?;
    let (tst, tl) = op.targets.storage_and_layout();
    let candle_core::Storage::Cpu(tcpu) = &*tst else {
        bail!("linear-nll: targets must be on the CPU")
    };
    let tg = u32s(tcpu, tl)?;
    // The forward's logits, or recomputed when this backward runs a second time.
    let (mut z, lse): (Vec<T>, Vec<T>) = match op.logits.lock().expect("lock").take() {
        Some((z, lse)) => match (T::into_vec(z), T::into_vec(lse)) {
            (Some(z), Some(lse)) => (z, lse),
            _ => bail!("linear-nll: cached logits have another dtype"),
        },
        None => {
            let mut z = vec![T::zero(); n * v];
            if n > 0 {
                mm_par((n, v, hd), &mut z, hs, (hd, 1), ws, (1, hd));
            }
            let lse = z.par_chunks(v).map(row_lse).collect();
            (z, lse)
        }
    };
    // dZ = g * (exp(z - lse) - onehot(t)), in place: one pass over the logits.
    z.par_chunks_mut(v)
        .zip(tg.par_iter().zip(gs.par_iter().zip(lse.par_iter())))
        .for_each(|(z, (&t, (&g, &lse)))| {
            if Some(t) == op.ignore {
                z.iter_mut().for_each(|x| *x = T::zero());
            } else {
                fast!(z.iter_mut().for_each(|x| *x = (*x - lse).fexp() * g));
                z[t as usize] = z[t as usize] - g;
            }
        });
    let mut out = vec![T::zero(); n * hd + v * hd];
    if n > 0 {
        let (dh, dw) = out.split_at_mut(n * hd);
        mm_par((n, hd, v), dh, &z, (v, 1), ws, (hd, 1));
        mm_par((v, hd, n), dw, &z, (1, v), hs, (hd, 1));
    }
    let len = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
}

impl CustomOp3 for LinearNllBwd {
    fn name(&self) -> &'static str {
        "linear-nll-bwd-cpu"
    }
    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(h.dtype(), linear_nll_bwd(self, h, lh, w, lw, g, lg))
    }
}

// ---------------------------------------------------------------- decoding attention

/// Attention of a few new query positions to a KV cache (inference only): `q: [b, heads, s,
/// head_dim]` (roped, contiguous), `k`, `v: [b, kv_heads, len, head_dim]` views whose rows
/// are contiguous (e.g. the filled part of a preallocated cache), `mask: [b, s, len]`
/// additive. Output `[b, s, heads, head_dim]`. Each task is one (row, kv head) pair: it
/// streams that head's keys and values once for all the query heads sharing it, where a
/// batched matrix product would first copy (pack) them.
pub(crate) struct DecodeAttention {
    pub mask: Tensor,
    pub scale: f64,
}

/// The storage of a `[b, h, len, d]` view whose `d` elements per position are contiguous
/// (any batch, head and position strides), with those strides and its start offset.
struct CacheView<'a, T> {
    data: &'a [T],
    batch: usize,
    head: usize,
    pos: usize,
    start: usize,
}

impl<'a, T: WithDType> CacheView<'a, T> {
    fn new(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Self> {
        let st = l.stride();
        if st[3] != 1 {
            bail!("decode attention: {what} must have contiguous head_dim (strides {st:?})")
        }
        Ok(Self {
            data: T::cpu_storage_as_slice(s)?,
            batch: st[0],
            head: st[1],
            pos: st[2],
            start: l.start_offset(),
        })
    }

    /// Position `j` of row `b`, head `h`: `d` elements.
    #[inline(always)]
    fn at(&self, b: usize, h: usize, j: usize, d: usize) -> &'a [T] {
        let o = self.start + b * self.batch + h * self.head + j * self.pos;
        &self.data[o..o + d]
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_attn_fwd<T: Elem>(
    op: &DecodeAttention,
    q: &CpuStorage,
    lq: &Layout,
    k: &CpuStorage,
    lk: &Layout,
    v: &CpuStorage,
    lv: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let qs = slice::<T>(q, lq, "decode attention q")?;
    let (b, nh, s, hd) = lq.shape().dims4()?;
    let (bk, nkv, len, hdk) = lk.shape().dims4()?;
    if lv.dims() != lk.dims() || bk != b || hdk != hd || nkv == 0 || nh % nkv != 0 {
        bail!(
            "decode attention: q {:?}, k {:?}, v {:?} do not fit together",
            lq.dims(),
            lk.dims(),
            lv.dims()
        )
    }
    if op.mask.dims() != [b, s, len] || !op.mask.is_contiguous() {
        bail!(
            "decode attention: mask {:?} must be a contiguous [{b}, {s}, {len}]",
            op.mask.dims()
        )
    }
    let (kc, vc) = (
        CacheView::<T>::new(k, lk, "k")?,
        CacheView::<T>::new(v, lv, "v")?,
    );
    let (mst, ml) = op.mask.storage_and_layout();
    let candle_core::Storage::Cpu(mc) = &*mst else {
        bail!("decode attention: the mask must be on the CPU")
    };
    let ms = &T::cpu_storage_as_slice(mc)?[ml.start_offset()..ml.start_offset() + b * s * len];
    let g = nh / nkv;
    let nq = s * g;
    let scale: T = cast(op.scale);
    // One task per (row, kv head): its nq query vectors, in (position, group) order.
    let parts: Vec<Vec<T>> = (0..b * nkv)
        .into_par_iter()
        .map(|task| {
            let (bi, h) = (task / nkv, task % nkv);
            let qv = |qi: usize| {
                let (i, gi) = (qi / g, qi % g);
                let o = ((bi * nh + h * g + gi) * s + i) * hd;
                &qs[o..o + hd]
            };
            fast!({
                let mut p = vec![T::zero(); nq * len];
                for j in 0..len {
                    let kr = kc.at(bi, h, j, hd);
                    for qi in 0..nq {
                        p[qi * len + j] = dot(qv(qi), Some(kr));
                    }
                }
                for qi in 0..nq {
                    let i = qi / g;
                    let m = &ms[(bi * s + i) * len..(bi * s + i + 1) * len];
                    let row = &mut p[qi * len..(qi + 1) * len];
                    for (x, &mv) in row.iter_mut().zip(m) {
                        *x = *x * scale + mv;
                    }
                    softmax_in_place(row, T::one());
                }
                let mut out = vec![T::zero(); nq * hd];
                for j in 0..len {
                    let vr = vc.at(bi, h, j, hd);
                    for qi in 0..nq {
                        let pj = p[qi * len + j];
                        for (o, &x) in out[qi * hd..(qi + 1) * hd].iter_mut().zip(vr) {
                            *o = *o + pj * x;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut y = vec![T::zero(); b * s * nh * hd];
    for (task, part) in parts.iter().enumerate() {
        let (bi, h) = (task / nkv, task % nkv);
        for qi in 0..nq {
            let (i, gi) = (qi / g, qi % g);
            let o = ((bi * s + i) * nh + h * g + gi) * hd;
            y[o..o + hd].copy_from_slice(&part[qi * hd..(qi + 1) * hd]);
        }
    }
    Ok((T::to_cpu_storage_owned(y), Shape::from((b, s, nh, hd))))
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention-cpu"
    }
    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(q.dtype(), decode_attn_fwd(self, q, lq, k, lk, v, lv))
    }
}
