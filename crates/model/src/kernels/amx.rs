//! bf16 matrix products for generation ([`crate::SamplingParams::bf16`]) and mixed-precision
//! training (`bf16_matmuls`): `x @ w` with `x` and `w` rounded to bf16 and the products
//! summed in f32. The weights are packed once per weights version ([`AmxMatrix::pack`]);
//! the activations are rounded on each call.
//!
//! Two instruction sets compute them, on the same packed layout ([`Bf16Kernel`]):
//! - Intel AMX: a tile holds 16 rows of 64 bytes. One `tdpbf16ps` adds a `[16, 32] @
//!   [32, 16]` product (bf16 in, f32 out) to an accumulator tile; the right-hand tile is
//!   stored "VNNI" style, row `r` holding the pairs `(w[2r][j], w[2r + 1][j])` for
//!   `j < 16`. The kernel keeps a 2 x 2 block of accumulators (32 x 32 outputs), two left
//!   and two right tiles. Used when the CPU has it and Linux grants the tile state
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).
//! - AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later): one `vdpbf16ps` adds
//!   the products of 16 pairs to 16 f32 lanes. A row of a right-hand tile is one such
//!   vector, so the kernel broadcasts a pair `(x[i][2r], x[i][2r + 1])` of each of 8 rows
//!   against two tile rows (8 x 32 outputs in 16 registers). Only the rows that exist are
//!   computed (AMX computes 32 at a time).
//!
//! Either needs the kernels at their AVX-512 level (`TOOLTRAIN_SIMD` below it switches
//! them off); `TOOLTRAIN_BF16` = `amx`, `avx512bf16` or `off` picks one (default: AMX
//! where it is available, else AVX512-BF16). Without either, callers keep the f32 path.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

#[cfg(test)]
pub(crate) use super::bf16_layout::{bf16_bits, bf16_value};
use super::bf16_layout::{rows, tiles, Strided};

/// The instructions that compute the bf16 products in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// Intel AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 vectors (`vdpbf16ps`).
    Avx512Bf16,
}

impl Bf16Kernel {
    /// The rows it computes at a time: the left operand is padded to a multiple of this.
    pub(crate) fn row_block(self) -> usize {
        match self {
            Bf16Kernel::Amx => 32,
            Bf16Kernel::Avx512Bf16 => 8,
        }
    }

    /// The name `TOOLTRAIN_BF16` takes.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx",
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The kernel chosen from the CPU and `TOOLTRAIN_BF16` (checked once; `None`: no bf16
/// products, the callers stay in f32). A `TOOLTRAIN_BF16` that names no kernel panics
/// with the accepted values; one that names a kernel this CPU lacks gives `None`.
pub fn bf16_kernel() -> Option<Bf16Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Bf16Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let want = std::env::var("TOOLTRAIN_BF16").unwrap_or_default();
        let allowed = allowed_kernels(&want).unwrap_or_else(|e| panic!("{e}"));
        kernels_on_this_cpu()
            .into_iter()
            .find(|k| allowed.contains(k))
    })
}

/// The bf16 kernels this CPU and process can run, preferred first (none when
/// `TOOLTRAIN_SIMD` caps the kernels below AVX-512).
pub(crate) fn kernels_on_this_cpu() -> Vec<Bf16Kernel> {
    let mut here = Vec::new();
    if super::simd_level() == super::SimdLevel::Avx512 {
        if imp::request_tiles() {
            here.push(Bf16Kernel::Amx);
        }
        if avx512bf16::available() {
            here.push(Bf16Kernel::Avx512Bf16);
        }
    }
    here
}

/// The kernels a `TOOLTRAIN_BF16` value allows.
fn allowed_kernels(want: &str) -> std::result::Result<&'static [Bf16Kernel], String> {
    use Bf16Kernel::*;
    match want {
        "" | "auto" => Ok(&[Amx, Avx512Bf16]),
        "amx" => Ok(&[Amx]),
        "avx512bf16" => Ok(&[Avx512Bf16]),
        "off" | "none" => Ok(&[]),
        other => Err(format!(
            "TOOLTRAIN_BF16={other:?}: expected amx, avx512bf16, off or auto (unset)"
        )),
    }
}

