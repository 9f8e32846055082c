//! CPU and CUDA agree: tiny encoder and decoder logits and gradients in f32, an AdamW step,
//! bf16 mixed-precision training against f32, gradient checkpointing on the GPU, the NCCL
//! path with a group of one, the fused ops (tuneforge's CUDA kernels) one by one, and batched
//! generation. Built only with `--features cuda` (run by `cargo xtask gpu-check`); without a
//! GPU the first test fails with the device error.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use tuneforge_core::llama::{DecoderModel, KvCache, LlamaConfig};
use tuneforge_core::testing::{
    classifier_gradients, decoder_gradients, max_relative_difference, tiny_batch, tiny_classifier,
};
use tuneforge_core::{AdamW, AdamWConfig, DeviceSpec, ForwardCtx, StepMode, TrainBatch, train_step_with};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn gpu() -> Result<Device> {
    Ok(DeviceSpec::Cuda(0).open()?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len());
    Ok(a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())))
}

#[test]
fn opening_devices() -> Result<()> {
    let d = gpu()?;
    assert!(d.is_cuda());
    let err = DeviceSpec::Cuda(97).open().expect_err("no 98th GPU here").to_string();
    assert!(err.contains("cuda:97"), "{err}");
    Ok(())
}

#[test]
fn encoder_logits_and_gradients_match_the_cpu() -> Result<()> {
    let gpu = gpu()?;
    let cpu_model = tiny_classifier(&Device::Cpu, 0.0, 3)?;
    let gpu_model = tiny_classifier(&gpu, 0.0, 3)?;
    let batch = tiny_batch(&cpu_model)?;
    let a = cpu_model.logits(&batch, &ForwardCtx::eval())?;
    let b = gpu_model.logits(&batch, &ForwardCtx::eval())?;
    let d = max_abs_diff(&a, &b)?;
    assert!(d < 1e-4, "eval logits differ by {d}");
    let (la, ga) = classifier_gradients(&cpu_model, &batch, &ForwardCtx::eval_differentiable())?;
    let (lb, gb) = classifier_gradients(&gpu_model, &batch, &ForwardCtx::eval_differentiable())?;
    assert!((la - lb).abs() < 1e-4, "loss {la} vs {lb}");
    assert_eq!(ga.len(), cpu_model.params().trainable().len());
    let rel = max_relative_difference(&ga, &gb)?;
    assert!(rel < 1e-3, "gradients differ by {rel} of their scale");
    Ok(())
}

#[test]
fn decoder_logits_gradients_and_kv_cache_match_the_cpu() -> Result<()> {
    let gpu = gpu()?;
    for kind in ["llama", "qwen2"] {
        let config = LlamaConfig::tiny(kind, 40);
        let cpu_model = DecoderModel::random_on(&config, 5, DType::F32, &Device::Cpu)?;
        let gpu_model = DecoderModel::random_on(&config, 5, DType::F32, &gpu)?;
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 17, 2, 8]], &Device::Cpu)?;
        let a = cpu_model.forward(&ids, None, &ForwardCtx::eval())?;
        let b = gpu_model.forward(&ids, None, &ForwardCtx::eval())?;
        let d = max_abs_diff(&a, &b)?;
        assert!(d < 1e-4, "{kind}: logits differ by {d}");
        // The cached path on the GPU: the prompt, then one token at a time.
        let mut cache = KvCache::new();
        let head = gpu_model.forward(&ids.narrow(1, 0, 4)?, Some(&mut cache), &ForwardCtx::eval())?;
        let mut last = head.narrow(1, 3, 1)?;
        for t in 4..7 {
            last = gpu_model.forward(&ids.narrow(1, t, 1)?, Some(&mut cache), &ForwardCtx::eval())?;
        }
        let d = max_abs_diff(&last, &b.narrow(1, 6, 1)?)?;
        assert!(d < 1e-4, "{kind}: cached logits differ by {d}");
        let (la, ga) = decoder_gradients(&cpu_model, &ids, &ForwardCtx::eval_differentiable())?;
        let (lb, gb) = decoder_gradients(&gpu_model, &ids, &ForwardCtx::eval_differentiable())?;
        assert!((la - lb).abs() < 1e-4, "{kind}: loss {la} vs {lb}");
        let rel = max_relative_difference(&ga, &gb)?;
        assert!(rel < 1e-3, "{kind}: gradients differ by {rel}");
    }
    Ok(())
}

