#!/usr/bin/env bash
# The main job on its built-in default: builds sae.cpp, then loads an SAE that SAELens saved
# (tests/goldens/topk, made by scripts/make_goldens.py), describes it, encodes activations to
# sparse codes and evaluates it. Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
sae=build/release/sae
mkdir -p out/demo
set -x
$sae info tests/goldens/topk/sae
$sae encode tests/goldens/topk/sae tests/goldens/topk/x.npy -o out/demo/codes.safetensors
$sae eval tests/goldens/topk/sae tests/goldens/topk/x.npy
$sae convert tests/goldens/topk/sae -o out/demo/topk_bf16 --dtype bf16
$sae eval out/demo/topk_bf16 tests/goldens/topk/x.npy --json
