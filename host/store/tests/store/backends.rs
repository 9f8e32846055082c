//! Fresh databases for the store tests: a SQLite file in a temporary directory, and a new
//! database on the PostgreSQL server named by `TUNEFORGE_TEST_PG` (an admin URL such as
//! `postgres://tuneforge@127.0.0.1:5432/postgres`), which `cargo xtask test` starts.

use sqlx::Executor;

/// A database that lives as long as the value.
pub struct Db {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub fn sqlite() -> Db {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub").join("t.db");
    Db { url: path.to_str().expect("utf8").to_owned(), _dir: Some(dir) }
}

pub async fn postgres() -> Db {
    let admin = std::env::var("TUNEFORGE_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "TUNEFORGE_TEST_PG is not set: the store tests also run on PostgreSQL; run the suite with \
             `cargo xtask test`, which starts a server, or point the variable at one"
        )
    });
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&admin).await.expect("connect to TUNEFORGE_TEST_PG");
    let name = format!("tuneforge_test_{:016x}", rand::random::<u64>());
    pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create database");
    pool.close().await;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_owned();
    Db { url: format!("{base}/{name}"), _dir: None }
}

/// Runs each named `async fn(url: String)` as two tests, `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    let db = super::backends::sqlite();
                    super::$name(db.url.clone()).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let db = super::backends::postgres().await;
                    super::$name(db.url.clone()).await;
                }
            }
        )*
    };
}
pub(crate) use on_every_backend;
