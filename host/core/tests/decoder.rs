//! Decoders on tiny random Llama and Qwen2 models: a GGUF file (written the way llama.cpp's
//! converter writes one, Q/K rows permuted) gives the same logits as the safetensors
//! directory; the tokenizer rebuilt from GGUF metadata round-trips text; generation stops.

use candle_core::{DType, Device, Tensor};
use tuneforge_core::generate::{LanguageModel, Sampling};
use tuneforge_core::gguf::GgufFile;
use tuneforge_core::llama::DecoderModel;
use tuneforge_core::testing::write_tiny_decoder as write_model;
use tuneforge_core::{ForwardCtx, Result};

/// The `field` of every `kind` line of a run's metrics.jsonl, in order.
fn logged(run_dir: &std::path::Path, kind: &str, field: &str) -> Vec<f64> {
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == kind)
        .filter_map(|v| v[field].as_f64())
        .collect()
}

/// A temporary directory with the tiny Llama (`model.gguf`, `hf/`) and `sft.jsonl` of `n`
/// conversations ("the cat {i}" → "in the hat").
fn tiny_sft_task(n: usize) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let data: String = (0..n)
        .map(|i| serde_json::json!({"prompt": format!("the cat {i}"), "response": "in the hat"}).to_string() + "\n")
        .collect();
    std::fs::write(tmp.path().join("sft.jsonl"), data).expect("data");
    Ok(tmp)
}

#[test]
fn gguf_and_safetensors_give_the_same_logits() -> Result<()> {
    for kind in ["llama", "qwen2"] {
        let tmp = tempfile::tempdir().expect("tmp");
        let cfg = write_model(tmp.path(), kind)?;
        let g = GgufFile::open(&tmp.path().join("model.gguf"))?;
        let read = g.config()?;
        assert_eq!((read.num_hidden_layers, read.kv_heads(), read.tie_word_embeddings), (2, 2, kind == "llama"));
        assert_eq!(read.qkv_bias(), kind == "qwen2");
        let from_gguf = g.model(DType::F32)?;
        let from_hf = DecoderModel::from_hf_dir(&tmp.path().join("hf"), DType::F32)?;
        let ids = Tensor::new(&[[5u32, 60, 7, 200, 31, 3]], &Device::Cpu)?;
        let a = from_gguf.forward(&ids, None, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
        let b = from_hf.forward(&ids, None, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a.len(), 6 * cfg.vocab_size);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{kind}: GGUF {x} vs safetensors {y}");
        }
    }
    Ok(())
}

#[test]
fn the_gguf_tokenizer_round_trips_text() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let tok = GgufFile::open(&tmp.path().join("model.gguf"))?.tokenizer()?;
    for text in ["the cat in the hat", "Prix: 12,50 € — déjà vu!\n\ttabs", "<|im_start|>user\nhi<|im_end|>"] {
        let enc = tok.encode(text, false).expect("encode");
        let back = tok.decode(enc.get_ids(), false).expect("decode");
        assert_eq!(back, text);
    }
    // Merges apply, digits split one by one, specials are single tokens.
    let enc = tok.encode(" the 123", false).expect("encode");
    assert_eq!(enc.get_tokens(), ["Ġthe", "Ġ", "1", "2", "3"]);
    let enc = tok.encode("<|im_end|>", false).expect("encode");
    assert_eq!(enc.get_ids(), [2]);
    Ok(())
}

#[test]
fn generation_streams_and_respects_the_limit() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "qwen2")?;
    let lm = LanguageModel::load(&tmp.path().join("model.gguf"))?;
    let mut streamed = String::new();
    let s = Sampling { max_new_tokens: 6, ..Sampling::default() };
    let out = lm.generate("the cat", &s, &mut |t| streamed.push_str(t))?;
    assert!(out.ids.len() <= 6 && (out.stopped || out.ids.len() == 6));
    assert_eq!(streamed, out.text);
    // Greedy is deterministic; seeded sampling too.
    assert_eq!(lm.generate("the cat", &s, &mut |_| {})?.ids, out.ids);
    let t = Sampling { temperature: 1.0, top_k: Some(20), seed: 4, ..s.clone() };
    assert_eq!(lm.generate("the cat", &t, &mut |_| {})?.ids, lm.generate("the cat", &t, &mut |_| {})?.ids);
    let e = lm.generate("", &s, &mut |_| {}).expect_err("empty");
    assert!(e.to_string().contains("prompt"), "{e}");
    Ok(())
}

