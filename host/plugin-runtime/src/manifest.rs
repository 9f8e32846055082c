//! `plugin.toml`: what a plugin is, what it may read and how much it may use — checked
//! before a byte of its code runs.
//!
//! Two forms share one schema: the *source* manifest next to a plugin's `Cargo.toml` (no
//! `wasm`, no `sha256`) and the *installed* manifest that `tuneforge plugin build` writes next
//! to the built component (with both). Loading an installed plugin verifies the component's
//! SHA-256 against the manifest and the API version against the ones this host supports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::PluginError;

/// The manifest schema this host reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// The WIT package versions this host can run.
pub const SUPPORTED_API_VERSIONS: &[&str] = &["0.1.0"];
/// The API version new plugins are built against.
pub const CURRENT_API_VERSION: &str = "0.1.0";

/// The five kinds of plugin, one WIT world each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    Loss,
    Metric,
    Augment,
    Cleaner,
    Features,
}

impl PluginKind {
    pub const ALL: [PluginKind; 5] = [Self::Loss, Self::Metric, Self::Augment, Self::Cleaner, Self::Features];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loss => "loss",
            Self::Metric => "metric",
            Self::Augment => "augment",
            Self::Cleaner => "cleaner",
            Self::Features => "features",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-call and per-instance limits. Every field has a safe default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wasm fuel (about one unit per instruction) per call.
    #[serde(default = "default_fuel")]
    pub fuel_per_call: u64,
    /// Wall-clock deadline per call, in milliseconds (epoch interruption).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Linear memory the instance may grow to, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
}

fn default_fuel() -> u64 {
    2_000_000_000
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_memory_mib() -> u64 {
    128
}

impl Default for Limits {
    fn default() -> Self {
        Self { fuel_per_call: default_fuel(), timeout_ms: default_timeout_ms(), memory_mib: default_memory_mib() }
    }
}

/// A file a plugin may ask for by name; the experiment grants it a path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetDecl {
    /// What the asset is, for the person granting it.
    #[serde(default)]
    pub description: String,
    /// Largest size the host will read, in MiB.
    #[serde(default = "default_asset_mib")]
    pub max_mib: u64,
}

fn default_asset_mib() -> u64 {
    64
}

/// `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub name: String,
    pub version: String,
    pub kind: PluginKind,
    /// The WIT package version the plugin was built against.
    pub api_version: String,
    #[serde(default)]
    pub description: String,
    /// The component, relative to the manifest (installed manifests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<PathBuf>,
    /// Hex SHA-256 of the component (installed manifests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub assets: BTreeMap<String, AssetDecl>,
    #[serde(default)]
    pub limits: Limits,
}

impl Manifest {
    /// Parses and validates a manifest; errors name the file and the field.
    pub fn parse(text: &str, file: &Path) -> Result<Self, PluginError> {
        let bad = |field: String, message: String| PluginError::Manifest { path: file.to_path_buf(), field, message };
        let de = toml::de::Deserializer::parse(text).map_err(|e| bad("<toml>".into(), one_line(&e.to_string())))?;
        let m: Manifest = serde_path_to_error::deserialize(de)
            .map_err(|e| bad(e.path().to_string(), one_line(&e.inner().to_string())))?;
        if m.schema_version != SCHEMA_VERSION {
            return Err(bad(
                "schema_version".into(),
                format!("is {}, this host reads schema version {SCHEMA_VERSION}", m.schema_version),
            ));
        }
        if !valid_name(&m.name) {
            return Err(bad("name".into(), format!("`{}`: use lowercase letters, digits and `-`", m.name)));
        }
        if !SUPPORTED_API_VERSIONS.contains(&m.api_version.as_str()) {
            return Err(bad(
                "api_version".into(),
                format!(
                    "`{}` is not supported by this host (it runs {}); rebuild the plugin against a supported version",
                    m.api_version,
                    SUPPORTED_API_VERSIONS.join(", ")
                ),
            ));
        }
        for name in m.assets.keys() {
            if !valid_name(name) {
                return Err(bad(format!("assets.{name}"), "asset names use lowercase letters, digits and `-`".into()));
            }
        }
        let l = &m.limits;
        if l.fuel_per_call == 0 || l.timeout_ms == 0 || l.memory_mib == 0 {
            return Err(bad("limits".into(), "limits must be positive".into()));
        }
        if l.memory_mib > 4096 {
            return Err(bad("limits.memory_mib".into(), "at most 4096 MiB".into()));
        }
        Ok(m)
    }

