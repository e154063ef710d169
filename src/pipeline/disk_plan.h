// The disk plan of `sae release`: what its output folder will hold at its fullest — every SAE's
// checkpoint (its whole state: 1.21 GB at the seed's shape), one more while a checkpoint is
// being replaced (the new one is complete before the old one goes), and the SAELens folders at
// the end — checked against the free space before training starts, so that a full disk stops
// the job in its first seconds rather than at a checkpoint hours in, or at the end.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "train/train_config.h"

namespace sae::pipeline {

struct DiskPlan {
  int64_t checkpoints = 0;  // every SAE's checkpoint
  int64_t replacing = 0;    // the largest checkpoint twice while it is replaced
  int64_t saes = 0;         // the SAELens folders
  int64_t present = 0;      // already in the job's folder (a resumed job's checkpoints)
  int64_t needed() const { return checkpoints + replacing + saes - present; }
  std::string describe() const;  // one line, term by term
};

// The plan for SAEs of these configs on activations of width d_in; `present`: bytes the job's
// folder already holds.
DiskPlan plan_release_disk(const std::vector<train::TrainConfig>& saes, int64_t d_in,
                           int64_t present);

// Throws a clear error naming `folder` when the plan needs more than `available` bytes.
void check_disk(const DiskPlan& plan, int64_t available, const std::string& folder);

// Bytes in the files under `folder` (0 when it does not exist).
int64_t folder_bytes(const std::string& folder);

// The free space of the filesystem that holds `path` (or would: its nearest existing parent).
int64_t available_bytes(const std::string& path);

}  // namespace sae::pipeline
