//! Dynamic micro-batching: concurrent prediction requests for one model version are queued
//! and answered together — a batch closes when it holds `max_texts` texts or `max_wait` after
//! its first request, whichever comes first — so many small requests share one forward pass.
//! One worker thread per loaded model version runs the (CPU-bound) inference. Language models
//! batch continuously: up to `max_generations` generations run as one [`BatchRun`], a new
//! request joining it at the next step (not after the batch ends), each streaming its own
//! pieces. A panic inside a worker (a bug: every input error is an error, not a panic) fails
//! the requests of that batch with an error that says so, and the worker goes on serving.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tuneforge_core::Prediction;
use tuneforge_core::generate::{BatchRun, Generated, LanguageModel, Sampling};
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

/// Runs `f`; a panic becomes an error naming `what` and the panic's message.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        format!("internal error: {what} panicked ({message}); the model goes on serving other requests")
    })
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
        Self::start_with(move |texts, batch| predictor.predict(texts, batch), policy, counters, model, version)
    }

    /// [`Batcher::start`] over any prediction function `predict(texts, batch_size)`.
    fn start_with(
        predict: impl Fn(&[String], usize) -> tuneforge_core::Result<Vec<Prediction>> + Send + 'static,
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
                let predicted = guarded("prediction", || predict(&texts, policy.max_texts.max(1)))
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match predicted {
                    Ok(mut all) => {
                        for job in jobs {
                            let rest = all.split_off(job.texts.len().min(all.len()));
                            let _ = job.reply.send(Ok(std::mem::replace(&mut all, rest)));
                        }
                    }
                    Err(message) => {
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

/// A generation's stream and reply, as the batch run keeps them.
type Running = (OnPiece, oneshot::Sender<Result<Generated, String>>);

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

/// A failed step loses the batch's state: every running generation fails with `message`,
/// and the worker goes on with an empty run.
fn fail_all<'m>(run: &mut BatchRun<'m, Running>, lm: &'m LanguageModel, message: &str) {
    // After a panic, a request that was being admitted or stepped may be gone from the run
    // already: its dropped reply tells it (`generate`).
    for job in std::mem::replace(run, BatchRun::new(lm)).abandon() {
        let _ = job.1.send(Err(message.to_owned()));
    }
}

/// The error of a batch step: its own, or the panic that stopped it.
fn step_error(r: Result<tuneforge_core::Result<()>, String>) -> Option<String> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(panic) => Some(panic),
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
            let mut run = BatchRun::new(&worker_lm);
            let mut on_text = |job: &mut Running, text: &str| (job.0)(text);
            let mut on_done = |job: Running, result: tuneforge_core::Result<Generated>| {
                let _ = job.1.send(result.map_err(|e| e.to_string()));
            };
            loop {
                // Idle, wait for work and gather what comes with it; running, take whatever
                // is waiting, without delaying the rows that run.
                let jobs = if run.is_empty() {
                    let Ok(first) = rx.recv() else { break };
                    gather(&rx, first, policy.max_generations.max(1), policy.max_wait, |_| 1)
                } else {
                    std::iter::from_fn(|| rx.try_recv().ok())
                        .take(policy.max_generations.saturating_sub(run.len()))
                        .collect()
                };
                if !jobs.is_empty() {
                    counters.batch(&model, version, jobs.len() as u64);
                    let requests = jobs.into_iter().map(|g| ((g.on_piece, g.reply), g.prompt, g.sampling)).collect();
                    let admitted = guarded("generation", || run.admit(requests, &mut on_text, &mut on_done));
                    if let Some(message) = step_error(admitted) {
                        fail_all(&mut run, &worker_lm, &message);
                        continue;
                    }
                }
                if let Some(message) = step_error(guarded("generation", || run.step(&mut on_text, &mut on_done))) {
                    fail_all(&mut run, &worker_lm, &message);
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
        // A reply dropped unsent: a panic unwound through the request while it was being
        // admitted (the worker goes on), or the worker stopped.
        answer.await.map_err(|_| "internal error: the generation was abandoned without an answer".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prediction that panics fails its own batch with an error that says so; the worker
    /// lives on and answers the next request.
    #[tokio::test]
    async fn a_panicking_prediction_fails_its_batch_only() {
        let predict = |texts: &[String], _: usize| -> tuneforge_core::Result<Vec<Prediction>> {
            if texts.iter().any(|t| t == "boom") {
                panic!("a bug met {texts:?}");
            }
            Ok(texts
                .iter()
                .map(|t| Prediction { label: t.to_uppercase(), score: 1.0, probabilities: vec![] })
                .collect())
        };
        let policy = BatchPolicy { max_wait: Duration::from_millis(0), ..Default::default() };
        let batcher = Batcher::start_with(predict, policy, Arc::default(), "t".into(), 1).expect("start");
        let e = batcher.predict(vec!["boom".into()]).await.expect_err("the panic is an error");
        assert!(e.contains("internal error") && e.contains("panicked") && e.contains("a bug met"), "{e}");
        let after = batcher.predict(vec!["fever".into(), "cough".into()]).await.expect("the worker lives on");
        assert_eq!(after.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(), ["FEVER", "COUGH"]);
    }

    /// A generation whose stream panics (its listener is the server's code) fails with an
    /// error; the worker lives on and the next generation is what it is alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_a_generation_fails_its_batch_only() {
        let dir = tempfile::tempdir().expect("tmp");
        tuneforge_core::testing::write_tiny_decoder(dir.path(), "llama").expect("tiny decoder");
        let lm = Arc::new(LanguageModel::load(&dir.path().join("model.gguf")).expect("load"));
        let s = Sampling { max_new_tokens: 4, ..Sampling::default() };
        let alone = lm.generate("the cat", &s, &mut |_| {}).expect("alone");
        assert!(!alone.text.is_empty(), "the tiny model says something, so the listener hears it");
        let policy = BatchPolicy { max_wait: Duration::from_millis(0), ..Default::default() };
        let batcher = GenerationBatcher::start(lm, policy, Arc::default(), "t".into(), 1).expect("start");
        // At the first piece (while the request is admitted), then at the second (a step).
        for at in [1, 2] {
            let mut heard = 0;
            let boom = Box::new(move |_: &str| {
                heard += 1;
                if heard == at {
                    panic!("a listener's bug");
                }
            });
            let e = batcher.generate("the cat".into(), s.clone(), boom).await.expect_err("the panic is an error");
            assert!(e.contains("internal error"), "panic at piece {at}: {e}");
        }
        let after = batcher.generate("the cat".into(), s, Box::new(|_| {})).await.expect("the worker lives on");
        assert_eq!(after.ids, alone.ids);
    }

    /// A request that arrives while a long generation runs joins it at the next step and is
    /// answered long before the long one ends (it does not wait for the batch); both answers
    /// are what each prompt gets alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_joins_a_running_generation() {
        let dir = tempfile::tempdir().expect("tmp");
        tuneforge_core::testing::write_tiny_decoder(dir.path(), "llama").expect("tiny decoder");
        let lm = Arc::new(LanguageModel::load(&dir.path().join("model.gguf")).expect("load"));
        // A seeded answer that runs long (a random model may stop early).
        let (long, alone_long) = (0..20)
            .map(|seed| {
                let s = Sampling { max_new_tokens: 400, temperature: 1.0, seed, ..Sampling::default() };
                let g = lm.generate("the cat", &s, &mut |_| {}).expect("alone");
                (s, g)
            })
            .find(|(_, g)| g.ids.len() >= 300)
            .expect("a long answer among the seeds");
        let prompt = "the cat".to_owned();
        let short = Sampling { max_new_tokens: 2, ..Sampling::default() };
        let alone_short = lm.generate("hat", &short, &mut |_| {}).expect("alone");

        let policy = BatchPolicy { max_wait: Duration::from_millis(0), ..Default::default() };
        let batcher = Arc::new(GenerationBatcher::start(lm, policy, Arc::default(), "t".into(), 1).expect("start"));
        let (started_tx, started) = oneshot::channel();
        let mut started_tx = Some(started_tx);
        let first = Box::new(move |_: &str| {
            if let Some(tx) = started_tx.take() {
                let _ = tx.send(());
            }
        });
        let b = batcher.clone();
        let running = tokio::spawn(async move { b.generate(prompt, long, first).await });
        started.await.expect("the long generation started");
        let joined = batcher.generate("hat".into(), short, Box::new(|_| {})).await.expect("short");
        assert!(!running.is_finished(), "the short answer came after the long one ended: it did not join");
        assert_eq!(joined.ids, alone_short.ids);
        let long_done = running.await.expect("task").expect("long");
        assert_eq!(long_done.ids, alone_long.ids);
    }
}
