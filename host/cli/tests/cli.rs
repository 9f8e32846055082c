//! The `tuneforge` binary as a user runs it: train, resume, eval, predict, gates, and the
//! errors for bad configs, data and models — on a tiny random model so it runs in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tuneforge_core::testing::write_tiny_model_dir;

const WORDS: &[&str] = &["fever", "cough", "hot", "rash", "itch", "red", "chest", "pain", "tired"];

const CSV: &str = "label,text\n\
flu,fever cough hot\nflu,fever hot tired\nflu,cough fever\nflu,hot cough tired\nflu,fever hot\nflu,cough hot\n\
acne,rash itch red\nacne,red rash\nacne,itch red\nacne,rash itch\nacne,red itch rash\nacne,itch rash\n\
angina,chest pain\nangina,pain chest tired\nangina,chest pain hot\nangina,pain chest\nangina,chest tired\nangina,tired chest pain\n";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tiny_model_dir(&dir.path().join("model"), WORDS, 5).expect("tiny model");
        std::fs::write(dir.path().join("train.csv"), CSV).expect("csv");
        Self { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes an experiment file (relative paths: run from the temp dir) with `extra` appended.
    fn experiment(&self, extra: &str) -> PathBuf {
        let text = format!(
            "[experiment]\nname = \"t\"\n[model]\nsource = \"model\"\nmax_len = 16\n\
             [data]\ntrain = \"train.csv\"\nvalidation = \"train.csv\"\n\
             [train]\nepochs = 20\nbatch_size = 6\nlr = 1e-2\n{extra}"
        );
        let p = self.path("exp.toml");
        std::fs::write(&p, text).expect("write exp");
        p
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run tuneforge")
    }

    /// The data directory of the latest `tuneforge retrain`.
    fn latest_retrain_data(&self) -> PathBuf {
        let dirs = std::fs::read_dir(self.path("runs/retrain-data")).expect("retrain data");
        dirs.flatten().map(|e| e.path()).max().expect("a retrain data directory")
    }

    /// `tuneforge` in the temp dir, with its own experiment store.
    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tuneforge"));
        c.current_dir(self.dir.path()).env("TUNEFORGE_DB", self.path("store.db"));
        c
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_no_panic(o: &Output) {
    let e = stderr(o);
    assert!(!e.contains("panicked") && !e.contains("RUST_BACKTRACE"), "panic in: {e}");
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

/// Instruction data for the tiny decoder: `{"prompt": "the cat {i}", "response": "in the hat"}`
/// lines for `i` in `range`.
fn cat_lines(range: std::ops::Range<usize>) -> String {
    range
        .map(|i| serde_json::json!({"prompt": format!("the cat {i}"), "response": "in the hat"}).to_string() + "\n")
        .collect()
}

#[test]
fn train_eval_predict_round_trip() {
    let env = Env::new();
    let exp = env.experiment("[gates]\nmin_accuracy = 0.9\n");
    let o = env.run(&["train", "--config", exp.to_str().expect("utf8"), "--json", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = json(&o);
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["gates_passed"], true);
    let best = summary["best_model_dir"].as_str().expect("best dir").to_owned();
    let run_dir = Path::new(&best).parent().expect("run dir");
    for f in ["config.toml", "metrics.jsonl", "summary.json"] {
        assert!(run_dir.join(f).is_file(), "{f}");
    }
    assert!(run_dir.starts_with(env.path("runs")), "output_dir defaults to ./runs");

    let o = env.run(&["eval", "--model", &best, "--data", "train.csv", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = json(&o);
    for key in ["accuracy", "macro_f1", "n", "s_per_1k_tokens"] {
        assert!(report[key].is_number(), "{key} in {report}");
    }
    assert_eq!(report["n"], 18);
    assert!(report["accuracy"].as_f64().expect("acc") >= 0.9);

    let o = env.run(&["eval", "--model", &best, "--data", "train.csv"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("confusion matrix"), "{}", stdout(&o));

    let o = env.run(&["predict", "--model", &best, "--json", "rash itch red", "chest pain"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = json(&o);
    assert_eq!(p[0]["label"], "acne");
    assert_eq!(p[1]["label"], "angina");
    let sum: f64 = p[0]["probabilities"].as_object().expect("probs").values().map(|v| v.as_f64().expect("p")).sum();
    assert!((sum - 1.0).abs() < 1e-4);
}

#[test]
fn a_failed_gate_exits_non_zero_with_a_message() {
    let env = Env::new();
    let exp = env.experiment("[gates]\nmin_accuracy = 0.99\nmax_trainable_ratio = 0.5\n");
    let o = env.run(&[
        "train",
        "--config",
        exp.to_str().expect("utf8"),
        "--quiet",
        "--set",
        "train.epochs=1",
        "--set",
        "train.lr=1e-5",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("gate min_accuracy FAILED"), "{e}");
    assert!(e.contains("gate max_trainable_ratio FAILED"), "{e}");
    assert_no_panic(&o);

    let summary: serde_json::Value = {
        let runs = std::fs::read_dir(env.path("runs")).expect("runs").next().expect("a run").expect("entry").path();
        serde_json::from_str(&std::fs::read_to_string(runs.join("summary.json")).expect("summary")).expect("json")
    };
    assert_eq!(summary["gates_passed"], false);
    let best = summary["best_model_dir"].as_str().expect("best");
    let o = env.run(&["eval", "--model", best, "--data", "train.csv", "--min-accuracy", "1.01"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("gate min_accuracy FAILED"));
}

#[test]
fn stop_and_resume_through_the_command_line() {
    let env = Env::new();
    let exp = env.experiment("");
    let o =
        env.run(&["train", "--config", exp.to_str().expect("utf8"), "--quiet", "--json", "--stop-after-steps", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    assert_eq!((s["status"].as_str(), s["steps"].as_u64()), (Some("stopped"), Some(5)));
    let run_dir = env.path("runs").join(s["run_id"].as_str().expect("id"));
    let o = env.run(&["train", "--resume", run_dir.to_str().expect("utf8"), "--quiet", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    assert_eq!(s["status"], "completed");
    assert_eq!(s["steps"], s["total_steps"]);
    let lines = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, (1..=s["total_steps"].as_u64().expect("total")).collect::<Vec<_>>());
}

#[test]
fn bad_configs_name_the_file_and_key() {
    let env = Env::new();
    let exp = env.experiment("warmup_stepz = 3\n");
    let o = env.run(&["train", "--config", exp.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("exp.toml: train.warmup_stepz:")
            && e.contains("unknown field `warmup_stepz`")
            && e.contains("line 13"),
        "{e}"
    );
    assert_no_panic(&o);

    let exp = env.experiment("");
    let o = env.run(&["train", "--config", exp.to_str().expect("utf8"), "--set", "train.batch_size=0"]);
    assert!(stderr(&o).contains("train.batch_size: must be at least 1"), "{}", stderr(&o));

    let o = env.run(&["train", "--config", "missing.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.toml: No such file"), "{}", stderr(&o));
    assert_no_panic(&o);
}

#[test]
fn bad_data_and_models_get_clear_errors() {
    let env = Env::new();
    std::fs::write(env.path("empty-text.csv"), "label,text\nflu,fever\nacne,\n").expect("write");
    let exp = env.experiment("");
    let o = env.run(&["train", "--config", exp.to_str().expect("utf8"), "--set", "data.train=empty-text.csv"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("empty-text.csv:3: field `text`: is empty"), "{e}");
    assert_no_panic(&o);

    let o = env.run(&["eval", "--model", "model", "--data", "train.csv"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a tuneforge model directory"), "{}", stderr(&o));
    let o = env.run(&["predict", "--model", "nowhere", "text"]);
    assert_eq!(o.status.code(), Some(1));
    assert_no_panic(&o);

    let o = env.run(&["train", "--config", exp.to_str().expect("utf8"), "--set", "model.source=pypi:unpinned"]);
    assert!(stderr(&o).contains("pin the version"), "{}", stderr(&o));
}

#[test]
fn every_command_has_help() {
    let env = Env::new();
    for cmd in [&["--help"][..], &["train", "--help"], &["eval", "--help"], &["predict", "--help"]] {
        let o = env.run(cmd);
        assert!(o.status.success());
        assert!(stdout(&o).contains("Usage: tuneforge"), "{}", stdout(&o));
    }
}

/// The bash completion script loads in bash and completes commands and flags.
#[test]
fn completions_complete_in_bash() {
    let env = Env::new();
    let o = env.run(&["completions", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = env.path("tuneforge.bash");
    std::fs::write(&script, &o.stdout).expect("write the script");
    // Bash's completion entry point, as the shell calls it for `tuneforge WORD<TAB>`.
    let complete = |line: &[&str]| -> Vec<String> {
        let words = line.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" ");
        let probe = format!(
            "source '{}'; COMP_WORDS=({words}); COMP_CWORD={}; COMP_LINE='{}'; COMP_POINT=${{#COMP_LINE}}; \
             _tuneforge tuneforge '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            line.len() - 1,
            line.join(" "),
            line[line.len() - 1],
            line[line.len().saturating_sub(2)],
        );
        let out = Command::new("bash").args(["--norc", "-c", &probe]).output().expect("run bash");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    };
    let commands = complete(&["tuneforge", "tr"]);
    assert_eq!(commands, ["train"], "{commands:?}");
    let flags = complete(&["tuneforge", "train", "--dev"]);
    assert_eq!(flags, ["--device"], "{flags:?}");
    // Other shells' scripts come out too; an unknown shell is a usage error.
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        let o = env.run(&["completions", shell]);
        assert!(o.status.success() && stdout(&o).contains("tuneforge"), "{shell}: {}", stderr(&o));
    }
    let o = env.run(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

fn train_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().expect("step"), v["loss"].as_f64().expect("loss")))
        .collect()
}

/// A run killed with SIGKILL at an arbitrary moment and resumed gives the losses of a run
/// that was never interrupted.
#[test]
fn a_killed_run_resumes_on_the_same_trajectory() {
    let env = Env::new();
    let exp = env.experiment("eval_every_steps = 7\n");
    let exp = exp.to_str().expect("utf8");
    let args = ["train", "--config", exp, "--quiet", "--set", "train.epochs=150", "--set", "experiment.name=full"];
    let o = env.run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let full_dir = std::fs::read_dir(env.path("runs")).expect("runs").next().expect("run").expect("entry").path();
    let full = train_losses(&full_dir);
    assert_eq!(full.len(), 450);

    let mut child = env
        .command()
        .args(["train", "--config", exp, "--quiet", "--set", "train.epochs=150", "--set", "experiment.name=killed"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let killed_dir = loop {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let dir = std::fs::read_dir(env.path("runs"))
            .expect("runs")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("killed")));
        if let Some(dir) = dir
            && std::fs::read_to_string(dir.join("metrics.jsonl")).is_ok_and(|m| m.lines().count() >= 60)
        {
            child.kill().expect("kill");
            child.wait().expect("wait");
            break dir;
        }
        assert!(child.try_wait().expect("try_wait").is_none(), "the run ended before it could be killed");
    };
    let before = train_losses(&killed_dir).len();
    assert!(before < 450, "killed after {before} steps");
    // The store still says `running`; the next command notices the process is gone.
    let killed_id = killed_dir.file_name().expect("name").to_string_lossy().into_owned();
    let o = env.run(&["runs", "show", &killed_id, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&o)["run"]["status"], "interrupted");
    assert!(json(&o)["last_metrics"]["train/loss"].is_number(), "metrics up to the last flush are there");
    let o = env.run(&["train", "--resume", killed_dir.to_str().expect("utf8"), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = train_losses(&killed_dir);
    assert_eq!(resumed.len(), full.len());
    for ((s1, a), (s2, b)) in full.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 1e-5, "step {s1}: {a} vs {b}");
    }
}

#[test]
fn lora_runs_export_for_peft_and_merged() {
    let env = Env::new();
    let exp =
        env.experiment("[peft]\nmethod = \"lora\"\nrank = 2\ntarget_modules = [\"query\", \"value\", \"dense\"]\n");
    let o = env.run(&["train", "--config", exp.to_str().expect("utf8"), "--json", "--quiet", "--set", "train.lr=3e-2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&o);
    assert!(s["trainable_ratio"].as_f64().expect("ratio") < 0.3);
    let run = env.path("runs").join(s["run_id"].as_str().expect("id"));
    let run = run.to_str().expect("utf8");
    let o = env.run(&["export", "--peft", run, "peft-out"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        env.path("peft-out/adapter_config.json").is_file() && env.path("peft-out/adapter_model.safetensors").is_file()
    );
    let o = env.run(&["export", "--merged", run, "merged"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = env.run(&["predict", "--model", &format!("{run}/best"), "--json", "rash itch red", "chest pain"]);
    let b = env.run(&["predict", "--model", "merged", "--json", "rash itch red", "chest pain"]);
    let (a, b) = (json(&a), json(&b));
    for i in 0..2 {
        assert_eq!(a[i]["label"], b[i]["label"]);
        assert!((a[i]["score"].as_f64().expect("p") - b[i]["score"].as_f64().expect("p")).abs() < 1e-4);
    }
    let o = env.run(&["export", run, "x"]);
    assert_eq!(o.status.code(), Some(2), "--peft or --merged is required");

    // int8: LoRA is merged on the way; eval and predict load the quantized directory.
    let o = env.run(&["quantize", "--model", run, "--to", "int8", "int8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("int8"), "{}", stdout(&o));
    let c = env.run(&["predict", "--model", "int8", "--json", "rash itch red", "chest pain"]);
    assert!(c.status.success(), "{}", stderr(&c));
    let c = json(&c);
    for i in 0..2 {
        assert_eq!(a[i]["label"], c[i]["label"]);
        assert!((a[i]["score"].as_f64().expect("p") - c[i]["score"].as_f64().expect("p")).abs() < 0.05);
    }
    let o = env.run(&["eval", "--model", "int8", "--data", "train.csv", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = env.run(&["eval", "--model", &format!("{run}/best"), "--data", "train.csv", "--json"]);
    let (acc8, acc32) = (json(&o)["accuracy"].as_f64().expect("acc"), json(&f)["accuracy"].as_f64().expect("acc"));
    assert!(acc8 >= acc32 - 0.12, "int8 accuracy {acc8} vs f32 {acc32}");
    let o = env.run(&["quantize", "--model", "int8", "again"]);
    assert!(!o.status.success() && stderr(&o).contains("already quantized"), "{}", stderr(&o));
    assert_no_panic(&o);
    // The int8 copy registers as a version of the run's model (what the server loads).
    let id = s["run_id"].as_str().expect("id");
    let o = env.run(&["models", "register", id, "--name", "q", "--model-dir", "int8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.run(&["models", "register", id, "--name", "q", "--model-dir", "train.csv"]);
    assert!(!o.status.success() && stderr(&o).contains("not a model directory"), "{}", stderr(&o));
}

/// Runs land in the experiment store; the registry promotes and rolls back with an audit trail.
#[test]
fn runs_are_recorded_and_models_promoted_and_rolled_back() {
    let env = Env::new();
    let exp = env.experiment("");
    let exp = exp.to_str().expect("utf8");
    let mut ids = Vec::new();
    for lr in ["1e-2", "3e-3"] {
        let o = env.run(&["train", "--config", exp, "--quiet", "--json", "--set", &format!("train.lr={lr}")]);
        assert!(o.status.success(), "{}", stderr(&o));
        ids.push(json(&o)["run_id"].as_str().expect("id").to_owned());
    }
    let o = env.run(&["runs", "ls", "--json"]);
    let listed = json(&o);
    assert_eq!(listed["total"], 2);
    assert!(listed["runs"].as_array().expect("runs").iter().all(|r| r["status"] == "succeeded"));
    let o = env.run(&["runs", "show", &ids[0], "--json"]);
    let shown = json(&o);
    assert!(shown["run"]["accuracy"].is_number());
    assert_eq!(shown["run"]["device"], "cpu", "the store records where the run computed");
    assert!(shown["last_metrics"]["val/accuracy"].is_number());
    let kinds: Vec<&str> =
        shown["artifacts"].as_array().expect("artifacts").iter().map(|a| a["kind"].as_str().expect("kind")).collect();
    for kind in ["config", "metrics", "summary", "model", "tokenizer"] {
        assert!(kinds.contains(&kind), "{kinds:?}");
    }
    let model = shown["artifacts"].as_array().expect("artifacts").iter().find(|a| a["kind"] == "model").expect("model");
    assert_eq!(model["sha256"].as_str().expect("sha").len(), 64);
    let o = env.run(&["runs", "compare", &ids[0], &ids[1]]);
    assert!(stdout(&o).contains("train.lr"), "{}", stdout(&o));

    for id in &ids {
        let o = env.run(&["models", "register", id, "--name", "triage"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    for v in ["1", "2"] {
        assert!(env.run(&["models", "promote", "triage", v]).status.success());
    }
    let o = env.run(&["models", "rollback", "triage"]);
    assert!(stdout(&o).contains("triage@1 is in production"), "{}", stdout(&o));
    let o = env.run(&["models", "ls", "triage", "--json"]);
    let stages: Vec<String> =
        json(&o).as_array().expect("models").iter().map(|m| m["stage"].as_str().expect("stage").to_owned()).collect();
    assert_eq!(stages, ["archived", "production"]);
    let o = env.run(&["models", "events", "--json"]);
    let kinds: Vec<String> =
        json(&o).as_array().expect("events").iter().map(|e| e["kind"].as_str().expect("kind").to_owned()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "promote").count(), 2);
    assert!(kinds.contains(&"rollback".to_owned()));
    let o = env.run(&["models", "rollback", "nothing"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no production version"), "{}", stderr(&o));

    // An A/B test of v2 against production v1, then its promotion.
    let o = env.run(&["ab", "start", "--model", "triage", "--candidate", "2", "--share", "0.25"]);
    assert!(stdout(&o).contains("triage@2 serves 25% of sessions, @1 the rest"), "{}{}", stdout(&o), stderr(&o));
    let o = env.run(&["ab", "start", "--model", "triage", "--candidate", "2"]);
    assert!(!o.status.success() && stderr(&o).contains("already has a running A/B test"), "{}", stderr(&o));
    let o = env.run(&["ab", "status", "--model", "triage"]);
    assert!(stdout(&o).contains("verdict undecided") && stdout(&o).contains("candidate"), "{}", stdout(&o));
    let o = env.run(&["ab", "stop", "--model", "triage", "--promote"]);
    assert!(stdout(&o).contains("promoted"), "{}{}", stdout(&o), stderr(&o));
    let o = env.run(&["ab", "status", "--json"]);
    assert_eq!(json(&o)[0]["test"]["status"], "promoted");
    let o = env.run(&["models", "ls", "triage", "--json"]);
    assert_eq!(json(&o)[0]["stage"], "production", "v2 (listed first) went to production");
    let o = env.run(&["ab", "stop", "--model", "triage"]);
    assert!(!o.status.success() && stderr(&o).contains("no running A/B test"));

    let o = env.run(&["models", "rules", "triage"]);
    assert!(stdout(&o).contains("triage: min_rated 30, heldout_delta off, max_error_rate off"), "{}", stdout(&o));
    let o = env.run(&["models", "rules", "triage", "--heldout-delta", "0.02", "--max-error-rate", "0.4"]);
    assert!(stdout(&o).contains("heldout_delta 0.02, max_error_rate 0.4"), "{}{}", stdout(&o), stderr(&o));
    let o = env.run(&["models", "rules", "triage", "--max-error-rate", "-1", "--min-rated", "50"]);
    assert!(stdout(&o).contains("min_rated 50, heldout_delta 0.02, max_error_rate off"), "{}", stdout(&o));
    let o = env.run(&["models", "rules", "triage", "--max-error-rate", "7"]);
    assert!(!o.status.success() && stderr(&o).contains("max_error_rate must be between 0 and 1"));
}

#[test]
fn an_unusable_store_does_not_stop_training() {
    let env = Env::new();
    let exp = env.experiment("");
    let o = env.run(&["train", "--config", exp.to_str().expect("utf8"), "--quiet", "--db", "/dev/null/store.db"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("not recording this run in the experiment store"), "{}", stderr(&o));
    assert_no_panic(&o);
}

#[test]
fn a_scaffolded_loss_plugin_builds_installs_and_a_run_uses_it() {
    let env = Env::new();
    let home = env.path("plugin-home");
    let home_s = home.to_str().expect("utf-8");
    let o = env.run(&["plugin", "new", "loss", "my-loss"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A user's edit: a different default scale.
    let lib = env.path("my-loss/src/lib.rs");
    let src = std::fs::read_to_string(&lib).expect("lib.rs");
    std::fs::write(&lib, src.replace("c.f64(\"scale\", 1.0)?", "c.f64(\"scale\", 0.5)?")).expect("edit");

    let target = tuneforge_tests::plugin_target_dir();
    let target_s = target.to_str().expect("utf-8");
    let o = env.run(&["plugin", "build", "my-loss", "--home", home_s, "--target-dir", target_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("installed my-loss 0.1.0 (loss, API 0.1.0)"), "{}", stdout(&o));
    let o = env.run(&["plugin", "list", "--home", home_s]);
    assert!(stdout(&o).contains("my-loss") && stdout(&o).contains("loss"), "{}", stdout(&o));
    let o = env.run(&["plugin", "check", "my-loss", "--home", home_s]);
    assert!(o.status.success() && stdout(&o).contains("instantiates in the sandbox"), "{}", stderr(&o));

    let exp = env.experiment("[[plugins]]\nname = \"my-loss\"\nweight = 0.3\n");
    let o = env.command().env("TUNEFORGE_PLUGIN_DIR", &home).args(["train", "-q", "--config"]).arg(&exp).output();
    let o = o.expect("train");
    assert!(o.status.success(), "{}", stderr(&o));
    let run = std::fs::read_dir(env.path("runs")).expect("runs").next().expect("run").expect("entry").path();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    assert!(metrics.lines().filter(|l| l.contains("\"kind\":\"train\"")).all(|l| l.contains("\"plugin:my-loss\":")));
    let summary = std::fs::read_to_string(run.join("summary.json")).expect("summary");
    assert!(summary.contains("\"name\": \"my-loss\"") && summary.contains("\"api_version\": \"0.1.0\""), "{summary}");
    let id = run.file_name().expect("id").to_str().expect("utf-8");
    let o = env.run(&["runs", "show", id]);
    assert!(stdout(&o).contains("plugin       my-loss 0.1.0 (loss, API 0.1.0) sha256"), "{}", stdout(&o));

    // Not installed: the error says how to install.
    let exp = env.experiment("[[plugins]]\nname = \"nope\"\n");
    let o = env.command().env("TUNEFORGE_PLUGIN_DIR", &home).args(["train", "-q", "--config"]).arg(&exp).output();
    let err = stderr(&o.expect("train"));
    assert!(err.contains("plugin `nope` is not installed") && err.contains("tuneforge plugin build"), "{err}");
}

#[test]
fn plugin_new_refuses_bad_kinds_names_and_non_empty_directories() {
    let env = Env::new();
    let o = env.run(&["plugin", "new", "lost", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("unknown plugin kind `lost`"));
    let o = env.run(&["plugin", "new", "loss", "Bad_Name"]);
    assert!(!o.status.success() && stderr(&o).contains("plugin name `Bad_Name`"));
    std::fs::create_dir_all(env.path("taken/src")).expect("mkdir");
    let o = env.run(&["plugin", "new", "loss", "taken"]);
    assert!(!o.status.success() && stderr(&o).contains("is not empty"));
}

/// `tuneforge serve` on a free port over the test's store; killed on drop.
struct Served {
    child: std::process::Child,
    port: u16,
}

impl Served {
    fn start(env: &Env) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let child = env
            .command()
            .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--token", "kill-test-token-0123456789"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("serve");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "serve did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self { child, port }
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        use std::io::{Read, Write};
        let body = body.to_string();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer kill-test-token-0123456789\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("response");
        assert!(head.starts_with("HTTP/1.1 20"), "{path}: {head}\n{body}");
        serde_json::from_str(body).expect("json")
    }

    fn kill(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn killing_the_server_during_an_ab_test_loses_no_feedback_and_the_test_resumes() {
    let env = Env::new();
    let exp = env.experiment("");
    let exp = exp.to_str().expect("utf8");
    for lr in ["1e-2", "3e-3"] {
        let o = env.run(&["train", "--config", exp, "--quiet", "--json", "--set", &format!("train.lr={lr}")]);
        assert!(o.status.success(), "{}", stderr(&o));
        let id = json(&o)["run_id"].as_str().expect("id").to_owned();
        assert!(env.run(&["models", "register", &id, "--name", "triage"]).status.success());
    }
    assert!(env.run(&["models", "promote", "triage", "1"]).status.success());
    let o = env.run(&["ab", "start", "--model", "triage", "--candidate", "2", "--share", "0.5", "--manual"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let rate = |server: &Served, sessions: std::ops::Range<u32>| {
        for i in sessions {
            let p = server.post(
                "/api/v1/predict",
                &serde_json::json!({"model": "triage", "text": "fever cough", "session": format!("u{i}")}),
            );
            let id = p["predictions"][0]["id"].as_str().expect("id").to_owned();
            server.post("/api/v1/feedback", &serde_json::json!({"prediction_id": id, "rating": "correct"}));
        }
    };
    let server = Served::start(&env);
    rate(&server, 0..40);
    server.kill();

    // Everything acknowledged before the kill is in the store, and the test still runs.
    let o = env.run(&["ab", "status", "--model", "triage", "--json"]);
    let t = &json(&o)[0];
    assert_eq!(t["test"]["status"], "running", "{t}");
    let rated = |t: &serde_json::Value| {
        t["production"]["rated"].as_i64().expect("n") + t["candidate"]["rated"].as_i64().expect("n")
    };
    assert_eq!(rated(t), 40, "{t}");

    // After a restart the same sessions keep their arms and the test goes on counting.
    let server = Served::start(&env);
    let before: Vec<i64> = (0..5)
        .map(|i| {
            server.post(
                "/api/v1/predict",
                &serde_json::json!({"model": "triage", "text": "x", "session": format!("u{i}")}),
            )["version"]
                .as_i64()
                .expect("v")
        })
        .collect();
    let again: Vec<i64> = (0..5)
        .map(|i| {
            server.post(
                "/api/v1/predict",
                &serde_json::json!({"model": "triage", "text": "y", "session": format!("u{i}")}),
            )["version"]
                .as_i64()
                .expect("v")
        })
        .collect();
    assert_eq!(before, again);
    rate(&server, 40..50);
    drop(server);
    let o = env.run(&["ab", "status", "--model", "triage", "--json"]);
    assert_eq!(rated(&json(&o)[0]), 50);
}

#[test]
fn retrain_builds_a_dataset_from_feedback_trains_registers_and_starts_an_ab_test() {
    let env = Env::new();
    let exp = env.experiment("");
    let o = env.run(&["train", "--config", exp.to_str().expect("utf8"), "--quiet", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = json(&o)["run_id"].as_str().expect("id").to_owned();
    assert!(env.run(&["models", "register", &id, "--name", "triage"]).status.success());
    assert!(env.run(&["models", "promote", "triage", "1"]).status.success());
    let o = env.run(&["retrain", "--model", "triage"]);
    assert!(o.status.success(), "no feedback is fine too: {}", stderr(&o));

    // Corrections: one new text, one that is in the validation set (this experiment validates
    // on its training file), one unreviewed, one wrong answer without a correction.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = env.path("store.db");
    rt.block_on(async {
        let store = tuneforge_store::Store::open(db.to_str().expect("utf8")).await.expect("store");
        for (input, rating, label, reviewed) in [
            ("itch chest pain tired", "wrong", Some("angina"), true),
            ("rash itch red", "wrong", Some("angina"), true),
            ("cough cough", "correct", None, false),
            ("hot hot", "wrong", None, true),
        ] {
            let p = tuneforge_store::NewPrediction {
                model_name: "triage".into(),
                model_version: 1,
                input: input.into(),
                output: "flu".into(),
                probabilities: serde_json::json!({"flu": 0.9}),
                latency_ms: 1.0,
                arm: None,
            };
            let pid = store.record_prediction(&p).await.expect("prediction");
            let f = tuneforge_store::NewFeedback {
                prediction_id: pid,
                rating: rating.into(),
                corrected_label: label.map(String::from),
                comment: None,
                author: None,
            };
            let fid = store.record_feedback(&f).await.expect("feedback");
            if reviewed {
                store.mark_feedback_reviewed(&fid, "t").await.expect("review");
            }
        }
        // The A/B test of the first retrain is still running: end it so a new one can start.
        if let Some(t) = store.running_ab("triage").await.expect("running") {
            store.conclude_ab(&t.id, "stop", "t").await.expect("stop");
        }
        store.close().await;
    });
    let o = env.run(&["retrain", "--model", "triage", "--share", "0.3", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("1 added and 0 relabelled from 3 feedback"), "{out}");
    assert!(
        out.contains("1 in the validation set left out") && out.contains("1 wrong answers without a correction"),
        "{out}"
    );
    assert!(
        out.contains("registered triage@3 (candidate)") && out.contains("serves 30% of sessions against @1"),
        "{out}"
    );
    let data = env.latest_retrain_data();
    let lines = std::fs::read_to_string(data.join("train.jsonl")).expect("train.jsonl");
    let corrected = lines.lines().find(|l| l.contains("itch chest pain tired")).expect("the correction is in");
    assert!(corrected.contains("\"label\":\"angina\"") && corrected.contains("\"source\":\"feedback:"), "{corrected}");
    assert!(!lines.contains("cough cough"), "unreviewed feedback stays out");
    let o = env.run(&["ab", "status", "--model", "triage", "--json"]);
    let t = &json(&o)[0]["test"];
    assert_eq!((t["status"].as_str(), t["candidate_version"].as_i64()), (Some("running"), Some(3)), "{t}");
}

/// The feedback loop of a language model through the command line and the server: an
/// instruction-tuned adapter is registered and promoted, `serve` answers and records
/// `/api/v1/generate` with `"model"`, a user corrects an answer, `retrain` turns the
/// correction into instruction data (replacing the original example that asks the same
/// thing, leaving validation alone), trains, registers the candidate and starts an A/B test
/// that the server then routes sessions through.
#[test]
fn a_language_model_learns_from_corrected_answers() {
    let env = Env::new();
    tuneforge_core::testing::write_tiny_decoder(env.dir.path(), "llama").expect("tiny decoder");
    std::fs::write(env.path("sft.jsonl"), cat_lines(0..10)).expect("data");
    std::fs::write(env.path("val.jsonl"), "{\"prompt\": \"a hat\", \"response\": \"on the cat\"}\n").expect("data");
    let exp = "[experiment]\nname = \"sft\"\n[model]\nsource = \"model.gguf\"\ntask = \"causal-lm\"\nmax_len = 32\n\
               [data]\ntrain = \"sft.jsonl\"\nvalidation = \"val.jsonl\"\n\
               [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
               [train]\nepochs = 1\nbatch_size = 4\nlr = 1e-2\n";
    std::fs::write(env.path("sft.toml"), exp).expect("experiment");
    let o = env.run(&["train", "--config", "sft.toml", "--quiet", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trained = json(&o);
    let id = trained["run_id"].as_str().expect("id").to_owned();
    let o = env.run(&["models", "register", &id, "--name", "chat"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(env.run(&["models", "promote", "chat", "1"]).status.success());
    let o = env.run(&["models", "ls", "--json"]);
    let metrics = &json(&o)[0]["metrics"];
    assert!((metrics["loss"].as_f64().expect("loss") - trained["validation_loss"].as_f64().expect("val")).abs() < 1e-9);
    assert!(metrics["perplexity"].is_number(), "{metrics}");

    let ask = |server: &Served, prompt: &str, session: &str| {
        server.post(
            "/api/v1/generate",
            &serde_json::json!({"model": "chat", "prompt": prompt, "max_tokens": 3, "session": session}),
        )
    };
    let server = Served::start(&env);
    let corrections = [("the cat 3", "a correction"), ("a brand new question", "a new answer"), ("a hat", "x")];
    for (prompt, better) in corrections {
        let answer = ask(&server, prompt, "u0");
        assert_eq!(answer["version"], 1, "{answer}");
        let pid = answer["id"].as_str().expect("id");
        server.post(
            "/api/v1/feedback",
            &serde_json::json!({"prediction_id": pid, "rating": "wrong", "corrected_label": better}),
        );
    }
    drop(server);

    let o = env.run(&["retrain", "--model", "chat", "--all-feedback", "--share", "0.5", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("dataset: 11 examples (10 original, 1 added and 1 answered anew from 3 feedback"), "{out}");
    assert!(out.contains("1 in the validation set left out"), "{out}");
    assert!(
        out.contains("registered chat@2 (candidate)") && out.contains("serves 50% of sessions against @1"),
        "{out}"
    );
    let data = env.latest_retrain_data();
    let examples = tuneforge_core::sft::read_sft(&data.join("train.jsonl")).expect("instruction data");
    let answer_to =
        |q: &str| examples.iter().find(|e| e.context.last().is_some_and(|t| t.1 == q)).map(|e| e.response.clone());
    assert_eq!(answer_to("the cat 3").as_deref(), Some("a correction"));
    assert_eq!(answer_to("a brand new question").as_deref(), Some("a new answer"));
    assert_eq!(answer_to("a hat"), None, "a validation question stays out of training");
    assert_eq!(answer_to("the cat 4").as_deref(), Some("in the hat"));

    // The server routes sessions between production and the candidate.
    let server = Served::start(&env);
    let versions: std::collections::HashSet<i64> =
        (0..12).map(|i| ask(&server, "hi", &format!("s{i}"))["version"].as_i64().expect("v")).collect();
    assert_eq!(versions, [1, 2].into_iter().collect(), "both arms answer");
}

/// `tuneforge generate` on a tiny GGUF decoder: streams text, or prints JSON with counts;
/// bad sampling settings and a missing model are errors, not panics.
#[test]
fn generate_runs_a_gguf_decoder() {
    let env = Env::new();
    tuneforge_core::testing::write_tiny_decoder(env.dir.path(), "llama").expect("tiny decoder");
    let o = env.run(&["generate", "--model", "model.gguf", "--max-tokens", "5", "--json", "--raw", "the cat"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert!(v["ids"].as_array().expect("ids").len() <= 5);
    assert_eq!(v["prompt_tokens"], 4, "t, he, Ġca, t: merges apply");
    let o = env.run(&["generate", "--model", "model.gguf", "--max-tokens", "3", "hello"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
    let o = env.run(&["generate", "--model", "model.gguf", "--max-tokens", "3", "--int8", "--json", "hello"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("int8 projections") && json(&o)["ids"].as_array().is_some(), "{}", stderr(&o));
    let o = env.run(&["generate", "--model", "model.gguf", "--top-p", "0", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("top_p"), "{}", stderr(&o));
    assert_no_panic(&o);
    let o = env.run(&["generate", "--model", "missing.gguf", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("missing.gguf"), "{}", stderr(&o));
    assert_no_panic(&o);
    // A file of prompts: one JSON line per answer in the file's order, each what the prompt
    // gets alone, batched two at a time; a prompt too long for the model fails alone.
    let long = "the cat ".repeat(300);
    let lines = [
        serde_json::json!({"prompt": "the cat"}),
        serde_json::json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hat"}]}),
        serde_json::json!({"prompt": long}),
        serde_json::json!({"prompt": "in the hat", "system": "s"}),
        serde_json::json!({"prompt": "a"}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(env.path("prompts.jsonl"), text).expect("prompts");
    let o = env.run(&[
        "generate",
        "--model",
        "model.gguf",
        "--max-tokens",
        "5",
        "--input",
        "prompts.jsonl",
        "--batch",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let answers: Vec<serde_json::Value> =
        stdout(&o).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(answers.iter().map(|a| a["line"].as_u64().expect("line")).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert!(answers[2]["error"].as_str().expect("an error").contains("positions"), "{}", answers[2]);
    assert!(stderr(&o).contains("5 prompts (1 failed)"), "{}", stderr(&o));
    let alone = json(&env.run(&["generate", "--model", "model.gguf", "--max-tokens", "5", "--json", "the cat"]));
    assert_eq!(answers[0]["text"], alone["text"]);
    assert_eq!(answers[0]["completion_tokens"].as_u64(), alone["ids"].as_array().map(|a| a.len() as u64));
    std::fs::write(env.path("bad.jsonl"), "{\"prompt\": \"x\"}\n{\"text\": 1}\n").expect("bad");
    let o = env.run(&["generate", "--model", "model.gguf", "--input", "bad.jsonl"]);
    assert!(!o.status.success() && stderr(&o).contains("bad.jsonl: line 2"), "{}", stderr(&o));
    assert_no_panic(&o);
}

/// Instruction tuning through the command line lands in the experiment store like a
/// classification run: the run row, its training and validation curves (loss and
/// perplexity, step 0 being the base model), its end and its files; it stops with
/// `--stop-after-steps` and finishes with `--resume`.
#[test]
fn instruction_tuning_runs_are_recorded_in_the_store() {
    let env = Env::new();
    tuneforge_core::testing::write_tiny_decoder(env.dir.path(), "llama").expect("tiny decoder");
    std::fs::write(env.path("sft.jsonl"), cat_lines(0..20)).expect("data");
    let exp = "[experiment]\nname = \"sft\"\n[model]\nsource = \"model.gguf\"\ntask = \"causal-lm\"\nmax_len = 32\n\
               [data]\ntrain = \"sft.jsonl\"\nvalidation_split = 0.2\n\
               [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
               [train]\nepochs = 2\nbatch_size = 4\nlr = 1e-2\n";
    std::fs::write(env.path("sft.toml"), exp).expect("experiment");
    let o = env.run(&["train", "--config", "sft.toml", "--quiet", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = json(&o);
    let id = summary["run_id"].as_str().expect("id");
    assert_eq!(summary["dataset_hash"].as_str().expect("hash").len(), 64);
    let o = env.run(&["runs", "show", id, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = json(&o);
    assert_eq!(shown["run"]["status"], "succeeded");
    assert_eq!(shown["run"]["method"], "lora");
    for key in ["train/loss", "train/lr", "val/loss", "val/perplexity"] {
        assert!(shown["last_metrics"][key].is_number(), "{key}: {}", shown["last_metrics"]);
    }
    let kinds: Vec<&str> =
        shown["artifacts"].as_array().expect("artifacts").iter().map(|a| a["kind"].as_str().expect("kind")).collect();
    for kind in ["config", "metrics", "summary", "adapter", "model-meta"] {
        assert!(kinds.contains(&kind), "{kinds:?}");
    }
    // --no-db leaves the store as it was.
    let o = env.run(&["train", "--config", "sft.toml", "--quiet", "--no-db"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.run(&["runs", "ls", "--json"]);
    assert_eq!(json(&o)["total"], 1);
    // Stopped, the run is interrupted in the store; resumed, it finishes there.
    let o = env.run(&["train", "--config", "sft.toml", "--quiet", "--json", "--stop-after-steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stopped = json(&o);
    assert_eq!((stopped["status"].as_str(), stopped["steps"].as_u64()), (Some("stopped"), Some(2)));
    let (id, dir) = (stopped["run_id"].as_str().expect("id"), stopped["run_dir"].as_str().expect("dir"));
    let o = env.run(&["runs", "show", id, "--json"]);
    assert_eq!(json(&o)["run"]["status"], "interrupted");
    let o = env.run(&["train", "--resume", dir, "--quiet", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let done = json(&o);
    assert_eq!((done["status"].as_str(), done["run_id"].as_str()), (Some("completed"), Some(id)));
    assert_eq!(done["steps"], done["total_steps"]);
    let o = env.run(&["runs", "show", id, "--json"]);
    assert_eq!(json(&o)["run"]["status"], "succeeded");
    assert_eq!(json(&env.run(&["runs", "ls", "--json"]))["total"], 2, "the resumed run is the same record");
}

/// `eval` scores a language model on instruction data: a tuned adapter gets the validation
/// loss its run recorded, the base model (its GGUF file) the base loss the run started from;
/// gates are refused, and bad data is named.
#[test]
fn eval_scores_language_models_on_instruction_data() {
    let env = Env::new();
    tuneforge_core::testing::write_tiny_decoder(env.dir.path(), "llama").expect("tiny decoder");
    std::fs::write(env.path("sft.jsonl"), cat_lines(0..16)).expect("data");
    std::fs::write(env.path("val.jsonl"), cat_lines(16..21)).expect("validation");
    let exp = "[experiment]\nname = \"sft\"\n[model]\nsource = \"model.gguf\"\ntask = \"causal-lm\"\nmax_len = 32\n\
               [data]\ntrain = \"sft.jsonl\"\nvalidation = \"val.jsonl\"\n\
               [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
               [train]\nepochs = 2\nbatch_size = 4\nlr = 1e-2\n";
    std::fs::write(env.path("sft.toml"), exp).expect("experiment");
    let o = env.run(&["train", "--config", "sft.toml", "--quiet", "--json", "--no-db"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = json(&o);
    let best = summary["best_model_dir"].as_str().expect("best");
    let score = |model: &str| -> serde_json::Value {
        let o = env.run(&["eval", "--model", model, "--data", "val.jsonl", "--max-len", "32", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        json(&o)
    };
    let (tuned, base) = (score(best), score("model.gguf"));
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        (a.as_f64().expect("a number") - b.as_f64().expect("a number")).abs() < 1e-4
    };
    assert!(close(&tuned["loss"], &summary["validation_loss"]), "{tuned} vs {summary}");
    assert!(close(&base["loss"], &summary["base_validation_loss"]), "{base} vs {summary}");
    assert!(tuned["loss"].as_f64() < base["loss"].as_f64());
    assert_eq!((tuned["examples"].as_u64(), tuned["skipped_too_long"].as_u64()), (Some(5), Some(0)));
    let o = env.run(&["eval", "--model", best, "--data", "val.jsonl"]);
    assert!(o.status.success() && stdout(&o).contains("perplexity:"), "{}", stdout(&o));
    // --generate answers every conversation and scores exact matches; the answers file holds
    // what was compared.
    let o = env.run(&[
        "eval",
        "--model",
        best,
        "--data",
        "val.jsonl",
        "--generate",
        "--max-tokens",
        "6",
        "--answers",
        "answers.jsonl",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let scored = json(&o);
    let answers: Vec<serde_json::Value> = std::fs::read_to_string(env.path("answers.jsonl"))
        .expect("answers")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(answers.len(), 5);
    assert!(answers.iter().all(|a| a["reference"] == "in the hat" && a["messages"][0]["role"] == "user"));
    let matched = answers.iter().filter(|a| a["match"] == true).count();
    assert!(
        answers.iter().all(|a| (a["match"] == true) == (a["answer"].as_str().map(str::trim) == Some("in the hat")))
    );
    assert!(close(&scored["exact_match"], &serde_json::json!(matched as f64 / 5.0)), "{scored}");
    let o = env.run(&["eval", "--model", "model.gguf", "--data", "val.jsonl", "--generate", "--max-tokens", "6"]);
    assert!(o.status.success() && stdout(&o).contains("exact match:     0.0000 (0 of 5"), "{}", stdout(&o));
    // A sweep of instruction tuning ranks by the validation loss, lowest first.
    let o = env.run(&["sweep", "--config", "sft.toml", "--grid", "train.lr=1e-4,1e-2", "--no-db", "--quiet", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let swept = json(&o);
    let swept = swept.as_array().expect("runs");
    assert_eq!(swept.len(), 2);
    assert!(swept.iter().all(|r| r["metric"] == "validation_loss" && r["higher_is_better"] == false));
    assert!(swept[0]["value"].as_f64() <= swept[1]["value"].as_f64(), "{swept:?}");
    // The adapter generates (its base named in its metadata).
    let o = env.run(&["generate", "--model", best, "--max-tokens", "3", "--json", "the cat 3"]);
    assert!(o.status.success() && json(&o)["ids"].as_array().is_some(), "{}", stderr(&o));
    // So does its run directory (its best adapter).
    let run_dir = summary["run_dir"].as_str().expect("run dir");
    let o = env.run(&["generate", "--model", run_dir, "--max-tokens", "3", "--json", "the cat 3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.run(&["eval", "--model", run_dir, "--data", "val.jsonl", "--max-len", "32", "--json"]);
    assert!(o.status.success() && close(&json(&o)["loss"], &summary["validation_loss"]), "{}", stderr(&o));
    let o = env.run(&["eval", "--model", best, "--data", "val.jsonl", "--min-accuracy", "0.5"]);
    assert!(!o.status.success() && stderr(&o).contains("for classifiers"), "{}", stderr(&o));
    std::fs::write(env.path("bad.jsonl"), "{\"prompt\": \"x\", \"response\": \"y\"}\nnot json\n").expect("bad");
    let o = env.run(&["eval", "--model", best, "--data", "bad.jsonl"]);
    assert!(!o.status.success() && stderr(&o).contains("bad.jsonl") && stderr(&o).contains('2'), "{}", stderr(&o));
    assert_no_panic(&o);
}

/// `sweep` runs every combination of the grid, records each run, ranks them by the metric
/// that picks the best model; a combination the file would refuse stops it before anything
/// trains; a run that fails at run time is reported and the others go on.
#[test]
fn sweep_trains_every_combination_and_ranks_the_runs() {
    let env = Env::new();
    env.experiment("");
    let o = env.run(&[
        "sweep",
        "--config",
        "exp.toml",
        "--grid",
        "train.lr=1e-4,1e-2",
        "--grid",
        "train.epochs=1,8",
        "--quiet",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let runs = json(&o);
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 4);
    let values: Vec<f64> = runs.iter().map(|r| r["value"].as_f64().expect("a value")).collect();
    assert!(values.windows(2).all(|w| w[0] >= w[1]), "best first: {values:?}");
    assert_eq!(runs[0]["metric"], "accuracy");
    assert_eq!(runs[0]["settings"], serde_json::json!(["train.lr=1e-2", "train.epochs=8"]), "{runs:?}");
    let o = env.run(&["runs", "ls", "--json"]);
    assert_eq!(json(&o)["total"], 4, "every run is in the store");
    // The table, and how to see the runs side by side (the best five).
    let o = env.run(&[
        "sweep",
        "--config",
        "exp.toml",
        "--grid",
        "train.lr=1e-4,1e-2",
        "--set",
        "train.epochs=1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let compare = stdout(&o).lines().find_map(|l| l.strip_prefix("side by side: ")).map(str::to_owned);
    let compare = compare.unwrap_or_else(|| panic!("no compare hint: {}", stdout(&o)));
    let args: Vec<&str> = compare.split_whitespace().skip(1).collect();
    assert_eq!(args.len(), 4, "{compare}");
    assert!(env.run(&args).status.success());
    let shown = env.run(&["runs", "show", runs[3]["run_id"].as_str().expect("id"), "--json"]);
    assert!(stdout(&shown).contains("lr = 0.0001") || stdout(&shown).contains("1e-4"), "{}", stdout(&shown));
    // A value the file refuses is named before anything trains.
    let o = env.run(&["sweep", "--config", "exp.toml", "--grid", "train.lr=1e-3,-1", "--no-db", "--quiet"]);
    assert!(!o.status.success() && stderr(&o).contains("train.lr"), "{}", stderr(&o));
    assert_eq!(json(&env.run(&["runs", "ls", "--json"]))["total"], 6);
    // A run that fails as it trains is reported; the others still run.
    let o = env.run(&[
        "sweep",
        "--config",
        "exp.toml",
        "--grid",
        "model.source=\"model\",\"nowhere\"",
        "--set",
        "train.epochs=1",
        "--no-db",
        "--quiet",
    ]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).contains("nowhere") && stderr(&o).contains("1 of 2 sweep runs failed"), "{}", stdout(&o));
    assert!(stdout(&o).contains("best by accuracy: model.source=\"model\""), "{}", stdout(&o));
    let o = env.run(&["sweep", "--config", "exp.toml", "--grid", "train.lr"]);
    assert!(!o.status.success() && stderr(&o).contains("KEY=V1,V2"), "{}", stderr(&o));
    assert_no_panic(&o);
}

/// Device choices that this machine or this build cannot honour are refused with a message
/// that says why, before anything is trained or written; `cpu` works as given.
#[test]
fn device_errors_say_what_is_missing() {
    let env = Env::new();
    let exp = env.experiment("");
    let exp = exp.to_str().expect("utf8");
    let o = env.run(&["train", "--config", exp, "--quiet", "--no-db", "--device", "tpu"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("`tpu` is not a device"), "{}", stderr(&o));
    let o = env.run(&["train", "--config", exp, "--quiet", "--no-db", "--set", "train.precision=\"bf16\""]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("train.precision") && stderr(&o).contains("CUDA device"), "{}", stderr(&o));
    if cfg!(not(feature = "cuda")) {
        let o = env.run(&["train", "--config", exp, "--quiet", "--no-db", "--device", "cuda:1"]);
        assert_ne!(o.status.code(), Some(0));
        assert!(stderr(&o).contains("cuda:1") && stderr(&o).contains("--features cuda"), "{}", stderr(&o));
        let o = env.run(&["train", "--config", exp, "--quiet", "--no-db", "--gpus", "2"]);
        assert_ne!(o.status.code(), Some(0));
        assert!(stderr(&o).contains("--features nccl"), "{}", stderr(&o));
        assert!(!env.path("runs").exists(), "nothing was written");
    }
    assert_no_panic(&o);
    let o = env.run(&[
        "train",
        "--config",
        exp,
        "--quiet",
        "--no-db",
        "--json",
        "--device",
        "cpu",
        "--set",
        "train.epochs=1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Every command that computes takes --device: the CPU works, a GPU this build lacks is
    // an error that says so.
    let best = json(&o)["best_model_dir"].as_str().expect("best").to_owned();
    let o = env.run(&["serve", "--batch-max-texts", "0"]);
    assert_eq!(o.status.code(), Some(2), "a batch holds at least one text: {}", stderr(&o));
    let o = env.run(&["predict", "--model", &best, "--device", "cpu", "fever cough"]);
    assert!(o.status.success(), "{}", stderr(&o));
    tuneforge_core::testing::write_tiny_decoder(env.dir.path(), "llama").expect("tiny decoder");
    if cfg!(not(feature = "cuda")) {
        for args in [
            vec!["predict", "--model", &best, "--device", "cuda", "fever"],
            vec!["eval", "--model", &best, "--data", "train.csv", "--device", "cuda"],
            vec!["generate", "--model", "model.gguf", "--device", "cuda:0", "hello"],
            vec!["serve", "--addr", "127.0.0.1:0", "--token", "0123456789abcdef0123", "--device", "cuda"],
        ] {
            let o = env.run(&args);
            assert!(!o.status.success() && stderr(&o).contains("--features cuda"), "{args:?}: {}", stderr(&o));
            assert_no_panic(&o);
        }
    }
}
