//! Fused CPU kernels (f32 and f64) of the ops in [`crate::ops`]: each forward and each
//! backward is a single pass over its data, parallel over rows with rayon. They are
//! candle custom ops, so autograd calls the backward kernels.
//!
//! | op family | file |
//! |---|---|
//! | shared: element types, run-time SIMD levels (`fast!`: baseline, AVX2, AVX-512), reductions, dtype `dispatch!`, gemm | `mod.rs` |
//! | RMSNorm | `norm.rs` |
//! | bias add (its backward: a column sum) | `bias.rs` |
//! | softmax, plain and scaled + masked | `softmax.rs` |
//! | SwiGLU | `swiglu.rs` |
//! | RoPE fused with the head transpose | `rope.rs` |
//! | cross-entropy, plain and fused with the output projection (`LinearNll`) | `cross_entropy.rs` |
//! | fused causal prefill attention (forward and backward) | `attention.rs` |
//! | attention of new positions to a KV cache (decoding, inference only) | `decode_attention.rs` |
//! | sum of squares of a gradient (the global gradient norm) | `reduce.rs` |
//! | products of a few rows by a weight matrix (decoding, inference only) | `skinny.rs` |
//! | bf16 matrix products on AMX tiles or AVX512-BF16 (generation and mixed-precision training) | `amx.rs` |
//!
//! The submodules are declared after the macros `fast!` and `dispatch!`, so both are in
//! (textual) scope in every file; the shared helpers here are private, visible to the
//! submodules only.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};
use num_traits::Float;

/// Element types of the CPU kernels.
pub(crate) trait Elem: WithDType + Float + Send + Sync + std::iter::Sum + PlainBits {
    /// `exp(x)`: a branch-free polynomial for f32 (vectorises; within 2 ulp of `expf`,
    /// exactly 0 below -87.3), the exact `exp` for f64 (the finite-difference checks).
    fn fexp(self) -> Self;
    /// The storage's elements by value (no copy), if it holds this type.
    fn into_vec(s: CpuStorage) -> Option<Vec<Self>>;
    /// The values as f32, if they are.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The values as f32, if they are.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl Elem for f32 {
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
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
        // `t` holds the integer n = round(x log2 e) in its low mantissa bits (|n| < 2^22
        // keeps the exponent of 1.5 * 2^23), so n is read off its bits with integer
        // arithmetic: a saturating `n as i32` has no vector instruction and made LLVM
        // convert lane by lane.
        let t = x * std::f32::consts::LOG2_E + ROUND;
        let n = t - ROUND;
        let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 5.000_000_1e-1;
        let e = p * r * r + r + 1.0;
        let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
        if self < -87.33 {
            0.0
        } else {
            e * scale
        }
    }
}

impl Elem for f64 {
    fn as_f32(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
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

/// The instruction sets the kernels are compiled for, lowest first. [`fast!`] runs a
/// kernel at the level [`simd_level`] says, chosen at run time, so the build stays
/// portable to any x86-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// As compiled for the target (SSE2 on x86-64).
    Baseline = 0,
    /// AVX2 with FMA (256-bit vectors).
    Avx2 = 1,
    /// AVX-512 (F, BW, VL, DQ; 512-bit vectors).
    Avx512 = 2,
}

impl SimdLevel {
    /// The name `TOOLTRAIN_SIMD` takes.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Baseline => "baseline",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn from_u8(v: u8) -> SimdLevel {
        match v {
            2 => SimdLevel::Avx512,
            1 => SimdLevel::Avx2,
            _ => SimdLevel::Baseline,
        }
    }
}

/// The highest level this CPU supports.
pub fn detected_simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512dq")
            && has!("avx2")
            && has!("fma")
        {
            return SimdLevel::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Baseline
}

/// The level in use; `u8::MAX` until first read.
static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The level the kernels run at: the CPU's highest, or lower when the environment
/// variable `TOOLTRAIN_SIMD` (`baseline`, `avx2`, `avx512`) caps it, or what
/// [`set_simd_level`] chose. Every level gives bit-identical results.
pub fn simd_level() -> SimdLevel {
    let v = LEVEL.load(std::sync::atomic::Ordering::Relaxed);
    if v != u8::MAX {
        return SimdLevel::from_u8(v);
    }
    let cap = match std::env::var("TOOLTRAIN_SIMD").as_deref() {
        Ok("baseline") | Ok("scalar") => SimdLevel::Baseline,
        Ok("avx2") => SimdLevel::Avx2,
        _ => SimdLevel::Avx512,
    };
    let level = detected_simd_level().min(cap);
    LEVEL.store(level as u8, std::sync::atomic::Ordering::Relaxed);
    level
}

/// Sets the level for the whole process (at most what the CPU supports) and returns the
/// one now in effect. For tests and benchmarks that compare levels.
pub fn set_simd_level(level: SimdLevel) -> SimdLevel {
    let level = level.min(detected_simd_level());
    LEVEL.store(level as u8, std::sync::atomic::Ordering::Relaxed);
    level
}

/// `fast!(expr)` evaluates `expr` compiled for the widest instruction set of
/// [`simd_level`]. Only the vector width changes: Rust never fuses `a * b + c` on its own
/// and the reductions below fix their summation order, so every level gives bit-identical
/// results.
///
/// The code must be inlined into the `#[target_feature]` functions to get the wider
/// vectors: helpers are `#[inline(always)]`, and the macro wraps `expr` in an
/// `#[inline(always)]` closure (a plain closure is not inlined when large: LLVM compiles
/// it once for the baseline target and the wide entry merely jumps to it).
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
    match simd_level() {
        SimdLevel::Avx512 => {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
            unsafe fn wide512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: `simd_level` never exceeds what the CPU has.
            return unsafe { wide512(f) };
        }
        SimdLevel::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: as above.
            return unsafe { wide(f) };
        }
        SimdLevel::Baseline => {}
    }
    f()
}

