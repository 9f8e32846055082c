//! `POST /api/v1/generate` with a tiny random decoder: auth, answers, bad bodies, and the
//! answer when no generator is loaded.

use std::sync::Arc;

use serde_json::json;
use tuneforge_core::generate::LanguageModel;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_answers_with_the_loaded_decoder() {
    let app = spawn_app_with(|dir| {
        tuneforge_core::testing::write_tiny_decoder(dir, "qwen2").expect("tiny decoder");
        let lm = LanguageModel::load(&dir.join("model.gguf")).expect("load");
        Some(("tiny".to_owned(), Arc::new(lm)))
    })
    .await;
    let body = json!({"prompt": "the cat", "max_tokens": 5});
    let r = app.request("POST", "/api/v1/generate", Some(&body.to_string()), None).await;
    assert_eq!(r.status, 401);
    let r = app.post("/api/v1/generate", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["model"], "tiny");
    assert!(v["completion_tokens"].as_u64().expect("n") <= 5);
    assert!(v["text"].is_string() && v["tokens_per_s"].is_number());
    // The same greedy request gives the same text; messages work too.
    assert_eq!(app.post("/api/v1/generate", &body).await.json()["text"], v["text"]);
    // Streamed: server-sent events whose pieces make the same text, then the counts.
    let streamed = app.post("/api/v1/generate", &json!({"prompt": "the cat", "max_tokens": 5, "stream": true})).await;
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    let events: Vec<serde_json::Value> = streamed
        .body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").expect("a data event")).expect("JSON event"))
        .collect();
    let (last, pieces) = events.split_last().expect("events");
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["completion_tokens"], v["completion_tokens"]);
    let text: String = pieces.iter().map(|e| e["text"].as_str().expect("text")).collect();
    assert_eq!(text, v["text"].as_str().expect("text"));
    assert!(pieces.len() >= 2 && !text.is_empty(), "{events:?}");
    let m = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hat"}], "max_tokens": 3});
    assert_eq!(app.post("/api/v1/generate", &m).await.status, 200);
    for stop in [json!("zq"), json!(["zq", "qz"])] {
        let r = app.post("/api/v1/generate", &json!({"prompt": "the cat", "max_tokens": 5, "stop": stop})).await;
        assert_eq!(r.status, 200, "{stop}: {}", r.body);
    }
    for (bad, what) in [
        (json!({"prompt": "x", "messages": []}), "exactly one"),
        (json!({"max_tokens": 3}), "exactly one"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "top_p": 1.5}), "top_p"),
        (json!({"prompt": "x", "temperature": -1}), "temperature"),
        (json!({"messages": [{"role": "robot", "content": "x"}]}), "robot"),
        (json!({"prompt": "x", "stream": "yes"}), "stream"),
        (json!({"prompt": "x", "stop": ["a", ""]}), "stop"),
        (json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), "stop"),
    ] {
        let r = app.post("/api/v1/generate", &bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.body.contains(what), "{bad}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_generator_generate_says_how_to_load_one() {
    let app = spawn_app().await;
    let r = app.post("/api/v1/generate", &json!({"prompt": "hi"})).await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("--generator"), "{}", r.body);
}

/// Trains a tiny LoRA adapter on a tiny decoder in `root` and records its run; returns the
/// run id and the adapter directory.
pub(crate) async fn tuned_adapter(
    app: &crate::helpers::TestApp,
    root: &std::path::Path,
) -> (String, std::path::PathBuf) {
    tuneforge_core::testing::write_tiny_decoder(root, "llama").expect("tiny decoder");
    let data: String = (0..10)
        .map(|i| json!({"prompt": format!("the cat {i}"), "response": "in the hat"}).to_string() + "\n")
        .collect();
    std::fs::write(root.join("sft.jsonl"), data).expect("data");
    let text = format!(
        "[experiment]\noutput_dir = \"{0}/runs\"\n[model]\nsource = \"{0}/model.gguf\"\ntask = \"causal-lm\"\nmax_len = 32\n\
         [data]\ntrain = \"{0}/sft.jsonl\"\nvalidation_split = 0.2\n[peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\n\
         target_modules = [\"q_proj\", \"v_proj\"]\n[train]\nepochs = 1\nbatch_size = 4\nlr = 1e-2\n",
        root.display()
    );
    let cfg = tuneforge_core::ExperimentConfig::from_toml(&text, "t.toml", &[]).expect("config");
    let s = tokio::task::spawn_blocking(move || tuneforge_core::sft::train_causal_lm(cfg, &mut |_| {}))
        .await
        .expect("task")
        .expect("train");
    let run = crate::helpers::new_run(&s.run_id, &s.run_dir.display().to_string(), &text);
    app.store.start_run(&run).await.expect("start");
    (s.run_id, s.best_model_dir)
}

