"""sae.cpp's Gemma-2 forward against transformers' on the same device, in numbers (issue 11, item 1:
"in the device check, against transformers' Gemma2 on the same GPU at the real shape with random
weights"). Runs `sae activations` (resid_post at a few layers) in each of sae.cpp's modes, runs
transformers' Gemma2Model (eager attention: the soft-cap as written) on the same tokens in fp32
and bf16, and prints the relative error norm
||a - b|| / ||b|| over all tokens, per layer: sae.cpp against transformers fp32 (the reference) and,
for the bf16 modes, transformers bf16 against the same reference (the size of bf16's own rounding).

    python3 bench/gemma_vs_transformers_numerics.py SAE_BINARY [--device cuda] [--model DIR]
        [--layers 0,6,12,18,24] [--prompts 4] [--words 300]

--model defaults to /tmp/gemma-2-2b-random (made by bench/make_random_gemma.py when missing, with
the tiny test tokenizer). On cuda the modes are fp32, bf16 and bf16 with SAECPP_FORWARD_KERNELS=new;
on cpu (a check of this script on the tiny test models) f32 and bf16 matmuls.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import Gemma2Model
from transformers.utils import logging as hf_logging

ROOT = pathlib.Path(__file__).resolve().parent.parent


def prompts_text(n: int, words: int) -> list[str]:
    vocab = ["sparse", "autoencoder", "latent", "feature", "residual", "stream", "layer", "token",
             "model", "dictionary", "matryoshka", "width", "the", "of", "and", "a", "in", "is"]
    return [" ".join(vocab[(p * 7 + i * i * 3 + i) % len(vocab)] for i in range(words)) + f" {p}."
            for p in range(n)]


def sae_activations(sae: str, model: str, prompts: pathlib.Path, layers: str, out: pathlib.Path,
                    args: list[str], env: dict[str, str]) -> dict[str, torch.Tensor]:
    cmd = [sae, "activations", "--model", model, "--file", str(prompts), "--layers", layers,
           "--hook", "resid_post", "-o", str(out), *args]
    run = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
    return load_file(str(out))


def transformers_resid_post(model_dir: str, tokens: torch.Tensor, offsets: torch.Tensor,
                            layers: list[int], dtype: torch.dtype, device: str) -> dict[int, torch.Tensor]:
    # eager: the attention that applies the logit soft-cap as written (the reference)
    model = Gemma2Model.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    model = model.to(device).eval()
    model.layers = model.layers[: max(layers) + 1]
    got: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    hooks = []
    for l in layers:  # the decoder layer's output: resid_post, before any final norm
        def keep(_m, _i, out, l=l):
            got[l].append((out[0] if isinstance(out, tuple) else out)[0].float().cpu())
        hooks.append(model.layers[l].register_forward_hook(keep))
    with torch.inference_mode():
        for p in range(len(offsets) - 1):
            ids = tokens[offsets[p]: offsets[p + 1]].long().unsqueeze(0).to(device)
            model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {l: torch.cat(v) for l, v in got.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sae")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="/tmp/gemma-2-2b-random")
    p.add_argument("--layers", default="0,6,12,18,24")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--words", type=int, default=300)
    a = p.parse_args()
    hf_logging.disable_progress_bar()
    layers = [int(x) for x in a.layers.split(",")]
    model = pathlib.Path(a.model)
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_random_gemma.py"), "--out",
                        str(model), "--device", a.device], check=True)
    if not (model / "tokenizer.model").exists():
        shutil.copy(ROOT / "tests" / "data" / "tiny_spm.model", model / "tokenizer.model")
    work = pathlib.Path(tempfile.mkdtemp(prefix="saecpp-numerics-"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(prompts_text(a.prompts, a.words)) + "\n")
    if a.device == "cuda":
        modes = [("fp32", ["--device", "cuda", "--precision", "fp32"], {}),
                 ("bf16", ["--device", "cuda", "--precision", "bf16"], {}),
                 ("bf16, new kernels", ["--device", "cuda", "--precision", "bf16"],
                  {"SAECPP_FORWARD_KERNELS": "new"})]
    else:
        modes = [("f32", [], {}), ("bf16 matmuls", ["--bf16-matmul"], {})]
    runs = {}
    for name, args, env in modes:
        runs[name] = sae_activations(a.sae, str(model), prompts, a.layers,
                                     work / f"{len(runs)}.safetensors", args, env)
    tokens, offsets = runs[modes[0][0]]["tokens"], runs[modes[0][0]]["offsets"]
    for name in runs:
        assert torch.equal(runs[name]["tokens"], tokens), f"{name}: other tokens"
    ref = transformers_resid_post(str(model), tokens, offsets, layers, torch.float32, a.device)
    ref_bf16 = transformers_resid_post(str(model), tokens, offsets, layers, torch.bfloat16, a.device)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    import transformers
    print(f"Gemma-2 resid_post against transformers {transformers.__version__} fp32 (torch "
          f"{torch.__version__}, {dev}): {model}, {a.prompts} prompts, {len(tokens)} tokens; "
          "relative error norm over all tokens")
    print(f"{'':24s}" + "".join(f"{'layer ' + str(l):>12s}" for l in layers))
    print(f"{'transformers bf16':24s}" + "".join(f"{rel(ref_bf16[l], ref[l]):12.2e}" for l in layers))
    for name in runs:
        row = [rel(runs[name][f"blocks.{l}.hook_resid_post"], ref[l]) for l in layers]
        print(f"{'sae.cpp ' + name:24s}" + "".join(f"{r:12.2e}" for r in row))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
