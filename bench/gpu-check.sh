#!/usr/bin/env bash
# The CUDA checks of tuneforge on a machine with an NVIDIA GPU, from binaries built by
# `cargo xtask gpu-check` (here or elsewhere: `--bundle DIR` gathers them with this script):
#   1. the CUDA tests (CPU vs CUDA logits and gradients, bf16, checkpointing, NCCL group of one,
#      batched generation),
#   2. given a tuneforge binary built with `--features nccl`, `tuneforge train` end to end on
#      a tiny task (written by the benchmark binary): on the CPU, `--device cuda` (f32, bf16,
#      gradient checkpointing) and `--gpus 1` (one NCCL rank, recorded in a store), their
#      loss curves compared,
#   3. training throughput: all-MiniLM-L6-v2-shaped full fine-tuning (and BERT-base-shaped at
#      32 x 512, where the products dominate) and SmolLM2-135M-shaped LoRA SFT, f32 / bf16 /
#      bf16 + gradient checkpointing: tokens/s, MFU, peak GPU memory,
#   4. the same workloads in PyTorch when the machine has it, and the table of both,
#   5. where the GPU time goes, when the machine has the tools and the time budget allows:
#      compute-sanitizer's memcheck over the tests of tuneforge's own kernels, and Nsight
#      Compute's kernel times of one BERT-base-shaped bf16 32 x 512 step (where MFU is measured
#      against PyTorch's 23.5%) summed by kernel (kernel-times.txt).
# GPU_CHECK_BUDGET_S (default 450) bounds the whole check; GPU_CHECK_PYTORCH=0 skips step 4;
# GPU_CHECK_PROFILE (the benchmark's arguments) picks the step that step 5 profiles.
# VARIANT_BIN, a second build of the benchmark (`cargo xtask gpu-check --variant upstream`:
# against candle-core as released, without vendor/candle-core.patch; or `--variant PATCH`),
# runs beside the plain one on every throughput workload (taking turns at going first),
# labelled `variant`: a change and its baseline measured in the same run.
# usage: gpu-check.sh TESTS_BIN[.xz|.gz] BENCH_BIN[.xz|.gz] [OUT_DIR [TUNEFORGE_BIN[.xz|.gz] [VARIANT_BIN[.xz|.gz]]]]
set -u
tests=$1
bench=$2
out=${3:-.}
cli=${4:-}
variant=${5:-}
mkdir -p "$out"
# Compressed binaries (xz, or gzip) are unpacked beside themselves.
unpacked() {
  case $1 in
    *.gz) gunzip -kf "$1" && echo "${1%.gz}" ;;
    *.xz) { xz -dkf "$1" 2>/dev/null || python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$1"; } && echo "${1%.xz}" ;;
    *) echo "$1" ;;
  esac
}
tests=$(unpacked "$tests")
bench=$(unpacked "$bench")
[ -z "$cli" ] || cli=$(unpacked "$cli")
[ -z "$variant" ] || variant=$(unpacked "$variant")
chmod +x "$tests" "$bench" $cli $variant
# Absolute paths: a bare file name would be looked up on PATH.
tests=$(realpath "$tests") bench=$(realpath "$bench")
[ -z "$cli" ] || cli=$(realpath "$cli")
[ -z "$variant" ] || variant=$(realpath "$variant")

