//! Predictions made by served models and the feedback people give on them.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::store::{new_id, now_ms};
use crate::{Result, Store, StoreError};

#[derive(Debug, Clone)]
pub struct NewPrediction {
    pub model_name: String,
    pub model_version: i64,
    pub input: String,
    pub output: String,
    pub probabilities: serde_json::Value,
    pub latency_ms: f64,
    pub arm: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRow {
    pub id: String,
    pub model_name: String,
    pub model_version: i64,
    pub input: String,
    pub output: String,
    pub latency_ms: f64,
    pub arm: Option<String>,
    pub time_ms: i64,
}

#[derive(Debug, Clone)]
pub struct NewFeedback {
    pub prediction_id: String,
    /// `correct` or `wrong`.
    pub rating: String,
    pub corrected_label: Option<String>,
    pub comment: Option<String>,
    pub author: Option<String>,
}

/// Which feedback to list.
#[derive(Debug, Clone, Default)]
pub struct FeedbackFilter {
    pub model: Option<String>,
    /// The corrected label, or the model's answer when none was given.
    pub label: Option<String>,
    /// `correct` or `wrong`.
    pub rating: Option<String>,
    pub reviewed: Option<bool>,
    pub limit: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRow {
    pub id: String,
    pub prediction_id: String,
    pub rating: String,
    pub corrected_label: Option<String>,
    pub comment: Option<String>,
    pub author: Option<String>,
    pub reviewed: bool,
    pub time_ms: i64,
    /// The text the prediction was made on and what the model answered.
    pub input: String,
    pub output: String,
    pub model_name: String,
    /// What the model gave beside its answer: a classifier's probabilities, a language
    /// model's conversation (`messages`, the turns it answered) and token counts.
    #[serde(default)]
    pub details: serde_json::Value,
}

impl FeedbackRow {
    /// What the model should have answered: the correction, else its own answer when rated
    /// correct; `None` for a wrong answer without a correction (or an empty one).
    pub fn target(&self) -> Option<&str> {
        let target = match (&self.corrected_label, self.rating.as_str()) {
            (Some(c), _) => c,
            (None, "correct") => &self.output,
            _ => return None,
        };
        (!target.trim().is_empty()).then_some(target.as_str())
    }