/// One line on the CPU paths in use: the kernels' level and gemm's matrix kernels
/// (AVX-512 when the CPU has it: gemm is built with its `x86-v4` kernels, chosen at run
/// time; `TOOLTRAIN_SIMD` does not change gemm's choice).
pub fn simd_summary() -> String {
    #[cfg(target_arch = "x86_64")]
    let gemm = if cfg!(feature = "gemm-avx512") && std::arch::is_x86_feature_detected!("avx512f") {
        "avx512f"
    } else if std::arch::is_x86_feature_detected!("fma") {
        "fma"
    } else {
        "scalar"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let gemm = "native";
    let bf16 = amx::bf16_kernel().map_or("none", |k| k.name());
    format!("kernels {}, gemm {gemm}, bf16 {bf16}", simd_level().name())
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

/// `row <- k * softmax(row)` in place; returns the row's log-sum-exp.
#[inline(always)]
fn softmax_in_place<T: Elem>(row: &mut [T], k: T) -> T {
    let mx = max_of(row);
    row.iter_mut().for_each(|v| *v = (*v - mx).fexp());
    let sum = dot(row, None);
    let f = k / sum;
    row.iter_mut().for_each(|v| *v = *v * f);
    mx + sum.ln()
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

/// A buffer of `n` elements that the caller writes in full before anything reads it: an
/// op's output, or a scratch row. Release builds skip the zero-fill (`vec![0; n]` clears
/// every byte of a reused heap block); builds with debug assertions, the tests among
/// them, fill it with NaN instead, so an element a kernel forgets to write reaches the
/// tests that compare its outputs with a reference, and fails them.
#[inline]
fn written_in_full<T: Elem>(n: usize) -> Vec<T> {
    written_in_full_or(n, T::nan())
}

/// Element types for which any bit pattern is a value and that have no destructor.
pub(crate) trait PlainBits: Copy {}
impl PlainBits for f32 {}
impl PlainBits for f64 {}
impl PlainBits for u16 {}

/// [`written_in_full`] for any plain-bits element: `fill` (a value a reference check
/// would reject, such as a NaN pattern) in builds with debug assertions.
#[inline]
#[allow(clippy::uninit_vec)] // Deliberate: see above; every caller writes all `n` first.
fn written_in_full_or<T: PlainBits>(n: usize, fill: T) -> Vec<T> {
    if cfg!(debug_assertions) {
        return vec![fill; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: `PlainBits` types have no invalid bit patterns and no destructors, and every
    // caller overwrites all `n` elements before reading any (see above).
    unsafe { v.set_len(n) };
    v
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

pub(crate) mod amx;
mod attention;
mod bf16_layout;
mod bias;
mod cross_entropy;
mod decode_attention;
mod norm;
mod reduce;
mod rope;
mod skinny;
mod softmax;
mod swiglu;

pub use amx::AmxMatrix;
pub use amx::{bf16_available, bf16_kernel, Bf16Kernel};
pub(crate) use amx::{AmxGemm, AmxLinear, AmxMatmul, Trans};
pub(crate) use attention::Attention;
pub use attention::AttentionMask;
pub(crate) use bias::BiasAdd;
pub(crate) use cross_entropy::{LinearNll, Nll};
pub(crate) use decode_attention::DecodeAttention;
pub(crate) use norm::RmsNorm;
pub(crate) use reduce::sum_squares_f32;
pub(crate) use rope::RopeBthd;
pub use skinny::PanelMatrix;
pub(crate) use skinny::{
    PanelLinear, SkinnyLinear, MAX_ROWS as SKINNY_MAX_ROWS, MAX_ROWS_T as SKINNY_MAX_ROWS_T,
};
pub(crate) use softmax::{MaskedSoftmax, Softmax};
pub(crate) use swiglu::SwiGlu;

/// Runs `run` at the baseline level, then at every higher level this CPU has, and returns
/// the baseline's result and each higher level's (for tests that check the levels give the
/// same bits). The tests that change the process-wide level take turns, and the level in
/// effect before is restored.
#[cfg(test)]
pub(crate) fn at_every_level<T>(run: impl Fn() -> T) -> (T, Vec<(SimdLevel, T)>) {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let before = simd_level();
    set_simd_level(SimdLevel::Baseline);
    let reference = run();
    let mut others = Vec::new();
    for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
        if level > detected_simd_level() {
            eprintln!("{level:?}: not on this CPU, not tested");
            continue;
        }
        assert_eq!(set_simd_level(level), level);
        others.push((level, run()));
    }
    set_simd_level(before);
    (reference, others)
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

    /// The exponential in a vectorised loop (every lane through the integer read-off of
    /// the exponent, negative ones included) gives the scalar's bits at every level.
    #[test]
    fn fast_exp_gives_the_same_bits_in_vector_loops_at_every_level() {
        let xs: Vec<f32> = (0..20_000).map(|i| -95.0 + i as f32 * 0.00927).collect();
        let scalar: Vec<u32> = xs
            .iter()
            .map(|&x| std::hint::black_box(x).fexp().to_bits())
            .collect();
        let (base, others) = super::at_every_level(|| {
            let mut v = xs.clone();
            super::fast!(v.iter_mut().for_each(|x| *x = x.fexp()));
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        });
        assert_eq!(base, scalar);
        for (level, got) in others {
            assert_eq!(got, scalar, "{level:?}");
        }
    }
}
