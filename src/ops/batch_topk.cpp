#include "ops/batch_topk.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "core/threads.h"
#include "ops/cpu_kernels.h"

namespace sae::ops {

void batch_topk(float* x, int64_t rows, int64_t cols, int64_t budget, RowSparse& out,
                const float* bias, const float* scale, bool write_back) {
  const int n_threads = omp_get_max_threads();
  const int team = threads_for(double(rows) * double(cols), 0.5);
  const CpuKernels& k = cpu_kernels();
  out.offsets.assign(size_t(rows + 1), 0);
  out.cols.clear();
  out.values.clear();

  // A lower bound for the cut from 64 rows spread over the batch: the value whose rank in the
  // sample is the expected number of kept entries there, plus a margin of 25% and 4 standard
  // deviations. (64 rows at the release shape: ~2.6k expected entries, 1M sampled values; more
  // rows only made the partial sort of the sample dearer, 12-26 ms at 256 rows.)
  const int64_t stride = std::max<int64_t>(1, rows / 64);
  std::vector<float> sample;
  std::vector<int32_t> sample_cols;
  int64_t sampled_rows = 0;
  for (int64_t r = 0; r < rows; r += stride, ++sampled_rows) {
    const size_t at = sample.size();
    sample.resize(at + size_t(cols + 16));
    sample_cols.resize(size_t(cols + 16));
    const int64_t n = k.affine_select(x + r * cols, bias, scale, cols, 0.0f, nullptr,
                                      sample_cols.data(), sample.data() + at);
    sample.resize(at + size_t(n));
  }
  float bound = 0.0f;  // candidates are the positive entries >= bound
  if (budget > 0) {
    const double expected = double(budget) * double(sampled_rows) / double(rows);
    const int64_t rank = int64_t(std::ceil(expected * 1.25 + 4.0 * std::sqrt(expected) + 16.0));
    if (rank < int64_t(sample.size())) {
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
      bound = sample[size_t(rank)];
    }
  }

  // The pass: affine update in place, candidates per row in column order. Threads own
  // contiguous row ranges, so their blocks concatenate in row order.
  std::vector<int64_t> cand_count(static_cast<size_t>(rows));
  std::vector<std::vector<int32_t>> t_cols(static_cast<size_t>(n_threads));
  std::vector<std::vector<float>> t_vals(static_cast<size_t>(n_threads));
  // transform: apply the affine update (into x when writing back); lo: the candidates' bound.
  auto collect = [&](bool transform, float lo) {
#pragma omp parallel num_threads(team)
    {
      auto& tc = t_cols[size_t(omp_get_thread_num())];
      auto& tv = t_vals[size_t(omp_get_thread_num())];
      tc.clear();
      tv.clear();
      std::vector<int32_t> row_cols(static_cast<size_t>(cols + 16));
      std::vector<float> row_vals(static_cast<size_t>(cols + 16));
      // Without a budget nothing is kept: the pass only writes the affine values back.
      const float keep_lo = budget > 0 ? lo : std::numeric_limits<float>::infinity();
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        float* row = x + r * cols;
        const int64_t n = k.affine_select(
            row, transform ? bias : nullptr, transform ? scale : nullptr, cols, keep_lo,
            transform && write_back ? row : nullptr, row_cols.data(), row_vals.data());
        tc.insert(tc.end(), row_cols.begin(), row_cols.begin() + n);
        tv.insert(tv.end(), row_vals.begin(), row_vals.begin() + n);
        cand_count[size_t(r)] = n;
      }
    }
  };
  collect(true, bound);
  int64_t n_cand = 0;
  for (const auto& v : t_vals) n_cand += int64_t(v.size());
  // The sample misled us: take every positive entry (x already holds the affine values when
  // written back; otherwise apply it again).
  if (n_cand < budget && bound > 0.0f) collect(!write_back, 0.0f);
  if (budget <= 0) return;

  std::vector<int32_t> cand_cols;
  std::vector<float> cand_vals;
  for (int t = 0; t < n_threads; ++t) {
    cand_cols.insert(cand_cols.end(), t_cols[size_t(t)].begin(), t_cols[size_t(t)].end());
    cand_vals.insert(cand_vals.end(), t_vals[size_t(t)].begin(), t_vals[size_t(t)].end());
  }
  std::vector<int64_t> cand_start(size_t(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r)
    cand_start[size_t(r + 1)] = cand_start[size_t(r)] + cand_count[size_t(r)];

  // The exact cut: the budget-th largest candidate. Ties at it go to the lowest flat index.
  std::vector<int64_t> keep_eq(static_cast<size_t>(rows), 0);
  float cut = 0.0f;
  const bool keep_all = int64_t(cand_vals.size()) <= budget;
  if (!keep_all) {
    std::vector<float> sorted = cand_vals;
    std::nth_element(sorted.begin(), sorted.begin() + (budget - 1), sorted.end(),
                     std::greater<float>());
    cut = sorted[size_t(budget - 1)];
    int64_t above = 0;
    for (float v : cand_vals) above += v > cut;
    int64_t eq_left = budget - above;
    for (int64_t r = 0; r < rows && eq_left > 0; ++r)
      for (int64_t e = cand_start[size_t(r)]; e < cand_start[size_t(r + 1)] && eq_left > 0; ++e)
        if (cand_vals[size_t(e)] == cut) keep_eq[size_t(r)]++, eq_left--;
  }
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