#[test]
fn gradient_checkpointing_on_the_gpu_gives_the_same_gradients() -> Result<()> {
    let gpu = gpu()?;
    let model = tiny_classifier(&gpu, 0.2, 3)?;
    let batch = tiny_batch(&model)?;
    let (l1, plain) = classifier_gradients(&model, &batch, &ForwardCtx::train(9))?;
    let (l2, ckpt) = classifier_gradients(&model, &batch, &ForwardCtx::train(9).with_checkpointing(true))?;
    assert!((l1 - l2).abs() < 1e-6, "{l1} vs {l2}");
    let rel = max_relative_difference(&plain, &ckpt)?;
    assert!(rel < 1e-5, "checkpointed gradients differ by {rel}");
    Ok(())
}

/// Training steps from the same start: returns the loss of each step.
fn losses(device: &Device, mode: StepMode<'_>, steps: usize) -> Result<Vec<f64>> {
    let model = tiny_classifier(device, 0.0, 4)?;
    let batch: TrainBatch = tiny_batch(&model)?.into();
    let trainable = model.params().trainable();
    let mut opt = AdamW::new(trainable.clone(), AdamWConfig::default())?;
    let mut out = Vec::new();
    for s in 0..steps {
        let stats = train_step_with(
            &model,
            &trainable,
            &mut opt,
            std::slice::from_ref(&batch),
            &[s as u64],
            1.0,
            3e-3,
            &mut [],
            mode,
        )?;
        out.push(stats.loss);
    }
    Ok(out)
}

#[test]
fn adamw_and_f32_training_match_the_cpu() -> Result<()> {
    let gpu = gpu()?;
    let cpu = losses(&Device::Cpu, StepMode::default(), 8)?;
    let cuda = losses(&gpu, StepMode::default(), 8)?;
    for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
        assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "step {i}: cpu {a} vs cuda {b}");
    }
    assert!(cpu[7] < cpu[0] - 0.1, "the tiny task trains: {cpu:?}");
    Ok(())
}

#[test]
fn bf16_mixed_precision_tracks_f32_within_bf16_tolerance() -> Result<()> {
    let gpu = gpu()?;
    let f32_curve = losses(&gpu, StepMode::default(), 20)?;
    let bf16 = StepMode { compute_dtype: Some(DType::BF16), ..StepMode::default() };
    let bf16_curve = losses(&gpu, bf16, 20)?;
    for (i, (a, b)) in f32_curve.iter().zip(&bf16_curve).enumerate() {
        assert!((a - b).abs() < 0.05 + 0.05 * a.abs(), "step {i}: f32 {a} vs bf16 {b}");
    }
    assert!(f32_curve != bf16_curve, "bf16 steps compute in bf16, so they differ from f32 a little");
    assert!(bf16_curve[19] < bf16_curve[0] - 0.2, "bf16 trains: {bf16_curve:?}");
    // Master weights stay f32.
    let model = tiny_classifier(&gpu, 0.0, 4)?;
    assert!(model.params().trainable().iter().all(|(_, v)| v.dtype() == DType::F32));
    Ok(())
}

#[cfg(feature = "nccl")]
#[test]
fn nccl_group_of_one_averages_to_the_same_step() -> Result<()> {
    use std::collections::HashMap;
    use tuneforge_core::parallel::{DataParallel, new_group_id};
    let gpu = gpu()?;
    let group = DataParallel::join_group(0, 1, &new_group_id()?, &gpu)?;
    assert!(group.is_distributed() && group.is_primary());
    let mut grads = HashMap::new();
    let g = Tensor::new(&[1.5f32, -2.0, 3.25], &gpu)?;
    grads.insert("w".to_owned(), g.clone());
    group.all_reduce_mean(&mut grads)?;
    assert_eq!(max_abs_diff(&grads["w"], &g)?, 0.0);
    let plain = losses(&gpu, StepMode::default(), 4)?;
    let parallel = losses(&gpu, StepMode::default().with_parallel(&group), 4)?;
    for (a, b) in plain.iter().zip(&parallel) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    Ok(())
}

