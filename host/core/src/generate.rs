//! Text generation with a decoder: a loaded language model (weights, tokenizer, chat
//! format, stop tokens), sampling (greedy, temperature, top-k, top-p, repetition penalty),
//! and the token loop over a KV cache, streaming each piece of text as it is decoded.

use std::path::Path;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokenizers::Tokenizer;

use crate::layers::ForwardCtx;
use crate::llama::{DecoderModel, KvCache};
use crate::{CoreError, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// > 1 makes tokens already in the context less likely (CTRL's penalty; 1: off).
    pub repetition_penalty: f64,
    pub seed: u64,
    /// The text ends before the first of these strings (generation stops there).
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl Sampling {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("top_p must be in (0, 1], got {p}"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be positive, got {}", self.repetition_penalty));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop: a stop string is empty".into());
        }
        Ok(())
    }
}

/// Where the first of the `stop` strings begins in `text`.
fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How many bytes at the end of `text` might be the start of a stop string, and so cannot
/// be shown yet.
fn held_back(text: &str, stop: &[String]) -> usize {
    stop.iter()
        .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k])))
        .max()
        .unwrap_or(0)
}

/// Chooses a token from one row of logits, given the tokens so far.
pub fn sample(logits: &[f32], context: &[u32], s: &Sampling, rng: &mut StdRng) -> u32 {
    let mut l: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    if s.repetition_penalty != 1.0 {
        for &t in context {
            if let Some(v) = l.get_mut(t as usize) {
                *v = if *v > 0.0 { *v / s.repetition_penalty } else { *v * s.repetition_penalty };
            }
        }
    }
    let argmax = |l: &[f64]| l.iter().enumerate().fold(0, |b, (i, v)| if *v > l[b] { i } else { b }) as u32;
    if s.temperature == 0.0 {
        return argmax(&l);
    }
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    if let Some(k) = s.top_k {
        order.truncate(k.max(1));
    }
    let max = l[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| ((l[i] - max) / s.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = s.top_p {
        let mut acc = 0.0;
        let keep = probs.iter().position(|q| {
            acc += q;
            acc >= p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut r: f64 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if r < *p {
            return order[i] as u32;
        }
        r -= p;
    }
    order[order.len() - 1] as u32
}

/// How conversations become a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (Qwen2, SmolLM2; the default).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
    /// DeepSeek-R1's distilled models (Qwen2 and Llama): the system prompt after the
    /// begin-of-sentence token, then `<｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜>`
    /// (an earlier answer's reasoning, up to its `</think>`, left out); `think`: the answer
    /// starts with `<think>\n`, as the model's template opens its reasoning.
    DeepSeek { think: bool },
}

/// DeepSeek's chat template in Jinja (what [`ChatFormat::render`] writes), ending with `$tail`
/// (the generation prompt).
macro_rules! deepseek_jinja {
    ($tail:literal) => {
        concat!(
            "{% set ns = namespace(system='') %}{% for message in messages %}",
            "{% if message['role'] == 'system' %}{% if ns.system %}{% set ns.system = ns.system + '\\n\\n' %}",
            "{% endif %}{% set ns.system = ns.system + message['content'] %}{% endif %}{% endfor %}",
            "{{ '<｜begin▁of▁sentence｜>' + ns.system }}{% for message in messages %}",
            "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}",
            "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}",
            "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}",
            "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}",
            $tail
        )
    };
}

/// DeepSeek's markers.
const DS_BOS: &str = "<｜begin▁of▁sentence｜>";
const DS_USER: &str = "<｜User｜>";
const DS_ASSISTANT: &str = "<｜Assistant｜>";
const DS_EOS: &str = "<｜end▁of▁sentence｜>";

/// A DeepSeek conversation's system prompt: its system messages, in order, a blank line
/// between them.
fn deepseek_system(messages: &[(String, String)]) -> String {
    messages.iter().filter(|(r, _)| r == "system").map(|(_, c)| c.as_str()).collect::<Vec<_>>().join("\n\n")
}

/// An earlier answer as DeepSeek's template shows it: without its reasoning.
fn without_reasoning(content: &str) -> &str {
    content.rsplit_once("</think>").map_or(content, |(_, answer)| answer)
}

impl ChatFormat {
    /// The format a chat template (Jinja text from the model) uses.
    pub fn from_template(template: Option<&str>) -> Self {
        match template {
            Some(t) if t.contains("<|start_header_id|>") => Self::Llama3,
            Some(t) if t.contains(DS_ASSISTANT) => {
                Self::DeepSeek { think: t.contains(&format!("{DS_ASSISTANT}<think>")) }
            }
            _ => Self::ChatMl,
        }
    }

    /// The prompt for `messages` (role, content), ending where the assistant's answer starts.
    pub fn render(&self, messages: &[(String, String)]) -> String {
        let mut out = String::new();
        match self {
            Self::ChatMl => {
                for (role, content) in messages {
                    out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
                }
                out.push_str("<|im_start|>assistant\n");
            }
            Self::Llama3 => {
                out.push_str("<|begin_of_text|>");
                for (role, content) in messages {
                    out.push_str(&format!("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"));
                }
                out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
            Self::DeepSeek { think } => {
                out.push_str(DS_BOS);
                out.push_str(&deepseek_system(messages));
                for (role, content) in messages {
                    match role.as_str() {
                        "user" => out.push_str(&format!("{DS_USER}{content}")),
                        "assistant" => out.push_str(&format!("{DS_ASSISTANT}{}{DS_EOS}", without_reasoning(content))),
                        _ => {}
                    }
                }
                out.push_str(DS_ASSISTANT);
                if *think {
                    out.push_str("<think>\n");
                }
            }
        }
        out
    }

    /// The conversation `context` then `response` as [`ChatFormat::render`] and the end
    /// marker write it, in pieces: `(text, true)` for an assistant's words with their end
    /// marker (the final response's last), `(text, false)` for everything else.
    pub fn pieces(&self, context: &[(String, String)], response: &str) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let (header, end, after_end) = match self {
            Self::ChatMl => ("<|im_start|>{role}\n", "<|im_end|>", "\n"),
            Self::Llama3 => ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ""),
            Self::DeepSeek { .. } => {
                out.push((format!("{DS_BOS}{}", deepseek_system(context)), false));
                for (role, content) in context {
                    match role.as_str() {
                        "user" => out.push((format!("{DS_USER}{content}"), false)),
                        "assistant" => {
                            out.push((DS_ASSISTANT.to_owned(), false));
                            out.push((format!("{}{DS_EOS}", without_reasoning(content)), true));
                        }
                        _ => {}
                    }
                }
                out.push((DS_ASSISTANT.to_owned(), false));
                out.push((format!("{response}{DS_EOS}"), true));
                return out;
            }
        };
        if *self == Self::Llama3 {
            out.push(("<|begin_of_text|>".to_owned(), false));
        }
        for (role, content) in context {
            out.push((header.replace("{role}", role), false));
            out.push((format!("{content}{end}"), role == "assistant"));
            out.push((after_end.to_owned(), false));
        }
        out.push((header.replace("{role}", "assistant"), false));
        out.push((format!("{response}{end}"), true));
        out
    }

    /// A Jinja chat template of this format, as Hugging Face's `tokenizer_config.json`
    /// carries one (what [`ChatFormat::render`] writes, `add_generation_prompt` adding the
    /// assistant's header); [`ChatFormat::from_template`] reads it back as this format.
    pub fn jinja(&self) -> &'static str {
        match self {
            Self::ChatMl => {
                "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + \
                 '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}\
                 {% endif %}"
            }
            Self::Llama3 => {
                "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + \
                 '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}\
                 {% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
            }
            Self::DeepSeek { think: true } => {
                deepseek_jinja!("{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
            }
            Self::DeepSeek { think: false } => {
                deepseek_jinja!("{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
            }
        }
    }

    /// Tokens that end an answer in this format.
    pub fn stop_strings(&self) -> &'static [&'static str] {
        match self {
            Self::ChatMl => &["<|im_end|>", "<|endoftext|>"],
            Self::Llama3 => &["<|eot_id|>", "<|end_of_text|>"],
            Self::DeepSeek { .. } => &[DS_EOS],
        }
    }
}

/// The roles a conversation's turns take.
pub fn is_chat_role(role: &str) -> bool {
    matches!(role, "system" | "user" | "assistant")
}

/// A conversation's turns as chat APIs and instruction data write them:
/// `[{"role": ..., "content": ...}, ...]`.
pub fn messages_json(turns: &[(String, String)]) -> Vec<serde_json::Value> {
    turns.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect()
}

/// Text as answers and questions are compared: case and spacing do not matter.
pub fn normalise_text(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Whether `path` holds a language model that [`LanguageModel::load`] takes rather than a
/// classifier: an instruction-tuned adapter, a `.gguf` file, or a Hugging Face decoder
/// directory (a `config.json` of a Llama or Qwen2 model, without a classifier's
/// `tuneforge.json`).
pub fn is_language_model(path: &Path) -> bool {
    let decoder_dir = || {
        let Ok(text) = std::fs::read_to_string(path.join("config.json")) else { return false };
        let Ok(config) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
        matches!(config["model_type"].as_str(), Some("llama" | "qwen2")) && !path.join("tuneforge.json").exists()
    };
    crate::sft::is_adapter_dir(path)
        || (path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
        || decoder_dir()
}

/// A decoder ready to generate: model, tokenizer, chat format and stop tokens.
#[derive(Debug)]
pub struct LanguageModel {
    pub model: DecoderModel,
    pub tokenizer: Tokenizer,
    pub chat: ChatFormat,
    pub stop: Vec<u32>,
}

impl LanguageModel {
    /// Loads a `.gguf` file, a Hugging Face directory (`config.json`, safetensors,
    /// `tokenizer.json`, optionally `tokenizer_config.json` with a chat template), or an
    /// instruction-tuned adapter (`tuneforge train` with `task = "causal-lm"`: its `best/`).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_on(path, &candle_core::Device::Cpu)
    }

    /// [`LanguageModel::load`] onto `device`.
    pub fn load_on(path: &Path, device: &candle_core::Device) -> Result<Self> {
        if crate::sft::is_adapter_dir(path) {
            let (model, tokenizer, chat) = crate::sft::load_adapter_on(path, device)?;
            return Ok(Self::assemble(model, tokenizer, chat));
        }
        let base = crate::sft::Base::load(path, DType::F32)?;
        let model = DecoderModel::from_weights_on(&base.config, base.weights, DType::F32, device)?;
        Ok(Self::assemble(model, base.tokenizer, base.chat))
    }

    /// The same model with int8 projections for CPU inference
    /// ([`DecoderModel::quantize_int8`]).
    pub fn quantize_int8(self) -> Result<Self> {
        Ok(Self { model: self.model.quantize_int8()?, ..self })
    }

    fn assemble(model: DecoderModel, tokenizer: Tokenizer, chat: ChatFormat) -> Self {
        let model = model.keep_transposed();
        let mut stop = model.config().eos_ids();
        for s in chat.stop_strings() {
            if let Some(id) = tokenizer.token_to_id(s) {
                stop.push(id);
            }
        }
        stop.sort_unstable();
        stop.dedup();
        Self { model, tokenizer, chat, stop }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| CoreError::Param { name: "tokenizer".into(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| CoreError::Param { name: "tokenizer".into(), message: e.to_string() })
    }

    /// Generates after `prompt` (already formatted), calling `on_text` with each new piece
    /// of settled text; returns the generated ids (without the stop token).
    pub fn generate(&self, prompt: &str, s: &Sampling, on_text: &mut dyn FnMut(&str)) -> Result<Generated> {
        let mut results = self.generate_batch(&[(prompt.to_owned(), s.clone())], &mut |_, t| on_text(t))?;
        results.pop().unwrap_or_else(|| Err(CoreError::Param { name: "prompt".into(), message: "no answer".into() }))
    }

    /// The prompt's ids, if the request can run.
    fn prompt_ids(&self, prompt: &str, s: &Sampling) -> Result<Vec<u32>> {
        s.validate().map_err(|message| CoreError::Param { name: "sampling".into(), message })?;
        let ids = self.encode(prompt)?;
        if ids.is_empty() {
            return Err(CoreError::Param { name: "prompt".into(), message: "is empty".into() });
        }
        let max_pos = self.model.config().max_position_embeddings;
        if ids.len() >= max_pos {
            return Err(CoreError::Param {
                name: "prompt".into(),
                message: format!("{} tokens do not fit the model's {max_pos} positions", ids.len()),
            });
        }
        Ok(ids)
    }

    /// Generates for several formatted prompts at once, each with its own sampling, as one
    /// [`BatchRun`]: each row generates what it would alone, at a fraction of the cost of
    /// `n` generations (the weights are read once per step for all rows). `on_text(i, piece)`
    /// hears request `i`'s settled text. One result per request: a request that cannot run
    /// (an empty or too long prompt, bad sampling) fails alone.
    pub fn generate_batch(
        &self,
        requests: &[(String, Sampling)],
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Result<Generated>>> {
        let mut results: Vec<Option<Result<Generated>>> = (0..requests.len()).map(|_| None).collect();
        let mut run = BatchRun::new(self);
        let mut on_done = |i: usize, r: Result<Generated>| results[i] = Some(r);
        let mut on_piece = |i: &mut usize, t: &str| on_text(*i, t);
        let all = requests.iter().enumerate().map(|(i, (p, s))| (i, p.clone(), s.clone())).collect();
        run.admit(all, &mut on_piece, &mut on_done)?;
        while !run.is_empty() {
            run.step(&mut on_piece, &mut on_done)?;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(CoreError::Param { name: "prompt".into(), message: "no answer".into() })))
            .collect())
    }
}

/// One generation of a [`BatchRun`].
struct Row<K> {
    key: K,
    sampling: Sampling,
    /// Leading cache positions that are not this row's.
    pad: usize,
    prompt_tokens: usize,
    context: Vec<u32>,
    out: Vec<u32>,
    printed: String,
    rng: StdRng,
    stopped: bool,
    cut: Option<String>,
    /// The token to feed at the next step.
    pending: u32,
    admitted: std::time::Instant,
    prompt_s: f64,
}

/// Generations running as one batch that requests join at any step (continuous batching):
/// [`BatchRun::admit`] prefills new prompts together and merges them into the running
/// batch's KV cache (left-padding whichever is shorter), [`BatchRun::step`] gives every row
/// its next token, and rows leave as they finish (the cache's columns that no row needs any
/// more are dropped). Each row counts its own positions and masks the others' columns, so it
/// generates what it would alone. `K` is the caller's key for a request.
pub struct BatchRun<'m, K> {
    lm: &'m LanguageModel,
    rows: Vec<Row<K>>,
    cache: KvCache,
}

/// Hears a row's settled text.
pub type OnPiece<'a, K> = dyn FnMut(&mut K, &str) + 'a;
/// Hears that a row finished (or could not start).
pub type OnDone<'a, K> = dyn FnMut(K, Result<Generated>) + 'a;

impl<'m, K> BatchRun<'m, K> {
    pub fn new(lm: &'m LanguageModel) -> Self {
        Self { lm, rows: Vec::new(), cache: KvCache::new() }
    }

    /// Rows running.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prefills `requests` (formatted prompts) as one left-padded batch, samples each one's
    /// first token and adds them to the run. A request that cannot run, or that ends at its
    /// first token, goes to `on_done` at once.
    pub fn admit(
        &mut self,
        requests: Vec<(K, String, Sampling)>,
        on_text: &mut OnPiece<'_, K>,
        on_done: &mut OnDone<'_, K>,
    ) -> Result<()> {
        let admitted = std::time::Instant::now();
        let mut fresh = Vec::new();
        for (key, prompt, sampling) in requests {
            match self.lm.prompt_ids(&prompt, &sampling) {
                Ok(ids) => fresh.push(Row {
                    key,
                    rng: StdRng::seed_from_u64(sampling.seed),
                    sampling,
                    pad: 0,
                    prompt_tokens: ids.len(),
                    context: ids,
                    out: Vec::new(),
                    printed: String::new(),
                    stopped: false,
                    cut: None,
                    pending: 0,
                    admitted,
                    prompt_s: 0.0,
                }),
                Err(e) => on_done(key, Err(e)),
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let width = fresh.iter().map(|r| r.context.len()).max().unwrap_or(0);
        let mut padded = Vec::with_capacity(fresh.len() * width);
        for r in &mut fresh {
            r.pad = width - r.context.len();
            padded.extend(std::iter::repeat_n(0u32, r.pad).chain(r.context.iter().copied()));
        }
        let input = Tensor::from_vec(padded, (fresh.len(), width), &candle_core::Device::Cpu)?;
        let mut cache = KvCache::new();
        let pads: Vec<usize> = fresh.iter().map(|r| r.pad).collect();
        let logits = self.lm.model.last_logits(&input, &mut cache, &pads, &ForwardCtx::eval())?;
        let prompt_s = admitted.elapsed().as_secs_f64();
        for r in &mut fresh {
            r.prompt_s = prompt_s;
        }
        self.next_tokens(&mut fresh, &mut cache, &logits, on_text, on_done)?;
        if fresh.is_empty() {
            return Ok(());
        }
        if self.rows.is_empty() {
            self.cache = cache;
            self.rows = fresh;
            return Ok(());
        }
        // One cache for all: the shorter side is left-padded.
        let (running, joining) = (self.cache.len(), cache.len());
        if running > joining {
            cache.pad_front(running - joining)?;
            fresh.iter_mut().for_each(|r| r.pad += running - joining);
        } else if joining > running {
            self.cache.pad_front(joining - running)?;
            self.rows.iter_mut().for_each(|r| r.pad += joining - running);
        }
        self.cache.append_rows(&cache)?;
        self.rows.extend(fresh);
        Ok(())
    }

    /// The next token of every row.
    pub fn step(&mut self, on_text: &mut OnPiece<'_, K>, on_done: &mut OnDone<'_, K>) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = self.rows.iter().map(|r| r.pending).collect();
        let input = Tensor::from_vec(ids, (self.rows.len(), 1), &candle_core::Device::Cpu)?;
        let pads: Vec<usize> = self.rows.iter().map(|r| r.pad).collect();
        let logits = self.lm.model.last_logits(&input, &mut self.cache, &pads, &ForwardCtx::eval())?;
        let mut rows = std::mem::take(&mut self.rows);
        let mut cache = std::mem::take(&mut self.cache);
        let done = self.next_tokens(&mut rows, &mut cache, &logits, on_text, on_done);
        // Columns that are padding for every remaining row go.
        let common = rows.iter().map(|r| r.pad).min().unwrap_or(0);
        if common > 0 {
            cache.trim_front(common)?;
            rows.iter_mut().for_each(|r| r.pad -= common);
        }
        self.rows = rows;
        self.cache = cache;
        done
    }

    /// The keys of the rows still running, giving up on them (after an error).
    pub fn abandon(self) -> Vec<K> {
        self.rows.into_iter().map(|r| r.key).collect()
    }

    /// Samples each row's next token from its `logits` row; finished rows leave `rows` (and
    /// `cache`) through `on_done`.
    fn next_tokens(
        &self,
        rows: &mut Vec<Row<K>>,
        cache: &mut KvCache,
        logits: &Tensor,
        on_text: &mut OnPiece<'_, K>,
        on_done: &mut OnDone<'_, K>,
    ) -> Result<()> {
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut finished = Vec::new();
        for (j, (row, logits)) in rows.iter_mut().zip(&logits).enumerate() {
            let next = sample(logits, &row.context, &row.sampling, &mut row.rng);
            if self.take(row, next, on_text)? {
                finished.push(j);
            }
        }
        if finished.is_empty() {
            return Ok(());
        }
        let keep: Vec<usize> = (0..rows.len()).filter(|j| !finished.contains(j)).collect();
        if !keep.is_empty() {
            cache.keep_rows(&keep)?;
        }
        let mut kept = Vec::with_capacity(keep.len());
        for (j, mut row) in std::mem::take(rows).into_iter().enumerate() {
            if finished.contains(&j) {
                let done = self.finish(&mut row, on_text);
                on_done(row.key, done);
            } else {
                kept.push(row);
            }
        }
        *rows = kept;
        Ok(())
    }

    /// Takes `next` into `row`, streaming what settled; whether the row is done.
    fn take(&self, row: &mut Row<K>, next: u32, on_text: &mut OnPiece<'_, K>) -> Result<bool> {
        if self.lm.stop.contains(&next) {
            row.stopped = true;
            return Ok(true);
        }
        row.out.push(next);
        row.context.push(next);
        row.pending = next;
        let mut text = self.lm.decode(&row.out)?;
        if let Some(at) = first_stop(&text, &row.sampling.stop) {
            text.truncate(at);
            row.cut = Some(text);
            row.stopped = true;
            return Ok(true);
        }
        // Only settled text: a multi-byte character may still be incomplete, and the end may
        // be the start of a stop string.
        let settled = &text[..text.len() - held_back(&text, &row.sampling.stop)];
        if settled.len() > row.printed.len() && settled.starts_with(&row.printed) && !settled.ends_with('\u{FFFD}') {
            on_text(&mut row.key, &settled[row.printed.len()..]);
            row.printed = settled.to_owned();
        }
        let max_pos = self.lm.model.config().max_position_embeddings;
        Ok(row.out.len() >= row.sampling.max_new_tokens || row.context.len() >= max_pos)
    }

    /// A finished row's generation, the rest of its text streamed.
    fn finish(&self, row: &mut Row<K>, on_text: &mut OnPiece<'_, K>) -> Result<Generated> {
        let text = match row.cut.take() {
            Some(text) => text,
            None => self.lm.decode(&row.out)?,
        };
        if text.len() > row.printed.len() && text.starts_with(&row.printed) {
            on_text(&mut row.key, &text[row.printed.len()..]);
        }
        Ok(Generated {
            prompt_tokens: row.prompt_tokens,
            ids: std::mem::take(&mut row.out),
            text,
            stopped: row.stopped,
            prompt_seconds: row.prompt_s,
            generation_seconds: row.admitted.elapsed().as_secs_f64() - row.prompt_s,
        })
    }
}

/// What [`LanguageModel::generate`] produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    pub prompt_tokens: usize,
    pub ids: Vec<u32>,
    pub text: String,
    /// Ended on a stop token or a stop string (not on the length limit).
    pub stopped: bool,
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
}

impl Generated {
    /// New tokens per second after the prompt.
    pub fn tokens_per_s(&self) -> f64 {
        self.ids.len().saturating_sub(1) as f64 / self.generation_seconds.max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-R1's distilled models: recognised from their template (opening the reasoning
    /// or not), rendered as that template renders (checked against the published template
    /// with jinja2 as transformers sets it up), and written back as a template that reads as
    /// the same format.
    #[test]
    fn deepseek_conversations_render_as_their_template_does() {
        let published_tail =
            "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}";
        let older_tail = "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}";
        assert_eq!(ChatFormat::from_template(Some(published_tail)), ChatFormat::DeepSeek { think: true });
        assert_eq!(ChatFormat::from_template(Some(older_tail)), ChatFormat::DeepSeek { think: false });
        let t = |r: &str, c: &str| (r.to_owned(), c.to_owned());
        let conversation = [
            t("system", "Be brief."),
            t("user", "Hi"),
            t("assistant", "<think>\nhmm\n</think>\n\nHello!"),
            t("user", "Again"),
        ];
        assert_eq!(
            ChatFormat::DeepSeek { think: true }.render(&conversation),
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>\n\nHello!<｜end▁of▁sentence｜><｜User｜>Again\
             <｜Assistant｜><think>\n"
        );
        let two_systems = [t("system", "A"), t("system", "B"), t("user", "q")];
        assert_eq!(
            ChatFormat::DeepSeek { think: false }.render(&two_systems),
            "<｜begin▁of▁sentence｜>A\n\nB<｜User｜>q<｜Assistant｜>"
        );
        assert_eq!(ChatFormat::DeepSeek { think: true }.stop_strings(), ["<｜end▁of▁sentence｜>"]);
        for f in [
            ChatFormat::ChatMl,
            ChatFormat::Llama3,
            ChatFormat::DeepSeek { think: true },
            ChatFormat::DeepSeek { think: false },
        ] {
            assert_eq!(ChatFormat::from_template(Some(f.jinja())), f, "{f:?}");
        }
    }

    #[test]
    fn stop_strings_are_found_and_their_starts_held_back() {
        let stop = vec!["###".to_owned(), "Ünd".to_owned()];
        assert_eq!(first_stop("ab ### c Ünd", &stop), Some(3));
        assert_eq!(first_stop("ab Ünd ###", &stop), Some(3));
        assert_eq!(first_stop("abc", &stop), None);
        assert_eq!(held_back("text #", &stop), 1);
        assert_eq!(held_back("text ##", &stop), 2);
        assert_eq!(held_back("text Ün", &stop), "Ün".len());
        assert_eq!(held_back("text", &stop), 0);
        assert_eq!(held_back("anything", &[]), 0);
    }

    #[test]
    fn greedy_top_k_top_p_and_the_repetition_penalty() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let mut rng = StdRng::seed_from_u64(0);
        let greedy = Sampling::default();
        assert_eq!(sample(&logits, &[], &greedy, &mut rng), 1);
        // The penalty divides token 1's positive logit by 2: 1.5 < 2.0.
        let pen = Sampling { repetition_penalty: 2.0, ..Sampling::default() };
        assert_eq!(sample(&logits, &[1], &pen, &mut rng), 2);
        // top_k = 1 is greedy whatever the temperature.
        let k1 = Sampling { temperature: 5.0, top_k: Some(1), ..Sampling::default() };
        assert!((0..50).all(|_| sample(&logits, &[], &k1, &mut rng) == 1));
        // top_p small keeps only the most likely token.
        let p = Sampling { temperature: 1.0, top_p: Some(0.1), ..Sampling::default() };
        assert!((0..50).all(|_| sample(&logits, &[], &p, &mut rng) == 1));
        // Temperature sampling visits other tokens, in proportion.
        let t = Sampling { temperature: 1.0, ..Sampling::default() };
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[sample(&logits, &[], &t, &mut rng) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&v| f64::from(v).exp()).sum();
        for (i, c) in counts.iter().enumerate() {
            let expected = f64::from(logits[i]).exp() / z * 4000.0;
            assert!((*c as f64 - expected).abs() < 4.0 * expected.sqrt() + 5.0, "token {i}: {c} vs {expected:.0}");
        }
        assert!(Sampling { top_p: Some(0.0), ..Sampling::default() }.validate().is_err());
        assert!(Sampling { temperature: -1.0, ..Sampling::default() }.validate().is_err());
    }

    #[test]
    fn chat_formats_render_and_are_detected() {
        let m = vec![("user".to_owned(), "Hi".to_owned())];
        assert_eq!(ChatFormat::ChatMl.render(&m), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(ChatFormat::from_template(Some("{{ '<|start_header_id|>' }}")), ChatFormat::Llama3);
        assert_eq!(ChatFormat::from_template(None), ChatFormat::ChatMl);
    }
}
