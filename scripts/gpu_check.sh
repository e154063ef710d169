#!/usr/bin/env bash
# The GPU device check, in two halves (docs/gpu.md):
#   bash scripts/gpu_check.sh build   here, on the CPU machine: builds sae, test_cuda and
#       bench_train_cuda for sm_90 with the portable host build (x86-64-v3, not native) into
#       build/gpu and bundles them with the shared libraries the GPU machine lacks (OpenBLAS,
#       sentencepiece, SLEEF, ...) and the sae-lens wheel into .gpu/bundle.tar.xz (git-ignored,
#       carried; `run` unpacks it). Uncompressed the bundle is about 64 MB, and what travels to
#       the device (tracked files + carried paths) may not pass 64 MiB: the build checks it.
#   bash scripts/gpu_check.sh run     there, in the repo root: the CUDA tests (SAE and Gemma-2),
#       the Gemma-2 forward against transformers (speed; and numerics: resid_post at the real
#       shape against transformers fp32, bench/gemma_vs_transformers_numerics.py), the
#       training-step benchmark in fp32/tf32/bf16
#       (and with dead latents), SAELens's step on the same GPU, and 2000 steps of the
#       hierarchy job on the GPU against the CPU, then `sae release --device cuda` at the real
#       shapes with 2, 10 and 50 SAEs (bench/release_cuda.sh; GPU_CHECK_RELEASE=0 skips it).
#       Logs and results.md go to $OUT (or out/gpu_check). GPU_CHECK_PARTS picks sections
#       (default all: tests,gemma,numerics,train,encode,saelens,hierarchy,upkeep,release), e.g.
#       GPU_CHECK_PARTS=tests,release to fit what is owed into one call. GPU_CHECK_PROFILE=1 adds
#       ncu per-kernel tables (the training step; the forward per layer, baseline and new kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}

if [[ $mode == build ]]; then
  # No Hub client, no MPI and no oneDNN: the device machine has no network and one GPU, and
  # their libraries (libcurl, OpenSSL, Open MPI; oneDNN alone is 40 MB) would push the bundle
  # past carry's 64 MiB (without oneDNN the CPU's bf16 matmuls take the sgemm fallback).
  # The default host flags are portable (x86-64-v3 + AVX-512 kernels picked at run time).
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DSAECPP_CUDA=ON -DSAECPP_HUB=OFF -DSAECPP_MPI=OFF -DSAECPP_DNNL=OFF
  cmake --build build/gpu -j "$(nproc)" --target sae test_cuda test_cuda_gemma2 bench_train_cuda \
    bench_encode_cuda bench_gemma_cuda bench_upkeep
  stage=build/gpu/bundle
  rm -rf "$stage" .gpu && mkdir -p "$stage/bin" "$stage/lib" "$stage/whl" .gpu
  for b in build/gpu/sae build/gpu/tests/test_cuda build/gpu/tests/test_cuda_gemma2 \
    build/gpu/bench/bench_train_cuda build/gpu/bench/bench_encode_cuda \
    build/gpu/bench/bench_gemma_cuda build/gpu/bench/bench_upkeep; do
    cp "$b" "$stage/bin/" && strip "$stage/bin/$(basename "$b")"
  done
  # Every shared library outside glibc and the CUDA toolkit (the GPU machine has those).
  ldd "$stage"/bin/* | awk '/=> \//{print $3}' | sort -u |
    grep -vE '/(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so|libcu(blas|blasLt|dart)\.so' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$stage/whl" "sae-lens==6.54.12"
  # xz: the bundle shrinks about 7x (OpenBLAS alone is 37 MB); `run` unpacks it with tar -J or
  # Python's tarfile.
  tar -C "$stage" -cf - bin lib whl | xz -9 -T0 >.gpu/bundle.tar.xz
  tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
  bundle=$(stat -c %s .gpu/bundle.tar.xz)
  echo "bundle: $(du -sh "$stage" | cut -f1) unpacked, $((bundle / 1048576)) MiB in .gpu/bundle.tar.xz;" \
    "with the tracked files $(((tracked + bundle) / 1048576)) MiB travel (limit 64)"
  if ((tracked + bundle > 64 * 1048576)); then
    echo "gpu_check: tracked files + .gpu pass the device's 64 MiB; bundle less" >&2
    exit 1
  fi
  exit 0
fi

if [[ $mode != run ]]; then
  echo "usage: bash scripts/gpu_check.sh build|run" >&2
  exit 2
fi

out=${OUT:-out/gpu_check}
mkdir -p "$out"
if [[ ! -x .gpu/bin/sae ]]; then  # the carried bundle, unpacked once per machine
  [[ -f .gpu/bundle.tar.xz ]] || { echo "gpu_check: no .gpu/bundle.tar.xz (run 'build' here and carry .gpu)" >&2; exit 2; }
  tar -C .gpu -xJf .gpu/bundle.tar.xz 2>/dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/bundle.tar.xz .gpu
fi
# Our libraries for our binaries only (Python's torch keeps its own libgomp and libstdc++).
cuda_lib=$(dirname "$(find /usr/local/cuda/lib64 /usr/local/cuda*/targets /usr/lib /opt -name 'libcublasLt.so.13' 2>/dev/null | head -1)" 2>/dev/null || true)
lib_path=$PWD/.gpu/lib:${cuda_lib:-/usr/local/cuda/lib64}:${LD_LIBRARY_PATH:-}
echo "libraries: $lib_path"
for b in sae test_cuda test_cuda_gemma2 bench_train_cuda bench_encode_cuda bench_gemma_cuda \
  bench_upkeep; do
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$lib_path" "$PWD/.gpu/bin/$b" >"/tmp/$b"
  chmod +x "/tmp/$b"