/// Whether bf16 products (AMX or AVX512-BF16) can run in this process.
pub fn bf16_available() -> bool {
    bf16_kernel().is_some()
}

/// A weight `w: [k, n]` (the product is `x @ w`) rounded to bf16 and laid out in tiles:
/// tile `(nb, kb)` (columns `16 nb..`, rows `32 kb..`) is 512 values at
/// `(nb * kbs + kb) * 512`, so a column block's tiles are contiguous. `k` and `n` are
/// padded with zeros to multiples of 32.
pub struct AmxMatrix {
    k: usize,
    n: usize,
    kp: usize,
    np: usize,
    data: Vec<u16>,
}

impl AmxMatrix {
    /// Packs `w`, row-major `[k, n]`.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Result<AmxMatrix> {
        if w.len() != k * n || k == 0 || n == 0 {
            bail!("AMX pack: {} values for a [{k}, {n}] weight", w.len())
        }
        Ok(Self::pack_with(Strided {
            data: w,
            rows: k,
            cols: n,
            rs: n,
            cs: 1,
        }))
    }

    /// Packs the transpose of `w`, row-major `[n, k]` (an output projection stored as
    /// `[vocab, hidden]`).
    pub fn pack_transposed(w: &[f32], n: usize, k: usize) -> Result<AmxMatrix> {
        if w.len() != k * n || k == 0 || n == 0 {
            bail!("AMX pack: {} values for a [{n}, {k}] weight", w.len())
        }
        Ok(Self::pack_with(Strided {
            data: w,
            rows: k,
            cols: n,
            rs: 1,
            cs: k,
        }))
    }

    /// Packs `b` (`[k, n]`, k, n >= 1; the callers check that every element is in
    /// bounds).
    fn pack_with(b: Strided<'_>) -> AmxMatrix {
        let (k, n) = (b.rows, b.cols);
        let (data, kp, np) = tiles(b);
        AmxMatrix { k, n, kp, np, data }
    }

    /// `x @ w` for `x` row-major `[m, k]`: `[m, n]`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let Some(kernel) = bf16_kernel() else {
            bail!("bf16 matmul: this CPU or process has neither AMX tiles nor AVX512-BF16")
        };
        self.matmul_on(x, m, kernel)
    }

    /// [`Self::matmul`] on the given kernel, which the CPU must have.
    fn matmul_on(&self, x: &[f32], m: usize, kernel: Bf16Kernel) -> Result<Vec<f32>> {
        if x.len() != m * self.k {
            bail!("bf16 matmul: {} values for [{m}, {}]", x.len(), self.k)
        }
        Ok(self.matmul_strided_on(x, m, (self.k, 1), kernel))
    }

    /// `x @ w` for the `[m, k]` matrix whose element `(i, j)` is `x[i * rs + j * cs]`
    /// (row-major or transposed storage): `[m, n]`, row-major. The packed matrix can
    /// serve many left-hand operands (a loss head's vocabulary chunks).
    pub(crate) fn matmul_strided(
        &self,
        x: &[f32],
        m: usize,
        (rs, cs): (usize, usize),
    ) -> Result<Vec<f32>> {
        let Some(kernel) = bf16_kernel() else {
            bail!("bf16 matmul: this CPU or process has neither AMX tiles nor AVX512-BF16")
        };
        if m > 0 && x.len() <= (m - 1) * rs + (self.k - 1) * cs {
            bail!(
                "bf16 matmul: {} values are too few for [{m}, {}]",
                x.len(),
                self.k
            )
        }
        Ok(self.matmul_strided_on(x, m, (rs, cs), kernel))
    }

    /// [`Self::matmul_strided`] on `kernel`; the caller checked the bounds.
    fn matmul_strided_on(
        &self,
        x: &[f32],
        m: usize,
        xstr: (usize, usize),
        kernel: Bf16Kernel,
    ) -> Vec<f32> {
        if m == 0 {
            return Vec::new();
        }
        let a = rows_bf16(x, m, self.k, xstr, self.kp, kernel);
        self.product(&a, m, kernel)
    }

    /// `a @ w` for `a` from [`rows_bf16`] for the same kernel (`m` rows of this matrix's
    /// padded width): `[m, n]`, row-major, on `kernel` (which the CPU must have).
    fn product(&self, a: &[u16], m: usize, kernel: Bf16Kernel) -> Vec<f32> {
        let (kp, np) = (self.kp, self.np);
        let rows = m.div_ceil(kernel.row_block()) * kernel.row_block();
        debug_assert_eq!(a.len(), rows * kp);
        let mut c = super::written_in_full::<f32>(rows * np);
        // Tasks: blocks of 128 rows (the left tiles stay in L2) x runs of column pairs.
        const MB: usize = 128;
        let npairs = np / 32;
        let chunk = npairs
            .div_ceil(4 * rayon::current_num_threads())
            .clamp(1, 8);
        let mblocks = rows.div_ceil(MB);
        let nchunks = npairs.div_ceil(chunk);
        let cp = SendPtr(c.as_mut_ptr());
        (0..mblocks * nchunks).into_par_iter().for_each(|t| {
            let (mb, nc) = (t / nchunks, t % nchunks);
            let m0 = mb * MB;
            let m1 = (m0 + MB).min(rows);
            let p0 = nc * chunk;
            let p1 = (p0 + chunk).min(npairs);
            // SAFETY: the kernel is available (the callers checked); each task writes
            // only rows m0..m1 of columns 32 p0..32 p1 of `c`, which no other task
            // touches (together the tasks write all of it), and reads `a` and the packed
            // weight within their padded sizes (`rows` x kp, np x kp).
            unsafe {
                match kernel {
                    Bf16Kernel::Amx => {
                        imp::block(a, kp, m0, m1, &self.data, kp, p0, p1, cp.get(), np)
                    }
                    Bf16Kernel::Avx512Bf16 => {
                        avx512bf16::block(a, kp, m0, m1, &self.data, kp, p0, p1, cp.get(), np)
                    }
                }
            }
        });
        if np == self.n {
            c.truncate(m * np);
            return c;
        }
        let n = self.n;
        let mut out = Vec::with_capacity(m * n);
        for r in 0..m {
            out.extend_from_slice(&c[r * np..r * np + n]);
        }
        out
    }
}

