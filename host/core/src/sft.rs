//! Instruction tuning of a decoder (`[model] task = "causal-lm"`): prompt/response pairs or
//! chat transcripts in JSONL, rendered with the model's chat template, loss only on the
//! response tokens, batches grouped by length (`train.group_by_length`), LoRA on the
//! attention and MLP projections (or full fine-tuning),
//! evaluation by validation loss and perplexity — the base model's first, so every run
//! says what tuning bought. The best LoRA weights are saved as an adapter over the base
//! model (`best/adapter_model.safetensors` + `best/tuneforge.json`), which `generate` and
//! `chat` load.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::checkpoint::{CheckpointState, Checkpoints};
use crate::experiment::{AssistantTurns, Task};
use crate::fs_atomic::{replace_dir, write_synced};
use crate::generate::ChatFormat;
use crate::gguf::GgufFile;
use crate::llama::{DecoderModel, LlamaConfig};
use crate::parallel::DataParallel;
use crate::{AdamW, AdamWConfig, CoreError, ExperimentConfig, ForwardCtx, ModelSource, ParamBuilder, PeftSpec, Result};

/// One training conversation: the turns before the answer, and the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub context: Vec<(String, String)>,
    pub response: String,
}

/// Hex SHA-256 of conversations, in order: `role \x1f text \x1e` per turn, the response,
/// `\x1d` after each conversation (the same conversations give the same hash, whatever file
/// they came from).
pub fn sft_dataset_hash(examples: &[SftExample]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for ex in examples {
        for (role, text) in &ex.context {
            hasher.update(role.as_bytes());
            hasher.update([0x1f]);
            hasher.update(text.as_bytes());
            hasher.update([0x1e]);
        }
        hasher.update(ex.response.as_bytes());
        hasher.update([0x1d]);
    }
    hex::encode(hasher.finalize())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: String,
}

/// A turn in ShareGPT's layout: `from` is `system`, `human` or `gpt` (also `user`,
/// `assistant`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareGptTurn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Pair {
        prompt: String,
        response: String,
        #[serde(default)]
        system: Option<String>,
    },
    Chat {
        messages: Vec<Message>,
    },
    /// Alpaca's `instruction`, optional `input`, `output`.
    Alpaca {
        instruction: String,
        #[serde(default)]
        input: Option<String>,
        output: String,
        #[serde(default)]
        system: Option<String>,
    },
    /// ShareGPT's `conversations`.
    ShareGpt {
        conversations: Vec<ShareGptTurn>,
    },
}

