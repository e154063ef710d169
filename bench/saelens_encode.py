"""SAELens's JumpReLU SAE encode/decode at the same shape as bench_encode, same CPU and threads.
    .venv/bin/python bench/saelens_encode.py --threads 2
"""

import argparse
import time

import torch
from sae_lens import SAE, JumpReLUSAEConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sae = SAE.from_dict(JumpReLUSAEConfig(d_in=a.d_in, d_sae=a.d_sae).to_dict())
    with torch.no_grad():
        sae.W_enc.normal_().div_(a.d_in**0.5)
        sae.W_dec.normal_().div_(a.d_in**0.5)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(3.03)
    x = torch.randn(a.batch, a.d_in)
    print(f"SAELens JumpReLU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        acts = sae.encode(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.iters):
            acts = sae.encode(x)
        enc = (time.perf_counter() - t0) / a.iters
        t0 = time.perf_counter()
        for _ in range(a.iters):
            out = sae.decode(acts)
        dec = (time.perf_counter() - t0) / a.iters
    l0 = (acts != 0).sum(-1).float().mean().item()
    print(f"{'SAELens encode':34s} {enc * 1e3:12.1f} {a.batch / enc:12.0f}   (L0 {l0:.1f})")
    print(f"{'SAELens decode (dense acts)':34s} {dec * 1e3:12.1f} {a.batch / dec:12.0f}")
    del out


if __name__ == "__main__":
    main()
