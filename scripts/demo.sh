#!/usr/bin/env bash
# The main job on its built-in default: sets up, builds, then trains plain BatchTopK,
# Matryoshka and Matryoshka-snap SAEs on the built-in synthetic hierarchy (about 2.5 minutes on
# 2 cores), prints the comparison table, and shows the saved SAELens-format SAE being loaded
# and evaluated. Outputs: out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
sae=build/release/sae
set -x
$sae demo -o out/demo "$@"
$sae info out/demo/matryoshka-snap/sae
$sae eval out/demo/matryoshka-snap/sae out/demo/heldout.npy
