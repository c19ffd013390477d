//! Recycled CPU buffers for the keys and values of [`crate::KvCache`] and of
//! [`crate::PrefixCache`] entries.
//!
//! A multi-turn rollout rebuilds its batch cache every turn: the rows kept from the last
//! turn are copied into new buffers, a finished row is copied out, and the batch is
//! compacted when half its rows have finished. With fresh allocations, every one of those
//! gigabytes lands on pages the kernel must fault in and zero (and on a VM that hands
//! freed pages back to the host, fault in there too). Here a buffer the caches drop goes
//! to a process-wide pool, and the next one of about its size is taken from there, so the
//! copies write to memory the process already has.
//!
//! A taken buffer holds stale values: callers write every element they later read. Test
//! builds (debug assertions) fill every taken buffer with NaN, so that a position a cache
//! reads before writing it shows in the generation tests' outputs. A request takes the
//! smallest kept buffer that holds it, however much larger: an idle buffer serves it
//! without growing the process, where a new one would (its pages are new to the process,
//! and faulting them in and zeroing them took about a tenth of a 64-episode rollout on a
//! 2-core VM). A new buffer gets twice the capacity asked for, so that the same row's
//! cache, grown by a turn, fits it again; the part never written is never faulted in.
//! The pool keeps at most a quarter of the machine's memory.

use candle_core::{
    CpuStorage, DType, Device, InplaceOp1, Layout, Result, Shape, Tensor, WithDType,
};
use half::bf16;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Buffers of one element type, by capacity, each with the time it came in.
type Shelf<T> = BTreeMap<usize, Vec<(u64, Vec<T>)>>;

#[derive(Default)]
pub(crate) struct Pool {
    f32: Shelf<f32>,
    bf16: Shelf<bf16>,
    bytes: usize,
    clock: u64,
}

/// A pool behind a lock: the process's ([`POOL`]), or a test's own.
type Shared = Mutex<Option<Pool>>;

static POOL: Shared = Mutex::new(None);

/// Element types the pool keeps (those of KV caches on the CPU).
pub(crate) trait Pooled: WithDType + Copy + Send + Sync {
    fn shelf(p: &mut Pool) -> &mut Shelf<Self>;
    /// The vector of a CPU storage of this type.
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}
impl Pooled for f32 {
    fn shelf(p: &mut Pool) -> &mut Shelf<f32> {
        &mut p.f32
    }
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<f32>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}
impl Pooled for bf16 {
    fn shelf(p: &mut Pool) -> &mut Shelf<bf16> {
        &mut p.bf16
    }
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<bf16>> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}

impl Pool {
    /// The buffer of the smallest capacity of at least `n`.
    fn take<T: Pooled>(&mut self, n: usize) -> Option<Vec<T>> {
        let shelf = T::shelf(self);
        let cap = *shelf.range(n..).next()?.0;
        let list = shelf.get_mut(&cap).expect("found above");
        let (_, v) = list.pop().expect("lists are never left empty");
        if list.is_empty() {
            shelf.remove(&cap);
        }
        self.bytes -= cap * std::mem::size_of::<T>();
        Some(v)
    }

    /// Adds `v`, then drops the buffers that came in first until at most `max` bytes
    /// are kept (the caches grow turn by turn: the latest buffers fit the next
    /// requests best).
    fn give<T: Pooled>(&mut self, v: Vec<T>, max: usize) {
        self.clock += 1;
        let (cap, now) = (v.capacity(), self.clock);
        self.bytes += cap * std::mem::size_of::<T>();
        T::shelf(self).entry(cap).or_default().push((now, v));
        while self.bytes > max {
            let f = Self::oldest_in(&self.f32);
            let b = Self::oldest_in(&self.bf16);
            let evicted = match (f, b) {
                (Some(f), Some(b)) if f.1 <= b.1 => Self::evict(&mut self.f32, f),
                (Some(f), None) => Self::evict(&mut self.f32, f),
                (_, Some(b)) => Self::evict(&mut self.bf16, b),
                (None, None) => 0,
            };
            if evicted == 0 {
                break;
            }
            self.bytes -= evicted;
        }
    }

    /// Drops every buffer; returns their bytes.
    fn clear(&mut self) -> usize {
        self.f32.clear();
        self.bf16.clear();
        std::mem::take(&mut self.bytes)
    }

    /// The capacity and time of the buffer that came in first.
    fn oldest_in<T>(shelf: &Shelf<T>) -> Option<(usize, u64)> {
        shelf
            .iter()
            .flat_map(|(&cap, list)| list.iter().map(move |(t, _)| (cap, *t)))
            .min_by_key(|&(_, t)| t)
    }

