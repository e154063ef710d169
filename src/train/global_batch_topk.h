// BatchTopK over a batch whose rows are split across the ranks of a job (rank r holds the r-th
// block of rows): each rank gets exactly its rows' share of what ops::batch_topk selects on the
// whole batch — the same entries, ties at the cut broken by lower flat index across ranks —
// while only the candidate values cross the network, never the [rows, d_sae] matrix or codes.
// Data parallel splits the batch by rows; latent parallel by columns (global_batch_topk_columns).
#pragma once

#include <cstdint>

#include "dist/comm.h"
#include "ops/batch_topk.h"

namespace sae::train {

// x, bias, scale, write_back: as ops::batch_topk, for this rank's rows. global_budget: the
// budget of the whole batch (int(k * global rows)).
void global_batch_topk(dist::Comm& comm, float* x, int64_t rows, int64_t cols,
                       int64_t global_budget, ops::RowSparse& out, const float* bias = nullptr,
                       const float* scale = nullptr, bool write_back = true);

// The same for a batch split by columns (latent parallel): this rank holds columns
// [col_begin, col_begin + cols) of every row of a [rows, global_cols] matrix; `out` gets its
// columns' share of the whole selection, in local column numbers. Ties at the cut go to the
// lowest flat index of the whole matrix (row-major), as in one process: when more ties than the
// cut leaves room for exist, a second exchange agrees on them by flat index.
void global_batch_topk_columns(dist::Comm& comm, float* x, int64_t rows, int64_t cols,
                               int64_t col_begin, int64_t global_cols, int64_t global_budget,
                               ops::RowSparse& out, const float* bias = nullptr,
                               const float* scale = nullptr, bool write_back = true);

}  // namespace sae::train