/// The GPU optimizer (tuneforge's in-place kernels) takes the CPU's steps: a parameter
/// without a gradient is left alone, bf16 gradients and a clipping scale are taken, and
/// the moments it saves restore into a new optimizer that continues the same way.
#[test]
fn adamw_on_the_gpu_matches_the_cpu_and_resumes_from_its_state() -> Result<()> {
    let gpu = gpu()?;
    let run = |device: &Device| -> Result<Vec<f32>> {
        let a = candle_core::Var::new(&[1.0f32, -2.0, 3.0], device)?;
        let b = candle_core::Var::new(&[[0.5f32, 0.25], [4.0, -1.0]], device)?;
        let vars = vec![("a.weight".to_owned(), a.clone()), ("b.bias".to_owned(), b.clone())];
        let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        let mut opt = AdamW::new(vars.clone(), config)?;
        let grads = |step: usize| -> Result<std::collections::HashMap<String, Tensor>> {
            let mut grads = std::collections::HashMap::new();
            let ga = Tensor::new(&[0.3f32, -0.1, 2.0], device)?.affine(1.0 + step as f64, 0.0)?;
            grads.insert("a.weight".to_owned(), if step == 2 { ga.to_dtype(DType::BF16)? } else { ga });
            if step != 1 {
                grads.insert("b.bias".to_owned(), Tensor::new(&[[1.0f32, -1.0], [0.0, 0.5]], device)?);
            }
            Ok(grads)
        };
        for step in 0..3 {
            opt.step_scaled(&grads(step)?, 0.1, if step == 2 { 0.5 } else { 1.0 })?;
        }
        let state: std::collections::HashMap<String, Tensor> = opt.state_tensors()?.into_iter().collect();
        let mut resumed = AdamW::new(vars, config)?;
        resumed.load_state(&state, opt.step_count())?;
        resumed.step(&grads(3)?, 0.1)?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?) };
        let mut out = Vec::new();
        for t in [a.as_tensor(), b.as_tensor(), &state["m.a.weight"], &state["v.b.bias"]] {
            out.extend(flat(t)?);
        }
        Ok(out)
    };
    let (cpu, on_gpu) = (run(&Device::Cpu)?, run(&gpu)?);
    for (x, y) in cpu.iter().zip(&on_gpu) {
        assert!((x - y).abs() < 1e-5, "cpu {cpu:?}\ngpu {on_gpu:?}");
    }
    Ok(())
}

/// The global gradient norm on the GPU (one sum-of-squares kernel per gradient, f32 and
/// bf16 gradients together) is the CPU's.
#[test]
fn the_gradient_norm_on_the_gpu_is_the_cpus() -> Result<()> {
    use std::collections::HashMap;
    let gpu = gpu()?;
    let grads = |device: &Device| -> Result<HashMap<String, Tensor>> {
        let mut grads = HashMap::new();
        for (k, n) in [3usize, 100_000, 4099].into_iter().enumerate() {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7 + k) % 13) as f32 * 0.1 - 0.6).collect();
            let t = Tensor::from_vec(v, n, device)?;
            grads.insert(format!("p{k}"), if k == 2 { t.to_dtype(DType::BF16)? } else { t });
        }
        Ok(grads)
    };
    let (cpu, on_gpu) = (tuneforge_core::grad_norm(&grads(&Device::Cpu)?)?, tuneforge_core::grad_norm(&grads(&gpu)?)?);
    assert!((cpu - on_gpu).abs() <= 1e-5 * cpu, "cpu {cpu} vs gpu {on_gpu}");
    Ok(())
}

