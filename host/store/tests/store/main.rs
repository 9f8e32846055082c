//! The store on a fresh database per test, each test on SQLite and on PostgreSQL: runs, metric
//! series, the registry, predictions, feedback, events, lineage, and reopening a database.

use tuneforge_store::{
    MetricPoint, NewFeedback, NewPrediction, NewRun, RunFilter, RunSort, RunStatus, Stage, Store, StoreError,
};

mod backends;

fn run(id: &str, name: &str) -> NewRun {
    NewRun { model_source: "pypi:x==1".into(), host: "h".into(), ..NewRun::new(id, name, "[model]\nsource = \"x\"\n") }
}

async fn runs_are_listed_filtered_sorted_and_paged(url: String) {
    let s = Store::open(&url).await.expect("open");
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        s.start_run(&run(&format!("r{i}"), name)).await.expect("start");
        let acc = 0.5 + i as f64 / 10.0;
        let summary = serde_json::json!({"accuracy": acc});
        s.finish_run(&format!("r{i}"), RunStatus::Succeeded, Some(&summary), Some("hash"), Some(acc), Some(acc), None)
            .await
            .expect("finish");
    }
    s.start_run(&run("r3", "delta")).await.expect("start");
    let (page, total) =
        s.list_runs(&RunFilter { sort: RunSort::Accuracy, limit: 2, ..Default::default() }).await.expect("list");
    assert_eq!(total, 4);
    assert_eq!(page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r2", "r1"]);
    let (running, n) = s
        .list_runs(&RunFilter { status: Some(RunStatus::Running), limit: 10, ..Default::default() })
        .await
        .expect("list");
    assert_eq!((n, running[0].name.as_str()), (1, "delta"));
    let (named, _) =
        s.list_runs(&RunFilter { name: Some("amm".into()), limit: 10, ..Default::default() }).await.expect("list");
    assert_eq!(named.len(), 1);
    let artifact = tuneforge_store::Artifact {
        run_id: "r1".into(),
        kind: "model".into(),
        path: "/runs/r1/best/model.safetensors".into(),
        sha256: "ab".repeat(32),
        bytes: 123,
    };
    s.record_artifact(&artifact).await.expect("artifact");
    s.record_artifact(&tuneforge_store::Artifact { bytes: 456, ..artifact.clone() }).await.expect("again");
    let listed = s.artifacts("r1").await.expect("artifacts");
    assert_eq!((listed.len(), listed[0].bytes), (1, 456));
    let r = s.get_run("r1").await.expect("get");
    assert_eq!(r.summary.expect("summary")["accuracy"], 0.6);
    assert!(r.config.expect("config").contains("[model]"));
    assert!(matches!(s.get_run("nope").await, Err(StoreError::NotFound { .. })));
}

async fn metric_series_come_back_whole_or_downsampled(url: String) {
    let s = Store::open(&url).await.expect("open");
    s.start_run(&run("r", "m")).await.expect("start");
    let points: Vec<MetricPoint> = (1..=1000)
        .map(|step| MetricPoint { run_id: "r".into(), key: "loss".into(), step, value: step as f64, time_ms: 0 })
        .collect();
    s.append_metrics(&points).await.expect("append");
    // Writing a step again keeps the last value.
    s.append_metrics(&[MetricPoint { run_id: "r".into(), key: "loss".into(), step: 1, value: 7.0, time_ms: 1 }])
        .await
        .expect("append");
    let all = s.metric_series("r", "loss", 5000).await.expect("series");
    assert_eq!(all.len(), 1000);
    assert_eq!(all[0].value, 7.0);
    let few = s.metric_series("r", "loss", 100).await.expect("series");
    assert!(few.len() <= 100 && few.len() >= 90, "{}", few.len());
    assert_eq!(few[1].step, 11);
    assert!((few[1].value - 15.5).abs() < 1e-9, "mean of steps 11..=20: {}", few[1].value);
    assert_eq!(s.metric_keys("r").await.expect("keys"), ["loss"]);
    assert!(s.metric_series("r", "nothing", 10).await.expect("series").is_empty());
}

