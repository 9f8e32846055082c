//! `cargo xtask bench serve`: the server under load on loopback, in one process.
//! 1. 10,000 feedback posts from 64 concurrent clients: none may be lost (counted in the
//!    database afterwards); throughput and p50/p99 latency.
//! 2. The runs list over a store with 10,000 runs and 1,000,000 metric points: p50/p95
//!    latency of `GET /api/v1/runs` (sorted by accuracy, a page of 50) and of a downsampled
//!    series, and of the dashboard's HTML pages (the runs list's first page, a run's page).
//!
//! Requests are bounded in number and go to 127.0.0.1 only.

use std::time::Instant;

use anyhow::bail;
use tuneforge_server::{Application, ServerConfig};
use tuneforge_store::{MetricPoint, NewPrediction, NewRun, RunStatus, Store};

const TOKEN: &str = "bench-token-0123456789abcdef";
const CLIENTS: usize = 64;
const POSTS: usize = 10_000;
const RUNS: usize = 10_000;
const POINTS_PER_RUN: usize = 100;

fn http(port: u16, method: &str, path: &str, body: &str) -> anyhow::Result<u16> {
    Ok(crate::http::request(port, method, path, body, TOKEN)?.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tuneforge-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("bench.db").display().to_string();
    let result = actix_web::rt::System::new().block_on(async { bench(&db).await });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(db: &str) -> anyhow::Result<()> {
    let store = Store::open(db).await?;
    println!("seeding {RUNS} runs and {} metric points ...", RUNS * POINTS_PER_RUN);
    let t = Instant::now();
    let mut points = Vec::with_capacity(100_000);
    for i in 0..RUNS {
        let id = format!("run-{i:05}");
        store
            .start_run(&NewRun {
                pid: 0,
                total_steps: POINTS_PER_RUN as i64,
                ..NewRun::new(&id, &format!("exp-{}", i % 50), "[train]\nlr = 1e-4\n")
            })
            .await?;
        let acc = (i * 7919 % 1000) as f64 / 1000.0;
        store.finish_run(&id, RunStatus::Succeeded, None, None, Some(acc), Some(acc), None).await?;
        points.extend((0..POINTS_PER_RUN).map(|s| MetricPoint {
            run_id: id.clone(),
            key: "train/loss".into(),
            step: s as i64,
            value: 1.0 / (s + 1) as f64,
            time_ms: 0,
        }));
        if points.len() >= 100_000 {
            store.append_metrics(&points).await?;
            points.clear();
        }
    }
    store.append_metrics(&points).await?;
    println!("seeded in {:.1} s", t.elapsed().as_secs_f64());
    let prediction = store
        .record_prediction(&NewPrediction {
            model_name: "bench".into(),
            model_version: 1,
            input: "text".into(),
            output: "label".into(),
            probabilities: serde_json::json!({"label": 1.0}),
            latency_ms: 1.0,
            arm: None,
        })
        .await?;
    let app = Application::build(ServerConfig {
        addr: "127.0.0.1:0".into(),
        db: db.into(),
        token: TOKEN.into(),
        device: Default::default(),
        batch: Default::default(),
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let port = app.port();
    actix_web::rt::spawn(app.run_until_stopped());

    // 1. Feedback under 64 concurrent clients.
    let body =
        serde_json::json!({"prediction_id": prediction, "rating": "wrong", "corrected_label": "other"}).to_string();
    let started = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let body = body.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let n = POSTS / CLIENTS + usize::from(c < POSTS % CLIENTS);
                let mut lat = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    let status = http(port, "POST", "/api/v1/feedback", &body)?;
                    if status != 201 {
                        bail!("feedback answered {status}");
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(lat)
            })
        })
        .collect();
    // Join on a blocking thread: this one must keep driving the server.
    let mut lat = actix_web::rt::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let mut lat = Vec::with_capacity(POSTS);
        for h in handles {
            lat.extend(h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??);
        }
        Ok(lat)
    })
    .await??;
    let seconds = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let stored = store.list_feedback(Some("bench"), 100_000).await?.len();
    println!(
        "feedback: {POSTS} posts from {CLIENTS} clients in {seconds:.2} s = {:.0} req/s; p50 {:.1} ms, p99 {:.1} ms; {stored} stored ({} lost)",
        POSTS as f64 / seconds,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        POSTS - stored
    );

    // 2. Reads over the large store.
    for (what, path) in [
        ("runs list (sorted by accuracy, 50 a page)", "/api/v1/runs?sort=accuracy&order=desc&limit=50".to_owned()),
        ("runs list, page 100", "/api/v1/runs?limit=50&offset=5000".to_owned()),
        (
            "series of 100 points downsampled to 20",
            "/api/v1/runs/run-04242/series?key=train/loss&max_points=20".to_owned(),
        ),
        ("dashboard: first page of the runs list (HTML)", "/".to_owned()),
        ("dashboard: first page sorted by accuracy (HTML)", "/?sort=accuracy".to_owned()),
        ("dashboard: a run's page with its curves (HTML)", "/runs/run-04242".to_owned()),
    ] {
        let mut lat = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let status = tokio_blocking_get(port, &path).await?;
            if status != 200 {
                bail!("{path} answered {status}");
            }
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        lat.sort_by(f64::total_cmp);
        println!("{what}: p50 {:.1} ms, p95 {:.1} ms over 200 requests", percentile(&lat, 0.5), percentile(&lat, 0.95));
    }
    if stored != POSTS {
        bail!("{} feedback posts were lost", POSTS - stored);
    }
    Ok(())
}

async fn tokio_blocking_get(port: u16, path: &str) -> anyhow::Result<u16> {
    let path = path.to_owned();
    actix_web::rt::task::spawn_blocking(move || http(port, "GET", &path, "")).await?
}
