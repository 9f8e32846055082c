//! With the `cuda` feature, compiles tuneforge's CUDA kernels (`cuda/kernels.cu`) to
//! PTX with nvcc (the same nvcc candle's own kernels need): `NVCC`, else
//! `$CUDA_ROOT/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, else `nvcc` on the PATH. The PTX targets
//! `compute_$CUDA_COMPUTE_CAP` (80 when unset: bf16 needs Ampere or newer), which the driver
//! compiles for the GPU it runs on. Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda/kernels.cu");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        ["CUDA_ROOT", "CUDA_PATH"]
            .iter()
            .filter_map(std::env::var_os)
            .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").map(|c| c.replace('.', "")).unwrap_or_else(|_| "80".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "cuda/kernels.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {} for the `cuda` feature: {e} (set NVCC or CUDA_ROOT)", nvcc.display()));
    assert!(status.success(), "{} failed to compile cuda/kernels.cu", nvcc.display());
}
