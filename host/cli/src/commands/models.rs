//! `tuneforge models register|promote|rollback|ls|events`: the model registry.

use clap::Subcommand;

use super::{DbArgs, Outcome};
use crate::recorder::{open_store, runtime};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Register a run's best model as the next version of NAME (a candidate).
    Register {
        /// The run id (see `tuneforge runs ls`).
        run: String,
        #[arg(long)]
        name: String,
        /// Serve this model directory instead of the run's best/ — one derived from that run,
        /// such as its int8 copy from `tuneforge quantize` (made absolute before storing).
        #[arg(long, value_name = "DIR")]
        model_dir: Option<std::path::PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Make VERSION the production version of NAME (the previous one is archived).
    Promote {
        name: String,
        #[arg(value_name = "VERSION")]
        model_version: i64,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Put back the version of NAME that was in production before the current one.
    Rollback {
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Versions and stages, for one model or all.
    Ls {
        name: Option<String>,
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show (and with flags, change) how NAME's self-deciding A/B tests decide.
    Rules {
        name: String,
        /// Rated predictions each arm needs before the feedback verdict and the error bound.
        #[arg(long)]
        min_rated: Option<i64>,
        /// Roll back when the candidate's held-out accuracy is below production's minus this
        /// (a language model: its held-out loss above production's plus this; a negative
        /// value switches the rule off).
        #[arg(long, allow_negative_numbers = true)]
        heldout_delta: Option<f64>,
        /// Roll back when the candidate's feedback-rated error rate is above this (negative: off).
        #[arg(long, allow_negative_numbers = true)]
        max_error_rate: Option<f64>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// The audit trail, newest first.
    Events {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn actor() -> String {
    std::env::var("USER").unwrap_or_else(|_| "cli".into())
}

pub fn run(cmd: ModelsCommand) -> anyhow::Result<Outcome> {
    let rt = runtime()?;
    match cmd {
        ModelsCommand::Register { run, name, model_dir, db } => {
            let store = open_store(&rt, &db.url())?;
            let r = rt.block_on(store.get_run(&run))?;
            let best = match model_dir {
                Some(dir) => std::path::absolute(&dir)?,
                None => std::path::Path::new(&r.run_dir).join("best"),
            };
            if !tuneforge_core::is_model_dir(&best) {
                anyhow::bail!(
                    "{} is not a model directory of run {run} (neither a classifier's tuneforge.json nor an \
                     instruction-tuned adapter)",
                    best.display()
                );
            }
            // Refuse what would fail at serving time.
            if tuneforge_core::sft::is_adapter_dir(&best) {
                tuneforge_core::generate::LanguageModel::load(&best)?;
            } else {
                tuneforge_core::ClassifierModel::load(&best)?;
            }
            let metrics = r.summary.as_ref().and_then(tuneforge_core::registration_metrics);
            let v = rt.block_on(store.register_model(
                &name,
                &run,
                &best.display().to_string(),
                metrics.as_ref(),
                &actor(),
            ))?;
            println!("registered {}@{} ({})", v.name, v.version, v.stage.as_str());
        }
        ModelsCommand::Rules { name, min_rated, heldout_delta, max_error_rate, db } => {
            let store = open_store(&rt, &db.url())?;
            let mut rules = rt.block_on(store.model_rules(&name))?;
            if min_rated.is_some() || heldout_delta.is_some() || max_error_rate.is_some() {
                let off = |v: f64| (v >= 0.0).then_some(v);
                rules.min_rated = min_rated.unwrap_or(rules.min_rated);
                rules.heldout_delta = heldout_delta.map_or(rules.heldout_delta, off);
                rules.max_error_rate = max_error_rate.map_or(rules.max_error_rate, off);
                rt.block_on(store.set_model_rules(&rules, &actor()))?;
            }
            let show = |v: Option<f64>| v.map_or_else(|| "off".to_string(), |v| v.to_string());
            println!(
                "{name}: min_rated {}, heldout_delta {}, max_error_rate {}",
                rules.min_rated,
                show(rules.heldout_delta),
                show(rules.max_error_rate)
            );
        }
        ModelsCommand::Promote { name, model_version, db } => {
            let store = open_store(&rt, &db.url())?;
            let v = rt.block_on(store.promote(&name, model_version, &actor()))?;
            println!("{}@{} is in production", v.name, v.version);
        }
        ModelsCommand::Rollback { name, db } => {
            let store = open_store(&rt, &db.url())?;
            let v = rt.block_on(store.rollback(&name, &actor()))?;
            println!("rolled back: {}@{} is in production", v.name, v.version);
        }
        ModelsCommand::Ls { name, db, json } => {
            let store = open_store(&rt, &db.url())?;
            let models = rt.block_on(store.list_models(name.as_deref()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&models)?);
            } else {
                for m in &models {
                    println!("{}@{}  {:<10}  run {}  {}", m.name, m.version, m.stage.as_str(), m.run_id, m.path);
                }
            }
        }
        ModelsCommand::Events { limit, db, json } => {
            let store = open_store(&rt, &db.url())?;
            let events = rt.block_on(store.events(None, limit))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                for e in &events {
                    println!("{}  {:<11} {:<24} {}  ({})", e.time_ms, e.kind, e.subject, e.detail, e.actor);
                }
            }
        }
    }
    Ok(Outcome::Success)
}
