// BatchTopK and per-row top-k on the GPU, with the CPU versions' exact contracts
// (ops/batch_topk.h, ops/select.h) including their tie rules. Selection is a radix select on
// the float bits, never a sort of the matrix: a bound for the cut from a sample of rows, one
// pass that collects the few entries above it, and the exact cut among those (two small sorts);
// or, when the sample misleads, exact histograms over the whole matrix and a per-row compaction.
#pragma once

#include <cstdint>

#include "ops/cuda/runtime.h"

namespace sae::cuda {

// CSR on the device. offsets[rows] (on the device) is the number of entries.
struct DeviceRowSparse {
  DeviceBuffer<int64_t> offsets;  // rows + 1
  DeviceBuffer<int32_t> cols;     // capacity >= budget
  DeviceBuffer<float> values;
};

// Scratch reused across calls (sized on first use).
struct BatchTopkScratch {
  DeviceBuffer<unsigned long long> hist;  // coarse + fine histograms
  DeviceBuffer<int64_t> row_gt, row_eq, eq_before, row_allowed, row_n, fb_offsets;
  DeviceBuffer<unsigned long long> cand_keys, cand_keys_sorted, sel_idx, sel_idx_sorted;
  DeviceBuffer<float> cand_vals, cand_vals_sorted, sel_vals, sel_vals_sorted;
  DeviceBuffer<unsigned int> state;  // see batch_topk.cu
  DeviceBuffer<uint8_t> cub_temp;
};

// x[r, c] = (x[r, c] + bias[c]) * scale[c] (bias/scale may be null; written back to x only
// when write_back), then keeps the `budget` largest strictly positive values of the whole
// matrix; among equal values at the cut the lower flat index wins. Writes out (capacity
// budget) and *min_selected (device): the smallest kept value, 0 when nothing was kept.
void batch_topk(const Context& ctx, float* x, int64_t rows, int64_t cols, int64_t budget,
                const float* bias, const float* scale, bool write_back, DeviceRowSparse& out,
                BatchTopkScratch& ws, float* min_selected);

// For each row of x [rows, cols], the k largest values (ties to the lower column) with their
// columns, in ascending column order: indices/values [rows, k]. k <= cols.
void topk_rows(const Context& ctx, const float* x, int64_t rows, int64_t cols, int64_t k,
               int32_t* indices, float* values);

}  // namespace sae::cuda