/// Several prompts generated as one batch give what each gives alone — ids, text, stop —
/// whatever their lengths and sampling; each request hears only its own pieces; a request
/// that cannot run fails alone.
#[test]
fn a_batch_generates_what_each_request_would_alone() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    for kind in ["llama", "qwen2"] {
        write_model(tmp.path(), kind)?;
        let lm = LanguageModel::load(&tmp.path().join("model.gguf"))?;
        let base = Sampling { max_new_tokens: 12, ..Sampling::default() };
        let requests = vec![
            ("the cat".to_owned(), base.clone()),
            (
                "the cat in the hat, the hat on the cat".to_owned(),
                Sampling { temperature: 1.0, seed: 5, ..base.clone() },
            ),
            (String::new(), base.clone()),
            ("hat".to_owned(), Sampling { max_new_tokens: 3, repetition_penalty: 1.3, ..base.clone() }),
            (
                "in the".to_owned(),
                Sampling { temperature: 0.8, top_k: Some(5), seed: 9, stop: vec!["e".into()], ..base },
            ),
        ];
        let mut pieces = vec![String::new(); requests.len()];
        let batch = lm.generate_batch(&requests, &mut |i, t| pieces[i].push_str(t))?;
        assert_eq!(batch.len(), requests.len());
        for (i, ((prompt, s), got)) in requests.iter().zip(batch).enumerate() {
            let alone = lm.generate(prompt, s, &mut |_| {});
            match (got, alone) {
                (Ok(got), Ok(alone)) => {
                    assert_eq!(
                        (&got.ids, &got.text, got.stopped),
                        (&alone.ids, &alone.text, alone.stopped),
                        "{kind} request {i}"
                    );
                    assert_eq!(pieces[i], got.text, "{kind} request {i}: its own pieces");
                }
                (Err(got), Err(alone)) => assert_eq!(got.to_string(), alone.to_string()),
                (got, alone) => panic!("{kind} request {i}: {got:?} vs {alone:?}"),
            }
        }
    }
    Ok(())
}

/// Continuous batching: requests that join a running batch — longer than what it holds, or
/// shorter — and rows that leave it early all generate what they would alone, streaming
/// only their own pieces (f32 and int8 weights).
#[test]
fn requests_join_a_running_batch_and_generate_what_they_would_alone() -> Result<()> {
    use tuneforge_core::generate::BatchRun;
    let tmp = tempfile::tempdir().expect("tmp");
    for (kind, int8) in [("llama", false), ("qwen2", false), ("llama", true)] {
        write_model(tmp.path(), kind)?;
        let mut lm = LanguageModel::load(&tmp.path().join("model.gguf"))?;
        if int8 {
            lm = lm.quantize_int8()?;
        }
        let s = |max: usize, seed: u64| Sampling {
            max_new_tokens: max,
            temperature: if seed > 0 { 1.0 } else { 0.0 },
            seed,
            ..Sampling::default()
        };
        let requests = [
            ("the cat".to_owned(), s(10, 0)),
            ("in the hat the cat on the hat, a cat in the hat".to_owned(), s(8, 3)),
            ("hat".to_owned(), s(3, 0)),
            ("the".to_owned(), s(9, 7)),
        ];
        let mut results: Vec<Option<Result<tuneforge_core::generate::Generated>>> = vec![None, None, None, None];
        let mut pieces = vec![String::new(); requests.len()];
        {
            let mut run = BatchRun::new(&lm);
            let mut on_text = |i: &mut usize, t: &str| pieces[*i].push_str(t);
            let mut on_done = |i: usize, r| results[i] = Some(r);
            let join = |idx: &[usize]| idx.iter().map(|&i| (i, requests[i].0.clone(), requests[i].1.clone())).collect();
            run.admit(join(&[0]), &mut on_text, &mut on_done)?;
            run.step(&mut on_text, &mut on_done)?;
            run.step(&mut on_text, &mut on_done)?;
            // One longer than the running cache, one shorter.
            run.admit(join(&[1, 2]), &mut on_text, &mut on_done)?;
            assert_eq!(run.len(), 3);
            for _ in 0..3 {
                run.step(&mut on_text, &mut on_done)?;
            }
            run.admit(join(&[3]), &mut on_text, &mut on_done)?;
            while !run.is_empty() {
                run.step(&mut on_text, &mut on_done)?;
            }
        }
        for (i, ((prompt, s), got)) in requests.iter().zip(results).enumerate() {
            let got = got.expect("finished")?;
            let alone = lm.generate(prompt, s, &mut |_| {})?;
            assert_eq!((&got.ids, &got.text), (&alone.ids, &alone.text), "{kind} int8 {int8}: request {i}");
            assert_eq!(pieces[i], got.text, "{kind}: request {i} heard only its own pieces");
        }
    }
    Ok(())
}

