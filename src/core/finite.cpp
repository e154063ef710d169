#include "core/finite.h"

#include <cmath>
#include <cstring>

#include "core/error.h"

namespace sae {

int64_t first_non_finite(std::span<const float> x) {
  constexpr uint32_t kExponent = 0x7f800000u;  // all ones: Inf or NaN
  uint32_t any = 0;
  for (float v : x) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    any |= uint32_t((bits & kExponent) == kExponent);
  }
  if (!any) return -1;
  for (size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i])) return int64_t(i);
  return -1;
}

void check_finite(std::span<const float> x, int64_t n, int64_t d, const std::string& where,
                  int64_t first_row) {
  const int64_t i = first_non_finite(x.first(size_t(n * d)));
  if (i < 0) return;
  fail(where, cat("row ", first_row + i / d, ", column ", i % d),
       cat("activation is ", x[size_t(i)], " (NaN/Inf inputs are rejected)"));
}

}  // namespace sae
