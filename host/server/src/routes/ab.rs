//! A/B tests: `GET /api/v1/ab` (tests with per-arm figures and the verdict so far),
//! `POST /api/v1/ab` (start one; token), `POST /api/v1/ab/{id}/stop` (promote the candidate,
//! roll it back, or just stop; token).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tuneforge_store::{AbTest, MIN_RATED, verdict, wilson};

use super::State;
use crate::ApiError;
use crate::auth::require_token;
use crate::error::parse_json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    model: Option<String>,
}

/// A test with its arms' figures, as JSON.
pub async fn describe(state: &State, t: &AbTest) -> Result<serde_json::Value, ApiError> {
    let (production, candidate) = state.store.ab_stats(t).await?;
    let arm = |a: &tuneforge_store::ArmStats| {
        let acc = wilson(a.correct, a.rated);
        serde_json::json!({
            "predictions": a.predictions, "rated": a.rated, "correct": a.correct,
            "accuracy": acc.map(|x| x.0), "accuracy_95": acc.map(|x| [x.1, x.2]),
            "mean_latency_ms": a.mean_latency_ms,
        })
    };
    let (so_far, z) = verdict(&production, &candidate, MIN_RATED);
    Ok(serde_json::json!({
        "test": t, "production": arm(&production), "candidate": arm(&candidate),
        "verdict": so_far, "z": z, "min_rated": MIN_RATED,
    }))
}

pub async fn list(state: State, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let mut out = Vec::new();
    for t in state.store.ab_tests(q.model.as_deref()).await? {
        out.push(describe(&state, &t).await?);
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "tests": out })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    model: String,
    candidate: i64,
    share: f64,
    /// Let the server promote or roll back on its own once the verdict is significant
    /// (default true).
    #[serde(default)]
    auto: Option<bool>,
    #[serde(default)]
    actor: Option<String>,
}

pub async fn start(req: HttpRequest, state: State, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let b: StartBody = parse_json(&body)?;
    let auto = b.auto.unwrap_or(true);
    let t = state.store.start_ab(&b.model, b.candidate, b.share, auto, b.actor.as_deref().unwrap_or("api")).await?;
    Ok(HttpResponse::Created().json(describe(&state, &t).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    /// `promote` (the candidate goes to production), `rollback` (production stays) or `stop`.
    action: String,
    #[serde(default)]
    actor: Option<String>,
}

pub async fn stop(
    req: HttpRequest,
    state: State,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let b: StopBody = parse_json(&body)?;
    let ended = state.store.conclude_ab(&id, &b.action, b.actor.as_deref().unwrap_or("api")).await?;
    Ok(HttpResponse::Ok().json(describe(&state, &ended).await?))
}
