//! Opening a store: the URL or path, SQLite's settings, the migrations.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

use crate::{Result, StoreError};

/// A handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    url: String,
}

/// `$TUNEFORGE_DB`, else `<user data dir>/tuneforge/tuneforge.db`.
pub fn default_db_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TUNEFORGE_DB") {
        return PathBuf::from(p);
    }
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("tuneforge").join("tuneforge.db")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A random id: 16 hex digits.
pub(crate) fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn url_for(db: &str) -> Result<String> {
    if db.contains("://") {
        return Ok(db.to_owned());
    }
    let path = Path::new(db);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| StoreError::Invalid(format!("{}: {e}", parent.display())))?;
    }
    Ok(format!("sqlite://{}?mode=rwc", path.display()))
}

impl Store {
    /// Opens (creating if needed) the database at `db` — a file path or a `sqlite://` URL —
    /// and applies pending migrations. SQLite runs in WAL mode with a 5 s busy timeout.
    pub async fn open(db: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let url = url_for(db)?;
        let options: AnyConnectOptions = url.parse().map_err(|source| StoreError::Open { url: url.clone(), source })?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open { url: url.clone(), source })?;
        sqlx::migrate!("../../migrations").run(&pool).await?;
        Ok(Self { pool, url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
