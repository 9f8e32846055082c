#!/usr/bin/env bash
# Link-time stubs of the CUDA libraries, for building `--features cuda` on a machine without
# the driver or the toolkit's libraries (the GPU machine that runs the binaries has the real
# ones). candle makes cudarc link libcuda, libcublas(Lt), libcurand, libnvrtc and, with
# `nccl`, libnccl; each stub defines every function cudarc declares, under the real soname.
# usage: bench/cuda-stubs.sh OUT_DIR      then put OUT_DIR in $CUDA_ROOT/lib/stubs
set -euo pipefail
out=${1:?usage: cuda-stubs.sh OUT_DIR}
mkdir -p "$out"
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)/src
for spec in driver:cuda:libcuda.so.1 nvrtc:nvrtc:libnvrtc.so.13 curand:curand:libcurand.so.10 \
            cublas:cublas:libcublas.so.13 cublaslt:cublasLt:libcublasLt.so.13 nccl:nccl:libnccl.so.2; do
  IFS=: read -r dir lib soname <<<"$spec"
  grep -h -A1 'extern "C" {' "$src/$dir"/sys/*.rs | grep -oE '^\s+(pub )?fn [A-Za-z0-9_]+' \
    | awk '{print $NF}' | sort -u | sed 's/.*/void &(void){}/' > "$out/$lib.c"
  cc -shared -fPIC -Wl,-soname,"$soname" -o "$out/lib$lib.so" "$out/$lib.c"
  rm "$out/$lib.c"
done
echo "stubs in $out"
