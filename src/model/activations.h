// Activations at one hook point for a set of layers, over many prompts, run in packed batches.
#pragma once

#include <cstdint>
#include <vector>

#include "model/device_gemma2.h"
#include "model/gemma2.h"

namespace sae::model {

// Returns one [total tokens, hidden] f32 array per entry of `layers` (sorted, unique), rows in
// prompt order, BOS included. Prompts are packed into forwards of at most `batch_tokens`
// tokens (a longer prompt runs alone).
std::vector<std::vector<float>> collect_activations(
    const Gemma2& m, const std::vector<std::vector<int32_t>>& prompts, HookPoint point,
    const std::vector<int64_t>& layers, int64_t batch_tokens = 4096);
// The same on the GPU: only the requested hooks' activations are copied to the host.
std::vector<std::vector<float>> collect_activations(
    DeviceGemma2& m, const std::vector<std::vector<int32_t>>& prompts, HookPoint point,
    const std::vector<int64_t>& layers, int64_t batch_tokens = 4096);

}  // namespace sae::model
