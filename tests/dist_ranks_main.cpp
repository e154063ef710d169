// Run under `mpirun -np N` by test_dist.cpp: each rank checks the collectives against what the
// ranks' inputs make them equal to, and prints "rank R ok". With --fail-rank R, rank R throws
// while the others wait in a barrier: the job must end (run_or_abort), not hang.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "core/error.h"
#include "dist/comm.h"

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
        w.barrier();
        std::printf("rank %d of %d ok (%s)\n", r, n, w.transport().c_str());
        return 0;
      },
      "dist_ranks");
  sae::dist::finalize();
  return rc;
}
