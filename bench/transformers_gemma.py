"""transformers' Gemma2ForCausalLM forward on CPU at the shape bench_gemma uses: to a layer
(the decoder truncated after it, as SAE tooling stops early) or to the logits.
    .venv/bin/python bench/transformers_gemma.py --model DIR --last-layer 12 --threads 2 [--bf16]
"""

import argparse
import resource
import time

import torch
import transformers
from transformers import Gemma2ForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--last-layer", type=int, default=-1, help="-1: all layers and the logits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="load and run in bfloat16")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    # eager attention: the implementation that applies Gemma-2's attention soft-cap.
    model = Gemma2ForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if a.bf16 else torch.float32,
                                              attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0
    n_layers = model.config.num_hidden_layers
    to_end = a.last_layer < 0 or a.last_layer == n_layers - 1
    if not to_end:
        model.model.layers = model.model.layers[: a.last_layer + 1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (a.prompts, a.seq), generator=g)
    ids[:, 0] = 2  # BOS

    def run(x: torch.Tensor) -> None:
        with torch.inference_mode():
            if to_end:
                model(x, use_cache=False)
            else:
                model.model(x, use_cache=False)

    run(ids[:, :16])  # warm-up
    t0 = time.perf_counter()
    run(ids)
    s = time.perf_counter() - t0
    tokens = a.prompts * a.seq
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    what = "logits" if to_end else f"layer {a.last_layer}"
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'bf16' if a.bf16 else 'f32'}, eager attention")
    print(f"forward to {what}: {a.prompts} x {a.seq} tokens in {s:.2f} s = {tokens / s:.1f} tokens/s; "
          f"load {load_s:.1f} s; peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
