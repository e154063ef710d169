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
// One pass over the matrix: a lower bound for the cut is estimated from a sample of rows
// (with a safety margin), the full pass applies the affine update and collects the entries
// above that bound, and the exact cut is found among those few. If the bound was too high
// (fewer candidates than the budget), a second pass collects every positive entry.
// With write_back = false the affine update is only used for the selection and x is left as
// it was (saves writing the whole matrix when the caller needs only the selected values).
void batch_topk(float* x, int64_t rows, int64_t cols, int64_t budget, RowSparse& out,
                const float* bias = nullptr, const float* scale = nullptr, bool write_back = true);

// Reference: one full sort of all positive values (x is not modified; no affine step).
void batch_topk_reference(const float* x, int64_t rows, int64_t cols, int64_t budget,
                          RowSparse& out);

}  // namespace sae::ops
