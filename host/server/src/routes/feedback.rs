//! `POST /api/v1/feedback` (rate or correct a prediction), `GET /api/v1/feedback`, and
//! `GET /api/v1/feedback/export`: the corrections as a JSONL dataset for `tuneforge train`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tuneforge_store::NewFeedback;

use super::State;
use crate::ApiError;
use crate::auth::require_token;
use crate::error::parse_json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    prediction_id: String,
    rating: String,
    #[serde(default)]
    corrected_label: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    author: Option<String>,
}

pub async fn create(req: HttpRequest, state: State, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    require_token(&req, &state)?;
    let b: FeedbackBody = parse_json(&body)?;
    let b_prediction = b.prediction_id.clone();
    if b.comment.as_ref().is_some_and(|c| c.len() > 10_000) {
        return Err(ApiError::BadRequest("comment: at most 10000 bytes".into()));
    }
    if b.corrected_label.as_ref().is_some_and(|c| c.len() > 20_000) {
        return Err(ApiError::BadRequest("corrected_label: at most 20000 bytes".into()));
    }
    let id = state
        .store
        .record_feedback(&NewFeedback {
            prediction_id: b.prediction_id.clone(),
            rating: b.rating.clone(),
            corrected_label: b.corrected_label,
            comment: b.comment,
            author: b.author,
        })
        .await?;
    state.counters.feedback(&b.rating);
    let decided = decide_after_feedback(&state.store, &b_prediction).await;
    Ok(HttpResponse::Created().json(serde_json::json!({ "id": id, "ab_decision": decided })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    model: Option<String>,
    limit: Option<i64>,
}

pub async fn list(state: State, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.list_feedback(q.model.as_deref(), q.limit.unwrap_or(100)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    #[serde(default)]
    model: Option<String>,
    /// `true`: only reviewed feedback; `false`: only unreviewed; absent: all.
    #[serde(default)]
    reviewed: Option<bool>,
}

/// One JSONL line per usable piece of feedback: `{"text", "label", "rating", "prediction_id"}`
/// with the corrected label for a wrong answer and the model's answer for a correct one
/// (wrong answers without a correction are left out). A language model's answer becomes a
/// conversation instead, `{"messages": [..., {"role": "assistant", "content": answer}],
/// "rating", "prediction_id"}`: instruction data for `tuneforge train`.
pub async fn export(state: State, q: web::Query<ExportQuery>) -> Result<HttpResponse, ApiError> {
    let filter = tuneforge_store::FeedbackFilter {
        model: q.model.clone().filter(|m| !m.is_empty()),
        reviewed: q.reviewed,
        limit: 100_000,
        ..Default::default()
    };
    let mut out = String::new();
    for f in state.store.feedback(&filter).await? {
        let Some(answer) = f.target() else { continue };
        let line = match f.conversation() {
            Some(turns) => {
                let mut messages: Vec<serde_json::Value> = tuneforge_core::generate::messages_json(&turns);
                messages.push(serde_json::json!({"role": "assistant", "content": answer}));
                serde_json::json!({ "messages": messages, "rating": f.rating, "prediction_id": f.prediction_id })
            }
            None => {
                serde_json::json!({ "text": f.input, "label": answer, "rating": f.rating, "prediction_id": f.prediction_id })
            }
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("Content-Disposition", "attachment; filename=\"feedback.jsonl\""))
        .body(out))
}

/// Applies the automatic A/B rule of the prediction's model (a failure is logged: the
/// feedback itself is recorded either way). Returns the test it ended, if any.
pub async fn decide_after_feedback(
    store: &tuneforge_store::Store,
    prediction_id: &str,
) -> Option<tuneforge_store::AbTest> {
    // Only feedback on a prediction served in an A/B arm changes a test's figures.
    let row = store.prediction(prediction_id).await.ok()?.0;
    row.arm.as_ref()?;
    let model = row.model_name;
    match store.decide_ab(&model).await {
        Ok(decided) => decided,
        Err(e) => {
            tracing::warn!(model = %model, "automatic A/B decision failed: {e}");
            None
        }
    }
}