/// A stop string ends the text before it, and no piece of it is ever streamed (the pieces
/// that might begin one are held back until they cannot).
#[test]
fn generation_ends_before_a_stop_string() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let lm = LanguageModel::load(&tmp.path().join("model.gguf"))?;
    // A long, unstopped answer to cut (random tiny models rarely emit their stop token at once).
    let long = (0..8)
        .map(|seed| Sampling { max_new_tokens: 24, temperature: 1.0, seed, ..Sampling::default() })
        .map(|s| lm.generate("the cat", &s, &mut |_| {}).map(|out| (s, out)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max_by_key(|(_, out)| out.text.chars().count())
        .expect("answers");
    let (s, full) = long;
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    assert!(chars.len() >= 6, "an answer long enough to cut: {:?}", full.text);
    let (at, _) = chars[chars.len() / 2];
    let stop = full.text[at..].chars().take(3).collect::<String>();
    let expected = &full.text[..full.text.find(&stop).expect("in the text")];
    let mut streamed = Vec::new();
    let cut = lm.generate("the cat", &Sampling { stop: vec!["zzz-never".into(), stop.clone()], ..s }, &mut |t| {
        streamed.push(t.to_owned())
    })?;
    assert_eq!(cut.text, expected, "stop {stop:?} in {:?}", full.text);
    assert!(cut.stopped && cut.ids.len() < full.ids.len());
    assert_eq!(streamed.concat(), cut.text);
    let bad = Sampling { stop: vec![String::new()], ..Sampling::default() };
    assert!(lm.generate("the cat", &bad, &mut |_| {}).expect_err("empty stop").to_string().contains("stop"));
    Ok(())
}

/// LoRA starts as the identity: a decoder with LoRA on every projection computes exactly
/// the base model, and only the LoRA tensors train.
#[test]
fn lora_on_a_decoder_starts_equal_to_the_base() -> Result<()> {
    use tuneforge_core::PeftSpec;
    use tuneforge_core::sft::Base;
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "qwen2")?;
    let base = Base::load(&tmp.path().join("hf"), DType::F32)?;
    let plain = base.model(&PeftSpec::None, Default::default(), 0)?;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec = PeftSpec::Lora {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        first_layer: 0,
    };
    let lora = base.model(&spec, Default::default(), 0)?;
    let ids = Tensor::new(&[[5u32, 60, 7, 200]], &Device::Cpu)?;
    let a = plain.forward(&ids, None, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
    let b = lora.forward(&ids, None, &ForwardCtx::eval())?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    let trainable = lora.params().trainable();
    // 2 layers x 7 projections x (A and B).
    assert_eq!(trainable.len(), 28);
    assert!(trainable.iter().all(|(n, _)| n.contains(".lora_")));
    Ok(())
}

/// Prompt tokens carry no loss: the loss is the mean cross-entropy over response tokens only,
/// whatever the prompt's tokens are predicted to be.
#[test]
fn only_response_tokens_carry_loss() -> Result<()> {
    use tuneforge_core::generate::ChatFormat;
    use tuneforge_core::sft::{SftExample, encode_example};
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let lm = LanguageModel::load(&tmp.path().join("model.gguf"))?;
    let ex = SftExample { context: vec![("user".into(), "the cat".into())], response: "in the hat".into() };
    let e = encode_example(&lm.tokenizer, ChatFormat::ChatMl, &ex, 64)?.expect("fits");
    let prompt_len = lm.encode(&ChatFormat::ChatMl.render(&ex.context))?.len();
    assert!(e.loss_mask[..prompt_len].iter().all(|m| *m == 0));
    assert!(e.loss_mask[prompt_len..].iter().all(|m| *m == 1));
    assert_eq!(*e.ids.last().expect("ids"), 2, "the answer ends with <|im_end|>");
    // The masked loss equals a hand computation over the response positions.
    let ids = Tensor::new(e.ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mask = Tensor::new(e.loss_mask.iter().map(|m| f32::from(*m)).collect::<Vec<_>>().as_slice(), &Device::Cpu)?
        .unsqueeze(0)?;
    let (loss, n) = lm.model.lm_loss(&ids, &mask, &ForwardCtx::eval())?;
    assert_eq!(n, e.ids.len() - prompt_len);
    let logits = lm.model.forward(&ids, None, &ForwardCtx::eval())?.squeeze(0)?.to_vec2::<f32>()?;
    let mut sum = 0.0f64;
    for t in prompt_len..e.ids.len() {
        let row = &logits[t - 1];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let lse = f64::from(max) + row.iter().map(|v| f64::from(v - max).exp()).sum::<f64>().ln();
        sum += lse - f64::from(row[e.ids[t] as usize]);
    }
    let expected = sum / n as f64;
    let got = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
    // Too short a max_len leaves no response: the example is dropped, not trained on.
    assert!(encode_example(&lm.tokenizer, ChatFormat::ChatMl, &ex, prompt_len)?.is_none());
    Ok(())
}

/// A multi-turn conversation learns from every assistant turn (its words and end marker) by
/// default, from the last only with `AssistantTurns::Last`; the pieces tokenize as the
/// whole conversation does, in every chat format.
#[test]
fn every_assistant_turn_carries_loss_unless_only_the_last_should() -> Result<()> {
    use tuneforge_core::experiment::AssistantTurns;
    use tuneforge_core::generate::ChatFormat;
    use tuneforge_core::sft::{SftExample, encode_example_with};
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let lm = LanguageModel::load(&tmp.path().join("model.gguf"))?;
    let turn = |r: &str, c: &str| (r.to_owned(), c.to_owned());
    let ex = SftExample {
        context: vec![
            turn("system", "be brief"),
            turn("user", "the cat"),
            turn("assistant", "in the hat"),
            turn("user", "the hat"),
        ],
        response: "on the cat".into(),
    };
    for chat in [ChatFormat::ChatMl, ChatFormat::Llama3, ChatFormat::DeepSeek { think: false }] {
        let end = chat.stop_strings()[0];
        let whole = format!("{}{}{end}", chat.render(&ex.context), ex.response);
        let learned = |turns| -> Result<(Vec<u32>, String)> {
            let e = encode_example_with(&lm.tokenizer, chat, &ex, 4096, turns)?.expect("fits");
            let masked: Vec<u32> = e.ids.iter().zip(&e.loss_mask).filter(|(_, m)| **m == 1).map(|(t, _)| *t).collect();
            Ok((
                e.ids,
                lm.tokenizer
                    .decode(&masked, false)
                    .map_err(|e| tuneforge_core::CoreError::Param { name: "decode".into(), message: e.to_string() })?,
            ))
        };
        let (ids, all) = learned(AssistantTurns::All)?;
        assert_eq!(ids, lm.encode(&whole)?, "{chat:?}: the pieces tokenize as the whole conversation");
        assert_eq!(all, format!("in the hat{end}on the cat{end}"), "{chat:?}");
        let (_, last) = learned(AssistantTurns::Last)?;
        assert_eq!(last, format!("on the cat{end}"), "{chat:?}");
    }
    Ok(())
}

/// `train.packing`: conversations packed into rows of `max_len` tokens — fewer steps for the
/// same epochs, the validation loss (computed unpacked) still falling below the base model's.
#[test]
fn packed_instruction_tuning_takes_fewer_steps_and_learns() -> Result<()> {
    use tuneforge_core::ExperimentConfig;
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let data: String = (0..40)
        .map(|i| {
            let (p, r) = if i % 2 == 0 { ("the cat", "in the hat") } else { ("the hat", "on the cat") };
            serde_json::json!({"prompt": p, "response": r}).to_string() + "\n"
        })
        .collect();
    std::fs::write(tmp.path().join("sft.jsonl"), data).expect("data");
    let run = |packing: bool| -> Result<tuneforge_core::sft::SftSummary> {
        let text = format!(
            "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 3\n[model]\nsource = \"{root}/model.gguf\"\ntask = \"causal-lm\"\nmax_len = 96\n\
             [data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
             [peft]\nmethod = \"lora\"\nrank = 8\nalpha = 16\nlora_dropout = 0.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"up_proj\", \"down_proj\"]\n\
             [train]\nepochs = 12\nbatch_size = 2\nlr = 3e-2\nwarmup_steps = 1\npacking = {packing}\n",
            root = tmp.path().display()
        );
        let mut lines = Vec::new();
        let s = tuneforge_core::sft::train_causal_lm(ExperimentConfig::from_toml(&text, "sft.toml", &[])?, &mut |l| {
            lines.push(l.to_owned())
        })?;
        if packing {
            assert!(lines.iter().any(|l| l.starts_with("packing: 32 conversations in")), "{lines:?}");
        }
        Ok(s)
    };
    let (plain, packed) = (run(false)?, run(true)?);
    assert_eq!(plain.base_validation_loss, packed.base_validation_loss);
    assert!(packed.total_steps * 2 < plain.total_steps, "{} vs {} steps", packed.total_steps, plain.total_steps);
    assert!(
        packed.validation_loss < packed.base_validation_loss * 0.7,
        "{} -> {}",
        packed.base_validation_loss,
        packed.validation_loss
    );
    Ok(())
}

/// A short LoRA instruction tuning run on the tiny decoder lowers validation loss below the
/// base model's, saves an adapter, and the adapter generates.
#[test]
fn lora_instruction_tuning_lowers_validation_loss() -> Result<()> {
    use tuneforge_core::ExperimentConfig;
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let mut data = String::new();
    for i in 0..40 {
        let (p, r) = if i % 2 == 0 { ("the cat", "in the hat") } else { ("the hat", "on the cat") };
        data.push_str(&serde_json::json!({"prompt": p, "response": r}).to_string());
        data.push('\n');
    }
    data.push_str(
        r#"{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "in the hat"}]}"#,
    );
    data.push('\n');
    std::fs::write(tmp.path().join("sft.jsonl"), data).expect("data");
    let text = format!(
        "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 3\n[model]\nsource = \"{root}/model.gguf\"\ntask = \"causal-lm\"\nmax_len = 64\n\
         [data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
         [peft]\nmethod = \"lora\"\nrank = 8\nalpha = 16\nlora_dropout = 0.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"up_proj\", \"down_proj\"]\n\
         [train]\nepochs = 12\nbatch_size = 8\nlr = 3e-2\nwarmup_steps = 1\n",
        root = tmp.path().display()
    );
    let cfg = ExperimentConfig::from_toml(&text, "sft.toml", &[])?;
    let mut lines = Vec::new();
    let s = tuneforge_core::sft::train_causal_lm(cfg, &mut |l| lines.push(l.to_owned()))?;
    assert!(s.validation_loss < s.base_validation_loss * 0.7, "{} -> {}", s.base_validation_loss, s.validation_loss);
    assert!(s.trainable_ratio < 0.5 && s.params_trainable > 0);
    assert_eq!(s.n_train + s.n_validation, 41);
    let lm = LanguageModel::load(&s.best_model_dir)?;
    let out = lm.generate(&lm.chat.render(&[("user".into(), "the cat".into())]), &Sampling::default(), &mut |_| {})?;
    assert!(!out.ids.is_empty());
    // The tuned adapter answers as taught (at least the first question), the base model not
    // at all; the score is the share of answers that match.
    let heldout = tuneforge_core::sft::read_sft(&tmp.path().join("sft.jsonl"))?;
    let tuned = tuneforge_core::sft::generation_scores(&lm, &heldout[..4], 16, 3)?;
    assert_eq!(tuned.answers[0], ("in the hat".to_owned(), true), "{:?}", tuned.answers);
    let matched = tuned.answers.iter().zip(&heldout).filter(|((a, _), e)| a.trim() == e.response).count();
    assert_eq!((tuned.examples, tuned.exact_match), (4, matched as f64 / 4.0), "{:?}", tuned.answers);
    let base = LanguageModel::load(&tmp.path().join("model.gguf"))?;
    assert_eq!(tuneforge_core::sft::generation_scores(&base, &heldout[..4], 16, 3)?.exact_match, 0.0);
    check_lm_exports(&s.best_model_dir, &lm, tmp.path()).expect("the exports");
    // The bad data line names the file and line.
    std::fs::write(tmp.path().join("bad.jsonl"), "{\"prompt\": \"x\", \"response\": \"y\"}\n{\"text\": 1}\n")
        .expect("bad");
    let e = tuneforge_core::sft::read_sft(&tmp.path().join("bad.jsonl")).expect_err("bad");
    assert!(e.to_string().contains("bad.jsonl: line 2"), "{e}");
    Ok(())
}

/// An instruction-tuned adapter exported with LoRA merged (a Hugging Face directory that
/// loads as the same model: tokenizer, chat format, logits) and in PEFT's layout.
fn check_lm_exports(
    best: &std::path::Path,
    lm: &LanguageModel,
    tmp: &std::path::Path,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    // Exported with LoRA merged: a Hugging Face directory that loads as the same model.
    let merged_dir = tmp.join("merged");
    tuneforge_core::export::export_merged(best, &merged_dir)?;
    let merged = LanguageModel::load(&merged_dir)?;
    assert_eq!(merged.chat, lm.chat);
    let prompt = lm.chat.render(&[("user".into(), "the hat".into())]);
    let ids = lm.tokenizer.encode(prompt.as_str(), false).map_err(|e| e.to_string())?.get_ids().to_vec();
    assert_eq!(merged.tokenizer.encode(prompt.as_str(), false).map_err(|e| e.to_string())?.get_ids(), &ids[..]);
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = |m: &LanguageModel| m.model.forward(&ids, None, &ForwardCtx::eval());
    let (a, b) = (logits(lm)?, logits(&merged)?);
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "merged logits differ by {diff}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(merged_dir.join("config.json"))?)?;
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    // In PEFT's layout: the LoRA tensors under `base_model.model.`, a causal-LM config.
    let peft_dir = tmp.join("peft");
    tuneforge_core::export::export_peft(best, &peft_dir)?;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir.join("adapter_config.json"))?)?;
    assert_eq!((config["task_type"].as_str(), config["r"].as_u64()), (Some("CAUSAL_LM"), Some(8)));
    let bytes = std::fs::read(peft_dir.join("adapter_model.safetensors"))?;
    let names = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?.names().len();
    let ours = safetensors::SafeTensors::deserialize(&std::fs::read(best.join("adapter_model.safetensors"))?)
        .map_err(|e| e.to_string())?
        .names()
        .iter()
        .map(|n| format!("base_model.model.{n}"))
        .collect::<Vec<_>>();
    assert_eq!(names, ours.len());
    assert!(ours.iter().all(|n| n.starts_with("base_model.model.model.layers.") && n.contains(".lora_")));
    Ok(())
}

