//! One module per resource; `configure` mounts them.

mod ab;
mod feedback;
mod generate;
mod health;
mod models;
mod openai;
mod openapi;
mod predict;

pub(crate) use predict::predict_and_record;

/// The dashboard's playground: `text` answered by `model`'s production version — a label from
/// a classifier, an answer from a language model — and recorded; the prediction's id.
pub(crate) async fn try_recorded(state: &State, model: &str, text: String) -> Result<String, ApiError> {
    let production = predict::model_version(state, model, None).await?;
    if tuneforge_core::generate::is_language_model(std::path::Path::new(&production.path)) {
        return generate::answer_recorded(state, model, text).await;
    }
    let (_, recorded) = predict_and_record(state, model, None, vec![text], None).await?;
    state.counters.prediction(model, 1);
    recorded.into_iter().next().map(|r| r.0).ok_or_else(|| ApiError::Internal("no prediction".into()))
}
mod runs;

use actix_web::{HttpResponse, web};

use crate::ApiError;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/metrics", web::get().to(health::metrics))
        .route("/v1/chat/completions", web::post().to(openai::chat_completions))
        .route("/v1/models", web::get().to(openai::models))
        .service(
            web::scope("/api/v1")
                .route("/openapi.json", web::get().to(openapi::document))
                .route("/runs", web::get().to(runs::list))
                .route("/runs/{id}", web::get().to(runs::get))
                .route("/runs/{id}/series", web::get().to(runs::series))
                .route("/compare", web::get().to(runs::compare))
                .route("/models", web::get().to(models::list))
                .route("/models", web::post().to(models::register))
                .route("/models/{name}/promote", web::post().to(models::promote))
                .route("/models/{name}/rollback", web::post().to(models::rollback))
                .route("/events", web::get().to(models::events))
                .route("/predict", web::post().to(predict::predict))
                .route("/generate", web::post().to(generate::generate))
                .route("/feedback", web::post().to(feedback::create))
                .route("/feedback", web::get().to(feedback::list))
                .route("/feedback/export", web::get().to(feedback::export))
                .route("/ab", web::get().to(ab::list))
                .route("/ab", web::post().to(ab::start))
                .route("/ab/{id}/stop", web::post().to(ab::stop)),
        )
        .default_service(web::to(not_found));
}

async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no such endpoint: {} {}", req.method(), req.path())))
}

/// The shared state (registered by `Application::build`).
pub(crate) type State = web::Data<AppState>;
