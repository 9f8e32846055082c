//! `GET /api/v1/runs`, `/runs/{id}`, `/runs/{id}/series`, `/compare`.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use tuneforge_store::{RunFilter, RunSort, RunStatus};

use super::State;
use crate::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    name: Option<String>,
    #[serde(default)]
    sort: RunSort,
    #[serde(default)]
    order: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

pub async fn list(state: State, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let status = match &q.status {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!("status: `{s}` is not one of queued, running, succeeded, failed, interrupted"))
        })?),
    };
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => return Err(ApiError::BadRequest(format!("order: `{o}` is not asc or desc"))),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit: must be in 1..=1000, got {limit}")));
    }
    let offset = q.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::BadRequest("offset: must be >= 0".into()));
    }
    let filter = RunFilter { status, name: q.name.clone(), sort: q.sort, ascending, limit, offset };
    let (runs, total) = state.store.list_runs(&filter).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "total": total, "limit": limit, "offset": offset, "runs": runs })))
}

pub async fn get(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let run = state.store.get_run(&id).await?;
    let keys = state.store.metric_keys(&id).await?;
    let artifacts = state.store.artifacts(&id).await?;
    let plugins = state.store.run_plugins(&id).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "run": run, "metric_keys": keys, "artifacts": artifacts, "plugins": plugins,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    key: String,
    max_points: Option<i64>,
}

pub async fn series(state: State, id: web::Path<String>, q: web::Query<SeriesQuery>) -> Result<HttpResponse, ApiError> {
    let max_points = q.max_points.unwrap_or(500);
    if !(1..=100_000).contains(&max_points) {
        return Err(ApiError::BadRequest(format!("max_points: must be in 1..=100000, got {max_points}")));
    }
    state.store.get_run(&id).await?;
    let points = state.store.metric_series(&id, &q.key, max_points).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "run_id": *id, "key": q.key, "points": points })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareQuery {
    /// Comma-separated run ids.
    ids: String,
}

pub async fn compare(state: State, q: web::Query<CompareQuery>) -> Result<HttpResponse, ApiError> {
    let ids: Vec<&str> = q.ids.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if !(2..=5).contains(&ids.len()) {
        return Err(ApiError::BadRequest(format!("ids: give 2 to 5 comma-separated run ids, got {}", ids.len())));
    }
    let mut runs = Vec::new();
    for id in ids {
        runs.push(state.store.get_run(id).await?);
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "runs": runs })))
}
