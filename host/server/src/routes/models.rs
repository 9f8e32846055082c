//! The registry: `GET/POST /api/v1/models`, `POST /models/{name}/promote|rollback`,
//! `GET /events`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::State;
use crate::ApiError;
use crate::auth::require_token;
use crate::error::parse_json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameQuery {
    name: Option<String>,
}

pub async fn list(state: State, q: web::Query<NameQuery>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.list_models(q.name.as_deref()).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    name: String,
    run_id: String,
    #[serde(default)]
    actor: Option<String>,
}

pub async fn register(req: HttpRequest, state: State, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let body: Register = parse_json(&body)?;
    let run = state.store.get_run(&body.run_id).await?;
    let best = std::path::Path::new(&run.run_dir).join("best");
    if !tuneforge_core::is_model_dir(&best) {
        return Err(ApiError::BadRequest(format!("run_id: run {} has no best model", body.run_id)));
    }
    let metrics = run.summary.as_ref().and_then(tuneforge_core::registration_metrics);
    let actor = body.actor.as_deref().unwrap_or("api");
    let v = state
        .store
        .register_model(&body.name, &body.run_id, &best.display().to_string(), metrics.as_ref(), actor)
        .await?;
    Ok(HttpResponse::Created().json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promote {
    version: i64,
    #[serde(default)]
    actor: Option<String>,
}

pub async fn promote(
    req: HttpRequest,
    state: State,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let body: Promote = parse_json(&body)?;
    let v = state.store.promote(&name, body.version, body.actor.as_deref().unwrap_or("api")).await?;
    Ok(HttpResponse::Ok().json(v))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    #[serde(default)]
    actor: Option<String>,
}

pub async fn rollback(
    req: HttpRequest,
    state: State,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let body: Rollback = if body.is_empty() { Rollback::default() } else { parse_json(&body)? };
    let actor = body.actor.unwrap_or_else(|| "api".into());
    let v = state.store.rollback(&name, &actor).await?;
    Ok(HttpResponse::Ok().json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    subject: Option<String>,
    limit: Option<i64>,
}

pub async fn events(state: State, q: web::Query<EventsQuery>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.events(q.subject.as_deref(), q.limit.unwrap_or(100)).await?))
}
