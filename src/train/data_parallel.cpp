#include "train/data_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/clock.h"
#include "core/threads.h"
#include "ops/cpu_kernels.h"

namespace sae::train {

namespace {

// Rows go through the collectives in rounds of at most this many floats per owner: the pack
// buffer stays small beside the gradients (600 MB at the release shape) and MPI's int counts
// are never exceeded.
constexpr size_t kRoundFloats = size_t(8) << 20;

using RowsByOwner = std::vector<std::vector<int32_t>>;

// The round of rows starting at each owner's `first`-th: counts[r] = floats of owner r's rows in
// it (at most round_rows rows of per_row floats). Returns the round's rows over all owners.
size_t round_counts(const RowsByOwner& rows, size_t first, size_t round_rows, size_t per_row,
                    std::vector<int>& counts) {
  size_t total = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const size_t k = rows[r].size() > first ? std::min(round_rows, rows[r].size() - first) : 0;
    counts[r] = int(k * per_row), total += k;
  }
  return total;
}

// Rows rows[first, first + k) of the [*, d] matrices `mats`, side by side per row, to `buf`
// (pack) or back from it (unpack).
void pack_rows(const std::vector<int32_t>& rows, size_t first, size_t k,
               const std::vector<float*>& mats, size_t d, float* buf) {
  const size_t per_row = mats.size() * d;
#pragma omp parallel for schedule(static) num_threads(threads_for(double(k * per_row), 0.2))
  for (size_t q = 0; q < k; ++q)
    for (size_t m = 0; m < mats.size(); ++m)
      std::memcpy(buf + q * per_row + m * d, mats[m] + size_t(rows[first + q]) * d,
                  d * sizeof(float));
}

void unpack_rows(const std::vector<int32_t>& rows, size_t first, size_t k,
                 const std::vector<float*>& mats, size_t d, const float* buf) {
  const size_t per_row = mats.size() * d;
#pragma omp parallel for schedule(static) num_threads(threads_for(double(k * per_row), 0.2))
  for (size_t q = 0; q < k; ++q)
    for (size_t m = 0; m < mats.size(); ++m)
      std::memcpy(mats[m] + size_t(rows[first + q]) * d, buf + q * per_row + m * d,
                  d * sizeof(float));
}

}  // namespace

void reduce_over_ranks(dist::Comm& comm, StepResult& res, Grads& g) {
  const size_t D = g.row_touched.size(), L = res.level_loss.size();

  // The losses are sums over this rank's tokens already divided by the global batch: they add.
  // A rank that selected nothing offers +inf as its smallest selected value.
  const double my_min =
      res.n_active > 0 ? res.min_selected : std::numeric_limits<double>::infinity();
  std::vector<double> sums(L + 4);
  std::copy(res.level_loss.begin(), res.level_loss.end(), sums.begin());
  sums[L] = res.loss, sums[L + 1] = res.aux_loss, sums[L + 2] = res.outer_sq_error;
  sums[L + 3] = double(res.n_active);
  comm.allreduce_sum(sums);
  std::copy(sums.begin(), sums.begin() + ptrdiff_t(L), res.level_loss.begin());
  res.loss = sums[L], res.aux_loss = sums[L + 1], res.outer_sq_error = sums[L + 2];
  res.n_active = int64_t(sums[L + 3]);
  std::vector<double> neg_min = {-my_min};
  comm.allreduce_max(neg_min);
  res.min_selected = res.n_active > 0 ? -neg_min[0] : 0.0;

  // Which latents fired, and which gradient rows are non-zero, on any rank.
  std::vector<uint8_t> masks(2 * D);
  std::copy(res.fired.begin(), res.fired.end(), masks.begin());
  std::copy(g.row_touched.begin(), g.row_touched.end(), masks.begin() + ptrdiff_t(D));
  comm.allreduce_or(masks);
  std::copy(masks.begin(), masks.begin() + ptrdiff_t(D), res.fired.begin());
  // Rows this rank did not touch are zero in g (Grads' invariant): they join the sums as they
  // are, and g.clear() zeroes the whole union next step.
  g.touched.clear();
  for (size_t j = 0; j < D; ++j)
    if (masks[D + j]) g.row_touched[j] = 1, g.touched.push_back(int32_t(j));
}

ShardedUpdate::ShardedUpdate(dist::Comm& comm, int64_t d_sae, int64_t d_in)
    : comm_(comm), d_sae_(d_sae), d_in_(d_in) {}

std::vector<std::vector<int32_t>> ShardedUpdate::by_owner(const std::vector<int32_t>& rows) const {
  std::vector<std::vector<int32_t>> out(size_t(comm_.size()));
  int r = 0;
  for (int32_t j : rows) {
    while (j >= block_begin(r + 1)) ++r;
    out[size_t(r)].push_back(j);
  }
  return out;
}

std::vector<std::vector<int32_t>> ShardedUpdate::all_rows_by_owner() const {
  RowsByOwner all(size_t(comm_.size()));
  for (int r = 0; r < comm_.size(); ++r)
    for (int64_t j = block_begin(r); j < block_begin(r + 1); ++j)
      all[size_t(r)].push_back(int32_t(j));
  return all;
}

