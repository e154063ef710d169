"""Golden files for the SAE tests, produced by the real SAELens (pip `sae-lens`).

For each case: an SAE with random weights saved by SAELens (tests/goldens/<case>/sae/), fixed
inputs x.npy, and SAELens's outputs: feature_acts.npy (encode), sae_out.npy (decode of those
codes) and metrics.json (the formulas of sae_lens.evals.get_sparsity_and_variance_metrics on
x and sae_out, one batch). Also a safetensors file written by the reference writer, for the
byte-identity test. Rerun with scripts/make_goldens.sh; outputs are small and committed.
"""

import json
import pathlib
import shutil

import numpy as np
import sae_lens
import torch
from safetensors.torch import save_file
from sae_lens import SAE, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig
from sae_lens.evals import ExplainedVarianceCalculator

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "goldens"
D_IN, D_SAE, N_TOKENS = 16, 64, 48


def random_params(sae: SAE, gen: torch.Generator) -> None:
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) * 0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=gen) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.2)
        sae.b_dec.copy_(torch.randn(D_IN, generator=gen) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=gen) * 0.8)


def metrics(x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> dict:
    """The per-batch expressions of sae_lens.evals.get_sparsity_and_variance_metrics."""
    x, x_hat, acts = x.double(), x_hat.double(), acts.double()
    l2_in = torch.norm(x, dim=-1)
    l2_out = torch.norm(x_hat, dim=-1)
    l2_in_div = l2_in.clone()
    l2_in_div[torch.abs(l2_in_div) < 0.0001] = 1
    rss = (x - x_hat).pow(2).sum(dim=-1)
    batched_var = (x - x.mean(dim=0)).pow(2).sum(dim=-1)
    ev = ExplainedVarianceCalculator()
    ev.add_batch(sae_output=x_hat, hidden_acts=x)
    cos = ((x / torch.norm(x, dim=-1, keepdim=True)) * (x_hat / torch.norm(x_hat, dim=-1, keepdim=True))).sum(-1)
    density = (acts != 0).double().mean(dim=0)
    return {
        "l0": (acts != 0).sum(dim=-1).double().mean().item(),
        "l1": acts.abs().sum(dim=-1).mean().item(),
        "mse": rss.mean().item(),
        "explained_variance": ev.compute(),
        "explained_variance_legacy": (1 - rss / batched_var).mean().item(),
        "explained_variance_about_zero": 1 - (rss.sum() / x.pow(2).sum()).item(),
        "cossim": cos.mean().item(),
        "l2_norm_in": l2_in.mean().item(),
        "l2_norm_out": l2_out.mean().item(),
        "l2_ratio": (l2_out / l2_in_div).mean().item(),
        "relative_reconstruction_bias": ((l2_out**2).mean() / (x * x_hat).sum(-1).mean()).item(),
        "dead_latents": int((density == 0).sum().item()),
        "dense_latents": int((density > 0.1).sum().item()),
        "feature_density": density.tolist(),
    }


def write_case(name: str, sae: SAE, x: torch.Tensor, sparsity: torch.Tensor | None = None,
               weights_dtype: torch.dtype | None = None) -> None:
    case = ROOT / name
    shutil.rmtree(case, ignore_errors=True)
    (case / "sae").mkdir(parents=True)
    sae.save_model(case / "sae")
    if weights_dtype is not None:  # store the weights in another dtype, cfg still float32
        sd = {k: v.to(weights_dtype).contiguous() for k, v in sae.state_dict().items()}
        save_file(sd, case / "sae" / "sae_weights.safetensors")
    if sparsity is not None:
        save_file({"sparsity": sparsity}, case / "sae" / "sparsity.safetensors")
    acts = write_saelens_outputs(case, x, dtype="float32")
    print(f"{name}: L0 {(acts != 0).sum(-1).float().mean():.2f}")


def write_saelens_outputs(case: pathlib.Path, x: torch.Tensor, **load_kwargs) -> torch.Tensor:
    """Loads case/sae with SAELens's own loader (so the golden covers loading too), encodes and
    decodes x, and writes x, the codes, the reconstruction and the metrics."""
    loaded = SAE.load_from_disk(case / "sae", **load_kwargs)
    with torch.no_grad():
        acts = loaded.encode(x)
        out = loaded.decode(acts)
    np.save(case / "x.npy", x.numpy())
    np.save(case / "feature_acts.npy", acts.numpy())
    np.save(case / "sae_out.npy", out.numpy())
    (case / "metrics.json").write_text(json.dumps(metrics(x, out, acts), indent=1))
    (case / "loaded_cfg.json").write_text(json.dumps(loaded.cfg.to_dict(), default=str))
    return acts


def write_pre6_case(name: str, flat_cfg: dict, gen: torch.Generator, x: torch.Tensor) -> None:
    """A pre-6.0 flat cfg.json (as SAELens 3–5 wrote them) with random weights."""
    case = ROOT / name
    shutil.rmtree(case, ignore_errors=True)
    (case / "sae").mkdir(parents=True)
    sd = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.2,
        "b_dec": torch.randn(D_IN, generator=gen) * 0.1,
    }
    save_file(sd, case / "sae" / "sae_weights.safetensors")
    (case / "sae" / "cfg.json").write_text(json.dumps(flat_cfg))
    write_saelens_outputs(case, x)
    print(f"{name}: architecture {json.loads((case / 'loaded_cfg.json').read_text())['architecture']}")


