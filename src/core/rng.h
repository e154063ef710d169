// Deterministic random numbers: std::mt19937_64 (its sequence is fixed by the standard) with
// our own conversions, so the same seed gives the same bits with any standard library.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

namespace sae {

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}

  uint64_t next_u64() { return engine_(); }
  double uniform() { return double(engine_() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  int64_t below(int64_t n) { return int64_t(engine_() % uint64_t(n)); }  // [0, n), tiny bias ok
  double normal() {  // Box–Muller, one value per call
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

}  // namespace sae
