//! Runtime tuning for the CPU: the allocator, candle's worker pool, and where decoding
//! loops run ([`on_pool`]).
//!
//! Every candle op allocates its output, and autograd accumulates gradients into fresh
//! tensors. With glibc's defaults, blocks above a (dynamic) threshold are `mmap`ed and
//! returned to the kernel when freed, so each large tensor pays page faults and the
//! kernel zeroing its pages again: measured here, `zeros_like + add` on 8 MB took 3.8 ms
//! with the defaults and 0.4 ms with the settings below, and a linear layer's forward and
//! backward 50 ms against 28 ms. Keeping freed memory in the heap for reuse removes that.

//!
//! candle's CPU backend also runs a pool of worker threads that spin for 25,000 rounds
//! after each op before parking; on a machine with few cores those spinning workers take
//! the core that rayon (matrix products, the fused kernels) needs next. A short spin
//! (`CANDLE_BARRIER_POOL_SPIN_LIMIT=1000`) made the benchmark's training step ~8% faster
//! on 2 cores (0.72-0.77 s -> 0.67-0.68 s).

/// Applies the tuning once per process; call it before the first tensor operation (the
/// model constructors do). The allocator part (glibc on Linux only) is skipped when the
/// environment sets glibc's `MALLOC_*_` variables or `TOOLTRAIN_MALLOC_DEFAULTS=1`; the
/// spin limit when `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set.
pub fn tune_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            // Read once, when candle creates its pool on the first parallel op.
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
        }
        let user_set = std::env::vars().any(|(k, _)| k.starts_with("MALLOC_") && k.ends_with('_'));
        if user_set || std::env::var("TOOLTRAIN_MALLOC_DEFAULTS").is_ok_and(|v| v == "1") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; it is called once, before
        // the model allocates its tensors.
        unsafe {
            // Blocks up to 32 MiB (glibc's maximum) come from the heap, freed memory stays
            // there (no trimming), and the heap grows in 256 MiB steps.
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    });
}

/// Runs `f` on a worker thread of rayon's global pool when `device` is the CPU (directly
/// when the caller already is one, or for another device, whose work stays on the
/// calling thread). Loops of many short parallel kernels, such as decoding steps, run
/// there: each kernel's parallel work is then split among the workers directly, where
/// from a thread outside the pool every kernel is injected into the pool, wakes a worker
/// and puts the caller to sleep until it is done. On 2 cores (AMD Zen 5) this made a
/// 64-episode rollout's decoding passes about 13% faster, SmolLM2 decoding with short
/// prompts 1.38x and a 12M model's 1.46x (README, "Speed"). Passes of large products
/// (training, prefill) gained nothing, and their allocations then come from the workers'
/// own allocator arenas, so they stay on the caller.
pub(crate) fn on_pool<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() && rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::on_pool;
    use candle_core::Device;

    #[test]
    fn cpu_work_runs_on_a_pool_worker_and_nested_calls_stay_there() {
        let outside = rayon::current_thread_index();
        assert!(
            outside.is_none(),
            "the test harness thread is not a rayon worker"
        );
        let (first, nested) = on_pool(&Device::Cpu, || {
            let here = rayon::current_thread_index();
            let nested = on_pool(&Device::Cpu, rayon::current_thread_index);
            (here, nested)
        });
        assert!(first.is_some(), "the work ran on a worker");
        assert_eq!(nested, first, "a call from a worker runs in place");
        // Results and panics come back to the caller.
        assert_eq!(on_pool(&Device::Cpu, || 41 + 1), 42);
        let caught = std::panic::catch_unwind(|| on_pool(&Device::Cpu, || panic!("in the pool")));
        assert!(caught.is_err());
    }
}
