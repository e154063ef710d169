#include "model/activations.h"

#include <algorithm>

#include "core/error.h"

namespace sae::model {

std::vector<std::vector<float>> collect_activations(
    const Gemma2& m, const std::vector<std::vector<int32_t>>& prompts, HookPoint point,
    const std::vector<int64_t>& layers, int64_t batch_tokens) {
  if (layers.empty()) fail("activations", "layers", "give at least one layer");
  const int64_t H = m.cfg.hidden_size;
  std::vector<std::vector<float>> acts(layers.size());
  auto hook = [&](HookPoint p, int64_t l, float* a, int64_t n) {
    auto it = std::find(layers.begin(), layers.end(), l);
    if (p != point || it == layers.end()) return;
    auto& dst = acts[size_t(it - layers.begin())];
    dst.insert(dst.end(), a, a + n * H);
  };
  TokenBatch batch;
  for (size_t i = 0; i < prompts.size(); ++i) {
    batch.add(prompts[i]);
    const bool last = i + 1 == prompts.size();
    if (last || batch.n_tokens() + int64_t(prompts[i + 1].size()) > batch_tokens) {
      m.forward(batch, layers.back(), hook);
      batch = TokenBatch{};
    }
  }
  return acts;
}

}  // namespace sae::model
