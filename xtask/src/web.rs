//! `cargo xtask web`: the dashboard's browser bundle — `web/frontend` for
//! wasm32-unknown-unknown, then wasm-bindgen (installed at the exact version the lockfile
//! pins when missing) into `<target>/site/pkg`, where `tuneforge serve` finds it, with a
//! gzip copy of each file beside it (served to browsers that accept gzip: the wasm is ~4x
//! smaller).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use crate::process::{available, cargo, run as run_cmd};
use crate::{target_dir, workspace_root};

/// Must equal the `wasm-bindgen` that web/frontend pins.
const WASM_BINDGEN: &str = "0.2.130";
const TARGET: &str = "wasm32-unknown-unknown";

fn ensure_tools() -> anyhow::Result<()> {
    if available("rustup", &["--version"]) {
        let installed = Command::new("rustup")
            .args(["target", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET))
            .unwrap_or(false);
        if !installed {
            run_cmd(Command::new("rustup").args(["target", "add", TARGET]))?;
        }
    }
    let version =
        Command::new("wasm-bindgen").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if !version.as_deref().is_ok_and(|v| v.trim().ends_with(WASM_BINDGEN)) {
        eprintln!("installing wasm-bindgen-cli {WASM_BINDGEN} (a few minutes, once)");
        run_cmd(cargo().args(["install", "wasm-bindgen-cli", "--version", WASM_BINDGEN]))?;
    }
    Ok(())
}

/// Builds the bundle and returns the directory it is in.
pub fn build() -> anyhow::Result<PathBuf> {
    ensure_tools()?;
    let frontend = workspace_root().join("web/frontend/Cargo.toml");
    let build_dir = target_dir().join("web-frontend");
    run_cmd(
        cargo()
            .args(["build", "--release", "--target", TARGET, "--manifest-path"])
            .arg(&frontend)
            .arg("--target-dir")
            .arg(&build_dir)
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    let wasm = build_dir.join(TARGET).join("release").join("tuneforge_web_frontend.wasm");
    if !wasm.is_file() {
        bail!("the frontend build left no {}", wasm.display());
    }
    let pkg = target_dir().join("site/pkg");
    run_cmd(
        Command::new("wasm-bindgen")
            .args(["--target", "web", "--no-typescript", "--out-name", "tuneforge_web", "--out-dir"])
            .arg(&pkg)
            .arg(&wasm),
    )
    .context("running wasm-bindgen")?;
    let files = ["tuneforge_web.js", "tuneforge_web_bg.wasm"].map(|f| pkg.join(f));
    if available("gzip", &["--version"]) {
        run_cmd(Command::new("gzip").args(["-9", "--keep", "--force", "--no-name"]).args(&files))?;
    } else {
        // The server sends the files uncompressed then (and ignores a .gz older than its file).
        eprintln!("warning: no gzip on PATH; the dashboard's bundle will be served uncompressed");
    }
    Ok(pkg)
}

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    let pkg = build()?;
    println!("dashboard bundle in {} (tuneforge serve picks it up)", pkg.display());
    Ok(())
}