/// tuneforge's CUDA kernels (`tuneforge_kernels::gpu`) behind the fused ops agree with the
/// CPU ops in value and gradient, in f32 and in bf16 (the kernels' arithmetic is checked on
/// the CPU through their emulation; this checks the launches on a real device). Dropout
/// draws the same mask on both.
#[test]
fn fused_ops_on_the_gpu_match_the_cpu() -> Result<()> {
    use candle_core::Var;
    use tuneforge_core::layers::fused::{
        bias_add, cross_entropy, embedding, gelu_erf, layer_norm, rms_norm, rope, softmax_scaled, swiglu,
    };
    let gpu = gpu()?;
    let (b, h, q, k) = (2, 3, 5, 37);
    let on = |device: &Device, dtype: DType| -> Result<Vec<(String, Tensor, Vec<Tensor>)>> {
        let var = |shape: &[usize], seed: u64| -> Result<Var> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> =
                (0..n).map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
        };
        let (x, g, beta) = (var(&[b * q, k], 1)?, var(&[k], 2)?, var(&[k], 3)?);
        let scores = var(&[b, h, q, k], 4)?;
        let mask: Vec<f32> = (0..b * k).map(|i| if i % k < 30 - 10 * (i / k) { 0.0 } else { -1e4 }).collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, k), device)?;
        let xc = x.as_tensor().to_dtype(dtype)?;
        let cases: Vec<(&str, Tensor, Vec<&Var>)> = vec![
            ("layer norm", layer_norm(&xc, g.as_tensor(), beta.as_tensor(), 1e-5)?, vec![&x, &g, &beta]),
            ("rms norm", rms_norm(&xc, g.as_tensor(), 1e-6)?, vec![&x, &g]),
            ("gelu", gelu_erf(&xc)?, vec![&x]),
            (
                "swiglu",
                swiglu(&xc, &scores.as_tensor().reshape((b * q, h * k))?.narrow(1, 0, k)?.to_dtype(dtype)?)?,
                vec![&x, &scores],
            ),
            ("bias add", bias_add(&xc, beta.as_tensor())?, vec![&x, &beta]),
            // Rows looked up several times: their gradients meet in the kernel's atomic adds.
            ("embedding", embedding(&xc, &Tensor::new(&[3u32, 0, 3, 9, 3, 1, 3], device)?)?, vec![&x]),
            ("dropout", ForwardCtx::train(7).dropout(&xc, 0.2)?, vec![&x]),
            ("masked softmax", softmax_scaled(&scores.as_tensor().to_dtype(dtype)?, 0.3, Some(&mask))?, vec![&scores]),
            (
                "rope",
                {
                    let angles =
                        Tensor::from_vec((0..q * 18).map(|i| i as f32 * 0.37).collect::<Vec<_>>(), (q, 18), device)?;
                    rope(&scores.as_tensor().narrow(3, 0, 36)?.to_dtype(dtype)?, &angles.cos()?, &angles.sin()?)?
                },
                vec![&scores],
            ),
            (
                "cross-entropy",
                cross_entropy(&xc, &Tensor::new(&[0u32, 36, 5, 17, 3, 9, 30, 1, 2, 22], device)?)?,
                vec![&x],
            ),
        ];
        let mut out = Vec::new();
        for (name, y, vars) in cases {
            let y = y.to_dtype(DType::F32)?;
            let w = Tensor::from_vec(
                (0..y.elem_count()).map(|i| ((i % 7) as f32) - 3.0).collect::<Vec<_>>(),
                y.shape(),
                device,
            )?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let grads = vars
                .iter()
                .map(|v| Ok(grads.get(v.as_tensor()).ok_or("no gradient")?.clone()))
                .collect::<Result<Vec<_>>>()?;
            out.push((name.to_owned(), y, grads));
        }
        Ok(out)
    };
    let cpu = on(&Device::Cpu, DType::F32)?;
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 5e-2)] {
        for ((name, ya, ga), (_, yb, gb)) in cpu.iter().zip(on(&gpu, dtype)?) {
            let scale =
                |t: &Tensor| -> Result<f32> { Ok(1.0 + t.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?) };
            let d = max_abs_diff(ya, &yb)?;
            assert!(d <= tol * scale(ya)?, "{name} in {dtype:?}: values differ by {d}");
            for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
                let d = max_abs_diff(a, b)?;
                assert!(d <= tol * scale(a)?, "{name} in {dtype:?}: gradient {i} differs by {d}");
            }
        }
    }
    Ok(())
}

/// Generation on the GPU: tiny Llama and Qwen2 models loaded onto the device answer a batch
/// of greedy prompts of different lengths (left-padded rows, per-row rotary tables, the KV
/// cache's row operations) with the ids the CPU gives.
#[test]
fn batched_generation_on_the_gpu_matches_the_cpu() -> Result<()> {
    use tuneforge_core::generate::{LanguageModel, Sampling};
    let gpu = gpu()?;
    let tmp = tempfile::tempdir()?;
    for kind in ["llama", "qwen2"] {
        tuneforge_core::testing::write_tiny_decoder(tmp.path(), kind)?;
        let path = tmp.path().join("model.gguf");
        let s = Sampling { max_new_tokens: 10, ..Sampling::default() };
        let requests: Vec<(String, Sampling)> = ["the cat", "the cat in the hat, the hat on the cat", "hat"]
            .iter()
            .map(|p| (p.to_string(), s.clone()))
            .collect();
        let ids = |device: &Device| -> Result<Vec<Vec<u32>>> {
            let lm = LanguageModel::load_on(&path, device)?;
            lm.generate_batch(&requests, &mut |_, _| {})?.into_iter().map(|r| Ok(r?.ids)).collect()
        };
        let (cpu, on_gpu) = (ids(&Device::Cpu)?, ids(&gpu)?);
        assert!(cpu.iter().all(|i| !i.is_empty()), "{kind}: {cpu:?}");
        assert_eq!(cpu, on_gpu, "{kind}: CPU and GPU answers");
    }
    Ok(())
}
