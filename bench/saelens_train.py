"""SAELens's MatryoshkaBatchTopKTrainingSAE training step at the same shape as bench_train:
training_forward_pass + backward + clip_grad_norm_ + Adam, as SAELens's trainer does each step.
    .venv/bin/python bench/saelens_train.py --threads 2
    python3 bench/saelens_train.py --device cuda [--autocast]      (on a GPU; bench/gpu_check.sh)
"""

import argparse
import time

import saelens_import  # noqa: F401  (SAELens's training SAEs without its top-level imports where needed)
import torch
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast, as SAELens's trainer with autocast=True")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    widths = [a.d_sae // 256, a.d_sae // 64, a.d_sae // 16, a.d_sae // 4, a.d_sae]
    # The release recipe: no decoder-norm rescaling, per-level AuxK, Adam betas (0, 0.999).
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=a.d_in, d_sae=a.d_sae, k=40, matryoshka_widths=widths,
        rescale_acts_by_decoder_norm=False, use_matryoshka_aux_loss=True, decoder_init_norm=0.1,
        device=a.device)
    sae = MatryoshkaBatchTopKTrainingSAE(cfg).to(a.device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.0, 0.999))
    x = torch.randn(a.batch, a.d_in, device=a.device)
    dead = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"SAELens {cfg.architecture()} step, torch {torch.__version__}, {a.device} ({name}), "
          f"{'bf16 autocast' if a.autocast else 'fp32'}, d_in {a.d_in}, d_sae {a.d_sae}, k 40, "
          f"widths {widths}, batch {a.batch}")

    def step() -> None:
        with torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.autocast):
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3 if a.device != "cpu" else 1):  # warm-up
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if a.device != "cpu" else ""
    label = "SAELens step" + (" (bf16 autocast)" if a.autocast else "")
    print(f"{label:28s} {dt * 1e3:10.2f} ms/step   ({a.batch / dt:.0f} tokens/s{mem})")


if __name__ == "__main__":
    main()
