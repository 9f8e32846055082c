//! `cargo xtask test`: the whole test suite as CI runs it — format checks, the guest plugins'
//! unit tests, then every test of the workspace under cargo-nextest (installed when missing).

use crate::process::{available, cargo, run as run_cmd};
use crate::workspace_root;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    if !available("cargo", &["nextest", "--version"]) {
        run_cmd(cargo().args(["install", "cargo-nextest", "--locked"]))?;
    }
    if !available("python3", &["-m", "pip", "--version"]) {
        eprintln!("warning: python3 with pip is missing; the test that fetches the all-MiniLM-L6-v2 wheel will fail");
    }
    crate::plugins::ensure_target()?;
    let plugins = root.join("plugins/Cargo.toml");
    if available("cargo", &["fmt", "--version"]) {
        run_cmd(cargo().args(["fmt", "--all", "--check"]).current_dir(&root))?;
        run_cmd(cargo().args(["fmt", "--all", "--check", "--manifest-path"]).arg(&plugins))?;
    }
    // The guest crates' own unit tests, natively, one plugin at a time (kind features).
    let target = crate::target_dir().join("plugins");
    for src in crate::plugins::shipped()? {
        let name = src.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        run_cmd(
            cargo()
                .args(["test", "-q", "--manifest-path"])
                .arg(&plugins)
                .args(["-p", &name, "--target-dir"])
                .arg(&target),
        )?;
    }
    run_cmd(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(args).current_dir(&root))
}
