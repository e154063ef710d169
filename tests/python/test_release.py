"""saecpp.release on the tiny Gemma-2: the release folder loads in the real SAELens and gives the
same encodings as sae.cpp; stop and resume from Python."""

import json
import pathlib

import numpy as np
import pytest

import saecpp

torch = pytest.importorskip("torch")
sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "goldens" / "gemma2" / "gqa_window" / "model")
IDS = [f"{v}/blocks.{l}.hook_resid_post" for v in ("standard", "snap") for l in (0, 2)]


def write_corpus(folder: pathlib.Path) -> str:
    lines = [l for l in (ROOT / "data" / "tiny_corpus.txt").read_text().splitlines() if l]
    path = folder / "corpus.jsonl"
    with path.open("w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"{lines[i % len(lines)]} {i}"}) + "\n")
    return str(path)


def run(corpus: str, out: pathlib.Path, **kw):
    return saecpp.release(
        MODEL, corpus, [0, 2], str(out), tokens=20000, context_size=16, prompts_per_forward=4,
        n_batches_in_buffer=4, holdout_every=10, heldout_tokens=512, ce_windows=2,
        model_name="tiny-gemma2",
        overrides=["sae.d_sae=64", "sae.k=4", "sae.matryoshka_widths=[16,64]",
                   "training.batch_size=64", "training.checkpoint_every_steps=50",
                   "optimizer.lr=3e-3"], **{"log_every": 1000, **kw})


def test_release_loads_in_saelens(tmp_path):
    out = tmp_path / "release"
    summary = run(write_corpus(tmp_path), out)
    assert summary["layers"] == [0, 2]
    acts = saecpp.Gemma2(MODEL).activations(["The quick brown fox jumps over the lazy dog."],
                                            [0, 2])
    card = (out / "README.md").read_text()
    for sae_id in IDS:
        variant, hook = sae_id.split("/")
        ref = SAE.load_from_disk(str(out / sae_id))
        assert type(ref).__name__ == "JumpReLUSAE"
        assert ref.cfg.metadata.hook_name == hook
        assert ref.cfg.metadata.model_name == "tiny-gemma2"
        assert ref.cfg.metadata.context_size == 16
        assert ref.cfg.metadata.prepend_bos is True
        mine, cfg, sparsity = saecpp.SAE.from_pretrained(str(out), sae_id)
        assert sparsity is not None and sparsity.shape == (64,)
        x = acts[hook][1:]  # not BOS
        with torch.no_grad():
            want = ref.encode(torch.from_numpy(x)).numpy()
        got = mine.encode(x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        res = summary["results"][variant][hook]
        assert 0.3 < res["explained_variance"] <= 1.0
        assert f"| {res['l0']:.2f} | {res['explained_variance']:.4f} |" in card


def test_release_progress_reaches_a_callback_that_may_stop_it(tmp_path):
    """progress(record) gets each progress.jsonl record on the caller's thread as the job goes;
    an exception it raises stops the job at a checkpoint and reaches the caller, and the job
    resumes from there."""
    import threading
    corpus, out = write_corpus(tmp_path), tmp_path / "release"
    records, threads = [], set()

    def progress(record):
        records.append(record)
        threads.add(threading.get_ident())
        if record.get("step") == 150:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        run(corpus, out, log_every=50, checkpoint_minutes=0, progress=progress)
    assert threads == {threading.get_ident()}
    steps = [r["step"] for r in records if "step" in r]
    assert steps == [50, 100, 150], records
    # A round's record comes when its states are on disk (written beside the steps): that of
    # 50 before the round of 100 starts, that of 100 before or after step 150's record.
    assert [r["checkpoint"] for r in records if "checkpoint" in r] in ([50], [50, 100])
    assert all(0.0 < r["mean_ev"] <= 1.0 and r["tokens"] == r["step"] * 64
               for r in records if "step" in r)
    written = [json.loads(l) for l in (out / ".work" / "progress.jsonl").read_text().splitlines()]
    assert written[:len(records)] == records  # the same records, in order
    state = json.loads((out / ".work" / "state.json").read_text())
    assert state["step"] >= 150  # stopped at a checkpoint after the callback's error
    rest = []
    summary = run(corpus, out, resume=True, log_every=50, checkpoint_minutes=0,
                  progress=rest.append)
    assert summary["results"]["snap"]["blocks.2.hook_resid_post"]["training_tokens"] == 20000 // 64 * 64
    # (a round's checkpoint record may come after the last progress line: written beside)
    assert [r["step"] for r in rest if "step" in r][-1] == 20000 // 64


def test_release_plan_only_returns_the_plan_and_writes_nothing(tmp_path):
    """plan_only: the plan as a dict, nothing loaded or written; on cuda against gpu_memory (a
    GPU this machine need not have), with the groups of layers that fit."""
    corpus, out = write_corpus(tmp_path), tmp_path / "release"
    plan = run(corpus, out, plan_only=True)
    assert plan["fits"] and plan["saes"] == 4 and plan["disk"]["fits"]
    assert plan["memory"]["total"] >= plan["memory"]["saes"] > 0
    assert not out.exists()
    gib = 1 << 30
    whole = run(corpus, out, plan_only=True, device="cuda", gpu_memory=141 * gib)
    assert whole["fits"] and whole["gpu"]["groups"] == [[0, 2]]
    assert whole["gpu"]["total"] <= 141 * gib
    tight = run(corpus, out, plan_only=True, device="cuda", activation_store="device",
                gpu_memory=whole["gpu"]["total"] - 1)  # (auto would move the store to the host)
    assert not tight["fits"] and tight["gpu"]["groups"] == [[0], [2]]
    # ... or over two GPUs (ranks=2 plans the job of 2 ranks here): each trains 2 of the 4 SAEs
    assert tight["gpu"]["ranks_that_fit"] == 2 and whole["gpu"]["ranks_that_fit"] == 1
    spread = run(corpus, out, plan_only=True, device="cuda", activation_store="device",
                 gpu_memory=whole["gpu"]["total"] - 1, ranks=2)
    assert spread["fits"] and [len(r["saes"]) for r in spread["ranks"]] == [2, 2]
    assert all(r["gpu"]["fits"] for r in spread["ranks"])
    assert not out.exists()
    with pytest.raises(saecpp.SaeError, match="give it with --plan-only"):
        run(corpus, out, ranks=2)
    with pytest.raises(saecpp.SaeError, match="give it with --device cuda"):
        run(corpus, out, plan_only=True, gpu_memory=gib)


def test_release_stops_and_resumes(tmp_path):
    corpus, out = write_corpus(tmp_path), tmp_path / "release"
    assert run(corpus, out, stop_at_step=100) is None
    assert json.loads((out / ".work" / "state.json").read_text())["step"] == 100
    with pytest.raises(saecpp.SaeError, match="--resume"):
        run(corpus, out)
    with pytest.raises(saecpp.SaeError, match="checkpoint_minutes"):
        run(corpus, out, resume=True, checkpoint_minutes=-1.0)
    with pytest.raises(saecpp.SaeError, match="checkpoint_snapshots"):
        run(corpus, out, resume=True, checkpoint_snapshots=-1)
    # On the step cadence from here (training.checkpoint_every_steps = 50), one SAE state held
    # at a time while the checkpoints are written beside the steps.
    summary = run(corpus, out, resume=True, checkpoint_minutes=0, checkpoint_snapshots=1)
    for sae_id in IDS:
        variant, hook = sae_id.split("/")
        assert summary["results"][variant][hook]["training_tokens"] == 19968
    # Resumed once finished: nothing to do; the same release.json back, unchanged.
    written = (out / "release.json").read_bytes()
    assert run(corpus, out, resume=True) == summary
    assert (out / "release.json").read_bytes() == written


def test_release_on_the_gpu_or_a_clear_error(tmp_path):
    """device='cuda': the whole release on the GPU where this build and machine have one (the
    same SAEs as on the CPU, within training noise; here with the forwards between the SAE
    steps, overlap=False); else a clear error and no release."""
    corpus, out = write_corpus(tmp_path), tmp_path / "gpu"
    try:
        summary = run(corpus, out, device="cuda", precision="fp32", overlap=False)
    except saecpp.SaeError as e:
        assert "--device cuda" in str(e)
        assert not (out / "release.json").exists()
        return
    assert summary["device"]["forward"] == "fp32"
    for sae_id in IDS:
        variant, hook = sae_id.split("/")
        assert 0.3 < summary["results"][variant][hook]["explained_variance"] <= 1.0
        SAE.load_from_disk(str(out / sae_id))


def write_cache(folder: pathlib.Path, layers=(3,), d=16, shards=6, shard_tokens=512) -> str:
    """An activation cache in `sae cache`'s layout, written by hand: sparse combinations of a
    random dictionary, so that an SAE has something to find."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    dictionary = rng.normal(size=(32, d)).astype(np.float32)
    for layer in layers:
        hook = folder / f"blocks.{layer}.hook_resid_post"
        hook.mkdir(parents=True)
        for s in range(shards):
            codes = rng.exponential(size=(shard_tokens, 32)) * (rng.random((shard_tokens, 32)) < 0.1)
            acts = (codes @ dictionary).astype(np.float32)
            tokens = rng.integers(3, 100, size=shard_tokens).astype(np.int32)
            save_file({"activations": acts, "tokens": tokens}, str(hook / f"shard-{s:05d}.safetensors"))
    manifest = {"version": 1, "model": "/somewhere/gemma-2-2b", "model_name": "gemma-2-2b",
                "model_id": "google/gemma-2-2b", "hook": "resid_post", "layers": list(layers),
                "context_size": 128, "concat": True, "dtype": "f32", "shard_tokens": shard_tokens,
                "shards": shards, "tokens": shards * shard_tokens, "hidden_size": d,
                "complete": True, "corpus_next_document": 10,
                "corpus": {"shards": ["/data/pile-00.jsonl.zst"], "text_field": "text",
                           "bin_dtype": "u16", "holdout_every": 100, "max_bad_fraction": 0.01}}
    (folder / "cache.json").write_text(json.dumps(manifest))
    return str(folder)


def test_release_from_cache_loads_in_saelens(tmp_path):
    cache = write_cache(tmp_path / "cache")
    out = tmp_path / "release"
    summary = saecpp.release_from_cache(
        cache, str(out), tokens=2048, heldout_tokens=512, prompts_per_forward=4,
        n_batches_in_buffer=64, log_every=1000,
        overrides=["sae.d_sae=64", "sae.k=4", "sae.matryoshka_widths=[16,64]",
                   "training.batch_size=64", "optimizer.lr=3e-3"])
    assert summary["from_cache"] == {"shards": 6, "shard_tokens": 512, "trained_shards": 5,
                                     "heldout_shards": 1}
    assert summary["model"] == "google/gemma-2-2b"
    assert summary["corpus"]["shards"] == ["pile-00.jsonl.zst"]  # no local path published
    from safetensors.numpy import load_file

    # The held-out rows are the last shard's: SAELens and sae.cpp encode them alike.
    x = load_file(str(tmp_path / "cache" / "blocks.3.hook_resid_post" / "shard-00005.safetensors"))["activations"]
    for variant in ("standard", "snap"):
        sae_id = f"{variant}/blocks.3.hook_resid_post"
        ref = SAE.load_from_disk(str(out / sae_id))
        assert ref.cfg.metadata.model_name == "gemma-2-2b"
        mine, _, _ = saecpp.SAE.from_pretrained(str(out), sae_id)
        with torch.no_grad():
            want = ref.encode(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(mine.encode(x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        res = summary["results"][variant]["blocks.3.hook_resid_post"]
        assert res["heldout_tokens"] == 512 and "ce_loss_score" not in res
        assert res["training_tokens"] == 2048
    # The shards read between the SAE steps instead of beside them: the same batches, the same
    # SAEs to the bit. On the GPU where there is one; else a clear error, nothing written.
    in_turn = tmp_path / "in_turn"
    saecpp.release_from_cache(
        cache, str(in_turn), tokens=2048, heldout_tokens=512, prompts_per_forward=4,
        n_batches_in_buffer=64, log_every=1000, overlap=False,
        overrides=["sae.d_sae=64", "sae.k=4", "sae.matryoshka_widths=[16,64]",
                   "training.batch_size=64", "optimizer.lr=3e-3"])
    for variant in ("standard", "snap"):
        weights = f"{variant}/blocks.3.hook_resid_post/sae_weights.safetensors"
        assert (out / weights).read_bytes() == (in_turn / weights).read_bytes()
    if not saecpp.cuda_available():
        with pytest.raises(saecpp.SaeError, match="CUDA"):
            saecpp.release_from_cache(cache, str(tmp_path / "gpu"), device="cuda")
        assert not (tmp_path / "gpu").exists()
    with pytest.raises(saecpp.SaeError, match="cache.json"):
        saecpp.release_from_cache(str(tmp_path / "nothing"), str(tmp_path / "bad"))


def test_cache_from_python_stops_resumes_and_trains(tmp_path):
    """saecpp.cache: the tiny model's activations of layers 0 and 2 in shards (the first shard's
    rows are the model's for the corpus's first non-special tokens), stopped after one shard and
    resumed, then a release trained from it; bad layers refused before anything is written."""
    corpus, cache = write_corpus(tmp_path), tmp_path / "cache"
    kw = dict(tokens=2048, shard_tokens=1024, context_size=16, prompts_per_forward=4, holdout_every=0)
    assert saecpp.cache(MODEL, corpus, [2, 0], str(cache), stop_after_shards=1, **kw) is None
    with pytest.raises(saecpp.SaeError, match="--resume"):
        saecpp.cache(MODEL, corpus, [0, 2], str(cache), **kw)
    manifest = saecpp.cache(MODEL, corpus, [0, 2], str(cache), resume=True, **kw)
    assert manifest["shards"] == 2 and manifest["complete"] and manifest["layers"] == [0, 2]
    from safetensors.numpy import load_file

    shard = load_file(str(cache / "blocks.2.hook_resid_post" / "shard-00000.safetensors"))
    assert shard["activations"].shape == (1024, 64)
    # The first window is BOS and the first document's first 15 tokens (BOS is not cached).
    texts = [l for l in (ROOT / "data" / "tiny_corpus.txt").read_text().splitlines() if l]
    ids = saecpp.Gemma2(MODEL).tokenize([f"{texts[0]} 0"])[0]
    n = min(15, len(ids) - 1)
    assert shard["tokens"][:n].tolist() == ids[1:1 + n]
    summary = saecpp.release_from_cache(
        str(cache), str(tmp_path / "release"), variants=["snap"], tokens=1024, heldout_tokens=512,
        prompts_per_forward=4, n_batches_in_buffer=8, log_every=1000,
        overrides=["sae.d_sae=64", "sae.k=4", "sae.matryoshka_widths=[16,64]",
                   "training.batch_size=64"])
    assert summary["from_cache"]["shards"] == 2
    with pytest.raises(saecpp.SaeError, match="layers: 7 is outside 0..2"):
        saecpp.cache(MODEL, corpus, [7], str(tmp_path / "bad"), **kw)
    assert not (tmp_path / "bad").exists()


def patch_rows(shard, rows, value):
    """Overwrites whole rows of a cache shard's f32 `activations` in place (a finite outlier)."""
    with open(shard, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))["activations"]
        assert info["dtype"] == "F32"
        width = info["shape"][1]
        row = np.where(np.arange(width) % 2, -value, value).astype("<f4").tobytes()
        for r in rows:
            f.seek(8 + n + info["data_offsets"][0] + r * width * 4)
            f.write(row)


