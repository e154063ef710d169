// sae eval <sae> <acts>: L0, explained variance, MSE, cosine, norms, dead/dense latents.
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <tuple>

#include "acts_file.h"
#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "eval/lm_score.h"
#include "eval/metrics.h"
#include "model/activations.h"
#include "model/checkpoint.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "prompts.h"
#include "sae/device_sae.h"
#include "sae/load.h"

namespace sae::cli {

Runner add_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Evaluate an SAE on activations (.npy/.safetensors)");
  struct Opts {
    std::string ref, acts, tensor, model, text_file;
    std::vector<std::string> texts;
    bool json = false, density = false;
    int64_t batch = 4096;
    double dense_threshold = 0.1;
    std::string device = "cpu", precision = "fp32";
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("sae", o->ref, "SAE folder or release:sae_id")->required();
  cmd->add_option("acts", o->acts, "Activations file [tokens, d_in] (or use --model)");
  cmd->add_option(
      "--model", o->model,
      "Gemma-2 folder: adds the CE-loss and KL scores at the SAE's hook (and, without an "
      "activations file, takes the activations from the model)");
  cmd->add_option("--text-file", o->text_file, "Prompts for --model, one per line");
  cmd->add_option("--text", o->texts, "A prompt for --model (repeatable)");
  cmd->add_option("--tensor", o->tensor, "Tensor name inside a .safetensors activations file");
  cmd->add_option("--batch-size", o->batch,
                  "Tokens per batch; the legacy explained variance uses each batch's mean")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dense-threshold", o->dense_threshold,
                  "A latent firing on more than this fraction of tokens counts as dense");
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->add_flag("--density", o->density, "Include per-latent firing frequency in the JSON");
  cmd->add_option("--device", o->device, "cpu or cuda (encode and decode; metrics on the host)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", o->precision, "On cuda, the encoder GEMM: fp32, tf32 or bf16")
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}));
  return [=] {
    if (o->device == "cpu") require_cpu_precision(o->precision, "eval", "--device cuda");
    LoadedSae l = load_sae_ref(o->ref);
    const Sae& s = l.sae;
    if (o->acts.empty() && o->model.empty())
      fail("eval", "acts", "give an activations file or --model");
    Activations a;
    const bool cuda = o->device == "cuda";
    if (cuda) require_device(Device::Cuda);  // before loading anything
    std::unique_ptr<model::Gemma2> lm;
    std::unique_ptr<model::DeviceGemma2> dlm;  // the model on the GPU (--model --device cuda)
    std::vector<std::vector<int32_t>> prompts;
    model::HookPoint point{};
    int64_t layer = 0;
    if (!o->model.empty()) {
      const std::string hook = s.cfg.metadata_string("hook_name");
      if (hook.empty())
        fail(l.folder + "/cfg.json", "metadata.hook_name", "missing: cannot tell where to splice");
      std::tie(point, layer) = model::parse_hook_name(hook);
      // On the GPU the model runs in bf16 when the SAE does, else in fp32 (tf32: fp32).
      const std::string model_precision = o->precision == "bf16" ? "bf16" : "fp32";
      const std::string model_dir = model::resolve_checkpoint(o->model).folder;
      lm = std::make_unique<model::Gemma2>(
          model::Gemma2::load(model_dir, {.keep_bf16 = cuda && model_precision == "bf16"}));
      if (cuda) dlm = std::make_unique<model::DeviceGemma2>(*lm, model_precision);
      prompts = tokenize_prompts(model_dir, read_prompts(o->texts, o->text_file));
    }
    if (!o->acts.empty()) {
      a = read_activations(o->acts, o->tensor);
    } else if (dlm) {  // the hook's activations on the prompts, BOS excluded
      a.d = lm->cfg.hidden_size;
      const auto rows = model::collect_activations(*dlm, prompts, point, {layer})[0];
      int64_t r = 0;
      for (const auto& ids : prompts) {
        a.data.insert(a.data.end(), rows.begin() + (r + 1) * a.d,
                      rows.begin() + (r + int64_t(ids.size())) * a.d);
        r += int64_t(ids.size());
      }
      a.n = int64_t(a.data.size()) / a.d;
    } else {  // the hook's activations on the prompts, BOS excluded
      a.d = lm->cfg.hidden_size;
      for (const auto& ids : prompts)
        lm->forward(ids, layer, [&](model::HookPoint p, int64_t ll, float* act, int64_t n) {
          if (p == point && ll == layer) a.data.insert(a.data.end(), act + a.d, act + n * a.d);
        });
      a.n = int64_t(a.data.size()) / a.d;
    }
    if (a.d != s.cfg.d_in)
      fail(o->acts.empty() ? o->model : o->acts, "shape",
           cat("activations have d_in ", a.d, " but the SAE expects ", s.cfg.d_in));
    if (a.n == 0) fail(o->acts, "shape", "holds no tokens");
    std::unique_ptr<DeviceSae> dev;
    if (cuda) dev = std::make_unique<DeviceSae>(s, o->precision);
    Metrics m = dev ? evaluate_in_batches(*dev, a.data, a.n, o->batch, o->dense_threshold)
                    : evaluate_in_batches(s, a.data, a.n, o->batch, o->dense_threshold);
    std::optional<LmScore> score;
    if (dlm)
      score = lm_score(*dlm, *dev, point, layer, prompts);
    else if (lm)
      score = lm_score(*lm, s, point, layer, prompts);
    if (o->json) {
      auto j = m.to_json(o->density);
      if (score) j["lm_score"] = score->to_json();
      std::cout << j.dump(2) << "\n";
      return 0;
    }
    if (score)
      std::printf(
          "CE loss: clean %.5f, with SAE %.5f, zero-ablated %.5f -> CE-loss score %.5f\n"
          "KL: with SAE %.5f, zero-ablated %.5f -> KL score %.5f  (%lld predictions)\n",
          score->ce_clean, score->ce_sae, score->ce_zero, score->ce_loss_score, score->kl_sae,
          score->kl_zero, score->kl_score, (long long)score->n_predictions);
    std::printf("tokens                        %lld\n", (long long)m.n_tokens);
    std::printf("L0                            %.4f\n", m.l0);
    std::printf("explained variance            %.6f\n", m.explained_variance);
    std::printf("explained variance (legacy)   %.6f   (per-token, batch mean, batch %lld)\n",
                m.explained_variance_legacy, (long long)o->batch);
    std::printf("explained variance (about 0)  %.6f\n", m.explained_variance_about_zero);
    std::printf("MSE (sum over d_in)           %.6g\n", m.mse);
    std::printf("cosine(x, x_hat)              %.6f\n", m.cossim);
    std::printf("||x_hat|| / ||x||             %.6f\n", m.l2_ratio);
    std::printf("relative reconstruction bias  %.6f\n", m.relative_reconstruction_bias);
    std::printf("dead latents                  %lld / %lld\n", (long long)m.dead_latents,
                (long long)s.cfg.d_sae);
    std::printf("dense latents (> %.3g)         %lld\n", m.dense_threshold,
                (long long)m.dense_latents);
    std::printf("log10 firing frequency histogram (live latents):\n");
    for (int b = 0; b < 10; ++b)
      std::printf("  [1e%+d, 1e%+d)  %lld\n", b - 10, b - 9,
                  (long long)m.log_density_histogram[size_t(b)]);
    return 0;
  };
}

}  // namespace sae::cli
