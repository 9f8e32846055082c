//! Runs: one row per training run, from start to its end (or its interruption).

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::store::now_ms;
use crate::{Result, Store, StoreError};

/// The life cycle of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "interrupted" => Self::Interrupted,
            _ => return None,
        })
    }
}

/// What is known when a run starts.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: String,
    pub name: String,
    pub config: String,
    pub run_dir: String,
    pub model_source: String,
    pub method: String,
    pub device: String,
    pub git_revision: Option<String>,
    pub host: String,
    pub pid: i64,
    pub total_steps: i64,
}

impl NewRun {
    /// A run record with the given id, name and config, and placeholder provenance (no
    /// directory, model or host): what seeded stores, fixtures and benchmarks start from;
    /// override the fields that matter with struct update syntax.
    pub fn new(id: &str, name: &str, config: &str) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            config: config.into(),
            run_dir: format!("/nowhere/{id}"),
            model_source: "unknown".into(),
            method: "full".into(),
            device: "cpu".into(),
            git_revision: None,
            host: "localhost".into(),
            pid: 1,
            total_steps: 100,
        }
    }
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    pub id: String,
    pub name: String,
    pub status: RunStatus,
    pub run_dir: String,
    pub model_source: String,
    pub method: String,
    pub dataset_hash: Option<String>,
    pub device: String,
    pub git_revision: Option<String>,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub steps: i64,
    pub total_steps: i64,
    pub accuracy: Option<f64>,
    pub macro_f1: Option<f64>,
    pub error: Option<String>,
    /// The resolved experiment (TOML); only filled by [`Store::get_run`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// summary.json; only filled by [`Store::get_run`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
}

/// How to order a list of runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunSort {
    #[default]
    Started,
    Accuracy,
    MacroF1,
    Name,
}

/// Which runs to list, in what order, which page.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    /// Substring of the run name.
    pub name: Option<String>,
    pub sort: RunSort,
    pub ascending: bool,
    pub limit: i64,
    pub offset: i64,
}

const COLUMNS: &str = "id, name, status, run_dir, model_source, method, dataset_hash, device, git_revision, \
                       started_ms, finished_ms, steps, total_steps, accuracy, macro_f1, error";

fn run_from_row(row: &AnyRow) -> Result<RunRow> {
    let status: String = row.try_get("status")?;
    Ok(RunRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Invalid(format!("unknown run status `{status}`")))?,
        run_dir: row.try_get("run_dir")?,
        model_source: row.try_get("model_source")?,
        method: row.try_get("method")?,
        dataset_hash: row.try_get("dataset_hash")?,
        device: row.try_get("device")?,
        git_revision: row.try_get("git_revision")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        steps: row.try_get("steps")?,
        total_steps: row.try_get("total_steps")?,
        accuracy: row.try_get("accuracy")?,
        macro_f1: row.try_get("macro_f1")?,
        error: row.try_get("error")?,
        config: None,
        summary: None,
    })
}