async fn promote_and_rollback_keep_one_production_version_and_audit(url: String) {
    let s = Store::open(&url).await.expect("open");
    s.start_run(&run("r", "m")).await.expect("start");
    let v1 = s.register_model("clf", "r", "/runs/r/best", None, "ann").await.expect("register");
    let v2 = s.register_model("clf", "r", "/runs/r/best", None, "ann").await.expect("register");
    assert_eq!((v1.version, v2.version, v2.stage), (1, 2, Stage::Candidate));
    s.promote("clf", 1, "ann").await.expect("promote");
    s.promote("clf", 2, "bob").await.expect("promote");
    let stages: Vec<(i64, Stage)> =
        s.list_models(Some("clf")).await.expect("list").iter().map(|m| (m.version, m.stage)).collect();
    assert_eq!(stages, [(2, Stage::Production), (1, Stage::Archived)]);
    let back = s.rollback("clf", "bob").await.expect("rollback");
    assert_eq!((back.version, back.stage), (1, Stage::Production));
    assert!(matches!(s.rollback("clf", "bob").await, Err(StoreError::Invalid(_))), "nothing earlier than v1");
    let kinds: Vec<String> = s.events(None, 10).await.expect("events").into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "promote").count(), 2);
    assert!(kinds.contains(&"rollback".to_owned()) && kinds.contains(&"register".to_owned()));
    assert!(matches!(s.register_model("clf", "missing", "/x", None, "ann").await, Err(StoreError::NotFound { .. })));
    assert!(matches!(s.promote("clf", 9, "ann").await, Err(StoreError::NotFound { .. })));
}

async fn feedback_needs_an_existing_prediction_and_a_valid_rating(url: String) {
    let s = Store::open(&url).await.expect("open");
    let id = s
        .record_prediction(&NewPrediction {
            model_name: "clf".into(),
            model_version: 1,
            input: "fever and cough".into(),
            output: "flu".into(),
            probabilities: serde_json::json!({"flu": 0.9}),
            latency_ms: 3.0,
            arm: None,
        })
        .await
        .expect("prediction");
    let fb = |pid: &str, rating: &str| NewFeedback {
        prediction_id: pid.into(),
        rating: rating.into(),
        corrected_label: Some("cold".into()),
        comment: None,
        author: Some("dr".into()),
    };
    s.record_feedback(&fb(&id, "wrong")).await.expect("feedback");
    assert!(matches!(s.record_feedback(&fb("nope", "wrong")).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(s.record_feedback(&fb(&id, "meh")).await, Err(StoreError::Invalid(_))));
    let rows = s.list_feedback(Some("clf"), 10).await.expect("list");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].input.as_str(), rows[0].corrected_label.as_deref()), ("fever and cough", Some("cold")));
}

async fn killed_runs_are_marked_interrupted_and_data_survives_reopening(url: String) {
    let path = url.as_str();
    {
        let s = Store::open(path).await.expect("open");
        s.start_run(&NewRun { pid: 4242, ..run("dead", "x") }).await.expect("start");
        s.start_run(&NewRun { pid: 1, ..run("alive", "y") }).await.expect("start");
        s.close().await;
    }
    let s = Store::open(path).await.expect("reopen");
    let marked = s.mark_interrupted("h", |pid| pid == 1).await.expect("mark");
    assert_eq!(marked, ["dead"]);
    assert_eq!(s.get_run("dead").await.expect("get").status, RunStatus::Interrupted);
    assert_eq!(s.get_run("alive").await.expect("get").status, RunStatus::Running);
    assert_eq!(s.events(Some("dead"), 5).await.expect("events")[0].kind, "interrupted");
}