    /// The conversation a language model answered (`role`, `content` turns), when the
    /// prediction is a generation.
    pub fn conversation(&self) -> Option<Vec<(String, String)>> {
        self.details["messages"]
            .as_array()?
            .iter()
            .map(|m| Some((m["role"].as_str()?.to_owned(), m["content"].as_str()?.to_owned())))
            .collect()
    }
}

impl Store {
    pub async fn record_prediction(&self, p: &NewPrediction) -> Result<String> {
        let id = new_id();
        sqlx::query(
            "INSERT INTO predictions (id, model_name, model_version, input, output, probabilities, latency_ms, arm, time_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&id)
        .bind(&p.model_name)
        .bind(p.model_version)
        .bind(&p.input)
        .bind(&p.output)
        .bind(p.probabilities.to_string())
        .bind(p.latency_ms)
        .bind(&p.arm)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// Stores feedback on a prediction that exists.
    pub async fn record_feedback(&self, f: &NewFeedback) -> Result<String> {
        if f.rating != "correct" && f.rating != "wrong" {
            return Err(StoreError::Invalid(format!("rating must be `correct` or `wrong`, got `{}`", f.rating)));
        }
        let exists = sqlx::query("SELECT 1 AS one FROM predictions WHERE id = $1")
            .bind(&f.prediction_id)
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        if !exists {
            return Err(StoreError::NotFound { kind: "prediction", id: f.prediction_id.clone() });
        }
        let id = new_id();
        sqlx::query(
            "INSERT INTO feedback (id, prediction_id, rating, corrected_label, comment, author, reviewed, time_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, FALSE, $7)",
        )
        .bind(&id)
        .bind(&f.prediction_id)
        .bind(&f.rating)
        .bind(&f.corrected_label)
        .bind(&f.comment)
        .bind(&f.author)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// Feedback, newest first, optionally for one model only.
    pub async fn list_feedback(&self, model_name: Option<&str>, limit: i64) -> Result<Vec<FeedbackRow>> {
        let filter = FeedbackFilter { model: model_name.map(str::to_owned), limit, ..Default::default() };
        self.feedback(&filter).await
    }

    /// Feedback, newest first, filtered by model, label (the corrected label, else the
    /// model's answer), rating and review state.
    pub async fn feedback(&self, f: &FeedbackFilter) -> Result<Vec<FeedbackRow>> {
        let reviewed = f.reviewed.map(i64::from);
        let rows = sqlx::query(
            "SELECT f.id, f.prediction_id, f.rating, f.corrected_label, f.comment, f.author, \
             CAST(CASE WHEN f.reviewed THEN 1 ELSE 0 END AS BIGINT) AS reviewed, f.time_ms, \
             p.input, p.output, p.model_name, p.probabilities FROM feedback f JOIN predictions p ON p.id = f.prediction_id \
             WHERE (CAST($1 AS TEXT) IS NULL OR p.model_name = $1) \
             AND (CAST($3 AS TEXT) IS NULL OR COALESCE(f.corrected_label, p.output) = $3) \
             AND (CAST($4 AS TEXT) IS NULL OR f.rating = $4) \
             AND (CAST($5 AS BIGINT) IS NULL OR (CASE WHEN f.reviewed THEN 1 ELSE 0 END) = $5) \
             ORDER BY f.time_ms DESC, f.id DESC LIMIT $2",
        )
        .bind(f.model.as_deref())
        .bind(f.limit.clamp(1, 100_000))
        .bind(f.label.as_deref())
        .bind(f.rating.as_deref())
        .bind(reviewed)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FeedbackRow {
                    id: r.try_get("id")?,
                    prediction_id: r.try_get("prediction_id")?,
                    rating: r.try_get("rating")?,
                    corrected_label: r.try_get("corrected_label")?,
                    comment: r.try_get("comment")?,
                    author: r.try_get("author")?,
                    // Booleans decode differently per backend through `Any`; read an integer.
                    reviewed: r.try_get::<i64, _>("reviewed")? != 0,
                    time_ms: r.try_get("time_ms")?,
                    input: r.try_get("input")?,
                    output: r.try_get("output")?,
                    model_name: r.try_get("model_name")?,
                    details: serde_json::from_str(&r.try_get::<String, _>("probabilities")?)
                        .unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }

    /// Marks feedback as reviewed (audited).
    pub async fn mark_feedback_reviewed(&self, id: &str, actor: &str) -> Result<()> {
        let done =
            sqlx::query("UPDATE feedback SET reviewed = TRUE WHERE id = $1").bind(id).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { kind: "feedback", id: id.to_owned() });
        }
        self.record_event("review", id, "feedback marked reviewed", actor).await
    }

    /// One prediction with its probabilities.
    pub async fn prediction(&self, id: &str) -> Result<(PredictionRow, serde_json::Value)> {
        let row = sqlx::query(
            "SELECT id, model_name, model_version, input, output, probabilities, latency_ms, arm, time_ms \
             FROM predictions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound { kind: "prediction", id: id.to_owned() })?;
        let probabilities: String = row.try_get("probabilities")?;
        Ok((
            PredictionRow {
                id: row.try_get("id")?,
                model_name: row.try_get("model_name")?,
                model_version: row.try_get("model_version")?,
                input: row.try_get("input")?,
                output: row.try_get("output")?,
                latency_ms: row.try_get("latency_ms")?,
                arm: row.try_get("arm")?,
                time_ms: row.try_get("time_ms")?,
            },
            serde_json::from_str(&probabilities).unwrap_or(serde_json::Value::Null),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rating: &str, output: &str, corrected: Option<&str>, details: serde_json::Value) -> FeedbackRow {
        FeedbackRow {
            id: "f".into(),
            prediction_id: "p".into(),
            rating: rating.into(),
            corrected_label: corrected.map(str::to_owned),
            comment: None,
            author: None,
            reviewed: true,
            time_ms: 0,
            input: "q".into(),
            output: output.into(),
            model_name: "m".into(),
            details,
        }
    }

    #[test]
    fn the_target_is_the_correction_or_an_approved_answer() {
        let none = serde_json::Value::Null;
        assert_eq!(row("wrong", "flu", Some("acne"), none.clone()).target(), Some("acne"));
        assert_eq!(row("correct", "flu", None, none.clone()).target(), Some("flu"));
        assert_eq!(row("wrong", "flu", None, none.clone()).target(), None);
        // An empty answer teaches nothing, approved or written.
        assert_eq!(row("correct", " ", None, none.clone()).target(), None);
        assert_eq!(row("wrong", "flu", Some(""), none).target(), None);
    }

    #[test]
    fn a_generation_carries_its_conversation() {
        let details =
            serde_json::json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]});
        let turns = row("correct", "a", None, details).conversation().expect("turns");
        assert_eq!(turns, vec![("system".to_owned(), "s".to_owned()), ("user".to_owned(), "u".to_owned())]);
        // A classifier's probabilities, or a malformed turn, are no conversation.
        assert_eq!(row("correct", "a", None, serde_json::json!({"flu": 0.9})).conversation(), None);
        assert_eq!(row("correct", "a", None, serde_json::json!({"messages": [{"role": 1}]})).conversation(), None);
    }
}
