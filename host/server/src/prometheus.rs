//! `/metrics` in Prometheus' text exposition format: requests by route and status, request
//! latency histograms by route, predictions by model, tokens read and generated and the time
//! to the first token by language model, feedback by rating, and training runs by status
//! (read from the store).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{Error, web};

use crate::state::AppState;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    /// Writes the series of `name` with `labels` (already formatted, no braces).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    predictions: Mutex<BTreeMap<String, u64>>,
    /// Batches run and texts in them, by (model, version): their ratio is the mean batch size.
    batches: Mutex<BTreeMap<(String, i64), (u64, u64)>>,
    /// Model inference time per batch, by (model, version, arm).
    inference: Mutex<BTreeMap<(String, i64, String), Histogram>>,
    feedback: Mutex<BTreeMap<String, u64>>,
    /// Prompt and generated tokens by language model.
    tokens: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Time to the first new token (the prompt's pass), by language model.
    first_token: Mutex<BTreeMap<String, Histogram>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Counters {
    pub fn prediction(&self, model: &str, n: u64) {
        *lock(&self.predictions).entry(model.to_owned()).or_default() += n;
    }

    /// A micro-batch of `texts` texts went through a model version.
    pub fn batch(&self, model: &str, version: i64, texts: u64) {
        let mut b = lock(&self.batches);
        let e = b.entry((model.to_owned(), version)).or_default();
        e.0 += 1;
        e.1 += texts;
    }

    /// One request's texts through a model version, queueing for its micro-batch included
    /// (the arm is `production`, `candidate` or `none`).
    pub fn inference(&self, model: &str, version: i64, arm: &str, seconds: f64) {
        lock(&self.inference).entry((model.to_owned(), version, arm.to_owned())).or_default().observe(seconds);
    }

    /// A generation by a language model: the tokens it read and wrote, and the seconds its
    /// prompt took (the time to the first new token).
    pub fn generation(&self, model: &str, prompt_tokens: u64, generated: u64, first_token_s: f64) {
        let mut t = lock(&self.tokens);
        let e = t.entry(model.to_owned()).or_default();
        e.0 += prompt_tokens;
        e.1 += generated;
        lock(&self.first_token).entry(model.to_owned()).or_default().observe(first_token_s);
    }

    pub fn feedback(&self, rating: &str) {
        *lock(&self.feedback).entry(rating.to_owned()).or_default() += 1;
    }

    fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        *lock(&self.requests).entry((method.to_owned(), route.to_owned(), status)).or_default() += 1;
        lock(&self.latency).entry(route.to_owned()).or_default().observe(seconds);
    }

    /// The text format (without the store's gauges).
    pub fn render(&self, out: &mut String) {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        out.push_str("# HELP tuneforge_http_requests_total HTTP requests by method, route and status.\n");
        out.push_str("# TYPE tuneforge_http_requests_total counter\n");
        for ((m, r, s), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "tuneforge_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{s}\"}} {n}",
                esc(m),
                esc(r)
            );
        }
        out.push_str("# HELP tuneforge_http_request_seconds Request latency by route.\n");
        out.push_str("# TYPE tuneforge_http_request_seconds histogram\n");
        for (r, h) in lock(&self.latency).iter() {
            h.render(out, "tuneforge_http_request_seconds", &format!("route=\"{}\"", esc(r)));
        }
        out.push_str("# HELP tuneforge_inference_batches_total Micro-batches run, by model and version.\n");
        out.push_str("# TYPE tuneforge_inference_batches_total counter\n");
        for ((m, v), (batches, _)) in lock(&self.batches).iter() {
            let _ =
                writeln!(out, "tuneforge_inference_batches_total{{model=\"{}\",version=\"{v}\"}} {batches}", esc(m));
        }
        out.push_str("# HELP tuneforge_inference_batch_texts_total Texts in those batches.\n");
        out.push_str("# TYPE tuneforge_inference_batch_texts_total counter\n");
        for ((m, v), (_, texts)) in lock(&self.batches).iter() {
            let _ =
                writeln!(out, "tuneforge_inference_batch_texts_total{{model=\"{}\",version=\"{v}\"}} {texts}", esc(m));
        }
        out.push_str(
            "# HELP tuneforge_inference_seconds Time to answer a request: its micro-batch wait and inference, by model, version and A/B arm.\n",
        );
        out.push_str("# TYPE tuneforge_inference_seconds histogram\n");
        for ((m, v, a), h) in lock(&self.inference).iter() {
            h.render(
                out,
                "tuneforge_inference_seconds",
                &format!("model=\"{}\",version=\"{v}\",arm=\"{}\"", esc(m), esc(a)),
            );
        }
        out.push_str("# HELP tuneforge_predictions_total Predictions served by model.\n");
        out.push_str("# TYPE tuneforge_predictions_total counter\n");
        for (m, n) in lock(&self.predictions).iter() {
            let _ = writeln!(out, "tuneforge_predictions_total{{model=\"{}\"}} {n}", esc(m));
        }
        out.push_str("# HELP tuneforge_prompt_tokens_total Prompt tokens read, by language model.\n");
        out.push_str("# TYPE tuneforge_prompt_tokens_total counter\n");
        for (m, (prompt, _)) in lock(&self.tokens).iter() {
            let _ = writeln!(out, "tuneforge_prompt_tokens_total{{model=\"{}\"}} {prompt}", esc(m));
        }
        out.push_str("# HELP tuneforge_generated_tokens_total Tokens generated, by language model.\n");
        out.push_str("# TYPE tuneforge_generated_tokens_total counter\n");
        for (m, (_, generated)) in lock(&self.tokens).iter() {
            let _ = writeln!(out, "tuneforge_generated_tokens_total{{model=\"{}\"}} {generated}", esc(m));
        }
        out.push_str("# HELP tuneforge_time_to_first_token_seconds The prompt's pass, by language model.\n");
        out.push_str("# TYPE tuneforge_time_to_first_token_seconds histogram\n");
        for (m, h) in lock(&self.first_token).iter() {
            h.render(out, "tuneforge_time_to_first_token_seconds", &format!("model=\"{}\"", esc(m)));
        }
        out.push_str("# HELP tuneforge_feedback_total Feedback received by rating.\n");
        out.push_str("# TYPE tuneforge_feedback_total counter\n");
        for (r, n) in lock(&self.feedback).iter() {
            let _ = writeln!(out, "tuneforge_feedback_total{{rating=\"{}\"}} {n}", esc(r));
        }
    }
}

/// Middleware: counts every request under its route pattern (not its raw path, which would
/// make a series per id) and times it.
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let counters = req.app_data::<web::Data<AppState>>().map(|s| s.counters.clone());
    let res = next.call(req).await?;
    if let Some(c) = counters {
        c.request(&method, &route, res.status().as_u16(), started.elapsed().as_secs_f64());
    }
    Ok(res)
}
