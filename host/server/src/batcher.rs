//! Dynamic micro-batching: concurrent prediction requests for one model version are queued
//! and answered together — a batch closes when it holds `max_texts` texts or `max_wait` after
//! its first request, whichever comes first — so many small requests share one forward pass.
//! One worker thread per loaded model version runs the (CPU-bound) inference.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tuneforge_core::Prediction;
use tuneforge_plugin_runtime::Predictor;

use crate::prometheus::Counters;

/// How batches form.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_texts: usize,
    pub max_wait: Duration,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self { max_texts: 64, max_wait: Duration::from_millis(5) }
    }
}

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Prediction>, String>>,
}

/// The queue in front of one model version.
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batcher")
    }
}

impl Batcher {
    /// Starts the worker for `predictor` (`model`@`version` in the metrics).
    pub fn start(
        predictor: Arc<Predictor>,
        policy: BatchPolicy,
        counters: Arc<Counters>,
        model: String,
        version: i64,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new().name(format!("tuneforge-batch-{model}-{version}")).spawn(move || {
            while let Ok(first) = rx.recv() {
                let deadline = Instant::now() + policy.max_wait;
                let mut jobs = vec![first];
                let mut n: usize = jobs[0].texts.len();
                while n < policy.max_texts {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(job) => {
                            n += job.texts.len();
                            jobs.push(job);
                        }
                        Err(_) => break,
                    }
                }
                let texts: Vec<String> = jobs.iter().flat_map(|j| j.texts.iter().cloned()).collect();
                counters.batch(&model, version, texts.len() as u64);
                match predictor.predict(&texts, policy.max_texts.max(1)) {
                    Ok(mut all) => {
                        for job in jobs {
                            let rest = all.split_off(job.texts.len().min(all.len()));
                            let _ = job.reply.send(Ok(std::mem::replace(&mut all, rest)));
                        }
                    }
                    Err(e) => {
                        let message = e.to_string();
                        for job in jobs {
                            let _ = job.reply.send(Err(message.clone()));
                        }
                    }
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Predictions for `texts`, answered with whatever else arrived meanwhile.
    pub async fn predict(&self, texts: Vec<String>) -> Result<Vec<Prediction>, String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job { texts, reply }).map_err(|_| "the model's batch worker has stopped".to_string())?;
        answer.await.map_err(|_| "the model's batch worker has stopped".to_string())?
    }
}
