#include "model/activations.h"

#include <algorithm>
#include <type_traits>

#include "core/error.h"

namespace sae::model {

namespace {

// Packs the prompts into forwards of at most batch_tokens and keeps the requested hooks;
// `copy(dst, act, n)` appends n rows of the hook's activation to dst.
template <class Model, class Copy>
std::vector<std::vector<float>> collect(Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                        HookPoint point, const std::vector<int64_t>& layers,
                                        int64_t batch_tokens, Copy copy) {
  if (layers.empty()) fail("activations", "layers", "give at least one layer");
  std::vector<std::vector<float>> acts(layers.size());
  auto hook = [&](HookPoint p, int64_t l, float* a, int64_t n) {
    auto it = std::find(layers.begin(), layers.end(), l);
    if (p != point || it == layers.end()) return;
    copy(acts[size_t(it - layers.begin())], a, n);
  };
  TokenBatch batch;
  for (size_t i = 0; i < prompts.size(); ++i) {
    batch.add(prompts[i]);
    const bool last = i + 1 == prompts.size();
    if (last || batch.n_tokens() + int64_t(prompts[i + 1].size()) > batch_tokens) {
      if constexpr (std::is_same_v<Model, DeviceGemma2>)
        m.forward(batch, layers.back(), hook, nullptr, /*hook_writes=*/false);
      else
        m.forward(batch, layers.back(), hook);
      batch = TokenBatch{};
    }
  }
  return acts;
}

}  // namespace

std::vector<std::vector<float>> collect_activations(
    const Gemma2& m, const std::vector<std::vector<int32_t>>& prompts, HookPoint point,
    const std::vector<int64_t>& layers, int64_t batch_tokens) {
  const int64_t H = m.cfg.hidden_size;
  return collect(m, prompts, point, layers, batch_tokens,
                 [&](std::vector<float>& dst, const float* a, int64_t n) {
                   dst.insert(dst.end(), a, a + n * H);
                 });
}

std::vector<std::vector<float>> collect_activations(
    DeviceGemma2& m, const std::vector<std::vector<int32_t>>& prompts, HookPoint point,
    const std::vector<int64_t>& layers, int64_t batch_tokens) {
  const int64_t H = m.cfg().hidden_size;
  return collect(m, prompts, point, layers, batch_tokens,
                 [&](std::vector<float>& dst, const float* a, int64_t n) {
                   const std::vector<float> host = m.to_host(a, n * H);
                   dst.insert(dst.end(), host.begin(), host.end());
                 });
}

}  // namespace sae::model