def write_training_case(name: str, gen: torch.Generator, rescale: bool, per_level_aux: bool) -> None:
    """One step of SAELens's MatryoshkaBatchTopKTrainingSAE: losses, codes, gradients, the
    clipped Adam update the SAELens trainer makes, the threshold update, and the JumpReLU SAE
    that save_inference_model writes."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    d_in, d_sae, batch = 16, 64, 24
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=4, matryoshka_widths=[8, 24, 64], rescale_acts_by_decoder_norm=rescale,
        use_matryoshka_aux_loss=per_level_aux, aux_loss_coefficient=1.0, decoder_init_norm=0.1)
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) * 0.4)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) * 0.3)
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.2)
        sae.topk_threshold.fill_(0.05)
    x = torch.randn(batch, d_in, generator=gen) + 0.3
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[1::3] = True
    case = ROOT / name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    before = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    save_file({k: v.contiguous() for k, v in before.items()} | {"x": x, "dead": dead.to(torch.uint8)},
              case / "inputs.safetensors")

    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    grads = {f"grad_{k}": p.grad.detach().clone() for k, p in sae.named_parameters()}
    # What SAELens's trainer does next: clip the global gradient norm to 1, one Adam step.
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.999))
    opt.step()
    after = {f"after_{k}": v.detach().clone() for k, v in sae.state_dict().items() if k != "topk_threshold"}
    losses = {k: float(v) for k, v in out.losses.items()}
    losses["loss"] = float(out.loss)
    losses["topk_threshold"] = float(sae.topk_threshold)
    (case / "losses.json").write_text(json.dumps(losses, indent=1))
    save_file({"feature_acts": out.feature_acts.detach().contiguous(), **grads, **after},
              case / "outputs.safetensors")
    sae.save_inference_model(case / "inference")
    print(f"{name}: losses {losses}")


def main() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    meta = {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post", "context_size": 128,
            "prepend_bos": True, "dataset_path": "none", "neuronpedia_id": None}

    def inputs() -> torch.Tensor:  # activations with a non-zero mean, like a residual stream
        return torch.randn(N_TOKENS, D_IN, generator=gen) * 1.5 + torch.linspace(-1, 1, D_IN)

    cases = [
        ("standard", StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=sae_lens.saes.sae.SAEMetadata(**meta))),
        ("standard_no_bdec_norm", StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False,
                                                    normalize_activations="constant_norm_rescale")),
        ("standard_layer_norm", StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm")),
        ("topk", TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, metadata=sae_lens.saes.sae.SAEMetadata(**meta))),
        ("topk_rescale", TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True)),
        ("jumprelu", JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=sae_lens.saes.sae.SAEMetadata(**meta))),
    ]
    for name, cfg in cases:
        sae = SAE.from_dict(cfg.to_dict())
        random_params(sae, gen)
        sparsity = torch.log10(torch.rand(D_SAE, generator=gen) + 1e-10) if name == "jumprelu" else None
        write_case(name, sae, inputs(), sparsity=sparsity)
    # bf16-stored weights with an f32 config: SAELens converts on load and computes in f32.
    sae = SAE.from_dict(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE).to_dict())
    random_params(sae, gen)
    write_case("jumprelu_bf16_weights", sae, inputs(), weights_dtype=torch.bfloat16)

    write_pre6_case("pre6_standard", {
        "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
        "hook_point_head_index": None, "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32",
        "device": "cpu", "context_size": 128, "dataset_path": "Skylion007/openwebtext",
        "activation_fn_str": "relu", "apply_b_dec_to_input": True, "normalize_activations": False,
        "sae_lens_training_version": "3.5.0", "some_field_sae_lens_drops": [1, 2, 3],
    }, gen, inputs())
    write_pre6_case("pre6_topk", {
        "model_name": "gpt2-small", "hook_name": "blocks.4.hook_resid_post", "hook_layer": 4,
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}, "apply_b_dec_to_input": False,
        "normalize_activations": "none", "sae_lens_version": "5.3.0",
    }, gen, inputs())

    write_training_case("train_matryoshka", gen, rescale=False, per_level_aux=False)
    write_training_case("train_matryoshka_rescale_levelaux", gen, rescale=True, per_level_aux=True)

    # The reference safetensors writer on fixed tensors of several dtypes.
    st = ROOT / "safetensors"
    st.mkdir(exist_ok=True)
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
        "b": torch.arange(5, dtype=torch.bfloat16) / 2,
        "h": torch.arange(3, dtype=torch.float16) - 1,
        "idx": torch.arange(4, dtype=torch.int64) * 3,
        "i32": torch.arange(2, dtype=torch.int32) - 7,
        "a_scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    save_file(tensors, st / "mixed.safetensors", metadata={"format": "pt"})
    print("safetensors/mixed.safetensors written")


if __name__ == "__main__":
    main()
