//! `tuneforge plugin new|build|check|list`: scaffold, build and install, verify, list.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tuneforge_plugin_runtime::package::{BuildOptions, TARGET, build_and_install};
use tuneforge_plugin_runtime::{
    CURRENT_API_VERSION, PluginKind, PluginRuntime, PluginSetup, installed_dir, list_installed, manifest::valid_name,
    plugin_home,
};

use super::Outcome;

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Scaffold a plugin crate that builds: `tuneforge plugin new loss my-loss`.
    New(NewArgs),
    /// Build a plugin crate for wasm32-wasip2 and install it (writes its manifest and hash).
    Build(BuildArgs),
    /// Verify an installed plugin: manifest, hash, API version, and that it instantiates.
    Check(CheckArgs),
    /// List the installed plugins.
    List(HomeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct HomeArgs {
    /// Where plugins are installed (default: $TUNEFORGE_PLUGIN_DIR, else
    /// ~/.local/share/tuneforge/plugins).
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
}

impl HomeArgs {
    fn dir(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(plugin_home)
    }
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// loss, metric, augment, cleaner or features.
    kind: String,
    /// The plugin's name: lowercase letters, digits and `-`.
    name: String,
    /// Create the crate here instead of ./NAME.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The guest SDK (plugins/sdk of a tuneforge checkout; default: $TUNEFORGE_SDK, else the
    /// checkout this binary was built from).
    #[arg(long, value_name = "DIR")]
    sdk: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The plugin crate (default: the current directory).
    #[arg(default_value = ".")]
    dir: PathBuf,
    #[command(flatten)]
    home: HomeArgs,
    /// Cargo's target directory for the guest build.
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Build without optimisations.
    #[arg(long)]
    debug: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// An installed plugin's name, or the directory of an installed plugin.
    plugin: String,
    #[command(flatten)]
    home: HomeArgs,
}

pub fn run(cmd: PluginCommand) -> anyhow::Result<Outcome> {
    match cmd {
        PluginCommand::New(a) => new(a),
        PluginCommand::Build(a) => {
            let home = a.home.dir();
            let options = BuildOptions { target_dir: a.target_dir, debug: a.debug };
            let p = build_and_install(&a.dir, &home, &options)?;
            let m = &p.manifest;
            println!("installed {} {} ({}, API {}) in {}", m.name, m.version, m.kind, m.api_version, home.display());
            println!("sha256 {}", p.sha256);
            println!("use it in an experiment:\n\n[[plugins]]\nname = \"{}\"", m.name);
            Ok(Outcome::Success)
        }
        PluginCommand::Check(a) => check(&a),
        PluginCommand::List(h) => {
            let home = h.dir();
            let all = list_installed(&home);
            if all.is_empty() {
                println!("no plugins installed in {} (build one with `tuneforge plugin build DIR`)", home.display());
            }
            for (dir, p) in all {
                match p {
                    Ok(p) => {
                        let m = &p.manifest;
                        println!(
                            "{:<28} {:<8} {:<9} API {:<6} sha256 {}  {}",
                            m.name,
                            m.version,
                            m.kind.as_str(),
                            m.api_version,
                            &p.sha256[..12],
                            m.description.lines().next().unwrap_or("")
                        );
                    }
                    Err(e) => println!("{:<28} BROKEN: {e}", dir.file_name().unwrap_or_default().to_string_lossy()),
                }
            }
            Ok(Outcome::Success)
        }
    }
}

fn check(a: &CheckArgs) -> anyhow::Result<Outcome> {
    let dir = match installed_dir(&a.home.dir(), &a.plugin) {
        Ok(dir) => dir,
        Err(_) if Path::new(&a.plugin).exists() => PathBuf::from(&a.plugin),
        Err(e) => return Err(e.into()),
    };
    let runtime = PluginRuntime::new()?;
    let p = runtime.load(&dir, PluginSetup::default())?;
    let m = &p.installed().manifest;
    let l = p.limits();
    println!(
        "{} {}: {} plugin, API {}, sha256 {} verified",
        m.name,
        m.version,
        m.kind,
        m.api_version,
        p.installed().sha256
    );
    println!("limits: {} fuel per call, {} ms per call, {} MiB memory", l.fuel_per_call, l.timeout_ms, l.memory_mib);
    if !m.assets.is_empty() {
        let names: Vec<&str> = m.assets.keys().map(String::as_str).collect();
        println!("assets it may ask for (grant them under [plugins.assets]): {}", names.join(", "));
    }
    println!("ok: the component implements the `{}` world and instantiates in the sandbox", m.kind);
    Ok(Outcome::Success)
}

fn default_sdk() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TUNEFORGE_SDK").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/sdk");
    built_from.join("Cargo.toml").is_file().then(|| built_from.canonicalize().unwrap_or(built_from))
}

fn new(a: NewArgs) -> anyhow::Result<Outcome> {
    let Some(kind) = PluginKind::parse(&a.kind) else {
        bail!("unknown plugin kind `{}`: use loss, metric, augment, cleaner or features", a.kind);
    };
    if !valid_name(&a.name) {
        bail!("plugin name `{}`: use lowercase letters, digits and `-` (e.g. my-loss)", a.name);
    }
    let sdk = match a.sdk.or_else(default_sdk) {
        Some(s) => s,
        None => bail!("cannot find the guest SDK: pass --sdk PATH/TO/tuneforge/plugins/sdk or set TUNEFORGE_SDK"),
    };
    let sdk = sdk.canonicalize().with_context(|| format!("the SDK at {}", sdk.display()))?;
    let dir = a.dir.unwrap_or_else(|| PathBuf::from(&a.name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty", dir.display());
    }
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    let sdk_toml = toml::Value::String(sdk.display().to_string());
    let files = [
        ("Cargo.toml", cargo_toml(&a.name, kind, &sdk_toml.to_string())),
        ("plugin.toml", manifest(&a.name, kind)),
        ("src/lib.rs", template(kind).to_string()),
        (".gitignore", "/target\n".to_string()),
    ];
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("created the {kind} plugin `{}` in {}", a.name, dir.display());
    println!("next:\n  (edit {}/src/lib.rs)\n  tuneforge plugin build {}", dir.display(), dir.display());
    println!("needs the Rust target: rustup target add {TARGET}");
    Ok(Outcome::Success)
}

fn cargo_toml(name: &str, kind: PluginKind, sdk: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
tuneforge-plugin-sdk = {{ path = {sdk}, features = ["{kind}"] }}

# A plugin is its own workspace.
[workspace]

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = "debuginfo"
"#
    )
}

fn manifest(name: &str, kind: PluginKind) -> String {
    format!(
        r#"schema_version = 1
name = "{name}"
version = "0.1.0"
kind = "{kind}"
api_version = "{CURRENT_API_VERSION}"
description = "A {kind} plugin."

# Files the plugin may ask for with `asset(name)`; the experiment grants each a path:
# [assets.my-table]
# description = "what it is"
# max_mib = 16

[limits]
fuel_per_call = 2000000000
timeout_ms = 5000
memory_mib = 128
"#
    )
}

fn template(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Loss => include_str!("../../templates/loss.rs"),
        PluginKind::Metric => include_str!("../../templates/metric.rs"),
        PluginKind::Augment => include_str!("../../templates/augment.rs"),
        PluginKind::Cleaner => include_str!("../../templates/cleaner.rs"),
        PluginKind::Features => include_str!("../../templates/features.rs"),
    }
}
