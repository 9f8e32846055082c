//! The model registry: versions of a named model, each from a run's best model, in a stage;
//! promotion and rollback are transactions that leave one production version (or none) and
//! an event in the audit trail.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::store::now_ms;
use crate::{Result, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Candidate,
    Production,
    Archived,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Candidate => "candidate",
            Self::Production => "production",
            Self::Archived => "archived",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "candidate" => Self::Candidate,
            "production" => Self::Production,
            "archived" => Self::Archived,
            other => return Err(StoreError::Invalid(format!("unknown stage `{other}`"))),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: i64,
    pub run_id: String,
    pub path: String,
    pub stage: Stage,
    pub metrics: Option<serde_json::Value>,
    pub created_ms: i64,
    pub promoted_ms: Option<i64>,
}

fn version_from_row(r: &AnyRow) -> Result<ModelVersion> {
    let stage: String = r.try_get("stage")?;
    let metrics: Option<String> = r.try_get("metrics")?;
    Ok(ModelVersion {
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        run_id: r.try_get("run_id")?,
        path: r.try_get("path")?,
        stage: Stage::parse(&stage)?,
        metrics: metrics.and_then(|m| serde_json::from_str(&m).ok()),
        created_ms: r.try_get("created_ms")?,
        promoted_ms: r.try_get("promoted_ms")?,
    })
}

const COLUMNS: &str = "name, version, run_id, path, stage, metrics, created_ms, promoted_ms";

impl Store {
    /// Registers a run's model as the next version of `name`, as a candidate.
    pub async fn register_model(
        &self,
        name: &str,
        run_id: &str,
        path: &str,
        metrics: Option<&serde_json::Value>,
        actor: &str,
    ) -> Result<ModelVersion> {
        if name.trim().is_empty() || name.len() > 128 {
            return Err(StoreError::Invalid("a model name must have 1 to 128 characters".into()));
        }
        self.get_run(run_id).await?;
        let mut tx = self.pool.begin().await?;
        let next: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM models WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?
            .try_get("v")?;
        sqlx::query(
            "INSERT INTO models (name, version, run_id, path, stage, metrics, created_ms) VALUES ($1, $2, $3, $4, 'candidate', $5, $6)",
        )
        .bind(name)
        .bind(next)
        .bind(run_id)
        .bind(path)
        .bind(metrics.map(serde_json::Value::to_string))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.record_event("register", &format!("{name}@{next}"), &format!("from run {run_id}"), actor).await?;
        self.model_version(name, next).await
    }

    pub async fn model_version(&self, name: &str, version: i64) -> Result<ModelVersion> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {COLUMNS} FROM models WHERE name = $1 AND version = $2")))
            .bind(name)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound { kind: "model version", id: format!("{name}@{version}") })?;
        version_from_row(&row)
    }

    /// Every version of every model (or of `name`), newest first.
    pub async fn list_models(&self, name: Option<&str>) -> Result<Vec<ModelVersion>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM models WHERE (CAST($1 AS TEXT) IS NULL OR name = $1) ORDER BY name, version DESC"
        )))
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    /// The production version of `name`, if any.
    pub async fn production(&self, name: &str) -> Result<Option<ModelVersion>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM models WHERE name = $1 AND stage = 'production'"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    /// Makes `version` the production version of `name`; the previous one is archived.
    pub async fn promote(&self, name: &str, version: i64, actor: &str) -> Result<ModelVersion> {
        let target = self.model_version(name, version).await?;
        if target.stage == Stage::Production {
            return Ok(target);
        }
        let previous = self.production(name).await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE models SET stage = 'archived' WHERE name = $1 AND stage = 'production'")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE models SET stage = 'production', promoted_ms = $3 WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let detail = match previous {
            Some(p) => format!("version {version} replaces version {}", p.version),
            None => format!("version {version} is the first in production"),
        };
        self.record_event("promote", &format!("{name}@{version}"), &detail, actor).await?;
        self.model_version(name, version).await
    }

    /// Puts back the version that was in production before the current one.
    pub async fn rollback(&self, name: &str, actor: &str) -> Result<ModelVersion> {
        let current = self
            .production(name)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("model `{name}` has no production version to roll back")))?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM models WHERE name = $1 AND stage = 'archived' AND promoted_ms IS NOT NULL \
             AND version <> $2 ORDER BY promoted_ms DESC, version DESC LIMIT 1"
        )))
        .bind(name)
        .bind(current.version)
        .fetch_optional(&self.pool)
        .await?;
        let previous = row.as_ref().map(version_from_row).transpose()?.ok_or_else(|| {
            StoreError::Invalid(format!("model `{name}` has no earlier production version to roll back to"))
        })?;
        let mut tx = self.pool.begin().await?;
        // The rolled-back version keeps no promotion time, so a second rollback goes further back.
        sqlx::query("UPDATE models SET stage = 'archived', promoted_ms = NULL WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(current.version)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE models SET stage = 'production' WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(previous.version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let detail = format!("version {} replaces version {}", previous.version, current.version);
        self.record_event("rollback", &format!("{name}@{}", previous.version), &detail, actor).await?;
        self.model_version(name, previous.version).await
    }
}
