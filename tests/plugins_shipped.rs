//! The plugins that ship with tuneforge, built from `plugins/` and run through the host:
//! directly, and inside training runs on a tiny task.

use std::path::Path;

use tuneforge_core::{ExperimentConfig, RunOptions, TrainOutcome, train_experiment_with};
use tuneforge_plugin_runtime::{PluginRuntime, PluginSetup, Predictor, RuntimeHooks};
use tuneforge_tests::installed;

fn load(name: &str, home: &Path, setup: PluginSetup) -> tuneforge_plugin_runtime::PluginInstance {
    let p = installed(name, home);
    PluginRuntime::new().expect("runtime").load(p.manifest_path.parent().expect("dir"), setup).expect("loads")
}

fn metrics_lines(out: &TrainOutcome) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.run.metrics())
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// Trains the tiny task with `plugins` (TOML) installed from `names`.
fn run(root: &Path, names: &[&str], plugins: &str, overrides: &[&str]) -> TrainOutcome {
    let home = root.join("plugins");
    for n in names {
        installed(n, &home);
    }
    let text = tuneforge_core::testing::write_tiny_task(root, plugins).expect("task");
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = ExperimentConfig::from_toml(&text, "plugins.toml", &overrides).expect("config");
    train_experiment_with(cfg, &RunOptions::default(), &RuntimeHooks::new(home).expect("runtime"), &mut |_| {})
        .expect("trains")
}

#[test]
fn text_clean_cleans_through_the_host_and_in_a_run() {
    let home = tempfile::tempdir().expect("tempdir");
    let setup = PluginSetup { config: vec![("lowercase".into(), "true".into())], ..Default::default() };
    let mut p = load("text-clean", home.path(), setup);
    assert_eq!(p.clean("  Chest\u{00A0}PAIN \t\u{FB01}ne ").expect("clean"), "chest pain fine");

    let root = tempfile::tempdir().expect("tempdir");
    let out = run(
        root.path(),
        &["text-clean"],
        "[[plugins]]\nname = \"text-clean\"\n[plugins.config]\nremove_punctuation = true\n",
        &["train.epochs=1"],
    );
    assert_eq!(out.summary.plugins[0].name, "text-clean");
    assert_eq!(out.summary.plugins[0].kind, "cleaner");
}

#[test]
fn classification_metrics_report_under_the_plugins_name() {
    let home = tempfile::tempdir().expect("tempdir");
    let setup = PluginSetup { labels: vec!["a".into(), "b".into()], ..Default::default() };
    let mut p = load("classification-metrics", home.path(), setup);
    let scores = p.evaluate_metric(2, 2, &[0.9, 0.1, 0.3, 0.7], &[0, 0]).expect("scores");
    let get = |k: &str| scores.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    assert_eq!(get("accuracy"), Some(0.5));
    assert_eq!(get("recall:a"), Some(0.5));

    let root = tempfile::tempdir().expect("tempdir");
    let out = run(
        root.path(),
        &["classification-metrics"],
        "[[plugins]]\nname = \"classification-metrics\"\n",
        &["train.epochs=2"],
    );
    let v = out.summary.validation.as_ref().expect("validation");
    let ece = v.plugin_metrics.get("classification-metrics:ece").copied().expect("ece in the summary");
    assert!((0.0..=1.0).contains(&ece));
    assert_eq!(v.plugin_metrics.get("classification-metrics:accuracy").copied(), Some(v.accuracy));
    let evals: Vec<_> = metrics_lines(&out).into_iter().filter(|l| l["kind"] == "eval").collect();
    assert!(!evals.is_empty() && evals.iter().all(|l| l["classification-metrics:top3_accuracy"].is_number()));
}

#[test]
fn synonym_augment_adds_examples_from_a_granted_thesaurus() {
    let root = tempfile::tempdir().expect("tempdir");
    let dat = root.path().join("th.dat");
    std::fs::write(
        &dat,
        "UTF-8\nfever|1\n(noun)|pyrexia|febricity\ncough|1\n(noun)|coughing\nrash|1\n(noun)|eruption\n",
    )
    .expect("write");
    let plugins = format!(
        "[[plugins]]\nname = \"synonym-augment\"\n[plugins.config]\nprobability = 1.0\n[plugins.assets]\nthesaurus = \"{}\"\n",
        dat.display()
    );
    let out = run(root.path(), &["synonym-augment"], &plugins, &["train.epochs=1"]);
    // 8 flu texts mention fever or cough, 8 acne texts mention rash (the tiny task validates on its training file).
    assert!(out.summary.augmented_examples >= 12, "{}", out.summary.augmented_examples);
    assert_eq!(out.summary.train_examples, 24 + out.summary.augmented_examples);
}

const KB: &str = "Disease,Symptom_1,Symptom_2,Symptom_3\nflu,fever,cough,sneeze\nacne,rash,itch,red_skin\n\
    angina,chest_pain,tired,\n";