    /// Drops that buffer; returns its bytes.
    fn evict<T>(shelf: &mut Shelf<T>, (cap, time): (usize, u64)) -> usize {
        let list = shelf.get_mut(&cap).expect("listed");
        list.retain(|(t, _)| *t != time);
        if list.is_empty() {
            shelf.remove(&cap);
        }
        cap * std::mem::size_of::<T>()
    }
}

/// The most bytes the pool holds: a quarter of the machine's memory (4 GiB where that is
/// unknown).
fn max_pooled_bytes() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<usize>().ok())
            })
            .map_or(4 << 30, |kb| kb * 1024 / 4)
    })
}

/// A buffer of `n` elements: a recycled one (stale values), else a new one with twice
/// the capacity (so that the next, larger request of a growing cache can reuse it), not
/// cleared either (zeroing a reused heap block is a pass over it; the
/// callers write what they read). NaN in test builds.
pub(crate) fn take<T: Pooled>(n: usize) -> Vec<T> {
    take_from(&POOL, n)
}

/// [`take`] from `pool`.
fn take_from<T: Pooled>(pool: &Shared, n: usize) -> Vec<T> {
    let mut v = take_any::<T>(pool, n);
    if cfg!(debug_assertions) {
        v.fill(T::from_f64(f64::NAN));
    }
    v
}

#[allow(clippy::uninit_vec)] // Deliberate: the callers write every element they read.
fn take_any<T: Pooled>(pool: &Shared, n: usize) -> Vec<T> {
    let hit = pool
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(Pool::default)
        .take::<T>(n);
    let mut v = hit.unwrap_or_else(|| Vec::with_capacity(n.saturating_mul(2)));
    // SAFETY: n <= capacity (the pool's range, or the new capacity); the elements are
    // plain numbers, and every caller writes each element before reading it (the same
    // contract as `kernels::written_in_full`).
    unsafe { v.set_len(n) };
    v
}

/// Frees every buffer the pool keeps and returns their bytes. For a phase that needs
/// the memory and no KV caches, such as an RL trainer's optimizer step after its
/// rollouts; the next caches allocate anew.
pub fn release_kv_buffers() -> usize {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .map_or(0, Pool::clear)
}

/// Puts `v` in `pool` for a later [`take`].
fn give_to<T: Pooled>(pool: &Shared, v: Vec<T>) {
    if v.capacity() == 0 {
        return;
    }
    pool.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(Pool::default)
        .give(v, max_pooled_bytes());
}

/// A CPU tensor of `shape` on a buffer from [`take`] (stale contents).
pub(crate) fn tensor<T: Pooled>(shape: impl Into<Shape>) -> Result<Tensor> {
    let shape: Shape = shape.into();
    Tensor::from_vec(take::<T>(shape.elem_count()), shape, &Device::Cpu)
}

/// Takes the storage out of a tensor for the pool.
struct TakeStorage<'a>(&'a Shared);

impl InplaceOp1 for TakeStorage<'_> {
    fn name(&self) -> &'static str {
        "kv-buffer-recycle"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> Result<()> {
        if let Some(v) = f32::vec_mut(s) {
            give_to(self.0, std::mem::take(v));
        } else if let Some(v) = bf16::vec_mut(s) {
            give_to(self.0, std::mem::take(v));
        }
        Ok(())
    }
}

/// The type of `t` when it is a whole buffer the pool keeps: an f32 or bf16 CPU tensor
/// starting at its storage's first element, contiguous.
pub(crate) fn pooled_dtype(t: &Tensor) -> Option<DType> {
    let whole = t.layout().start_offset() == 0 && t.is_contiguous();
    (whole && t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16))
        .then(|| t.dtype())
}

/// Gives the buffer under `t` to the pool when [`pooled_dtype`] has it (anything else is
/// left to be dropped).
///
/// The caller owns the storage alone: no other tensor (a view or a clone) reads it
/// afterwards, since it is left empty.
pub(crate) fn recycle(t: &Tensor) {
    recycle_to(&POOL, t)
}

/// [`recycle`] to `pool`.
fn recycle_to(pool: &Shared, t: &Tensor) {
    if pooled_dtype(t).is_some() {
        // Cannot fail on the CPU.
        let _ = t.inplace_op1(&TakeStorage(pool));
    }
}

/// Runs `f` on the whole storage under a tensor, in place.
struct InPlace<F>(F);