/// Data parallelism over two ranks takes the steps of one process with twice the batch: the
/// ranks (threads of an in-process group, each with its own replica) take one batch of 4
/// each per step, weight their losses by their share of the step's response tokens and
/// average their gradients — the arithmetic `tuneforge train --gpus 2` runs over NCCL. The
/// last step has one batch, so rank 1 steps with no rows of its own. Rank 1 leaves no run
/// behind.
#[test]
fn data_parallel_sft_takes_the_steps_of_one_process_with_twice_the_batch() -> Result<()> {
    use tuneforge_core::ExperimentConfig;
    use tuneforge_core::parallel::DataParallel;
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let mut data = String::new();
    for i in 0..41 {
        let (p, r) = if i % 3 == 0 { ("the cat", "in the hat on the mat") } else { ("the hat", "on the cat") };
        data.push_str(&serde_json::json!({"prompt": format!("{p} {i}"), "response": r}).to_string());
        data.push('\n');
    }
    std::fs::write(tmp.path().join("sft.jsonl"), data).expect("data");
    // 41 examples, 8 held out: 33 train, in steps of 8, 8, 8, 8 and 1 rows.
    let text = format!(
        "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 5\n[model]\nsource = \"{root}/model.gguf\"\ntask = \"causal-lm\"\nmax_len = 64\n\
         [data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
         [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\nlora_dropout = 0.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n\
         [train]\nepochs = 2\nbatch_size = 8\nlr = 1e-2\nwarmup_steps = 1\ngroup_by_length = false\n",
        root = tmp.path().display()
    );
    let one = ExperimentConfig::from_toml(&text, "sft.toml", &[])?;
    let one = tuneforge_core::sft::train_causal_lm(one, &mut |_| {})?;
    let cfg = ExperimentConfig::from_toml(&text, "sft.toml", &["train.batch_size=4".into()])?;
    let ranks = DataParallel::in_process(2);
    let runs = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let group = DataParallel::from(rank);
                    tuneforge_core::sft::train_causal_lm_in(
                        cfg,
                        &Default::default(),
                        Some(&group),
                        &mut |_| {},
                        &mut |_| {},
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect::<Vec<_>>()
    });
    let runs = runs.into_iter().collect::<tuneforge_core::Result<Vec<_>>>()?;
    let train_losses = |dir: &std::path::Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "train")
            .map(|v| v["loss"].as_f64().expect("loss"))
            .collect()
    };
    let (a, b) = (train_losses(&one.run_dir), train_losses(&runs[0].run_dir));
    assert_eq!((one.steps, a.len()), (10, 10), "5 steps an epoch, the last on one row");
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-4 * (1.0 + x.abs()), "step {}: one process {x}, two ranks {y}", step + 1);
    }
    assert!(a[9] < a[0], "it trains: {a:?}");
    for r in &runs {
        let d = (r.validation_loss - one.validation_loss).abs();
        assert!(d < 1e-4, "rank validation loss {} vs {}", r.validation_loss, one.validation_loss);
    }
    assert!(!runs[1].run_dir.exists(), "rank 1 wrote its run into a temporary directory, now gone");
    assert_eq!(
        std::fs::read_dir(tmp.path().join("runs")).expect("runs").count(),
        2,
        "one run each from rank 0 and the single process"
    );
    Ok(())
}

