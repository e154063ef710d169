#include "train/latent_gather.h"

#include <algorithm>
#include <span>

namespace sae::train {

std::vector<float> gather_latent_rows(const LatentShard& shard, const std::vector<float>& mine,
                                      int64_t row_len, int64_t max_floats) {
  dist::Comm& comm = *shard.comm;
  const int n = comm.size();
  const bool root = comm.rank() == 0;
  const int64_t most = (shard.width + n - 1) / n;  // the largest block
  // Round r brings rows [r R, (r + 1) R) of every rank's block.
  const int64_t R = std::max<int64_t>(1, max_floats / (int64_t(n) * row_len));
  std::vector<float> all(root ? size_t(shard.width * row_len) : 0), round;
  std::vector<int> counts(static_cast<size_t>(n));
  for (int64_t r0 = 0; r0 < most; r0 += R) {
    int64_t total = 0;
    for (int q = 0; q < n; ++q) {
      const int64_t rows = shard.first(q + 1) - shard.first(q);
      counts[size_t(q)] = int(std::clamp<int64_t>(rows - r0, 0, R) * row_len);
      total += counts[size_t(q)];
    }
    round.resize(root ? size_t(total) : 0);
    const int64_t at_mine = std::min<int64_t>(r0 * row_len, int64_t(mine.size()));
    comm.gather(std::span<const float>(mine.data() + at_mine, size_t(counts[size_t(comm.rank())])),
                round, counts, 0);
    if (!root) continue;
    int64_t at = 0;
    for (int q = 0; q < n; ++q) {
      std::copy_n(round.begin() + at, counts[size_t(q)],
                  all.begin() + (shard.first(q) + r0) * row_len);
      at += counts[size_t(q)];
    }
  }
  return all;
}

}  // namespace sae::train
