#!/usr/bin/env bash
# The CUDA checks of tuneforge on a machine with an NVIDIA GPU, from binaries built by
# `cargo xtask gpu-check` (here or elsewhere: `--bundle DIR` gathers them with this script):
#   1. the CUDA tests (CPU vs CUDA logits and gradients, bf16, checkpointing, NCCL group of one),
#   2. training throughput: all-MiniLM-L6-v2-shaped full fine-tuning (and BERT-base-shaped at
#      32 x 512, where the products dominate) and SmolLM2-135M-shaped LoRA SFT, f32 / bf16 /
#      bf16 + gradient checkpointing: tokens/s, MFU, peak GPU memory,
#   3. the same workloads in PyTorch when the machine has it, and the table of both,
#   4. where the GPU time goes, when the machine has the tools and the time budget allows:
#      compute-sanitizer's memcheck over the tests of tuneforge's own kernels, and Nsight
#      Compute's kernel times of one MiniLM bf16 step summed by kernel (kernel-times.txt).
# usage: gpu-check.sh TESTS_BIN[.gz] BENCH_BIN[.gz] [OUT_DIR]
set -u
tests=$1
bench=$2
out=${3:-.}
mkdir -p "$out"
for f in "$tests" "$bench"; do
  case $f in *.gz) gunzip -kf "$f" ;; esac
done
tests=${tests%.gz}
bench=${bench%.gz}
chmod +x "$tests" "$bench"

# The CUDA libraries the binaries load, from the system or from Python wheels (PyTorch's).
for lib in libcuda.so.1 libcublas.so.13 libcurand.so.10 libcudart.so.13 libnccl.so.2; do
  if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
    found=$(find /usr /opt /root -name "$lib" 2>/dev/null | head -1)
    if [ -n "$found" ]; then LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"; fi
  fi
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}

# The whole check keeps within a time budget (7.5 minutes: the issue asks for under 8, and the
# device's time is scarce): later steps are skipped when too little of it is left, the most
# important results coming first.
budget=${GPU_CHECK_BUDGET_S:-450}
left() { [ $((budget - SECONDS)) -ge "$1" ] || { echo "(skipped: $((budget - SECONDS)) s of the budget left)"; return 1; }; }

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Dense bf16 tensor-core peak of the H100/H200 SXM (TFLOP/s), the MFU denominator.
peak=${PEAK_TFLOPS:-989}

echo "== CUDA tests"
timeout 200 "$tests" --test-threads=1 2>&1 | tee "$out/cuda-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== training throughput (each configuration in its own process)"
: > "$out/gpu-bench.jsonl"
run() {
  left 30 && timeout 120 "$bench" --device cuda --peak-tflops "$peak" "$@" 2>&1 | tee -a "$out/gpu-bench.jsonl"
}
run --model minilm --precision f32 --batch 32 --seq 128 --steps 20
run --model minilm --precision bf16 --batch 32 --seq 128 --steps 20
run --model minilm --precision bf16 --batch 32 --seq 128 --steps 20 --checkpointing
run --model minilm --precision bf16 --batch 256 --seq 128 --steps 10
run --model minilm --precision bf16 --batch 256 --seq 128 --steps 10 --checkpointing
run --model bert-base --precision bf16 --batch 32 --seq 512 --steps 10
run --model smollm2 --precision f32 --batch 8 --seq 512 --steps 10
run --model smollm2 --precision bf16 --batch 8 --seq 512 --steps 10
run --model smollm2 --precision bf16 --batch 8 --seq 512 --steps 10 --checkpointing

# The same workloads in PyTorch on the same GPU, when this machine has torch, transformers
# and peft (bench/pytorch_gpu_bench.py beside this script or in the repository).
ref="$(dirname "$0")/pytorch_gpu_bench.py"
if [ -f "$ref" ] && left 120 && python3 -c "import torch, transformers, peft; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "== the same workloads in PyTorch"
  pyrun() { left 60 && timeout 150 python3 "$ref" "$@" 2>/dev/null | tee -a "$out/gpu-bench.jsonl"; }
  pyrun minilm f32 32 128 20
  pyrun minilm bf16 32 128 20
  pyrun minilm bf16 256 128 10
  pyrun minilm bf16 256 128 10 --checkpointing
  pyrun bert-base bf16 32 512 10
  pyrun smollm2 f32 8 512 10
  pyrun smollm2 bf16 8 512 10
  pyrun smollm2 bf16 8 512 10 --checkpointing
fi

if command -v python3 >/dev/null; then
  python3 - "$out/gpu-bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'framework':10} {'model':9} {'prec':5} {'ckpt':5} {'batch':>9} {'tokens/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9}")
for r in rows:
    fw = r.get("framework", "tuneforge").split()[0]
    print(f"{fw:10} {r['model']:9} {r['precision']:5} {str(r['checkpointing']):5} {r['batch']:>4}x{r['seq']:<4} "
          f"{r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} {r['tflops']:>8.1f} {100*r['mfu']:>5.1f}% {r['peak_memory_mib']:>9.0f}")
PY
fi
if command -v compute-sanitizer >/dev/null && left 150; then
  echo "== compute-sanitizer memcheck: tuneforge's kernels"
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 "$tests" --test-threads=1 \
    fused_ops_on_the_gpu encoder_logits decoder_logits 2>&1 | tail -15 | tee "$out/memcheck.log"
fi
if command -v ncu >/dev/null && command -v python3 >/dev/null && left 150; then
  echo "== GPU time by kernel: one MiniLM bf16 step, 32 x 128 (Nsight Compute)"
  timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    "$bench" --device cuda --model minilm --precision bf16 --batch 32 --seq 128 --steps 1 --warmup 0 \
    > "$out/ncu.csv" 2> "$out/ncu.err"
  python3 - "$out/ncu.csv" <<'PY' | tee "$out/kernel-times.txt"
import csv, collections, sys
scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if not rows:
    sys.exit("ncu wrote no kernel rows (see ncu.err)")
head = rows[0]
name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
total, count = collections.Counter(), collections.Counter()
for r in rows[1:]:
    us = float(r[value].replace(",", "")) * scale.get(r[unit], 1.0)
    key = r[name].split("(")[0][:70]
    total[key] += us
    count[key] += 1
all_us = sum(total.values())
print(f"{len(rows) - 1} kernels, {all_us / 1e3:.1f} ms of GPU time (model set-up included)")
for key, us in total.most_common(25):
    print(f"{us / 1e3:9.2f} ms {100 * us / all_us:5.1f}% {count[key]:6d}x  {key}")
PY
fi

exit "$tests_rc"
