"""sae.cpp <-> SAELens, both ways, with the real sae-lens package (skipped without it)."""

import numpy as np
import pytest

import saecpp

torch = pytest.importorskip("torch")
sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig  # noqa: E402

D_IN, D_SAE = 24, 96


def randomise(sae, gen):
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) * 0.4)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=gen) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=gen) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=gen) * 0.5)


def close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rms = float(np.sqrt(np.mean(b**2)))
    assert np.all(np.abs(a - b) <= rel * (np.abs(b) + rms)), np.abs(a - b).max()


@pytest.mark.parametrize("cfg", [
    StandardSAEConfig(d_in=D_IN, d_sae=D_SAE),
    TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=7),
    TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True),
    JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE),
], ids=["standard", "topk", "topk_rescale", "jumprelu"])
def test_saelens_saved_loads_in_saecpp(cfg, tmp_path):
    gen = torch.Generator().manual_seed(0)
    ref = SAE.from_dict(cfg.to_dict())
    randomise(ref, gen)
    ref.save_model(tmp_path / "sae")
    x = (torch.randn(64, D_IN, generator=gen) + 0.2)
    with torch.no_grad():
        acts = ref.encode(x)
        out = ref.decode(acts)
    mine = saecpp.SAE.load_from_disk(str(tmp_path / "sae"))
    close(mine.encode(x.numpy()), acts.numpy())
    close(mine.decode(mine.encode(x.numpy(), sparse=True)), out.numpy())
    # cfg fields survive the trip.
    for key, value in ref.cfg.to_dict().items():
        if key != "metadata":
            assert mine.cfg[key] == value, key


def test_saelens_matryoshka_trained_then_saved_loads_in_saecpp(tmp_path):
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, matryoshka_widths=[12, 48, D_SAE])
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(5):
        out = sae.training_forward_pass(TrainStepInput(sae_in=torch.randn(128, D_IN), coefficients={},
                                                       dead_neuron_mask=None, n_training_steps=0,
                                                       is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    sae.save_inference_model(tmp_path / "sae")
    ref = SAE.load_from_disk(tmp_path / "sae")
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        acts = ref.encode(x)
        recon = ref.decode(acts)
    mine = saecpp.SAE.load_from_disk(str(tmp_path / "sae"))
    assert mine.cfg["architecture"] == "jumprelu"
    close(mine.encode(x.numpy()), acts.numpy())
    close(mine.forward(x.numpy()), recon.numpy())


def test_saecpp_trained_loads_in_saelens(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((80, D_IN)).astype(np.float32)
    x = ((rng.random((4096, 80)) < 0.05) * rng.uniform(0.5, 1.5, (4096, 80))).astype(np.float32) @ feats
    config = {
        "sae": {"d_sae": D_SAE, "k": 4, "matryoshka_widths": [12, 48, D_SAE],
                "normalize_activations": "expected_average_only_in"},
        "training": {"total_tokens": 256 * 30, "batch_size": 256, "eval_tokens": 512},
        "data": {"heldout_tokens": 512},
        "output": {"dir": str(tmp_path / "run"), "metadata": {"model_name": "toy", "hook_name": "blocks.0.hook_resid_post"}},
    }
    mine, _ = saecpp.train(config, activations=x)
    ref = SAE.load_from_disk(tmp_path / "run" / "sae")
    assert type(ref).__name__ == "JumpReLUSAE"
    assert ref.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert ref.cfg.d_sae == D_SAE and ref.cfg.d_in == D_IN
    xt = torch.from_numpy(x[:256])
    with torch.no_grad():
        acts = ref.encode(xt)
        recon = ref.decode(acts)
    close(mine.encode(x[:256]), acts.numpy())
    close(mine.forward(x[:256]), recon.numpy())
    # bf16 storage through convert-like save, read by SAELens in float32.
    mine.save_model(str(tmp_path / "bf16"), dtype="bfloat16")
    ref16 = SAE.load_from_disk(tmp_path / "bf16", dtype="float32")
    again = saecpp.SAE.load_from_disk(str(tmp_path / "bf16"))
    with torch.no_grad():
        close(again.encode(x[:256]), ref16.encode(xt).numpy())
