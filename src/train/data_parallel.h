// Data parallel's exchange after the backward pass: each rank has computed a step on its rows of
// the global batch (means already over the whole batch); this makes every rank's StepResult
// and Grads those of the whole batch. Only what the step touched crosses the network: the
// gradient rows of latents touched on any rank, packed, never the dense [d_sae, d_in] matrices
// (docs/distributed.md).
#pragma once

#include "dist/comm.h"
#include "train/step.h"

namespace sae::train {

// Sums the losses, the active count and the gradients; ORs the fired flags and the touched
// rows (g.touched becomes their sorted union); the smallest selected value over all ranks.
void reduce_over_ranks(dist::Comm& comm, StepResult& res, Grads& g);

// The gradient bytes reduce_over_ranks sends into the all-reduce for this g (after it ran):
// the touched rows of both matrices and the two biases.
int64_t exchanged_gradient_bytes(const Grads& g);

}  // namespace sae::train
