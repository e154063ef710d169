"""The Python API on the SAELens goldens (no SAELens needed)."""

import json
import os
import shutil

import numpy as np
import pytest

import saecpp
from conftest import GOLDENS, load_npy

CASES = ["standard", "standard_no_bdec_norm", "standard_layer_norm", "topk", "topk_rescale",
         "jumprelu", "jumprelu_bf16_weights", "pre6_standard", "pre6_topk"]


def close(a, b, rel=1e-5):
    """|a - b| <= rel * (|b| + rms(b)), elementwise (as the C++ tests)."""
    rms = float(np.sqrt(np.mean(np.square(b, dtype=np.float64)))) if b.size else 0.0
    assert np.all(np.abs(a.astype(np.float64) - b) <= rel * (np.abs(b) + rms)), np.abs(a - b).max()


@pytest.mark.parametrize("case", CASES)
def test_encode_decode_match_saelens_goldens(case):
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / case / "sae"))
    x = load_npy(case, "x")
    acts = sae.encode(x)
    assert acts.dtype == np.float32 and acts.shape == (x.shape[0], sae.cfg["d_sae"])
    want = load_npy(case, "feature_acts")
    assert np.array_equal(acts != 0, want != 0)
    close(acts, want)
    codes = sae.encode(x, sparse=True)
    close(sae.decode(codes), load_npy(case, "sae_out"))
    close(sae.forward(x), load_npy(case, "sae_out"))
    close(codes.to_dense(), want)
    # Leading dimensions are kept.
    assert sae.encode(x.reshape(4, -1, x.shape[1])).shape == (4, x.shape[0] // 4, sae.cfg["d_sae"])


def test_gpu_precision_on_the_cpu_is_refused():
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "topk" / "sae"))
    x = load_npy("topk", "x")
    with pytest.raises(saecpp.SaeError, match="precision"):
        sae.encode(x, precision="bf16")
    assert sae.encode(x, precision="fp32").shape == (x.shape[0], sae.cfg["d_sae"])


def test_metrics_match_saelens_goldens():
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "jumprelu" / "sae"))
    m = saecpp.evaluate(sae, load_npy("jumprelu", "x"))
    want = json.loads((GOLDENS / "jumprelu" / "metrics.json").read_text())
    for key in ["l0", "mse", "explained_variance", "explained_variance_legacy", "cossim", "l2_ratio"]:
        assert m[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert m["dead_latents"] == want["dead_latents"]


def test_weights_are_views_without_copies():
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "standard" / "sae"))
    w1, w2 = sae.W_enc, sae.W_enc
    assert np.shares_memory(w1, w2) and not w1.flags["OWNDATA"]
    assert w1.shape == (16, 64) and sae.W_dec.shape == (64, 16) and sae.threshold is None
    x = load_npy("standard", "x")
    before = sae.encode(x)
    w1 *= 2.0  # writes through to the SAE
    assert not np.allclose(sae.encode(x), before)
    expected = w1.copy()
    del sae, w2  # the view alone keeps the SAE's buffer alive
    np.testing.assert_array_equal(w1, expected)


def test_cfg_and_sparsity():
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "jumprelu" / "sae"))
    assert sae.cfg["architecture"] == "jumprelu"
    assert sae.cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert sae.sparsity is not None and sae.sparsity.shape == (64,)
    assert sae.threshold.shape == (64,)


