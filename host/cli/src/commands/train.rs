//! `tuneforge train`: run or resume an experiment.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment_with};
use tuneforge_plugin_runtime::{RuntimeHooks, plugin_home};

use super::{Outcome, RecordArgs, report_gates};
use crate::progress::TrainProgress;
use crate::recorder::Recorder;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The experiment file (TOML).
    #[arg(long, short, value_name = "EXP.toml", required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Override a key of the experiment file, e.g. `--set train.lr=3e-5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "resume")]
    overrides: Vec<String>,
    /// Continue the run in RUN_DIR from its latest checkpoint, with its own config.toml.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// Stop with a checkpoint after this many optimizer steps in total (resume later).
    #[arg(long, value_name = "N")]
    stop_after_steps: Option<u64>,
    #[command(flatten)]
    record: RecordArgs,
    /// Where to compute: `cpu`, `cuda` or `cuda:N` (overrides `[run] device`).
    #[arg(long, value_name = "DEVICE", value_parser = |s: &str| s.parse::<tuneforge_core::DeviceSpec>())]
    device: Option<tuneforge_core::DeviceSpec>,
    /// Data parallelism over N GPUs of this machine: one process per GPU (cuda:0 … cuda:N-1),
    /// gradients all-reduced with NCCL, each step taking N times the batch; rank 0 writes the
    /// run and the store. Needs a build with `--features nccl`.
    #[arg(long, value_name = "N", conflicts_with = "device")]
    gpus: Option<usize>,
}

/// Trains with plugins, a progress display and (unless `db` is `None`) the run recorded in
/// the experiment store; a store that cannot be written is reported and training goes on.
pub fn train_recorded(
    config: ExperimentConfig,
    options: &RunOptions,
    db: Option<&str>,
    quiet: bool,
) -> tuneforge_core::Result<tuneforge_core::TrainOutcome> {
    let mut recorder = recorder(db, &config, options.resume.is_some());
    let mut progress = TrainProgress::new(quiet);
    let hooks = RuntimeHooks::lazy(plugin_home());
    let outcome = train_experiment_with(config, options, &hooks, &mut |e| {
        if let Some(r) = recorder.as_mut() {
            r.on_event(&e);
        }
        progress.on_event(e);
    });
    progress.finish();
    if let Some(r) = recorder.as_mut() {
        match &outcome {
            Ok(o) => r.finish(Ok(&o.summary)),
            Err(e) => r.finish(Err(&format!("{e:#}"))),
        }
    }
    outcome
}

/// The store's recorder for a run, unless `db` is `None` or the store cannot be opened (said
/// once; training goes on).
fn recorder(db: Option<&str>, config: &ExperimentConfig, resume: bool) -> Option<Recorder> {
    db.and_then(|db| match Recorder::new(db, config, resume) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("warning: not recording this run in the experiment store: {e:#}");
            None
        }
    })
}

pub fn run(args: TrainArgs) -> anyhow::Result<Outcome> {
    if let Some(n) = args.gpus
        && std::env::var(tuneforge_core::parallel::ENV_RANK).is_err()
    {
        return launch_data_parallel(n);
    }
    let mut overrides = args.overrides.clone();
    if let Some(spec) = &args.device {
        overrides.push(format!("run.device=\"{spec}\""));
    }
    let config = match (&args.config, &args.resume) {
        (Some(path), _) => ExperimentConfig::from_file(path, &overrides)?,
        (None, Some(dir)) => ExperimentConfig::from_file(&dir.join("config.toml"), &overrides[args.overrides.len()..])
            .with_context(|| format!("{} is not a run directory to resume", dir.display()))?,
        (None, None) => anyhow::bail!("give --config EXP.toml or --resume RUN_DIR"),
    };
    let primary = std::env::var(tuneforge_core::parallel::ENV_RANK).map_or(true, |r| r == "0");
    if config.model.task == tuneforge_core::experiment::Task::CausalLm {
        return train_causal_lm(config, &args, primary);
    }
    let options = RunOptions { resume: args.resume.clone(), stop_after_steps: args.stop_after_steps };
    let db = (!args.record.no_db && primary).then(|| args.record.db.url());
    let outcome = train_recorded(config, &options, db.as_deref(), args.record.quiet || !primary);
    let outcome = outcome?;
    let s = &outcome.summary;
    if args.record.json {
        println!("{}", serde_json::to_string_pretty(s)?);
    } else {
        println!("run:        {}", outcome.run.root().display());
        println!("status:     {} after {} of {} steps", s.status, s.steps, s.total_steps);
        if s.status == "stopped" {
            println!("resume:     tuneforge train --resume {}", outcome.run.root().display());
        }
        println!(
            "parameters: {} trainable of {} ({:.2}%), weight decay {}",
            s.params_trainable,
            s.params_total,
            100.0 * s.trainable_ratio,
            s.weight_decay
        );
        println!("training:   {:.1} s, {:.0} tokens/s", s.train_seconds, s.train_tokens_per_s);
        if let Some(v) = &s.validation {
            println!(
                "validation: accuracy {:.4}, macro-F1 {:.4}, loss {:.4} on {} examples (best at step {})",
                v.accuracy,
                v.macro_f1,
                v.loss,
                v.n,
                s.best_step.unwrap_or(0)
            );
            println!("inference:  {:.4} s per 1k tokens ({:.0} tokens/s)", v.s_per_1k_tokens, v.tokens_per_s);
        }
        if let Some(best) = &s.best_model_dir {
            println!("model:      {}", best.display());
        }
    }
    Ok(report_gates(&s.gates))
}