/// Reads JSONL conversations, one a line, in any of the common layouts:
/// `{"prompt": ..., "response": ...}` (optional `"system"`),
/// `{"messages": [{"role": ..., "content": ...}, ...]}` ending with the assistant's turn,
/// Alpaca's `{"instruction": ..., "input": ..., "output": ...}` (the input, when not empty,
/// after the instruction and a blank line) and ShareGPT's
/// `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`.
pub fn read_sft(path: &Path) -> Result<Vec<SftExample>> {
    let f = std::fs::File::open(path).map_err(CoreError::io(path))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(CoreError::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| CoreError::file(path, format!("line {}: {m}", i + 1));
        let parsed: Line = serde_json::from_str(&line).map_err(|_| {
            at("expected {\"prompt\": ..., \"response\": ...}, {\"messages\": [{\"role\": ..., \"content\": ...}]}, \
                {\"instruction\": ..., \"input\": ..., \"output\": ...} or {\"conversations\": [{\"from\": ..., \"value\": ...}]}"
                .into())
        })?;
        let pair = |prompt: String, response: String, system: Option<String>| {
            let mut context = Vec::new();
            if let Some(s) = system {
                context.push(("system".to_owned(), s));
            }
            context.push(("user".to_owned(), prompt));
            SftExample { context, response }
        };
        let chat = |mut messages: Vec<Message>| -> Result<SftExample> {
            let last = messages.pop().ok_or_else(|| at("the conversation is empty".into()))?;
            if last.role != "assistant" {
                return Err(at(format!("the last message must be the assistant's, not `{}`", last.role)));
            }
            if let Some(m) = messages.iter().find(|m| !crate::generate::is_chat_role(&m.role)) {
                return Err(at(format!("unknown role `{}`", m.role)));
            }
            Ok(SftExample {
                context: messages.into_iter().map(|m| (m.role, m.content)).collect(),
                response: last.content,
            })
        };
        let ex = match parsed {
            Line::Pair { prompt, response, system } => pair(prompt, response, system),
            Line::Alpaca { instruction, input, output, system } => {
                let prompt = match input.as_deref().map(str::trim) {
                    Some(i) if !i.is_empty() => format!("{instruction}\n\n{i}"),
                    _ => instruction,
                };
                pair(prompt, output, system)
            }
            Line::Chat { messages } => chat(messages)?,
            Line::ShareGpt { conversations } => {
                let messages = conversations
                    .into_iter()
                    .map(|t| {
                        let role = match t.from.as_str() {
                            "human" | "user" => "user",
                            "gpt" | "assistant" => "assistant",
                            "system" => "system",
                            other => return Err(at(format!("unknown `from` `{other}` (human, gpt or system)"))),
                        };
                        Ok(Message { role: role.to_owned(), content: t.value })
                    })
                    .collect::<Result<Vec<_>>>()?;
                chat(messages)?
            }
        };
        if ex.response.trim().is_empty() {
            return Err(at("the response is empty".into()));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(CoreError::file(path, "holds no examples"));
    }
    Ok(out)
}

/// The training and validation conversations of a `causal-lm` experiment (paths as given, or
/// relative to the working directory): a separate validation file, or a split of the training
/// file seeded by `experiment.seed` (the same split every time); `max_train_examples` applies.
pub fn load_sft_data(cfg: &ExperimentConfig) -> Result<(Vec<SftExample>, Vec<SftExample>)> {
    let mut train = read_sft(&cfg.data.train)?;
    let validation = match &cfg.data.validation {
        Some(v) => read_sft(v)?,
        None => {
            train.shuffle(&mut StdRng::seed_from_u64(cfg.experiment.seed));
            let n_val = ((train.len() as f64) * cfg.data.validation_split).round().max(1.0) as usize;
            if n_val >= train.len() {
                return Err(CoreError::Config {
                    file: "experiment".into(),
                    field: "data.validation_split".into(),
                    message: format!("leaves no training examples out of {}", train.len()),
                });
            }
            train.split_off(train.len() - n_val)
        }
    };
    if let Some(m) = cfg.data.max_train_examples {
        train.truncate(m);
    }
    Ok((train, validation))
}

impl SftExample {
    /// The conversation as `{"messages": [{"role", "content"}, ...]}` with the response as the
    /// assistant's last turn: a line [`read_sft`] reads back as this example.
    pub fn to_json(&self) -> serde_json::Value {
        let mut messages: Vec<serde_json::Value> = crate::generate::messages_json(&self.context);
        messages.push(serde_json::json!({"role": "assistant", "content": self.response}));
        serde_json::json!({ "messages": messages })
    }

    /// The turns before the answer, normalised for comparison (case and spacing do not
    /// matter): two examples with the same key ask the same thing.
    pub fn context_key(&self) -> String {
        self.context
            .iter()
            .map(|(role, text)| format!("{role}\u{1f}{}", crate::generate::normalise_text(text)))
            .collect::<Vec<_>>()
            .join("\u{1e}")
    }
}

/// Token ids and which of them carry loss (the response and its end marker).
#[derive(Debug, Clone)]
pub struct SftTokens {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
}

/// Renders and tokenizes one example: the conversation through the chat template, every
/// assistant turn's words and end marker carrying loss (the rest does not). Truncated to
/// `max_len`; `None` when nothing of the response fits.
pub fn encode_example(tok: &Tokenizer, chat: ChatFormat, ex: &SftExample, max_len: usize) -> Result<Option<SftTokens>> {
    encode_example_with(tok, chat, ex, max_len, AssistantTurns::All)
}

/// [`encode_example`] with `turns` saying which assistant turns carry loss. Runs of pieces
/// that carry loss alike are tokenized together (a single-turn example is its prompt, then
/// its answer), so pieces meet only at the chat template's markers.
pub fn encode_example_with(
    tok: &Tokenizer,
    chat: ChatFormat,
    ex: &SftExample,
    max_len: usize,
    turns: AssistantTurns,
) -> Result<Option<SftTokens>> {
    let enc = |t: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(t, false)
            .map_err(|e| CoreError::Param { name: "tokenizer".into(), message: e.to_string() })?
            .get_ids()
            .to_vec())
    };
    let pieces = chat.pieces(&ex.context, &ex.response);
    let last = pieces.len() - 1;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    let mut flush = |text: &str, loss: bool| -> Result<()> {
        let piece = enc(text)?;
        mask.extend(std::iter::repeat_n(u8::from(loss), piece.len()));
        ids.extend(piece);
        Ok(())
    };
    let (mut run, mut run_loss) = (String::new(), false);
    for (i, (text, assistant)) in pieces.iter().enumerate() {
        let loss = *assistant && (i == last || turns == AssistantTurns::All);
        if loss != run_loss && !run.is_empty() {
            flush(&run, run_loss)?;
            run.clear();
        }
        run_loss = loss;
        run.push_str(text);
    }
    flush(&run, run_loss)?;
    ids.truncate(max_len);
    mask.truncate(max_len);
    // Position 0 never carries loss (nothing predicts it); one response token must remain.
    if mask.iter().skip(1).all(|m| *m == 0) {
        return Ok(None);
    }
    Ok(Some(SftTokens { ids, loss_mask: mask }))
}

/// `best/tuneforge.json` of an instruction-tuned decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterMeta {
    pub task: Task,
    /// The base model (a model source string).
    pub base_model: String,
    pub peft: PeftSpec,
}

pub const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// Whether `dir` is an instruction-tuned adapter (a `causal-lm` run's `best/`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_FILE).is_file()
}

/// The base model's parts: config, weights, tokenizer, chat format.
pub struct Base {
    pub config: LlamaConfig,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub chat: ChatFormat,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Base {
    /// A `.gguf` file or a Hugging Face directory.
    pub fn load(path: &Path, dtype: DType) -> Result<Self> {
        if path.extension().is_some_and(|x| x == "gguf") {
            let g = GgufFile::open(path)?;
            let config = g.config()?;
            let weights = g.weights(&config, dtype)?;
            return Ok(Self {
                weights,
                tokenizer: g.tokenizer()?,
                chat: ChatFormat::from_template(g.chat_template().as_deref()),
                config,
            });
        }
        let config = LlamaConfig::read(&path.join("config.json"))?;
        let tok_path = path.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| CoreError::file(&tok_path, e.to_string()))?;
        let template = std::fs::read_to_string(path.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["chat_template"].as_str().map(str::to_owned));
        let weights = crate::llama::read_hf_weights(path)?;
        Ok(Self { config, weights, tokenizer, chat: ChatFormat::from_template(template.as_deref()) })
    }

    /// The decoder with `peft` added; only the LoRA tensors train when `peft` is LoRA
    /// (everything when it is none). `extra` overrides loaded tensors (a saved adapter).
    pub fn model(&self, peft: &PeftSpec, extra: HashMap<String, Tensor>, seed: u64) -> Result<DecoderModel> {
        self.model_on(peft, extra, seed, &Device::Cpu)
    }

