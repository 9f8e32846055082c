//! `POST /api/v1/generate`: text from a registered language model (`"model": NAME`: its
//! production version, the version a session's A/B arm gives, or a pinned `version`; loaded
//! once and kept warm; every answer recorded as a prediction that feedback can correct), or
//! from the decoder the server was started with (`tuneforge serve --generator SOURCE`; not
//! recorded). Concurrent generations of one model run as one batch (`BatchPolicy::
//! max_generations`, [`GenerationBatcher`]).
//! With `"stream": true` the answer comes as server-sent events: one `data: {"text": …}` event
//! per piece of settled text, then `data: {"done": true, …}` with the counts and the
//! prediction's id (or `data: {"error": …}`).

use std::sync::Arc;
use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tuneforge_core::generate::{Generated, LanguageModel, Sampling};

use crate::batcher::GenerationBatcher;
use tuneforge_store::NewPrediction;

use super::State;
use super::predict::{model_version, route};
use crate::ApiError;
use crate::auth::require_token;
use crate::error::parse_json;

/// The most new tokens one request may ask for.
pub(crate) const MAX_NEW_TOKENS: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// A registered language model; without it, the server's `--generator`.
    #[serde(default)]
    model: Option<String>,
    /// A version of `model` instead of production (or the session's arm).
    #[serde(default)]
    version: Option<i64>,
    /// A stable key of the user's session: with an A/B test of `model` running, it decides
    /// (stickily) whether the production or the candidate version answers.
    #[serde(default)]
    session: Option<String>,
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
    /// The text ends before the first of these strings: one string or a list.
    #[serde(default)]
    stop: Option<StopStrings>,
    /// Server-sent events instead of one JSON answer.
    #[serde(default)]
    stream: bool,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    One(String),
    Many(Vec<String>),
}

/// The most stop strings a request may give.
pub(crate) const MAX_STOP: usize = 4;

impl StopStrings {
    pub(crate) fn into_vec(self) -> Result<Vec<String>, ApiError> {
        let all = match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        };
        if all.len() > MAX_STOP || all.iter().any(|s| s.is_empty() || s.len() > 200) {
            return Err(ApiError::BadRequest(format!("stop: give at most {MAX_STOP} strings of 1 to 200 bytes")));
        }
        Ok(all)
    }
}

fn default_max_tokens() -> usize {
    256
}

fn default_penalty() -> f64 {
    1.1
}

/// A registered model's answer to record: which version answered, in which arm, to which
/// conversation.
pub(crate) struct Recording {
    name: String,
    version: i64,
    arm: Option<&'static str>,
    turns: Vec<(String, String)>,
}

/// A registered language model's version for a session (see [`route`]), loaded, and how to
/// record its answer to `turns`.
pub(crate) async fn registered(
    state: &State,
    name: String,
    version: Option<i64>,
    session: Option<&str>,
    turns: Vec<(String, String)>,
) -> Result<(Arc<GenerationBatcher>, Recording), ApiError> {
    let (version, arm) = route(state, &name, version, session).await?;
    let (version, lm) = load(state, &name, version).await?;
    Ok((lm, Recording { name, version, arm, turns }))
}

/// Loads a registered language model's version once and keeps it warm.
async fn load(state: &State, name: &str, version: Option<i64>) -> Result<(i64, Arc<GenerationBatcher>), ApiError> {
    let v = model_version(state, name, version).await?;
    let key = (v.name.clone(), v.version);
    if let Some(m) = state.generators.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok((v.version, m.clone()));
    }
    let path = std::path::PathBuf::from(&v.path);
    if !tuneforge_core::generate::is_language_model(&path) {
        return Err(ApiError::BadRequest(format!("model `{name}` is a classifier: ask it with POST /api/v1/predict")));
    }
    let device = state.device.clone();
    let lm = web::block(move || LanguageModel::load_on(&path, &device))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("cannot load {name}@{}: {e}", v.version)))?;
    let counters = state.counters.clone();
    let batcher = GenerationBatcher::start(Arc::new(lm), state.batch_policy, counters, name.to_owned(), v.version)
        .map_err(|e| ApiError::Internal(format!("cannot start the generation worker: {e}")))?;
    let batcher = Arc::new(batcher);
    state.generators.lock().unwrap_or_else(|e| e.into_inner()).insert(key, batcher.clone());
    Ok((v.version, batcher))
}

