// BatchTopK selection: keep the `budget` largest positive values of a [rows, cols] matrix
// across the whole batch (so per-row counts vary), without sorting all rows*cols values.
#pragma once

#include <cstdint>
#include <vector>

namespace sae::ops {

// Selected entries in CSR form, each row's columns ascending.
struct RowSparse {
  std::vector<int64_t> offsets;  // rows + 1
  std::vector<int32_t> cols;
  std::vector<float> values;
};

// First applies x[r, c] = (x[r, c] + bias[c]) * scale[c] in place (bias/scale may be null),
// then keeps the `budget` largest strictly positive values (fewer if fewer are positive).
// Among exactly equal values at the cut, lower flat index (row-major) wins.
// Two passes over the matrix: the affine update fused with a 65536-bin histogram of the float
// bits, then a pass collecting the entries at or above the cut's bin; the exact cut is found
// among those few.
void batch_topk(float* x, int64_t rows, int64_t cols, int64_t budget, RowSparse& out,
                const float* bias = nullptr, const float* scale = nullptr);

// Reference: one full sort of all positive values (x is not modified; no affine step).
void batch_topk_reference(const float* x, int64_t rows, int64_t cols, int64_t budget,
                          RowSparse& out);

}  // namespace sae::ops
