"""sae.cpp from Python: load, run, evaluate and train sparse autoencoders in SAELens format.

    import saecpp
    sae, cfg, sparsity = saecpp.SAE.from_pretrained("gemma-2-2b-res-snap-matryoshka-dc",
                                                    "blocks.12.hook_resid_post")
    acts = sae.encode(x)            # numpy float32 [..., d_in] -> [..., d_sae]
    x_hat = sae.decode(acts)
    metrics = saecpp.evaluate(sae, x)
    acts = sae.encode(x, device="cuda")     # in a build with CUDA (saecpp.cuda_available())

Long calls release the GIL. Weights (W_enc, W_dec, b_enc, b_dec, threshold) are numpy views
on the SAE's own buffers. Errors about files and configs raise saecpp.SaeError (a ValueError)
naming the file and the field.
"""

from saecpp._core import (SAE, Gemma2, SaeError, SparseCodes, __version__, cuda_available, evaluate,
                          presets, release, train)

__all__ = ["SAE", "Gemma2", "SaeError", "SparseCodes", "__version__", "cuda_available", "evaluate",
           "presets", "release", "train"]
