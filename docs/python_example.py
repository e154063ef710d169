"""Paste into a notebook: train a Matryoshka SAE with snap loss on numpy activations, look at
it, evaluate it, save it, and open it with SAELens. Runs in about a minute on 2 cores."""

import numpy as np

import saecpp

# Activations: here 20k tokens of a toy model with 200 sparse features in 64 dimensions.
# Use your own [tokens, d_in] float32 array (or an .npy file via config["data"]).
rng = np.random.default_rng(0)
features = rng.standard_normal((200, 64)).astype(np.float32)
features /= np.linalg.norm(features, axis=1, keepdims=True)
firing = (rng.random((20_000, 200)) < 0.02) * rng.uniform(0.5, 1.5, (20_000, 200))
acts = (firing.astype(np.float32) @ features).astype(np.float32)

config = {
    "sae": {"d_sae": 256, "k": 4, "matryoshka_widths": [32, 128, 256]},
    "loss": {"level_losses": "snap"},  # l2 on the inner levels, mse on the outer one
    "optimizer": {"lr": 2e-3},
    "training": {"total_tokens": 2_000_000, "batch_size": 1024, "log_every_steps": 500},
    "data": {"heldout_tokens": 2048},
    "output": {"dir": "out/notebook_sae"},
}
progress = []
sae, final_eval = saecpp.train(config, activations=acts, progress=progress.append)
print(sae, "held-out L0 %.2f, EV %.3f" % (final_eval["l0"], final_eval["explained_variance"]))
print("per-level EV:", [round(v, 3) for v in final_eval["level_explained_variance"]])

codes = sae.encode(acts[:5], sparse=True)      # CSR: offsets, indices, values
print("latents of token 0:", codes.indices[codes.offsets[0]:codes.offsets[1]])
dense = sae.encode(acts[:5])                   # [5, 256]
recon = sae.decode(dense)                      # [5, 64]
print("W_dec is a view:", sae.W_dec.shape, sae.W_dec.flags["OWNDATA"] is False)
print(saecpp.evaluate(sae, acts[-2048:])["explained_variance"])

sae.save_model("out/notebook_sae_copy")         # SAELens format
try:
    from sae_lens import SAE
    ref = SAE.load_from_disk("out/notebook_sae/sae")
    print("SAELens loaded it:", type(ref).__name__, ref.cfg.d_sae)
except ImportError:
    print("pip install sae-lens to open it with SAELens")
