//! The run directory: `<output_dir>/<run-id>/` with the resolved `config.toml`,
//! `metrics.jsonl` (one JSON object per logged step), `summary.json`, `checkpoints/` and
//! `best/` (the best model so far, loadable by `eval` and `predict`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{CoreError, Result};

/// Whether `dir` holds a model that a run keeps as its best: a classifier
/// (`tuneforge.json`) or an instruction-tuned adapter.
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("tuneforge.json").is_file() || crate::sft::is_adapter_dir(dir)
}

/// The metrics a registered model carries from its run's summary (`summary.json`): a
/// classifier's validation figures, or a language model's validation `loss` and `perplexity`.
pub fn registration_metrics(summary: &serde_json::Value) -> Option<serde_json::Value> {
    if let Some(v) = summary.get("validation").filter(|v| v.is_object()) {
        return Some(v.clone());
    }
    let (loss, perplexity) = (summary.get("validation_loss")?.as_f64()?, summary.get("perplexity")?.as_f64()?);
    Some(serde_json::json!({"loss": loss, "perplexity": perplexity}))
}

#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn id(&self) -> String {
        self.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn best(&self) -> PathBuf {
        self.root.join("best")
    }
}

/// `<name>-<UTC yyyymmdd-hhmmss>-<4 hex>`; the name keeps letters, digits, `-` and `_`.
pub fn new_run_id(name: Option<&str>) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let stamp = format!("{y:04}{mo:02}{d:02}-{:02}{:02}{:02}", s / 3600, (s / 60) % 60, s % 60);
    let salt = (now.subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffff;
    let name: String = name
        .unwrap_or("run")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .collect();
    format!("{name}-{stamp}-{salt:04x}")
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) — Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Appends one JSON object per line to `metrics.jsonl`, flushed line by line.
#[derive(Debug)]
pub(crate) struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log for appending, first dropping lines of steps after `keep_through_step`
    /// (those that a killed run logged after its last checkpoint).
    pub(crate) fn open(path: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        if let Some(limit) = keep_through_step
            && path.exists()
        {
            let reader = BufReader::new(File::open(path).map_err(CoreError::io(path))?);
            let mut kept = String::new();
            for line in reader.lines() {
                let line = line.map_err(CoreError::io(path))?;
                let step = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
                // A torn last line (no valid JSON) is dropped too.
                if step.is_some_and(|s| s <= limit) {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            crate::fs_atomic::write_atomic(path, kept.as_bytes())?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(CoreError::io(path))?;
        Ok(Self { path: path.to_owned(), file })
    }

    pub(crate) fn append(&mut self, value: &serde_json::Value) -> Result<()> {
        let mut line = value.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(CoreError::io(&self.path))?;
        self.file.flush().map_err(CoreError::io(&self.path))
    }
}

/// Creates the run directory (and its parents).
pub(crate) fn create_run_dir(output_dir: &Path, run_id: &str) -> Result<RunDir> {
    let root = output_dir.join(run_id);
    fs::create_dir_all(&root).map_err(CoreError::io(&root))?;
    Ok(RunDir::new(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn run_ids_are_sanitised() {
        let id = new_run_id(Some("my run/1"));
        assert!(id.starts_with("my-run-1-"), "{id}");
        assert_eq!(id.len(), "my-run-1-".len() + 15 + 5);
    }

    #[test]
    fn metrics_log_drops_steps_after_the_checkpoint_and_torn_lines() -> Result<()> {
        let dir = tempfile::tempdir().map_err(CoreError::io("tmp"))?;
        let p = dir.path().join("metrics.jsonl");
        fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":4,\"lo").map_err(CoreError::io(&p))?;
        let mut log = MetricsLog::open(&p, Some(2))?;
        log.append(&serde_json::json!({"step": 3}))?;
        assert_eq!(fs::read_to_string(&p).map_err(CoreError::io(&p))?, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n");
        Ok(())
    }
}
