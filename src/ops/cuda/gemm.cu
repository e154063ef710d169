#include <cuda_bf16.h>

#include "core/error.h"
#include "ops/cuda/gemm.h"

namespace sae::cuda {

Precision parse_precision(const std::string& name, const std::string& where) {
  if (name == "fp32") return Precision::Fp32;
  if (name == "tf32") return Precision::Tf32;
  if (name == "bf16") return Precision::Bf16;
  fail(where, "precision", cat("unknown precision '", name, "' (expected fp32, tf32 or bf16)"));
}

const char* precision_name(Precision p) {
  return p == Precision::Fp32 ? "fp32" : p == Precision::Tf32 ? "tf32" : "bf16";
}

void gemm(const Context& ctx, ops::Trans ta, ops::Trans tb, int64_t M, int64_t N, int64_t K,
          float alpha, Operand A, Operand B, float beta, float* C, int64_t ldc, Precision prec) {
  if (M == 0 || N == 0) return;
  SAE_CHECK(A.bf16 == B.bf16, "mixed operand types");
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const cublasOperation_t opb = tb == ops::Trans::Yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opa = ta == ops::Trans::Yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cudaDataType_t type = A.bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute =
      A.bf16 ? CUBLAS_COMPUTE_32F
             : (prec == Precision::Fp32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32);
  SAE_CUBLAS(cublasGemmEx(ctx.blas(), opb, opa, int(N), int(M), int(K), &alpha, B.data, type,
                          int(B.ld), A.data, type, int(A.ld), &beta, C, CUDA_R_32F, int(ldc),
                          compute, CUBLAS_GEMM_DEFAULT));
}

namespace {
__global__ void k_to_bf16(const float* in, __nv_bfloat16* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}
}  // namespace

void to_bf16(const Context& ctx, const float* in, uint16_t* out, int64_t n) {
  if (n == 0) return;
  const int blocks = int(std::min<int64_t>((n + 255) / 256, 4096));
  k_to_bf16<<<blocks, 256, 0, ctx.stream()>>>(in, reinterpret_cast<__nv_bfloat16*>(out), n);
  SAE_CUDA_LAUNCHED();
}

}  // namespace sae::cuda
