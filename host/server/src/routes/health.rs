//! `/healthz` and `/metrics`.

use actix_web::HttpResponse;
use tuneforge_store::{RunFilter, RunStatus};

use super::State;
use crate::ApiError;

pub async fn healthz(state: State) -> Result<HttpResponse, ApiError> {
    state.store.list_runs(&RunFilter { limit: 1, ..Default::default() }).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ok" })))
}

pub async fn metrics(state: State) -> Result<HttpResponse, ApiError> {
    let mut out = String::new();
    state.counters.render(&mut out);
    out.push_str("# HELP tuneforge_runs Training runs in the store by status.\n# TYPE tuneforge_runs gauge\n");
    for status in [RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Interrupted] {
        let (_, n) = state.store.list_runs(&RunFilter { status: Some(status), limit: 1, ..Default::default() }).await?;
        out.push_str(&format!("tuneforge_runs{{status=\"{}\"}} {n}\n", status.as_str()));
    }
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out))
}
