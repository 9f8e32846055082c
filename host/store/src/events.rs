//! The audit trail: who did what to which run or model, and when.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::store::{new_id, now_ms};
use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub detail: String,
    pub actor: String,
    pub time_ms: i64,
}

impl Store {
    pub async fn record_event(&self, kind: &str, subject: &str, detail: &str, actor: &str) -> Result<()> {
        sqlx::query("INSERT INTO events (id, kind, subject, detail, actor, time_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(new_id())
            .bind(kind)
            .bind(subject)
            .bind(detail)
            .bind(actor)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The newest events first, optionally only those about `subject`.
    pub async fn events(&self, subject: Option<&str>, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT id, kind, subject, detail, actor, time_ms FROM events WHERE (CAST($1 AS TEXT) IS NULL OR subject = $1) \
             ORDER BY time_ms DESC, id DESC LIMIT $2",
        )
        .bind(subject)
        .bind(limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    subject: r.try_get("subject")?,
                    detail: r.try_get("detail")?,
                    actor: r.try_get("actor")?,
                    time_ms: r.try_get("time_ms")?,
                })
            })
            .collect()
    }
}
