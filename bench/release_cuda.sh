#!/usr/bin/env bash
# `sae release --device cuda` throughput at the real shapes (issue 11, item 6), for the device
# check: a Gemma-2-2b-shaped checkpoint with random bf16 weights (bench/make_random_gemma.py),
# the forward in bf16, SAEs at the release's shape (width 32768, k 40, Matryoshka levels,
# batch 4096, context 1024) with the encoder GEMM in bf16, for 2, 10 and 50 SAEs (1, 5 and 25
# layers x the two variants), and 10 SAEs again with --no-overlap (the forwards between the SAE
# steps instead of beside them: what the overlap gains). Each run is stopped (SIGKILL) once it has logged `steps` steps:
# the benchmark writes no SAE, checkpoint or evaluation (50 SAEs' checkpoints would not fit the
# disk). Prints each run's plan, tokens/s and split, the measured GPU memory, and the projected
# wall time of the seed's release (750M tokens, 25 layers x 2 variants) from the 50-SAE rate.
# The last run is the 50 SAEs again with the forward's new kernels (SAECPP_FORWARD_KERNELS=new:
# the one-pass attention and the fused norms, not yet the default; docs/gpu.md).
# Every run evaluates its SAEs every 20 steps (the preset: 1000) and the 2-SAE run checkpoints
# at step 20 (the release: every 30 minutes), so that the projection counts what the seed's
# release pays besides its steps: 183 evaluation rounds of 50 SAEs and a checkpoint of all 50
# every 30 minutes, each from its measured time here.
# RELEASE_CUDA_RUNS picks runs: LAYERS[:EXTRA_ARG][@KERNELS].
#   bash bench/release_cuda.sh SAE_BINARY [steps] [model dir]
set -uo pipefail
cd "$(dirname "$0")/.."
sae=${1:?usage: bash bench/release_cuda.sh SAE_BINARY [steps] [model dir]}
steps=${2:-40}
model=${3:-/tmp/gemma-2-2b-random}
work=${TMPDIR:-/tmp}/saecpp-release-cuda
[[ -f $model/config.json ]] || python3 bench/make_random_gemma.py --out "$model" --device cuda
[[ -f $model/tokenizer.model ]] || cp tests/data/tiny_spm.model "$model/tokenizer.model"
mkdir -p "$work"
# Numbered lines of the tiny text: enough tokens for the buffer and `steps` batches.
python3 bench/make_tiny_corpus.py 150000 "$work/corpus.jsonl"
echo "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
declare -A rate line
ckpt=""
for run in ${RELEASE_CUDA_RUNS:-12 8-12 8-12:--no-overlap 0-24 0-24@new}; do
  kernels=baseline
  [[ $run == *@* ]] && kernels=${run#*@}
  spec=${run%@*}
  layers=${spec%%:*}
  extra=()
  [[ $spec == *:* ]] && extra=("${spec#*:}")
  out=$work/out && rm -rf "$out"
  log=$work/release_${run//[:@]/}.log
  cmd=("$sae" release --device cuda --model "$model" --dataset "$work/corpus.jsonl"
       --layers "$layers" "${extra[@]}" --tokens 750M -o "$out" --context-size 1024 --prompts-per-forward 8
       --n-batches-in-buffer 4 --heldout-tokens 1024 --ce-windows 0 --log-every 10
       --set training.precision=bf16 --set training.eval_every_steps=20
       --ignore-disk-plan)  # killed after `steps` steps: no final write (50 SAEs: 86 GiB)
  if [[ $layers == 12 ]]; then  # one checkpoint of 2 SAEs: the disk's speed for the projection
    cmd+=(--checkpoint-minutes 0 --set training.checkpoint_every_steps=20)
  else
    cmd+=(--checkpoint-minutes 0 --set training.checkpoint_every_steps=0)
  fi
  echo "command: SAECPP_FORWARD_KERNELS=$kernels ${cmd[*]}"
  SAECPP_FORWARD_KERNELS=$kernels "${cmd[@]}" >"$log" 2>&1 &
  pid=$!
  t0=$(date +%s)
  while kill -0 "$pid" 2>/dev/null; do
    # (the 2-SAE run also until its checkpoint, written beside the steps, is complete)
    grep -q "step $steps/" "$log" &&
      { [[ $layers != 12 ]] || grep -q "^release: checkpoint at step" "$log"; } && break
    (($(date +%s) - t0 > 400)) && { echo "timed out"; break; }
    sleep 1
  done
  nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/GPU memory used at the end: /'
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  grep -E "^(GPU|gemma2: forward kernels|release: [0-9]+ SAEs|release: step|release: checkpoint|sae: error|error)" "$log" | sed -n '1,5p;$p'
  last=$(grep -E "^release: step" "$log" | tail -1)
  rate[$run]=$(sed -E 's/.* ([0-9]+) tok\/s.*/\1/' <<<"$last")
  line[$run]=$last
  [[ $layers == 12 ]] && ckpt=$(grep -E "^release: checkpoint at step" "$log" | tail -1)
  echo
done
r50=${rate[0-24]:-0}
r50new=${rate[0-24@new]:-0}
echo "tokens/s: 2 SAEs ${rate[12]:-?}, 10 SAEs ${rate[8-12]:-?} (${rate[8-12:--no-overlap]:-?} without the overlap), 50 SAEs $r50 (${rate[0-24@new]:-?} with the new forward kernels)"
for run in 0-24 0-24@new; do
  [[ -n ${line[$run]:-} ]] || continue
  LINE=${line[$run]} CKPT=$ckpt EVAL_EVERY=20 python3 - "$run" <<'PY'
import os, re, sys
line, ckpt = os.environ["LINE"], os.environ["CKPT"]
step = int(re.search(r"step (\d+)/", line).group(1))
tok = float(re.search(r"tok (\d+)", line).group(1))
rate = float(re.search(r"(\d+) tok/s", line).group(1))
share = lambda what: float(re.search(what + r" (\d+)%", line).group(1)) / 100
elapsed = tok / rate
evals = share("evaluation")
steps_rate = tok / (elapsed * (1 - evals - share("checkpoints")))  # forward and SAE steps only
eval_round = evals * elapsed / (step // int(os.environ["EVAL_EVERY"]))
steps_total = 750e6 / 4096
a = 750e6 / steps_rate + steps_total / 1000 * eval_round  # the preset evaluates every 1000 steps
# One process writes its checkpoints beside the steps ("written in W s beside the steps (steps
# paused P s"): the steps pay P, taking the states; the disk must write 50 SAEs within the 30
# minutes. Several ranks (or an older build) write them between the steps: the steps pay W.
m = re.search(r"checkpoint at step \d+: (?:(\d+) SAEs?, )?([0-9.]+) (GiB|MiB) (?:written )?in "
              r"([0-9.]+) s(?: beside the steps \(steps paused ([0-9.]+) s)?", ckpt)
ckpt_round = 0.0
if m:  # the 2-SAE run's checkpoint, scaled to 50 SAEs; one every 30 minutes
  n = int(m.group(1) or 2)
  gib = float(m.group(2)) / (1024 if m.group(3) == "MiB" else 1)
  write = 50 / n * float(m.group(4))
  ckpt_round = 50 / n * float(m.group(5)) if m.group(5) else write
  print(f"checkpoint: {n} SAEs, {gib:.2f} GiB written in {m.group(4)} s; 50 SAEs: {write:.0f} s "
        f"of writing ({'beside the steps, which pause ' + format(ckpt_round, '.0f') + ' s' if m.group(4) else 'the steps waiting'})"
        f"{'' if write < 1800 else ': LONGER than the 30 minutes between checkpoints'}")
total = a / (1 - ckpt_round / 1800)
print(f"projected seed release ({sys.argv[1]}: 750M tokens, 50 SAEs in one run): {total / 3600:.1f} h "
      f"= steps {750e6 / steps_rate / 3600:.1f} h at {steps_rate:.0f} tokens/s + evaluation "
      f"{steps_total / 1000 * eval_round / 3600:.2f} h ({eval_round:.1f} s per round of 50 SAEs, "
      f"every 1000 steps) + checkpoints {(total - a) / 3600:.2f} h (every 30 minutes) "
      f"(target: 12 h, 17 400 tokens/s)")
PY
done
echo "(these steps have no dead latents, fresh SAEs: with 4096 dead latents per SAE, AuxK's, an"
echo " H200's bf16 step took 5.38 ms instead of 3.91 ms; bench_train_cuda --dead, docs/benchmarks.md)"
