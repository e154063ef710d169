#include "train/data_parallel.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "core/threads.h"

namespace sae::train {

namespace {

// Gradient rows go through the all-reduce in pieces of about 32 MB: the pack buffer stays small
// beside the gradients themselves (600 MB at the release shape).
constexpr size_t kPieceFloats = size_t(8) << 20;

}  // namespace

void reduce_over_ranks(dist::Comm& comm, StepResult& res, Grads& g) {
  const size_t D = g.row_touched.size(), d = g.b_dec.size(), L = res.level_loss.size();

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
  // The union, in latent order (the same list on every rank). Rows this rank did not touch are
  // zero in g (Grads' invariant), so they join the sum as they are.
  g.touched.clear();
  for (size_t j = 0; j < D; ++j)
    if (masks[D + j]) g.row_touched[j] = 1, g.touched.push_back(int32_t(j));

  // The touched rows of dW_encT and dW_dec, packed, summed in pieces; then the biases.
  const size_t rows_per_piece = std::max<size_t>(1, kPieceFloats / (2 * d));
  std::vector<float> buf(std::min(g.touched.size(), rows_per_piece) * 2 * d);
  for (size_t first = 0; first < g.touched.size(); first += rows_per_piece) {
    const size_t n = std::min(rows_per_piece, g.touched.size() - first);
    const int team = threads_for(double(n) * double(2 * d), 0.2);
#pragma omp parallel for schedule(static) num_threads(team)
    for (size_t q = 0; q < n; ++q) {
      const size_t j = size_t(g.touched[first + q]);
      std::memcpy(&buf[2 * q * d], &g.W_encT[j * d], d * sizeof(float));
      std::memcpy(&buf[(2 * q + 1) * d], &g.W_dec[j * d], d * sizeof(float));
    }
    comm.allreduce_sum(std::span<float>(buf.data(), 2 * n * d));
#pragma omp parallel for schedule(static) num_threads(team)
    for (size_t q = 0; q < n; ++q) {
      const size_t j = size_t(g.touched[first + q]);
      std::memcpy(&g.W_encT[j * d], &buf[2 * q * d], d * sizeof(float));
      std::memcpy(&g.W_dec[j * d], &buf[(2 * q + 1) * d], d * sizeof(float));
    }
  }
  std::vector<float> biases(D + d);
  std::copy(g.b_enc.begin(), g.b_enc.end(), biases.begin());
  std::copy(g.b_dec.begin(), g.b_dec.end(), biases.begin() + ptrdiff_t(D));
  comm.allreduce_sum(biases);
  std::copy(biases.begin(), biases.begin() + ptrdiff_t(D), g.b_enc.begin());
  std::copy(biases.begin() + ptrdiff_t(D), biases.end(), g.b_dec.begin());
}

int64_t exchanged_gradient_bytes(const Grads& g) {
  const int64_t d = int64_t(g.b_dec.size()), D = int64_t(g.b_enc.size());
  return (int64_t(g.touched.size()) * 2 * d + D + d) * int64_t(sizeof(float));
}

}  // namespace sae::train
