//! tuneforge's plugin runtime: runs WebAssembly components written against `wit/` in a
//! sandbox and offers them to the training core as [`tuneforge_core::hooks`].
//!
//! This crate is the only one that knows wasmtime, and `bindings.rs` is the only `bindgen!`
//! site; generated types are converted into host types in `calls.rs` and never leave.
//! Plugins get no files, network, environment or arguments: only the `host` interface
//! (log, their config, the label names, and assets their manifest declares and the experiment
//! grants). Every call runs under fuel, a wall-clock deadline and a memory limit; a trap, a
//! limit hit, a malformed answer or a plugin's own error becomes a [`PluginError`] naming the
//! plugin, the function and the cause.

mod bindings;
mod calls;
mod hooks;
pub mod manifest;
pub mod package;
pub mod predictor;
mod runtime;

use std::path::{Path, PathBuf};

pub use calls::LossAnswer;
pub use hooks::RuntimeHooks;
pub use manifest::{
    CURRENT_API_VERSION, InstalledPlugin, Limits, Manifest, PluginKind, SUPPORTED_API_VERSIONS, sha256_hex,
};
pub use predictor::Predictor;
pub use runtime::{PluginInstance, PluginRuntime, PluginSetup};

/// Everything that can go wrong with a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {field}: {message}", path.display())]
    Manifest { path: PathBuf, field: String, message: String },
    #[error("plugin `{name}` is not installed in {} (install it with `tuneforge plugin build`; see `tuneforge plugin list`)", dir.display())]
    NotInstalled { name: String, dir: PathBuf },
    #[error("plugin `{plugin}` {message}")]
    Load { plugin: String, message: String },
    #[error("plugin `{plugin}`, function `{function}`: {cause}")]
    Call { plugin: String, function: String, cause: String },
    #[error("plugin engine: {0}")]
    Engine(String),
}

impl PluginError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

/// Where installed plugins live: `$TUNEFORGE_PLUGIN_DIR`, else the user's data directory
/// (`~/.local/share/tuneforge/plugins` on Linux).
pub fn plugin_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("TUNEFORGE_PLUGIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("tuneforge/plugins")
}

/// The directory of the installed plugin `name` in `home`.
pub fn installed_dir(home: &Path, name: &str) -> Result<PathBuf, PluginError> {
    let dir = home.join(name);
    if manifest::valid_name(name) && dir.join("plugin.toml").is_file() {
        Ok(dir)
    } else {
        Err(PluginError::NotInstalled { name: name.into(), dir: home.to_path_buf() })
    }
}

/// The installed plugins in `home`, by name. Broken ones are reported with their error.
pub fn list_installed(home: &Path) -> Vec<(PathBuf, Result<InstalledPlugin, PluginError>)> {
    let Ok(entries) = std::fs::read_dir(home) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.join("plugin.toml").is_file()).collect();
    dirs.sort();
    dirs.into_iter().map(|d| (d.clone(), InstalledPlugin::open(&d).map(|(p, _)| p))).collect()
}

/// A TOML table as the `config()` pairs a plugin sees: strings as they are, everything else
/// as its TOML text.
pub fn config_pairs(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_keep_their_toml_text() {
        let t: toml::Table = toml::from_str("a = \"x y\"\nb = 0.5\nc = true\nd = [1, 2]").expect("toml");
        let pairs = config_pairs(&t);
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("a"), Some("x y"));
        assert_eq!(get("b"), Some("0.5"));
        assert_eq!(get("c"), Some("true"));
        assert_eq!(get("d"), Some("[1, 2]"));
    }

    #[test]
    fn unknown_plugins_are_named_with_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = installed_dir(dir.path(), "nope").expect_err("missing").to_string();
        assert!(err.contains("`nope`") && err.contains("tuneforge plugin build"), "{err}");
        assert!(installed_dir(dir.path(), "../etc").is_err());
    }
}
