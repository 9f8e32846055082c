//! Metric series: (run, key, step) -> value, written in batches, read back downsampled.

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Row};

use crate::{Result, Store};

/// One logged value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub run_id: String,
    pub key: String,
    pub step: i64,
    pub value: f64,
    pub time_ms: i64,
}

/// A point of a (possibly downsampled) series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    pub step: i64,
    pub value: f64,
}

/// Rows per INSERT statement (5 parameters each, far below SQLite's parameter limit).
const ROWS_PER_INSERT: usize = 200;

impl Store {
    /// Writes points in one transaction (a point logged twice for a step keeps the last value).
    pub async fn append_metrics(&self, points: &[MetricPoint]) -> Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in points.chunks(ROWS_PER_INSERT) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| format!("(${}, ${}, ${}, ${}, ${})", 5 * i + 1, 5 * i + 2, 5 * i + 3, 5 * i + 4, 5 * i + 5))
                .collect();
            let sql = format!(
                "INSERT INTO metrics (run_id, key, step, value, time_ms) VALUES {} \
                 ON CONFLICT (run_id, key, step) DO UPDATE SET value = excluded.value, time_ms = excluded.time_ms",
                values.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql.as_str()));
            for p in chunk {
                q = q.bind(&p.run_id).bind(&p.key).bind(p.step).bind(p.value).bind(p.time_ms);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The keys a run has logged.
    pub async fn metric_keys(&self, run_id: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT DISTINCT key FROM metrics WHERE run_id = $1 ORDER BY key")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("key")?)).collect()
    }

    /// A series in step order; with more than `max_points` points, steps are grouped into
    /// equal buckets and each bucket gives its first step and mean value.
    pub async fn metric_series(&self, run_id: &str, key: &str, max_points: i64) -> Result<Vec<SeriesPoint>> {
        let stats = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(step) AS lo, MAX(step) AS hi FROM metrics WHERE run_id = $1 AND key = $2",
        )
        .bind(run_id)
        .bind(key)
        .fetch_one(&self.pool)
        .await?;
        let n: i64 = stats.try_get("n")?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let (lo, hi): (i64, i64) = (stats.try_get("lo")?, stats.try_get("hi")?);
        let max_points = max_points.max(1);
        let rows = if n <= max_points {
            sqlx::query("SELECT step, value FROM metrics WHERE run_id = $1 AND key = $2 ORDER BY step")
                .bind(run_id)
                .bind(key)
                .fetch_all(&self.pool)
                .await?
        } else {
            let bucket = ((hi - lo) / max_points + 1).max(1);
            sqlx::query(
                "SELECT MIN(step) AS step, AVG(value) AS value FROM metrics WHERE run_id = $1 AND key = $2 \
                 GROUP BY (step - $3) / $4 ORDER BY MIN(step)",
            )
            .bind(run_id)
            .bind(key)
            .bind(lo)
            .bind(bucket)
            .fetch_all(&self.pool)
            .await?
        };
        rows.iter().map(|r| Ok(SeriesPoint { step: r.try_get("step")?, value: r.try_get("value")? })).collect()
    }
}
