#include "ops/batch_topk.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>

#include "core/threads.h"

namespace sae::ops {

void batch_topk(float* x, int64_t rows, int64_t cols, int64_t budget, RowSparse& out,
                const float* bias, const float* scale, bool write_back) {
  const int n_threads = omp_get_max_threads();
  const int team = threads_for(double(rows) * double(cols), 0.5);
  auto affine = [&](float v, int64_t j) {
    if (bias) v += bias[j];
    if (scale) v *= scale[j];
    return v;
  };
  out.offsets.assign(size_t(rows + 1), 0);
  out.cols.clear();
  out.values.clear();

  // A lower bound for the cut from every stride-th row: the value whose rank in the sample is
  // the expected number of kept entries there, plus a margin of 25% and 4 standard deviations.
  const int64_t stride = std::max<int64_t>(1, rows / 256);
  std::vector<float> sample;
  int64_t sampled_rows = 0;
  for (int64_t r = 0; r < rows; r += stride, ++sampled_rows)
    for (int64_t j = 0; j < cols; ++j) {
      const float v = affine(x[r * cols + j], j);
      if (v > 0.0f) sample.push_back(v);
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
  const bool has_affine = bias || scale;
  auto collect = [&](bool transform, float lo) {
#pragma omp parallel num_threads(team)
    {
      auto& tc = t_cols[size_t(omp_get_thread_num())];
      auto& tv = t_vals[size_t(omp_get_thread_num())];
      tc.clear();
      tv.clear();
      std::vector<float> buf(static_cast<size_t>(cols));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        float* row = x + r * cols;
        const float* vals = row;
        if (transform && has_affine) {  // a vectorised affine pass, into x or a scratch row
          float* dst = write_back ? row : buf.data();
          if (bias && scale) {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) dst[j] = (row[j] + bias[j]) * scale[j];
          } else if (bias) {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) dst[j] = row[j] + bias[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) dst[j] = row[j] * scale[j];
          }
          vals = dst;
        }
        const size_t before = tc.size();
        if (budget > 0) {
          if (lo > 0.0f) {
            for (int64_t j = 0; j < cols; ++j)
              if (vals[j] >= lo) tc.push_back(int32_t(j)), tv.push_back(vals[j]);
          } else {
            for (int64_t j = 0; j < cols; ++j)
              if (vals[j] > 0.0f) tc.push_back(int32_t(j)), tv.push_back(vals[j]);
          }
        }
        cand_count[size_t(r)] = int64_t(tc.size() - before);
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
