#!/usr/bin/env bash
# Side by side in one run: the sae.cpp training step (bench_train) and SAELens's
# MatryoshkaBatchTopKTrainingSAE step, same CPU, same thread count, same shape; each in fp32
# and with the encoder GEMM in bf16 (sae.cpp's training.precision = bf16, SAELens's autocast).
#   bash bench/train_vs_saelens.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
# What the sae CLI sets for itself at start (cli/main.cpp): huge pages for large buffers.
tunables=glibc.malloc.hugetlb=1
echo "== sae.cpp"
OMP_NUM_THREADS=$threads GLIBC_TUNABLES=$tunables build/release/bench/bench_train --threads "$threads"
echo "== sae.cpp, 2048 dead latents (AuxK active)"
OMP_NUM_THREADS=$threads GLIBC_TUNABLES=$tunables build/release/bench/bench_train --threads "$threads" --dead 2048 --steps 2
echo "== sae.cpp, encoder GEMM in bf16 (training.precision = bf16)"
OMP_NUM_THREADS=$threads GLIBC_TUNABLES=$tunables build/release/bench/bench_train --threads "$threads" --precision bf16
echo "== SAELens (same machine)"
.venv/bin/python bench/saelens_train.py --threads "$threads"
echo "== SAELens with bf16 autocast (same machine)"
.venv/bin/python bench/saelens_train.py --threads "$threads" --autocast
