//! OpenAI's chat API (`/v1/chat/completions`, `/v1/models`) over the server's decoder and a
//! registered language model: the answer's shape, streaming chunks, recording, and errors in
//! OpenAI's shape that name the field.

use std::sync::Arc;

use serde_json::json;
use tuneforge_core::generate::LanguageModel;

use crate::helpers::{TestApp, spawn_app_with};

async fn app_with_models() -> TestApp {
    let app = spawn_app_with(|dir| {
        tuneforge_core::testing::write_tiny_decoder(dir, "qwen2").expect("tiny decoder");
        let lm = LanguageModel::load(&dir.join("model.gguf")).expect("load");
        Some(("tiny".to_owned(), Arc::new(lm)))
    })
    .await;
    let root = app.dir.path().join("chat");
    std::fs::create_dir_all(&root).expect("dir");
    let (run, adapter) = crate::generate::tuned_adapter(&app, &root).await;
    app.store.register_model("chat", &run, &adapter.display().to_string(), None, "t").await.expect("register");
    app.store.promote("chat", 1, "t").await.expect("promote");
    app
}

/// The data events of a server-sent stream, `[DONE]` as a string.
fn events(body: &str) -> Vec<serde_json::Value> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data = e.strip_prefix("data: ").expect("a data event");
            serde_json::from_str(data).unwrap_or_else(|_| json!(data))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_answer_like_openai() {
    let app = app_with_models().await;
    let ask = json!({"model": "tiny", "messages": [{"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "cat"}]}],
        "temperature": 0, "max_tokens": 5});
    let r = app.request("POST", "/v1/chat/completions", Some(&ask.to_string()), None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key", "{}", r.body);

    let r = app.post("/v1/chat/completions", &ask).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["id"].as_str().expect("id").starts_with("chatcmpl-"), "{v}");
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("chat.completion"), Some("tiny")));
    assert!(v["created"].as_u64().expect("created") > 1_700_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().expect("n");
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().expect("p") + completion));
    assert_eq!(choice["finish_reason"], if completion < 5 { "stop" } else { "length" }, "{v}");
    // The same greedy answer as tuneforge's own endpoint gives the same conversation.
    let own = app
        .post(
            "/api/v1/generate",
            &json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}],
                "max_tokens": 5, "repetition_penalty": 1.0}),
        )
        .await
        .json();
    assert_eq!(choice["message"]["content"], own["text"], "{v} vs {own}");
    assert!(v["prediction_id"].is_null(), "the server's own decoder is not recorded: {v}");

    // Streamed: a role chunk, content chunks, the finish reason, the usage, then [DONE].
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = app.post("/v1/chat/completions", &streamed).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = events(&r.body);
    assert_eq!(ev.last(), Some(&json!("[DONE]")), "{ev:?}");
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    let chunks = &ev[..ev.len() - 1];
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, choice["message"]["content"].as_str().expect("content"));
    let finished: Vec<_> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["choices"][0]["finish_reason"], choice["finish_reason"]);
    assert_eq!(chunks.last().expect("usage")["usage"], v["usage"]);

    // A registered model's answers are recorded, for feedback.
    let r = app.post("/v1/chat/completions", &json!({"model": "chat", "messages": [{"role": "user", "content": "the cat 2"}], "max_tokens": 3, "user": "u1"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pid = r.json()["prediction_id"].as_str().expect("recorded").to_owned();
    let (row, details) = app.store.prediction(&pid).await.expect("row");
    assert_eq!((row.model_name.as_str(), row.input.as_str()), ("chat", "the cat 2"));
    assert_eq!(details["messages"][0]["content"], "the cat 2");

    let models = app.get("/v1/models").await.json();
    let ids: Vec<&str> =
        models["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().expect("id")).collect();
    assert_eq!((models["object"].as_str(), ids), (Some("list"), vec!["chat", "tiny"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_honoured_is_refused_by_name() {
    let app = app_with_models().await;
    let base = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]});
    for (extra, param, what) in [
        (json!({"n": 2}), "n", "one choice"),
        (json!({"frequency_penalty": 0.5}), "frequency_penalty", "repetition_penalty"),
        (json!({"logprobs": true}), "logprobs", "log-probabilities"),
        (json!({"response_format": {"type": "json_object"}}), "response_format", "text"),
        (json!({"max_tokens": 0}), "max_tokens", "1 to"),
        (json!({"temperature": -1}), "", "temperature"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop", "at most 4"),
        (json!({"tools": []}), "", "tools"),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].role", "tool"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "",
            "image_url",
        ),
        (json!({"messages": []}), "messages", "at least one"),
    ] {
        let mut body = base.clone();
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let r = app.post("/v1/chat/completions", &body).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error", "{extra}: {e}");
        assert!(e["message"].as_str().expect("message").contains(what), "{extra}: {e}");
        if !param.is_empty() {
            assert_eq!(e["param"], param, "{extra}: {e}");
        }
    }
    let r = app
        .post("/v1/chat/completions", &json!({"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
}
