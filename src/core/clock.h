// Wall-clock seconds from a monotonic clock, for progress lines and phase timings.
#pragma once

#include <chrono>

namespace sae {

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace sae
