// The few CPU inner loops that gain from newer vector instructions than the build's baseline
// (x86-64-v3: AVX2 + FMA). Each is compiled once per instruction set from one source
// (cpu_kernels_impl.inc, as ggml builds its CPU variants), and the best set this CPU runs is
// picked once, at first use. SAECPP_CPU=avx2 (or generic) pins a lower set, e.g. to compare
// with a figure from a machine without AVX-512. Threading stays with the callers: these work
// on one row or one span.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sae::ops {

// Adam's per-step constants (ops/adam.h computes them from an AdamStep).
struct AdamCoeffs {
  float beta2;
  float w;          // 1 - beta1, torch's lerp weight for the first moment
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  float eps;
};

struct CpuKernels {
  const char* name;  // "avx512", "avx2" or "generic"

  // Entries of y = (x + bias) * scale (bias, scale may be null) with y > 0 and y >= lo: their
  // columns and values, in column order, into cols/vals (room for n + 16); returns how many.
  // When y_out is not null, y is also written there (may equal x).
  int64_t (*affine_select)(const float* x, const float* bias, const float* scale, int64_t n,
                           float lo, float* y_out, int32_t* cols, float* vals);

  // One Adam update of n elements, torch.optim.Adam's arithmetic: g * grad_scale is the
  // gradient; g null means a zero gradient; m null means beta1 = 0 (the first moment is the
  // gradient itself and is not stored).
  void (*adam)(float* p, const float* g, float* m, float* v, int64_t n, const AdamCoeffs& c,
               float grad_scale);

  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float a, const float* x, float* y, int64_t n);  // y += a x
  // y += a x and returns dot(w, x): one pass over x for the sparse backward.
  float (*dot_axpy)(const float* w, const float* x, float a, float* y, int64_t n);
  double (*sum_squares)(const float* x, int64_t n);

  // Gemma-2's elementwise passes, with a vector tanh / exp (SLEEF) where the set has one:
  // gate = gelu_tanh(gate) * up (GeGLU); x = tanh(x / cap) * cap (logit soft-cap);
  // x = exp(x - shift), returning the sum (softmax).
  void (*gelu_tanh_mul)(float* gate, const float* up, int64_t n);
  void (*soft_cap)(float* x, int64_t n, float cap);
  float (*exp_sum)(float* x, int64_t n, float shift);
};

// The set this process uses: the best one the CPU runs, or SAECPP_CPU's choice.
const CpuKernels& cpu_kernels();

// Every set compiled into this build that this CPU can run (the tests check each).
std::vector<const CpuKernels*> runnable_cpu_kernels();

// For `sae --version` and benchmark headers: "avx512 (this CPU runs: avx512 avx2 generic)".
std::string cpu_kernels_summary();

// Plain references (scalar, double accumulation where it sums).
int64_t affine_select_reference(const float* x, const float* bias, const float* scale, int64_t n,
                                float lo, float* y_out, int32_t* cols, float* vals);
double dot_reference(const float* a, const float* b, int64_t n);

}  // namespace sae::ops
