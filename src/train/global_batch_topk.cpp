#include "train/global_batch_topk.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

namespace sae::train {

namespace {

// The cut of the whole selection, from every rank's candidates (its global_budget largest,
// already in `out`): the global_budget-th largest positive value and how many lie above it and
// at it. Every rank computes the same from the same numbers. nullopt: every positive entry
// of the whole matrix is kept.
struct GlobalCut {
  double value = 0;
  int64_t above = 0, ties = 0;
  std::vector<double> all;  // every rank's candidates, padded with 0, in rank order
};

std::optional<GlobalCut> global_cut(dist::Comm& comm, const ops::RowSparse& out,
                                    int64_t global_budget) {
  const size_t per = size_t(global_budget), n = size_t(comm.size());
  std::vector<double> mine(per, 0.0);  // 0 is never selected: only positives count
  std::copy(out.values.begin(), out.values.end(), mine.begin());
  GlobalCut c;
  c.all.resize(per * n);
  comm.allgather(mine, c.all);
  std::vector<double> positive;
  for (double v : c.all)
    if (v > 0.0) positive.push_back(v);
  if (int64_t(positive.size()) <= global_budget) return std::nullopt;
  std::nth_element(positive.begin(), positive.begin() + (global_budget - 1), positive.end(),
                   std::greater<double>());
  c.value = positive[size_t(global_budget - 1)];
  for (double v : positive) c.above += v > c.value, c.ties += v == c.value;
  return c;
}

// Keeps this rank's entries above the cut, and those at it that keep_tie(row, entry) takes
// (asked in flat order).
template <class KeepTie>
void keep_selected(ops::RowSparse& out, int64_t rows, double cut, KeepTie keep_tie) {
  ops::RowSparse kept;
  kept.offsets.assign(size_t(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = out.offsets[size_t(r)]; e < out.offsets[size_t(r + 1)]; ++e) {
      const double v = out.values[size_t(e)];
      if (v > cut || (v == cut && keep_tie(r, e))) {
        kept.cols.push_back(out.cols[size_t(e)]);
        kept.values.push_back(out.values[size_t(e)]);
      }
    }
    kept.offsets[size_t(r + 1)] = int64_t(kept.cols.size());
  }
  out = std::move(kept);
}

}  // namespace

void global_batch_topk(dist::Comm& comm, float* x, int64_t rows, int64_t cols,
                       int64_t global_budget, ops::RowSparse& out, const float* bias,
                       const float* scale, bool write_back) {
  // Whatever the whole batch keeps from these rows is among their own global_budget largest.
  ops::batch_topk(x, rows, cols, global_budget, out, bias, scale, write_back);
  if (comm.size() == 1 || global_budget <= 0) return;
  const std::optional<GlobalCut> cut = global_cut(comm, out, global_budget);
  if (!cut) return;
  // Ties at the cut go to the lowest flat index: lower ranks' rows come first.
  const size_t per = size_t(global_budget);
  int64_t ties_left = global_budget - cut->above;
  for (int q = 0; q < comm.rank(); ++q)
    for (size_t i = 0; i < per; ++i) ties_left -= cut->all[size_t(q) * per + i] == cut->value;
  ties_left = std::max<int64_t>(ties_left, 0);
  keep_selected(out, rows, cut->value, [&](int64_t, int64_t) { return ties_left-- > 0; });
}

void global_batch_topk_columns(dist::Comm& comm, float* x, int64_t rows, int64_t cols,
                               int64_t col_begin, int64_t global_cols, int64_t global_budget,
                               ops::RowSparse& out, const float* bias, const float* scale,
                               bool write_back) {
  // Local flat order is the global one restricted to these columns, so whatever the whole
  // matrix keeps from them is among their own global_budget largest (ties included).
  ops::batch_topk(x, rows, cols, global_budget, out, bias, scale, write_back);
  if (comm.size() == 1 || global_budget <= 0) return;
  const std::optional<GlobalCut> cut = global_cut(comm, out, global_budget);
  if (!cut) return;
  const int64_t room = global_budget - cut->above;  // ties the cut keeps, >= 1

  // Ties interleave across ranks in flat order: when not all fit, agree on the room lowest
  // flat indices (exact in doubles below 2^53). Every rank sees the same counts, so every rank
  // takes this branch or none.
  double last_tie = std::numeric_limits<double>::infinity();  // flat index of the last kept tie
  auto flat = [&](int64_t r, int64_t e) {
    return double(r) * double(global_cols) + double(col_begin + out.cols[size_t(e)]);
  };
  if (cut->ties > room) {
    const size_t per = size_t(global_budget);
    std::vector<double> my_ties(per, -1.0), all_ties(per * size_t(comm.size()));
    size_t i = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = out.offsets[size_t(r)]; e < out.offsets[size_t(r + 1)]; ++e)
        if (double(out.values[size_t(e)]) == cut->value) my_ties[i++] = flat(r, e);
    comm.allgather(my_ties, all_ties);
    std::vector<double> idx;
    for (double f : all_ties)
      if (f >= 0.0) idx.push_back(f);
    std::nth_element(idx.begin(), idx.begin() + (room - 1), idx.end());
    last_tie = idx[size_t(room - 1)];
  }
  keep_selected(out, rows, cut->value,
                [&](int64_t r, int64_t e) { return flat(r, e) <= last_tie; });
}

}  // namespace sae::train
