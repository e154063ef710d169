// Latent parallel (train::LatentShard): a per-latent array whose blocks are spread over the
// ranks, brought whole to rank 0 for evaluation, checkpoints and the final save.
#pragma once

#include <cstdint>
#include <vector>

#include "dist/comm.h"
#include "train/step.h"

namespace sae::train {

// Every rank's block (its latents' rows of row_len floats, `mine`) on rank 0, in latent order;
// empty on the other ranks. A collective, in rounds of at most max_floats floats in all (MPI
// counts and offsets are int).
std::vector<float> gather_latent_rows(const LatentShard& shard, const std::vector<float>& mine,
                                      int64_t row_len, int64_t max_floats = int64_t(1) << 30);

}  // namespace sae::train