#[test]
fn the_medical_loss_gradient_through_the_host_matches_finite_differences() {
    let home = tempfile::tempdir().expect("tempdir");
    let kb = home.path().join("kb.csv");
    std::fs::write(&kb, KB).expect("write");
    let setup = PluginSetup {
        labels: vec!["flu".into(), "acne".into(), "angina".into()],
        assets: [("knowledge-base".to_string(), kb)].into_iter().collect(),
        ..Default::default()
    };
    let mut p = load("medical-association-loss", home.path(), setup);
    let texts: Vec<String> = vec!["fever and a cough".into(), "red rash that itch".into()];
    let labels = [0u32, 1];
    let logits = vec![0.3f32, 1.2, -0.4, 0.8, -0.1, 0.6];
    let a = p.compute_loss(2, 3, &logits, &labels, &texts).expect("loss");
    assert!(a.value > 0.0, "probability sits on diseases the symptoms contradict");
    let h = 1e-2f32;
    for i in 0..logits.len() {
        let (mut up, mut down) = (logits.clone(), logits.clone());
        up[i] += h;
        down[i] -= h;
        let f = |l: &[f32], p: &mut tuneforge_plugin_runtime::PluginInstance| {
            p.compute_loss(2, 3, l, &labels, &texts).expect("loss").value
        };
        let numeric = (f(&up, &mut p) - f(&down, &mut p)) / (2.0 * h);
        assert!((numeric - a.grad[i]).abs() < 2e-3, "logit {i}: numeric {numeric}, plugin {}", a.grad[i]);
    }
}

#[test]
fn a_loss_plugin_changes_training_and_its_value_is_logged() {
    let root = tempfile::tempdir().expect("tempdir");
    let kb = root.path().join("kb.csv");
    std::fs::write(&kb, KB).expect("write");
    let plugins = format!(
        "[[plugins]]\nname = \"medical-association-loss\"\nweight = 2.0\n[plugins.assets]\nknowledge-base = \"{}\"\n",
        kb.display()
    );
    let with = run(root.path(), &["medical-association-loss"], &plugins, &["train.epochs=2"]);
    let lines = metrics_lines(&with);
    let train: Vec<_> = lines.iter().filter(|l| l["kind"] == "train").collect();
    assert!(train.iter().all(|l| l["plugin:medical-association-loss"].as_f64().is_some_and(|v| v >= 0.0)));
    assert!(train.iter().any(|l| l["plugin:medical-association-loss"].as_f64().is_some_and(|v| v > 0.0)));
    let lineage = &with.summary.plugins[0];
    assert_eq!(lineage.name, "medical-association-loss");

    let other = tempfile::tempdir().expect("tempdir");
    let without = run(other.path(), &[], "", &["train.epochs=2"]);
    let loss_of = |o: &TrainOutcome| {
        metrics_lines(o)
            .iter()
            .filter(|l| l["kind"] == "train")
            .map(|l| l["loss"].as_f64().expect("loss"))
            .collect::<Vec<_>>()
    };
    assert_ne!(loss_of(&with)[1..], loss_of(&without)[1..], "the plugin's gradient moved the weights");
}

#[test]
fn finance_features_fuse_with_the_embedding_and_travel_with_the_model() {
    let root = tempfile::tempdir().expect("tempdir");
    let plugins = "[[plugins]]\nname = \"text-clean\"\n[plugins.config]\nlowercase = true\n\
                   [[plugins]]\nname = \"finance-features\"\n";
    let out =
        run(root.path(), &["text-clean", "finance-features"], plugins, &["train.epochs=3", "model.fusion=concat"]);
    let best = out.summary.best_model_dir.clone().expect("best model");
    let listed = std::fs::read_to_string(best.join("plugins.json")).expect("plugins.json");
    assert!(listed.contains("\"text-clean\"") && listed.contains("\"finance-features\""), "{listed}");
    assert!(best.join("plugins/finance-features/plugin.wasm").is_file());

    let runtime = PluginRuntime::new().expect("runtime");
    let predictor = Predictor::load(&runtime, &best).expect("loads with its plugins");
    assert_eq!(predictor.plugin_names(), ["text-clean", "finance-features"]);
    let fusion = predictor.model().meta().fusion.clone().expect("fusion");
    assert_eq!((fusion.plugin.as_str(), fusion.features.len()), ("finance-features", 12));
    let p = predictor.predict(&["FEVER   cough HOT".to_string()], 8).expect("predicts");
    assert_eq!(p[0].probabilities.len(), 3);
    // The same cleaning and features as in training: the evaluation repeats the run's.
    let data = tuneforge_data::read_examples(&root.path().join("train.csv"), &Default::default()).expect("data");
    let report = predictor.evaluate(&data.examples, 8).expect("evaluates");
    assert_eq!(Some(report.accuracy), out.summary.validation.as_ref().map(|v| v.accuracy));

    // A model whose plugin was swapped is refused.
    std::fs::write(best.join("plugins/finance-features/plugin.wasm"), b"\0asm\x0d\0\x01\0").expect("tamper");
    let err = Predictor::load(&runtime, &best).expect_err("tampered").to_string();
    assert!(err.contains("sha256"), "{err}");
}

#[test]
fn fusion_and_features_plugins_must_come_together() {
    let root = tempfile::tempdir().expect("tempdir");
    let home = root.path().join("plugins");
    installed("finance-features", &home);
    let text = tuneforge_core::testing::write_tiny_task(root.path(), "[[plugins]]\nname = \"finance-features\"\n")
        .expect("task");
    let factory = RuntimeHooks::new(home).expect("runtime");
    let cfg = ExperimentConfig::from_toml(&text, "x.toml", &[]).expect("config");
    let err = train_experiment_with(cfg, &RunOptions::default(), &factory, &mut |_| {}).expect_err("no fusion");
    assert!(err.to_string().contains("fusion = \"concat\""), "{err}");
    let text = tuneforge_core::testing::write_tiny_task(root.path(), "").expect("task");
    let cfg = ExperimentConfig::from_toml(&text, "x.toml", &["model.fusion=concat".into()]).expect("config");
    let err = train_experiment_with(cfg, &RunOptions::default(), &factory, &mut |_| {}).expect_err("no plugin");
    assert!(err.to_string().contains("no features plugin"), "{err}");
}
