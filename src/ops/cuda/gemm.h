// Dense GEMM on the GPU through cuBLAS, with the engine's row-major convention (ops/gemm.h):
// C[M, N] = alpha * op(A) op(B) + beta * C, fp32 accumulate and fp32 C. The operands are fp32 or
// bf16 (a DeviceMatrix names which); Precision picks the arithmetic for fp32 operands.
#pragma once

#include <cstdint>
#include <string>

#include "ops/cuda/runtime.h"
#include "ops/gemm.h"

namespace sae::cuda {

enum class Precision { Fp32, Tf32, Bf16 };
Precision parse_precision(const std::string& name, const std::string& where);
const char* precision_name(Precision p);

struct Operand {
  const void* data;
  bool bf16;  // else fp32
  int64_t ld;
};

void gemm(const Context& ctx, ops::Trans ta, ops::Trans tb, int64_t M, int64_t N, int64_t K,
          float alpha, Operand A, Operand B, float beta, float* C, int64_t ldc, Precision prec);

// out[i] = bf16(in[i]) (round to nearest even), n elements.
void to_bf16(const Context& ctx, const float* in, uint16_t* out, int64_t n);

}  // namespace sae::cuda
