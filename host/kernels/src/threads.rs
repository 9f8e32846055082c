//! One pool of worker threads for the CPU work, not two.
//!
//! candle 0.11 runs its elementwise binary ops on a pool of its own ("barrier pool", one
//! worker per core but one) whose workers spin between ops, while its matrix products (gemm)
//! and our fused ops run on rayon's pool, whose idle workers spin too. With as many busy
//! threads as cores, every op of one pool finds the other pool's workers spinning on the
//! same cores: on 2 cores, 10-11% of a training step went to that (`perf`: rayon's idle
//! loop and candle's barrier). Setting `CANDLE_NUM_THREADS=1` before candle starts its pool
//! keeps the elementwise ops on the calling thread and leaves the cores to rayon: +10%
//! tokens/s for full fine-tuning and for the frozen-prefix cache on 2 cores.
#![allow(unsafe_code)]

/// Sets `CANDLE_NUM_THREADS=1` unless the environment already sets it; call once at the
/// start of `main`, before any thread starts. Returns whether it set the variable.
pub fn single_candle_pool() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return false;
    }
    // SAFETY: called at the start of `main`, before the program starts any thread, so no
    // other thread can read or write the environment concurrently.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    true
}
