//! `tuneforge ab start|status|stop`: A/B tests of a candidate version against production.
//! The server routes each session (the `session` of `POST /api/v1/predict`) to an arm, stably.

use anyhow::Context;
use clap::Subcommand;
use tuneforge_store::{MIN_RATED, verdict, wilson};

use super::models::actor;
use super::{DbArgs, Outcome};
use crate::recorder::{open_store, runtime};

#[derive(Debug, Subcommand)]
pub enum AbCommand {
    /// Serve VERSION of MODEL to a share of sessions beside production.
    Start {
        #[arg(long)]
        model: String,
        /// The candidate version (registered, not in production).
        #[arg(long)]
        candidate: i64,
        /// The share of sessions the candidate serves, between 0 and 1.
        #[arg(long, default_value_t = 0.2)]
        share: f64,
        /// Decide by hand: without it the server promotes or rolls back on its own once the
        /// feedback-rated verdict is significant.
        #[arg(long)]
        manual: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Per-arm predictions, feedback-rated accuracy (95% interval), latency and the verdict.
    Status {
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        json: bool,
    },
    /// End MODEL's running test: promote the candidate, roll it back, or just stop.
    Stop {
        #[arg(long)]
        model: String,
        #[arg(long, conflicts_with = "rollback")]
        promote: bool,
        #[arg(long)]
        rollback: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

fn pct(x: Option<(f64, f64, f64)>) -> String {
    x.map_or_else(|| "—".into(), |(p, lo, hi)| format!("{:.1}% [{:.1}, {:.1}]", p * 100.0, lo * 100.0, hi * 100.0))
}

pub fn run(cmd: AbCommand) -> anyhow::Result<Outcome> {
    let rt = runtime()?;
    match cmd {
        AbCommand::Start { model, candidate, share, manual, db } => {
            let store = open_store(&rt, &db.url())?;
            let t = rt.block_on(store.start_ab(&model, candidate, share, !manual, &actor()))?;
            println!(
                "A/B test {} started: {model}@{candidate} serves {:.0}% of sessions, @{} the rest",
                t.id,
                share * 100.0,
                t.production_version
            );
        }
        AbCommand::Status { model, db, json } => {
            let store = open_store(&rt, &db.url())?;
            let tests = rt.block_on(store.ab_tests(model.as_deref()))?;
            let mut docs = Vec::new();
            if tests.is_empty() && !json {
                println!("no A/B tests (start one with `tuneforge ab start --model NAME --candidate VERSION`)");
            }
            for t in tests {
                let (p, c) = rt.block_on(store.ab_stats(&t))?;
                let (so_far, z) = verdict(&p, &c, MIN_RATED);
                if json {
                    docs.push(
                        serde_json::json!({"test": t, "production": p, "candidate": c, "verdict": so_far, "z": z}),
                    );
                    continue;
                }
                println!(
                    "{} {}: @{} vs candidate @{} ({:.0}%), {}; verdict {so_far}{}",
                    t.id,
                    t.model_name,
                    t.production_version,
                    t.candidate_version,
                    t.share * 100.0,
                    t.status,
                    z.map(|z| format!(" (z = {z:.2})")).unwrap_or_default()
                );
                for (arm, s) in [("production", &p), ("candidate", &c)] {
                    println!(
                        "  {arm:<10} {:>6} predictions, {:>5} rated, accuracy {}, latency {}",
                        s.predictions,
                        s.rated,
                        pct(wilson(s.correct, s.rated)),
                        s.mean_latency_ms.map_or_else(|| "—".into(), |l| format!("{l:.1} ms"))
                    );
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&docs)?);
            }
        }
        AbCommand::Stop { model, promote, rollback, db } => {
            let store = open_store(&rt, &db.url())?;
            let t =
                rt.block_on(store.running_ab(&model))?.with_context(|| format!("`{model}` has no running A/B test"))?;
            let action = if promote {
                "promote"
            } else if rollback {
                "rollback"
            } else {
                "stop"
            };
            let ended = rt.block_on(store.conclude_ab(&t.id, action, &actor()))?;
            println!("A/B test {} {}: {}", ended.id, ended.status, ended.verdict.unwrap_or_default());
        }
    }
    Ok(Outcome::Success)
}
