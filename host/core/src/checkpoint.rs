//! Checkpoints: `checkpoints/step-NNNNNNNN/` with `trainable.safetensors` (the trainable
//! parameters), `optimizer.safetensors` (AdamW moments) and `state.json` (step, data cursor,
//! best metric, seed, and the SHA-256 of both files), plus `checkpoints/LATEST` naming the
//! newest complete one.
//!
//! A checkpoint is staged in a hidden directory, every file fsynced, renamed into place, and
//! only then does `LATEST` move (atomically). A crash at any point leaves `LATEST` on the
//! last good checkpoint; a file that does not match its recorded hash is refused on load.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fs_atomic::{replace_dir, sync_dir, write_atomic, write_synced};
use crate::weights::{from_safetensors_bytes, to_safetensors_bytes};
use crate::{CoreError, Result};

const LATEST: &str = "LATEST";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// Where training stands at a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: u64,
    /// The epoch and the batch within it that come next (the data cursor).
    pub epoch: u64,
    pub batch_in_epoch: usize,
    /// The run's seed: data order and dropout masks derive from it, the epoch and the step.
    pub seed: u64,
    pub best_metric: Option<f64>,
    pub best_step: Option<u64>,
    pub tokens_seen: u64,
    pub train_seconds: f64,
    /// Evaluations since the metric last improved by at least the early-stopping delta.
    #[serde(default)]
    pub evals_without_improvement: u64,
    /// Set when early stopping ended the run at this step.
    #[serde(default)]
    pub early_stopped_at: Option<u64>,
    /// SHA-256 of each file of the checkpoint.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

impl CheckpointState {
    /// A run's first position: nothing trained, nothing evaluated.
    pub fn start(seed: u64) -> Self {
        Self {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            seed,
            best_metric: None,
            best_step: None,
            tokens_seen: 0,
            train_seconds: 0.0,
            evals_without_improvement: 0,
            early_stopped_at: None,
            files: BTreeMap::new(),
        }
    }

    /// Records an evaluation at the current step of the metric that picks the best model
    /// (`value`, higher is better): a new best takes `best_metric` and `best_step`; less than
    /// `min_delta` above the best counts toward early stopping, which ends the run once
    /// `patience` such evaluations come in a row. Returns whether `value` is a new best.
    pub fn record_evaluation(&mut self, value: f64, min_delta: f64, patience: Option<u64>) -> bool {
        let improved = self.best_metric.is_none_or(|b| value > b);
        if self.best_metric.is_none_or(|b| value > b + min_delta) {
            self.evals_without_improvement = 0;
        } else {
            self.evals_without_improvement += 1;
        }
        if patience.is_some_and(|p| self.evals_without_improvement >= p) {
            self.early_stopped_at = Some(self.step);
        }
        if improved {
            self.best_metric = Some(value);
            self.best_step = Some(self.step);
        }
        improved
    }
}

