#include "ops/batch_topk.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <numeric>

namespace sae::ops {

namespace {

// For positive finite floats the bit pattern orders like the value.
inline uint32_t bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

constexpr int kBins = 1 << 16;

}  // namespace

void batch_topk(float* x, int64_t rows, int64_t cols, int64_t budget, RowSparse& out,
                const float* bias, const float* scale) {
  const int n_threads = omp_get_max_threads();
  // Pass 1: affine update and histogram of the top 16 bits of every positive value.
  std::vector<int64_t> hist(kBins, 0);
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<int64_t> local(kBins, 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x + r * cols;
      if (bias && scale) {
        for (int64_t j = 0; j < cols; ++j) row[j] = (row[j] + bias[j]) * scale[j];
      } else if (bias) {
        for (int64_t j = 0; j < cols; ++j) row[j] += bias[j];
      } else if (scale) {
        for (int64_t j = 0; j < cols; ++j) row[j] *= scale[j];
      }
      for (int64_t j = 0; j < cols; ++j)
        if (row[j] > 0.0f) local[bits(row[j]) >> 16]++;
    }
#pragma omp critical
    for (int b = 0; b < kBins; ++b) hist[size_t(b)] += local[size_t(b)];
  }
  out.offsets.assign(size_t(rows + 1), 0);
  out.cols.clear();
  out.values.clear();
  const int64_t positives = std::accumulate(hist.begin(), hist.end(), int64_t(0));
  if (budget <= 0 || positives == 0) return;

  // The bin holding the budget-th largest value (bin 0 when everything positive is kept).
  int bin = kBins - 1;
  if (budget >= positives) {
    bin = 0;
  } else {
    for (int64_t above = 0; bin >= 0; --bin) {
      if (above + hist[size_t(bin)] >= budget) break;
      above += hist[size_t(bin)];
    }
  }
  const uint32_t lo_bits = uint32_t(bin) << 16;

  // Pass 2: per row, the candidates (positive, bits >= the cut bin's lower edge), in column
  // order. Threads own contiguous row ranges, so their blocks concatenate in row order.
  std::vector<int64_t> cand_count(static_cast<size_t>(rows));
  std::vector<std::vector<int32_t>> t_cols(static_cast<size_t>(n_threads));
  std::vector<std::vector<float>> t_vals(static_cast<size_t>(n_threads));
#pragma omp parallel num_threads(n_threads)
  {
    auto& tc = t_cols[size_t(omp_get_thread_num())];
    auto& tv = t_vals[size_t(omp_get_thread_num())];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * cols;
      const size_t before = tc.size();
      for (int64_t j = 0; j < cols; ++j)
        if (row[j] > 0.0f && bits(row[j]) >= lo_bits) tc.push_back(int32_t(j)), tv.push_back(row[j]);
      cand_count[size_t(r)] = int64_t(tc.size() - before);
    }
  }
  std::vector<int32_t> cand_cols;
  std::vector<float> cand_vals;
  for (int t = 0; t < n_threads; ++t) {
    cand_cols.insert(cand_cols.end(), t_cols[size_t(t)].begin(), t_cols[size_t(t)].end());
    cand_vals.insert(cand_vals.end(), t_vals[size_t(t)].begin(), t_vals[size_t(t)].end());
  }
  std::vector<int64_t> cand_start(size_t(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) cand_start[size_t(r + 1)] = cand_start[size_t(r)] + cand_count[size_t(r)];

  // The exact cut: the budget-th largest candidate. Ties at it go to the lowest flat index.
  std::vector<int64_t> keep_eq(static_cast<size_t>(rows), 0);
  float cut = 0.0f;
  bool keep_all = int64_t(cand_vals.size()) <= budget;
  if (!keep_all) {
    std::vector<float> sorted = cand_vals;
    std::nth_element(sorted.begin(), sorted.begin() + (budget - 1), sorted.end(), std::greater<float>());
    cut = sorted[size_t(budget - 1)];
    int64_t above = 0;
    for (float v : cand_vals) above += v > cut;
    int64_t eq_left = budget - above;
    for (int64_t r = 0; r < rows && eq_left > 0; ++r)
      for (int64_t e = cand_start[size_t(r)]; e < cand_start[size_t(r + 1)] && eq_left > 0; ++e)
        if (cand_vals[size_t(e)] == cut) keep_eq[size_t(r)]++, eq_left--;
  }
  // Emit.
  for (int64_t r = 0; r < rows; ++r) {
    int64_t eq = keep_eq[size_t(r)];
    for (int64_t e = cand_start[size_t(r)]; e < cand_start[size_t(r + 1)]; ++e) {
      const float v = cand_vals[size_t(e)];
      if (keep_all || v > cut || (v == cut && eq-- > 0)) {
        out.cols.push_back(cand_cols[size_t(e)]);
        out.values.push_back(v);
      }
    }
    out.offsets[size_t(r + 1)] = int64_t(out.cols.size());
  }
}

void batch_topk_reference(const float* x, int64_t rows, int64_t cols, int64_t budget,
                          RowSparse& out) {
  std::vector<int64_t> order;
  for (int64_t i = 0; i < rows * cols; ++i)
    if (x[i] > 0.0f) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
  if (int64_t(order.size()) > budget) order.resize(size_t(std::max<int64_t>(budget, 0)));
  std::sort(order.begin(), order.end());
  out.offsets.assign(size_t(rows + 1), 0);
  out.cols.clear();
  out.values.clear();
  for (int64_t i : order) {
    out.offsets[size_t(i / cols + 1)]++;
    out.cols.push_back(int32_t(i % cols));
    out.values.push_back(x[i]);
  }
  for (int64_t r = 0; r < rows; ++r) out.offsets[size_t(r + 1)] += out.offsets[size_t(r)];
}

}  // namespace sae::ops
