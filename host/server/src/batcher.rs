//! Dynamic micro-batching: concurrent prediction requests for one model version are queued
//! and answered together — a batch closes when it holds `max_texts` texts or `max_wait` after
//! its first request, whichever comes first — so many small requests share one forward pass.
//! One worker thread per loaded model version runs the (CPU-bound) inference. Language models
//! batch the same way: concurrent generations (up to `max_generations`) run as one batch
//! ([`LanguageModel::generate_batch`]), each streaming its own pieces.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tuneforge_core::Prediction;
use tuneforge_core::generate::{Generated, LanguageModel, Sampling};
use tuneforge_plugin_runtime::Predictor;

use crate::prometheus::Counters;

/// How batches form.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_texts: usize,
    pub max_wait: Duration,
    /// The most generations one batch of a language model runs together.
    pub max_generations: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self { max_texts: 64, max_wait: Duration::from_millis(5), max_generations: 8 }
    }
}

/// `first` and whatever else arrives before `size` of them reaches `max` or `wait` passes.
fn gather<J>(rx: &mpsc::Receiver<J>, first: J, max: usize, wait: Duration, size: impl Fn(&J) -> usize) -> Vec<J> {
    let deadline = Instant::now() + wait;
    let mut n = size(&first);
    let mut jobs = vec![first];
    while n < max {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(job) => {
                n += size(&job);
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    jobs
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
                let jobs = gather(&rx, first, policy.max_texts, policy.max_wait, |j: &Job| j.texts.len());
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

/// Hears a generation's pieces of text as they settle.
pub type OnPiece = Box<dyn FnMut(&str) + Send>;

struct Generation {
    prompt: String,
    sampling: Sampling,
    on_piece: OnPiece,
    reply: oneshot::Sender<Result<Generated, String>>,
}

/// The queue in front of one language model: concurrent generations run as one batch.
pub struct GenerationBatcher {
    /// The model (its chat format renders the prompts).
    pub lm: Arc<LanguageModel>,
    tx: mpsc::Sender<Generation>,
}

impl std::fmt::Debug for GenerationBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GenerationBatcher")
    }
}

impl GenerationBatcher {
    /// Starts the worker for `lm` (`model`@`version` in the metrics, which count its batches
    /// and the generations in them).
    pub fn start(
        lm: Arc<LanguageModel>,
        policy: BatchPolicy,
        counters: Arc<Counters>,
        model: String,
        version: i64,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Generation>();
        let worker_lm = lm.clone();
        std::thread::Builder::new().name(format!("tuneforge-generate-{model}-{version}")).spawn(move || {
            while let Ok(first) = rx.recv() {
                let jobs = gather(&rx, first, policy.max_generations.max(1), policy.max_wait, |_| 1);
                counters.batch(&model, version, jobs.len() as u64);
                let mut requests = Vec::with_capacity(jobs.len());
                let mut pieces = Vec::with_capacity(jobs.len());
                let mut replies = Vec::with_capacity(jobs.len());
                for job in jobs {
                    requests.push((job.prompt, job.sampling));
                    pieces.push(job.on_piece);
                    replies.push(job.reply);
                }
                match worker_lm.generate_batch(&requests, &mut |i, text| pieces[i](text)) {
                    Ok(results) => {
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(result.map_err(|e| e.to_string()));
                        }
                    }
                    Err(e) => {
                        let message = e.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(message.clone()));
                        }
                    }
                }
            }
        })?;
        Ok(Self { lm, tx })
    }

    /// Generates after `prompt` (formatted) with whatever else arrived meanwhile;
    /// `on_piece` hears this generation's settled text.
    pub async fn generate(&self, prompt: String, sampling: Sampling, on_piece: OnPiece) -> Result<Generated, String> {
        let (reply, answer) = oneshot::channel();
        let stopped = || "the language model's batch worker has stopped".to_string();
        self.tx.send(Generation { prompt, sampling, on_piece, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}
