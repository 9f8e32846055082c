//! `tuneforge sweep`: one run per combination of the values given for some keys of an
//! experiment file (a grid search), each trained and recorded like `tuneforge train`, then
//! the runs ranked by the metric that picks their best model.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tuneforge_core::experiment::{BestMetric, Task};
use tuneforge_core::{ExperimentConfig, RunOptions};

use super::{Outcome, RecordArgs};

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The experiment file (TOML).
    #[arg(long, short, value_name = "EXP.toml")]
    config: PathBuf,
    /// A key and the values to try, e.g. `--grid train.lr=1e-4,3e-4,1e-3` (TOML values,
    /// comma-separated; repeatable: every combination runs).
    #[arg(long, value_name = "KEY=V1,V2,...", required = true)]
    grid: Vec<String>,
    /// Override a key for every run, e.g. `--set train.epochs=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Refuse grids of more runs than this.
    #[arg(long, default_value_t = 64)]
    max_runs: usize,
    #[command(flatten)]
    record: RecordArgs,
}

/// One run of a sweep.
#[derive(Debug, Serialize)]
struct SweepRun {
    /// The grid's `key=value` settings of this run.
    settings: Vec<String>,
    run_id: Option<String>,
    run_dir: Option<PathBuf>,
    /// What ranks the runs (`accuracy`, `macro_f1`, `loss` or `validation_loss`), its value,
    /// and whether higher is better.
    metric: String,
    value: Option<f64>,
    higher_is_better: bool,
    gates_passed: Option<bool>,
    error: Option<String>,
}

/// Splits `v1,v2,...` at the commas outside quotes and brackets (a value may be a TOML
/// string or array).
fn split_values(values: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None::<char>);
    for c in values.chars() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('[' | '{', None) => depth += 1,
            (']' | '}', None) => depth -= 1,
            (',', None) if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_owned());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_owned());
    out
}

/// The grid's axes: `(key, values)`, each checked non-empty.
fn parse_grid(grid: &[String]) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    grid.iter()
        .map(|g| {
            let (key, values) = g.split_once('=').with_context(|| format!("--grid `{g}`: expected KEY=V1,V2,..."))?;
            let values = split_values(values);
            if key.trim().is_empty() || values.iter().any(String::is_empty) {
                anyhow::bail!("--grid `{g}`: a key and non-empty values are needed");
            }
            Ok((key.trim().to_owned(), values))
        })
        .collect()
}

/// Every combination of one value per axis, as `key=value` settings, the last axis varying
/// fastest.
fn combinations(axes: &[(String, Vec<String>)]) -> Vec<Vec<String>> {
    axes.iter().fold(vec![Vec::new()], |acc, (key, values)| {
        acc.iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push(format!("{key}={v}"));
                    c
                })
            })
            .collect()
    })
}

/// Trains one combination; the run's ranking metric, or the error that stopped it.
fn run_one(args: &SweepArgs, settings: &[String], db: Option<&str>) -> SweepRun {
    let mut run = SweepRun {
        settings: settings.to_vec(),
        run_id: None,
        run_dir: None,
        metric: String::new(),
        value: None,
        higher_is_better: true,
        gates_passed: None,
        error: None,
    };
    let mut overrides = args.overrides.clone();
    overrides.extend(settings.iter().cloned());
    let outcome = (|| -> anyhow::Result<()> {
        let config = ExperimentConfig::from_file(&args.config, &overrides)?;
        if config.model.task == Task::CausalLm {
            run.metric = "validation_loss".into();
            run.higher_is_better = false;
            let s = super::train::causal_lm_recorded(config, &RunOptions::default(), db, args.record.quiet)?;
            run.run_id = Some(s.run_id.clone());
            run.run_dir = Some(s.run_dir.clone());
            run.value = Some(s.validation_loss);
            return Ok(());
        }
        let metric = config.train.metric_for_best;
        run.metric = serde_json::to_value(metric)?.as_str().unwrap_or("accuracy").to_owned();
        run.higher_is_better = metric != BestMetric::Loss;
        let outcome = super::train::train_recorded(config, &RunOptions::default(), db, args.record.quiet)?;
        let s = &outcome.summary;
        run.run_id = Some(s.run_id.clone());
        run.run_dir = Some(outcome.run.root().to_path_buf());
        run.value = s.best_value;
        run.gates_passed = Some(s.gates_passed);
        Ok(())
    })();
    if let Err(e) = outcome {
        run.error = Some(format!("{e:#}"));
    }
    run
}

