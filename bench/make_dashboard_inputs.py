"""Inputs for bench/dashboard_real_shape.sh beside a random Gemma-2-2b checkpoint (made by
bench/make_random_gemma.py): a tokenizer.model with Gemma's 256000 entries (the test's tiny
SentencePiece model with placeholder pieces appended: the dashboard needs one piece per id, it
never tokenises text here), a corpus of random token ids (.npy, one document per row), and a
release-shaped SAE (TopK k 40, d_sae 32768, Matryoshka levels in its metadata) at layer 12.
    .venv/bin/python bench/make_dashboard_inputs.py --model /tmp/gemma-2-2b-random --out /tmp/dash-in
"""

import argparse
import json
import pathlib

import numpy as np
from safetensors.numpy import save_file
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 256000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--docs", type=int, default=256)
    p.add_argument("--doc-tokens", type=int, default=512)
    a = p.parse_args()
    model, out = pathlib.Path(a.model), pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    proto = spm_pb2.ModelProto()
    proto.ParseFromString((ROOT / "tests" / "data" / "tiny_spm.model").read_bytes())
    have = {p.piece for p in proto.pieces}
    i = 0
    while len(proto.pieces) < VOCAB:
        piece = f"\u2581w{i}"
        i += 1
        if piece in have:
            continue
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, -float(i), spm_pb2.ModelProto.SentencePiece.NORMAL
    (model / "tokenizer.model").write_bytes(proto.SerializeToString())

    rng = np.random.default_rng(0)
    np.save(out / "tokens.npy", rng.integers(3, VOCAB, size=(a.docs, a.doc_tokens), dtype=np.int32))

    d_in, d_sae, k = 2304, 32768, 40
    sae = out / "sae"
    sae.mkdir(exist_ok=True)
    w_enc = (rng.standard_normal((d_in, d_sae), dtype=np.float32) / np.sqrt(d_in)).astype(np.float32)
    save_file({"W_enc": w_enc, "W_dec": np.ascontiguousarray(w_enc.T),
               "b_enc": np.zeros(d_sae, np.float32), "b_dec": np.zeros(d_in, np.float32)},
              str(sae / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "k": k,
           "metadata": {"model_name": "gemma-2-2b-random", "hook_name": "blocks.12.hook_resid_post",
                        "training_architecture_details": {
                            "matryoshka_widths": [128, 512, 2048, 8192, 32768]}}}
    (sae / "cfg.json").write_text(json.dumps(cfg, indent=2))
    print(f"{model}/tokenizer.model ({VOCAB} pieces), {out}/tokens.npy, {out}/sae")


if __name__ == "__main__":
    main()