/// An instruction-tuning run stopped after 3 steps (mid-epoch, with a checkpoint) and
/// resumed from its directory follows the uninterrupted run: the same losses at every step,
/// the same validation loss, one metrics line per step.
#[test]
fn a_stopped_and_resumed_sft_run_follows_the_uninterrupted_one() -> Result<()> {
    use tuneforge_core::{ExperimentConfig, RunOptions};
    let tmp = tiny_sft_task(30)?;
    let text = format!(
        "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 9\n[model]\nsource = \"{root}/model.gguf\"\ntask = \"causal-lm\"\nmax_len = 32\n\
         [data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
         [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\nlora_dropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
         [train]\nepochs = 2\nbatch_size = 6\nlr = 1e-2\n",
        root = tmp.path().display()
    );
    let cfg = ExperimentConfig::from_toml(&text, "sft.toml", &[])?;
    let train = |cfg: ExperimentConfig, options: RunOptions| {
        tuneforge_core::sft::train_causal_lm_in(cfg, &options, None, &mut |_| {}, &mut |_| {})
    };
    let whole = train(cfg.clone(), RunOptions::default())?;
    let stop = RunOptions { stop_after_steps: Some(3), ..RunOptions::default() };
    let first = train(cfg, stop)?;
    assert_eq!((first.status.as_str(), first.steps, first.total_steps), ("stopped", 3, 8));
    let saved = ExperimentConfig::from_file(&first.run_dir.join("config.toml"), &[])?;
    let resume = RunOptions { resume: Some(first.run_dir.clone()), ..RunOptions::default() };
    let rest = train(saved, resume)?;
    assert_eq!((rest.status.as_str(), rest.steps, rest.run_dir.clone()), ("completed", 8, first.run_dir.clone()));
    let losses = |dir: &std::path::Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "train")
            .map(|v| (v["step"].as_u64().expect("step"), v["loss"].as_f64().expect("loss")))
            .collect()
    };
    let (a, b) = (losses(&whole.run_dir), losses(&rest.run_dir));
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), b.iter().map(|x| x.0).collect::<Vec<_>>());
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-6 * (1.0 + x.abs()), "step {step}: uninterrupted {x}, resumed {y}");
    }
    assert!(
        (whole.validation_loss - rest.validation_loss).abs() < 1e-6,
        "{} vs {}",
        whole.validation_loss,
        rest.validation_loss
    );
    assert_eq!(whole.best_step, rest.best_step);
    // Nothing to resume from in a directory that is not a run.
    let e = train(
        ExperimentConfig::from_toml(&text, "sft.toml", &[])?,
        RunOptions { resume: Some(tmp.path().join("nowhere")), ..RunOptions::default() },
    )
    .expect_err("not a run");
    assert!(e.to_string().contains("nowhere"), "{e}");
    Ok(())
}

