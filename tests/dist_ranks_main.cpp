// Run under `mpirun -np N` by test_dist.cpp: each rank checks the collectives against what the
// ranks' inputs make them equal to, and prints "rank R ok". With --fail-rank R, rank R throws
// while the others wait in a barrier: the job must end (run_or_abort), not hang.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/error.h"
#include "dist/comm.h"
#include "ops/batch_topk.h"
#include "train/global_batch_topk.h"

// BatchTopK of a batch split by rows across the ranks equals the single-process selection on
// the whole batch, rows for rows, with many ties at the cut (values on a coarse grid).
void check_global_batch_topk(sae::dist::Comm& w) {
  const int64_t rows = 16, cols = 64, all_rows = rows * w.size(), budget = 3 * all_rows;
  std::mt19937 rng(1234);  // the same whole batch on every rank
  std::normal_distribution<float> normal;
  std::vector<float> whole(size_t(all_rows * cols)), bias(static_cast<size_t>(cols)),
      scale(static_cast<size_t>(cols));
  for (float& v : whole) v = std::round(normal(rng) * 4.0f) / 4.0f;
  for (float& v : bias) v = std::round(normal(rng) * 2.0f) / 8.0f;
  for (float& v : scale) v = 1.0f + float(rng() % 2);
  sae::ops::RowSparse want, got;
  std::vector<float> copy = whole;
  sae::ops::batch_topk(copy.data(), all_rows, cols, budget, want, bias.data(), scale.data());
  std::vector<float> mine(whole.begin() + w.rank() * rows * cols,
                          whole.begin() + (w.rank() + 1) * rows * cols);
  sae::train::global_batch_topk(w, mine.data(), rows, cols, budget, got, bias.data(), scale.data());
  const int64_t first = w.rank() * rows;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = want.offsets[size_t(first + r)], b = want.offsets[size_t(first + r + 1)];
    SAE_CHECK(got.offsets[size_t(r + 1)] - got.offsets[size_t(r)] == b - a, "row ", r,
              ": selected count");
    for (int64_t e = 0; e < b - a; ++e) {
      SAE_CHECK(got.cols[size_t(got.offsets[size_t(r)] + e)] == want.cols[size_t(a + e)], "row ", r,
                ": column");
      SAE_CHECK(got.values[size_t(got.offsets[size_t(r)] + e)] == want.values[size_t(a + e)],
                "row ", r, ": value");
    }
  }
  int64_t total = got.offsets.back();
  std::vector<double> t = {double(total)};
  w.allreduce_sum(t);
  SAE_CHECK(int64_t(t[0]) == budget, "selected ", t[0], " of a budget of ", budget);
}

int main(int argc, char** argv) {
  int fail_rank = -1;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--fail-rank") == 0) fail_rank = std::atoi(argv[i + 1]);
  sae::dist::init(&argc, &argv);
  const int rc = sae::dist::run_or_abort(
      [&] {
        sae::dist::Comm& w = sae::dist::world();
        const int r = w.rank(), n = w.size();
        if (r == fail_rank) sae::fail(sae::cat("rank ", r, " fails on purpose"));
        if (fail_rank >= 0) {
          w.barrier();  // the failed rank never comes: only abort ends this
          return 0;
        }
        // Sums: rank r contributes r + 1 + i to entry i.
        std::vector<float> f(1000);
        std::vector<double> d(3);
        for (size_t i = 0; i < f.size(); ++i) f[i] = float(r + 1 + int(i));
        for (size_t i = 0; i < d.size(); ++i) d[i] = 0.5 * (r + 1) + double(i);
        w.allreduce_sum(f);
        w.allreduce_sum(d);
        const double ranks_sum = n * (n + 1) / 2.0;
        for (size_t i = 0; i < f.size(); ++i)
          SAE_CHECK(f[i] == float(ranks_sum + n * double(i)), "float sum at ", i, ": ", f[i]);
        for (size_t i = 0; i < d.size(); ++i)
          SAE_CHECK(d[i] == 0.5 * ranks_sum + n * double(i), "double sum at ", i);
        std::vector<double> m = {double(r), -double(r)};
        w.allreduce_max(m);
        SAE_CHECK(m[0] == n - 1 && m[1] == 0, "max");
        const std::vector<double> mine = {double(r), double(10 * r)};
        std::vector<double> all(2 * size_t(n));
        w.allgather(mine, all);
        for (int q = 0; q < n; ++q)
          SAE_CHECK(all[2 * q] == q && all[2 * q + 1] == 10 * q, "allgather from rank ", q);
        std::vector<uint8_t> bytes = {uint8_t(r), uint8_t(r + 1)};
        w.broadcast(bytes, n - 1);
        SAE_CHECK(bytes[0] == n - 1 && bytes[1] == n, "broadcast from the last rank");
        check_global_batch_topk(w);
        w.barrier();
        std::printf("rank %d of %d ok (%s)\n", r, n, w.transport().c_str());
        return 0;
      },
      "dist_ranks");
  sae::dist::finalize();
  return rc;
}
