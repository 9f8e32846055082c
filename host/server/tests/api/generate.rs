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
    for (bad, what) in [
        (json!({"prompt": "x", "messages": []}), "exactly one"),
        (json!({"max_tokens": 3}), "exactly one"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "top_p": 1.5}), "top_p"),
        (json!({"prompt": "x", "temperature": -1}), "temperature"),
        (json!({"messages": [{"role": "robot", "content": "x"}]}), "robot"),
        (json!({"prompt": "x", "stream": "yes"}), "stream"),
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