/// An int8 decoder (projections and output layer quantized per output channel) predicts
/// what the f32 one does: tied (Llama) and untied (Qwen2) heads, logits close, the same
/// greedy next token at nearly every position, the KV-cached path too; an instruction-tuned
/// adapter quantizes with its LoRA folded in.
#[test]
fn int8_decoders_predict_like_the_f32_ones() -> Result<()> {
    for kind in ["llama", "qwen2"] {
        let tmp = tempfile::tempdir().expect("tmp");
        write_model(tmp.path(), kind)?;
        let f32 = LanguageModel::load(&tmp.path().join("model.gguf"))?;
        let int8 = LanguageModel::load(&tmp.path().join("model.gguf"))?.quantize_int8()?;
        assert!(int8.model.is_int8() && !f32.model.is_int8());
        let ids = Tensor::new(&[[5u32, 60, 7, 200, 31, 3, 90, 12]], &Device::Cpu)?;
        let a = f32.model.forward(&ids, None, &ForwardCtx::eval())?.squeeze(0)?;
        let b = int8.model.forward(&ids, None, &ForwardCtx::eval())?.squeeze(0)?;
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 0.05 * scale, "{kind}: int8 logits differ by {diff} (scale {scale})");
        let (ta, tb) = (a.argmax(1)?.to_vec1::<u32>()?, b.argmax(1)?.to_vec1::<u32>()?);
        let same = ta.iter().zip(&tb).filter(|(x, y)| x == y).count();
        assert!(same >= 7, "{kind}: greedy tokens {ta:?} vs {tb:?}");
        let greedy = Sampling { max_new_tokens: 6, repetition_penalty: 1.0, ..Sampling::default() };
        let out = int8.generate("the cat", &greedy, &mut |_| {})?;
        assert!(!out.ids.is_empty());
    }
    // A LoRA adapter whose B is not zero: quantizing folds it in.
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let lm = LanguageModel::load(&tmp.path().join("model.gguf"))?;
    let peft = tuneforge_core::PeftSpec::Lora {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "up_proj".into()],
        first_layer: 0,
    };
    let base = tuneforge_core::sft::Base::load(&tmp.path().join("model.gguf"), DType::F32)?;
    let mut extra = std::collections::HashMap::new();
    for (name, v) in base.model(&peft, Default::default(), 1)?.params().trainable() {
        let nudged = if name.contains("lora_B") { (v.as_tensor().ones_like()? * 0.5)? } else { v.as_tensor().clone() };
        extra.insert(name, nudged);
    }
    let tuned = base.model(&peft, extra, 1)?;
    let ids = Tensor::new(&[[5u32, 60, 7, 200]], &Device::Cpu)?;
    let a = tuned.forward(&ids, None, &ForwardCtx::eval())?;
    let b = tuned.quantize_int8()?.forward(&ids, None, &ForwardCtx::eval())?;
    let plain_int8 = lm.quantize_int8()?.model.forward(&ids, None, &ForwardCtx::eval())?;
    let dist = |x: &Tensor, y: &Tensor| -> Result<f32> { Ok((x - y)?.abs()?.sum_all()?.to_scalar::<f32>()?) };
    let (folded, dropped) = (dist(&b, &a)?, dist(&plain_int8, &a)?);
    assert!(folded < 0.8 * dropped, "int8 of the adapter is {folded} from it, int8 of the base {dropped}");
    Ok(())
}

