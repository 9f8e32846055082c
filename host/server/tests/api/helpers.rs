//! `spawn_app()`: a server on 127.0.0.1:0 over a fresh SQLite file, and a tiny HTTP/1.1
//! client on a plain TCP stream (one request per connection).

use std::io::{Read, Write};
use std::net::TcpStream;

use tuneforge_server::{Application, ServerConfig};
use tuneforge_store::{NewRun, Store};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct TestApp {
    pub port: u16,
    pub store: Store,
    pub dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| None).await
}

/// [`spawn_app`] with a decoder behind `/api/v1/generate`, made by `generator` in the app's
/// temporary directory.
pub async fn spawn_app_with(
    generator: impl FnOnce(&std::path::Path) -> Option<(String, std::sync::Arc<tuneforge_core::generate::LanguageModel>)>,
) -> TestApp {
    spawn_app_configured(generator, Default::default()).await
}

/// [`spawn_app_with`] and a micro-batching policy.
pub async fn spawn_app_configured(
    generator: impl FnOnce(&std::path::Path) -> Option<(String, std::sync::Arc<tuneforge_core::generate::LanguageModel>)>,
    batch: tuneforge_server::BatchPolicy,
) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("store.db").display().to_string();
    let config = ServerConfig {
        addr: "127.0.0.1:0".into(),
        db: db.clone(),
        token: TOKEN.into(),
        device: Default::default(),
        batch,
    };
    let app = Application::build_with_generator(config, generator(dir.path())).await.expect("build");
    let port = app.port();
    tokio::spawn(app.run_until_stopped());
    let store = Store::open(&db).await.expect("store");
    TestApp { port, store, dir }
}

impl TestApp {
    /// Sends a request; `token` adds the bearer header.
    pub async fn request(&self, method: &str, path: &str, body: Option<&str>, token: Option<&str>) -> Reply {
        let (port, method, path) = (self.port, method.to_owned(), path.to_owned());
        let body = body.map(str::to_owned);
        let token = token.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let body = body.unwrap_or_default();
            let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).expect("write");
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).expect("read");
            let text = String::from_utf8_lossy(&raw).into_owned();
            let status: u16 = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
            let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_owned() };
            Reply { status, body }
        })
        .await
        .expect("request task")
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.request("POST", path, Some(&body.to_string()), Some(TOKEN)).await
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// A run record for the store; tests override what they care about.
pub fn new_run(id: &str, run_dir: &str, config: &str) -> NewRun {
    NewRun {
        run_dir: run_dir.into(),
        model_source: "tiny".into(),
        total_steps: 1000,
        ..NewRun::new(id, &format!("exp-{id}"), config)
    }
}