/// The `[m, k]` matrix whose element `(i, j)` is `x[i * rs + j * cs]`, rounded to bf16,
/// as rows of `kp` values (zero-padded), `m` rounded up to the kernel's row block.
fn rows_bf16(
    x: &[f32],
    m: usize,
    k: usize,
    (rs, cs): (usize, usize),
    kp: usize,
    kernel: Bf16Kernel,
) -> Vec<u16> {
    let mp = m.div_ceil(kernel.row_block()) * kernel.row_block();
    let a = Strided {
        data: x,
        rows: m,
        cols: k,
        rs,
        cs,
    };
    rows(a, mp, kp)
}

/// `a @ w` on the calling thread (operands small enough for one task of a parallel
/// kernel): `a` is `mp` bf16 rows of `kp` values ([`rows_on`](super::bf16_layout::rows_on); `mp` a multiple of the
/// kernel's row block), `w` the `[kp, np]` tiles ([`tiles_on`](super::bf16_layout::tiles_on)). Returns `[mp, np]`,
/// row-major, on `kernel` (which the CPU must have: take it from [`bf16_kernel`]).
pub(crate) fn product_here(
    kernel: Bf16Kernel,
    a: &[u16],
    (mp, kp, np): (usize, usize, usize),
    w: &[u16],
) -> Vec<f32> {
    product_prefix(kernel, a, (mp, kp, np), w, kp)
}

