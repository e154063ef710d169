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

import os as _os

# libgomp reads its wait policy once, when _core loads it. Its default spins at every barrier
# and between parallel regions, taking the core from a sibling thread or another process;
# sae.cpp sizes its regions so a sleeping wait costs nothing measurable (docs/threads.md).
# Only for this import, and only when the user has not chosen a policy.
_chose = "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ
if _chose:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
try:
    from saecpp._core import (SAE, Gemma2, SaeError, SparseCodes, __version__, cache,
                              cuda_available, dashboard, download, evaluate, presets, release,
                              release_from_cache, release_merge, set_threads, status, threads,
                              train)
finally:
    if _chose:
        del _os.environ["OMP_WAIT_POLICY"]

__all__ = ["SAE", "Gemma2", "SaeError", "SparseCodes", "__version__", "cache", "cuda_available", "dashboard", "download", "evaluate",
           "presets", "release", "release_from_cache", "release_merge", "set_threads", "status", "threads", "train"]