void ShardedUpdate::allgather_rows(const RowsByOwner& rows, const std::vector<float*>& mats) {
  const size_t n = size_t(comm_.size()), me = size_t(comm_.rank()), d = size_t(d_in_);
  const size_t per_row = mats.size() * d, round_rows = std::max<size_t>(1, kRoundFloats / per_row);
  std::vector<int> counts(n);
  for (size_t first = 0;; first += round_rows) {
    const size_t total = round_counts(rows, first, round_rows, per_row, counts);
    if (total == 0) break;
    buf_.resize(total * per_row);
    // Segments in rank order; this rank fills its own, the collective fills the others.
    size_t at = 0;
    for (size_t r = 0; r < n; ++r) {
      if (r == me)
        pack_rows(rows[r], first, size_t(counts[r]) / per_row, mats, d, buf_.data() + at);
      at += size_t(counts[r]);
    }
    comm_.allgather(std::span<float>(buf_.data(), total * per_row), counts);
    last_sent_ += int64_t(counts[me]) * int64_t(n - 1);  // to every other rank
    at = 0;
    for (size_t r = 0; r < n; ++r) {
      if (r != me)
        unpack_rows(rows[r], first, size_t(counts[r]) / per_row, mats, d, buf_.data() + at);
      at += size_t(counts[r]);
    }
  }
}

double ShardedUpdate::step(TrainingSae& sae, Optimizer& opt, Grads& g, double lr) {
  const size_t n = size_t(comm_.size()), d = size_t(d_in_), me = size_t(comm_.rank());
  const size_t per_row = 2 * d, round_rows = std::max<size_t>(1, kRoundFloats / per_row);
  last_sent_ = 0;
  double t0 = now_seconds();

  // 1. Each touched gradient row (dW_encT and dW_dec side by side) summed at its owner.
  const RowsByOwner touched = by_owner(g.touched);
  const std::vector<float*> grads = {g.W_encT.data(), g.W_dec.data()};
  std::vector<int> counts(n);
  std::vector<float> mine;
  for (size_t first = 0;; first += round_rows) {
    const size_t total = round_counts(touched, first, round_rows, per_row, counts);
    if (total == 0) break;
    buf_.resize(total * per_row);
    size_t at = 0;
    for (size_t r = 0; r < n; ++r) {
      pack_rows(touched[r], first, size_t(counts[r]) / per_row, grads, d, buf_.data() + at);
      at += size_t(counts[r]);
    }
    mine.resize(size_t(counts[me]));
    comm_.reduce_scatter_sum(std::span<const float>(buf_.data(), total * per_row), mine, counts);
    last_sent_ += int64_t(total * per_row) - counts[me];  // the other owners' rows
    unpack_rows(touched[me], first, size_t(counts[me]) / per_row, grads, d, mine.data());
  }

  // 2. The biases are small: summed on every rank.
  const size_t D = size_t(d_sae_);
  std::vector<float> biases(D + d);
  std::copy(g.b_enc.begin(), g.b_enc.end(), biases.begin());
  std::copy(g.b_dec.begin(), g.b_dec.end(), biases.begin() + ptrdiff_t(D));
  comm_.allreduce_sum(biases);
  last_sent_ += int64_t(biases.size());
  std::copy(biases.begin(), biases.begin() + ptrdiff_t(D), g.b_enc.begin());
  std::copy(biases.begin() + ptrdiff_t(D), biases.end(), g.b_dec.begin());

  // 3. The global norm: each owner's rows, summed over the ranks, plus the biases.
  double rows_sq = 0;
  const auto& own = touched[me];
  const ops::CpuKernels& k = ops::cpu_kernels();
#pragma omp parallel for schedule(static) reduction(+ : rows_sq) \
    num_threads(threads_for(double(own.size() * per_row), 0.1))
  for (size_t q = 0; q < own.size(); ++q) {
    const size_t j = size_t(own[q]);
    rows_sq +=
        k.sum_squares(&g.W_encT[j * d], int64_t(d)) + k.sum_squares(&g.W_dec[j * d], int64_t(d));
  }
  std::vector<double> sq = {rows_sq};
  comm_.allreduce_sum(sq);
  for (float v : g.b_enc) sq[0] += double(v) * v;
  for (float v : g.b_dec) sq[0] += double(v) * v;
  const double norm = std::sqrt(sq[0]);

  double t1 = now_seconds();
  times.reduce_scatter += t1 - t0;

  // 4. Adam on the owned rows (every rank steps the biases alike).
  opt.apply(sae, g, lr, norm, block_begin(int(me)), block_begin(int(me) + 1));
  t0 = now_seconds();
  times.adam += t0 - t1;

  // 5. The updated rows to every rank: the touched ones, or with momentum every row (a row
  // with no gradient still moves by its first moment).
  allgather_rows(opt.has_first_moment() ? all_rows_by_owner() : touched,
                 {sae.W_encT.data(), sae.W_dec.data()});
  times.allgather += now_seconds() - t0;
  return norm;
}

void ShardedUpdate::gather_moments(Optimizer& opt) {
  std::vector<float*> mats = {opt.v_W_encT.data(), opt.v_W_dec.data()};
  if (opt.has_first_moment())
    mats.push_back(opt.m_W_encT.data()), mats.push_back(opt.m_W_dec.data());
  const int64_t sent = last_sent_;  // (the step's figure, not the checkpoint's)
  allgather_rows(all_rows_by_owner(), mats);
  last_sent_ = sent;
}

}  // namespace sae::train