done
bin=/tmp
results=$out/results.md
parts=,${GPU_CHECK_PARTS:-tests,gemma,numerics,train,encode,saelens,hierarchy,upkeep,release},
want() { [[ $parts == *,$1,* ]]; }
{
  echo "# sae.cpp GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  echo
} >"$results"

# Each part's seconds in results.md: what the next device check can fit in one call's 600 s.
part_t0=$SECONDS
took() {
  ((SECONDS - part_t0 > 0)) && echo "($1: $((SECONDS - part_t0)) s)" | tee -a "$results"
  part_t0=$SECONDS
}

# After a failed test binary: its first failed test (or, after a crash, the last one started)
# again with CUDA_LAUNCH_BLOCKING=1, so that an asynchronous device fault is reported by the
# launch that caused it (SAE_CUDA_LAUNCHED names the file and line) rather than by a later
# call; compute-sanitizer does not run on the device machine. Appended to the test's log and
# to results.md (files back from $OUT are limited to 8). localize LOG COMMAND...
localize() {
  local log=$1 t
  shift
  t=$(grep -m1 -E '^\[  FAILED  \] [^ ]+ \(' "$log" | awk '{print $4}')
  [[ -z $t ]] && t=$(grep -E '^\[ RUN      \] ' "$log" | tail -1 | awk '{print $4}')
  [[ -z $t ]] && return
  echo "again with CUDA_LAUNCH_BLOCKING=1: $t" | tee -a "$results"
  CUDA_LAUNCH_BLOCKING=1 timeout 120 "$@" --gtest_filter="$t" 2>&1 | tee -a "$log" |
    grep -E "Failure|rror|FAILED|CUDA|Expected|Which is|actual" | head -20 | tee -a "$results"
}

