//! `tuneforge runs ls|show|compare`: the runs of the experiment store.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use tuneforge_store::{RunFilter, RunRow, RunSort, RunStatus};

use super::{DbArgs, Outcome};
use crate::recorder::{open_store, runtime};

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first (or as --sort says).
    Ls(LsArgs),
    /// One run: status, config, summary and the last value of each metric.
    Show {
        id: String,
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        json: bool,
    },
    /// Runs side by side: the settings that differ and the final metrics.
    Compare {
        #[arg(required = true, num_args = 2..)]
        ids: Vec<String>,
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Only runs with this status.
    #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "interrupted"])]
    status: Option<String>,
    /// Only runs whose name contains this.
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "started", value_parser = ["started", "accuracy", "macro_f1", "name"])]
    sort: String,
    /// Ascending order.
    #[arg(long)]
    asc: bool,
    #[arg(long, default_value_t = 20)]
    limit: i64,
    #[arg(long, default_value_t = 0)]
    offset: i64,
    #[arg(long)]
    json: bool,
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

pub fn run(cmd: RunsCommand) -> anyhow::Result<Outcome> {
    let rt = runtime()?;
    match cmd {
        RunsCommand::Ls(a) => {
            let store = open_store(&rt, &a.db.url())?;
            let sort = match a.sort.as_str() {
                "accuracy" => RunSort::Accuracy,
                "macro_f1" => RunSort::MacroF1,
                "name" => RunSort::Name,
                _ => RunSort::Started,
            };
            let filter = RunFilter {
                status: a.status.as_deref().and_then(RunStatus::parse),
                name: a.name.clone(),
                sort,
                ascending: a.asc,
                limit: a.limit,
                offset: a.offset,
            };
            let (runs, total) = rt.block_on(store.list_runs(&filter))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "total": total, "runs": runs }))?);
            } else {
                println!(
                    "{:<44} {:<11} {:<8} {:>9} {:>9} {:>11}",
                    "run", "status", "method", "accuracy", "macro-F1", "steps"
                );
                for r in &runs {
                    println!(
                        "{:<44} {:<11} {:<8} {:>9} {:>9} {:>11}",
                        r.id,
                        r.status.as_str(),
                        r.method,
                        fmt_opt(r.accuracy),
                        fmt_opt(r.macro_f1),
                        format!("{}/{}", r.steps, r.total_steps)
                    );
                }
                println!("{} of {total} runs", runs.len());
            }
        }
        RunsCommand::Show { id, db, json } => {
            let store = open_store(&rt, &db.url())?;
            let run = rt.block_on(store.get_run(&id))?;
            let mut last = BTreeMap::new();
            for key in rt.block_on(store.metric_keys(&id))? {
                if let Some(p) = rt.block_on(store.metric_series(&id, &key, 100_000))?.last() {
                    last.insert(key, p.value);
                }
            }
            let artifacts = rt.block_on(store.artifacts(&id))?;
            let plugins = rt.block_on(store.run_plugins(&id))?;
            if json {
                let doc =
                    serde_json::json!({ "run": run, "last_metrics": last, "artifacts": artifacts, "plugins": plugins });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                show(&run, &last);
                for p in &plugins {
                    println!(
                        "plugin       {} {} ({}, API {}) sha256 {}",
                        p.name,
                        p.version,
                        p.kind,
                        p.api_version,
                        &p.sha256[..16.min(p.sha256.len())]
                    );
                }
                for a in &artifacts {
                    println!(
                        "{:<12} {:>12} bytes  sha256 {}  {}",
                        a.kind,
                        a.bytes,
                        &a.sha256[..16.min(a.sha256.len())],
                        a.path
                    );
                }
            }
        }
        RunsCommand::Compare { ids, db, json } => {
            let store = open_store(&rt, &db.url())?;
            let runs = ids.iter().map(|id| rt.block_on(store.get_run(id))).collect::<Result<Vec<_>, _>>()?;
            let settings: Vec<BTreeMap<String, String>> =
                runs.iter().map(|r| flatten_toml(r.config.as_deref().unwrap_or(""))).collect();
            let keys: std::collections::BTreeSet<&String> = settings.iter().flat_map(|s| s.keys()).collect();
            let differing: Vec<&String> = keys
                .into_iter()
                .filter(|k| settings.iter().map(|s| s.get(*k)).collect::<std::collections::HashSet<_>>().len() > 1)
                .collect();
            if json {
                let diff: BTreeMap<&String, Vec<Option<&String>>> =
                    differing.iter().map(|k| (*k, settings.iter().map(|s| s.get(*k)).collect())).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "runs": runs, "differing_settings": diff }))?
                );
            } else {
                let width = differing.iter().map(|k| k.len()).max().unwrap_or(8).max(8);
                print!("{:<width$}", "");
                for r in &runs {
                    print!("  {:<30}", r.id);
                }
                println!();
                for k in &differing {
                    print!("{k:<width$}");
                    for s in &settings {
                        print!("  {:<30}", s.get(*k).map_or("-", String::as_str));
                    }
                    println!();
                }
                for (label, f) in [("accuracy", 0), ("macro-F1", 1)] {
                    print!("{label:<width$}");
                    for r in &runs {
                        print!("  {:<30}", fmt_opt(if f == 0 { r.accuracy } else { r.macro_f1 }));
                    }
                    println!();
                }
            }
        }
    }
    Ok(Outcome::Success)
}

fn show(run: &RunRow, last: &BTreeMap<String, f64>) {
    println!("run:       {}", run.id);
    println!("status:    {}", run.status.as_str());
    println!("directory: {}", run.run_dir);
    println!("model:     {} ({})", run.model_source, run.method);
    println!("steps:     {}/{}", run.steps, run.total_steps);
    println!("accuracy:  {}   macro-F1: {}", fmt_opt(run.accuracy), fmt_opt(run.macro_f1));
    if let Some(e) = &run.error {
        println!("error:     {e}");
    }
    for (k, v) in last {
        println!("{k:<22} {v:.6}");
    }
}

/// `section.key -> value` for every leaf of a TOML document.
fn flatten_toml(text: &str) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(v) = text.parse::<toml::Table>() {
        walk("", &toml::Value::Table(v), &mut out);
    }
    out
}