pub fn run(args: SweepArgs) -> anyhow::Result<Outcome> {
    let axes = parse_grid(&args.grid)?;
    let combos = combinations(&axes);
    if combos.len() > args.max_runs {
        anyhow::bail!("the grid makes {} runs, more than --max-runs {}", combos.len(), args.max_runs);
    }
    // Every combination's file is checked before the first run trains.
    for settings in &combos {
        let mut overrides = args.overrides.clone();
        overrides.extend(settings.iter().cloned());
        ExperimentConfig::from_file(&args.config, &overrides)
            .with_context(|| format!("the sweep's run with {}", settings.join(" ")))?;
    }
    let db = args.record.store();
    let mut runs = Vec::with_capacity(combos.len());
    for (i, settings) in combos.iter().enumerate() {
        if !args.record.quiet {
            eprintln!("== sweep run {} of {}: {}", i + 1, combos.len(), settings.join(" "));
        }
        runs.push(run_one(&args, settings, db.as_deref()));
    }
    // Best first; runs without a value (failed, or stopped before a validation) last.
    runs.sort_by(|a, b| {
        let key = |r: &SweepRun| r.value.map(|v| if r.higher_is_better { -v } else { v });
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
    });
    if args.record.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        let width = runs.iter().map(|r| r.settings.join(" ").chars().count()).max().unwrap_or(8).max(8);
        println!("{:<width$}  {:>10}  {:<6}  run", "settings", "metric", "gates");
        for r in &runs {
            let value = r.value.map_or("—".to_owned(), |v| format!("{v:.4}"));
            let gates = match r.gates_passed {
                Some(true) => "passed",
                Some(false) => "FAILED",
                None => "",
            };
            let id = r.run_id.as_deref().unwrap_or("—");
            println!("{:<width$}  {value:>10}  {gates:<6}  {id}", r.settings.join(" "));
            if let Some(e) = &r.error {
                println!("{:<width$}  error: {e}", "");
            }
        }
        if let Some(best) = runs.first().filter(|r| r.value.is_some()) {
            println!(
                "\nbest by {}: {} ({})",
                best.metric,
                best.settings.join(" "),
                best.run_id.as_deref().unwrap_or("—")
            );
        }
        let ids: Vec<&str> = runs.iter().filter_map(|r| r.run_id.as_deref()).take(5).collect();
        if db.is_some() && ids.len() >= 2 {
            println!("side by side: tuneforge runs compare {}", ids.join(" "));
        }
    }
    let failed = runs.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} sweep runs failed", runs.len());
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_split_at_top_level_commas_and_combine() -> anyhow::Result<()> {
        assert_eq!(split_values("1e-4, 3e-4,1e-3"), ["1e-4", "3e-4", "1e-3"]);
        assert_eq!(split_values(r#""a,b",["q_proj", "v_proj"],'c'"#), [r#""a,b""#, r#"["q_proj", "v_proj"]"#, "'c'"]);
        let axes = parse_grid(&["train.lr=1,2".into(), "peft.rank=8,16,32".into()])?;
        let c = combinations(&axes);
        assert_eq!(c.len(), 6);
        assert_eq!(c[0], ["train.lr=1", "peft.rank=8"]);
        assert_eq!(c[5], ["train.lr=2", "peft.rank=32"]);
        assert!(parse_grid(&["train.lr".into()]).is_err());
        assert!(parse_grid(&["train.lr=1,,2".into()]).is_err());
        Ok(())
    }
}
