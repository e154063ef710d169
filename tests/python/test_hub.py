"""One Hugging Face cache for sae.cpp and huggingface_hub: what either downloads, the other
finds offline (against a local mock of the Hub, mock_hub.py)."""

import os
import pathlib

import huggingface_hub
import pytest

import saecpp
from mock_hub import MockHub

GOLDENS = pathlib.Path(__file__).resolve().parent.parent / "goldens"
REPO = "chanind/gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40"
COMMIT = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"
SAE_ID = "snap/blocks.12.hook_resid_post"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = MockHub()
    server.add_folder(REPO, COMMIT, GOLDENS / "jumprelu" / "sae", SAE_ID)
    server.add_folder(REPO, COMMIT, GOLDENS / "topk" / "sae", "standard/blocks.12.hook_resid_post")
    server.add_folder("google/gemma-2-2b", "c5ebcd40d208330abc697524c919956e692655cf",
                      GOLDENS / "gemma2" / "sharded" / "model", "")
    # sae.cpp reads the environment at each call; huggingface_hub takes endpoint/cache_dir.
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.close()


def test_saecpp_downloads_and_huggingface_hub_reads_it_offline(hub, tmp_path, monkeypatch):
    sae, cfg, sparsity = saecpp.SAE.from_pretrained(REPO, SAE_ID)
    assert cfg["d_sae"] == 64 and sparsity is not None
    cache = tmp_path / "hub"
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        found = huggingface_hub.hf_hub_download(REPO, f"{SAE_ID}/{name}", cache_dir=cache,
                                                local_files_only=True)
        assert pathlib.Path(found).read_bytes() == (GOLDENS / "jumprelu" / "sae" / name).read_bytes()
        assert COMMIT in found
    # The whole cache is valid to huggingface_hub's own scanner.
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.nb_files == 3
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})

    # saecpp.download: the rest of the repo, the same snapshot folder.
    snap = saecpp.download(REPO, include="standard/*")
    assert snap == str(cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT)
    assert huggingface_hub.try_to_load_from_cache(
        REPO, "standard/blocks.12.hook_resid_post/cfg.json", cache_dir=cache) is not None


def test_huggingface_hub_downloads_and_saecpp_reads_it_offline(hub, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    folder = huggingface_hub.snapshot_download(REPO, allow_patterns=[f"{SAE_ID}/*"],
                                               cache_dir=cache, endpoint=hub.endpoint)
    model = huggingface_hub.snapshot_download("google/gemma-2-2b", cache_dir=cache,
                                              endpoint=hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    sae, cfg, _ = saecpp.SAE.from_pretrained(REPO, SAE_ID)
    assert cfg["d_sae"] == 64
    assert saecpp.download(REPO, include=f"{SAE_ID}/*") == folder
    g = saecpp.Gemma2("google/gemma-2-2b")
    assert g.tokenize(["hello"])[0][0] == 2  # BOS first
    assert pathlib.Path(model).is_dir()
    assert len(hub.requests) == n  # offline: not one request


def test_offline_miss_is_a_clear_error(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(saecpp.SaeError, match="HF_HUB_OFFLINE=1"):
        saecpp.download(REPO, include="standard/*")
    assert hub.requests == []
