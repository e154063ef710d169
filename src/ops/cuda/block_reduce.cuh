// Small device helpers shared by the CUDA kernels: a block-wide sum and a lower bound.
#pragma once

#include <cstdint>

namespace sae::cuda {

// Sum of v over the block (every thread gets it). sh: >= 32 entries of shared memory. Fixed
// order for a fixed block size, so results are reproducible.
template <class T>
__device__ T block_sum(T v, T* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  T s = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) s += sh[w];
    sh[0] = s;
  }
  __syncthreads();
  return sh[0];
}

// The first position in the ascending a[0, n) whose value is >= target.
template <class T>
__device__ int64_t lower_bound(const T* a, int64_t n, T target) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < target)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

}  // namespace sae::cuda
