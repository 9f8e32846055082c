//! `POST /api/v1/generate`: text from the decoder the server was started with
//! (`tuneforge serve --generator SOURCE`). One generation runs at a time (they are CPU-bound);
//! others wait their turn. With `"stream": true` the answer comes as server-sent events: one
//! `data: {"text": …}` event per piece of settled text, then `data: {"done": true, …}` with the
//! counts (or `data: {"error": …}`).

use std::sync::Arc;
use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tuneforge_core::generate::{LanguageModel, Sampling};

use super::State;
use crate::ApiError;
use crate::auth::require_token;
use crate::error::parse_json;

/// The most new tokens one request may ask for.
const MAX_NEW_TOKENS: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// A user message (put through the chat template unless `raw`).
    #[serde(default)]
    prompt: Option<String>,
    /// Or a conversation: `system`/`user`/`assistant` turns.
    #[serde(default)]
    messages: Option<Vec<Message>>,
    /// Send `prompt` as it is, without the chat template.
    #[serde(default)]
    raw: bool,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default)]
    temperature: f64,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default = "default_penalty")]
    repetition_penalty: f64,
    #[serde(default)]
    seed: u64,
    /// Server-sent events instead of one JSON answer.
    #[serde(default)]
    stream: bool,
}

fn default_max_tokens() -> usize {
    256
}

fn default_penalty() -> f64 {
    1.1
}

pub async fn generate(req: HttpRequest, state: State, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let body: GenerateBody = parse_json(&body)?;
    let Some(generator) = state.generator.clone() else {
        return Err(ApiError::NotFound(
            "no text generator is loaded: start the server with `tuneforge serve --generator SOURCE`".into(),
        ));
    };
    if body.max_tokens == 0 || body.max_tokens > MAX_NEW_TOKENS {
        return Err(ApiError::BadRequest(format!("max_tokens: give 1 to {MAX_NEW_TOKENS}, got {}", body.max_tokens)));
    }
    let sampling = Sampling {
        max_new_tokens: body.max_tokens,
        temperature: body.temperature,
        top_k: body.top_k,
        top_p: body.top_p,
        repetition_penalty: body.repetition_penalty,
        seed: body.seed,
    };
    sampling.validate().map_err(ApiError::BadRequest)?;
    let prompt = match (body.prompt, body.messages) {
        (Some(p), None) if body.raw => p,
        (Some(p), None) => generator.chat.render(&[("user".to_owned(), p)]),
        (None, Some(m)) if !body.raw => {
            if m.is_empty() {
                return Err(ApiError::BadRequest("messages: give at least one message".into()));
            }
            if let Some(bad) = m.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant")) {
                return Err(ApiError::BadRequest(format!("messages: unknown role `{}`", bad.role)));
            }
            generator.chat.render(&m.into_iter().map(|m| (m.role, m.content)).collect::<Vec<_>>())
        }
        (None, Some(_)) => return Err(ApiError::BadRequest("raw: applies to `prompt`, not `messages`".into())),
        _ => return Err(ApiError::BadRequest("give exactly one of `prompt` and `messages`".into())),
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::BadRequest("prompt: is empty".into()));
    }
    if body.stream {
        return Ok(stream_events(state, generator, prompt, sampling));
    }
    let _turn = state.generate_turn.lock().await;
    let started = Instant::now();
    let out = web::block(move || generator.generate(&prompt, &sampling, &mut |_| {}))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "model": state.generator_name,
        "text": out.text,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.ids.len(),
        "stopped": out.stopped,
        "tokens_per_s": out.tokens_per_s(),
        "seconds": started.elapsed().as_secs_f64(),
    })))
}

/// One server-sent event carrying `value`.
fn event(value: &serde_json::Value) -> web::Bytes {
    web::Bytes::from(format!("data: {value}\n\n"))
}

/// Streams a generation as server-sent events. The generation waits for its turn and runs on
/// the blocking pool; a client that goes away only loses the rest of the events.
fn stream_events(state: State, generator: Arc<LanguageModel>, prompt: String, sampling: Sampling) -> HttpResponse {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<web::Bytes>();
    actix_web::rt::spawn(async move {
        let _turn = state.generate_turn.lock().await;
        let started = Instant::now();
        let pieces = tx.clone();
        let out = web::block(move || {
            generator.generate(&prompt, &sampling, &mut |text| {
                let _ = pieces.send(event(&serde_json::json!({ "text": text })));
            })
        })
        .await;
        let last = match out {
            Ok(Ok(out)) => serde_json::json!({
                "done": true,
                "model": state.generator_name,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.ids.len(),
                "stopped": out.stopped,
                "tokens_per_s": out.tokens_per_s(),
                "seconds": started.elapsed().as_secs_f64(),
            }),
            Ok(Err(e)) => serde_json::json!({ "error": e.to_string() }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = tx.send(event(&last));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, actix_web::Error>(bytes), rx))
    });
    HttpResponse::Ok().content_type("text/event-stream").insert_header(("Cache-Control", "no-cache")).streaming(body)
}
