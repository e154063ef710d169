#include "ops/cpu_kernels.h"

#include <cstdlib>
#include <string>

#include "core/error.h"

namespace sae::ops {

namespace kernel_sets {
extern const CpuKernels baseline;
#if SAECPP_HAS_AVX512_SET
extern const CpuKernels avx512;
#endif
}  // namespace kernel_sets

namespace {

bool cpu_runs_avx512() {
#if defined(__x86_64__)
  // libgcc's check includes the OS's support for the registers (XCR0), not only CPUID.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

const CpuKernels& choose() {
  const std::vector<const CpuKernels*> sets = runnable_cpu_kernels();  // best first
  const char* pinned = std::getenv("SAECPP_CPU");
  if (!pinned || !*pinned) return *sets.front();
  std::string names;
  for (const CpuKernels* k : sets) {
    if (std::string(pinned) == k->name) return *k;
    names += std::string(names.empty() ? "" : ", ") + k->name;
  }
  fail(cat("SAECPP_CPU=", pinned,
           " is not a kernel set this build runs on this CPU (runnable: ", names, ")"));
}

}  // namespace

std::vector<const CpuKernels*> runnable_cpu_kernels() {
  std::vector<const CpuKernels*> sets;
#if SAECPP_HAS_AVX512_SET
  // The baseline may itself be AVX-512 (-DSAECPP_NATIVE=ON on such a CPU): then it is the same.
  if (cpu_runs_avx512() && std::string(kernel_sets::baseline.name) != "avx512")
    sets.push_back(&kernel_sets::avx512);
#endif
  sets.push_back(&kernel_sets::baseline);
  return sets;
}

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = choose();
  return chosen;
}

std::string cpu_kernels_summary() {
  std::string runnable;
  for (const CpuKernels* k : runnable_cpu_kernels())
    runnable += std::string(runnable.empty() ? "" : " ") + k->name;
  return cat(cpu_kernels().name, " (this CPU runs: ", runnable, ")");
}

int64_t affine_select_reference(const float* x, const float* bias, const float* scale, int64_t n,
                                float lo, float* y_out, int32_t* cols, float* vals) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    float y = x[j];
    if (bias) y += bias[j];
    if (scale) y *= scale[j];
    if (y_out) y_out[j] = y;
    if (y > 0.0f && y >= lo) cols[count] = int32_t(j), vals[count++] = y;
  }
  return count;
}

double dot_reference(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}

}  // namespace sae::ops
