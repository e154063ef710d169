// Matrix multiply by bf16 weights with bf16 products: y = bf16(x) @ W^T, every product of two
// bf16 values summed in f32 — what a bf16 linear layer computes (transformers in bf16). Where
// the build has oneDNN and the CPU has bf16 dot products (AVX512-BF16, AMX) oneDNN's brgemm
// runs it at about twice the f32 rate; elsewhere x is rounded to bf16 and W upcast into a
// scratch buffer for sgemm: the same products, another summation order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sae::ops {

// x [m, k] f32 (rounded to bf16 here), w [n, k] bf16 (row-major, as stored by Hugging Face),
// y [m, n] f32 with row stride ldy. scratch: the fallback's upcast weights (resized on use).
void gemm_bf16_weights(int64_t m, int64_t n, int64_t k, const float* x, const uint16_t* w, float* y,
                       int64_t ldy, std::vector<float>& scratch);

// The same in double: the reference the fast paths are tested against.
void gemm_bf16_weights_reference(int64_t m, int64_t n, int64_t k, const float* x, const uint16_t* w,
                                 float* y, int64_t ldy);

// out[i] = x[i] rounded to bf16 (round to nearest even), in parallel: the operands of the GEMM
// above, and a bf16 copy of f32 master weights.
void round_to_bf16(const float* x, uint16_t* out, int64_t n);

// Which path gemm_bf16_weights takes on this CPU, e.g. "oneDNN brg:avx512_core_bf16" or
// "sgemm on upcast weights (...)". Decided once, at first use.
std::string bf16_gemm_path();

}  // namespace sae::ops
