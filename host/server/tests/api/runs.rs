//! Runs, series, compare, health, metrics, OpenAPI, and the error bodies.

use tuneforge_store::{MetricPoint, RunStatus};

use crate::helpers::{TOKEN, new_run, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_listed_shown_compared_and_their_series_downsampled() {
    let app = spawn_app().await;
    for id in ["a", "b"] {
        let config = format!("[train]\nlr = {}\n", if id == "a" { "0.1" } else { "0.2" });
        app.store.start_run(&new_run(id, "/nowhere", &config)).await.expect("start");
        let points: Vec<MetricPoint> = (1..=1000)
            .map(|s| MetricPoint {
                run_id: id.into(),
                key: "train/loss".into(),
                step: s,
                value: 1.0 / s as f64,
                time_ms: 0,
            })
            .collect();
        app.store.append_metrics(&points).await.expect("metrics");
    }
    app.store.finish_run("a", RunStatus::Succeeded, None, None, Some(0.9), Some(0.8), None).await.expect("finish");
    let lineage = tuneforge_store::RunPlugin {
        name: "text-clean".into(),
        version: "0.1.0".into(),
        kind: "cleaner".into(),
        sha256: "c".repeat(64),
        api_version: "0.1.0".into(),
    };
    app.store.record_run_plugins("a", &[lineage]).await.expect("lineage");

    let r = app.get("/api/v1/runs").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"], 2);
    let r = app.get("/api/v1/runs?status=succeeded&limit=1").await;
    assert_eq!(r.json()["runs"][0]["id"], "a");
    let r = app.get("/api/v1/runs?sort=accuracy&order=desc").await;
    assert_eq!(r.json()["runs"][0]["id"], "a");

    let r = app.get("/api/v1/runs/a").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["metric_keys"][0], "train/loss");
    assert_eq!(r.json()["plugins"][0]["name"], "text-clean");
    assert_eq!(r.json()["plugins"][0]["api_version"], "0.1.0");
    let r = app.get("/api/v1/runs/a/series?key=train/loss&max_points=100").await;
    let points = r.json()["points"].as_array().expect("points").len();
    assert!((90..=100).contains(&points), "{points}");
    let r = app.get("/api/v1/compare?ids=a,b").await;
    assert_eq!(r.json()["runs"].as_array().expect("runs").len(), 2);

    assert_eq!(app.get("/healthz").await.status, 200);
    let m = app.get("/metrics").await;
    assert!(
        m.body.contains("tuneforge_http_requests_total{method=\"GET\",route=\"/api/v1/runs\",status=\"200\"} 3"),
        "{}",
        m.body
    );
    assert!(m.body.contains("tuneforge_runs{status=\"running\"} 1"));
    let doc = app.get("/api/v1/openapi.json").await.json();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/api/v1/predict"]["post"]["security"].is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field_and_unknown_ids_404() {
    let app = spawn_app().await;
    let r = app.get("/api/v1/runs/nope").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().expect("error").contains("nope"));
    // The dashboard's page of an unknown run is a 404 too, and says why.
    let page = app.get("/runs/nope").await;
    assert_eq!(page.status, 404);
    assert!(page.body.contains("not found"));
    assert_eq!(app.get("/").await.status, 200);
    let r = app.get("/api/v1/runs?limit=0").await;
    assert_eq!((r.status, r.json()["error"].as_str().map(|e| e.starts_with("limit:"))), (400, Some(true)));
    let r = app.get("/api/v1/runs?status=bogus").await;
    assert_eq!(r.status, 400);
    let r = app.get("/api/v1/runs?colour=red").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().expect("error").contains("colour"), "{}", r.body);
    let r = app.request("POST", "/api/v1/feedback", Some("{\"prediction_id\": 3}"), Some(TOKEN)).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().expect("error").contains("prediction_id"), "{}", r.body);
    let r = app.request("POST", "/api/v1/feedback", Some("{not json"), Some(TOKEN)).await;
    assert_eq!(r.status, 400);
    let r = app
        .request(
            "POST",
            "/api/v1/feedback",
            Some("{\"prediction_id\":\"x\",\"rating\":\"wrong\",\"extra\":1}"),
            Some(TOKEN),
        )
        .await;
    assert!(r.json()["error"].as_str().expect("error").contains("extra"), "{}", r.body);
    assert_eq!(app.get("/nothing/here").await.status, 404);
}
