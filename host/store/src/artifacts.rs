//! Artifacts: the files a run produced, with their size and SHA-256.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub run_id: String,
    /// e.g. `model`, `tokenizer`, `config`, `summary`, `metrics`.
    pub kind: String,
    pub path: String,
    pub sha256: String,
    pub bytes: i64,
}

impl Store {
    /// Records (or updates) an artifact of a run.
    pub async fn record_artifact(&self, a: &Artifact) -> Result<()> {
        sqlx::query(
            "INSERT INTO artifacts (run_id, kind, path, sha256, bytes) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (run_id, path) DO UPDATE SET kind = excluded.kind, sha256 = excluded.sha256, bytes = excluded.bytes",
        )
        .bind(&a.run_id)
        .bind(&a.kind)
        .bind(&a.path)
        .bind(&a.sha256)
        .bind(a.bytes)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn artifacts(&self, run_id: &str) -> Result<Vec<Artifact>> {
        let rows =
            sqlx::query("SELECT run_id, kind, path, sha256, bytes FROM artifacts WHERE run_id = $1 ORDER BY path")
                .bind(run_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(Artifact {
                    run_id: r.try_get("run_id")?,
                    kind: r.try_get("kind")?,
                    path: r.try_get("path")?,
                    sha256: r.try_get("sha256")?,
                    bytes: r.try_get("bytes")?,
                })
            })
            .collect()
    }
}
