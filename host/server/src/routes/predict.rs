//! `POST /api/v1/predict`: classify texts with a registered model (its production version
//! unless a version is given), loaded once and kept warm; every prediction is recorded.

use std::sync::Arc;
use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tuneforge_plugin_runtime::{PluginRuntime, Predictor};

use crate::batcher::Batcher;
use tuneforge_store::NewPrediction;

use super::State;
use crate::ApiError;
use crate::auth::require_token;
use crate::error::parse_json;

/// The most texts one request may carry.
const MAX_TEXTS: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictBody {
    model: String,
    #[serde(default)]
    version: Option<i64>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    texts: Option<Vec<String>>,
    /// A stable key of the user's session: with an A/B test running, it decides (stickily)
    /// whether the production or the candidate version answers.
    #[serde(default)]
    session: Option<String>,
}

/// The registered version that answers: `version` when given, else production.
pub(crate) async fn model_version(
    state: &State,
    name: &str,
    version: Option<i64>,
) -> Result<tuneforge_store::ModelVersion, ApiError> {
    Ok(match version {
        Some(v) => state.store.model_version(name, v).await?,
        None => state.store.production(name).await?.ok_or_else(|| {
            ApiError::NotFound(format!("model `{name}` has no production version (promote one, or give `version`)"))
        })?,
    })
}

/// Which version answers a session: with a running A/B test, a session key and no pinned
/// version, the session's arm decides (stickily); otherwise `version` (production when
/// `None`), outside any arm.
pub(crate) async fn route(
    state: &State,
    name: &str,
    version: Option<i64>,
    session: Option<&str>,
) -> Result<(Option<i64>, Option<&'static str>), ApiError> {
    Ok(match (version, session) {
        (None, Some(session)) if !session.is_empty() => match state.store.running_ab(name).await? {
            Some(test) => {
                let arm = tuneforge_store::assign_arm(&test.id, session, test.share);
                let v = if arm == "candidate" { test.candidate_version } else { test.production_version };
                (Some(v), Some(arm))
            }
            None => (None, None),
        },
        _ => (version, None),
    })
}

async fn load(state: &State, name: &str, version: Option<i64>) -> Result<(i64, Arc<Batcher>), ApiError> {
    let v = model_version(state, name, version).await?;
    let key = (v.name.clone(), v.version);
    if let Some(m) = state.models.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok((v.version, m.clone()));
    }
    let path = std::path::PathBuf::from(&v.path);
    if tuneforge_core::generate::is_language_model(&path) {
        return Err(ApiError::BadRequest(format!(
            "model `{name}` is a language model: ask it with POST /api/v1/generate"
        )));
    }
    let runtime = match state.plugins.get() {
        Some(r) => r.clone(),
        None => {
            let r = PluginRuntime::new().map_err(|e| ApiError::Internal(e.to_string()))?;
            state.plugins.get_or_init(|| r).clone()
        }
    };
    let device = state.device.clone();
    let predictor = web::block(move || Predictor::load_on(&runtime, &path, &device))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let model = Arc::new(
        Batcher::start(Arc::new(predictor), state.batch_policy, state.counters.clone(), v.name.clone(), v.version)
            .map_err(|e| ApiError::Internal(format!("cannot start the batch worker: {e}")))?,
    );
    state.models.lock().unwrap_or_else(|e| e.into_inner()).insert(key, model.clone());
    Ok((v.version, model))
}

pub async fn predict(req: HttpRequest, state: State, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let body: PredictBody = parse_json(&body)?;
    let texts = match (body.text, body.texts) {
        (Some(t), None) => vec![t],
        (None, Some(ts)) => ts,
        _ => return Err(ApiError::BadRequest("give exactly one of `text` and `texts`".into())),
    };
    if texts.is_empty() || texts.len() > MAX_TEXTS {
        return Err(ApiError::BadRequest(format!("texts: give 1 to {MAX_TEXTS} texts, got {}", texts.len())));
    }
    if texts.iter().any(|t| t.trim().is_empty()) {
        return Err(ApiError::BadRequest("texts: a text is empty".into()));
    }
    let (version, recorded) =
        predict_and_record(&state, &body.model, body.version, texts, body.session.as_deref()).await?;
    let out: Vec<serde_json::Value> = recorded
        .into_iter()
        .map(|(id, text, p, probabilities)| {
            serde_json::json!({ "id": id, "text": text, "label": p.label, "score": p.score, "probabilities": probabilities })
        })
        .collect();
    let n = out.len() as u64;
    state.counters.prediction(&body.model, n);
    Ok(HttpResponse::Ok().json(serde_json::json!({ "model": body.model, "version": version, "predictions": out })))
}

/// One recorded prediction: its id, the text, the answer and the probabilities as JSON.
pub type Recorded = (String, String, tuneforge_core::Prediction, serde_json::Value);

/// Classifies `texts` with a model version (production unless given) and records every
/// prediction; shared by the REST API and the dashboard's playground.
pub async fn predict_and_record(
    state: &State,
    model_name: &str,
    version: Option<i64>,
    texts: Vec<String>,
    session: Option<&str>,
) -> Result<(i64, Vec<Recorded>), ApiError> {
    let (version, arm) = route(state, model_name, version, session).await?;
    let (version, model) = load(state, model_name, version).await?;
    let started = Instant::now();
    let predictions = model.predict(texts.clone()).await.map_err(ApiError::Internal)?;
    let seconds = started.elapsed().as_secs_f64();
    state.counters.inference(model_name, version, arm.unwrap_or("none"), seconds);
    let latency_ms = seconds * 1000.0 / texts.len().max(1) as f64;
    let mut out = Vec::with_capacity(texts.len());
    for (text, p) in texts.into_iter().zip(predictions) {
        let probabilities: serde_json::Map<String, serde_json::Value> =
            p.probabilities.iter().map(|(l, v)| (l.clone(), serde_json::json!(v))).collect();
        let probabilities = serde_json::Value::Object(probabilities);
        let id = state
            .store
            .record_prediction(&NewPrediction {
                model_name: model_name.to_owned(),
                model_version: version,
                input: text.clone(),
                output: p.label.clone(),
                probabilities: probabilities.clone(),
                latency_ms,
                arm: arm.map(str::to_owned),
            })
            .await?;
        out.push((id, text, p, probabilities));
    }
    Ok((version, out))
}