    /// [`Base::model`] with the parameters on `device`.
    pub fn model_on(
        &self,
        peft: &PeftSpec,
        extra: HashMap<String, Tensor>,
        seed: u64,
        device: &Device,
    ) -> Result<DecoderModel> {
        let pb = self.builder(extra, seed, device);
        match peft {
            PeftSpec::None => pb.set_trainable(|_| true),
            _ => pb.set_trainable(PeftSpec::is_peft_param),
        }
        DecoderModel::with_peft(&self.config, pb, peft)
    }

    /// A parameter builder over the base weights, `extra` taking precedence.
    fn builder(&self, extra: HashMap<String, Tensor>, seed: u64, device: &Device) -> ParamBuilder {
        let mut weights = self.weights.clone();
        weights.extend(extra);
        ParamBuilder::with_loaded(weights, true, seed, DType::F32, device)
    }
}

/// Loads an adapter directory written by [`train_causal_lm`]: the base, with the adapter's
/// LoRA weights (frozen).
pub fn load_adapter(dir: &Path) -> Result<(DecoderModel, Tokenizer, ChatFormat)> {
    load_adapter_on(dir, &Device::Cpu)
}

/// [`load_adapter`] onto `device`.
pub fn load_adapter_on(dir: &Path, device: &Device) -> Result<(DecoderModel, Tokenizer, ChatFormat)> {
    let meta: AdapterMeta = crate::classifier::read_json(&dir.join(crate::classifier::META_FILE))?;
    let base = Base::load(&ModelSource::parse(&meta.base_model)?.resolve()?, DType::F32)?;
    let pb = base.builder(crate::weights::load_safetensors(&dir.join(ADAPTER_FILE))?, 0, device);
    pb.set_trainable(|_| false);
    pb.set_strict();
    let model = DecoderModel::with_peft(&base.config, pb, &meta.peft)?;
    Ok((model, base.tokenizer, base.chat))
}

/// When `path` is an instruction-tuned adapter: its base model and its LoRA weights, to go
/// on tuning from. The experiment's LoRA must have the adapter's shape (rank, alpha, target
/// modules, first layer; the dropout may differ).
fn adapter_start(path: &Path, peft: &PeftSpec) -> Result<Option<(ModelSource, HashMap<String, Tensor>)>> {
    if !is_adapter_dir(path) {
        return Ok(None);
    }
    let meta: AdapterMeta = crate::classifier::read_json(&path.join(crate::classifier::META_FILE))?;
    let shape = |p: &PeftSpec| match p {
        PeftSpec::Lora { rank, alpha, target_modules, first_layer, .. } => {
            Some((*rank, alpha.to_bits(), target_modules.clone(), *first_layer))
        }
        _ => None,
    };
    if shape(peft).is_none() || shape(peft) != shape(&meta.peft) {
        return Err(CoreError::Config {
            file: "experiment".into(),
            field: "peft".into(),
            message: format!("must be the LoRA of the adapter {} to go on tuning it: {:?}", path.display(), meta.peft),
        });
    }
    let weights = crate::weights::load_safetensors(&path.join(ADAPTER_FILE))?;
    Ok(Some((ModelSource::parse(&meta.base_model)?, weights)))
}

/// What one SFT optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SftStep {
    pub loss: f64,
    pub response_tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// One optimizer step of causal-LM fine-tuning on a padded batch (`ids`, `loss_mask`), in
/// `ctx` (dropout seed, mixed precision, gradient checkpointing), clipping at
/// `max_grad_norm` (0: off).
#[allow(clippy::too_many_arguments)]
pub fn sft_step(
    model: &DecoderModel,
    trainable: &[(String, candle_core::Var)],
    opt: &mut AdamW,
    ids: &Tensor,
    loss_mask: &Tensor,
    ctx: &ForwardCtx,
    max_grad_norm: f64,
    lr: f64,
) -> Result<SftStep> {
    let group = DataParallel::single();
    let batch = LmBatch { ids: ids.clone(), loss_mask: loss_mask.clone(), segments: None };
    sft_step_in(model, trainable, opt, &[&batch], &[ctx], max_grad_norm, lr, &group)
}

/// A batch of causal-LM rows: token ids and the positions that carry loss (`[b, l]`), and
/// for packed rows the lengths of the conversations in each row.
#[derive(Debug, Clone)]
pub struct LmBatch {
    pub ids: Tensor,
    pub loss_mask: Tensor,
    pub segments: Option<Vec<Vec<usize>>>,
}

impl LmBatch {
    /// The mean loss over its response tokens ([`DecoderModel::lm_loss`], or
    /// [`DecoderModel::lm_loss_packed`] for packed rows).
    pub fn loss(&self, model: &DecoderModel, ctx: &ForwardCtx) -> Result<(Tensor, usize)> {
        match &self.segments {
            Some(segments) => model.lm_loss_packed(&self.ids, &self.loss_mask, segments, ctx),
            None => model.lm_loss(&self.ids, &self.loss_mask, ctx),
        }
    }
}

/// Rows of at most `capacity` tokens holding examples of these `lengths` (first fit, the
/// longest first): the example indices of each row, in a fixed order.
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        match rows.iter_mut().find(|(used, _)| used + lengths[i] <= capacity) {
            Some((used, row)) => {
                *used += lengths[i];
                row.push(i);
            }
            None => rows.push((lengths[i], vec![i])),
        }
    }
    rows.into_iter().map(|(_, row)| row).collect()
}

/// The response tokens a batch's loss is over: the masked-in positions after the first.
fn predicted_tokens(loss_mask: &Tensor) -> Result<usize> {
    let l = loss_mask.dim(1)?;
    if l < 2 {
        return Ok(0);
    }
    Ok(loss_mask.narrow(1, 1, l - 1)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?.round() as usize)
}

