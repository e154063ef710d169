"""Groundwork for issue 4 (Gemma-2 in C++): tiny random Gemma-2 checkpoints in Hugging Face
format, a small SentencePiece tokenizer, and golden hidden states / logits from the real
transformers Gemma2ForCausalLM, which tests/test_gemma2_forward.cpp and test_lm_score.cpp
compare against.

    .venv/bin/pip install transformers sentencepiece   # (sae-lens already brings transformers)
    .venv/bin/python scripts/make_gemma_goldens.py

Writes tests/goldens/gemma2/<config>/{model/, goldens.safetensors, prompts.json} and
tests/data/tiny_spm.model. Configs cover GQA, both soft-caps, a sliding window shorter than
the prompt, odd sizes, bf16 weights and a sharded checkpoint.
"""

import json
import pathlib
import shutil

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2ForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "goldens" / "gemma2"
VOCAB = 384  # the tiny tokenizer's size (byte fallback needs 256 + specials + merges)

CONFIGS = {
    # GQA 4 query heads over 2 KV heads, window 6 < prompt length, f32.
    "gqa_window": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       query_pre_attn_scalar=16, sliding_window=6, dtype=torch.float32),
    # Odd sizes: 3 heads over 1 KV head, head_dim 12, query scalar != head_dim, bf16 weights.
    "odd_bf16": dict(hidden_size=36, intermediate_size=100, num_hidden_layers=2,
                     num_attention_heads=3, num_key_value_heads=1, head_dim=12,
                     query_pre_attn_scalar=20, sliding_window=5, dtype=torch.bfloat16),
    # Sharded checkpoint with model.safetensors.index.json.
    "sharded": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=16, sliding_window=4096, dtype=torch.float32,
                    shard="40KB"),
}


def make_tokenizer() -> spm.SentencePieceProcessor:
    prefix = ROOT / "tests" / "data" / "tiny_spm"
    spm.SentencePieceTrainer.train(
        input=str(ROOT / "tests" / "data" / "tiny_corpus.txt"), model_prefix=str(prefix),
        vocab_size=VOCAB, model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    (ROOT / "tests" / "data" / "tiny_spm.vocab").unlink(missing_ok=True)
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def main() -> None:
    torch.manual_seed(0)
    sp = make_tokenizer()
    texts = ["Hello world!", "Sparse autoencoders decompose the activations of a language model.",
             "naïve café 🙂 1234"]
    prompts = [[2] + sp.encode(t) for t in texts]  # BOS, as Gemma expects
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tokenizer.json").write_text(json.dumps({"texts": texts, "ids": prompts}, ensure_ascii=False, indent=1))
    for name, c in CONFIGS.items():
        c = dict(c)
        dtype, shard = c.pop("dtype"), c.pop("shard", None)
        cfg = Gemma2Config(vocab_size=VOCAB, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                           rms_norm_eps=1e-6, **c)
        model = Gemma2ForCausalLM(cfg).eval()
        with torch.no_grad():  # larger-than-default weights so every nonlinearity matters
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        model = model.to(dtype)
        case = OUT / name
        shutil.rmtree(case, ignore_errors=True)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(case / "model", **kwargs)
        shutil.copy(ROOT / "tests" / "data" / "tiny_spm.model", case / "model" / "tokenizer.model")
        out = {}
        with torch.no_grad():
            for i, ids in enumerate(prompts):
                res = model(torch.tensor([ids]), output_hidden_states=True)
                for layer, h in enumerate(res.hidden_states):
                    out[f"prompt{i}.hidden_states.{layer}"] = h[0].float().contiguous()
                out[f"prompt{i}.logits"] = res.logits[0].float().contiguous()
        save_file(out, case / "goldens.safetensors")
        (case / "prompts.json").write_text(json.dumps({"prompts": prompts, "layer_types": cfg.layer_types}))
        print(name, "ok:", {k: list(v.shape) for k, v in list(out.items())[:2]})


if __name__ == "__main__":
    main()
