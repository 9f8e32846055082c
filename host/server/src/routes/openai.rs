//! OpenAI's chat API over tuneforge's language models, so that existing clients (the `openai`
//! SDKs, tools built on them) talk to a tuned model unchanged: `POST /v1/chat/completions`
//! (JSON or server-sent `chat.completion.chunk` events ending with `data: [DONE]`) and
//! `GET /v1/models`. `model` is a registered language model — its production version, or the
//! version of the A/B arm of the `user` (OpenAI's end-user id is the session key) — whose
//! answers are recorded for feedback like `/api/v1/generate`'s (`prediction_id` in the
//! answer), or the `serve --generator` decoder by its source. The API key is the server's
//! write token. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
//! Settings tuneforge cannot honour (several choices, tools, log-probabilities, frequency or
//! presence penalties, JSON output) are refused by name rather than ignored.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tuneforge_core::generate::{Generated, Sampling};

use super::State;
use super::generate::{MAX_NEW_TOKENS, StopStrings, event, registered, run_turn, stream_with, summary};
use crate::ApiError;
use crate::auth::require_token;
use crate::error::parse_json;

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part; other kinds' fields (`image_url`, ...) are read past, to refuse the part
/// by its kind.
#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: Content,
    /// A participant's name: accepted and not used.
    #[serde(default, rename = "name")]
    _name: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<StopStrings>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    /// The end user: the session key of an A/B test.
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    response_format: Option<serde_json::Value>,
    /// tuneforge's own: CTRL's repetition penalty (1: off, the default here) and top-k.
    #[serde(default)]
    repetition_penalty: Option<f64>,
    #[serde(default)]
    top_k: Option<usize>,
}

/// An error as OpenAI's clients read it.
fn openai_error(e: &ApiError) -> HttpResponse {
    use actix_web::ResponseError;
    let status = e.status_code();
    let (kind, code) = match status {
        StatusCode::UNAUTHORIZED => ("invalid_request_error", Some("invalid_api_key")),
        StatusCode::NOT_FOUND => ("invalid_request_error", Some("model_not_found")),
        StatusCode::BAD_REQUEST => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    let message = e.to_string();
    if status.is_server_error() {
        tracing::error!("{message}");
    }
    // The field a message names comes first (`messages[1].role: ...`).
    let param = message
        .split_once(": ")
        .map(|(head, _)| head)
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c)));
    HttpResponse::build(status).json(serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    }))
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The conversation as (role, text) turns; OpenAI's `developer` role is a system message.
fn turns(messages: Vec<Message>) -> Result<Vec<(String, String)>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::BadRequest("messages: give at least one message".into()));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "messages[{i}].role: `{other}` is not supported (system, developer, user or assistant)"
                    )));
                }
            };
            let text = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        (kind, _) => Err(ApiError::BadRequest(format!(
                            "messages[{i}].content: only text parts are supported, got `{kind}`"
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            Ok((role.to_owned(), text))
        })
        .collect()
}

/// The sampling settings, refusing what tuneforge cannot do.
fn sampling(b: &mut ChatBody) -> Result<Sampling, ApiError> {
    let refuse = |field: &str, why: &str| Err(ApiError::BadRequest(format!("{field}: {why}")));
    if b.n.is_some_and(|n| n != 1) {
        return refuse("n", "one choice per request");
    }
    if b.logprobs == Some(true) {
        return refuse("logprobs", "log-probabilities are not returned");
    }
    for (field, v) in [("frequency_penalty", b.frequency_penalty), ("presence_penalty", b.presence_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return refuse(field, "not supported; use `repetition_penalty` (tuneforge's, > 1 penalises repeats)");
        }
    }
    if let Some(f) = &b.response_format
        && f.get("type").and_then(|t| t.as_str()) != Some("text")
    {
        return refuse("response_format", "only {\"type\": \"text\"}");
    }
    let max = b.max_completion_tokens.or(b.max_tokens).unwrap_or(MAX_NEW_TOKENS);
    if max == 0 || max > MAX_NEW_TOKENS {
        return refuse("max_tokens", &format!("give 1 to {MAX_NEW_TOKENS}, got {max}"));
    }
    let s = Sampling {
        max_new_tokens: max,
        // OpenAI's defaults: temperature 1, top_p 1 (all tokens).
        temperature: b.temperature.unwrap_or(1.0),
        top_k: b.top_k,
        top_p: b.top_p.filter(|&p| p != 1.0),
        repetition_penalty: b.repetition_penalty.unwrap_or(1.0),
        seed: b.seed.unwrap_or_else(rand::random),
        stop: b.stop.take().map(StopStrings::into_vec).transpose()?.unwrap_or_default(),
    };
    s.validate().map_err(ApiError::BadRequest)?;
    Ok(s)
}

