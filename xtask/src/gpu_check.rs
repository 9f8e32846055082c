//! `cargo xtask gpu-check`: builds the CUDA tests, the GPU benchmark and the `tuneforge`
//! binary with `--features cuda,nccl` (in `<target>/cuda`, apart from the CPU build) and runs
//! `bench/gpu-check.sh` on them. With `--bundle DIR` it only gathers the three binaries
//! (stripped and compressed with xz) and the scripts into DIR, for a GPU machine that has the
//! driver and CUDA libraries but no Rust toolchain: there, `bash DIR/gpu-check.sh
//! DIR/cuda-tests.xz DIR/gpu-bench.xz OUT DIR/tuneforge.xz`.
//!
//! Building needs nvcc (CUDA 12.4+ or 13; `CUDA_COMPUTE_CAP`, e.g. 90 for Hopper, when no GPU
//! is visible to detect it). Linking needs the CUDA libraries or their stubs on the linker
//! path (`CUDA_ROOT`/`CUDA_PATH` `lib/stubs`); see ARCHITECTURE.md for building on a machine
//! without a GPU.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::process::{cargo, output, run as run_cmd};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut bundle = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bundle" => bundle = Some(PathBuf::from(it.next().context("--bundle needs a directory")?)),
            other => bail!("gpu-check: unknown argument `{other}` (usage: gpu-check [--bundle DIR])"),
        }
    }
    if !crate::process::available("nvcc", &["--version"]) {
        bail!(
            "gpu-check builds with --features cuda and needs nvcc on PATH (the CUDA toolkit, or PyPI's \
             nvidia-cuda-nvcc + nvidia-nvvm + nvidia-cuda-runtime + nvidia-cuda-crt + nvidia-cuda-cccl)"
        );
    }
    let tests = build("tuneforge-core", "test", &["--no-run", "--test", "cuda"])?;
    let bench = build("tuneforge-core", "build", &["--example", "gpu-bench"])?;
    let cli = build("tuneforge-cli", "build", &["--bin", "tuneforge"])?;
    let script = crate::workspace_root().join("bench").join("gpu-check.sh");
    match bundle {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            pack(&tests, &dir.join("cuda-tests"))?;
            pack(&bench, &dir.join("gpu-bench"))?;
            pack(&cli, &dir.join("tuneforge"))?;
            for file in [&script, &script.with_file_name("pytorch_gpu_bench.py")] {
                let name = file.file_name().context("script name")?;
                std::fs::copy(file, dir.join(name)).with_context(|| format!("cannot copy {}", file.display()))?;
            }
            println!(
                "bundle in {}: on the GPU machine run `bash gpu-check.sh cuda-tests.xz gpu-bench.xz OUT_DIR tuneforge.xz` there",
                dir.display()
            );
            Ok(())
        }
        None => {
            let out = crate::target_dir().join("gpu-check");
            run_cmd(std::process::Command::new("bash").arg(&script).arg(&tests).arg(&bench).arg(&out).arg(&cli))
        }
    }
}

/// Builds one target of `package` with CUDA and NCCL and returns the executable cargo reports.
fn build(package: &str, verb: &str, target: &[&str]) -> anyhow::Result<PathBuf> {
    let json = output(
        cargo()
            .arg(verb)
            .args(["-p", package, "--features", "nccl", "--message-format=json"])
            .args(target)
            .env("CARGO_TARGET_DIR", crate::target_dir().join("cuda"))
            .current_dir(crate::workspace_root()),
    )?;
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .next_back()
        .with_context(|| format!("cargo {verb} {target:?} reported no executable"))
}

/// A stripped, xz-compressed copy of `bin` at `<dest>.xz` (xz, not gzip: the three binaries
/// then fit a device machine's 64 MiB transfer).
fn pack(bin: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::copy(bin, dest).with_context(|| format!("cannot copy {}", bin.display()))?;
    run_cmd(std::process::Command::new("strip").arg(dest))?;
    run_cmd(std::process::Command::new("xz").args(["-f", "-9", "-T0"]).arg(dest))
}