/// Analytic gradients of a whole decoder's language-model loss (embeddings, RMS norms,
/// rotary attention with grouped heads, SwiGLU, the tied or untied head; the loss only at
/// masked-in positions, through the fused cross-entropy) match central finite differences
/// in f64, for every parameter: an op without a real backward fails it.
#[test]
fn decoder_gradients_match_finite_differences() -> Result<()> {
    use tuneforge_core::llama::LlamaConfig;
    for kind in ["llama", "qwen2"] {
        let model = DecoderModel::random(&LlamaConfig::tiny(kind, 50), 3, DType::F64)?;
        let ids = Tensor::new(&[[1u32, 7, 22, 3, 49, 8, 8, 30], [5, 4, 3, 2, 1, 0, 11, 12]], &Device::Cpu)?;
        // The prompt's tokens carry no loss; the second row is padded after 6.
        let mask = Tensor::new(&[[0f32, 0., 0., 1., 1., 1., 1., 1.], [0., 0., 1., 1., 1., 1., 0., 0.]], &Device::Cpu)?;
        let ctx = ForwardCtx::eval_differentiable();
        let loss_of = |m: &DecoderModel| -> Result<f64> { Ok(m.lm_loss(&ids, &mask, &ctx)?.0.to_scalar::<f64>()?) };
        let (loss, n) = model.lm_loss(&ids, &mask, &ctx)?;
        assert_eq!(n, 9, "the masked-in positions after the first");
        let grads = loss.backward()?;
        let vars = model.params().trainable();
        assert!(vars.len() >= 2 * 9 + 2, "{kind}: every parameter trains ({} of them)", vars.len());
        for (name, var) in vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{kind}: {name} has no gradient"));
            let g = g.flatten_all()?.to_vec1::<f64>()?;
            assert!(g.iter().any(|v| *v != 0.0), "{kind}: {name}'s gradient is zero");
            let largest = g.iter().enumerate().fold(0, |best, (i, v)| if v.abs() > g[best].abs() { i } else { best });
            for idx in [largest, (largest * 7 + 3) % g.len()] {
                let original = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
                let at = |delta: f64| -> Result<f64> {
                    let mut v = original.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                    loss_of(&model)
                };
                let eps = 1e-6;
                let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
                var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu)?)?;
                let tol = 1e-6 + 1e-4 * g[idx].abs().max(numeric.abs());
                assert!(
                    (numeric - g[idx]).abs() < tol,
                    "{kind}: {name}[{idx}]: analytic {:e} vs numeric {numeric:e}",
                    g[idx]
                );
            }
        }
    }
    Ok(())
}