def test_release_sets_aside_an_sae_that_keeps_diverging(tmp_path):
    """An SAE that diverges again after its rollbacks (training.max_rollbacks) is set aside and the
    release finishes without it: release() warns and returns release.json, which says where it
    stopped; the other SAEs are whole."""
    corpus, cache = write_corpus(tmp_path), tmp_path / "cache"
    saecpp.cache(MODEL, corpus, [0, 2], str(cache), tokens=20480, shard_tokens=1024,
                 context_size=16, prompts_per_forward=4)
    for shard in ("shard-00003", "shard-00008"):  # two outliers in layer 2's rows, far apart
        patch_rows(cache / "blocks.2.hook_resid_post" / f"{shard}.safetensors", [10], 1e30)
    with pytest.warns(RuntimeWarning, match="snap/blocks.2.hook_resid_post"):
        summary = saecpp.release_from_cache(
            str(cache), str(tmp_path / "release"), variants=["snap"], tokens=12800,
            heldout_tokens=512, prompts_per_forward=4, n_batches_in_buffer=4, log_every=50,
            checkpoint_minutes=0,
            overrides=["sae.d_sae=64", "sae.k=4", "sae.matryoshka_widths=[16,64]",
                       "training.batch_size=64", "optimizer.lr=3e-3",
                       "training.checkpoint_every_steps=10", "training.max_rollbacks=1"])
    failed = summary["results"]["snap"]["blocks.2.hook_resid_post"]["failed"]
    assert failed["rollbacks"] == 1 and failed["step"] > failed["last_checkpoint_step"]
    assert "diverged again after 1 rollback" in failed["message"]
    assert not (tmp_path / "release" / "snap" / "blocks.2.hook_resid_post").exists()
    kept = summary["results"]["snap"]["blocks.0.hook_resid_post"]
    assert kept["training_tokens"] == 12800 and kept["explained_variance"] > 0.3
    sae, _, _ = saecpp.SAE.from_pretrained(str(tmp_path / "release"),
                                           "snap/blocks.0.hook_resid_post")
    assert sae.W_dec.shape == (64, 64)
    status = saecpp.status(str(tmp_path / "release"))
    assert status["results"]["set_aside"] == 1
    assert [s["set_aside"]["step"] for s in status["saes"] if "set_aside" in s] == [failed["step"]]
    # Trained again alone (allowed more rollbacks: it survives both outliers) and merged in its
    # place.
    saecpp.release_from_cache(
        str(cache), str(tmp_path / "repair"), layers=[2], variants=["snap"], tokens=12800,
        heldout_tokens=512, prompts_per_forward=4, n_batches_in_buffer=4, log_every=50,
        checkpoint_minutes=0,
        overrides=["sae.d_sae=64", "sae.k=4", "sae.matryoshka_widths=[16,64]",
                   "training.batch_size=64", "optimizer.lr=3e-3",
                   "training.checkpoint_every_steps=10", "training.max_rollbacks=3"])
    whole = saecpp.release_merge([str(tmp_path / "release"), str(tmp_path / "repair")],
                                 str(tmp_path / "whole"))
    replaced = whole["results"]["snap"]["blocks.2.hook_resid_post"]
    assert replaced["replaces"]["failed"] == failed and len(replaced["rollbacks"]) == 2
    assert whole["layers"] == [0, 2]
    with pytest.raises(saecpp.SaeError, match="is also in"):
        saecpp.release_merge([str(tmp_path / "repair"), str(tmp_path / "whole")],
                             str(tmp_path / "twice"))