/// [`product_here`] with the first `kp` rows of tiles `w` made from `wkp >= kp` rows
/// (a multiple of 32): `a @ w[..kp]`, for products over a prefix of the inner
/// dimension (causal attention's weighted values and query gradients over the keys a
/// block of queries sees).
pub(crate) fn product_prefix(
    kernel: Bf16Kernel,
    a: &[u16],
    (mp, kp, np): (usize, usize, usize),
    w: &[u16],
    wkp: usize,
) -> Vec<f32> {
    assert!(
        mp.is_multiple_of(kernel.row_block())
            && kp.is_multiple_of(32)
            && wkp.is_multiple_of(32)
            && kp <= wkp
            && np.is_multiple_of(32)
            && a.len() >= mp * kp
            && w.len() >= wkp * np
    );
    let mut c = super::written_in_full::<f32>(mp * np);
    if mp == 0 || np == 0 {
        return c;
    }
    // SAFETY: the kernel came from `bf16_kernel` (the CPU has it, tiles are granted); the
    // asserts keep rows 0..mp of `a`, the `wkp x np` tiles and `mp x np` outputs in bounds.
    unsafe {
        match kernel {
            Bf16Kernel::Amx => imp::block(a, kp, 0, mp, w, wkp, 0, np / 32, c.as_mut_ptr(), np),
            Bf16Kernel::Avx512Bf16 => {
                avx512bf16::block(a, kp, 0, mp, w, wkp, 0, np / 32, c.as_mut_ptr(), np)
            }
        }
    }
    c
}

/// `op(a) @ op(b)` for `a: [m, k]`, `b: [k, n]` given by (row, column) strides into
/// their storage: `[m, n]` row-major, from bf16-rounded operands with f32 sums. The
/// products of training (forward and both gradients); AMX must be available.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    astr: (usize, usize),
    b: &[f32],
    bstr: (usize, usize),
) -> Result<Vec<f32>> {
    let Some(kernel) = bf16_kernel() else {
        bail!("bf16 product: this CPU or process has neither AMX tiles nor AVX512-BF16")
    };
    gemm_on(kernel, (m, k, n), a, astr, b, bstr)
}

/// [`gemm`] on the given kernel, which the CPU must have.
fn gemm_on(
    kernel: Bf16Kernel,
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    astr: (usize, usize),
    b: &[f32],
    bstr: (usize, usize),
) -> Result<Vec<f32>> {
    if m == 0 || n == 0 {
        return Ok(Vec::new());
    }
    if k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let last = |(rs, cs): (usize, usize), r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    if a.len() <= last(astr, m, k) || b.len() <= last(bstr, k, n) {
        bail!("AMX product: operands too short for [{m}, {k}] x [{k}, {n}]")
    }
    let w = AmxMatrix::pack_with(Strided {
        data: b,
        rows: k,
        cols: n,
        rs: bstr.0,
        cs: bstr.1,
    });
    Ok(w.matmul_strided_on(a, m, astr, kernel))
}

/// Which operands of [`AmxGemm`] are transposed.
#[derive(Clone, Copy)]
pub(crate) enum Trans {
    /// `a @ b`
    None,
    /// `a @ b^T`
    B,
    /// `a^T @ b`
    A,
}

/// `op(a) @ op(b)` of two contiguous 2-D f32 tensors on AMX (no backward): the three
/// products of a linear layer's training pass.
pub(crate) struct AmxGemm(pub Trans);