# The CUDA libraries the binaries load, from the system or from Python wheels (PyTorch's);
# never the toolkit's forward-compatibility driver or its link-time stubs.
missing=()
for lib in libcuda.so.1 libcublas.so.13 libcurand.so.10 libcudart.so.13 libnccl.so.2; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || missing+=(-o -name "$lib")
done
if [ ${#missing[@]} -gt 0 ]; then
  for dir in $(find /usr /opt /root \( -false "${missing[@]}" \) -not -path '*/compat/*' -not -path '*/stubs/*' -printf '%h\n' 2>/dev/null | sort -u); do
    LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
  done
fi
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
unresolved=$(ldd "$tests" "$bench" $cli $variant 2>/dev/null | grep "not found" | sort -u)
[ -z "$unresolved" ] || echo "libraries not found: $unresolved"

# The whole check keeps within a time budget (7.5 minutes: the issue asks for under 8, and the
# device's time is scarce): later steps are skipped when too little of it is left, the most
# important results coming first.
budget=${GPU_CHECK_BUDGET_S:-450}
left() { [ $((budget - SECONDS)) -ge "$1" ] || { echo "(skipped: $((budget - SECONDS)) s of the budget left)"; return 1; }; }
# A step's time limit: N seconds, or what is left of the budget when that is less.
cap() { local rest=$((budget - SECONDS)); echo $((rest < $1 ? rest : $1)); }

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Dense bf16 tensor-core peak of the H100/H200 SXM (TFLOP/s), the MFU denominator.
peak=${PEAK_TFLOPS:-989}

echo "== CUDA tests"
timeout "$(cap 200)" "$tests" --test-threads=1 2>&1 | tee "$out/cuda-tests.log"
tests_rc=${PIPESTATUS[0]}

if [ -n "$cli" ] && left 120; then
  echo "== tuneforge train end to end: CPU, --device cuda (f32, bf16, checkpointing), --gpus 1"
  work=$(mktemp -d)
  "$bench" --write-task "$work"
  (
    cd "$work" || exit 1
    one() { # NAME ARGS...: one run, its JSON summary in NAME.json
      local name=$1; shift
      timeout "$(cap 45)" "$cli" train --config exp.toml --json --quiet "$@" > "$name.json" 2> "$name.err"
      echo "$name: exit $? $(tail -c 300 "$name.err")"
    }
    one cpu --no-db --device cpu
    one cuda --no-db --device cuda
    one bf16 --no-db --device cuda --set train.precision=bf16
    one ckpt --no-db --device cuda --set train.gradient_checkpointing=true
    one gpus1 --db "$work/store.db" --gpus 1
    python3 - <<'PY'
import json, sqlite3, sys
def curve(name):
    try:
        run = json.load(open(f"{name}.json"))["run_id"]
        lines = [json.loads(l) for l in open(f"runs/{run}/metrics.jsonl")]
    except Exception as e:
        return None, f"no summary or metrics ({e})"
    return [l["loss"] for l in lines if l.get("kind") == "train"], run
curves = {n: curve(n) for n in ["cpu", "cuda", "bf16", "ckpt", "gpus1"]}
base = curves["cpu"][0]
failures = []
for name, (c, info) in curves.items():
    if c is None or base is None or len(c) != len(base):
        print(f"{name:6} {info}")
        failures.append(f"{name}: no curve as long as the CPU's")
        continue
    d, at = max((abs(a - b), i) for i, (a, b) in enumerate(zip(base, c)))
    print(f"{name:6} {len(c)} steps, loss {c[0]:.4f} -> {c[-1]:.4f}, largest difference from the CPU's curve "
          f"{d:.2e} (step {at + 1}: {base[at]:.4f} on the CPU)")
    # Within bf16 tolerance of the CPU's curve, as tests/cuda.rs asks of bf16 against f32.
    if d > 0.05 + 0.05 * abs(base[at]):
        failures.append(f"{name}: {d:.3g} from the CPU at step {at + 1}")
    if c[-1] > 0.5 * c[0]:
        failures.append(f"{name}: did not learn ({c[0]:.4f} -> {c[-1]:.4f})")
if curves["cuda"][0] and curves["gpus1"][0]:
    d = max(abs(a - b) for a, b in zip(curves["cuda"][0], curves["gpus1"][0]))
    print(f"--gpus 1 against --device cuda: largest loss difference {d:.2e}")
    if d > 1e-5:
        failures.append(f"--gpus 1 is {d:.3g} from --device cuda")
try:
    rows = sqlite3.connect("store.db").execute("select id, status from runs").fetchall()
    print(f"store of the --gpus 1 run: {rows}")
    if [status for _, status in rows] != ["succeeded"]:
        failures.append("the --gpus 1 run is not recorded as succeeded")
except Exception as e:
    print(f"store of the --gpus 1 run: {e}")
    failures.append(f"store: {e}")
for f in failures:
    print(f"FAILED: {f}")
sys.exit(1 if failures else 0)
PY
  ) 2>&1 | tee "$out/train-e2e.log"
  e2e_rc=${PIPESTATUS[0]}
fi

echo "== training throughput (each configuration in its own process)"
: > "$out/gpu-bench.jsonl"
one_bench() { # BINARY ARGS...
  local bin=$1; shift
  left 30 && timeout "$(cap 120)" "$bin" --device cuda --peak-tflops "$peak" "$@" 2>&1 | tee -a "$out/gpu-bench.jsonl"
}
# With a variant, the two builds take turns going first, so neither always runs on a GPU
# the other has just warmed.
turn=0
run() {
  if [ -z "$variant" ]; then
    one_bench "$bench" "$@"
  elif [ $((turn++ % 2)) = 0 ]; then
    one_bench "$bench" "$@"; one_bench "$variant" --label variant "$@"
  else
    one_bench "$variant" --label variant "$@"; one_bench "$bench" "$@"
  fi
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
if [ "${GPU_CHECK_PYTORCH:-1}" != 0 ] && [ -f "$ref" ] && left 120 && python3 -c "import torch, transformers, peft; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "== the same workloads in PyTorch"
  pyrun() { left 60 && timeout "$(cap 150)" python3 "$ref" "$@" 2>/dev/null | tee -a "$out/gpu-bench.jsonl"; }
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
    fw = r.get("framework", "tuneforge").split()[0][:10]
    print(f"{fw:10} {r['model']:9} {r['precision']:5} {str(r['checkpointing']):5} {r['batch']:>4}x{r['seq']:<4} "
          f"{r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} {r['tflops']:>8.1f} {100*r['mfu']:>5.1f}% {r['peak_memory_mib']:>9.0f}")
PY
fi
if command -v compute-sanitizer >/dev/null && left 150; then
  echo "== compute-sanitizer memcheck: tuneforge's kernels"
  timeout "$(cap 90)" compute-sanitizer --tool memcheck --error-exitcode 3 "$tests" --test-threads=1 \
    fused_ops_on_the_gpu encoder_logits decoder_logits 2>&1 | tail -15 | tee "$out/memcheck.log"
fi
if command -v ncu >/dev/null && command -v python3 >/dev/null && left 150; then
  profile=${GPU_CHECK_PROFILE:---model bert-base --precision bf16 --batch 32 --seq 512}
  echo "== GPU time by kernel: one step of $profile (Nsight Compute)"
  # shellcheck disable=SC2086
  timeout "$(cap 120)" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    "$bench" --device cuda $profile --steps 1 --warmup 0 \
    > "$out/ncu.csv" 2> "$out/ncu.err"
  python3 - "$out/ncu.csv" <<'PY' | tee "$out/kernel-times.txt"
import csv, collections, sys
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if not rows:
    sys.exit("ncu wrote no kernel rows (see ncu.err)")
head = rows[0]
name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
total, count = collections.Counter(), collections.Counter()
for r in rows[1:]:
    if r[unit] not in scale:
        sys.exit(f"ncu reported times in {r[unit]!r}, a unit this summary does not know")
    us = float(r[value].replace(",", "")) * scale[r[unit]]
    key = r[name].split("(")[0][:70]
    total[key] += us
    count[key] += 1
all_us = sum(total.values())
print(f"{len(rows) - 1} kernels, {all_us / 1e3:.1f} ms of GPU time (model set-up included)")
for key, us in total.most_common(25):
    print(f"{us / 1e3:9.2f} ms {100 * us / all_us:5.1f}% {count[key]:6d}x  {key}")
PY
fi

# Failing tests or a failed end-to-end check fail the whole check.
[ "$tests_rc" != 0 ] && exit "$tests_rc"
exit "${e2e_rc:-0}"