impl Store {
    /// Records a run as `running`.
    pub async fn start_run(&self, run: &NewRun) -> Result<()> {
        sqlx::query(
            "INSERT INTO runs (id, name, status, config, run_dir, model_source, method, device, git_revision, host, \
             pid, started_ms, total_steps) VALUES ($1, $2, 'running', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&run.id)
        .bind(&run.name)
        .bind(&run.config)
        .bind(&run.run_dir)
        .bind(&run.model_source)
        .bind(&run.method)
        .bind(&run.device)
        .bind(&run.git_revision)
        .bind(&run.host)
        .bind(run.pid)
        .bind(now_ms())
        .bind(run.total_steps)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a run as running again (a resume), under a new process.
    pub async fn resume_run(&self, id: &str, host: &str, pid: i64) -> Result<()> {
        let done = sqlx::query(
            "UPDATE runs SET status = 'running', host = $2, pid = $3, finished_ms = NULL, error = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(host)
        .bind(pid)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { kind: "run", id: id.to_owned() });
        }
        Ok(())
    }

    /// Records how far a run has come.
    pub async fn set_progress(&self, id: &str, steps: i64, total_steps: i64) -> Result<()> {
        sqlx::query("UPDATE runs SET steps = $2, total_steps = $3 WHERE id = $1")
            .bind(id)
            .bind(steps)
            .bind(total_steps)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records how a run ended.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_run(
        &self,
        id: &str,
        status: RunStatus,
        summary: Option<&serde_json::Value>,
        dataset_hash: Option<&str>,
        accuracy: Option<f64>,
        macro_f1: Option<f64>,
        error: Option<&str>,
    ) -> Result<()> {
        let summary = summary.map(serde_json::Value::to_string);
        sqlx::query(
            "UPDATE runs SET status = $2, summary = COALESCE($3, summary), dataset_hash = COALESCE($4, dataset_hash), \
             accuracy = COALESCE($5, accuracy), macro_f1 = COALESCE($6, macro_f1), error = $7, finished_ms = $8 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(summary)
        .bind(dataset_hash)
        .bind(accuracy)
        .bind(macro_f1)
        .bind(error)
        .bind(now_ms())
        // Through the Any driver a `None` float is sent with a non-float type; PostgreSQL
        // caches the prepared statement with that type and then refuses a later `Some`
        // ("incorrect binary data format"). Preparing afresh each time avoids it.
        .persistent(false)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One run with its config and summary.
    pub async fn get_run(&self, id: &str) -> Result<RunRow> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {COLUMNS}, config, summary FROM runs WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound { kind: "run", id: id.to_owned() })?;
        let mut run = run_from_row(&row)?;
        run.config = Some(row.try_get("config")?);
        let summary: Option<String> = row.try_get("summary")?;
        run.summary = summary.and_then(|s| serde_json::from_str(&s).ok());
        Ok(run)
    }

    /// A page of runs and the number of runs that match.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<(Vec<RunRow>, i64)> {
        let order = match filter.sort {
            RunSort::Started => "started_ms",
            RunSort::Accuracy => "accuracy",
            RunSort::MacroF1 => "macro_f1",
            RunSort::Name => "name",
        };
        let dir = if filter.ascending { "ASC" } else { "DESC" };
        let status = filter.status.map(RunStatus::as_str);
        let name = filter.name.as_ref().map(|n| format!("%{n}%"));
        let condition = "(CAST($1 AS TEXT) IS NULL OR status = $1) AND (CAST($2 AS TEXT) IS NULL OR name LIKE $2)";
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM runs WHERE {condition} ORDER BY {order} {dir} NULLS LAST, id {dir} LIMIT $3 OFFSET $4"
        )))
        .bind(status)
        .bind(&name)
        .bind(filter.limit.clamp(1, 1000))
        .bind(filter.offset.max(0))
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) AS n FROM runs WHERE {condition}")))
            .bind(status)
            .bind(&name)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok((rows.iter().map(run_from_row).collect::<Result<_>>()?, total))
    }

    /// Marks `running` runs of this host whose process is gone as `interrupted` (a kill leaves
    /// them running); returns their ids.
    pub async fn mark_interrupted(&self, host: &str, alive: impl Fn(i64) -> bool) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id, pid FROM runs WHERE status = 'running' AND host = $1")
            .bind(host)
            .fetch_all(&self.pool)
            .await?;
        let mut marked = Vec::new();
        for row in rows {
            let (id, pid): (String, i64) = (row.try_get("id")?, row.try_get("pid")?);
            if alive(pid) {
                continue;
            }
            sqlx::query(
                "UPDATE runs SET status = 'interrupted', finished_ms = $2 WHERE id = $1 AND status = 'running'",
            )
            .bind(&id)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
            self.record_event(
                "interrupted",
                &id,
                &format!("process {pid} ended without finishing the run"),
                "tuneforge",
            )
            .await?;
            marked.push(id);
        }
        Ok(marked)
    }
}
