"""SAELens's MatryoshkaBatchTopKTrainingSAE training step at the same shape as bench_train:
training_forward_pass + backward + clip_grad_norm_ + Adam, as SAELens's trainer does each step.
    .venv/bin/python bench/saelens_train.py --threads 2
"""

import argparse
import time

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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    widths = [a.d_sae // 256, a.d_sae // 64, a.d_sae // 16, a.d_sae // 4, a.d_sae]
    # The release recipe: no decoder-norm rescaling, per-level AuxK, Adam betas (0, 0.999).
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=a.d_in, d_sae=a.d_sae, k=40, matryoshka_widths=widths,
        rescale_acts_by_decoder_norm=False, use_matryoshka_aux_loss=True, decoder_init_norm=0.1)
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.0, 0.999))
    x = torch.randn(a.batch, a.d_in)
    dead = torch.zeros(a.d_sae, dtype=torch.bool)
    print(f"SAELens {cfg.architecture()} step, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"d_in {a.d_in}, d_sae {a.d_sae}, k 40, widths {widths}, batch {a.batch}")

    def step() -> None:
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = (time.perf_counter() - t0) / a.steps
    print(f"{'SAELens step':28s} {dt * 1e3:10.1f} ms/step   ({a.batch / dt:.0f} tokens/s)")


if __name__ == "__main__":
    main()
