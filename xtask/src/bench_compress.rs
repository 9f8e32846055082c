//! `cargo xtask bench compress`: what int8 quantization and distillation cost and buy.
//!
//! For a trained f32 model (a run directory), its int8 copy (made here with
//! `tuneforge_core::quantize`), and optionally a distilled student run (and its int8 copy):
//! accuracy and macro-F1 on the run's own validation split (rebuilt from its config.toml, so
//! every model sees the same held-out rows), size on disk, peak memory, inference tokens/s
//! (batches of 32 in file order, each padded to its longest row) and batch-1 latency. Each
//! model runs in its own process so that its peak memory is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use tuneforge_core::quantize::{dir_size, quantize_int8};
use tuneforge_core::{ClassifierModel, ExperimentConfig, ForwardCtx, evaluate, load_experiment_data};
use tuneforge_data::EncodedBatch;

const BATCH: usize = 32;

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut teacher: Option<PathBuf> = None;
    let mut student: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => teacher = Some(it.next().context("--model needs a run directory")?.into()),
            "--student" => student = Some(it.next().context("--student needs a run directory")?.into()),
            other => bail!("unknown option `{other}`"),
        }
    }
    let teacher = teacher.context("usage: cargo xtask bench compress --model RUN_DIR [--student RUN_DIR]")?;
    let config = teacher.join("config.toml");
    if !config.is_file() {
        bail!("{} is not a run directory (config.toml is missing)", teacher.display());
    }
    let tmp = tempfile::tempdir()?;
    let mut rows: Vec<(String, PathBuf)> = vec![("f32".into(), teacher.join("best"))];
    let int8 = tmp.path().join("int8");
    quantize_int8(&teacher, &int8, false)?;
    rows.push(("int8".into(), int8));
    if let Some(s) = &student {
        rows.push(("student f32".into(), s.join("best")));
        let s8 = tmp.path().join("student-int8");
        quantize_int8(s, &s8, false)?;
        rows.push(("student int8".into(), s8));
    }
    println!(
        "machine: {} cores, {}; int8 kernel: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        crate::bench::cpu_model(),
        tuneforge_kernels::KernelPath::detect()
    );
    println!("load:    {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!("held-out: the validation split of {}\n", config.display());
    println!(
        "{:<14} {:>6} {:>9} {:>9} {:>9} {:>8} {:>10} {:>8} {:>9} {:>8}",
        "model", "layers", "accuracy", "macro-F1", "size MiB", "size %", "tokens/s", "speedup", "b1 ms", "RSS MiB"
    );
    let exe = std::env::current_exe()?;
    let mut base: Option<(f64, f64)> = None;
    for (name, dir) in rows {
        let out = Command::new(&exe).args(["bench-compress-one"]).arg(&dir).arg(&config).output()?;
        if !out.status.success() {
            bail!("{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| format!("{name}: bad output"))?;
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let size = dir_size(&dir)? as f64 / (1024.0 * 1024.0);
        let (base_size, base_tps) = *base.get_or_insert((size, f("tokens_per_s")));
        println!(
            "{:<14} {:>6} {:>9.4} {:>9.4} {:>9.1} {:>7.0}% {:>10.0} {:>7.2}x {:>9.2} {:>8.0}",
            name,
            f("layers"),
            f("accuracy"),
            f("macro_f1"),
            size,
            100.0 * size / base_size,
            f("tokens_per_s"),
            f("tokens_per_s") / base_tps,
            f("batch1_ms"),
            f("peak_rss_mib"),
        );
    }
    println!("\nspeedup: inference tokens/s over the f32 row; b1 ms: mean batch-1 forward over 64 examples");
    Ok(())
}

/// One model in this process: `bench-compress-one MODEL_DIR RUN_CONFIG`; prints JSON.
pub fn run_one(args: &[String]) -> anyhow::Result<()> {
    let [dir, config] = args else { bail!("bench-compress-one MODEL_DIR RUN_CONFIG") };
    let cfg = ExperimentConfig::from_file(Path::new(config), &[])?;
    let (_, validation, _) = load_experiment_data(&cfg)?;
    let model = ClassifierModel::load(Path::new(dir))?;
    let report = evaluate(&model, &validation, BATCH)?;
    let texts: Vec<&str> = validation.iter().map(|e| e.text.as_str()).collect();
    let encoded = model.text_encoder().encode(&texts)?;
    let pad = model.text_encoder().pad_id();
    let ctx = ForwardCtx::eval();
    // Throughput: two passes over the split in file order, the second timed.
    let (mut tokens, mut seconds) = (0u64, 0f64);
    for pass in 0..2 {
        for start in (0..encoded.len()).step_by(BATCH) {
            let idx: Vec<usize> = (start..(start + BATCH).min(encoded.len())).collect();
            let b = EncodedBatch::collate(&encoded, &idx, None, pad);
            let t = Instant::now();
            let _ = model.logits(&b, &ctx)?.to_vec2::<f32>()?;
            if pass == 1 {
                seconds += t.elapsed().as_secs_f64();
                tokens += b.n_tokens as u64;
            }
        }
    }
    let n1 = encoded.len().min(64);
    let t = Instant::now();
    for i in 0..n1 {
        let b = EncodedBatch::collate(&encoded, &[i], None, pad);
        let _ = model.logits(&b, &ctx)?.to_vec2::<f32>()?;
    }
    let batch1_ms = t.elapsed().as_secs_f64() * 1000.0 / n1.max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "layers": model.backbone_config().n_layers(),
            "accuracy": report.accuracy,
            "macro_f1": report.macro_f1,
            "tokens_per_s": tokens as f64 / seconds.max(1e-9),
            "batch1_ms": batch1_ms,
            "peak_rss_mib": crate::bench::peak_rss_mib(),
        })
    );
    Ok(())
}

/// `cargo xtask bench kernels`: the int8 product against candle's f32 matmul on MiniLM's
/// shapes (rows = batch 32 x 128 tokens, and small batches).
pub fn kernels() -> anyhow::Result<()> {
    use candle_core::{Device, Tensor};
    println!(
        "machine: {} cores, {}; int8 kernel: {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        crate::bench::cpu_model(),
        tuneforge_kernels::KernelPath::detect()
    );
    println!("{:<20} {:>10} {:>10} {:>9} {:>11}", "m x k x n", "f32 ms", "int8 ms", "speedup", "int8 GOPS");
    for &(m, k, n) in
        &[(4096usize, 384usize, 384usize), (4096, 384, 1536), (4096, 1536, 384), (128, 384, 1536), (32, 384, 384)]
    {
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?;
        let wt = w.t()?;
        let reps = 20;
        let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            for _ in 0..3 {
                f()?;
            }
            let t = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        };
        let f32_s = time(&mut || {
            x.matmul(&wt)?;
            Ok(())
        })?;
        let q = tuneforge_kernels::Int8Matrix::quantize(&w.flatten_all()?.to_vec1::<f32>()?, n, k)
            .map_err(anyhow::Error::msg)?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let int8_s = time(&mut || {
            q.matmul_t(&xv, m);
            Ok(())
        })?;
        println!(
            "{:<20} {:>10.3} {:>10.3} {:>8.2}x {:>11.0}",
            format!("{m}x{k}x{n}"),
            f32_s * 1e3,
            int8_s * 1e3,
            f32_s / int8_s,
            2.0 * (m * k * n) as f64 / int8_s / 1e9
        );
    }
    Ok(())
}
