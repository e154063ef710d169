// Row gathers in device memory, for the activation store's buffers (pipeline/device_rows.h):
// dst[i] = src[rows[i]] for i < n, each row `d` floats. rows == nullptr gathers the contiguous
// rows first, first + 1, ... (a move). dst and src must not overlap.
#pragma once

#include <cstdint>

#include "ops/cuda/runtime.h"

namespace sae::cuda {

void gather_rows(cudaStream_t s, const float* src, const int32_t* rows, int64_t first, int64_t n,
                 int64_t d, float* dst);

}  // namespace sae::cuda