/// [`sft_step`] as one rank of a data-parallel `group`, on this rank's micro-batches of the
/// step (gradient accumulation: none when a step has fewer batches than the group has
/// ranks), each computed in its own `ctxs[i]`. Every micro-batch's mean loss is weighted by
/// its share of the step's response tokens over all ranks (times the world size), so the
/// gradients averaged over the group are those of the mean loss over all the step's rows,
/// and the reported loss is that mean: the same step as one process on all those rows in one
/// batch.
#[allow(clippy::too_many_arguments)]
pub fn sft_step_in(
    model: &DecoderModel,
    trainable: &[(String, candle_core::Var)],
    opt: &mut AdamW,
    batches: &[&LmBatch],
    ctxs: &[&ForwardCtx],
    max_grad_norm: f64,
    lr: f64,
    group: &DataParallel,
) -> Result<SftStep> {
    if ctxs.len() != batches.len() {
        return Err(CoreError::Param {
            name: "ctxs".into(),
            message: format!("{} contexts for {} micro-batches", ctxs.len(), batches.len()),
        });
    }
    let device = model.device();
    let counts = batches.iter().map(|b| predicted_tokens(&b.loss_mask)).collect::<Result<Vec<_>>>()?;
    let n_local: usize = counts.iter().sum();
    let n_total = group.sum_scalar(n_local as f64, device)?.round() as usize;
    let mut grads = HashMap::new();
    let mut weighted = 0.0;
    for ((batch, ctx), &n) in batches.iter().zip(ctxs).zip(&counts) {
        let (loss, _) = batch.loss(model, ctx)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(CoreError::Diverged { step: opt.step_count() + 1, loss: value as f32 });
        }
        let weight = (n * group.world()) as f64 / n_total.max(1) as f64;
        weighted += value * weight;
        let loss = if weight == 1.0 { loss } else { (loss * weight)? };
        let store = loss.backward()?;
        crate::train::accumulate_grads(&store, trainable, &mut grads)?;
        model.checkpointed_backward(ctx, &store, trainable, &mut grads)?;
    }
    if group.is_distributed() {
        // Every rank all-reduces every trainable tensor, with or without rows of its own.
        for (name, var) in trainable {
            if !grads.contains_key(name) {
                grads.insert(name.clone(), var.zeros_like()?);
            }
        }
        group.all_reduce_mean(&mut grads)?;
    }
    let loss = group.mean_scalar(weighted, device)?;
    let grad_norm = crate::optim::grad_norm(&grads)?;
    opt.step_scaled(&grads, lr, crate::optim::clip_scale(grad_norm, max_grad_norm))?;
    Ok(SftStep { loss, response_tokens: n_total, grad_norm })
}

/// Validation loss (mean over response tokens) and token count.
fn evaluate(model: &DecoderModel, data: &[SftTokens], batch: usize, pad: u32) -> Result<(f64, usize)> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in data.chunks(batch.max(1)) {
        let (ids, mask) = collate(chunk, pad)?;
        let (loss, k) = model.lm_loss(&ids, &mask, &ForwardCtx::eval())?;
        sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
        n += k;
    }
    Ok((sum / n.max(1) as f64, n))
}

/// How a language model does on instruction data ([`evaluate_lm`]).
#[derive(Debug, Clone, Serialize)]
pub struct LmReport {
    /// Examples scored, and those with no response token within `max_len` (not scored).
    pub examples: usize,
    pub skipped_too_long: usize,
    /// The tokens the loss is over (responses and their end markers).
    pub response_tokens: usize,
    /// Mean cross-entropy over the response tokens (nats), and its exponential.
    pub loss: f64,
    pub perplexity: f64,
    pub seconds: f64,
    /// Every token read (prompts included) per second.
    pub tokens_per_s: f64,
}

/// Scores `model` (with its tokenizer and chat format) on `examples` as instruction tuning
/// validates: the mean loss over the response tokens of each conversation rendered with the
/// chat template and cut to `max_len` tokens, in batches of `batch` (length-sorted).
pub fn evaluate_lm(
    model: &DecoderModel,
    tok: &Tokenizer,
    chat: ChatFormat,
    examples: &[SftExample],
    max_len: usize,
    batch: usize,
    turns: AssistantTurns,
) -> Result<LmReport> {
    let started = std::time::Instant::now();
    let mut data = Vec::with_capacity(examples.len());
    for ex in examples {
        data.extend(encode_example_with(tok, chat, ex, max_len, turns)?);
    }
    if data.is_empty() {
        return Err(CoreError::Config {
            file: "data".into(),
            field: "max_len".into(),
            message: format!("{max_len} tokens leave no response token in any of the {} examples", examples.len()),
        });
    }
    // The mean is over tokens: the order does not matter, and sorted batches pad less.
    data.sort_by_key(|t| t.ids.len());
    let pad = model.config().eos_ids().first().copied().unwrap_or(0);
    let (loss, response_tokens) = evaluate(model, &data, batch, pad)?;
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = data.iter().map(|t| t.ids.len()).sum();
    Ok(LmReport {
        examples: data.len(),
        skipped_too_long: examples.len() - data.len(),
        response_tokens,
        loss,
        perplexity: loss.exp(),
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
    })
}

/// What a language model answered to each conversation, against the reference answers.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    pub examples: usize,
    /// The share of answers equal to the reference (case and spacing aside).
    pub exact_match: f64,
    /// Each conversation's generated answer and whether it matched, in the order given.
    pub answers: Vec<(String, bool)>,
    pub seconds: f64,
    /// New tokens per second over all answers.
    pub tokens_per_s: f64,
}