pub async fn generate(req: HttpRequest, state: State, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let body: GenerateBody = parse_json(&body)?;
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
        stop: body.stop.map(StopStrings::into_vec).transpose()?.unwrap_or_default(),
    };
    sampling.validate().map_err(ApiError::BadRequest)?;
    // The conversation (None: a raw prompt).
    let turns = match (body.prompt.as_ref(), body.messages) {
        (Some(_), None) if body.raw => None,
        (Some(p), None) => Some(vec![("user".to_owned(), p.clone())]),
        (None, Some(m)) if !body.raw => {
            if m.is_empty() {
                return Err(ApiError::BadRequest("messages: give at least one message".into()));
            }
            if let Some(bad) = m.iter().find(|m| !tuneforge_core::generate::is_chat_role(&m.role)) {
                return Err(ApiError::BadRequest(format!("messages: unknown role `{}`", bad.role)));
            }
            Some(m.into_iter().map(|m| (m.role, m.content)).collect::<Vec<_>>())
        }
        (None, Some(_)) => return Err(ApiError::BadRequest("raw: applies to `prompt`, not `messages`".into())),
        _ => return Err(ApiError::BadRequest("give exactly one of `prompt` and `messages`".into())),
    };
    let (generator, recording) = match body.model {
        Some(name) => {
            let Some(turns) = turns.clone() else {
                return Err(ApiError::BadRequest(
                    "raw: a registered model answers conversations (its corrected answers become instruction \
                     data); send `prompt` or `messages` without `raw`"
                        .into(),
                ));
            };
            let (lm, recording) = registered(&state, name, body.version, body.session.as_deref(), turns).await?;
            (lm, Some(recording))
        }
        None => {
            if body.version.is_some() || body.session.is_some() {
                return Err(ApiError::BadRequest("version, session: apply to a registered `model`".into()));
            }
            let Some(generator) = state.generator.clone() else {
                return Err(ApiError::NotFound(
                    "no text generator is loaded: give a registered `model`, or start the server with \
                     `tuneforge serve --generator SOURCE`"
                        .into(),
                ));
            };
            (generator, None)
        }
    };
    let prompt = match &turns {
        Some(turns) => generator.lm.chat.render(turns),
        None => body.prompt.unwrap_or_default(),
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::BadRequest("prompt: is empty".into()));
    }
    if body.stream {
        return Ok(stream_events(state, generator, prompt, sampling, recording));
    }
    let (out, seconds) = run_turn(generator, prompt, sampling).await?;
    let mut answer = summary(&state, &out, seconds, recording).await?;
    answer["text"] = serde_json::json!(out.text);
    Ok(HttpResponse::Ok().json(answer))
}

/// One generation (batched with whatever else the model is asked meanwhile); the seconds it
/// took, waiting included.
pub(crate) async fn run_turn(
    generator: Arc<GenerationBatcher>,
    prompt: String,
    sampling: Sampling,
) -> Result<(Generated, f64), ApiError> {
    let started = Instant::now();
    let out = generator.generate(prompt, sampling, Box::new(|_| {})).await.map_err(ApiError::BadRequest)?;
    Ok((out, started.elapsed().as_secs_f64()))
}

/// The dashboard's playground: one user message answered by a registered language model's
/// production version (greedy, the API's default length and repetition penalty), recorded;
/// the prediction's id.
pub(crate) async fn answer_recorded(state: &State, name: &str, text: String) -> Result<String, ApiError> {
    let (version, lm) = load(state, name, None).await?;
    let turns = vec![("user".to_owned(), text)];
    let prompt = lm.lm.chat.render(&turns);
    let sampling =
        Sampling { max_new_tokens: default_max_tokens(), repetition_penalty: default_penalty(), ..Sampling::default() };
    let (out, seconds) = run_turn(lm, prompt, sampling).await?;
    let recording = Recording { name: name.to_owned(), version, arm: None, turns };
    let answer = summary(state, &out, seconds, Some(recording)).await?;
    Ok(answer["id"].as_str().unwrap_or_default().to_owned())
}

