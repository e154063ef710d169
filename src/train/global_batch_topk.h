// BatchTopK over a batch whose rows are split across the ranks of a job (rank r holds the r-th
// block of rows): each rank gets exactly its rows' share of what ops::batch_topk selects on the
// whole batch — the same entries, ties at the cut broken by lower flat index across ranks —
// while only the candidate values cross the network, never the [rows, d_sae] matrix or codes.
// The first piece of data-parallel training (docs/distributed.md); no job uses it yet.
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

}  // namespace sae::train