/// Resumes training from `run`'s latest checkpoint (`keep`: how many the run keeps):
/// loads the trainable tensors into `params` and the moments into `optimizer`, and returns
/// where training stands and the checkpoint's directory.
pub(crate) fn resume(
    run: &crate::RunDir,
    keep: usize,
    params: &crate::ParamStore,
    optimizer: &mut crate::AdamW,
) -> Result<(CheckpointState, PathBuf)> {
    let loaded = Checkpoints::new(run.checkpoints(), keep)
        .latest()?
        .ok_or_else(|| CoreError::file(run.root(), "has no checkpoint to resume from"))?;
    params.load_trainable(&loaded.trainable)?;
    optimizer.load_state(&loaded.optimizer, loaded.state.step)?;
    Ok((loaded.state, loaded.dir))
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub trainable: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// The checkpoints of one run.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Checkpoints {
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Self {
        Self { dir: dir.into(), keep: keep.max(1) }
    }

    /// Writes a checkpoint and moves `LATEST` to it; returns its directory.
    pub fn save(
        &self,
        state: &CheckpointState,
        trainable: &[(String, Tensor)],
        optimizer: &[(String, Tensor)],
    ) -> Result<PathBuf> {
        self.save_inner(state, trainable, optimizer, &mut |_| false)
    }

    /// `crash_after(file)` returning true stops the write right after `file`, as a crash would.
    fn save_inner(
        &self,
        state: &CheckpointState,
        trainable: &[(String, Tensor)],
        optimizer: &[(String, Tensor)],
        crash_after: &mut dyn FnMut(&str) -> bool,
    ) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir).map_err(CoreError::io(&self.dir))?;
        let name = format!("step-{:08}", state.step);
        let staging = self.dir.join(format!(".staging-{name}"));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(CoreError::io(&staging))?;
        }
        fs::create_dir(&staging).map_err(CoreError::io(&staging))?;
        let crashed =
            |file: &str| CoreError::Checkpoint { path: staging.join(file), message: "simulated crash".into() };
        let mut state = state.clone();
        for (file, tensors) in [(TRAINABLE, trainable), (OPTIMIZER, optimizer)] {
            let bytes = to_safetensors_bytes(tensors)?;
            state.files.insert(file.to_owned(), sha256_hex(&bytes));
            write_synced(&staging.join(file), &bytes)?;
            if crash_after(file) {
                return Err(crashed(file));
            }
        }
        let json = serde_json::to_vec_pretty(&state).map_err(|e| CoreError::file(&staging, e.to_string()))?;
        write_synced(&staging.join(STATE), &json)?;
        sync_dir(&staging)?;
        if crash_after(STATE) {
            return Err(crashed(STATE));
        }
        let target = self.dir.join(&name);
        replace_dir(&staging, &target)?;
        if crash_after("rename") {
            return Err(crashed("rename"));
        }
        write_atomic(&self.dir.join(LATEST), name.as_bytes())?;
        self.prune(&name)?;
        Ok(target)
    }

    /// Removes checkpoints beyond the newest `keep` and stale staging directories.
    fn prune(&self, latest: &str) -> Result<()> {
        let mut steps = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(CoreError::io(&self.dir))? {
            let entry = entry.map_err(CoreError::io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".staging-") {
                fs::remove_dir_all(entry.path()).map_err(CoreError::io(entry.path()))?;
            } else if name.starts_with("step-") && name != latest {
                steps.push(name);
            }
        }
        steps.sort();
        let excess = (steps.len() + 1).saturating_sub(self.keep);
        for name in steps.into_iter().take(excess) {
            let p = self.dir.join(name);
            fs::remove_dir_all(&p).map_err(CoreError::io(&p))?;
        }
        Ok(())
    }

    /// The checkpoint `LATEST` names, verified against its hashes; `None` if there is none.
    pub fn latest(&self) -> Result<Option<LoadedCheckpoint>> {
        let pointer = self.dir.join(LATEST);
        let name = match fs::read_to_string(&pointer) {
            Ok(n) => n.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CoreError::Io { path: pointer, source: e }),
        };
        crate::fs_atomic::recover_dir(&self.dir.join(&name))?;
        self.load(&self.dir.join(name)).map(Some)
    }

    /// Loads and verifies one checkpoint directory.
    pub fn load(&self, dir: &Path) -> Result<LoadedCheckpoint> {
        let bad = |message: String| CoreError::Checkpoint { path: dir.to_owned(), message };
        let state_path = dir.join(STATE);
        let text = fs::read_to_string(&state_path).map_err(CoreError::io(&state_path))?;
        let state: CheckpointState = serde_json::from_str(&text).map_err(|e| bad(format!("{STATE}: {e}")))?;
        let read = |file: &str| -> Result<HashMap<String, Tensor>> {
            let path = dir.join(file);
            let bytes = fs::read(&path).map_err(CoreError::io(&path))?;
            let expected = state.files.get(file).ok_or_else(|| bad(format!("{STATE} records no hash for {file}")))?;
            if &sha256_hex(&bytes) != expected {
                return Err(bad(format!("{file} does not match its recorded SHA-256 (the file is damaged)")));
            }
            from_safetensors_bytes(&bytes, &path)
        };
        let trainable = read(TRAINABLE)?;
        let optimizer = read(OPTIMIZER)?;
        Ok(LoadedCheckpoint { dir: dir.to_owned(), state, trainable, optimizer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn state(step: u64) -> CheckpointState {
        CheckpointState { step, batch_in_epoch: step as usize, ..CheckpointState::start(1) }
    }

    fn tensors(v: f32) -> Vec<(String, Tensor)> {
        vec![("w".to_owned(), Tensor::new(&[v, v + 1.0], &Device::Cpu).expect("tensor"))]
    }

    fn w(c: &LoadedCheckpoint) -> Vec<f32> {
        c.trainable["w"].to_vec1::<f32>().expect("vec")
    }

    #[test]
    fn a_crash_at_any_point_of_a_save_keeps_the_last_good_checkpoint() -> Result<()> {
        for crash_point in [TRAINABLE, OPTIMIZER, STATE, "rename"] {
            let dir = tempfile::tempdir().map_err(CoreError::io("tmp"))?;
            let ck = Checkpoints::new(dir.path(), 2);
            ck.save(&state(1), &tensors(1.0), &tensors(10.0))?;
            let err = ck.save_inner(&state(2), &tensors(2.0), &tensors(20.0), &mut |f| f == crash_point);
            assert!(err.is_err());
            let latest = ck.latest()?.expect("a checkpoint");
            assert_eq!(latest.state.step, 1, "crash after {crash_point}");
            assert_eq!(w(&latest), [1.0, 2.0]);
            // The next save works and cleans up what the crash left.
            ck.save(&state(3), &tensors(3.0), &tensors(30.0))?;
            assert_eq!(ck.latest()?.expect("a checkpoint").state.step, 3);
            let hidden = fs::read_dir(dir.path())
                .map_err(CoreError::io("tmp"))?
                .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with(".staging")))
                .count();
            assert_eq!(hidden, 0);
        }
        Ok(())
    }

    #[test]
    fn keeps_the_newest_checkpoints_and_detects_damage() -> Result<()> {
        let dir = tempfile::tempdir().map_err(CoreError::io("tmp"))?;
        let ck = Checkpoints::new(dir.path(), 2);
        for s in 1..=4 {
            ck.save(&state(s), &tensors(s as f32), &tensors(0.0))?;
        }
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .map_err(CoreError::io("tmp"))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        assert_eq!(names, ["LATEST", "step-00000003", "step-00000004"]);
        let file = dir.path().join("step-00000004").join(TRAINABLE);
        let mut bytes = fs::read(&file).map_err(CoreError::io(&file))?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&file, bytes).map_err(CoreError::io(&file))?;
        let e = ck.latest().expect_err("damaged").to_string();
        assert!(e.contains("does not match its recorded SHA-256"), "{e}");
        Ok(())
    }
}
