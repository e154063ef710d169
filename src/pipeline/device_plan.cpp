#include "pipeline/device_plan.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "model/gemma2.h"
#include "sae/device_sae.h"
#include "train/device_step.h"

namespace sae::pipeline {

namespace {

std::string gib(int64_t bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f GiB", double(bytes) / double(1 << 30));
  return b;
}

}  // namespace

std::string DeviceReleasePlan::describe() const {
  return cat("model ", gib(model), " + forward ", gib(forward), " + ", n_saes, " SAEs ", gib(saes),
             " + activation store ", host_store > 0 ? "0 (in pinned host memory)" : gib(store),
             " + evaluation ", gib(eval), " = ", gib(total()),
             host_store > 0 ? cat("; activation store ", gib(host_store), " of pinned host memory")
                            : std::string());
}

DeviceReleasePlan plan_device_release(const DevicePlanShape& shape,
                                      const std::vector<int64_t>& layers,
                                      const std::vector<PlannedSae>& saes) {
  DeviceReleasePlan p;
  const model::Gemma2Config& c = shape.model;
  const int64_t d = c.hidden_size;
  if (shape.forward && !layers.empty()) {
    const int64_t last = shape.ce_score ? c.num_layers - 1 : layers.back();
    p.model = model::gemma2_weight_bytes(c, last, shape.bf16_model);
    p.forward = model::device_forward_bytes(c, shape.forward_tokens, shape.bf16_model, false);
    if (shape.ce_score)  // one held-out window at a time, through the logits
      p.forward += shape.context_size * std::min<int64_t>(c.vocab_size, 32768) * 4;
    // the layers' buffers and one spare for the out-of-place shuffle
    (shape.store_on_host ? p.host_store : p.store) =
        int64_t(layers.size() + 1) * shape.store_rows * d * 4;
  }
  // Each SAE's own state; one step scratch shared by all (the largest).
  int64_t widest = 0, scratch = 0, levels = 0, codes = 0;
  for (const PlannedSae& s : saes) {
    if (std::find(layers.begin(), layers.end(), s.layer) == layers.end()) continue;
    const train::TrainConfig& t = s.cfg;
    const auto max_dead = int64_t(double(t.spec.d_sae) * kPlannedDeadShare);
    p.saes += train::DeviceTrainer::planned_state_bytes(t.spec, t.adam, t.precision);
    scratch = std::max(scratch, train::DeviceTrainer::planned_scratch_bytes(t.spec, t.batch_size,
                                                                            t.precision, max_dead));
    widest = std::max(widest, t.spec.d_sae);
    levels = std::max(levels, int64_t(t.spec.widths.size()));
    codes = std::max(codes, int64_t(4 * t.spec.k));
    ++p.n_saes;
  }
  p.saes += scratch;
  // One DeviceSae at a time: each SAE's evaluations during training (its inference SAE in fp32,
  // made on the device from weights folded there first: DeviceTrainer::inference_sae), then
  // the CE-loss score's. Codes planned at 4k per token (JumpReLU codes are not capped; more
  // allocates more). The folded weights: W_enc, W_dec, b_enc, threshold, the decoder norms and
  // their inverses, b_dec.
  if (widest > 0)
    p.eval = planned_device_sae_bytes(d, widest, "fp32", levels, codes) +
             (2 * widest * d + 4 * widest + d) * 4;
  return p;
}

DevicePlanShape place_store(DevicePlanShape shape, const std::string& mode,
                            const std::vector<int64_t>& layers, const std::vector<PlannedSae>& saes,
                            int64_t free_bytes) {
  shape.store_on_host = mode == "host";
  if (mode != "auto" || plan_device_release(shape, layers, saes).total() <= free_bytes)
    return shape;
  shape.store_on_host = true;
  if (plan_device_release(shape, layers, saes).total() <= free_bytes) return shape;
  shape.store_on_host = false;
  return shape;
}

std::vector<int64_t> layers_that_fit(const DevicePlanShape& shape,
                                     const std::vector<int64_t>& layers,
                                     const std::vector<PlannedSae>& saes, int64_t free_bytes) {
  std::vector<int64_t> best;
  for (size_t n = 1; n <= layers.size(); ++n) {
    const std::vector<int64_t> group(layers.begin(), layers.begin() + int64_t(n));
    if (plan_device_release(shape, group, saes).total() > free_bytes) break;
    best = group;
  }
  return best;
}

std::vector<std::vector<int64_t>> layer_groups_that_fit(const DevicePlanShape& shape,
                                                        const std::vector<int64_t>& layers,
                                                        const std::vector<PlannedSae>& saes,
                                                        int64_t free_bytes) {
  std::vector<std::vector<int64_t>> groups;
  std::vector<int64_t> rest = layers;
  while (!rest.empty()) {
    std::vector<int64_t> fit = layers_that_fit(shape, rest, saes, free_bytes);
    if (fit.empty()) return {};
    rest.erase(rest.begin(), rest.begin() + int64_t(fit.size()));
    groups.push_back(std::move(fit));
  }
  return groups;
}

std::string layers_arg(const std::vector<int64_t>& layers) {
  std::string out;
  for (size_t i = 0; i < layers.size();) {
    size_t j = i;
    while (j + 1 < layers.size() && layers[j + 1] == layers[j] + 1) ++j;
    out += (out.empty() ? "" : ",") + std::to_string(layers[i]);
    if (j > i) out += "-" + std::to_string(layers[j]);
    i = j + 1;
  }
  return out;
}

}  // namespace sae::pipeline
