// Data parallel's exchanges (docs/distributed.md). Each rank steps on its rows of the global
// batch (forward_backward with a BatchShard, every mean already over the whole batch); then
//  1. reduce_over_ranks makes the step's numbers those of the whole batch: losses, active count,
//     smallest selected value, fired flags, and the union of the touched latents;
//  2. ShardedUpdate turns the ranks' partial gradients into one update: ranks own contiguous
//     blocks of latents; each touched gradient row goes (reduce-scatter) to its owner, the owner
//     runs Adam on its block alone, and the updated rows go (all-gather) to every rank. The
//     bytes of one all-reduce, 1/N of the optimizer's memory traffic on each rank, and only the
//     touched rows cross the network, never the dense [d_sae, d_in] matrices.
#pragma once

#include <cstdint>
#include <vector>

#include "dist/comm.h"
#include "train/optimizer.h"
#include "train/step.h"

namespace sae::train {

// Sums the losses and the active count, ORs the fired flags and the touched rows (g.touched
// becomes their union, sorted, the same list on every rank), the smallest selected value over
// all ranks. The gradient rows stay this rank's partial sums (ShardedUpdate sums them).
void reduce_over_ranks(dist::Comm& comm, StepResult& res, Grads& g);

class ShardedUpdate {
 public:
  ShardedUpdate(dist::Comm& comm, int64_t d_sae, int64_t d_in);

  // The latents rank r owns: [block_begin(r), block_begin(r + 1)).
  int64_t block_begin(int r) const { return d_sae_ * r / comm_.size(); }

  // One optimizer step on partial gradients g (after reduce_over_ranks): sums the owned rows
  // and the biases, takes the global gradient norm, steps Adam on the owned rows and the
  // biases, and leaves every rank with the same parameters. Returns the norm before clipping.
  double step(TrainingSae& sae, Optimizer& opt, Grads& g, double lr);

  // Every rank's Adam moments are current only in its own block: this gathers every block to
  // every rank (before a checkpoint).
  void gather_moments(Optimizer& opt);

  // Floats this rank sent in the last step's reduce-scatter and all-gather (gradient and
  // parameter rows, biases), as bytes.
  int64_t last_bytes_sent() const { return last_sent_ * int64_t(sizeof(float)); }

  // Seconds spent, accumulated over steps (reset by the caller).
  struct Times {
    double reduce_scatter = 0, adam = 0, allgather = 0;
  } times;

 private:
  // rows (ascending latents) split by owner; every latent by owner.
  std::vector<std::vector<int32_t>> by_owner(const std::vector<int32_t>& rows) const;
  std::vector<std::vector<int32_t>> all_rows_by_owner() const;
  // Each owner's rows of the [d_sae, d_in] matrices in `mats`, from the owner to every rank.
  void allgather_rows(const std::vector<std::vector<int32_t>>& rows,
                      const std::vector<float*>& mats);

  dist::Comm& comm_;
  int64_t d_sae_, d_in_;
  std::vector<float> buf_;
  int64_t last_sent_ = 0;
};

}  // namespace sae::train
