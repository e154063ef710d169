// Per-row top-k selection over a [rows, cols] matrix, never sorting a whole row.
#pragma once

#include <cstdint>

namespace sae::ops {

// For each row, writes the k largest values and their column indices, ordered by ascending
// column index (so sparse codes are index-sorted). Ties go to the lower column index.
// k must be <= cols. Output arrays are [rows, k].
void topk_rows(const float* x, int64_t rows, int64_t cols, int64_t k, int32_t* indices,
               float* values);

// Reference: a full stable sort of each row.
void topk_rows_reference(const float* x, int64_t rows, int64_t cols, int64_t k, int32_t* indices,
                         float* values);

}  // namespace sae::ops