async fn run_plugins_record_lineage_in_order_and_find_runs_by_plugin(url: String) {
    let s = Store::open(&url).await.expect("open");
    s.start_run(&run("a", "with")).await.expect("start");
    s.start_run(&run("b", "other")).await.expect("start");
    let p = |name: &str, sha: &str| tuneforge_store::RunPlugin {
        name: name.into(),
        version: "0.1.0".into(),
        kind: "loss".into(),
        sha256: sha.repeat(64),
        api_version: "0.1.0".into(),
    };
    s.record_run_plugins("a", &[p("text-clean", "1"), p("medical", "2")]).await.expect("record");
    s.record_run_plugins("b", &[p("medical", "3")]).await.expect("record");
    let listed = s.run_plugins("a").await.expect("list");
    assert_eq!(listed.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["text-clean", "medical"]);
    s.record_run_plugins("a", &[p("medical", "2")]).await.expect("replace");
    assert_eq!(s.run_plugins("a").await.expect("list").len(), 1);
    let mut all = s.runs_with_plugin("medical", None).await.expect("by name");
    all.sort();
    assert_eq!(all, ["a", "b"]);
    assert_eq!(s.runs_with_plugin("medical", Some(&"3".repeat(64))).await.expect("by hash"), ["b"]);
    assert!(s.record_run_plugins("missing", &[p("x", "4")]).await.is_err(), "the run must exist");
}

backends::on_every_backend!(
    runs_are_listed_filtered_sorted_and_paged,
    metric_series_come_back_whole_or_downsampled,
    promote_and_rollback_keep_one_production_version_and_audit,
    feedback_needs_an_existing_prediction_and_a_valid_rating,
    killed_runs_are_marked_interrupted_and_data_survives_reopening,
    run_plugins_record_lineage_in_order_and_find_runs_by_plugin,
    feedback_is_filtered_reviewed_and_predictions_read_back,
    ab_tests_start_once_count_arms_and_end_audited,
    model_rules_roll_back_on_held_out_accuracy_and_error_rate,
    optional_numbers_alternate_between_null_and_values,
);

async fn feedback_is_filtered_reviewed_and_predictions_read_back(url: String) {
    let s = Store::open(&url).await.expect("open");
    let p = |input: &str, output: &str| NewPrediction {
        model_name: "clf".into(),
        model_version: 1,
        input: input.into(),
        output: output.into(),
        probabilities: serde_json::json!({"flu": 0.7, "cold": 0.3}),
        latency_ms: 1.0,
        arm: None,
    };
    let a = s.record_prediction(&p("fever", "flu")).await.expect("a");
    let b = s.record_prediction(&p("sneeze", "flu")).await.expect("b");
    let (row, probs) = s.prediction(&a).await.expect("read back");
    assert_eq!((row.input.as_str(), probs["flu"].as_f64()), ("fever", Some(0.7)));
    let fb = |id: &str, rating: &str, label: Option<&str>| NewFeedback {
        prediction_id: id.into(),
        rating: rating.into(),
        corrected_label: label.map(String::from),
        comment: None,
        author: None,
    };
    let fa = s.record_feedback(&fb(&a, "correct", None)).await.expect("fa");
    s.record_feedback(&fb(&b, "wrong", Some("cold"))).await.expect("fb");
    let q = |label: Option<&str>, rating: Option<&str>, reviewed: Option<bool>| tuneforge_store::FeedbackFilter {
        model: Some("clf".into()),
        label: label.map(String::from),
        rating: rating.map(String::from),
        reviewed,
        limit: 10,
    };
    assert_eq!(s.feedback(&q(Some("cold"), None, None)).await.expect("by label").len(), 1);
    assert_eq!(s.feedback(&q(Some("flu"), None, None)).await.expect("by answer").len(), 1);
    assert_eq!(s.feedback(&q(None, Some("wrong"), None)).await.expect("by rating")[0].input, "sneeze");
    s.mark_feedback_reviewed(&fa, "tester").await.expect("review");
    assert_eq!(s.feedback(&q(None, None, Some(true))).await.expect("reviewed").len(), 1);
    assert_eq!(s.feedback(&q(None, None, Some(false))).await.expect("open").len(), 1);
    assert!(matches!(s.mark_feedback_reviewed("nope", "t").await, Err(StoreError::NotFound { .. })));
    assert!(matches!(s.prediction("nope").await, Err(StoreError::NotFound { .. })));
}