/// The counts of a finished generation, recorded as a prediction (its `id` in the answer)
/// when a registered model gave it.
pub(crate) async fn summary(
    state: &State,
    out: &Generated,
    seconds: f64,
    recording: Option<Recording>,
) -> Result<serde_json::Value, ApiError> {
    let name = recording.as_ref().map_or_else(|| state.generator_name.clone().unwrap_or_default(), |r| r.name.clone());
    state.counters.generation(&name, out.prompt_tokens as u64, out.ids.len() as u64, out.prompt_seconds);
    let mut answer = serde_json::json!({
        "model": state.generator_name,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.ids.len(),
        "stopped": out.stopped,
        "tokens_per_s": out.tokens_per_s(),
        "seconds": seconds,
    });
    if let Some(r) = recording {
        let arm = r.arm.unwrap_or("none");
        state.counters.inference(&r.name, r.version, arm, seconds);
        state.counters.prediction(&r.name, 1);
        let messages: Vec<serde_json::Value> = tuneforge_core::generate::messages_json(&r.turns);
        let id = state
            .store
            .record_prediction(&NewPrediction {
                model_name: r.name.clone(),
                model_version: r.version,
                // The question as people read it; the whole conversation in the details.
                input: r.turns.iter().rev().find(|(role, _)| role == "user").map_or_else(String::new, |t| t.1.clone()),
                output: out.text.clone(),
                probabilities: serde_json::json!({
                    "messages": messages,
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.ids.len(),
                }),
                latency_ms: seconds * 1000.0,
                arm: r.arm.map(str::to_owned),
            })
            .await?;
        answer["model"] = serde_json::json!(r.name);
        answer["version"] = serde_json::json!(r.version);
        answer["id"] = serde_json::json!(id);
    }
    Ok(answer)
}

/// One server-sent event carrying `value`.
pub(crate) fn event(value: &serde_json::Value) -> web::Bytes {
    web::Bytes::from(format!("data: {value}\n\n"))
}

/// Streams a generation as server-sent events. The generation waits for its turn and runs on
/// the blocking pool; a client that goes away only loses the rest of the events.
fn stream_events(
    state: State,
    generator: Arc<GenerationBatcher>,
    prompt: String,
    sampling: Sampling,
    recording: Option<Recording>,
) -> HttpResponse {
    stream_with(
        state,
        generator,
        (prompt, sampling),
        recording,
        Vec::new(),
        |text| event(&serde_json::json!({ "text": text })),
        |end| {
            vec![event(&match end {
                Ok((_, mut counts)) => {
                    counts["done"] = serde_json::json!(true);
                    counts
                }
                Err(e) => serde_json::json!({ "error": e }),
            })]
        },
    )
}

/// Streams a generation as server-sent events: `first` before the generation starts, then
/// `piece` turns each piece of text into an event, `end` the outcome — the generation and its
/// [`summary`], or the error — into the last ones. The generation waits for its turn and runs on the blocking pool; a client that
/// goes away only loses the rest of the events.
pub(crate) fn stream_with(
    state: State,
    generator: Arc<GenerationBatcher>,
    (prompt, sampling): (String, Sampling),
    recording: Option<Recording>,
    first: Vec<web::Bytes>,
    piece: impl Fn(&str) -> web::Bytes + Send + 'static,
    end: impl FnOnce(Result<(Generated, serde_json::Value), String>) -> Vec<web::Bytes> + 'static,
) -> HttpResponse {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<web::Bytes>();
    for bytes in first {
        let _ = tx.send(bytes);
    }
    actix_web::rt::spawn(async move {
        let started = Instant::now();
        let pieces = tx.clone();
        let on_piece = Box::new(move |text: &str| {
            let _ = pieces.send(piece(text));
        });
        let outcome = match generator.generate(prompt, sampling, on_piece).await {
            Ok(out) => match summary(&state, &out, started.elapsed().as_secs_f64(), recording).await {
                Ok(counts) => Ok((out, counts)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e),
        };
        for bytes in end(outcome) {
            let _ = tx.send(bytes);
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, actix_web::Error>(bytes), rx))
    });
    HttpResponse::Ok().content_type("text/event-stream").insert_header(("Cache-Control", "no-cache")).streaming(body)
}
