//! Building a plugin crate for `wasm32-wasip2` and installing it: the component next to an
//! installed manifest that names its SHA-256. Used by `tuneforge plugin build`, `cargo xtask`
//! and the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::PluginError;
use crate::manifest::{InstalledPlugin, Manifest, sha256_hex};

/// The target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// How to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Cargo's target directory; cargo's default when `None`.
    pub target_dir: Option<PathBuf>,
    /// Build without `--release` (faster to compile, slower to run).
    pub debug: bool,
}

/// Builds the plugin crate in `src` (the folder with `Cargo.toml` and `plugin.toml`) and
/// returns the path of its component.
pub fn build(src: &Path, options: &BuildOptions) -> Result<PathBuf, PluginError> {
    let cargo_toml = src.join("Cargo.toml");
    let manifest = Manifest::read(&src.join("plugin.toml"))?;
    if !cargo_toml.is_file() {
        return Err(PluginError::io(&cargo_toml, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--target").arg(TARGET).arg("--manifest-path").arg(&cargo_toml);
    cmd.arg("--message-format=json-render-diagnostics");
    if !options.debug {
        cmd.arg("--release");
    }
    if let Some(dir) = &options.target_dir {
        cmd.arg("--target-dir").arg(dir);
    }
    // A parent cargo's settings for the host must not leak into the guest build.
    for var in ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd.stderr(std::process::Stdio::inherit());
    let out = cmd
        .output()
        .map_err(|e| PluginError::Load { plugin: manifest.name.clone(), message: format!("cannot run cargo: {e}") })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(PluginError::Load {
            plugin: manifest.name.clone(),
            message: format!("failed to build ({}); is the target installed? `rustup target add {TARGET}`", out.status),
        });
    }
    let package = package_name(&cargo_toml)?;
    let mut found = None;
    for line in stdout.lines() {
        if !line.contains("\"compiler-artifact\"") || !line.contains(".wasm\"") {
            continue;
        }
        let Some(name) = json_string(line, "\"target\":{") else { continue };
        if name.replace('-', "_") != package.replace('-', "_") {
            continue;
        }
        if let Some(path) = wasm_filename(line) {
            found = Some(PathBuf::from(path));
        }
    }
    found.ok_or_else(|| PluginError::Load {
        plugin: manifest.name,
        message: format!("cargo built no `.wasm` for package `{package}`: is it `crate-type = [\"cdylib\"]`?"),
    })
}

fn package_name(cargo_toml: &Path) -> Result<String, PluginError> {
    let text = std::fs::read_to_string(cargo_toml).map_err(|e| PluginError::io(cargo_toml, e))?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| PluginError::Manifest {
        path: cargo_toml.to_path_buf(),
        field: "<toml>".into(),
        message: e.to_string(),
    })?;
    value.get("package").and_then(|p| p.get("name")).and_then(|n| n.as_str()).map(str::to_string).ok_or_else(|| {
        PluginError::Manifest {
            path: cargo_toml.to_path_buf(),
            field: "package.name".into(),
            message: "missing".into(),
        }
    })
}

/// The `"name"` right after `anchor` in a cargo JSON message.
fn json_string(line: &str, anchor: &str) -> Option<String> {
    let rest = &line[line.find(anchor)? + anchor.len()..];
    let rest = &rest[rest.find("\"name\":\"")? + 8..];
    Some(rest[..rest.find('"')?].to_string())
}

/// The `.wasm` entry of `"filenames":[...]`.
fn wasm_filename(line: &str) -> Option<String> {
    let rest = &line[line.find("\"filenames\":[")? + 13..];
    let list = &rest[..rest.find(']')?];
    list.split(',').map(|s| s.trim().trim_matches('"')).find(|s| s.ends_with(".wasm")).map(|s| s.replace("\\\\", "\\"))
}

/// Installs the component `wasm` with the source manifest of `src` into `home/<name>/`,
/// replacing an older install atomically (staged directory, then rename).
pub fn install(src: &Path, wasm: &Path, home: &Path) -> Result<InstalledPlugin, PluginError> {
    let mut manifest = Manifest::read(&src.join("plugin.toml"))?;
    let bytes = std::fs::read(wasm).map_err(|e| PluginError::io(wasm, e))?;
    manifest.wasm = Some(PathBuf::from("plugin.wasm"));
    manifest.sha256 = Some(sha256_hex(&bytes));
    std::fs::create_dir_all(home).map_err(|e| PluginError::io(home, e))?;
    let staging = home.join(format!(".staging-{}-{}", manifest.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| PluginError::io(&staging, e))?;
    std::fs::write(staging.join("plugin.wasm"), &bytes).map_err(|e| PluginError::io(&staging, e))?;
    std::fs::write(staging.join("plugin.toml"), manifest.to_toml()).map_err(|e| PluginError::io(&staging, e))?;
    let dest = home.join(&manifest.name);
    let old = home.join(format!(".old-{}-{}", manifest.name, std::process::id()));
    if dest.exists() {
        std::fs::rename(&dest, &old).map_err(|e| PluginError::io(&dest, e))?;
    }
    std::fs::rename(&staging, &dest).map_err(|e| PluginError::io(&dest, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(InstalledPlugin::open(&dest)?.0)
}

/// Builds and installs in one go.
pub fn build_and_install(src: &Path, home: &Path, options: &BuildOptions) -> Result<InstalledPlugin, PluginError> {
    let wasm = build(src, options)?;
    install(src, &wasm, home)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_artifact_lines_give_the_component() {
        let line = r#"{"reason":"compiler-artifact","package_id":"x","target":{"kind":["cdylib"],"crate_types":["cdylib"],"name":"text_clean","src_path":"/p/src/lib.rs"},"filenames":["/t/wasm32-wasip2/release/text_clean.wasm"],"fresh":true}"#;
        assert_eq!(json_string(line, "\"target\":{").as_deref(), Some("text_clean"));
        assert_eq!(wasm_filename(line).as_deref(), Some("/t/wasm32-wasip2/release/text_clean.wasm"));
    }
}
