#include "ops/cuda/gather_rows.h"

namespace sae::cuda {
namespace {

// One thread per float4 (d % 4 == 0 and 16-byte aligned rows) or per float.
template <class V>
__global__ void k_gather_rows(const V* src, const int32_t* rows, int64_t first, int64_t n,
                              int64_t dv, V* dst) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * dv) return;
  const int64_t r = i / dv, c = i % dv;
  const int64_t from = rows ? int64_t(rows[r]) : first + r;
  dst[i] = src[from * dv + c];
}

}  // namespace

void gather_rows(cudaStream_t s, const float* src, const int32_t* rows, int64_t first, int64_t n,
                 int64_t d, float* dst) {
  if (n <= 0 || d <= 0) return;
  const bool vec = d % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const int64_t dv = vec ? d / 4 : d, total = n * dv;
  const unsigned threads = 256, blocks = unsigned((total + threads - 1) / threads);
  if (vec)
    k_gather_rows<<<blocks, threads, 0, s>>>(reinterpret_cast<const float4*>(src), rows, first, n,
                                             dv, reinterpret_cast<float4*>(dst));
  else
    k_gather_rows<<<blocks, threads, 0, s>>>(src, rows, first, n, dv, dst);
  SAE_CUDA_LAUNCHED();
}

}  // namespace sae::cuda
