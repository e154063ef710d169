#!/usr/bin/env bash
# `sae dashboard` for all 32768 latents of a release-shaped SAE at layer 12 of a Gemma-2-2b-shaped
# random checkpoint, on the CPU (or, with `--device cuda [--precision fp32]` after the first two
# arguments, the GPU); prints where the time went (dashboard.json) and the share spent outside
# the model forward and the SAE encode. Needs the release build and .venv.
#   bash bench/dashboard_real_shape.sh [tokens] [model dir] [more sae dashboard options]
set -euo pipefail
cd "$(dirname "$0")/.."
tokens=${1:-4096}
model=${2:-/tmp/gemma-2-2b-random}
extra=("${@:3}")
inputs=/tmp/saecpp-dash-inputs
out=/tmp/saecpp-dash-bench
.venv/bin/python bench/make_random_gemma.py --out "$model"
[[ -d $inputs/sae ]] || .venv/bin/python bench/make_dashboard_inputs.py --model "$model" --out "$inputs"
rm -rf "$out" "$out.partial"
echo "command: bash bench/dashboard_real_shape.sh $tokens $model ${extra[*]}"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"
echo "cpu flags: $(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512bw|avx512vl|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
build/release/sae dashboard "$inputs/sae" --model "$model" --dataset "$inputs/tokens.npy" \
  --training-split --holdout-every 0 --tokens "$tokens" --context-size 128 -o "$out" "${extra[@]}"
.venv/bin/python - "$out/dashboard.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
t, m, e, s, w = d["seconds"], d["model_seconds"], d["encode_seconds"], d["statistics_seconds"], d["write_seconds"]
n = d["meta"]["tokens"]
print(f"tokens {n}, {n / t:.1f} tokens/s overall; model {m:.1f} s, encode {e:.1f} s, statistics {s:.1f} s, "
      f"pages {w:.1f} s, other {t - m - e - s - w:.1f} s, total {t:.1f} s")
print(f"outside the model forward and the SAE encode: {100 * (t - m - e) / t:.1f}% of this run")
per_tok = (m + e) / n
print(f"per token: forward+encode {1e3 * per_tok:.2f} ms, statistics {1e3 * s / n:.3f} ms "
      f"({100 * s / (m + e + s):.2f}%); fixed per SAE {t - m - e - s:.0f} s, "
      f"<= 10% of a run from {(t - m - e - s) / (0.1 / 0.9 * per_tok - s / n):.0f} tokens on")
PY
du -sh "$out" "$out/data"
