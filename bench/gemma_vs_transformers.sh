#!/usr/bin/env bash
# Side by side in one run: the Gemma-2 forward of sae.cpp (f32, bf16-kept weights, and bf16
# weights with bf16 matmuls) and of transformers (f32 and bf16), on the same CPU and thread count, to layer 12 and to the logits, at the real
# Gemma-2-2b shapes with random weights (made once by bench/make_random_gemma.py, 5 GiB).
# Runs one process at a time so each peak-RSS figure is its own. Needs the release build and
# .venv (scripts/make_goldens.sh makes it).
#   bash bench/gemma_vs_transformers.sh [threads] [model dir]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
# What the sae CLI sets for itself at start (cli/main.cpp): huge pages for large buffers.
tunables=glibc.malloc.hugetlb=1
model=${2:-/tmp/gemma-2-2b-random}
shape=(--prompts 2 --seq 256)
.venv/bin/python bench/make_random_gemma.py --out "$model"
for last in 12 -1; do
  echo "== sae.cpp f32"
  OMP_NUM_THREADS=$threads GLIBC_TUNABLES=$tunables build/release/bench/bench_gemma --model "$model" --threads "$threads" --last-layer $last "${shape[@]}"
  echo "== sae.cpp bf16 weights"
  OMP_NUM_THREADS=$threads GLIBC_TUNABLES=$tunables build/release/bench/bench_gemma --model "$model" --threads "$threads" --last-layer $last --bf16 "${shape[@]}"
  echo "== sae.cpp bf16 weights, bf16 matmuls"
  OMP_NUM_THREADS=$threads GLIBC_TUNABLES=$tunables build/release/bench/bench_gemma --model "$model" --threads "$threads" --last-layer $last --bf16 --bf16-matmul "${shape[@]}"
  echo "== transformers (same machine)"
  .venv/bin/python bench/transformers_gemma.py --model "$model" --threads "$threads" --last-layer $last "${shape[@]}"
  echo "== transformers in bf16 (same machine)"
  .venv/bin/python bench/transformers_gemma.py --model "$model" --threads "$threads" --last-layer $last --bf16 "${shape[@]}"
done