/// A registered language model answers `/api/v1/generate` with `"model"`: its production
/// version, or the version of the session's A/B arm (sticky); every answer is recorded as a
/// prediction that feedback corrects, and the feedback export turns the correction into an
/// instruction-data conversation. Classifier and language-model endpoints refuse each
/// other's models by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_language_models_answer_and_their_answers_are_corrected() {
    let app = spawn_app().await;
    let root = app.dir.path().to_path_buf();
    let (run, adapter) = tuned_adapter(&app, &root).await;
    let store = &app.store;
    store.register_model("chat", &run, &adapter.display().to_string(), None, "t").await.expect("register");
    // Version 2: the base model itself (a .gguf is a language model too).
    store.register_model("chat", &run, &root.join("model.gguf").display().to_string(), None, "t").await.expect("v2");
    let r = app.post("/api/v1/generate", &json!({"model": "chat", "prompt": "the cat"})).await;
    assert_eq!(r.status, 404, "no production version yet: {}", r.body);
    assert!(r.body.contains("production"), "{}", r.body);
    store.promote("chat", 1, "t").await.expect("promote");

    let body = json!({"model": "chat", "prompt": "the cat 3", "max_tokens": 4});
    let r = app.post("/api/v1/generate", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!((v["model"].as_str(), v["version"].as_i64()), (Some("chat"), Some(1)), "{v}");
    // The adapter's answer is the one tuneforge_core gives for the same conversation.
    let lm = tuneforge_core::generate::LanguageModel::load(&adapter).expect("adapter");
    let prompt = lm.chat.render(&[("user".to_owned(), "the cat 3".to_owned())]);
    let sampling =
        tuneforge_core::generate::Sampling { max_new_tokens: 4, repetition_penalty: 1.1, ..Default::default() };
    let expected = lm.generate(&prompt, &sampling, &mut |_| {}).expect("generate");
    assert_eq!(v["text"].as_str(), Some(expected.text.as_str()));
    let id = v["id"].as_str().expect("a prediction id").to_owned();
    let (row, details) = store.prediction(&id).await.expect("recorded");
    assert_eq!((row.model_name.as_str(), row.model_version, row.input.as_str()), ("chat", 1, "the cat 3"));
    assert_eq!(row.output, expected.text);
    assert_eq!(details["messages"], json!([{"role": "user", "content": "the cat 3"}]), "{details}");

    // A correction, then the export: a conversation with the corrected answer.
    let f = json!({"prediction_id": id, "rating": "wrong", "corrected_label": "in the hat, of course"});
    assert_eq!(app.post("/api/v1/feedback", &f).await.status, 201);
    let conversation = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a hat?"}], "max_tokens": 3, "model": "chat"});
    let r = app.post("/api/v1/generate", &conversation).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pid = r.json()["id"].as_str().expect("id").to_owned();
    let f = json!({"prediction_id": pid, "rating": "wrong", "corrected_label": "A fine hat."});
    assert_eq!(app.post("/api/v1/feedback", &f).await.status, 201);
    let export = app.get("/api/v1/feedback/export?model=chat").await;
    assert_eq!(export.status, 200, "{}", export.body);
    let lines: Vec<serde_json::Value> =
        export.body.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 2, "{}", export.body);
    let corrected = lines.iter().find(|l| l["prediction_id"] == id.as_str()).expect("the first correction");
    assert_eq!(
        corrected["messages"],
        json!([{"role": "user", "content": "the cat 3"}, {"role": "assistant", "content": "in the hat, of course"}])
    );
    let second = lines.iter().find(|l| l["prediction_id"] == pid.as_str()).expect("the second correction");
    assert_eq!(
        second["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "a hat?"},
               {"role": "assistant", "content": "A fine hat."}])
    );
    // The export reads back as instruction data.
    let file = root.join("export.jsonl");
    std::fs::write(&file, &export.body).expect("write");
    let examples = tuneforge_core::sft::read_sft(&file).expect("instruction data");
    assert!(examples.iter().any(|e| e.response == "in the hat, of course"));

    // Streamed answers are recorded too: the last event carries the prediction's id.
    let streamed = app
        .post("/api/v1/generate", &json!({"model": "chat", "prompt": "the cat", "max_tokens": 3, "stream": true}))
        .await;
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    let last = streamed.body.split("\n\n").filter(|e| !e.trim().is_empty()).last().expect("events");
    let last: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").expect("data")).expect("JSON");
    assert_eq!(last["done"], true, "{last}");
    assert!(store.prediction(last["id"].as_str().expect("id")).await.is_ok(), "{last}");

    // An A/B test: sessions split between the versions, each session keeps its version.
    store.start_ab("chat", 2, 0.5, false, "t").await.expect("ab");
    let mut seen = std::collections::HashSet::new();
    for i in 0..12 {
        let ask = json!({"model": "chat", "prompt": "hi", "max_tokens": 1, "session": format!("user-{i}")});
        let first = app.post("/api/v1/generate", &ask).await.json();
        let again = app.post("/api/v1/generate", &ask).await.json();
        assert_eq!(first["version"], again["version"], "sticky");
        let (row, _) = store.prediction(first["id"].as_str().expect("id")).await.expect("row");
        assert_eq!(row.arm.as_deref(), Some(if first["version"] == 2 { "candidate" } else { "production" }));
        seen.insert(first["version"].as_i64().expect("v"));
    }
    assert_eq!(seen.len(), 2, "both arms answer some sessions: {seen:?}");

    // Each endpoint refuses the other's models, naming the one to use; bad combinations.
    let clf = crate::models::trained_run(&app, "clf").await;
    let best = store.get_run(&clf).await.expect("run").run_dir + "/best";
    store.register_model("triage", &clf, &best, None, "t").await.expect("register");
    store.promote("triage", 1, "t").await.expect("promote");
    for (path, bad, what) in [
        ("/api/v1/predict", json!({"model": "chat", "text": "x"}), "/api/v1/generate"),
        ("/api/v1/generate", json!({"model": "triage", "prompt": "x"}), "/api/v1/predict"),
        ("/api/v1/generate", json!({"model": "chat", "prompt": "x", "raw": true}), "raw"),
        ("/api/v1/generate", json!({"prompt": "x", "session": "s"}), "session"),
    ] {
        let r = app.post(path, &bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.body.contains(what), "{bad}: {}", r.body);
    }
    let r = app.post("/api/v1/generate", &json!({"model": "nobody", "prompt": "x"})).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // The server counts the tokens each language model read and wrote.
    let metrics = app.get("/metrics").await.body;
    let count = |series: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series}: {metrics}"));
        line.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a count")
    };
    assert!(count("tuneforge_prompt_tokens_total{model=\"chat\"}") > 0);
    assert_eq!(count("tuneforge_time_to_first_token_seconds_count{model=\"chat\"}"), 27, "one per generation");
    assert!(metrics.contains("tuneforge_generated_tokens_total{model=\"chat\"}"), "{metrics}");
}

