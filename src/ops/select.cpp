#include "ops/select.h"

#include <algorithm>
#include <numeric>
#include <utility>
#include <vector>

#include "core/threads.h"

namespace sae::ops {

namespace {
// "a ranks above b": larger value, or equal value and lower index.
inline bool ranks_above(float va, int32_t ia, float vb, int32_t ib) {
  return va > vb || (va == vb && ia < ib);
}
}  // namespace

void topk_rows(const float* x, int64_t rows, int64_t cols, int64_t k, int32_t* indices,
               float* values) {
  if (k <= 0) return;
#pragma omp parallel num_threads(threads_for(double(rows) * double(cols), 1.0))
  {
    // A min-heap (by rank) of the best k seen so far; the root is the weakest kept entry,
    // so most of a row costs one comparison per element.
    std::vector<std::pair<float, int32_t>> heap(static_cast<size_t>(k));
    auto weaker = [](const auto& a, const auto& b) {  // heap order: weakest at the front
      return ranks_above(a.first, a.second, b.first, b.second);
    };
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * cols;
      for (int64_t j = 0; j < k; ++j) heap[size_t(j)] = {row[j], int32_t(j)};
      std::make_heap(heap.begin(), heap.end(), weaker);
      for (int64_t j = k; j < cols; ++j) {
        const float v = row[j];
        if (v > heap.front().first) {  // equal values lose: lower index already kept
          std::pop_heap(heap.begin(), heap.end(), weaker);
          heap.back() = {v, int32_t(j)};
          std::push_heap(heap.begin(), heap.end(), weaker);
        }
      }
      std::sort(heap.begin(), heap.end(), [](auto& a, auto& b) { return a.second < b.second; });
      for (int64_t j = 0; j < k; ++j) {
        indices[r * k + j] = heap[size_t(j)].second;
        values[r * k + j] = heap[size_t(j)].first;
      }
    }
  }
}

void topk_rows_reference(const float* x, int64_t rows, int64_t cols, int64_t k, int32_t* indices,
                         float* values) {
  std::vector<int32_t> order(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    std::sort(order.begin(), order.begin() + k);
    for (int64_t j = 0; j < k; ++j) {
      indices[r * k + j] = order[size_t(j)];
      values[r * k + j] = row[order[size_t(j)]];
    }
  }
}

}  // namespace sae::ops
