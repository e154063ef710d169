// How much of the language model's next-token loss an SAE keeps when it replaces a hook's
// activation (SAELens's CE-loss score and KL score).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "sae/device_sae.h"
#include "sae/sae.h"

namespace sae {

struct LmScore {
  int64_t n_predictions = 0;
  double ce_clean = 0, ce_sae = 0, ce_zero = 0;
  double ce_loss_score = 0;  // (ce_zero - ce_sae) / (ce_zero - ce_clean)
  double kl_sae = 0, kl_zero = 0;
  double kl_score = 0;  // (kl_zero - kl_sae) / kl_zero
  nlohmann::ordered_json to_json() const;
};

// Mean next-token cross-entropy (nats) over every prediction of every prompt.
double lm_loss(const model::Gemma2& m, const std::vector<std::vector<int32_t>>& prompts,
               int64_t* n_predictions = nullptr);
double lm_loss(model::DeviceGemma2& m, const std::vector<std::vector<int32_t>>& prompts,
               int64_t* n_predictions = nullptr);

// Three forwards per prompt: clean; the hook's activation replaced by the SAE's reconstruction;
// replaced by zeros. BOS (position 0) is never replaced, and losses average the predictions
// made at positions 1..T-2 (those the replacement can change).
LmScore lm_score(const model::Gemma2& m, const Sae& sae, model::HookPoint point, int64_t layer,
                 const std::vector<std::vector<int32_t>>& prompts);
// The same with the forward on the GPU and the SAE's encode and decode there (DeviceSae).
LmScore lm_score(model::DeviceGemma2& m, DeviceSae& sae, model::HookPoint point, int64_t layer,
                 const std::vector<std::vector<int32_t>>& prompts);

}  // namespace sae