def test_from_pretrained_local_release_and_hf_cache(tmp_path, monkeypatch):
    rel = tmp_path / "release" / "snap"
    rel.mkdir(parents=True)
    shutil.copytree(GOLDENS / "jumprelu" / "sae", rel / "blocks.12.hook_resid_post")
    sae, cfg, sparsity = saecpp.SAE.from_pretrained(str(tmp_path / "release"), "snap/blocks.12.hook_resid_post")
    assert cfg["d_sae"] == 64 and sparsity.shape == (64,)
    hub = tmp_path / "hub"
    snap = hub / "models--chanind--gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40" / "snapshots" / "r1"
    shutil.copytree(rel / "blocks.12.hook_resid_post", snap / "snap" / "blocks.12.hook_resid_post")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    sae2, cfg2, _ = saecpp.SAE.from_pretrained("gemma-2-2b-res-snap-matryoshka-dc", "blocks.12.hook_resid_post")
    assert np.array_equal(sae2.W_dec, sae.W_dec)
    sae3, _, _ = saecpp.SAE.from_pretrained_with_cfg_and_sparsity("gemma-2-2b-res-snap-matryoshka-dc",
                                                                   "blocks.12.hook_resid_post")
    assert np.array_equal(sae3.W_enc, sae.W_enc)
    # Not cached: downloaded online (tests/python/test_hub.py); offline, an error that says so.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(saecpp.SaeError, match="HF_HUB_OFFLINE=1"):
        saecpp.SAE.from_pretrained("gemma-2-2b-res-snap-matryoshka-dc", "blocks.3.hook_resid_post")


def test_errors_name_file_and_field(tmp_path):
    shutil.copytree(GOLDENS / "topk" / "sae", tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["architecture"] = "hypercube"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cfg.json: architecture"):
        saecpp.SAE.load_from_disk(str(tmp_path / "sae"))
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "topk" / "sae"))
    with pytest.raises(saecpp.SaeError, match="d_in"):
        sae.encode(np.zeros((3, 7), np.float32))
    bad = np.zeros((2, 16), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(saecpp.SaeError, match="row 1, column 3"):
        sae.encode(bad)


def test_save_model_round_trip(tmp_path):
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "topk_rescale" / "sae"))
    sae.save_model(str(tmp_path / "copy"))
    again = saecpp.SAE.load_from_disk(str(tmp_path / "copy"))
    assert np.array_equal(again.W_enc, sae.W_enc)
    assert again.cfg == sae.cfg