/// Concurrent generations run as one batch (the metrics count one batch of four), each
/// answer — streamed or not — the one its prompt gets alone; with `max_generations = 1`
/// every generation is its own batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_generations_share_a_batch() {
    for (max, batches) in [(4, 1), (1, 4)] {
        let policy = tuneforge_server::BatchPolicy {
            max_wait: std::time::Duration::from_millis(400),
            max_generations: max,
            ..Default::default()
        };
        let app = std::sync::Arc::new(
            crate::helpers::spawn_app_configured(
                |dir| {
                    tuneforge_core::testing::write_tiny_decoder(dir, "llama").expect("tiny decoder");
                    Some(("tiny".to_owned(), Arc::new(LanguageModel::load(&dir.join("model.gguf")).expect("load"))))
                },
                policy,
            )
            .await,
        );
        let alone = LanguageModel::load(&app.dir.path().join("model.gguf")).expect("load");
        let prompts = ["the cat", "a hat on the cat in the hat", "in", "the hat, the cat"];
        let mut set = tokio::task::JoinSet::new();
        for (i, prompt) in prompts.into_iter().enumerate() {
            let app = app.clone();
            set.spawn(async move {
                let body = json!({"prompt": prompt, "max_tokens": 6, "stream": i % 2 == 1});
                let r = app.post("/api/v1/generate", &body).await;
                assert_eq!(r.status, 200, "{}", r.body);
                let text = if i % 2 == 1 {
                    r.body
                        .split("\n\n")
                        .filter_map(|e| e.strip_prefix("data: "))
                        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
                        .filter_map(|e| e["text"].as_str().map(str::to_owned))
                        .collect::<String>()
                } else {
                    r.json()["text"].as_str().expect("text").to_owned()
                };
                (prompt, text)
            });
        }
        while let Some(done) = set.join_next().await {
            let (prompt, text) = done.expect("task");
            let s =
                tuneforge_core::generate::Sampling { max_new_tokens: 6, repetition_penalty: 1.1, ..Default::default() };
            let expected =
                alone.generate(&alone.chat.render(&[("user".into(), prompt.into())]), &s, &mut |_| {}).expect("alone");
            assert_eq!(text, expected.text, "max {max}: `{prompt}` got another answer");
        }
        let metrics = app.get("/metrics").await.body;
        let value = |name: &str| -> u64 {
            let prefix = format!("{name}{{model=\"tiny\",version=\"0\"}} ");
            metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).expect(name)
        };
        assert_eq!(value("tuneforge_inference_batch_texts_total"), 4);
        assert_eq!(value("tuneforge_inference_batches_total"), batches, "max {max}: {metrics}");
    }
}
