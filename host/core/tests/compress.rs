//! Compression on tiny random models: int8 quantization (logits close to f32, smaller files,
//! damaged files named), and knowledge distillation.

use std::path::Path;

use candle_core::DType;
use tuneforge_core::bert::BertConfig;
use tuneforge_core::quantize::{dir_size, quantize_int8};
use tuneforge_core::testing::tiny_tokenizer;
use tuneforge_core::{ClassifierModel, ClassifierOptions, ForwardCtx, PeftSpec, Pooling, Result, Trainability};
use tuneforge_data::{EncodedBatch, TextEncoder};

const WORDS: &[&str] = tuneforge_core::testing::TINY_WORDS;

/// A tiny classifier with a wider hidden size than `BertConfig::tiny`, saved to `dir`.
fn saved_model(dir: &Path) -> Result<ClassifierModel> {
    let text = TextEncoder::new(tiny_tokenizer(WORDS)?, 16)?;
    let mut config = BertConfig::tiny(text.vocab_size());
    config.hidden_size = 64;
    config.intermediate_size = 128;
    config.num_attention_heads = 4;
    let options = ClassifierOptions {
        labels: vec!["a".into(), "b".into(), "c".into()],
        pooling: Pooling::Mean,
        max_len: 16,
        classifier_dropout: 0.0,
        seed: 11,
        trainability: Trainability::default(),
        base_model: "tiny".into(),
        dtype: DType::F32,
        device: candle_core::Device::Cpu,
        peft: PeftSpec::None,
        extra_tokens: Vec::new(),
        fusion: None,
    };
    let model = ClassifierModel::random(config, text, &options)?;
    model.save(dir)?;
    ClassifierModel::load(dir)
}

fn logits(model: &ClassifierModel) -> Result<Vec<Vec<f32>>> {
    let texts = ["fever cough hot", "rash itch red skin", "chest pain", "head pain tired sneeze"];
    let encoded = model.text_encoder().encode(&texts)?;
    let b = EncodedBatch::collate(&encoded, &[0, 1, 2, 3], None, 0);
    Ok(model.logits(&b, &ForwardCtx::eval())?.to_vec2::<f32>()?)
}

#[test]
fn int8_logits_are_close_to_f32_and_the_files_shrink() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f32_dir = tmp.path().join("f32");
    let int8_dir = tmp.path().join("int8");
    let model = saved_model(&f32_dir)?;
    let report = quantize_int8(&f32_dir, &int8_dir, false)?;
    // 2 layers x 6 linear layers + the word embeddings.
    assert_eq!(report.tensors, 13);
    assert!(report.max_error_in_steps <= 0.5 + 1e-4, "{}", report.max_error_in_steps);
    let quantized = ClassifierModel::load(&int8_dir)?;
    assert!(quantized.meta().quantization.is_some());
    let (a, b) = (logits(&model)?, logits(&quantized)?);
    let spread = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() <= 0.05 * spread.max(1e-3), "int8 logit {y} vs f32 {x} (spread {spread})");
        }
        let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |best, (i, v)| if *v > r[best] { i } else { best });
        assert_eq!(argmax(ra), argmax(rb));
    }
    assert!(dir_size(&int8_dir)? < dir_size(&f32_dir)? * 45 / 100);
    // Predictions go through the int8 path too, and a quantized model is not re-saved.
    assert_eq!(quantized.predict(&["fever cough"], 8)?.len(), 1);
    assert!(quantized.save(&tmp.path().join("again")).is_err());
    // Quantizing twice is refused.
    let e = quantize_int8(&int8_dir, &tmp.path().join("twice"), false).expect_err("already");
    assert!(e.to_string().contains("already quantized"), "{e}");
    Ok(())
}

#[test]
fn keeping_embeddings_float_quantizes_only_the_linear_layers() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tempdir");
    saved_model(&tmp.path().join("f32"))?;
    let report = quantize_int8(&tmp.path().join("f32"), &tmp.path().join("int8"), true)?;
    assert_eq!(report.tensors, 12);
    let m = ClassifierModel::load(&tmp.path().join("int8"))?;
    assert!(m.params().get("embeddings.word_embeddings.weight").is_some());
    Ok(())
}

#[test]
fn a_damaged_int8_file_names_the_tensor() -> Result<()> {
    let tmp = tempfile::tempdir().expect("tempdir");
    saved_model(&tmp.path().join("f32"))?;
    let dir = tmp.path().join("int8");
    quantize_int8(&tmp.path().join("f32"), &dir, false)?;
    // Drop one scale tensor from the file.
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| n != "encoder.layer.1.output.dense.weight.scale").collect();
    let out = safetensors::tensor::serialize(kept, None).expect("serialise");
    std::fs::write(dir.join("model.safetensors"), out).expect("write");
    let e = ClassifierModel::load(&dir).expect_err("damaged");
    let msg = e.to_string();
    assert!(msg.contains("encoder.layer.1.output.dense.weight.scale") && msg.contains("model.safetensors"), "{msg}");
    Ok(())
}

/// [`TINY_CSV`](tuneforge_core::testing::TINY_CSV) with 40% of the labels wrong (rows 0 and 2
/// of every 5 get the next class).
fn noisy_csv() -> String {
    let classes = ["flu", "acne", "angina"];
    let mut out = String::from("label,text\n");
    for (i, line) in tuneforge_core::testing::TINY_CSV.lines().skip(1).enumerate() {
        let (label, text) = line.split_once(',').expect("label,text");
        let label = if i % 5 == 0 || i % 5 == 2 {
            let c = classes.iter().position(|c| *c == label).expect("class");
            classes[(c + 1) % 3]
        } else {
            label
        };
        out.push_str(&format!("{label},{text}\n"));
    }
    out
}

