#include "ops/batch_topk.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <numeric>

namespace sae::ops {

namespace {

// For positive finite floats the bit pattern orders like the value.
inline uint32_t bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

void emit(const float* x, int64_t rows, int64_t cols, uint32_t cut_bits, float cut_value,
          const std::vector<int64_t>& eq_keep_per_row, RowSparse& out) {
  // Per-row counts, then fill. An entry is kept if its value is above the cut, or equal to it
  // and within that row's share of the tied entries.
  std::vector<int64_t> counts(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    int64_t c = 0;
    for (int64_t j = 0; j < cols; ++j) c += row[j] > 0.0f && bits(row[j]) > cut_bits;
    counts[size_t(r)] = c + eq_keep_per_row[size_t(r)];
  }
  out.offsets.assign(size_t(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r)
    out.offsets[size_t(r + 1)] = out.offsets[size_t(r)] + counts[size_t(r)];
  out.cols.resize(size_t(out.offsets.back()));
  out.values.resize(size_t(out.offsets.back()));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    int64_t e = out.offsets[size_t(r)];
    int64_t eq_left = eq_keep_per_row[size_t(r)];
    for (int64_t j = 0; j < cols; ++j) {
      const float v = row[j];
      if (!(v > 0.0f)) continue;
      const uint32_t b = bits(v);
      if (b > cut_bits || (b == cut_bits && v == cut_value && eq_left-- > 0)) {
        out.cols[size_t(e)] = int32_t(j);
        out.values[size_t(e++)] = v;
      }
    }
  }
}

}  // namespace

void batch_topk(const float* x, int64_t rows, int64_t cols, int64_t budget, RowSparse& out) {
  const int64_t n = rows * cols;
  // Pass 1: histogram of the top 16 bits of every positive value.
  constexpr int kBins = 1 << 16;
  std::vector<int64_t> hist(kBins, 0);
#pragma omp parallel
  {
    std::vector<int64_t> local(kBins, 0);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i)
      if (x[i] > 0.0f) local[bits(x[i]) >> 16]++;
#pragma omp critical
    for (int b = 0; b < kBins; ++b) hist[size_t(b)] += local[size_t(b)];
  }
  int64_t positives = std::accumulate(hist.begin(), hist.end(), int64_t(0));
  std::vector<int64_t> eq_keep(size_t(rows), 0);
  if (budget <= 0 || positives == 0) {
    emit(x, rows, cols, 0xffffffffu, 0.0f, eq_keep, out);
    return;
  }
  if (budget >= positives) {  // everything positive is kept
    emit(x, rows, cols, 0u, 0.0f, eq_keep, out);
    return;
  }
  // The bin holding the budget-th largest value, and how many values sit above it.
  int64_t above = 0;
  int bin = kBins - 1;
  for (; bin >= 0; --bin) {
    if (above + hist[size_t(bin)] >= budget) break;
    above += hist[size_t(bin)];
  }
  const int64_t need_in_bin = budget - above;
  // Pass 2: collect the bin's values, find the exact cut value inside it.
  std::vector<float> in_bin;
  in_bin.reserve(size_t(hist[size_t(bin)]));
  for (int64_t i = 0; i < n; ++i)
    if (x[i] > 0.0f && int(bits(x[i]) >> 16) == bin) in_bin.push_back(x[i]);
  std::nth_element(in_bin.begin(), in_bin.begin() + (need_in_bin - 1), in_bin.end(),
                   std::greater<float>());
  const float cut = in_bin[size_t(need_in_bin - 1)];
  int64_t above_cut_in_bin = 0;
  for (float v : in_bin) above_cut_in_bin += v > cut;
  int64_t eq_needed = need_in_bin - above_cut_in_bin;
  // Ties at the cut go to the lowest flat indices: assign them row by row.
  for (int64_t r = 0; r < rows && eq_needed > 0; ++r) {
    const float* row = x + r * cols;
    int64_t c = 0;
    for (int64_t j = 0; j < cols; ++j) c += row[j] == cut;
    eq_keep[size_t(r)] = std::min(c, eq_needed);
    eq_needed -= eq_keep[size_t(r)];
  }
  // Entries strictly above the cut: bits > bits(cut). Equal ones handled through eq_keep.
  emit(x, rows, cols, bits(cut), cut, eq_keep, out);
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