/// Instruction tuning honours `eval_every_steps` (validation at its multiples and at the
/// end, not at epoch ends) and early stopping (patience and minimum improvement on the
/// validation loss), as classification does.
#[test]
fn instruction_tuning_evaluates_every_n_steps_and_stops_early() -> Result<()> {
    use tuneforge_core::ExperimentConfig;
    let tmp = tiny_sft_task(40)?;
    let run = |train: &str| -> Result<(tuneforge_core::sft::SftSummary, Vec<u64>)> {
        let text = format!(
            "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 3\n[model]\nsource = \"{root}/model.gguf\"\n\
             task = \"causal-lm\"\nmax_len = 32\n[data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
             [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
             [train]\nepochs = 2\nbatch_size = 8\nlr = 1e-2\n{train}\n",
            root = tmp.path().display()
        );
        let s =
            tuneforge_core::sft::train_causal_lm(ExperimentConfig::from_toml(&text, "sft.toml", &[])?, &mut |_| {})?;
        let evals = logged(&s.run_dir, "eval", "step").iter().map(|v| *v as u64).collect();
        Ok((s, evals))
    };
    // 32 training examples in batches of 8: 4 steps an epoch, 8 in all.
    let (s, evals) = run("eval_every_steps = 3")?;
    assert_eq!((s.steps, s.early_stopped_at), (8, None));
    assert_eq!(evals, [0, 3, 6, 8], "the base model, every 3 steps, the end");
    // Any gain under 100 nats counts as none: the second evaluation stops the run.
    let (s, evals) = run("eval_every_steps = 2\nearly_stopping_patience = 1\nearly_stopping_min_delta = 100.0")?;
    assert_eq!((s.steps, s.early_stopped_at, s.status.as_str()), (4, Some(4), "completed"));
    assert_eq!(evals, [0, 2, 4]);
    assert!(s.best_model_dir.join("adapter_model.safetensors").is_file());
    Ok(())
}

/// Gradient accumulation in instruction tuning: batches of 4 accumulated two at a time take
/// the steps of batches of 8 (the same losses at every step, the same adapter), with
/// dropout off and batches in plain shuffled order (so that the rows match).
#[test]
fn instruction_tuning_accumulates_gradients_like_a_bigger_batch() -> Result<()> {
    use tuneforge_core::ExperimentConfig;
    let tmp = tempfile::tempdir().expect("tmp");
    write_model(tmp.path(), "llama")?;
    let data: String = (0..40)
        .map(|i| {
            let response = if i % 3 == 0 { "in the hat" } else { "on the mat by the cat" };
            serde_json::json!({"prompt": format!("the cat {i}"), "response": response}).to_string() + "\n"
        })
        .collect();
    std::fs::write(tmp.path().join("sft.jsonl"), data).expect("data");
    let run = |batch: &str| -> Result<(u64, Vec<f64>)> {
        let text = format!(
            "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 5\n[model]\nsource = \"{root}/model.gguf\"\n\
             task = \"causal-lm\"\nmax_len = 32\n[data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
             [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\nlora_dropout = 0.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
             [train]\nepochs = 2\nlr = 1e-2\ngroup_by_length = false\n{batch}\n",
            root = tmp.path().display()
        );
        let s =
            tuneforge_core::sft::train_causal_lm(ExperimentConfig::from_toml(&text, "sft.toml", &[])?, &mut |_| {})?;
        Ok((s.steps, logged(&s.run_dir, "train", "loss")))
    };
    let (steps, accumulated) = run("batch_size = 4\ngrad_accum = 2")?;
    let (big_steps, big) = run("batch_size = 8")?;
    assert_eq!((steps, big_steps), (8, 8), "32 rows, 8 a step, 2 epochs");
    for (i, (a, b)) in accumulated.iter().zip(&big).enumerate() {
        assert!((a - b).abs() < 1e-5, "step {}: accumulated {a} vs one batch {b}", i + 1);
    }
    assert!(big.last() < big.first(), "it learns: {big:?}");
    Ok(())
}

/// An adapter as `[model] source`: tuning goes on from its LoRA weights over its base (the
/// new run's first validation is the adapter's best), the new adapter names the original
/// base, and a LoRA of another shape is refused naming `peft`.
#[test]
fn instruction_tuning_goes_on_from_an_adapter() -> Result<()> {
    use tuneforge_core::ExperimentConfig;
    let tmp = tiny_sft_task(30)?;
    let config = |source: &str, rank: usize| -> Result<ExperimentConfig> {
        let text = format!(
            "[experiment]\noutput_dir = \"{root}/runs\"\nseed = 3\n[model]\nsource = \"{source}\"\ntask = \"causal-lm\"\n\
             max_len = 32\n[data]\ntrain = \"{root}/sft.jsonl\"\nvalidation_split = 0.2\n\
             [peft]\nmethod = \"lora\"\nrank = {rank}\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
             [train]\nepochs = 2\nbatch_size = 8\nlr = 1e-2\n",
            root = tmp.path().display()
        );
        ExperimentConfig::from_toml(&text, "sft.toml", &[])
    };
    let gguf = tmp.path().join("model.gguf").display().to_string();
    let first = tuneforge_core::sft::train_causal_lm(config(&gguf, 4)?, &mut |_| {})?;
    let adapter = first.best_model_dir.display().to_string();
    let mut lines = Vec::new();
    let second = tuneforge_core::sft::train_causal_lm(config(&adapter, 4)?, &mut |l| lines.push(l.to_owned()))?;
    assert!(lines.iter().any(|l| l.contains("starting from the adapter")), "{lines:?}");
    assert!(
        (second.base_validation_loss - first.validation_loss).abs() < 1e-5,
        "the second run starts where the first ended: {} vs {}",
        second.base_validation_loss,
        first.validation_loss
    );
    assert!(second.base_validation_loss < first.base_validation_loss);
    assert_eq!(second.base_model, first.base_model, "the new adapter is over the original base");
    LanguageModel::load(&second.best_model_dir)?;
    let e = tuneforge_core::sft::train_causal_lm(config(&adapter, 8)?, &mut |_| {}).expect_err("another rank");
    assert!(e.to_string().contains("peft"), "{e}");
    Ok(())
}