/// Greedy answers of `lm` to the conversations of `examples` (at most `max_new_tokens` each,
/// `batch` at a time), scored by exact match against their responses.
pub fn generation_scores(
    lm: &crate::generate::LanguageModel,
    examples: &[SftExample],
    max_new_tokens: usize,
    batch: usize,
) -> Result<GenerationReport> {
    let started = std::time::Instant::now();
    let sampling = crate::generate::Sampling { max_new_tokens, ..Default::default() };
    let mut answers = Vec::with_capacity(examples.len());
    let mut generated = 0;
    for chunk in examples.chunks(batch.max(1)) {
        let requests: Vec<_> = chunk.iter().map(|e| (lm.chat.render(&e.context), sampling.clone())).collect();
        for (e, out) in chunk.iter().zip(lm.generate_batch(&requests, &mut |_, _| {})?) {
            let out = out?;
            generated += out.ids.len();
            let matched = crate::generate::normalise_text(&out.text) == crate::generate::normalise_text(&e.response);
            answers.push((out.text, matched));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let matched = answers.iter().filter(|(_, m)| *m).count();
    Ok(GenerationReport {
        examples: answers.len(),
        exact_match: matched as f64 / answers.len().max(1) as f64,
        answers,
        seconds,
        tokens_per_s: generated as f64 / seconds.max(1e-9),
    })
}

/// One epoch's batches of example indices, in a seeded random order. With `group`, the
/// shuffled examples are cut into windows of 50 batches and sorted by length inside each
/// window, so a batch holds examples of similar length (less padding) while the order of
/// the batches stays random.
pub fn length_grouped_batches(lengths: &[usize], batch: usize, group: bool, seed: u64) -> Vec<Vec<usize>> {
    let batch = batch.max(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    if group {
        for window in order.chunks_mut(batch * 50) {
            window.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(batch).map(<[usize]>::to_vec).collect();
    if group {
        batches.shuffle(&mut rng);
    }
    batches
}

/// Right-padded `[b, l]` ids and loss mask (pads carry no loss; causal attention keeps real
/// tokens from seeing them).
/// The batch of `units` (indices into `units`, each a row of examples): packed rows with
/// their conversations' lengths, or one example a row.
fn collate_units(data: &[SftTokens], units: &[Vec<usize>], batch: &[usize], packed: bool, pad: u32) -> Result<LmBatch> {
    if !packed {
        let (ids, loss_mask) = collate(&batch.iter().map(|&u| &data[units[u][0]]).collect::<Vec<_>>(), pad)?;
        return Ok(LmBatch { ids, loss_mask, segments: None });
    }
    let rows: Vec<SftTokens> = batch
        .iter()
        .map(|&u| SftTokens {
            ids: units[u].iter().flat_map(|&i| data[i].ids.iter().copied()).collect(),
            loss_mask: units[u].iter().flat_map(|&i| data[i].loss_mask.iter().copied()).collect(),
        })
        .collect();
    let (ids, loss_mask) = collate(&rows, pad)?;
    let segments = batch.iter().map(|&u| units[u].iter().map(|&i| data[i].ids.len()).collect()).collect();
    Ok(LmBatch { ids, loss_mask, segments: Some(segments) })
}

fn collate<R: std::borrow::Borrow<SftTokens>>(rows: &[R], pad: u32) -> Result<(Tensor, Tensor)> {
    let l = rows.iter().map(|r| r.borrow().ids.len()).max().unwrap_or(2).max(2);
    let mut ids = Vec::with_capacity(rows.len() * l);
    let mut mask = Vec::with_capacity(rows.len() * l);
    for r in rows {
        let r = r.borrow();
        ids.extend(&r.ids);
        ids.extend(std::iter::repeat_n(pad, l - r.ids.len()));
        mask.extend(r.loss_mask.iter().map(|m| f32::from(*m)));
        mask.extend(std::iter::repeat_n(0f32, l - r.ids.len()));
    }
    Ok((Tensor::from_vec(ids, (rows.len(), l), &Device::Cpu)?, Tensor::from_vec(mask, (rows.len(), l), &Device::Cpu)?))
}

/// What an instruction-tuning run did.
#[derive(Debug, Clone, Serialize)]
pub struct SftSummary {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub best_model_dir: PathBuf,
    pub task: Task,
    pub base_model: String,
    pub peft: PeftSpec,
    pub params_trainable: usize,
    pub params_total: usize,
    pub trainable_ratio: f64,
    pub n_train: usize,
    pub n_validation: usize,
    pub skipped_too_long: usize,
    /// `completed`, or `stopped` (by `stop_after_steps`; resume with `--resume`).
    pub status: String,
    pub total_steps: u64,
    /// [`sft_dataset_hash`] of the training conversations.
    pub dataset_hash: String,
    pub steps: u64,
    pub base_validation_loss: f64,
    pub base_perplexity: f64,
    pub validation_loss: f64,
    pub perplexity: f64,
    pub best_step: u64,
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    /// The step where early stopping (`train.early_stopping_patience`) ended the run.
    pub early_stopped_at: Option<u64>,
}

/// Runs a `causal-lm` experiment; `on_line` receives progress lines.
pub fn train_causal_lm(cfg: ExperimentConfig, on_line: &mut dyn FnMut(&str)) -> Result<SftSummary> {
    train_causal_lm_in(cfg, &crate::RunOptions::default(), None, on_line, &mut |_| {})
}

/// [`train_causal_lm`] as a rank of a data-parallel `group` (`None`: the group this process
/// was launched into by `tuneforge train --gpus N`, or a group of one): every rank holds
/// the whole model, a step takes one batch per rank ([`sft_step_in`]), so it covers
/// `batch_size × ranks` rows, like one process with that batch size; rank 0 alone writes
/// the run directory, the others work in a temporary one. `on_event` hears the run start,
/// each step and each validation (what the experiment store records).
///
/// `options`: `stop_after_steps` stops with a checkpoint (status `stopped`); `resume`
/// continues a run directory from its latest checkpoint (written after every epoch and at a
/// stop) on the same trajectory — data order, dropout and schedule follow the seed, the
/// epoch and the step. `cfg` is then the run's own `config.toml`.
pub fn train_causal_lm_in(
    mut cfg: ExperimentConfig,
    options: &crate::RunOptions,
    group: Option<&DataParallel>,
    on_line: &mut dyn FnMut(&str),
    on_event: &mut dyn FnMut(crate::TrainEvent<'_>),
) -> Result<SftSummary> {
    let cwd = std::env::current_dir().map_err(CoreError::io("."))?;
    cfg.absolutize(&cwd);
    let t = cfg.train.clone();
    let seed = cfg.experiment.seed;
    // The device first: a run that cannot start leaves nothing behind.
    t.precision.check(&cfg.run.device).map_err(|message| CoreError::Config {
        file: "experiment".into(),
        field: "train.precision".into(),
        message,
    })?;
    let device = cfg.run.device.open()?;
    let mut from_env = None;
    let group = DataParallel::given_or_from_env(group, &mut from_env, &device)?;
    // Ranks other than 0 write nothing that lasts.
    let scratch =
        if group.is_primary() { None } else { Some(tempfile::tempdir().map_err(CoreError::io(std::env::temp_dir()))?) };
    if let Some(dir) = &scratch {
        cfg.experiment.output_dir = dir.path().to_path_buf();
    }
    // The run to resume (every rank reads its checkpoint), and where this rank writes.
    let resumed = options.resume.as_ref().map(crate::RunDir::new);
    if let Some(r) = &resumed
        && !r.config().is_file()
    {
        return Err(CoreError::file(r.root(), "is not a run directory (config.toml is missing)"));
    }
    let run = match (&resumed, &scratch) {
        (Some(r), None) => r.clone(),
        _ => {
            let run = crate::run::create_run_dir(
                &cfg.experiment.output_dir,
                &crate::new_run_id(cfg.experiment.name.as_deref()),
            )?;
            crate::fs_atomic::write_atomic(&run.config(), cfg.to_toml().as_bytes())?;
            run
        }
    };
    let given = ModelSource::parse(&cfg.model.source)?;
    let peft = cfg.peft.spec();
    // An adapter as the source: tuning goes on from its LoRA weights, over its base model
    // (which the new adapter names too).
    let (source, start) = match adapter_start(&given.resolve()?, &peft)? {
        Some((base_source, weights)) => {
            on_line(&format!("starting from the adapter {} (base {})", given.spec(), base_source.spec()));
            (base_source, weights)
        }
        None => (given, HashMap::new()),
    };
    let base = Base::load(&source.resolve()?, DType::F32)?;
    let model = base.model_on(&peft, start, seed, &device)?;
    let (n_trainable, n_total) = (model.params().n_trainable(), model.params().n_params());
    on_line(&format!(
        "model: {} ({} layers), {n_trainable} of {n_total} parameters train ({:.2}%)",
        source.spec(),
        base.config.num_hidden_layers,
        100.0 * n_trainable as f64 / n_total.max(1) as f64
    ));

    let (train, validation) = load_sft_data(&cfg)?;
    let mut skipped = 0;
    let turns = cfg.data.assistant_turns.unwrap_or_default();
    let mut encode_all = |rows: &[SftExample]| -> Result<Vec<SftTokens>> {
        let mut out = Vec::new();
        for r in rows {
            match encode_example_with(&base.tokenizer, base.chat, r, cfg.model.max_len, turns)? {
                Some(e) => out.push(e),
                None => skipped += 1,
            }
        }
        Ok(out)
    };
    let train_tok = encode_all(&train)?;
    let val_tok = encode_all(&validation)?;
    if train_tok.is_empty() || val_tok.is_empty() {
        return Err(CoreError::Config {
            file: "experiment".into(),
            field: "model.max_len".into(),
            message: format!("{} leaves no response tokens in the training or validation examples", cfg.model.max_len),
        });
    }
    let pad = base.config.eos_ids().first().copied().unwrap_or(0);
    let eval_bs = t.eval_batch_size.unwrap_or(t.batch_size);
    let (base_loss, val_tokens) = evaluate(&model, &val_tok, eval_bs, pad)?;
    on_line(&format!(
        "base model: validation loss {base_loss:.4}, perplexity {:.2} over {val_tokens} response tokens",
        base_loss.exp()
    ));
    let dataset_hash = sft_dataset_hash(&train);

    let trainable = model.params().trainable();
    let mut opt = AdamW::new(trainable.clone(), AdamWConfig { weight_decay: t.weight_decay, ..Default::default() })?;
    // A step takes one batch per rank: `batch_size × ranks` rows.
    // A step takes `grad_accum` batches on every rank.
    let per_step = group.world() * t.grad_accum.max(1);
    // The rows a batch is made of: one example each, or (packing) several in `max_len`.
    let units: Vec<Vec<usize>> = if t.packing {
        pack(&train_tok.iter().map(|e| e.ids.len()).collect::<Vec<_>>(), cfg.model.max_len)
    } else {
        (0..train_tok.len()).map(|i| vec![i]).collect()
    };
    if t.packing {
        on_line(&format!(
            "packing: {} conversations in {} rows of {} tokens",
            train_tok.len(),
            units.len(),
            cfg.model.max_len
        ));
    }
    let steps_per_epoch = units.len().div_ceil(t.batch_size.max(1) * per_step) as u64;
    let total = steps_per_epoch * t.epochs;
    let warmup = t.warmup_steps.unwrap_or((t.warmup_ratio * total as f64).round() as u64);
    let schedule = crate::LrSchedule { kind: t.schedule, peak_lr: t.lr, warmup_steps: warmup, total_steps: total };
    let checkpoints = Checkpoints::new(run.checkpoints(), t.keep_checkpoints);
    // `batch_in_epoch` counts steps (one batch per rank each); `best_metric` is minus the
    // best validation loss (higher is better, as for classifiers).
    let mut state = CheckpointState::start(seed);
    if let Some(r) = &resumed {
        crate::fs_atomic::recover_dir(&run.best())?;
        let (at, dir) = crate::checkpoint::resume(r, t.keep_checkpoints, model.params(), &mut opt)?;
        state = at;
        on_line(&format!("resuming at step {} of {total} from {}", state.step, dir.display()));
    }
    let mut log = crate::run::MetricsLog::open(&run.metrics(), resumed.as_ref().map(|_| state.step))?;
    if resumed.is_none() {
        log.append(
            &serde_json::json!({"kind": "eval", "step": 0, "validation_loss": base_loss, "perplexity": base_loss.exp()}),
        )?;
    }
    let best_dir = run.best();
    let lengths: Vec<usize> = units.iter().map(|u| u.iter().map(|&i| train_tok[i].ids.len()).sum()).collect();
    on_event(crate::TrainEvent::Started {
        run: &run,
        start_step: state.step,
        total_steps: total,
        n_train: train_tok.len(),
        n_validation: val_tok.len(),
        n_trainable,
        n_params: n_total,
        plugins: &[],
    });
    if resumed.is_none() {
        on_event(crate::TrainEvent::LmEvaluated {
            step: 0,
            loss: base_loss,
            perplexity: base_loss.exp(),
            improved: false,
        });
    }
    let save = |state: &CheckpointState, opt: &AdamW| -> Result<PathBuf> {
        let tensors: Vec<(String, Tensor)> =
            trainable.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        checkpoints.save(state, &tensors, &opt.state_tensors()?)
    };
    let mut stopped = false;
    let mut checkpointed_at = resumed.as_ref().map(|_| state.step);
    'epochs: while state.epoch < t.epochs {
        let batches = length_grouped_batches(&lengths, t.batch_size, t.group_by_length, seed.wrapping_add(state.epoch));
        let steps: Vec<&[Vec<usize>]> = batches.chunks(per_step).collect();
        while let Some(step_batches) = steps.get(state.batch_in_epoch) {
            if options.stop_after_steps.is_some_and(|s| state.step >= s) {
                stopped = true;
                break 'epochs;
            }
            let started = Instant::now();
            // This rank's batches of the step: every `world`-th (none in an epoch's last step
            // with fewer batches left than ranks), each with its own dropout seed.
            let collated = step_batches
                .iter()
                .skip(group.rank())
                .step_by(group.world())
                .map(|b| collate_units(&train_tok, &units, b, t.packing, pad))
                .collect::<Result<Vec<_>>>()?;
            let step_seed = seed.wrapping_mul(31).wrapping_add(state.step);
            let ctxs: Vec<ForwardCtx> = (0..collated.len())
                .map(|m| {
                    let micro_seed = if m == 0 { step_seed } else { step_seed ^ (m as u64).wrapping_mul(0x9E37_79B9) };
                    crate::StepMode::from_config(&t).ctx(micro_seed)
                })
                .collect();
            let lr = schedule.lr(state.step);
            let batches: Vec<&LmBatch> = collated.iter().collect();
            let ctx_refs: Vec<&ForwardCtx> = ctxs.iter().collect();
            let SftStep { loss: value, response_tokens: n, grad_norm } =
                sft_step_in(&model, &trainable, &mut opt, &batches, &ctx_refs, t.max_grad_norm, lr, group).map_err(
                    |e| match e {
                        CoreError::Diverged { loss, .. } => CoreError::Diverged { step: state.step + 1, loss },
                        other => other,
                    },
                )?;
            state.step += 1;
            state.batch_in_epoch += 1;
            let secs = started.elapsed().as_secs_f64();
            // The whole group's tokens.
            let batch_tokens: usize = step_batches.iter().flatten().map(|&u| lengths[u]).sum();
            state.tokens_seen += batch_tokens as u64;
            state.train_seconds += secs;
            let step = state.step;
            log.append(
                &serde_json::json!({"kind": "train", "step": step, "epoch": state.epoch, "loss": value, "lr": lr,
                "grad_norm": grad_norm, "tokens": batch_tokens, "response_tokens": n, "seconds": secs}),
            )?;
            let tokens_per_s = state.tokens_seen as f64 / state.train_seconds.max(1e-9);
            on_event(crate::TrainEvent::Step { step, total_steps: total, loss: value, lr, tokens_per_s });
            if step.is_multiple_of(10) || step == total {
                on_line(&format!("step {step}/{total} loss {value:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"));
            }
            // Validation after each epoch, or every `eval_every_steps` steps (and at the end).
            let epoch_done = state.batch_in_epoch >= steps.len();
            let eval_due = if t.eval_every_steps > 0 {
                step.is_multiple_of(t.eval_every_steps) || step == total
            } else {
                epoch_done
            };
            if !eval_due {
                continue;
            }
            if epoch_done {
                state.epoch += 1;
                state.batch_in_epoch = 0;
            }
            let (val, _) = evaluate(&model, &val_tok, eval_bs, pad)?;
            log.append(
                &serde_json::json!({"kind": "eval", "step": step, "epoch": state.epoch, "validation_loss": val,
                "perplexity": val.exp()}),
            )?;
            // The best metric is minus the validation loss (higher is better, as for classifiers).
            let better = state.record_evaluation(-val, t.early_stopping_min_delta, t.early_stopping_patience);
            on_event(crate::TrainEvent::LmEvaluated { step, loss: val, perplexity: val.exp(), improved: better });
            on_line(&format!(
                "eval at step {step}: validation loss {val:.4}, perplexity {:.2}{}",
                val.exp(),
                if better { " (best so far, saved)" } else { "" }
            ));
            if better {
                save_best(
                    &model,
                    &best_dir,
                    &AdapterMeta { task: Task::CausalLm, base_model: source.spec(), peft: peft.clone() },
                )?;
            }
            let dir = save(&state, &opt)?;
            checkpointed_at = Some(state.step);
            on_event(crate::TrainEvent::Checkpointed { step: state.step, dir: &dir });
            if let Some(at) = state.early_stopped_at {
                on_line(&format!(
                    "early stopping at step {at}: no improvement of the validation loss by more than {} in {} \
                     evaluations",
                    t.early_stopping_min_delta, state.evals_without_improvement
                ));
                break 'epochs;
            }
            if epoch_done {
                continue 'epochs;
            }
        }
        // An epoch that ended between evaluations.
        state.epoch += 1;
        state.batch_in_epoch = 0;
    }
    if checkpointed_at != Some(state.step) {
        let dir = save(&state, &opt)?;
        on_event(crate::TrainEvent::Checkpointed { step: state.step, dir: &dir });
    }
    let best_loss = state.best_metric.map_or(f64::NAN, |b| -b);
    let summary = SftSummary {
        run_id: run.id(),
        run_dir: run.root().to_path_buf(),
        best_model_dir: best_dir,
        task: Task::CausalLm,
        base_model: source.spec(),
        peft,
        params_trainable: n_trainable,
        params_total: n_total,
        trainable_ratio: n_trainable as f64 / n_total.max(1) as f64,
        n_train: train_tok.len(),
        n_validation: val_tok.len(),
        skipped_too_long: skipped,
        status: if stopped { "stopped" } else { "completed" }.into(),
        steps: state.step,
        total_steps: total,
        base_validation_loss: base_loss,
        base_perplexity: base_loss.exp(),
        validation_loss: best_loss,
        perplexity: best_loss.exp(),
        best_step: state.best_step.unwrap_or(0),
        train_seconds: state.train_seconds,
        tokens_per_s: state.tokens_seen as f64 / state.train_seconds.max(1e-9),
        early_stopped_at: state.early_stopped_at,
        dataset_hash,
    };
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| CoreError::file(run.summary(), e.to_string()))?;
    crate::fs_atomic::write_atomic(&run.summary(), &json)?;
    Ok(summary)
}

/// Writes the trainable tensors (the LoRA weights, or every weight for full fine-tuning)
/// and the metadata into `dir`, atomically.
fn save_best(model: &DecoderModel, dir: &Path, meta: &AdapterMeta) -> Result<()> {
    let staging = crate::export::stage(dir)?;
    let tensors: Vec<(String, Tensor)> =
        model.params().trainable().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    write_synced(&staging.join(ADAPTER_FILE), &crate::weights::to_safetensors_bytes(&tensors)?)?;
    let json = serde_json::to_vec_pretty(meta).map_err(|e| CoreError::file(dir, e.to_string()))?;
    write_synced(&staging.join(crate::classifier::META_FILE), &json)?;
    replace_dir(&staging, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The common JSONL layouts read into the same conversations; a bad line is named.
    #[test]
    fn every_common_jsonl_layout_reads() -> Result<()> {
        let dir = tempfile::tempdir().map_err(CoreError::io("tmp"))?;
        let path = dir.path().join("mixed.jsonl");
        let lines = [
            r#"{"prompt": "p1", "response": "r1", "system": "s"}"#,
            r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#,
            r#"{"instruction": "Translate", "input": "chat", "output": "cat"}"#,
            r#"{"instruction": "Say hi", "input": "", "output": "hi"}"#,
            r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}"#,
        ];
        std::fs::write(&path, lines.join("\n")).map_err(CoreError::io(&path))?;
        let read = read_sft(&path)?;
        let turn = |r: &str, c: &str| (r.to_owned(), c.to_owned());
        let want = [
            SftExample { context: vec![turn("system", "s"), turn("user", "p1")], response: "r1".into() },
            SftExample { context: vec![turn("user", "u")], response: "a".into() },
            SftExample { context: vec![turn("user", "Translate\n\nchat")], response: "cat".into() },
            SftExample { context: vec![turn("user", "Say hi")], response: "hi".into() },
            SftExample {
                context: vec![turn("system", "s"), turn("user", "q1"), turn("assistant", "a1"), turn("user", "q2")],
                response: "a2".into(),
            },
        ];
        assert_eq!(read, want);
        for (bad, says) in [
            (r#"{"conversations": [{"from": "bot", "value": "x"}]}"#, "unknown `from` `bot`"),
            (r#"{"conversations": []}"#, "the conversation is empty"),
            (r#"{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}"#, "assistant's"),
            (r#"{"instruction": "x"}"#, "expected"),
        ] {
            std::fs::write(&path, format!("{}\n{bad}\n", lines[0])).map_err(CoreError::io(&path))?;
            let e = read_sft(&path).expect_err(bad).to_string();
            assert!(e.contains("line 2") && e.contains(says), "{bad}: {e}");
        }
        Ok(())
    }

    fn padded(lengths: &[usize], batches: &[Vec<usize>]) -> usize {
        batches.iter().map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0)).sum()
    }

    #[test]
    fn length_grouping_covers_every_example_once_and_pads_less() {
        let mut rng = StdRng::seed_from_u64(1);
        let lengths: Vec<usize> = (0..1000).map(|_| rand::Rng::random_range(&mut rng, 5..200)).collect();
        for group in [false, true] {
            let b = length_grouped_batches(&lengths, 8, group, 3);
            let mut all: Vec<usize> = b.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..1000).collect::<Vec<_>>());
            assert_eq!(b, length_grouped_batches(&lengths, 8, group, 3), "seeded");
        }
        let (plain, grouped) = (
            padded(&lengths, &length_grouped_batches(&lengths, 8, false, 3)),
            padded(&lengths, &length_grouped_batches(&lengths, 8, true, 3)),
        );
        let real: usize = lengths.iter().sum();
        assert!(grouped - real < (plain - real) / 4, "padding {} grouped vs {} plain", grouped - real, plain - real);
    }
}