set +e
if want tests; then
echo "== CUDA tests"
SAECPP_CLI=$bin/sae timeout 180 "$bin/test_cuda" 2>&1 | tee "$out/test_cuda.log" | grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|error" | head -40
tests_rc=${PIPESTATUS[0]}
echo "CUDA tests: exit $tests_rc ($(grep -cE '^\[       OK \]' "$out/test_cuda.log") passed)" | tee -a "$results"
((tests_rc != 0)) && localize "$out/test_cuda.log" env SAECPP_CLI="$bin/sae" "$bin/test_cuda"
# The kernels and the forward, then the release, in separate processes: a device fault in a
# kernel not run before (a sticky CUDA error) must not fail the release's tests with it.
for part in kernels:'CudaKernels.*:CudaGemma2.*' release:'CudaRelease.*'; do
  SAECPP_TEST_DIR=$PWD/tests SAECPP_CLI=$bin/sae timeout 240 "$bin/test_cuda_gemma2" \
    --gtest_filter="${part#*:}" 2>&1 | tee "$out/test_cuda_gemma2_${part%%:*}.log" |
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|error" | head -40
  gemma_rc=${PIPESTATUS[0]}
  echo "CUDA Gemma-2 tests (${part#*:}): exit $gemma_rc ($(grep -cE '^\[       OK \]' "$out/test_cuda_gemma2_${part%%:*}.log") passed)" | tee -a "$results"
  ((gemma_rc != 0)) && localize "$out/test_cuda_gemma2_${part%%:*}.log" env \
    SAECPP_TEST_DIR="$PWD/tests" SAECPP_CLI="$bin/sae" "$bin/test_cuda_gemma2"
done
fi
took "tests"

if want gemma; then
echo "== Gemma-2 forward: sae.cpp and transformers on this GPU"
{
  echo '```'
  # The kernels not yet run on a GPU in a process of their own: a fault there must not take the
  # baseline's figures with it.
  timeout 100 "$bin/bench_gemma_cuda" --prompts 4 --seq 1024 --last-layers 12,24 --kernels baseline
  timeout 150 "$bin/bench_gemma_cuda" --prompts 4 --seq 1024 --last-layers 12,24 \
    --kernels one-pass,fused,new
  timeout 150 python3 bench/transformers_gemma_cuda.py --prompts 4 --seq 1024 --last-layers 12,24
  echo '```'
} 2>&1 | tee "$out/bench_gemma.log" | tee -a "$results"
fi
took "gemma"

if want numerics; then
echo "== Gemma-2 against transformers in numbers, at the real shape (random weights)"
{
  echo '```'
  timeout 300 python3 bench/gemma_vs_transformers_numerics.py "$bin/sae" --device cuda
  echo '```'
} 2>&1 | tee "$out/numerics.log" | tee -a "$results"
fi
took "numerics"

if want train; then
echo "== training step benchmark"
{
  echo '```'
  timeout 120 "$bin/bench_train_cuda" --steps 20
  echo
  timeout 60 "$bin/bench_train_cuda" --steps 10 --dead 4096 --precision bf16,fp32
  echo '```'
} 2>&1 | tee "$out/bench_train_cuda.log" | tee -a "$results"
fi
took "train"

# Per-kernel GPU time from an ncu CSV: ncu_table CSV DIVISOR TITLE (each kernel's total / DIVISOR).
ncu_table() {
  python3 - "$1" "$2" "$3" <<'PY'
import csv, collections, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; name_i = head.index("Kernel Name"); val_i = head.index("Metric Value")
unit_i = head.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    v = float(r[val_i].replace(",", "")); u = r[unit_i]
    v = v / 1e3 if u in ("nsecond", "ns") else v if u in ("usecond", "us") else v * 1e3
    k = r[name_i].split("(")[0].split("<")[0][:60]; tot[k] += v; cnt[k] += 1
div = int(sys.argv[2])
print(f"```\n{sys.argv[3]}")
for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
    print(f"{v / div:10.1f}  x{cnt[k] // div:<3d} {k}")
print("```")
PY
}
[[ ${GPU_CHECK_PROFILE:-0} == 1 ]] &&
  ncu_bin=$(command -v ncu || find /opt /usr/local -name ncu -type f 2>/dev/null | head -1)