/// `--gpus N`: starts this command again once per GPU (`--device cuda:R` and the
/// `TUNEFORGE_DP_*` variables of [`tuneforge_core::parallel`]), waits for every rank, and
/// stops the others when one fails.
fn launch_data_parallel(n: usize) -> anyhow::Result<Outcome> {
    if n == 0 {
        anyhow::bail!("--gpus must be at least 1");
    }
    let id = group_id()?;
    let exe = std::env::current_exe().context("cannot find the tuneforge executable to launch ranks")?;
    // The same arguments without `--gpus N`, plus each rank's device.
    let mut rest = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(a) = argv.next() {
        if a == "--gpus" {
            argv.next();
        } else if !a.starts_with("--gpus=") {
            rest.push(a);
        }
    }
    let mut children = Vec::with_capacity(n);
    for rank in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&rest)
            .args(["--device", &format!("cuda:{rank}")])
            .env(tuneforge_core::parallel::ENV_RANK, rank.to_string())
            .env(tuneforge_core::parallel::ENV_WORLD, n.to_string())
            .env(tuneforge_core::parallel::ENV_ID, &id)
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(child);
    }
    let mut failed = None;
    loop {
        let mut running = 0;
        for (rank, child) in children.iter_mut().enumerate() {
            match child.try_wait()? {
                Some(status) if !status.success() && failed.is_none() => failed = Some((rank, status)),
                Some(_) => {}
                None => running += 1,
            }
        }
        if let Some((rank, status)) = failed {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            anyhow::bail!("rank {rank} of {n} failed ({status}); the other ranks were stopped");
        }
        if running == 0 {
            return Ok(Outcome::Success);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[cfg(feature = "nccl")]
fn group_id() -> anyhow::Result<String> {
    Ok(tuneforge_core::parallel::new_group_id()?)
}

#[cfg(not(feature = "nccl"))]
fn group_id() -> anyhow::Result<String> {
    anyhow::bail!("--gpus needs a tuneforge built with `--features nccl` (CUDA and NCCL)")
}

/// Instruction tuning with progress lines on stderr (unless `quiet`) and (unless `db` is
/// `None`) the run recorded in the experiment store.
pub fn causal_lm_recorded(
    config: ExperimentConfig,
    options: &RunOptions,
    db: Option<&str>,
    quiet: bool,
) -> tuneforge_core::Result<tuneforge_core::sft::SftSummary> {
    let mut recorder = recorder(db, &config, options.resume.is_some());
    let outcome = tuneforge_core::sft::train_causal_lm_in(
        config,
        options,
        None,
        &mut |line| {
            if !quiet {
                eprintln!("{line}");
            }
        },
        &mut |e| {
            if let Some(r) = recorder.as_mut() {
                r.on_event(&e);
            }
        },
    );
    if let Some(r) = recorder.as_mut() {
        match &outcome {
            Ok(s) => r.finish_lm(Ok(s)),
            Err(e) => r.finish_lm(Err(&format!("{e:#}"))),
        }
    }
    outcome
}

/// `task = "causal-lm"`: instruction tuning of a decoder, on one device or as a rank of
/// `--gpus N` (rank 0 reports and records the run in the store).
fn train_causal_lm(config: ExperimentConfig, args: &TrainArgs, primary: bool) -> anyhow::Result<Outcome> {
    let quiet = args.record.quiet || !primary;
    let db = (!args.record.no_db && primary).then(|| args.record.db.url());
    let options = RunOptions { resume: args.resume.clone(), stop_after_steps: args.stop_after_steps };
    let s = causal_lm_recorded(config, &options, db.as_deref(), quiet)?;
    if !primary {
        return Ok(Outcome::Success);
    }
    if args.record.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("run:        {}", s.run_dir.display());
        println!("status:     {} after {} of {} steps", s.status, s.steps, s.total_steps);
        if s.status == "stopped" {
            println!("resume:     tuneforge train --resume {}", s.run_dir.display());
        }
        println!(
            "parameters: {} trainable of {} ({:.2}%)",
            s.params_trainable,
            s.params_total,
            100.0 * s.trainable_ratio
        );
        println!("training:   {} steps, {:.1} s, {:.0} tokens/s", s.steps, s.train_seconds, s.tokens_per_s);
        if let Some(at) = s.early_stopped_at {
            println!("stopped early at step {at} (no better validation loss within the patience)");
        }
        println!(
            "validation: loss {:.4} -> {:.4}, perplexity {:.2} -> {:.2} (base -> best, step {}) on {} examples",
            s.base_validation_loss, s.validation_loss, s.base_perplexity, s.perplexity, s.best_step, s.n_validation
        );
        println!(
            "model:      {} (tuneforge generate --model {} \"...\")",
            s.best_model_dir.display(),
            s.best_model_dir.display()
        );
    }
    Ok(Outcome::Success)
}
