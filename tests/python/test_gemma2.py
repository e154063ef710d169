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
