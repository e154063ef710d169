#!/usr/bin/env bash
# The release pipeline at the real Gemma-2-2b shapes (random weights, bench/make_random_gemma.py):
# layers 0-3, one SAE per layer at the release's shape (width 32768, k 40, Matryoshka levels),
# batches of 4096 tokens, context 1024. Prints the machine, the command, the progress lines
# (tokens/s and the split of wall time between the model forward and the SAE steps).
# The tokenizer is the tiny test one (token ids < 384; the forward cost does not depend on ids).
#   bash bench/release_pipeline.sh [threads] [steps] [model dir]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
steps=${2:-4}
model=${3:-/tmp/gemma-2-2b-random}
work=${TMPDIR:-/tmp}/saecpp-release-bench
[[ -f $model/config.json ]] || .venv/bin/python bench/make_random_gemma.py --out "$model"
[[ -f $model/tokenizer.model ]] || cp tests/data/tiny_spm.model "$model/tokenizer.model"
rm -rf "$work" && mkdir -p "$work"
# A corpus of the tiny text, numbered lines, enough for the run and its held-out windows.
python3 bench/make_tiny_corpus.py 20000 "$work/corpus.jsonl"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads"
cmd=(build/release/sae --threads "$threads" release --model "$model" --dataset "$work/corpus.jsonl"
     --layers 0-3 --variants standard --tokens $((steps * 4096)) -o "$work/out"
     --prompts-per-forward 4 --n-batches-in-buffer 2 --heldout-tokens 1024 --ce-windows 0
     --log-every 1 --set training.checkpoint_every_steps=0)
echo "command: OMP_NUM_THREADS=$threads ${cmd[*]}"
OMP_NUM_THREADS=$threads /usr/bin/time -v "${cmd[@]}" 2>&1 |
  grep -E "^(release|memory|\[)|Maximum resident|Elapsed \(wall"
