//! The experiment store: the one crate that knows SQL. Runs, metric series, artifacts, the
//! model registry (stages, promotion, rollback), predictions, feedback and an audit trail of
//! events, in SQLite by default (one file, WAL, busy timeout) through sqlx's `Any` driver, with
//! portable SQL and embedded migrations (`../../migrations`).
//!
//! It must not know tensors, training or HTTP: callers hand it plain records.

mod ab;
mod artifacts;
mod error;
mod events;
mod lineage;
mod metrics;
mod registry;
mod runs;
mod serving;
mod store;

pub use ab::{AbTest, ArmStats, MIN_RATED, ModelRules, assign_arm, verdict, wilson};
pub use artifacts::Artifact;
pub use error::StoreError;
pub use events::Event;
pub use lineage::RunPlugin;
pub use metrics::{MetricPoint, SeriesPoint};
pub use registry::{ModelVersion, Stage};
pub use runs::{NewRun, RunFilter, RunRow, RunSort, RunStatus};
pub use serving::{FeedbackFilter, FeedbackRow, NewFeedback, NewPrediction, PredictionRow};
pub use store::{Store, default_db_path, now_ms};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