impl<T: Pooled, F: Fn(&mut [T])> InplaceOp1 for InPlace<(F, std::marker::PhantomData<T>)> {
    fn name(&self) -> &'static str {
        "kv-buffer-in-place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> Result<()> {
        match T::vec_mut(s) {
            Some(v) => {
                (self.0 .0)(v.as_mut_slice());
                Ok(())
            }
            None => candle_core::bail!("KV buffer: not of type {:?}", T::DTYPE),
        }
    }
}

/// Runs `f` on every element of the storage under the CPU tensor `t` (of type `T`), in
/// place. The caller owns the storage alone.
pub(crate) fn with_storage_mut<T: Pooled>(t: &Tensor, f: impl Fn(&mut [T])) -> Result<()> {
    t.inplace_op1(&InPlace((f, std::marker::PhantomData::<T>)))
}

/// Runs `f` on the elements of a contiguous CPU tensor of type `T`.
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(c) = &*st else {
        candle_core::bail!("KV copy: the tensor is not on the CPU")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("KV copy: the tensor is not contiguous")
    };
    Ok(f(&T::cpu_storage_as_slice(c)?[a..b]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_buffer_that_holds_a_request_serves_it_latest_kept() {
        let mut p = Pool::default();
        let buf = |cap: usize| {
            let mut v = Vec::<f32>::with_capacity(cap);
            v.push(cap as f32);
            v
        };
        let ptr = |v: &Vec<f32>| v.as_ptr() as usize;
        let (a, b) = (buf(1000), buf(1000));
        let (pa, pb) = (ptr(&a), ptr(&b));
        p.give(a, 8000);
        p.give(b, 8000);
        assert_eq!(p.bytes, 8000);
        assert!(p.take::<f32>(1001).is_none(), "too small");
        assert!(
            p.take::<bf16>(800).is_none(),
            "each type has its own buffers"
        );
        // Over the limit, the buffer that came in first goes.
        let c = buf(1000);
        let pc = ptr(&c);
        p.give(c, 8000);
        assert_eq!(p.bytes, 8000);
        let got: Vec<usize> = (0..3)
            .filter_map(|_| p.take::<f32>(600))
            .map(|v| ptr(&v))
            .collect();
        assert_eq!(got, vec![pc, pb], "a ({pa:#x}) was dropped");
        assert_eq!(p.bytes, 0);
        // The smallest that fits is taken.
        p.give(buf(3000), 1 << 20);
        p.give(buf(2000), 1 << 20);
        assert_eq!(p.take::<f32>(1500).map(|v| v.capacity()), Some(2000));
        // Releasing drops everything of every type.
        p.give(Vec::<bf16>::with_capacity(100), 1 << 20);
        assert_eq!(p.clear(), 3000 * 4 + 100 * 2);
        assert_eq!(p.bytes, 0);
        assert!(p.take::<f32>(3000).is_none() && p.take::<bf16>(100).is_none());
        // An idle buffer serves a request however much smaller, the smallest first.
        p.give(buf(50_000), 1 << 20);
        p.give(buf(9_000), 1 << 20);
        assert_eq!(p.take::<f32>(10).map(|v| v.capacity()), Some(9_000));
        assert_eq!(p.take::<f32>(10).map(|v| v.capacity()), Some(50_000));
    }

    #[test]
    fn taken_buffers_are_stale_and_tensors_come_back() {
        // This test's own pool: the process's is shared with the tests running beside it.
        static OWN: Shared = Mutex::new(None);
        let n = 1_234_567;
        let mut v = take_from::<f32>(&OWN, n);
        assert!(v.capacity() >= 2 * n, "a new buffer has room to grow");
        assert_eq!(v.len(), n);
        if cfg!(debug_assertions) {
            assert!(v.iter().all(|x| x.is_nan()), "test builds hand out NaN");
        }
        v[7] = 3.0;
        let ptr = v.as_ptr();
        give_to(&OWN, v);
        let again = take_any::<f32>(&OWN, n - 10);
        assert_eq!(again.as_ptr(), ptr, "reused");
        assert_eq!(again.len(), n - 10);
        assert_eq!(again[7], 3.0, "stale contents, not cleared");
        // A tensor's storage comes back through `recycle`.
        let t = Tensor::from_vec(again, n - 10, &Device::Cpu).unwrap();
        recycle_to(&OWN, &t);
        let back = take_from::<f32>(&OWN, n);
        assert_eq!(back.as_ptr(), ptr);
        // Views are left alone.
        let t = Tensor::from_vec(take_from::<bf16>(&OWN, 32), (4, 8), &Device::Cpu).unwrap();
        let view = t.narrow(0, 1, 2).unwrap();
        recycle_to(&OWN, &view);
        assert_eq!(t.to_vec2::<bf16>().unwrap().len(), 4);
    }
}
