//! The demo's second half: the feedback loop on real data. `tuneforge serve` answers simulated
//! users — one per held-out row, who know the row's chapter and say whether the model got it
//! right (correcting it when not); `tuneforge retrain` turns their corrections into a candidate,
//! an A/B test starts, a second group of users (other held-out rows) is split between the arms
//! by session and judges them, and the server promotes or rolls back on its own when the
//! verdict is significant (otherwise the demo ends the test and production stays).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tuneforge_data::{ReadOptions, read_examples};

use crate::http;
use crate::process::output;

/// What the loop found, for the demo's summary.
pub struct LoopReport {
    pub phase_a_accuracy: f64,
    pub corrections: usize,
    pub candidate: String,
    pub verdict: String,
    pub status: String,
    pub production_arm: String,
    pub candidate_arm: String,
}

fn arm_line(a: &serde_json::Value) -> String {
    let acc = a["accuracy"].as_f64().map_or("—".into(), |x| format!("{x:.3}"));
    let ci = a["accuracy_95"].as_array().map_or(String::new(), |v| {
        format!(" [{:.3}, {:.3}]", v[0].as_f64().unwrap_or(0.0), v[1].as_f64().unwrap_or(0.0))
    });
    format!("v{}: {} predictions, {} rated, accuracy {acc}{ci}", a["version"], a["predictions"], a["rated"])
}

pub fn run(bin: &Path, root: &Path, heldout: &Path, model: &str) -> anyhow::Result<LoopReport> {
    let rows = read_examples(heldout, &ReadOptions::default())?.examples;
    let token = format!("demo-{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = Command::new(bin)
        .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
        .env("TUNEFORGE_TOKEN", &token)
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting tuneforge serve")?;
    let result = (|| -> anyhow::Result<LoopReport> {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("tuneforge serve did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Users of the first group rate production's answers.
        let user = |group: &str, i: usize, text: &str, truth: &str| -> anyhow::Result<(bool, serde_json::Value)> {
            let body = json!({"model": model, "text": text, "session": format!("{group}-{i}")});
            let p = http::json(port, "POST", "/api/v1/predict", &body, &token)?;
            let answer = &p["predictions"][0];
            let right = answer["label"] == truth;
            let feedback = if right {
                json!({"prediction_id": answer["id"], "rating": "correct", "author": format!("{group}-{i}")})
            } else {
                json!({"prediction_id": answer["id"], "rating": "wrong", "corrected_label": truth, "author": format!("{group}-{i}")})
            };
            let f = http::json(port, "POST", "/api/v1/feedback", &feedback, &token)?;
            Ok((right, f["ab_decision"].clone()))
        };
        let (group_a, group_b): (Vec<_>, Vec<_>) = rows.iter().enumerate().partition(|(i, _)| i % 2 == 0);
        let mut right = 0usize;
        for (i, e) in &group_a {
            right += usize::from(user("a", *i, &e.text, &e.label)?.0);
        }
        let corrections = group_a.len() - right;
        println!(
            "{} users rated production: {right} right, {corrections} corrected ({:.3})",
            group_a.len(),
            right as f64 / group_a.len().max(1) as f64
        );

        println!("$ tuneforge retrain --model {model} --all-feedback --share 0.5");
        let out = output(
            Command::new(bin)
                .args(["retrain", "--model", model, "--all-feedback", "--share", "0.5", "--quiet"])
                .current_dir(root),
        )?;
        print!("{out}");
        let candidate = out
            .lines()
            .find_map(|l| l.strip_prefix("registered "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?")
            .to_string();

        // The second group is split between the arms by session and judges them.
        let mut decided = serde_json::Value::Null;
        for (i, e) in &group_b {
            let (_, d) = user("b", *i, &e.text, &e.label)?;
            if decided.is_null() && !d.is_null() {
                println!("the server decided after user b-{i}: {}", d["status"]);
                decided = d;
            }
        }
        let tests = http::json(port, "GET", &format!("/api/v1/ab?model={model}"), &json!({}), &token)?;
        let t = tests["tests"][0].clone();
        let mut status = t["test"]["status"].as_str().unwrap_or("?").to_string();
        if status == "running" {
            // Not significant: the demo ends the test by hand and production stays.
            let id = t["test"]["id"].as_str().unwrap_or_default();
            let ended = http::json(
                port,
                "POST",
                &format!("/api/v1/ab/{id}/stop"),
                &json!({"action": "stop", "actor": "demo"}),
                &token,
            )?;
            status = format!(
                "{} (no significant difference; the demo ended it, production stays)",
                ended["test"]["status"].as_str().unwrap_or("?")
            );
        }
        Ok(LoopReport {
            phase_a_accuracy: right as f64 / group_a.len().max(1) as f64,
            corrections,
            candidate,
            verdict: t["verdict"].as_str().unwrap_or("?").to_string(),
            status,
            production_arm: arm_line(
                &json!({"version": t["test"]["production_version"], "predictions": t["production"]["predictions"], "rated": t["production"]["rated"], "accuracy": t["production"]["accuracy"], "accuracy_95": t["production"]["accuracy_95"]}),
            ),
            candidate_arm: arm_line(
                &json!({"version": t["test"]["candidate_version"], "predictions": t["candidate"]["predictions"], "rated": t["candidate"]["rated"], "accuracy": t["candidate"]["accuracy"], "accuracy_95": t["candidate"]["accuracy_95"]}),
            ),
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}