impl CustomOp2 for AmxGemm {
    fn name(&self) -> &'static str {
        "amx-bf16-gemm"
    }
    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (sa, sb) else {
            bail!("AMX product: f32 operands only")
        };
        let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets())
        else {
            bail!("AMX product: the operands must be contiguous")
        };
        let ((ar, ac), (br, bc)) = (la.shape().dims2()?, lb.shape().dims2()?);
        let (a, b) = (&a[a0..a1], &b[b0..b1]);
        // (m, k, n) and the strides of op(a), op(b) into the row-major storages.
        let (dims, astr, bstr) = match self.0 {
            Trans::None => ((ar, ac, bc), (ac, 1), (bc, 1)),
            Trans::B => ((ar, ac, br), (ac, 1), (1, bc)),
            Trans::A => ((ac, ar, bc), (1, ac), (bc, 1)),
        };
        let inner_b = match self.0 {
            Trans::B => bc,
            _ => br,
        };
        if dims.1 != inner_b {
            bail!(
                "AMX product: {:?} and {:?} do not fit",
                la.dims(),
                lb.dims()
            )
        }
        let y = gemm(dims, a, astr, b, bstr)?;
        Ok((CpuStorage::F32(y), Shape::from((dims.0, dims.2))))
    }
}

/// `x @ w` for training: `x: [m, k]`, `w: [k, n]`, f32, with bf16-rounded operands on
/// AMX in the forward pass and in both gradients (`dx = dy @ w^T`, `dw = x^T @ dy`;
/// `dw` only when `need_dw`: a frozen weight under LoRA takes none).
pub(crate) struct AmxMatmul {
    pub need_dw: bool,
}

