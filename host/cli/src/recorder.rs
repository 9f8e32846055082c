//! Records a training run in the experiment store while it runs: the run row when it starts,
//! its metrics in batches, its end. The run directory stays the source of truth: a store
//! that cannot be written is reported once and training goes on.

use sha2::{Digest, Sha256};
use tuneforge_core::sft::SftSummary;
use tuneforge_core::{ExperimentConfig, RunSummary, TrainEvent};
use tuneforge_store::{Artifact, MetricPoint, NewRun, RunPlugin, RunStatus, Store, now_ms};

/// Points buffered before they are written in one transaction.
const FLUSH_EVERY: usize = 64;

pub struct Recorder {
    rt: tokio::runtime::Runtime,
    store: Store,
    run_id: Option<String>,
    buffer: Vec<MetricPoint>,
    failed: bool,
    resume: bool,
    config: ExperimentConfig,
}

/// This machine's name, for telling whose processes may still be running a run.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Whether a process of this machine is alive.
pub fn pid_alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Opens the store and marks the runs whose process died as interrupted.
pub fn open_store(rt: &tokio::runtime::Runtime, db: &str) -> anyhow::Result<Store> {
    let store = rt.block_on(Store::open(db))?;
    let marked = rt.block_on(store.mark_interrupted(&host_name(), pid_alive))?;
    for id in marked {
        eprintln!("run {id} was interrupted (its process is gone); resume it with `tuneforge train --resume`");
    }
    Ok(store)
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn git_revision() -> Option<String> {
    let out = std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Recorder {
    pub fn new(db: &str, config: &ExperimentConfig, resume: bool) -> anyhow::Result<Self> {
        let rt = runtime()?;
        let store = open_store(&rt, db)?;
        Ok(Self { rt, store, run_id: None, buffer: Vec::new(), failed: false, resume, config: config.clone() })
    }

    fn warn<E: std::fmt::Display>(&mut self, what: &str, e: E) {
        if !self.failed {
            eprintln!("warning: the experiment store could not {what}: {e} (the run directory still has everything)");
            self.failed = true;
        }
    }

    fn flush(&mut self) {
        if self.buffer.is_empty() || self.failed {
            return;
        }
        let points = std::mem::take(&mut self.buffer);
        if let Err(e) = self.rt.block_on(self.store.append_metrics(&points)) {
            self.warn("record metrics", e);
        }
    }

    fn point(&mut self, key: &str, step: u64, value: f64) {
        if let Some(run_id) = &self.run_id
            && value.is_finite()
        {
            self.buffer.push(MetricPoint {
                run_id: run_id.clone(),
                key: key.into(),
                step: step as i64,
                value,
                time_ms: now_ms(),
            });
        }
    }

    pub fn on_event(&mut self, event: &TrainEvent<'_>) {
        match event {
            TrainEvent::Started { run, total_steps, plugins, .. } => {
                let id = run.id();
                let pid = i64::from(std::process::id());
                let resumed = self.resume && self.rt.block_on(self.store.resume_run(&id, &host_name(), pid)).is_ok();
                let result = if resumed {
                    Ok(())
                } else {
                    let c = &self.config;
                    let new = NewRun {
                        id: id.clone(),
                        name: c.experiment.name.clone().unwrap_or_else(|| "run".into()),
                        config: c.to_toml(),
                        run_dir: run.root().display().to_string(),
                        model_source: c.model.source.clone(),
                        method: format!("{:?}", c.peft.method).to_lowercase(),
                        device: c.run.device.to_string(),
                        git_revision: git_revision(),
                        host: host_name(),
                        pid,
                        total_steps: *total_steps as i64,
                    };
                    self.rt.block_on(self.store.start_run(&new))
                };
                let lineage: Vec<RunPlugin> = plugins
                    .iter()
                    .map(|p| RunPlugin {
                        name: p.name.clone(),
                        version: p.version.clone(),
                        kind: p.kind.clone(),
                        sha256: p.sha256.clone(),
                        api_version: p.api_version.clone(),
                    })
                    .collect();
                let result = result.and_then(|()| self.rt.block_on(self.store.record_run_plugins(&id, &lineage)));
                match result {
                    Ok(()) => self.run_id = Some(id),
                    Err(e) => self.warn("record the run", e),
                }
            }
            TrainEvent::Step { step, total_steps, loss, lr, tokens_per_s } => {
                self.point("train/loss", *step, *loss);
                self.point("train/lr", *step, *lr);
                self.point("train/tokens_per_s", *step, *tokens_per_s);
                if self.buffer.len() >= FLUSH_EVERY {
                    self.flush();
                    if let Some(id) = self.run_id.clone()
                        && let Err(e) =
                            self.rt.block_on(self.store.set_progress(&id, *step as i64, *total_steps as i64))
                    {
                        self.warn("record progress", e);
                    }
                }
            }
            TrainEvent::Evaluated { step, report, .. } => {
                self.point("val/loss", *step, report.loss);
                self.point("val/accuracy", *step, report.accuracy);
                self.point("val/macro_f1", *step, report.macro_f1);
                self.flush();
            }
            TrainEvent::LmEvaluated { step, loss, perplexity, .. } => {
                self.point("val/loss", *step, *loss);
                self.point("val/perplexity", *step, *perplexity);
                self.flush();
            }
            TrainEvent::Checkpointed { .. } => self.flush(),
        }
    }

    /// Records the files a finished run left (those of them that exist), with their sizes
    /// and SHA-256.
    fn record_artifacts(&mut self, id: &str, run_dir: &std::path::Path) {
        let files = [
            ("config", "config.toml"),
            ("metrics", "metrics.jsonl"),
            ("summary", "summary.json"),
            ("model", "best/model.safetensors"),
            ("adapter", "best/adapter_model.safetensors"),
            ("model-config", "best/config.json"),
            ("tokenizer", "best/tokenizer.json"),
            ("model-meta", "best/tuneforge.json"),
        ];
        for (kind, rel) in files {
            let path = run_dir.join(rel);
            let Ok(bytes) = std::fs::read(&path) else { continue };
            let artifact = Artifact {
                run_id: id.to_owned(),
                kind: kind.into(),
                path: path.display().to_string(),
                sha256: hex::encode(Sha256::digest(&bytes)),
                bytes: bytes.len() as i64,
            };
            if let Err(e) = self.rt.block_on(self.store.record_artifact(&artifact)) {
                self.warn("record artifacts", e);
                return;
            }
        }
    }

    /// Records how a classification run ended.
    pub fn finish(&mut self, outcome: Result<&RunSummary, &str>) {
        let ended = outcome.map(|s| Ended {
            status: if s.status == "stopped" { RunStatus::Interrupted } else { RunStatus::Succeeded },
            summary: serde_json::to_value(s).unwrap_or_default(),
            steps: (s.steps, s.total_steps),
            dataset_hash: &s.dataset_hash,
            accuracy_f1: s.validation.as_ref().map(|v| (v.accuracy, v.macro_f1)),
            run_dir: s.best_model_dir.as_ref().and_then(|b| b.parent()),
        });
        self.end(ended);
    }

    /// Records how an instruction-tuning (`task = "causal-lm"`) run ended.
    pub fn finish_lm(&mut self, outcome: Result<&SftSummary, &str>) {
        let ended = outcome.map(|s| Ended {
            status: if s.status == "stopped" { RunStatus::Interrupted } else { RunStatus::Succeeded },
            summary: serde_json::to_value(s).unwrap_or_default(),
            steps: (s.steps, s.total_steps),
            dataset_hash: &s.dataset_hash,
            accuracy_f1: None,
            run_dir: Some(&s.run_dir),
        });
        self.end(ended);
    }

    fn end(&mut self, outcome: Result<Ended<'_>, &str>) {
        self.flush();
        let Some(id) = self.run_id.clone() else { return };
        let result = match &outcome {
            Ok(e) => {
                let (acc, f1) = e.accuracy_f1.map_or((None, None), |(a, f)| (Some(a), Some(f)));
                let store = &self.store;
                self.rt.block_on(async {
                    store.set_progress(&id, e.steps.0 as i64, e.steps.1 as i64).await?;
                    store.finish_run(&id, e.status, Some(&e.summary), Some(e.dataset_hash), acc, f1, None).await
                })
            }
            Err(message) => {
                self.rt.block_on(self.store.finish_run(&id, RunStatus::Failed, None, None, None, None, Some(message)))
            }
        };
        if let Err(e) = result {
            self.warn("record the end of the run", e);
        }
        if let Ok(Ended { run_dir: Some(dir), .. }) = outcome {
            self.record_artifacts(&id, dir);
        }
    }
}

/// How a run ended, whatever its task.
struct Ended<'a> {
    status: RunStatus,
    summary: serde_json::Value,
    /// Steps taken, of the total.
    steps: (u64, u64),
    dataset_hash: &'a str,
    accuracy_f1: Option<(f64, f64)>,
    run_dir: Option<&'a std::path::Path>,
}