pub async fn chat_completions(req: HttpRequest, state: State, body: web::Bytes) -> HttpResponse {
    match chat(req, state, body).await {
        Ok(r) => r,
        Err(e) => openai_error(&e),
    }
}

async fn chat(req: HttpRequest, state: State, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let mut body: ChatBody = parse_json(&body)?;
    let sampling = sampling(&mut body)?;
    let turns = turns(std::mem::take(&mut body.messages))?;
    let model = body.model.clone();
    // The server's own decoder answers to its source's name, unless a registered model has it.
    let own =
        state.generator_name.as_deref() == Some(model.as_str()) && state.store.production(&model).await?.is_none();
    let (lm, recording) = match (&state.generator, own) {
        (Some(g), true) => (g.clone(), None),
        _ => {
            let (lm, r) = registered(&state, model.clone(), None, body.user.as_deref(), turns.clone()).await.map_err(
                |e| match e {
                    ApiError::NotFound(_) => ApiError::NotFound(format!(
                        "model: `{model}` is no registered language model in production{}",
                        state
                            .generator_name
                            .as_ref()
                            .map_or_else(String::new, |g| format!(" (the server's own is `{g}`)"))
                    )),
                    other => other,
                },
            )?;
            (lm, Some(r))
        }
    };
    let prompt = lm.lm.chat.render(&turns);
    let id = format!("chatcmpl-{:016x}{:08x}", rand::random::<u64>(), rand::random::<u32>());
    let created = unix_seconds();
    let finish = |out: &Generated| if out.stopped { "stop" } else { "length" };
    let usage = |out: &Generated| {
        serde_json::json!({
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.ids.len(),
            "total_tokens": out.prompt_tokens + out.ids.len(),
        })
    };
    if body.stream == Some(true) {
        let include_usage = body.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let chunk = {
            let (id, model) = (id.clone(), model.clone());
            move |delta: serde_json::Value, finish: Option<&str>| {
                serde_json::json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                })
            }
        };
        let first = event(&chunk(serde_json::json!({"role": "assistant", "content": ""}), None));
        let piece = {
            let chunk = chunk.clone();
            move |text: &str| event(&chunk(serde_json::json!({ "content": text }), None))
        };
        let end = move |outcome: Result<(Generated, serde_json::Value), String>| {
            let mut events = Vec::new();
            match outcome {
                Ok((out, counts)) => {
                    let mut last = chunk(serde_json::json!({}), Some(finish(&out)));
                    last["prediction_id"] = counts["id"].clone();
                    events.push(event(&last));
                    if include_usage {
                        let mut u = chunk(serde_json::json!({}), None);
                        u["choices"] = serde_json::json!([]);
                        u["usage"] = usage(&out);
                        events.push(event(&u));
                    }
                }
                Err(message) => events.push(event(&serde_json::json!({
                    "error": {"message": message, "type": "server_error", "param": null, "code": null}
                }))),
            }
            events.push(web::Bytes::from_static(b"data: [DONE]\n\n"));
            events
        };
        return Ok(stream_with(state, lm, (prompt, sampling), recording, vec![first], piece, end));
    }
    let (out, seconds) = run_turn(lm, prompt, sampling).await?;
    let counts = summary(&state, &out, seconds, recording).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "finish_reason": finish(&out),
            "logprobs": null,
        }],
        "usage": usage(&out),
        "prediction_id": counts["id"],
    })))
}

/// `GET /v1/models`: the registered language models with a production version, and the
/// server's own decoder.
pub async fn models(state: State) -> HttpResponse {
    let listed = async {
        let mut data = Vec::new();
        for m in state.store.list_models(None).await? {
            if m.stage.as_str() == "production"
                && tuneforge_core::generate::is_language_model(std::path::Path::new(&m.path))
            {
                let created = m.promoted_ms.unwrap_or(m.created_ms) / 1000;
                data.push(
                    serde_json::json!({"id": m.name, "object": "model", "created": created, "owned_by": "tuneforge"}),
                );
            }
        }
        if let Some(name) = &state.generator_name
            && !data.iter().any(|d| d["id"] == name.as_str())
        {
            data.push(serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": "tuneforge"}));
        }
        Ok::<_, ApiError>(serde_json::json!({ "object": "list", "data": data }))
    };
    match listed.await {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(e) => openai_error(&e),
    }
}
