#!/usr/bin/env bash
# Side by side in one run: sae.cpp encode/decode (bench_encode) and SAELens on the same CPU and
# thread count. Needs the release build and .venv (scripts/make_goldens.sh makes it).
#   bash bench/encode_vs_saelens.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
echo "== sae.cpp"
OMP_NUM_THREADS=$threads build/release/bench/bench_encode --threads "$threads"
echo "== SAELens (same machine)"
.venv/bin/python bench/saelens_encode.py --threads "$threads"
