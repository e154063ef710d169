#include "train/global_batch_topk.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

namespace sae::train {

void global_batch_topk(dist::Comm& comm, float* x, int64_t rows, int64_t cols,
                       int64_t global_budget, ops::RowSparse& out, const float* bias,
                       const float* scale, bool write_back) {
  // Whatever the whole batch keeps from these rows is among their own global_budget largest.
  ops::batch_topk(x, rows, cols, global_budget, out, bias, scale, write_back);
  if (comm.size() == 1 || global_budget <= 0) return;

  // Every rank's candidate values, padded with 0 (never selected: only positives count).
  const size_t per = size_t(global_budget), n = size_t(comm.size());
  std::vector<double> mine(per, 0.0), all(per * n);
  std::copy(out.values.begin(), out.values.end(), mine.begin());
  comm.allgather(mine, all);

  // The cut of the whole batch: its global_budget-th largest positive value (every rank
  // computes the same one from the same numbers).
  std::vector<double> positive;
  for (double v : all)
    if (v > 0.0) positive.push_back(v);
  if (int64_t(positive.size()) <= global_budget) return;  // every positive entry is kept
  std::nth_element(positive.begin(), positive.begin() + (global_budget - 1), positive.end(),
                   std::greater<double>());
  const double cut = positive[size_t(global_budget - 1)];
  int64_t above = 0;
  for (double v : positive) above += v > cut;
  // Ties at the cut go to the lowest flat index: lower ranks' rows come first.
  int64_t ties_left = global_budget - above;
  for (int q = 0; q < comm.rank(); ++q)
    for (size_t i = 0; i < per; ++i) ties_left -= all[size_t(q) * per + i] == cut;
  ties_left = std::max<int64_t>(ties_left, 0);

  // Keep this rank's candidates above the cut, and its first ties_left at it (flat order).
  ops::RowSparse kept;
  kept.offsets.assign(size_t(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = out.offsets[size_t(r)]; e < out.offsets[size_t(r + 1)]; ++e) {
      const double v = out.values[size_t(e)];
      if (v > cut || (v == cut && ties_left-- > 0)) {
        kept.cols.push_back(out.cols[size_t(e)]);
        kept.values.push_back(out.values[size_t(e)]);
      }
    }
    kept.offsets[size_t(r + 1)] = int64_t(kept.cols.size());
  }
  out = std::move(kept);
}

void global_batch_topk_columns(dist::Comm& comm, float* x, int64_t rows, int64_t cols,
                               int64_t col_begin, int64_t global_cols, int64_t global_budget,
                               ops::RowSparse& out, const float* bias, const float* scale,
                               bool write_back) {
  // Local flat order is the global one restricted to these columns, so whatever the whole
  // matrix keeps from them is among their own global_budget largest (ties included).
  ops::batch_topk(x, rows, cols, global_budget, out, bias, scale, write_back);
  if (comm.size() == 1 || global_budget <= 0) return;

  const size_t per = size_t(global_budget), n = size_t(comm.size());
  std::vector<double> mine(per, 0.0), all(per * n);
  std::copy(out.values.begin(), out.values.end(), mine.begin());
  comm.allgather(mine, all);
  std::vector<double> positive;
  for (double v : all)
    if (v > 0.0) positive.push_back(v);
  if (int64_t(positive.size()) <= global_budget) return;  // every positive entry is kept
  std::nth_element(positive.begin(), positive.begin() + (global_budget - 1), positive.end(),
                   std::greater<double>());
  const double cut = positive[size_t(global_budget - 1)];
  int64_t above = 0, ties = 0;
  for (double v : positive) above += v > cut, ties += v == cut;
  const int64_t room = global_budget - above;  // ties the cut keeps, >= 1

  // Ties interleave across ranks in flat order: when not all fit, agree on the room lowest
  // flat indices (exact in doubles below 2^53). Every rank sees the same counts, so every rank
  // takes this branch or none.
  double last_tie = std::numeric_limits<double>::infinity();  // flat index of the last kept tie
  auto flat = [&](int64_t r, int64_t e) {
    return double(r) * double(global_cols) + double(col_begin + out.cols[size_t(e)]);
  };
  if (ties > room) {
    std::vector<double> my_ties(per, -1.0), all_ties(per * n);
    size_t i = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = out.offsets[size_t(r)]; e < out.offsets[size_t(r + 1)]; ++e)
        if (double(out.values[size_t(e)]) == cut) my_ties[i++] = flat(r, e);
    comm.allgather(my_ties, all_ties);
    std::vector<double> idx;
    for (double f : all_ties)
      if (f >= 0.0) idx.push_back(f);
    std::nth_element(idx.begin(), idx.begin() + (room - 1), idx.end());
    last_tie = idx[size_t(room - 1)];
  }
  ops::RowSparse kept;
  kept.offsets.assign(size_t(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = out.offsets[size_t(r)]; e < out.offsets[size_t(r + 1)]; ++e) {
      const double v = out.values[size_t(e)];
      if (v > cut || (v == cut && flat(r, e) <= last_tie)) {
        kept.cols.push_back(out.cols[size_t(e)]);
        kept.values.push_back(out.values[size_t(e)]);
      }
    }
    kept.offsets[size_t(r + 1)] = int64_t(kept.cols.size());
  }
  out = std::move(kept);
}

}  // namespace sae::train