async fn ab_tests_start_once_count_arms_and_end_audited(url: String) {
    let s = Store::open(&url).await.expect("open");
    for id in ["r1", "r2"] {
        s.start_run(&run(id, id)).await.expect("start");
        s.register_model("m", id, "/x", None, "t").await.expect("register");
    }
    assert!(s.start_ab("m", 2, 0.2, true, "t").await.is_err(), "no production version yet");
    s.promote("m", 1, "t").await.expect("promote");
    assert!(s.start_ab("m", 2, 1.5, true, "t").await.is_err(), "share out of range");
    assert!(s.start_ab("m", 1, 0.2, true, "t").await.is_err(), "production against itself");
    let test = s.start_ab("m", 2, 0.2, true, "t").await.expect("start");
    assert!(s.start_ab("m", 2, 0.3, true, "t").await.is_err(), "one running test per model");
    assert_eq!(s.running_ab("m").await.expect("running").map(|t| t.id), Some(test.id.clone()));
    let predict = |version: i64, arm: &str| NewPrediction {
        model_name: "m".into(),
        model_version: version,
        input: "x".into(),
        output: "flu".into(),
        probabilities: serde_json::json!({"flu": 1.0}),
        latency_ms: if arm == "candidate" { 4.0 } else { 2.0 },
        arm: Some(arm.into()),
    };
    for i in 0..6 {
        let (version, arm) = if i < 4 { (1, "production") } else { (2, "candidate") };
        let id = s.record_prediction(&predict(version, arm)).await.expect("predict");
        let rating = if i % 2 == 0 { "correct" } else { "wrong" };
        if i != 3 {
            let fb = NewFeedback {
                prediction_id: id,
                rating: rating.into(),
                corrected_label: None,
                comment: None,
                author: None,
            };
            s.record_feedback(&fb).await.expect("feedback");
        }
    }
    let (production, candidate) = s.ab_stats(&test).await.expect("stats");
    assert_eq!((production.predictions, production.rated, production.correct), (4, 3, 2));
    assert_eq!((candidate.predictions, candidate.rated, candidate.correct), (2, 2, 1));
    assert_eq!(candidate.mean_latency_ms, Some(4.0));
    let ended = s.end_ab(&test.id, "rolled_back", "candidate worse", "t").await.expect("end");
    assert_eq!((ended.status.as_str(), ended.verdict.as_deref()), ("rolled_back", Some("candidate worse")));
    assert!(s.running_ab("m").await.expect("none").is_none());
    assert!(s.end_ab(&test.id, "stopped", "again", "t").await.is_err(), "ends once");
    assert_eq!(s.events(Some("m@2"), 5).await.expect("events")[0].kind, "ab-rolled_back");
    s.start_ab("m", 2, 0.5, true, "t").await.expect("a new test after the first ended");
    assert_eq!(s.ab_tests(Some("m")).await.expect("list").len(), 2);
}