impl CustomOp2 for AmxMatmul {
    fn name(&self) -> &'static str {
        "amx-bf16-matmul"
    }
    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        AmxGemm(Trans::None).cpu_fwd(sa, la, sb, lb)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (x, w) = (x.detach(), w.detach());
        let dx = g.apply_op2_no_bwd(&w, &AmxGemm(Trans::B))?;
        let dw = if self.need_dw {
            Some(x.apply_op2_no_bwd(&g, &AmxGemm(Trans::A))?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks that share it write disjoint parts (see `AmxMatrix::matmul`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::asm;

    /// Asks Linux for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`), after checking CPUID for AMX-TILE and AMX-BF16.
    pub(super) fn request_tiles() -> bool {
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return false;
        }
        let l7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = (l7.edx & (1 << 24) != 0, l7.edx & (1 << 22) != 0);
        if !(tile && bf16) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }

    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// Rows `m0..m1` (multiples of 32) of `c` (row stride `ldc` floats) for the column
    /// pairs `p0..p1` (32 columns each): `a` is bf16 `[*, kp]`, `w` the packed weight of
    /// `wkp >= kp` rows, of which the first `kp` are read.
    ///
    /// # Safety
    /// AMX must be available to the process, and the rows and columns must lie within
    /// `a`, `w` and `c`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        a: &[u16],
        kp: usize,
        m0: usize,
        m1: usize,
        w: &[u16],
        wkp: usize,
        p0: usize,
        p1: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // Palette 1; 8 tiles of 16 rows x 64 bytes.
        let mut cfg = TileConfig([0u8; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            cfg.0[48 + t] = 16;
        }
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        let (kbs, wkbs) = (kp / 32, wkp / 32);
        let (lda, ldc_b) = (kp * 2, ldc * 4);
        for p in p0..p1 {
            let b0 = w.as_ptr().add(2 * p * wkbs * 512);
            let b1 = b0.add(wkbs * 512);
            for mr in (m0..m1).step_by(32) {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                let a0 = a.as_ptr().add(mr * kp);
                for kb in 0..kbs {
                    asm!(
                        "tileloadd tmm4, [{a0} + {lda}*1]",
                        "tileloadd tmm5, [{a1} + {lda}*1]",
                        "tileloadd tmm6, [{b0} + {ldb}*1]",
                        "tileloadd tmm7, [{b1} + {ldb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(kb * 32),
                        a1 = in(reg) a0.add(16 * kp + kb * 32),
                        b0 = in(reg) b0.add(kb * 512),
                        b1 = in(reg) b1.add(kb * 512),
                        lda = in(reg) lda,
                        ldb = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
                let c0 = c.add(mr * ldc + 32 * p);
                asm!(
                    "tilestored [{c0} + {ldc}*1], tmm0",
                    "tilestored [{c1} + {ldc}*1], tmm1",
                    "tilestored [{c2} + {ldc}*1], tmm2",
                    "tilestored [{c3} + {ldc}*1], tmm3",
                    c0 = in(reg) c0,
                    c1 = in(reg) c0.add(16),
                    c2 = in(reg) c0.add(16 * ldc),
                    c3 = in(reg) c0.add(16 * ldc + 16),
                    ldc = in(reg) ldc_b,
                    options(nostack)
                );
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// The AVX512-BF16 kernel: the same operands and outputs as the AMX `imp::block`.
#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// How far ahead (bf16 values, 6 KB) the kernel's first row block prefetches each of
    /// its two weight streams. With few rows (decoding: 8) the products are bound by
    /// streaming the weight: on two Zen 5 cores one SmolLM2 step's products took 15.9-17.1
    /// ms with the hardware prefetcher alone and 10.2-10.9 ms with this
    /// (`decode_products --bf16`).
    const PREFETCH: usize = 3072;

    /// Whether the CPU has the instructions (`vdpbf16ps` on 512-bit vectors).
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    /// `acc[j] += a[2j] * b[2j] + a[2j + 1] * b[2j + 1]` (bf16 pairs in each 32-bit lane).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_pairs(acc: __m512, b: __m512, a: __m512) -> __m512 {
        let mut acc = acc;
        asm!(
            "vdpbf16ps {acc}, {b}, {a}",
            acc = inout(zmm_reg) acc,
            b = in(zmm_reg) b,
            a = in(zmm_reg) a,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }

    /// Rows `m0..m1` (multiples of 8) of `c` (row stride `ldc` floats) for the column
    /// pairs `p0..p1` (32 columns each): `a` is bf16 `[*, kp]`, `w` the packed weight of
    /// `wkp >= kp` rows (the first `kp` are read), whose column block's tiles are
    /// contiguous, so that its pair of rows `(2r, 2r + 1)` (16 columns) is the 32 values
    /// at `32 r` from the block's start.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16, and the rows and columns must lie
    /// within `a`, `w` and `c`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        a: &[u16],
        kp: usize,
        m0: usize,
        m1: usize,
        w: &[u16],
        wkp: usize,
        p0: usize,
        p1: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        const R: usize = 8;
        let wkbs = wkp / 32;
        let pairs = kp / 2;
        for p in p0..p1 {
            let b0 = w.as_ptr().add(2 * p * wkbs * 512);
            let b1 = b0.add(wkbs * 512);
            for r0 in (m0..m1).step_by(R) {
                let a0 = a.as_ptr().add(r0 * kp);
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                // The later row blocks find the weight's columns in cache.
                let first = r0 == m0;
                for i in 0..pairs {
                    if first {
                        // A hint only: an address past the weight is not dereferenced.
                        let ahead = 32 * i + PREFETCH;
                        _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(ahead) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(b1.wrapping_add(ahead) as *const i8);
                    }
                    let v0 = _mm512_loadu_ps(b0.add(32 * i) as *const f32);
                    let v1 = _mm512_loadu_ps(b1.add(32 * i) as *const f32);
                    // Each row's pair is broadcast once into a register for both
                    // column vectors: 10 loads per 16 products, not 18.
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = (a0.add(r * kp + 2 * i) as *const i32).read_unaligned();
                        let x = _mm512_castsi512_ps(_mm512_set1_epi32(x));
                        acc[0] = dot_pairs(acc[0], v0, x);
                        acc[1] = dot_pairs(acc[1], v1, x);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let out = c.add((r0 + r) * ldc + 32 * p);
                    _mm512_storeu_ps(out, acc[0]);
                    _mm512_storeu_ps(out.add(16), acc[1]);
                }
            }
        }
    }
}

/// Off x86-64 neither kernel exists; `block` is the never-called stub of `imp`.
#[cfg(not(target_arch = "x86_64"))]
mod avx512bf16 {
    pub(super) use super::imp::block;
    pub(super) fn available() -> bool {
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    pub(super) fn request_tiles() -> bool {
        false
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        _: &[u16],
        _: usize,
        _: usize,
        _: usize,
        _: &[u16],
        _: usize,
        _: usize,
        _: usize,
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("the bf16 kernels are x86-64 only")
    }
}

/// `x: [.., k] @ w` as a candle op (f32, CPU, no backward).
pub(crate) struct AmxLinear(pub Arc<AmxMatrix>);

impl CustomOp1 for AmxLinear {
    fn name(&self) -> &'static str {
        "amx-bf16-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            bail!("AMX linear: f32 input only")
        };
        let Some((o0, o1)) = l.contiguous_offsets() else {
            bail!("AMX linear: the input must be contiguous")
        };
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.0.k {
            bail!("AMX linear: input width {k}, weight has {} rows", self.0.k)
        }
        let m = l.shape().elem_count() / k.max(1);
        let y = self.0.matmul(&v[o0..o1], m)?;
        let mut out = dims.to_vec();
        *out.last_mut().expect("k") = self.0.n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = tooltrain_util::Rng::new(seed);
        (0..n)
            .map(|_| ((r.next_u64() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32)
            .collect()
    }

    /// Every bf16 kernel this machine has, whichever `TOOLTRAIN_BF16` picks for the
    /// process.
    fn kernels_here() -> Vec<Bf16Kernel> {
        let here = kernels_on_this_cpu();
        if here.is_empty() {
            eprintln!("skipped: neither AMX tiles nor AVX512-BF16 on this machine");
        }
        here
    }

    /// Each kernel's product equals the f64 product of the bf16-rounded operands to f32
    /// summation error, for shapes that need padding in every dimension and row counts
    /// that are not multiples of 8, 16 or 32.
    #[test]
    fn bf16_products_equal_the_products_of_rounded_operands() {
        for kernel in kernels_here() {
            products_of_rounded_operands(kernel);
        }
    }

    fn products_of_rounded_operands(kernel: Bf16Kernel) {
        for &(m, k, n) in &[
            (1, 32, 32),
            (33, 576, 192),
            (5, 40, 20),
            (130, 96, 70),
            (64, 1536, 64),
            (200, 64, 96),
        ] {
            let x = values(m * k, 1 + m as u64);
            let w = values(k * n, 2 + n as u64);
            let packed = AmxMatrix::pack(&w, k, n).unwrap();
            let y = packed.matmul_on(&x, m, kernel).unwrap();
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let yt = AmxMatrix::pack_transposed(&wt, n, k)
                .unwrap()
                .matmul_on(&x, m, kernel)
                .unwrap();
            assert_eq!(y, yt, "pack and pack_transposed give the same product");
            assert_eq!(y.len(), m * n);
            let r = |v: f32| bf16_value(bf16_bits(v)) as f64;
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|kk| r(x[i * k + kk]) * r(w[kk * n + j])).sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6 * want.abs(),
                        "{kernel:?} [{m},{k},{n}] at ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The training products (`x @ w`, `dy @ w^T`, `x^T @ dy`) equal the f64 products of
    /// the bf16-rounded operands to f32 summation error, for row counts that are not
    /// multiples of 16 or 32 (the column-major read of `x^T` goes 16 rows at a time).
    #[test]
    fn training_products_equal_the_products_of_rounded_operands() {
        for kernel in kernels_here() {
            training_products(kernel);
        }
    }

    fn training_products(kernel: Bf16Kernel) {
        let gemm = |dims, a: &[f32], astr, b: &[f32], bstr| gemm_on(kernel, dims, a, astr, b, bstr);
        let (m, k, n) = (45, 70, 37);
        let x = values(m * k, 21); // [m, k]
        let w = values(k * n, 22); // [k, n]
        let g = values(m * n, 23); // [m, n]
        let r = |v: f32| bf16_value(bf16_bits(v)) as f64;
        let check =
            |got: Vec<f32>, rows: usize, cols: usize, want: &dyn Fn(usize, usize) -> f64| {
                assert_eq!(got.len(), rows * cols);
                for i in 0..rows {
                    for j in 0..cols {
                        let (a, b) = (got[i * cols + j] as f64, want(i, j));
                        assert!((a - b).abs() < 1e-4, "{kernel:?} ({i},{j}): {a} vs {b}");
                    }
                }
            };
        let y = gemm((m, k, n), &x, (k, 1), &w, (n, 1)).unwrap();
        check(y, m, n, &|i, j| {
            (0..k).map(|t| r(x[i * k + t]) * r(w[t * n + j])).sum()
        });
        // dx = g @ w^T: [m, k].
        let dx = gemm((m, n, k), &g, (n, 1), &w, (1, n)).unwrap();
        check(dx, m, k, &|i, j| {
            (0..n).map(|t| r(g[i * n + t]) * r(w[j * n + t])).sum()
        });
        // dw = x^T @ g: [k, n].
        let dw = gemm((k, m, n), &x, (1, k), &g, (n, 1)).unwrap();
        check(dw, k, n, &|i, j| {
            (0..m).map(|t| r(x[t * k + i]) * r(g[t * n + j])).sum()
        });
        assert!(gemm((m, k, n), &x[1..], (k, 1), &w, (n, 1)).is_err());
    }

    /// A product over the first rows of taller tiles (`product_prefix`) equals the
    /// product with tiles of only those rows, on every kernel here.
    #[test]
    fn prefix_products_read_the_first_rows_of_the_tiles() {
        for kernel in kernels_here() {
            let (m, k, n, tall_k) = (13, 70, 40, 150);
            let x = values(m * k, 5);
            let w = values(tall_k * n, 6);
            let src = |rows| Strided {
                data: &w,
                rows,
                cols: n,
                rs: n,
                cs: 1,
            };
            let (tall, tall_kp, np) = tiles(src(tall_k));
            let (short, kp, short_np) = tiles(src(k));
            assert_eq!((np, kp, tall_kp), (short_np, 96, 160));
            let mp = m.div_ceil(kernel.row_block()) * kernel.row_block();
            let a = rows_bf16(&x, m, k, (k, 1), kp, kernel);
            let want = product_here(kernel, &a, (mp, kp, np), &short);
            let got = product_prefix(kernel, &a, (mp, kp, np), &tall, tall_kp);
            assert_eq!(got, want, "{kernel:?}");
            // And it is the product, not a copy of something else.
            let r = |v: f32| bf16_value(bf16_bits(v)) as f64;
            let want00: f64 = (0..k).map(|t| r(x[t]) * r(w[t * n])).sum();
            assert!(
                (got[0] as f64 - want00).abs() < 1e-4,
                "{} vs {want00}",
                got[0]
            );
        }
    }

    #[test]
    fn tooltrain_bf16_picks_the_kernels() {
        use Bf16Kernel::*;
        assert_eq!(allowed_kernels(""), Ok(&[Amx, Avx512Bf16][..]));
        assert_eq!(allowed_kernels("auto"), Ok(&[Amx, Avx512Bf16][..]));
        assert_eq!(allowed_kernels("amx"), Ok(&[Amx][..]));
        assert_eq!(allowed_kernels("avx512bf16"), Ok(&[Avx512Bf16][..]));
        assert_eq!(allowed_kernels("off"), Ok(&[][..]));
        let e = allowed_kernels("AVX512").unwrap_err();
        assert!(e.contains("\"AVX512\"") && e.contains("avx512bf16"), "{e}");
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(AmxMatrix::pack(&[0.0; 6], 2, 2).is_err());
        let p = AmxMatrix::pack(&[0.0; 6], 2, 3).unwrap();
        assert!(p.matmul(&[0.0; 3], 1).is_err());
    }
}
