//! Helpers for the workspace-level tests: building the guest plugins of `plugins/` and
//! installing them into a test's own plugin directory; a WebDriver client for the browser tests.

pub mod webdriver;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tuneforge_plugin_runtime::package::{BuildOptions, build, install};
use tuneforge_plugin_runtime::{InstalledPlugin, Limits, Manifest};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where guest plugins are built: `$CARGO_TARGET_DIR/plugins`, else `target/plugins`.
pub fn plugin_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("plugins"),
        None => repo_root().join("target/plugins"),
    }
}

/// Builds the plugin in `plugins/<name>` (once per test process) and returns its component.
pub fn built(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> = OnceLock::new();
    let map = BUILT.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(name) {
        return p.clone();
    }
    let src = repo_root().join("plugins").join(name);
    let wasm = build(&src, &BuildOptions { target_dir: Some(plugin_target_dir()), debug: false })
        .unwrap_or_else(|e| panic!("building plugins/{name}: {e}"));
    map.insert(name.into(), wasm.clone());
    wasm
}

/// Builds and installs `plugins/<name>` into `home`.
pub fn installed(name: &str, home: &Path) -> InstalledPlugin {
    let src = repo_root().join("plugins").join(name);
    install(&src, &built(name), home).unwrap_or_else(|e| panic!("installing {name}: {e}"))
}

/// Installs `plugins/<name>` into `home` with `limits` in place of its manifest's.
pub fn installed_with_limits(name: &str, home: &Path, limits: Limits) -> PathBuf {
    let p = installed(name, home);
    let mut m: Manifest = p.manifest.clone();
    m.limits = limits;
    std::fs::write(&p.manifest_path, m.to_toml()).expect("rewrite manifest");
    p.manifest_path.parent().map(Path::to_path_buf).unwrap_or_default()
}
