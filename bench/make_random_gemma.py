"""A Gemma-2-2b-shaped checkpoint with random weights, in Hugging Face format (bf16, sharded),
for the forward benchmark: google/gemma-2-2b's config.json values, transformers' own init.
    .venv/bin/python bench/make_random_gemma.py --out /tmp/gemma-2-2b-random
"""

import argparse
import pathlib

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

# google/gemma-2-2b config.json (the fields the architecture reads).
GEMMA_2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                  query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh", bos_token_id=2,
                  eos_token_id=1, pad_token_id=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="where to draw the weights (cuda: faster)")
    a = p.parse_args()
    out = pathlib.Path(a.out)
    if (out / "model.safetensors.index.json").exists():
        print(f"{out}: already there")
        return
    torch.manual_seed(0)
    with torch.device(a.device):
        model = Gemma2ForCausalLM(Gemma2Config(**GEMMA_2_2B, dtype=torch.bfloat16)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="2GB")
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, bf16")


if __name__ == "__main__":
    main()
