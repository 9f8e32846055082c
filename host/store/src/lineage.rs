//! Lineage: the plugins each run called, with the exact component (SHA-256) and API version.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::{Result, Store};

/// One plugin a run called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPlugin {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub api_version: String,
}

impl Store {
    /// Records the plugins of a run (replacing what was recorded), in one transaction.
    pub async fn record_run_plugins(&self, run_id: &str, plugins: &[RunPlugin]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM run_plugins WHERE run_id = $1").bind(run_id).execute(&mut *tx).await?;
        for (i, p) in plugins.iter().enumerate() {
            sqlx::query(
                "INSERT INTO run_plugins (run_id, position, name, version, kind, sha256, api_version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(run_id)
            .bind(i as i64)
            .bind(&p.name)
            .bind(&p.version)
            .bind(&p.kind)
            .bind(&p.sha256)
            .bind(&p.api_version)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The plugins of a run, in the order it called them.
    pub async fn run_plugins(&self, run_id: &str) -> Result<Vec<RunPlugin>> {
        let rows = sqlx::query(
            "SELECT name, version, kind, sha256, api_version FROM run_plugins WHERE run_id = $1 ORDER BY position",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RunPlugin {
                    name: r.try_get("name")?,
                    version: r.try_get("version")?,
                    kind: r.try_get("kind")?,
                    sha256: r.try_get("sha256")?,
                    api_version: r.try_get("api_version")?,
                })
            })
            .collect()
    }

    /// The runs that called a plugin with this name (and hash, when given), newest first.
    pub async fn runs_with_plugin(&self, name: &str, sha256: Option<&str>) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT p.run_id, r.started_ms FROM run_plugins p JOIN runs r ON r.id = p.run_id \
             WHERE p.name = $1 AND ($2 = '' OR p.sha256 = $2) ORDER BY r.started_ms DESC",
        )
        .bind(name)
        .bind(sha256.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("run_id")?)).collect()
    }
}
