// The largest |a - b| over the largest |a|: the relative bound the data-parallel tests use to
// compare a sharded result with the one-process result (no gtest: the MPI ranks use it too).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace sae::test {

inline double max_relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, double(std::fabs(a[i] - b[i]))),
    scale = std::max(scale, double(std::fabs(a[i])));
  return worst / scale;
}

}  // namespace sae::test
