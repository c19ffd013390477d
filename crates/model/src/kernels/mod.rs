//! Fused CPU kernels (f32 and f64) of the ops in [`crate::ops`]: each forward and each
//! backward is a single pass over its data, parallel over rows with rayon. They are
//! candle custom ops, so autograd calls the backward kernels.
//!
//! | op family | file |
//! |---|---|
//! | shared: element types, run-time AVX2 (`fast!`), reductions, dtype `dispatch!`, gemm | `mod.rs` |
//! | RMSNorm | `norm.rs` |
//! | bias add (its backward: a column sum) | `bias.rs` |
//! | softmax, plain and scaled + masked | `softmax.rs` |
//! | SwiGLU | `swiglu.rs` |
//! | RoPE fused with the head transpose | `rope.rs` |
//! | cross-entropy, plain and fused with the output projection (`LinearNll`) | `cross_entropy.rs` |
//! | fused causal prefill attention (forward and backward) | `attention.rs` |
//! | attention of new positions to a KV cache (decoding, inference only) | `decode_attention.rs` |
//! | sum of squares of a gradient (the global gradient norm) | `reduce.rs` |
//!
//! The submodules are declared after the macros `fast!` and `dispatch!`, so both are in
//! (textual) scope in every file; the shared helpers here are private, visible to the
//! submodules only.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};
use num_traits::Float;

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

// ---------------------------------------------------------------- matrix products

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

// ---------------------------------------------------------------- op families

mod attention;
mod bias;
mod cross_entropy;
mod decode_attention;
mod norm;
mod reduce;
mod rope;
mod softmax;
mod swiglu;

pub(crate) use attention::Attention;
pub(crate) use bias::BiasAdd;
pub(crate) use cross_entropy::{LinearNll, Nll};
pub(crate) use decode_attention::DecodeAttention;
pub(crate) use norm::RmsNorm;
pub(crate) use reduce::sum_squares_f32;
pub(crate) use rope::RopeBthd;
pub(crate) use softmax::{MaskedSoftmax, Softmax};
pub(crate) use swiglu::SwiGlu;

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
