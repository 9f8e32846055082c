//! `/metrics` in Prometheus' text exposition format: requests by route and status, request
//! latency histograms by route, predictions by model, feedback by rating, and training runs
//! by status (read from the store).

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

#[derive(Debug, Default)]
pub struct Counters {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    predictions: Mutex<BTreeMap<String, u64>>,
    feedback: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Counters {
    pub fn prediction(&self, model: &str, n: u64) {
        *lock(&self.predictions).entry(model.to_owned()).or_default() += n;
    }

    pub fn feedback(&self, rating: &str) {
        *lock(&self.feedback).entry(rating.to_owned()).or_default() += 1;
    }

    fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        *lock(&self.requests).entry((method.to_owned(), route.to_owned(), status)).or_default() += 1;
        let mut latency = lock(&self.latency);
        let h = latency.entry(route.to_owned()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
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
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tuneforge_http_request_seconds_bucket{{route=\"{}\",le=\"{b}\"}} {}",
                    esc(r),
                    h.counts[i]
                );
            }
            let _ =
                writeln!(out, "tuneforge_http_request_seconds_bucket{{route=\"{}\",le=\"+Inf\"}} {}", esc(r), h.count);
            let _ = writeln!(out, "tuneforge_http_request_seconds_sum{{route=\"{}\"}} {}", esc(r), h.sum);
            let _ = writeln!(out, "tuneforge_http_request_seconds_count{{route=\"{}\"}} {}", esc(r), h.count);
        }
        out.push_str("# HELP tuneforge_predictions_total Predictions served by model.\n");
        out.push_str("# TYPE tuneforge_predictions_total counter\n");
        for (m, n) in lock(&self.predictions).iter() {
            let _ = writeln!(out, "tuneforge_predictions_total{{model=\"{}\"}} {n}", esc(m));
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
