"""transformers' Gemma2 forward on the GPU at bench_gemma_cuda's shape: google/gemma-2-2b's
config, random weights in bf16 (initialised on the device: no checkpoint), the decoder truncated
after the last layer asked for (as SAE tooling stops early), the attention implementation that
transformers picks for Gemma-2 on this install.
    python3 bench/transformers_gemma_cuda.py [--prompts 4] [--seq 1024] [--last-layers 12,24]
"""

import argparse
import time

import torch
import transformers
from transformers import Gemma2Config, Gemma2Model

from make_random_gemma import GEMMA_2_2B  # google/gemma-2-2b config.json (bench/)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--last-layers", default="12,24")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    last_layers = [int(x) for x in a.last_layers.split(",")]
    torch.manual_seed(0)
    cfg = Gemma2Config(**GEMMA_2_2B)
    cfg.num_hidden_layers = max(last_layers) + 1
    with torch.device("cuda"):
        model = Gemma2Model(cfg).to(torch.bfloat16).eval()
    all_layers = model.layers
    ids = torch.randint(3, cfg.vocab_size, (a.prompts, a.seq), device="cuda")
    ids[:, 0] = 2
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}, bf16, attention: {model.config._attn_implementation}")
    for last in last_layers:
        model.layers = all_layers[: last + 1]
        with torch.inference_mode():
            model(ids, use_cache=False)  # warm-up
            torch.cuda.synchronize()
            best = 1e30
            for _ in range(a.reps):
                t0 = time.perf_counter()
                model(ids, use_cache=False)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
        tokens = a.prompts * a.seq
        print(f"transformers bf16 forward to layer {last}: {a.prompts} x {a.seq} tokens in "
              f"{best * 1e3:.1f} ms = {tokens / best:.0f} tokens/s (best of {a.reps}); "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
