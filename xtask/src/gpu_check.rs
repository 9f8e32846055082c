//! `cargo xtask gpu-check`: builds the CUDA tests, the GPU benchmark and the `tuneforge`
//! binary with `--features cuda,nccl` (in `<target>/cuda`, apart from the CPU build) and runs
//! `bench/gpu-check.sh` on them. With `--bundle DIR` it only gathers the three binaries
//! (stripped and compressed with xz) and the scripts into DIR, for a GPU machine that has the
//! driver and CUDA libraries but no Rust toolchain: there, `bash DIR/gpu-check.sh
//! DIR/cuda-tests.xz DIR/gpu-bench.xz OUT DIR/tuneforge.xz`.
//!
//! `--variant PATCH` also builds the benchmark against the workspace's candle-core changed by
//! PATCH (a unified diff of its sources, applied to a copy in the target directory), and
//! `--variant upstream` against candle-core as released (`vendor/candle-core.patch` taken
//! back out); the script runs it after the plain build on each workload: a change to candle
//! measured against its baseline in the same run.
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
    let mut variant = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bundle" => bundle = Some(PathBuf::from(it.next().context("--bundle needs a directory")?)),
            "--variant" => variant = Some(it.next().context("--variant needs a patch file or `upstream`")?.clone()),
            other => {
                bail!(
                    "gpu-check: unknown argument `{other}` (usage: gpu-check [--bundle DIR] [--variant PATCH|upstream])"
                )
            }
        }
    }
    if !crate::process::available("nvcc", &["--version"]) {
        bail!(
            "gpu-check builds with --features cuda and needs nvcc on PATH (the CUDA toolkit, or PyPI's \
             nvidia-cuda-nvcc + nvidia-nvvm + nvidia-cuda-runtime + nvidia-cuda-crt + nvidia-cuda-cccl)"
        );
    }
    let tests = build("tuneforge-core", "test", &["--no-run", "--test", "cuda"], "cuda-tests")?;
    let bench = build("tuneforge-core", "build", &["--example", "gpu-bench"], "gpu-bench")?;
    let cli = build("tuneforge-cli", "build", &["--bin", "tuneforge"], "tuneforge")?;
    let variant = variant.map(|v| build_variant(&v)).transpose()?;
    let script = crate::workspace_root().join("bench").join("gpu-check.sh");
    match bundle {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            pack(&tests, &dir.join("cuda-tests"))?;
            pack(&bench, &dir.join("gpu-bench"))?;
            pack(&cli, &dir.join("tuneforge"))?;
            if let Some(v) = &variant {
                pack(v, &dir.join("gpu-bench-variant"))?;
            }
            for file in [&script, &script.with_file_name("pytorch_gpu_bench.py")] {
                let name = file.file_name().context("script name")?;
                std::fs::copy(file, dir.join(name)).with_context(|| format!("cannot copy {}", file.display()))?;
            }
            println!(
                "bundle in {}: on the GPU machine run `bash gpu-check.sh cuda-tests.xz gpu-bench.xz OUT_DIR tuneforge.xz{}` there",
                dir.display(),
                if variant.is_some() { " gpu-bench-variant.xz" } else { "" }
            );
            Ok(())
        }
        None => {
            let out = crate::target_dir().join("gpu-check");
            let mut cmd = std::process::Command::new("bash");
            cmd.arg(&script).arg(&tests).arg(&bench).arg(&out).arg(&cli).args(&variant);
            run_cmd(&mut cmd)
        }
    }
}

/// Builds one target of `package` with CUDA and NCCL and returns a copy of the executable
/// cargo reports, named `name` in `<target>/cuda/gpu-check`: cargo's own path is shared by
/// every build of that target (the variant's overwrites the plain benchmark's).
fn build(package: &str, verb: &str, target: &[&str], name: &str) -> anyhow::Result<PathBuf> {
    let json = output(
        cargo()
            .arg(verb)
            .args(["-p", package, "--features", "nccl", "--message-format=json"])
            .args(target)
            .env("CARGO_TARGET_DIR", crate::target_dir().join("cuda"))
            .current_dir(crate::workspace_root()),
    )?;
    let built = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .next_back()
        .with_context(|| format!("cargo {verb} {target:?} reported no executable"))?;
    let dir = crate::target_dir().join("cuda").join("gpu-check");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dest = dir.join(name);
    std::fs::copy(&built, &dest).with_context(|| format!("cannot copy {} to {}", built.display(), dest.display()))?;
    Ok(dest)
}

/// The GPU benchmark built against a copy of the workspace's candle-core with `variant`
/// applied (a patch file for `patch -p1` in the crate's root, or `upstream`: the vendored
/// patch reversed), as `gpu-bench-variant`. The workspace's Cargo.lock, which a `[patch]`
/// rewrites, is put back whether the build succeeds or fails.
fn build_variant(variant: &str) -> anyhow::Result<PathBuf> {
    if !crate::process::available("patch", &["--version"]) {
        bail!("--variant needs the `patch` program (Debian: apt-get install patch)");
    }
    let root = crate::workspace_root();
    let (patch, reverse) = match variant {
        "upstream" => (root.join("vendor").join("candle-core.patch"), true),
        file => (PathBuf::from(file), false),
    };
    let patch = std::fs::canonicalize(&patch).with_context(|| format!("cannot read the patch {}", patch.display()))?;
    let metadata = output(cargo().args(["metadata", "--format-version", "1"]).current_dir(&root))?;
    let metadata: serde_json::Value = serde_json::from_str(&metadata).context("cargo metadata")?;
    let manifest = metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == "candle-core"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cargo metadata lists no candle-core")?;
    let source = Path::new(manifest).parent().context("candle-core's manifest has no directory")?;
    let copy = crate::target_dir().join("cuda").join("candle-core-variant");
    if copy.exists() {
        std::fs::remove_dir_all(&copy).with_context(|| format!("cannot remove {}", copy.display()))?;
    }
    run_cmd(std::process::Command::new("cp").arg("-r").arg(source).arg(&copy))?;
    run_cmd(
        std::process::Command::new("patch")
            .args(["-p1", "--quiet", "-d"])
            .arg(&copy)
            .args(reverse.then_some("-R"))
            .arg("-i")
            .arg(&patch),
    )
    .with_context(|| format!("{} does not apply to {}", patch.display(), source.display()))?;
    let lock = root.join("Cargo.lock");
    let saved = std::fs::read(&lock).context("cannot read Cargo.lock")?;
    let patched = format!("patch.crates-io.candle-core.path={:?}", copy.display().to_string());
    let built =
        build("tuneforge-core", "build", &["--example", "gpu-bench", "--config", &patched], "gpu-bench-variant");
    std::fs::write(&lock, saved).context("cannot restore Cargo.lock")?;
    built
}

/// A stripped, xz-compressed copy of `bin` at `<dest>.xz` (xz, not gzip: the three binaries
/// then fit a device machine's 64 MiB transfer).
fn pack(bin: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::copy(bin, dest).with_context(|| format!("cannot copy {}", bin.display()))?;
    run_cmd(std::process::Command::new("strip").arg(dest))?;
    run_cmd(std::process::Command::new("xz").args(["-f", "-9", "-T0"]).arg(dest))
}
