// What every benchmark prints first: the command line, the machine, its vector extensions, the
// thread count and the machine's measured peaks, so that a figure can be read on another machine
// as a share of what this one can do.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/clock.h"
#include "ops/cpu_kernels.h"
#include "ops/gemm.h"
#include "ops/gemm_bf16.h"

namespace sae::bench {

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

// The vector-extension flags the CPU reports (what a figure from this machine depends on).
inline std::string cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) {
      std::istringstream words(line.substr(line.find(':') + 1));
      std::string w, out;
      while (words >> w)
        if (w.rfind("avx", 0) == 0 || w == "fma" || w.rfind("amx", 0) == 0 || w == "f16c")
          out += (out.empty() ? "" : " ") + w;
      return out;
    }
  return "unknown";
}

// The machine's peaks, measured in the same run as the figures they scale, with the threads the
// benchmark uses: sgemm GFLOP/s (4096^3, best of 3) and copy GB/s (bytes read + written, 256 MB
// arrays, best of 3: the STREAM copy kernel).
struct MachinePeak {
  double sgemm_gflops = 0, copy_gbs = 0;
  double gemm_share(double gflops) const { return 100.0 * gflops / sgemm_gflops; }
  double copy_share(double gbs) const { return 100.0 * gbs / copy_gbs; }
};

inline MachinePeak measure_peak() {
  MachinePeak p;
  const int64_t n = 4096;
  std::vector<float> a(size_t(n * n), 1.0f), b(size_t(n * n), 0.5f), c(size_t(n * n));
  for (int r = 0; r < 4; ++r) {  // the first is a warm-up
    const double t0 = now_seconds();
    ops::gemm(ops::Trans::No, ops::Trans::No, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f,
              c.data(), n);
    const double s = now_seconds() - t0;
    if (r > 0) p.sgemm_gflops = std::max(p.sgemm_gflops, 2.0 * double(n * n * n) / s * 1e-9);
  }
  const size_t m = size_t(64) << 20;
  std::vector<float> x(m, 1.0f), y(m, 0.0f);
  const int threads = ops::num_threads();
  for (int r = 0; r < 4; ++r) {
    const double t0 = now_seconds();
    float* dst = y.data();
    const float* src = x.data();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (size_t i = 0; i < m; ++i) dst[i] = src[i];
    const double s = now_seconds() - t0;
    if (r > 0) p.copy_gbs = std::max(p.copy_gbs, 2.0 * double(m) * 4.0 / s * 1e-9);
  }
  return p;
}

// Prints the command and the machine (model, flags, threads).
inline void print_header(int argc, char** argv) {
  std::printf("command:");
  for (int i = 0; i < argc; ++i) std::printf(" %s", argv[i]);
  std::printf(
      "\nmachine: %s, %d threads (OpenMP/BLAS)\ncpu flags: %s\ncpu kernels: %s\nbf16 matmuls: "
      "%s\n",
      cpu_model().c_str(), ops::num_threads(), cpu_flags().c_str(),
      ops::cpu_kernels_summary().c_str(), ops::bf16_gemm_path().c_str());
  // Start-up settings the sae CLI gives itself (cli/main.cpp); a benchmark has what it was given.
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  std::printf("environment: OMP_WAIT_POLICY=%s GLIBC_TUNABLES=%s\n", wait ? wait : "(unset)",
              tunables ? tunables : "(unset)");
}

// Measures and prints the machine's peaks (CPU benchmarks, after print_header).
inline MachinePeak print_peak() {
  const MachinePeak p = measure_peak();
  std::printf("peak (measured now, these threads): sgemm %.1f GFLOP/s, copy %.1f GB/s\n",
              p.sgemm_gflops, p.copy_gbs);
  return p;
}

}  // namespace sae::bench
