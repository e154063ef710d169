"""Gemma-2 from Python on the tiny checkpoint (goldens from transformers)."""

import json

import numpy as np
import pytest

import saecpp
from conftest import GOLDENS

safetensors_numpy = pytest.importorskip("safetensors.numpy")
MODEL = str(GOLDENS / "gemma2" / "gqa_window" / "model")


def test_activations_match_transformers():
    g = saecpp.Gemma2(MODEL)
    ids = json.loads((GOLDENS / "gemma2" / "tokenizer.json").read_text())["ids"]
    assert g.tokenize(["Hello world!"]) == [ids[0]]
    out = g.activations(["Hello world!"], layers=[1, 0])
    want = safetensors_numpy.load_file(str(GOLDENS / "gemma2" / "gqa_window" / "goldens.safetensors"))
    np.testing.assert_allclose(out["blocks.0.hook_resid_post"], want["prompt0.hidden_states.1"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["blocks.1.hook_resid_post"], want["prompt0.hidden_states.2"], rtol=1e-4, atol=1e-4)
    assert list(out["tokens"]) == ids[0] and list(out["offsets"]) == [0, len(ids[0])]
    assert g.lm_loss(["Hello world!"]) > 0
    with pytest.raises(saecpp.SaeError):
        g.activations(["hi"], layers=[7])


def test_device_cuda_gives_the_cpus_numbers_or_says_why_not(tmp_path):
    """Gemma2(device="cuda"): activations, lm_loss and lm_score from the GPU forward (fp32) equal
    the CPU's; without a GPU (or in a wheel built without CUDA) a clear error before loading."""
    with pytest.raises(saecpp.SaeError, match="unknown device 'tpu'"):
        saecpp.Gemma2(MODEL, device="tpu")
    if not saecpp.cuda_available():
        with pytest.raises(saecpp.SaeError, match="CUDA"):
            saecpp.Gemma2(MODEL, device="cuda")
        pytest.skip("no GPU: the refusal was checked")
    with pytest.raises(saecpp.SaeError, match="precision"):
        saecpp.Gemma2(MODEL, device="cuda", precision="fp16")
    texts = ["Hello world!", "The quick brown fox jumps over the lazy dog."]
    cpu, gpu = saecpp.Gemma2(MODEL), saecpp.Gemma2(MODEL, device="cuda", precision="fp32")
    a, b = cpu.activations(texts, layers=[0, 2]), gpu.activations(texts, layers=[0, 2])
    for k in ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post"):
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=2e-5)
    assert abs(gpu.lm_loss(texts) - cpu.lm_loss(texts)) < 1e-4
    assert abs(saecpp.Gemma2(MODEL, device="cuda").lm_loss(texts) - cpu.lm_loss(texts)) < 5e-2
    # A standard SAE at layer 1 of the tiny model (d_in 64), spliced in on either device.
    rng = np.random.default_rng(3)
    folder = tmp_path / "sae"
    folder.mkdir()
    cfg = json.loads((GOLDENS / "standard" / "sae" / "cfg.json").read_text())
    cfg.update(d_in=64, d_sae=128)
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors_numpy.save_file({"W_enc": rng.normal(0, 0.2, (64, 128)).astype(np.float32),
                                 "W_dec": rng.normal(0, 0.2, (128, 64)).astype(np.float32),
                                 "b_enc": np.zeros(128, np.float32), "b_dec": np.zeros(64, np.float32)},
                                str(folder / "sae_weights.safetensors"))
    sae = saecpp.SAE.load_from_disk(str(folder))
    s_cpu, s_gpu = cpu.lm_score(sae, texts), gpu.lm_score(sae, texts)
    for k in ("ce_loss_score", "kl_sae"):
        assert abs(s_gpu[k] - s_cpu[k]) < 1e-3, k
