#include "eval/logit_effects.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "ops/gemm.h"

namespace sae::eval {

std::vector<float> unit_decoder_rows(const Sae& sae, int64_t f0, int64_t f1) {
  const int64_t d = sae.cfg.d_in, n = f1 - f0;
  std::vector<float> dirs(size_t(n * d));
  for (int64_t i = 0; i < n; ++i) {
    const float* w = sae.W_dec.data() + (f0 + i) * d;
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += double(w[c]) * w[c];
    const float inv = float(1 / std::max(std::sqrt(ss), 1e-8));
    for (int64_t c = 0; c < d; ++c) dirs[size_t(i * d + c)] = w[c] * inv;
  }
  return dirs;
}

std::vector<LogitEffects> logit_effects(const Sae& sae, const model::Weight& unembed,
                                        const std::vector<uint8_t>& skip, int64_t f0, int64_t f1,
                                        int n_top, int hist_bins) {
  const int64_t d = sae.cfg.d_in, vocab = unembed.rows, n = f1 - f0;
  if (unembed.cols != d)
    fail("logit effects", "d_in",
         cat("the SAE reads ", d, " dimensions and the unembedding has ", unembed.cols));
  if (int64_t(skip.size()) != vocab) fail("logit effects", "skip", "one flag per token expected");
  const std::vector<float> dirs = unit_decoder_rows(sae, f0, f1);
  // [n, vocab] = dirs @ W_U^T, a block of vocabulary rows at a time (bf16 rows upcast per block).
  std::vector<float> logits(size_t(n * vocab)), scratch;
  constexpr int64_t kRows = 8192;
  for (int64_t r0 = 0; r0 < vocab; r0 += kRows) {
    const int64_t r1 = std::min(vocab, r0 + kRows);
    const float* u = unembed.rows_f32(r0, r1, scratch);
    ops::gemm(ops::Trans::No, ops::Trans::Yes, n, r1 - r0, d, 1.0f, dirs.data(), d, u, d, 0.0f,
              logits.data() + r0, vocab);
  }
  return logit_effects_of(logits, n, skip, n_top, hist_bins);
}

std::vector<LogitEffects> logit_effects_of(std::span<const float> logits, int64_t n,
                                           const std::vector<uint8_t>& skip, int n_top,
                                           int hist_bins) {
  const int64_t vocab = int64_t(skip.size());
  if (int64_t(logits.size()) != n * vocab)
    fail("logit effects", "logits", cat("expected ", n, " x ", vocab, " values"));
  std::vector<int32_t> kept;
  for (int64_t v = 0; v < vocab; ++v)
    if (!skip[size_t(v)]) kept.push_back(int32_t(v));
  std::vector<LogitEffects> out(static_cast<size_t>(n));
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < n; ++i) {
    const float* row = logits.data() + i * vocab;
    LogitEffects& e = out[size_t(i)];
    // One pass keeping the k highest and k lowest (sorted; on equal values the lower id first).
    const size_t k = std::min(size_t(n_top), kept.size());
    std::vector<std::pair<float, int32_t>> hi, lo;  // hi descending, lo ascending
    for (int32_t v : kept) {
      const float x = row[v];
      if (hi.size() < k || x > hi.back().first) {
        auto at = std::upper_bound(
            hi.begin(), hi.end(), x,
            [](float a, const std::pair<float, int32_t>& b) { return a > b.first; });
        hi.insert(at, {x, v});
        if (hi.size() > k) hi.pop_back();
      }
      if (lo.size() < k || x < lo.back().first) {
        auto at = std::upper_bound(
            lo.begin(), lo.end(), x,
            [](float a, const std::pair<float, int32_t>& b) { return a < b.first; });
        lo.insert(at, {x, v});
        if (lo.size() > k) lo.pop_back();
      }
    }
    for (const auto& [x, v] : hi) e.top_ids.push_back(v);
    for (const auto& [x, v] : lo) e.bottom_ids.push_back(v);
    for (int32_t v : e.top_ids) e.top_values.push_back(row[v]);
    for (int32_t v : e.bottom_ids) e.bottom_values.push_back(row[v]);
    if (kept.empty()) continue;
    const float min = lo[0].first, max = hi[0].first;
    e.hist_lo = min;
    e.hist_width = std::max(max - min, 1e-12f) / float(hist_bins);
    e.hist.assign(size_t(hist_bins), 0);
    for (int32_t v : kept)
      ++e.hist[size_t(std::clamp(int((row[v] - min) / e.hist_width), 0, hist_bins - 1))];
  }
  return out;
}

}  // namespace sae::eval