/// A one-layer student (from the base model, not the teacher) trained on noisy labels: with a
/// clean teacher's outputs it recovers the true classes; without them it learns the noise.
#[test]
fn a_distilled_student_beats_the_same_student_trained_without_the_teacher() -> Result<()> {
    use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment};
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let text = tuneforge_core::testing::write_tiny_task(root, "")?;
    let teacher = train_experiment(
        ExperimentConfig::from_toml(&text, "teacher.toml", &[])?,
        &RunOptions::default(),
        &mut |_| {},
    )?;
    let teacher_acc = teacher.summary.validation.as_ref().expect("report").accuracy;
    assert!(teacher_acc >= 0.95, "teacher {teacher_acc}");
    let with_teacher = distilled_student(root, teacher.run.root(), 0.9)?;
    let labels_only = distilled_student(root, teacher.run.root(), 0.0)?;
    assert!(labels_only <= 0.8, "without the teacher the student should learn the noise, got {labels_only}");
    assert!(with_teacher >= labels_only + 0.15, "distilled {with_teacher} vs labels only {labels_only}");
    Ok(())
}

/// The validation accuracy of a one-layer encoder student trained on the noisy labels with
/// `teacher` (a run directory) weighted by `alpha`.
fn distilled_student(root: &Path, teacher: &Path, alpha: f64) -> Result<f64> {
    use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment};
    let noisy = root.join("noisy.csv");
    std::fs::write(&noisy, noisy_csv()).expect("write");
    let extra = format!(
        "[distill]\nteacher = \"{}\"\ntemperature = 2.0\nalpha = {alpha}\nstudent_layers = 1\nstudent_init = \"base\"\n",
        teacher.display()
    );
    let text = tuneforge_core::testing::write_tiny_task(root, &extra)?;
    let ov = vec![format!("data.train=\"{}\"", noisy.display())];
    let cfg = ExperimentConfig::from_toml(&text, "student.toml", &ov)?;
    let out = train_experiment(cfg, &RunOptions::default(), &mut |_| {})?;
    let best = ClassifierModel::load(&out.run.best())?;
    assert_eq!(best.backbone_config().n_layers(), 1, "the student keeps one layer");
    Ok(out.summary.validation.as_ref().expect("report").accuracy)
}

/// A decoder classifier (a tiny Llama with LoRA, saved over its base model) teaches an
/// encoder student with another tokenizer: the teacher runs on the texts with its own.
#[test]
fn a_decoder_classifier_teaches_an_encoder_student() -> Result<()> {
    use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment};
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    tuneforge_core::testing::write_tiny_decoder(&root.join("decoder"), "llama")?;
    let csv = root.join("clean.csv");
    std::fs::write(&csv, tuneforge_core::testing::TINY_CSV).expect("write");
    let text = format!(
        "[experiment]\noutput_dir = \"{out}\"\nseed = 5\n[model]\nsource = \"{model}\"\nmax_len = 24\npooling = \"last\"\n\
         classifier_dropout = 0.0\n[data]\ntrain = \"{train}\"\nvalidation = \"{train}\"\n\
         [peft]\nmethod = \"lora\"\nrank = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"up_proj\"]\n\
         [train]\nepochs = 25\nbatch_size = 8\nlr = 1e-2\nwarmup_steps = 2\n",
        out = root.join("teacher-runs").display(),
        model = root.join("decoder/model.gguf").display(),
        train = csv.display(),
    );
    let teacher = train_experiment(
        ExperimentConfig::from_toml(&text, "teacher.toml", &[])?,
        &RunOptions::default(),
        &mut |_| {},
    )?;
    assert!(
        ClassifierModel::load(&teacher.run.best())?.meta().over_base,
        "a LoRA decoder teacher is saved over its base"
    );
    let teacher_acc = teacher.summary.validation.as_ref().expect("report").accuracy;
    assert!(teacher_acc >= 0.95, "teacher {teacher_acc}");
    let with_teacher = distilled_student(root, teacher.run.root(), 0.9)?;
    let labels_only = distilled_student(root, teacher.run.root(), 0.0)?;
    assert!(with_teacher >= labels_only + 0.15, "distilled {with_teacher} vs labels only {labels_only}");
    Ok(())
}

#[test]
fn distillation_settings_are_checked() -> Result<()> {
    use tuneforge_core::{ExperimentConfig, RunOptions, train_experiment};
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = tuneforge_core::testing::write_tiny_task(tmp.path(), "[distill]\nteacher = \"nowhere\"\nalpha = 1.5\n")?;
    let e = ExperimentConfig::from_toml(&text, "s.toml", &[]).expect_err("alpha");
    assert!(e.to_string().contains("distill.alpha"), "{e}");
    // A teacher directory that is not a model: the error names it.
    let text = tuneforge_core::testing::write_tiny_task(
        tmp.path(),
        "[distill]\nteacher = \"nowhere\"\nstudent_init = \"base\"\n",
    )?;
    let e = train_experiment(ExperimentConfig::from_toml(&text, "s.toml", &[])?, &RunOptions::default(), &mut |_| {})
        .expect_err("no teacher");
    assert!(e.to_string().contains("nowhere"), "{e}");
    Ok(())
}