if [[ ${GPU_CHECK_PROFILE:-0} == 1 ]] && want train; then
  echo "== per-kernel GPU time (ncu, bf16 step)"
  timeout 240 "$ncu_bin" --clock-control none --metrics gpu__time_duration.sum --csv \
    "$bin/bench_train_cuda" --steps 2 --precision bf16 >"$out/ncu.csv" 2>"$out/ncu.err"
  # 5 steps: 3 warm-up + 2 timed
  ncu_table "$out/ncu.csv" 5 "per-kernel GPU time per step (us), bf16, ncu gpu__time_duration (5 steps averaged)" | tee -a "$results"
fi
took "profile train"
if [[ ${GPU_CHECK_PROFILE:-0} == 1 ]] && want gemma; then
  echo "== per-kernel GPU time (ncu, Gemma-2 forward, 4 x 1024 tokens, layers 0-1)"
  for kernels in baseline new; do
    timeout 240 "$ncu_bin" --clock-control none --metrics gpu__time_duration.sum --csv \
      "$bin/bench_gemma_cuda" --prompts 4 --seq 1024 --last-layers 1 --reps 1 \
      --attention-alone 0 --kernels "$kernels" >"$out/ncu_gemma_$kernels.csv" 2>"$out/ncu_gemma_$kernels.err"
    # 2 forwards (warm-up + 1 timed) x 2 layers; embed and the final norm are not per layer
    ncu_table "$out/ncu_gemma_$kernels.csv" 4 "per-kernel GPU time per layer (us), bf16, $kernels kernels, ncu gpu__time_duration" | tee -a "$results"
  done
fi
took "profile gemma"

if want encode; then
echo "== encode benchmark"
{
  echo '```'
  timeout 120 "$bin/bench_encode_cuda"
  echo '```'
} 2>&1 | tee "$out/bench_encode_cuda.log" | tee -a "$results"
fi
took "encode"

if want saelens; then
echo "== SAELens on the same GPU"
site=/tmp/saelens_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/whl/*.whl
{
  echo '```'
  PYTHONPATH=$site timeout 120 python3 bench/saelens_train.py --device cuda --steps 10
  PYTHONPATH=$site timeout 120 python3 bench/saelens_train.py --device cuda --steps 10 --autocast
  echo '```'
} 2>&1 | tee "$out/saelens.log" | tee -a "$results"
fi
took "saelens"

if want hierarchy; then
echo "== 2000 hierarchy steps: GPU against CPU"
for dev in cpu cuda; do
  rm -rf "/tmp/hier_$dev"
  timeout 200 "$bin/sae" train --preset hierarchy-snap --device "$dev" \
    --set training.total_tokens=2048000 --set training.log_every_steps=500 \
    -o "/tmp/hier_$dev" >"$out/hierarchy_$dev.log" 2>&1
  echo "hierarchy-snap 2000 steps on $dev: exit $? $(python3 -c "import json;e=json.load(open('/tmp/hier_$dev/eval.json'));print('EV %.4f L0 %.2f' % (e['explained_variance'], e['l0']))" 2>&1)" | tee -a "$results"
  tail -3 "$out/hierarchy_$dev.log"
done
fi
took "hierarchy"
if want upkeep; then
echo "== what a release pays per SAE besides its steps: evaluation, batch variance, checkpoint"
{
  echo '```'
  timeout 120 "$bin/bench_upkeep" --dir /tmp
  echo '```'
} 2>&1 | tee "$out/bench_upkeep.log" | tee -a "$results"
fi
took "upkeep"
if want release && [[ ${GPU_CHECK_RELEASE:-1} == 1 ]]; then
  echo "== sae release --device cuda at the real shapes: 2, 10 and 50 SAEs (bench/release_cuda.sh)"
  {
    echo '```'
    timeout 560 bash bench/release_cuda.sh "$bin/sae" 40
    echo '```'
  } 2>&1 | tee "$out/release_cuda.log" | tee -a "$results"
fi
took "release"
set -e
echo
cat "$results"