async fn model_rules_roll_back_on_held_out_accuracy_and_error_rate(url: String) {
    let s = Store::open(&url).await.expect("open");
    for (id, acc) in [("r1", 0.9), ("r2", 0.8)] {
        s.start_run(&run(id, id)).await.expect("start");
        let metrics = serde_json::json!({"accuracy": acc});
        s.register_model("m", id, "/x", Some(&metrics), "t").await.expect("register");
    }
    s.promote("m", 1, "t").await.expect("promote");
    assert_eq!(s.model_rules("m").await.expect("defaults"), tuneforge_store::ModelRules::defaults("m"));
    let mut rules =
        tuneforge_store::ModelRules { heldout_delta: Some(0.05), ..tuneforge_store::ModelRules::defaults("m") };
    assert!(s.set_model_rules(&tuneforge_store::ModelRules { min_rated: 0, ..rules.clone() }, "t").await.is_err());
    s.set_model_rules(&rules, "t").await.expect("set");
    assert_eq!(s.model_rules("m").await.expect("read"), rules);

    // Held out: 0.8 < 0.9 - 0.05, so the test ends at the first decision.
    s.start_ab("m", 2, 0.5, true, "t").await.expect("start");
    let ended = s.decide_ab("m").await.expect("decide").expect("decided");
    assert_eq!(ended.status, "rolled_back");
    assert!(ended.verdict.as_deref().expect("note").contains("held-out accuracy 0.8000 is below"), "{ended:?}");

    // Language models compare held-out loss, lower being better: 1.3 > 1.1 + 0.05.
    for (id, loss) in [("r3", 1.1), ("r4", 1.3), ("r5", 1.12)] {
        s.start_run(&run(id, id)).await.expect("start");
        let metrics = serde_json::json!({"loss": loss, "perplexity": f64::exp(loss)});
        s.register_model("lm", id, "/x", Some(&metrics), "t").await.expect("register");
    }
    s.promote("lm", 1, "t").await.expect("promote");
    s.set_model_rules(&tuneforge_store::ModelRules { model_name: "lm".into(), ..rules.clone() }, "t")
        .await
        .expect("set");
    s.start_ab("lm", 2, 0.5, true, "t").await.expect("start");
    let ended = s.decide_ab("lm").await.expect("decide").expect("decided");
    assert!(ended.verdict.as_deref().expect("note").contains("held-out loss 1.3000 is above"), "{ended:?}");
    s.start_ab("lm", 3, 0.5, true, "t").await.expect("start");
    assert!(s.decide_ab("lm").await.expect("decide").is_none(), "1.12 is within 1.1 + 0.05");

    // Error rate: with the held-out rule off, two wrong answers out of two exceed 30%.
    rules.heldout_delta = None;
    rules.max_error_rate = Some(0.3);
    rules.min_rated = 2;
    s.set_model_rules(&rules, "t").await.expect("set");
    let test = s.start_ab("m", 2, 0.5, true, "t").await.expect("start");
    assert!(s.decide_ab("m").await.expect("decide").is_none(), "no ratings yet");
    for _ in 0..2 {
        let p = NewPrediction {
            model_name: "m".into(),
            model_version: 2,
            input: "x".into(),
            output: "a".into(),
            probabilities: serde_json::json!({"a": 1.0}),
            latency_ms: 1.0,
            arm: Some("candidate".into()),
        };
        let pid = s.record_prediction(&p).await.expect("predict");
        let fb = NewFeedback {
            prediction_id: pid,
            rating: "wrong".into(),
            corrected_label: None,
            comment: None,
            author: None,
        };
        s.record_feedback(&fb).await.expect("feedback");
    }
    let ended = s.decide_ab("m").await.expect("decide").expect("decided");
    assert_eq!((ended.id.as_str(), ended.status.as_str()), (test.id.as_str(), "rolled_back"));
    assert!(ended.verdict.as_deref().expect("note").contains("error rate 1.0000 is above the bound 0.3"), "{ended:?}");
}

/// Optional numbers bound as NULL and then as values through one connection: PostgreSQL must
/// not reuse a statement prepared with the NULL's type (it did, and refused the value).
async fn optional_numbers_alternate_between_null_and_values(url: String) {
    let s = Store::open(&url).await.expect("open");
    for i in 0..12 {
        let rules = tuneforge_store::ModelRules {
            min_rated: 2,
            heldout_delta: (i % 2 == 0).then_some(0.1),
            max_error_rate: (i % 3 != 0).then_some(0.3),
            ..tuneforge_store::ModelRules::defaults("m")
        };
        s.set_model_rules(&rules, "t").await.unwrap_or_else(|e| panic!("rules {i}: {e}"));
        let id = format!("r{i}");
        s.start_run(&run(&id, "x")).await.expect("start");
        let acc = (i % 2 == 1).then_some(0.5);
        s.finish_run(&id, RunStatus::Succeeded, None, None, acc, acc, None)
            .await
            .unwrap_or_else(|e| panic!("finish {i}: {e}"));
    }
    assert_eq!(s.model_rules("m").await.expect("rules").max_error_rate, Some(0.3));
}
