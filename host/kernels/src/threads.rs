//! Thread settings that candle reads from the environment, made once at start-up.
//!
//! - One pool of worker threads for the CPU work, not two. candle 0.11 runs its elementwise
//!   binary ops on a pool of its own ("barrier pool", one worker per core but one) whose
//!   workers spin between ops, while its matrix products (gemm) and our fused ops run on
//!   rayon's pool, whose idle workers spin too. With as many busy threads as cores, each
//!   pool's work found the other's workers spinning on the same cores: on 2 cores, 10-11% of
//!   a training step (`perf`: rayon's idle loop and candle's barrier). `CANDLE_NUM_THREADS=1`
//!   keeps the elementwise ops on the calling thread and leaves the cores to rayon: +10%
//!   tokens/s for full fine-tuning and for the frozen-prefix cache on 2 cores.
//! - The thread count, counted once. Without `RAYON_NUM_THREADS` candle counts the physical
//!   cores before every matrix product, by parsing `/proc/cpuinfo` (`num_cpus`). Setting it to
//!   that count keeps candle's choice and reads it from the environment instead: +11%
//!   tokens/s for batch-1 inference (many small products) on 2 cores.
#![allow(unsafe_code)]

/// Sets `CANDLE_NUM_THREADS=1` and `RAYON_NUM_THREADS` where the environment does not set
/// them; call once at the start of `main`, before any thread starts. Returns the variables it
/// set. The thread count is the number of physical cores (what candle counts), but no more
/// than the CPUs this process may use (`available_parallelism` follows cgroup quotas, so a
/// container limited to 2 CPUs on a large host gets 2 threads).
pub fn tune_threads() -> Vec<&'static str> {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = num_cpus::get_physical().clamp(1, allowed.max(1));
    let mut set = Vec::new();
    for (name, value) in [("CANDLE_NUM_THREADS", 1), ("RAYON_NUM_THREADS", threads)] {
        if std::env::var_os(name).is_none() {
            // SAFETY: called at the start of `main`, before the program starts any thread, so
            // no other thread can read or write the environment concurrently.
            unsafe { std::env::set_var(name, value.to_string()) };
            set.push(name);
        }
    }
    set
}
