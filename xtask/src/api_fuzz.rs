//! `cargo xtask api-fuzz`: Schemathesis (from PyPI) against the server's own OpenAPI document.
//!
//! Starts `tuneforge serve` on a free loopback port over a fresh store seeded with a few runs
//! and metric series, then lets Schemathesis generate requests for every operation (with the
//! write token, so writes get past authentication) and fails on any 5xx answer.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tuneforge_store::{MetricPoint, NewRun, RunStatus, Store};

use crate::process::{build_tuneforge, run as run_cmd};
use crate::target_dir;

const SCHEMATHESIS: &str = "schemathesis==4.32.5";
const TOKEN: &str = "api-fuzz-token-0123456789";

fn schemathesis() -> anyhow::Result<std::path::PathBuf> {
    let venv = target_dir().join("schemathesis-venv");
    let exe = venv.join("bin").join("schemathesis");
    if exe.exists() {
        return Ok(exe);
    }
    run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_cmd(Command::new(venv.join("bin").join("pip")).args(["install", "-q", SCHEMATHESIS]))?;
    Ok(exe)
}

async fn seed(db: &str) -> anyhow::Result<()> {
    let store = Store::open(db).await?;
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let id = format!("run-{i}");
        store.start_run(&NewRun::new(&id, name, "[train]\nlr = 1e-4\n")).await?;
        let points: Vec<MetricPoint> = (1..=100)
            .map(|s| MetricPoint {
                run_id: id.clone(),
                key: "train/loss".into(),
                step: s,
                value: 1.0 / s as f64,
                time_ms: 0,
            })
            .collect();
        store.append_metrics(&points).await?;
        store.finish_run(&id, RunStatus::Succeeded, None, None, Some(0.8), Some(0.7), None).await?;
    }
    store.close().await;
    Ok(())
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let examples = match args {
        [] => "100".to_string(),
        [flag, n] if flag == "--max-examples" => n.clone(),
        _ => bail!("usage: cargo xtask api-fuzz [--max-examples N]"),
    };
    let bin = build_tuneforge()?;
    let exe = schemathesis()?;
    let dir = target_dir().join(format!("api-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("store.db");
    let db = db.to_str().context("utf-8 path")?.to_owned();
    tokio::runtime::Runtime::new()?.block_on(seed(&db))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = Command::new(&bin)
        .args(["serve", "--db", &db, "--addr", &format!("127.0.0.1:{port}")])
        .env("TUNEFORGE_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting tuneforge serve")?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(30) || server.try_wait()?.is_some() {
            let _ = server.kill();
            bail!("tuneforge serve did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = Command::new(&exe)
        .args(["run", &format!("http://127.0.0.1:{port}/api/v1/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "not_a_server_error", "--max-examples", &examples, "--seed", "42"])
        .status()
        .context("running schemathesis");
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    if !status?.success() {
        bail!("schemathesis found server errors (see above)");
    }
    println!("schemathesis: no 5xx");
    Ok(())
}