    /// Reads a manifest file.
    pub fn read(path: &Path) -> Result<Self, PluginError> {
        let text = std::fs::read_to_string(path).map_err(|e| PluginError::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// An installed plugin: its manifest and the verified bytes of its component.
#[derive(Debug, Clone)]
pub struct InstalledPlugin {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub wasm_path: PathBuf,
    pub sha256: String,
}

impl InstalledPlugin {
    /// Opens an installed plugin from its directory or its `plugin.toml`, verifying the hash.
    /// Returns the component's bytes too.
    pub fn open(path: &Path) -> Result<(Self, Vec<u8>), PluginError> {
        let manifest_path = if path.is_dir() { path.join("plugin.toml") } else { path.to_path_buf() };
        let manifest = Manifest::read(&manifest_path)?;
        let bad = |field: &str, message: String| PluginError::Manifest {
            path: manifest_path.clone(),
            field: field.into(),
            message,
        };
        let wasm = manifest.wasm.clone().ok_or_else(|| {
            bad(
                "wasm",
                "missing: this is a source manifest; build and install the plugin with `tuneforge plugin build`".into(),
            )
        })?;
        let expected = manifest
            .sha256
            .clone()
            .ok_or_else(|| bad("sha256", "missing: an installed plugin names its hash".into()))?;
        let base = manifest_path.parent().unwrap_or(Path::new("."));
        let wasm_path = base.join(&wasm);
        let bytes = std::fs::read(&wasm_path).map_err(|e| PluginError::io(&wasm_path, e))?;
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(&expected) {
            return Err(bad(
                "sha256",
                format!(
                    "{} has SHA-256 {actual}, the manifest says {expected}: the component changed after it was installed",
                    wasm_path.display()
                ),
            ));
        }
        Ok((Self { manifest, manifest_path, wasm_path, sha256: actual }, bytes))
    }
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lowercase letters, digits and inner dashes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
schema_version = 1
name = "my-loss"
version = "0.1.0"
kind = "loss"
api_version = "0.1.0"
[assets.kb]
description = "a table"
[limits]
memory_mib = 32
"#;

    #[test]
    fn a_valid_manifest_parses_with_defaults() {
        let m = Manifest::parse(GOOD, Path::new("plugin.toml")).expect("parses");
        assert_eq!(m.kind, PluginKind::Loss);
        assert_eq!(m.limits.memory_mib, 32);
        assert_eq!(m.limits.timeout_ms, 5_000);
        assert_eq!(m.assets["kb"].max_mib, 64);
        let again = Manifest::parse(&m.to_toml(), Path::new("x")).expect("round trip");
        assert_eq!(again, m);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let cases = [
            (GOOD.replace("kind = \"loss\"", "kind = \"lost\""), "kind"),
            (GOOD.replace("api_version = \"0.1.0\"", "api_version = \"9.0.0\""), "api_version"),
            (GOOD.replace("schema_version = 1", "schema_version = 2"), "schema_version"),
            (GOOD.replace("memory_mib = 32", "memory_mib = 0"), "limits"),
            (GOOD.replace("name = \"my-loss\"", "name = \"../evil\""), "name"),
            (format!("{GOOD}\nsurprise = 1\n"), "surprise"),
        ];
        for (text, field) in cases {
            let err = Manifest::parse(&text, Path::new("dir/plugin.toml")).expect_err(field).to_string();
            assert!(err.contains("dir/plugin.toml") && err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn an_installed_plugin_whose_component_changed_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("plugin.wasm"), b"\0asm-original").expect("write");
        let mut m = Manifest::parse(GOOD, Path::new("x")).expect("parses");
        m.wasm = Some("plugin.wasm".into());
        m.sha256 = Some(sha256_hex(b"\0asm-original"));
        std::fs::write(dir.path().join("plugin.toml"), m.to_toml()).expect("write");
        let (p, bytes) = InstalledPlugin::open(dir.path()).expect("opens");
        assert_eq!(bytes, b"\0asm-original");
        assert_eq!(p.manifest.name, "my-loss");
        std::fs::write(dir.path().join("plugin.wasm"), b"\0asm-tampered").expect("write");
        let err = InstalledPlugin::open(dir.path()).expect_err("tampered").to_string();
        assert!(err.contains("sha256") && err.contains("changed"), "{err}");
    }

    #[test]
    fn names_are_plain() {
        assert!(valid_name("text-clean"));
        for bad in ["", "-x", "x-", "X", "a/b", "a.b", "../x"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