def test_dashboard_of_a_release_sae(tmp_path):
    """saecpp.dashboard on an SAE of a release: the folder, its timings and the Neuronpedia batch
    agree with the SAE loaded back (width, hook, latents asked for)."""
    corpus = write_corpus(tmp_path)
    run(corpus, tmp_path / "release", variants=["standard"])
    out = tmp_path / "dash"
    info = saecpp.dashboard(str(tmp_path / "release") + ":standard/blocks.2.hook_resid_post", MODEL,
                            corpus, str(out), tokens=1000, latents=[0, 5, 63], context=(4, 2),
                            context_size=16, holdout_every=10, neuronpedia=True)
    assert info["meta"]["d_sae"] == 64 and info["meta"]["latents"] == 3
    assert info["meta"]["hook"] == "blocks.2.hook_resid_post"
    assert info["meta"]["levels"] == [16, 64]
    assert info["meta"]["tokens"] >= 1000 and info["seconds"] > 0
    assert (out / "index.html").exists() and (out / "latent.html").exists()
    batch = json.loads((out / "neuronpedia" / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == [0, 5, 63]
    for f in batch["features"]:
        for a in f["activations"]:
            assert len(a["tokens"]) == len(a["values"]) <= 4 + 1 + 2
    with pytest.raises(saecpp.SaeError, match="exists already"):
        saecpp.dashboard(str(tmp_path / "release") + ":standard/blocks.2.hook_resid_post", MODEL,
                         corpus, str(out))
    assert info["meta"]["device"] == "cpu" and info["meta"]["forward_precision"] == "f32"
    if not saecpp.cuda_available():  # device="cuda" refused before anything is written
        with pytest.raises(saecpp.SaeError, match="CUDA"):
            saecpp.dashboard(str(tmp_path / "release") + ":standard/blocks.2.hook_resid_post",
                             MODEL, corpus, str(tmp_path / "gpu"), device="cuda")
        assert not (tmp_path / "gpu").exists() and not (tmp_path / "gpu.partial").exists()
