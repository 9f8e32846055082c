//! `cargo xtask plugins`: builds the plugins that ship in `plugins/` for wasm32-wasip2 and
//! installs them into the plugin directory (`$TUNEFORGE_PLUGIN_DIR` or the user's data
//! directory), one at a time (each enables its own kind feature of the SDK).

use std::path::{Path, PathBuf};

use anyhow::Context;
use tuneforge_plugin_runtime::package::{BuildOptions, TARGET, build_and_install};
use tuneforge_plugin_runtime::{InstalledPlugin, plugin_home};

use crate::process::{available, run as run_cmd};
use crate::{target_dir, workspace_root};

/// The test subject in `plugins/hostile` is not installed for users.
const NOT_SHIPPED: &[&str] = &["hostile", "sdk"];

/// Makes sure the wasm32-wasip2 standard library is installed (rustup).
pub fn ensure_target() -> anyhow::Result<()> {
    if available("rustup", &["--version"]) {
        let installed = std::process::Command::new("rustup")
            .args(["target", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET))
            .unwrap_or(false);
        if !installed {
            run_cmd(std::process::Command::new("rustup").args(["target", "add", TARGET]))?;
        }
    }
    Ok(())
}

/// The shipped plugin crates.
pub fn shipped() -> anyhow::Result<Vec<PathBuf>> {
    let dir = workspace_root().join("plugins");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("plugin.toml").is_file())
        .filter(|p| !NOT_SHIPPED.iter().any(|n| p.file_name().is_some_and(|f| f == *n)))
        .collect();
    out.sort();
    Ok(out)
}

/// Builds and installs every shipped plugin into `home`.
pub fn install_all(home: &Path) -> anyhow::Result<Vec<InstalledPlugin>> {
    ensure_target()?;
    let options = BuildOptions { target_dir: Some(target_dir().join("plugins")), debug: false };
    shipped()?
        .iter()
        .map(|src| build_and_install(src, home, &options).with_context(|| format!("building {}", src.display())))
        .collect()
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let home = match args {
        [flag, dir] if flag == "--home" => PathBuf::from(dir),
        [] => plugin_home(),
        _ => anyhow::bail!("usage: cargo xtask plugins [--home DIR]"),
    };
    for p in install_all(&home)? {
        let m = &p.manifest;
        println!("installed {:<26} {} {:<8} sha256 {}", m.name, m.version, m.kind.as_str(), &p.sha256[..16]);
    }
    println!("in {}", home.display());
    Ok(())
}
