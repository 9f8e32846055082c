//! The registry, prediction and feedback with a real (tiny) trained model, and auth on every
//! write.

use serde_json::json;
use tuneforge_core::testing::write_tiny_model_dir;
use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment};
use tuneforge_store::{NewRun, RunStatus};

use crate::helpers::{TestApp, new_run, spawn_app, spawn_app_configured};

const WORDS: &[&str] = &["fever", "cough", "rash", "itch", "red", "hot"];

const CSV: &str =
    "label,text\nflu,fever cough\nflu,cough hot\nflu,fever hot\nacne,rash itch\nacne,red rash\nacne,itch red\n";

/// Trains a tiny model and records its run; returns the run id.
pub(crate) async fn trained_run(app: &TestApp, id_hint: &str) -> String {
    trained_run_on(app, id_hint, CSV).await
}

/// [`trained_run`] on the given CSV.
async fn trained_run_on(app: &TestApp, id_hint: &str, csv: &str) -> String {
    let root = app.dir.path().join(id_hint);
    write_tiny_model_dir(&root.join("model"), WORDS, 1).expect("tiny model");
    std::fs::write(root.join("train.csv"), csv).expect("csv");
    let text = format!(
        "[experiment]\noutput_dir = \"{0}/runs\"\n[model]\nsource = \"{0}/model\"\nmax_len = 8\n[data]\ntrain = \"{0}/train.csv\"\nvalidation = \"{0}/train.csv\"\n[train]\nepochs = 15\nbatch_size = 6\nlr = 1e-2\n",
        root.display()
    );
    let cfg = ExperimentConfig::from_toml(&text, "t.toml", &[]).expect("config");
    let out = tokio::task::spawn_blocking(move || train_experiment(cfg, &RunOptions::default(), &mut |_| {}))
        .await
        .expect("task")
        .expect("train");
    let id = out.run.id();
    let run = NewRun { total_steps: 15, ..new_run(&id, &out.run.root().display().to_string(), &text) };
    app.store.start_run(&run).await.expect("start");
    let summary = serde_json::to_value(&out.summary).expect("summary");
    app.store
        .finish_run(&id, RunStatus::Succeeded, Some(&summary), None, Some(1.0), Some(1.0), None)
        .await
        .expect("finish");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_needs_the_token() {
    let app = spawn_app().await;
    let writes = [
        ("/api/v1/models", json!({"name": "m", "run_id": "r"})),
        ("/api/v1/models/m/promote", json!({"version": 1})),
        ("/api/v1/models/m/rollback", json!({})),
        ("/api/v1/predict", json!({"model": "m", "text": "x"})),
        ("/api/v1/feedback", json!({"prediction_id": "p", "rating": "wrong"})),
        ("/api/v1/ab", json!({"model": "m", "candidate": 2, "share": 0.2})),
        ("/api/v1/ab/x/stop", json!({"action": "stop"})),
    ];
    for (path, body) in &writes {
        for token in [None, Some("wrong-token-0123456789abcdef")] {
            let r = app.request("POST", path, Some(&body.to_string()), token).await;
            assert_eq!(r.status, 401, "{path} with {token:?}");
            assert!(r.json()["error"].as_str().expect("error").contains("Bearer"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_promote_predict_feedback_and_rollback() {
    let app = spawn_app().await;
    let first = trained_run(&app, "one").await;
    let second = trained_run(&app, "two").await;

    let r = app.post("/api/v1/predict", &json!({"model": "triage", "text": "fever"})).await;
    assert_eq!(r.status, 404, "nothing registered yet: {}", r.body);
    for run in [&first, &second] {
        let r = app.post("/api/v1/models", &json!({"name": "triage", "run_id": run})).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = app.post("/api/v1/models", &json!({"name": "triage", "run_id": "missing"})).await;
    assert_eq!(r.status, 404);
    let r = app.post("/api/v1/predict", &json!({"model": "triage", "text": "fever"})).await;
    assert_eq!(r.status, 404, "no production version yet");
    assert_eq!(app.post("/api/v1/models/triage/promote", &json!({"version": 1})).await.status, 200);
    assert_eq!(app.post("/api/v1/models/triage/promote", &json!({"version": 2, "actor": "ann"})).await.status, 200);

    let r =
        app.post("/api/v1/predict", &json!({"model": "triage", "texts": ["rash itch red", "fever cough hot"]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json();
    assert_eq!(p["version"], 2);
    assert_eq!(p["predictions"][0]["label"], "acne");
    assert_eq!(p["predictions"][1]["label"], "flu");
    let pid = p["predictions"][0]["id"].as_str().expect("id").to_owned();
    let r = app.post("/api/v1/predict", &json!({"model": "triage", "text": "x", "texts": ["y"]})).await;
    assert_eq!(r.status, 400);

    let r = app
        .post(
            "/api/v1/feedback",
            &json!({"prediction_id": pid, "rating": "wrong", "corrected_label": "flu", "comment": "<b>no</b>"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = app.post("/api/v1/feedback", &json!({"prediction_id": "unknown", "rating": "wrong"})).await;
    assert_eq!(r.status, 404);
    let r = app.post("/api/v1/feedback", &json!({"prediction_id": pid, "rating": "meh"})).await;
    assert_eq!(r.status, 400);
    let fb = app.get("/api/v1/feedback?model=triage").await.json();
    assert_eq!(fb[0]["corrected_label"], "flu");
    assert_eq!(fb[0]["input"], "rash itch red");

    let r = app.post("/api/v1/models/triage/rollback", &json!({})).await;
    assert_eq!((r.status, r.json()["version"].as_i64()), (200, Some(1)));
    let r = app.post("/api/v1/predict", &json!({"model": "triage", "text": "fever cough"})).await;
    assert_eq!(r.json()["version"], 1);
    let events = app.get("/api/v1/events").await.json();
    let kinds: Vec<&str> =
        events.as_array().expect("events").iter().map(|e| e["kind"].as_str().expect("kind")).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "promote").count(), 2);
    assert_eq!(kinds[0], "rollback");
    let metrics = app.get("/metrics").await.body;
    assert!(metrics.contains("tuneforge_predictions_total{model=\"triage\"} 3"), "{metrics}");
    assert!(metrics.contains("tuneforge_feedback_total{rating=\"wrong\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_tests_assign_sessions_stably_and_the_rules_roll_back_the_worse_and_promote_the_better() {
    let app = spawn_app().await;
    for hint in ["one", "two"] {
        let run = trained_run(&app, hint).await;
        assert_eq!(app.post("/api/v1/models", &json!({"name": "m", "run_id": run})).await.status, 201);
    }
    assert_eq!(app.post("/api/v1/models/m/promote", &json!({"version": 1})).await.status, 200);
    let r = app.post("/api/v1/ab", &json!({"model": "m", "candidate": 2, "share": 0.3})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let test_id = r.json()["test"]["id"].as_str().expect("id").to_owned();
    let r = app.post("/api/v1/ab", &json!({"model": "m", "candidate": 2, "share": 0.3})).await;
    assert_eq!(r.status, 400, "one running test per model: {}", r.body);

    // 1,000 sessions: each keeps its version; about 30% get the candidate.
    let mut version_of = Vec::new();
    for i in 0..1000 {
        let r = app
            .post("/api/v1/predict", &json!({"model": "m", "text": "fever cough", "session": format!("s{i}")}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let p = r.json();
        version_of.push((
            p["version"].as_i64().expect("version"),
            p["predictions"][0]["id"].as_str().expect("id").to_owned(),
        ));
    }
    for i in (0..1000).step_by(10) {
        let r = app.post("/api/v1/predict", &json!({"model": "m", "text": "rash", "session": format!("s{i}")})).await;
        assert_eq!(r.json()["version"].as_i64(), Some(version_of[i].0), "session s{i} changed arm");
    }
    let candidate = version_of.iter().filter(|(v, _)| *v == 2).count();
    assert!((240..=360).contains(&candidate), "{candidate} of 1000 sessions on the candidate at share 0.3");
    let r = app.post("/api/v1/predict", &json!({"model": "m", "text": "fever"})).await;
    assert_eq!(r.json()["version"], 1, "without a session, production answers");

    // Users rate the candidate's answers wrong and production's right: once each arm has 30
    // ratings the verdict is "worse" and the server rolls the candidate back on its own.
    let mut decided = None;
    for (v, id) in version_of.iter().take(400) {
        let rating = if *v == 2 { "wrong" } else { "correct" };
        let r = app.post("/api/v1/feedback", &json!({"prediction_id": id, "rating": rating})).await;
        assert_eq!(r.status, 201);
        if !r.json()["ab_decision"].is_null() {
            decided.get_or_insert(r.json()["ab_decision"].clone());
        }
    }
    let decided = decided.expect("the rule decided");
    assert_eq!(decided["status"], "rolled_back", "{decided}");
    assert!(decided["verdict"].as_str().expect("verdict").contains("auto-rule"), "{decided}");
    let t = &app.get("/api/v1/ab?model=m").await.json()["tests"][0];
    assert_eq!((t["test"]["status"].as_str(), t["verdict"].as_str()), (Some("rolled_back"), Some("worse")), "{t}");
    assert_eq!(t["candidate"]["accuracy"].as_f64(), Some(0.0));
    assert_eq!(t["production"]["accuracy"].as_f64(), Some(1.0));
    let r = app.post("/api/v1/predict", &json!({"model": "m", "text": "fever", "session": "s1"})).await;
    assert_eq!(r.json()["version"], 1, "production kept answering and now answers every session");
    let r = app.post(&format!("/api/v1/ab/{test_id}/stop"), &json!({"action": "rollback"})).await;
    assert_eq!(r.status, 404, "a test ends once");

    // A better candidate: users rate it right and production wrong; the rule promotes it.
    let r = app.post("/api/v1/ab", &json!({"model": "m", "candidate": 2, "share": 0.5})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    for i in 0..300 {
        let r = app.post("/api/v1/predict", &json!({"model": "m", "text": "rash", "session": format!("b{i}")})).await;
        let p = r.json();
        let rating = if p["version"] == 2 { "correct" } else { "wrong" };
        let id = p["predictions"][0]["id"].as_str().expect("id").to_owned();
        let r = app.post("/api/v1/feedback", &json!({"prediction_id": id, "rating": rating})).await;
        if r.json()["ab_decision"]["status"] == "promoted" {
            break;
        }
    }
    assert_eq!(app.post("/api/v1/predict", &json!({"model": "m", "text": "x"})).await.json()["version"], 2);
    let t = &app.get("/api/v1/ab?model=m").await.json()["tests"][0];
    assert_eq!(t["test"]["status"], "promoted", "{t}");
    let metrics = app.get("/metrics").await.body;
    for series in [
        "tuneforge_inference_seconds_count{model=\"m\",version=\"2\",arm=\"candidate\"}",
        "tuneforge_inference_seconds_count{model=\"m\",version=\"1\",arm=\"production\"}",
        "tuneforge_inference_seconds_bucket{model=\"m\",version=\"1\",arm=\"none\",le=\"+Inf\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }

    // By hand: a manual test waits for a decision and ends as told.
    let r = app.post("/api/v1/ab", &json!({"model": "m", "candidate": 1, "share": 0.5, "auto": false})).await;
    let manual = r.json()["test"]["id"].as_str().expect("id").to_owned();
    let r = app.post(&format!("/api/v1/ab/{manual}/stop"), &json!({"action": "stop", "actor": "ann"})).await;
    assert_eq!((r.status, r.json()["test"]["status"].as_str()), (200, Some("stopped")), "{}", r.body);
    let kinds: Vec<String> = app
        .get("/api/v1/events?subject=m@2")
        .await
        .json()
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind").to_owned())
        .collect();
    for k in ["ab-start", "ab-rolled_back", "ab-promoted", "promote"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_trained_on_swapped_labels_is_rolled_back_by_honest_feedback() {
    let app = spawn_app().await;
    let good = trained_run(&app, "good").await;
    // The same data with the labels swapped: a deliberately worse model.
    let swapped = CSV.replace("flu,", "tmp,").replace("acne,", "flu,").replace("tmp,", "acne,");
    let bad = trained_run_on(&app, "bad", &swapped).await;
    for run in [&good, &bad] {
        assert_eq!(app.post("/api/v1/models", &json!({"name": "clf", "run_id": run})).await.status, 201);
    }
    assert_eq!(app.post("/api/v1/models/clf/promote", &json!({"version": 1})).await.status, 200);
    assert_eq!(app.post("/api/v1/ab", &json!({"model": "clf", "candidate": 2, "share": 0.5})).await.status, 201);

    // Simulated users know the right answer and say whether the model gave it.
    let truth = [("fever cough", "flu"), ("rash itch", "acne"), ("cough hot", "flu"), ("red rash", "acne")];
    let mut served = 0;
    let mut outcome = None;
    for i in 0..400 {
        let (text, label) = truth[i % truth.len()];
        let r =
            app.post("/api/v1/predict", &json!({"model": "clf", "text": text, "session": format!("user-{i}")})).await;
        assert_eq!(r.status, 200, "production keeps answering: {}", r.body);
        served += 1;
        let p = &r.json()["predictions"][0];
        let rating = if p["label"] == label { "correct" } else { "wrong" };
        let fb = json!({"prediction_id": p["id"], "rating": rating, "corrected_label": label});
        let d = app.post("/api/v1/feedback", &fb).await.json()["ab_decision"].clone();
        if !d.is_null() {
            outcome = Some(d);
            break;
        }
    }
    let outcome = outcome.expect("the rule decided within 400 sessions");
    assert_eq!(outcome["status"], "rolled_back", "{outcome}");
    let t = &app.get("/api/v1/ab?model=clf").await.json()["tests"][0];
    assert_eq!(t["verdict"], "worse", "{t}");
    assert!(t["production"]["accuracy"].as_f64() > t["candidate"]["accuracy"].as_f64(), "{t}");
    assert!(served >= 60, "both arms needed 30 ratings: {served}");
    let r = app.post("/api/v1/predict", &json!({"model": "clf", "text": "fever cough", "session": "user-1"})).await;
    assert_eq!((r.json()["version"].as_i64(), r.json()["predictions"][0]["label"].as_str()), (Some(1), Some("flu")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_predictions_share_micro_batches() {
    let (texts, batches) = concurrent_predictions(spawn_app().await).await;
    assert_eq!(texts, 49);
    assert!(batches < 49, "49 requests ran in {batches} batches: nothing was batched");
}

/// `serve --batch-max-texts 1`: every text is its own batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_micro_batching_policy_is_the_servers_to_set() {
    let one = tuneforge_server::BatchPolicy {
        max_texts: 1,
        max_wait: std::time::Duration::from_millis(5),
        ..Default::default()
    };
    let (texts, batches) = concurrent_predictions(spawn_app_configured(|_| None, one).await).await;
    assert_eq!((texts, batches), (49, 49));
}

/// 49 predictions of a registered model, 48 of them at once, each checked against its own
/// text; the texts and batches the server's metrics count.
async fn concurrent_predictions(app: TestApp) -> (u64, u64) {
    let app = std::sync::Arc::new(app);
    let run = trained_run(&app, "batch").await;
    assert_eq!(app.post("/api/v1/models", &json!({"name": "b", "run_id": run})).await.status, 201);
    assert_eq!(app.post("/api/v1/models/b/promote", &json!({"version": 1})).await.status, 200);
    // Warm the model up (the first request loads it), then fire 48 requests at once.
    assert_eq!(app.post("/api/v1/predict", &json!({"model": "b", "text": "fever"})).await.status, 200);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..48 {
        let app = app.clone();
        set.spawn(async move {
            let text = if i % 2 == 0 { "fever cough hot" } else { "rash itch red" };
            let r = app.post("/api/v1/predict", &json!({"model": "b", "text": text})).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let label = r.json()["predictions"][0]["label"].as_str().expect("label").to_owned();
            (i, label)
        });
    }
    while let Some(done) = set.join_next().await {
        let (i, label) = done.expect("task");
        assert_eq!(label, if i % 2 == 0 { "flu" } else { "acne" }, "request {i} got another's answer");
    }
    let metrics = app.get("/metrics").await.body;
    let value = |name: &str| -> u64 {
        let prefix = format!("{name}{{model=\"b\",version=\"1\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}"))
    };
    (value("tuneforge_inference_batch_texts_total"), value("tuneforge_inference_batches_total"))
}

/// An int8 copy of a run's model (`tuneforge quantize`) serves like the f32 one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_model_serves_predictions() {
    let app = spawn_app().await;
    let run = trained_run(&app, "q").await;
    let r = app.store.get_run(&run).await.expect("run");
    let int8 = app.dir.path().join("int8");
    tuneforge_core::quantize::quantize_int8(std::path::Path::new(&r.run_dir), &int8, false).expect("quantize");
    let v =
        app.store.register_model("triage", &run, &int8.display().to_string(), None, "test").await.expect("register");
    assert_eq!(app.post("/api/v1/models/triage/promote", &json!({"version": v.version})).await.status, 200);
    let r =
        app.post("/api/v1/predict", &json!({"model": "triage", "texts": ["rash itch red", "fever cough hot"]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json();
    assert_eq!(p["predictions"][0]["label"], "acne");
    assert_eq!(p["predictions"][1]["label"], "flu");
}
