"""Makes SAELens's training-SAE modules importable where sae-lens's full dependency set is not
installed (the GPU machine has torch but no network: sae-lens travels as its own wheel).

Only when `import sae_lens` fails does this (1) register `sae_lens` as a bare package, so its
top-level __init__ (runners, datasets, HookedSAETransformer) is not imported, and (2) when
transformer_lens is missing, stand in for the two names sae_lens/saes/sae.py takes from it:
HookPoint (an identity nn.Module carrying hooks; a training step registers none) and
HookedRootModule (an nn.Module with setup()). The SAE arithmetic is SAELens's own code.
"""

import importlib.util
import logging
import sys
import types

try:
    import sae_lens  # noqa: F401
except Exception:  # noqa: BLE001 - any missing dependency of the full package
    for name in [n for n in sys.modules if n == "sae_lens" or n.startswith("sae_lens.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise
    pkg = types.ModuleType("sae_lens")
    pkg.__path__ = list(spec.submodule_search_locations)
    from importlib.metadata import version

    pkg.__version__ = version("sae-lens")
    pkg.logger = logging.getLogger("sae_lens")  # as sae_lens/__init__.py defines it
    sys.modules["sae_lens"] = pkg
    if importlib.util.find_spec("transformer_lens") is None:
        import torch.nn as nn

        class HookPoint(nn.Module):
            def forward(self, x):
                return x

        class HookedRootModule(nn.Module):
            def setup(self):
                pass

        tl = types.ModuleType("transformer_lens")
        hp = types.ModuleType("transformer_lens.hook_points")
        ht = types.ModuleType("transformer_lens.HookedTransformer")
        hp.HookPoint = HookPoint
        ht.HookedRootModule = HookedRootModule
        tl.hook_points, tl.HookedTransformer = hp, ht
        sys.modules.update({"transformer_lens": tl, "transformer_lens.hook_points": hp,
                            "transformer_lens.HookedTransformer": ht})
        print("note: transformer_lens not installed; SAELens's HookPoint/HookedRootModule "
              "replaced by identity stand-ins (bench/saelens_import.py)")