def synthetic_activations(n=4096, d=32, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((64, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    on = rng.random((n, 64)) < 0.05
    return (on * rng.uniform(0.5, 1.5, (n, 64))).astype(np.float32) @ feats


def test_train_from_numpy_with_progress(tmp_path):
    x = synthetic_activations()
    records = []
    config = {
        "sae": {"d_sae": 64, "k": 3, "matryoshka_widths": [16, 64]},
        "loss": {"level_losses": "snap"},
        "optimizer": {"lr": 3e-3},
        "training": {"total_tokens": 256 * 400, "batch_size": 256, "log_every_steps": 100,
                     "eval_every_steps": 200, "eval_tokens": 512},
        "data": {"heldout_tokens": 512},
        "output": {"dir": str(tmp_path / "run")},
    }
    sae, final = saecpp.train(config, activations=x, progress=records.append)
    assert sae.cfg["architecture"] == "jumprelu" and sae.cfg["d_sae"] == 64
    # The threshold (an EMA at rate 0.01) has settled, so the saved JumpReLU's L0 is near k.
    assert final["explained_variance"] > 0.6 and len(final["level_explained_variance"]) == 2
    assert 1.5 < final["l0"] < 6
    assert any("eval" in r for r in records) and any("tokens_per_s" in r for r in records)
    assert os.path.exists(tmp_path / "run" / "checkpoint" / "state.json")


def test_train_stops_cleanly_on_callback_error_and_resumes(tmp_path):
    x = synthetic_activations(seed=1)
    config = {
        "sae": {"d_sae": 64, "k": 3},
        "training": {"total_tokens": 256 * 40, "batch_size": 256, "log_every_steps": 10, "eval_tokens": 256},
        "data": {"heldout_tokens": 256},
        "output": {"dir": str(tmp_path / "run")},
    }

    def interrupt(record):
        if record.get("step") == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        saecpp.train(config, activations=x, progress=interrupt)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 20  # the step whose record raised; checkpoint kept
    sae, _ = saecpp.train(config, activations=x, resume=True)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 40


def test_train_refuses_nan_activations(tmp_path):
    """A NaN in the array handed to train: an error naming its row and column, no SAE saved."""
    x = synthetic_activations(seed=2)
    x[300, 5] = np.nan
    config = {
        "sae": {"d_sae": 64, "k": 3},
        "training": {"total_tokens": 256 * 20, "batch_size": 256, "eval_tokens": 256},  # every row
        "data": {"heldout_tokens": 256},
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(saecpp.SaeError, match=r"row 300, column 5: activation is nan"):
        saecpp.train(config, activations=x)
    assert not (tmp_path / "run" / "sae").exists()


def test_train_rolls_back_a_divergence_and_trains_on(tmp_path):
    """One row of values too large for f32 (finite: not bad data) makes one step diverge: the SAE
    goes back to its last checkpoint, skips that batch, and the run ends with it said."""
    x = synthetic_activations(seed=2)
    x[300] = np.where(np.arange(x.shape[1]) % 2, -1e30, 1e30)
    records = []
    config = {
        "sae": {"d_sae": 64, "k": 3},
        "training": {"total_tokens": 256 * 15, "batch_size": 256, "eval_tokens": 256,
                     "checkpoint_every_steps": 1, "seed": 1},
        "data": {"heldout_tokens": 256},
        "output": {"dir": str(tmp_path / "run")},
    }
    sae, final = saecpp.train(config, activations=x, progress=records.append)
    rollbacks = [r["rollback"] for r in records if "rollback" in r]
    assert len(rollbacks) == 1, rollbacks
    assert rollbacks[0]["skipped_steps"] == rollbacks[0]["step"] - rollbacks[0]["to_step"] == 1
    assert np.isfinite(sae.W_dec).all() and np.isfinite(final["explained_variance"])
    with open(tmp_path / "run" / "checkpoint" / "state.json") as f:
        state = json.load(f)
    assert state["rollbacks"] == [{"step": rollbacks[0]["step"], "to_step": rollbacks[0]["to_step"]}]
    assert state["optimizer_updates"] == 14
    status = saecpp.status(str(tmp_path / "run"))  # as `sae status --json`
    assert status["kind"] == "train" and status["finished"] and status["step"] == 15
    assert status["rollbacks"] == state["rollbacks"]
    with pytest.raises(saecpp.SaeError, match="holds no job"):
        saecpp.status(str(tmp_path))
    # training.max_rollbacks = 0: the divergence stops the run, naming it.
    config["training"]["max_rollbacks"] = 0
    config["output"]["dir"] = str(tmp_path / "stopped")
    with pytest.raises(saecpp.SaeError, match="so the training diverged"):
        saecpp.train(config, activations=x)


def test_device_cuda_runs_or_says_why_not():
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "jumprelu" / "sae"))
    x = load_npy("jumprelu", "x")
    with pytest.raises(saecpp.SaeError, match="unknown device"):
        sae.encode(x, device="tpu")
    if not saecpp.cuda_available():  # the default wheel is CPU-only
        for call in (lambda: sae.encode(x, device="cuda"),
                     lambda: saecpp.evaluate(sae, x, device="cuda")):
            with pytest.raises(saecpp.SaeError, match="CUDA"):
                call()
        return
    gpu = sae.encode(x, device="cuda")
    assert np.array_equal(gpu != 0, sae.encode(x) != 0)
    close(gpu, sae.encode(x))
    assert saecpp.evaluate(sae, x, device="cuda")["l0"] == saecpp.evaluate(sae, x)["l0"]


def test_threads_are_chosen_and_can_be_set():
    n, why = saecpp.threads()
    assert n >= 1 and why  # OMP_NUM_THREADS, or the affinity mask / cgroup quota
    if "OMP_NUM_THREADS" in os.environ:
        assert why == f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS'].split(',')[0]}"
    with pytest.raises(saecpp.SaeError, match="positive"):
        saecpp.set_threads(0)
    saecpp.set_threads(1)
    assert saecpp.threads() == (1, "set_threads")
    sae = saecpp.SAE.load_from_disk(str(GOLDENS / "jumprelu" / "sae"))
    x = load_npy("jumprelu", "x")
    one = sae.encode(x)
    saecpp.set_threads(n)
    assert np.array_equal(one, sae.encode(x))


def test_version_is_the_cmake_version():
    text = (GOLDENS.parent.parent / "CMakeLists.txt").read_text()
    assert f"project(saecpp VERSION {saecpp.__version__}" in text
