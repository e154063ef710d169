// One training step's forward and backward pass, sparse everywhere but the encoder GEMM:
// BatchTopK selection, all Matryoshka levels in one sweep over index-sorted active lists,
// AuxK for dead latents, and gradients that touch only the rows of active latents.
#pragma once

#include <cstdint>
#include <vector>

#include "dist/comm.h"
#include "ops/batch_topk.h"
#include "train/training_sae.h"

namespace sae::train {

// Gradients in the parameters' layout. Rows of W_encT / W_dec are written only for latents in
// `touched` (row_touched[j] = 1); the others are zero and are not read.
struct Grads {
  std::vector<float> W_encT, W_dec, b_enc, b_dec;
  std::vector<uint8_t> row_touched;
  std::vector<int32_t> touched;
  void resize(int64_t d_in, int64_t d_sae);
  void clear();  // zero what the last step wrote
  double squared_norm() const;
};

struct StepResult {
  double loss = 0;                 // total
  std::vector<double> level_loss;  // R_i per level, before the multiplier
  double aux_loss = 0;             // after coefficient and scale
  double outer_sq_error = 0;       // mean over tokens of ||x - x_hat||^2 at the full width
  int64_t n_active = 0;            // selected entries (L0 = n_active / B)
  int64_t n_dead = 0;              // latents in the dead mask
  double min_selected = 0;         // smallest selected value (drives the threshold update)
  std::vector<uint8_t> fired;      // [d_sae]: selected at least once in this batch
  // ||g||^2 of the gradient written into g (what the clip needs), taken while the backward
  // wrote each row; -1 under data parallel, where the rows are summed over ranks afterwards.
  double grad_squared_norm = -1;
};

// Where a step's time went (seconds, accumulated across steps; reset by the caller).
struct StepTimes {
  double encoder_gemm = 0, select = 0, levels = 0, aux = 0, backward = 0;
  // Data parallel: the reduction over ranks after the backward. Latent parallel: the band
  // sums, AuxK's exchanges and the final sums (already inside levels, aux and backward).
  double exchange = 0;
};

// Scratch reused across steps (sized on first use).
struct StepWorkspace {
  // How the step runs, set by the caller: the encoder GEMM with bf16 operands and f32 sums
  // (training.precision = bf16; ops/gemm_bf16.h) instead of f32.
  bool bf16_encoder_gemm = false;
  std::vector<uint16_t> W_encT_bf16;  // this step's W_encT rounded, for the bf16 GEMM
  std::vector<float> gemm_scratch;
  std::vector<float> sae_in, hidden_pre;
  std::vector<float> vecs;      // [B, levels, d_in]: each level's gradient per token
  std::vector<float> aux_vecs;  // [B, aux groups, d_in]: the residual each AuxK group fits
  std::vector<double> row_sq;   // [d_sae]: ||dW_dec[j]||^2 + ||dW_enc[j]||^2 of touched rows
  ops::RowSparse active;
  StepTimes times;
};

// Data parallel (docs/distributed.md): this rank holds rows [batch_begin(B), batch_end(B)) of
// a global batch of B rows. Whatever depends on the whole batch — the BatchTopK cut, every 1/B,
// the losses, the threshold's input, the fired flags, the gradient — is made global through
// `comm`, so that every rank ends the step with the single-process result.
struct BatchShard {
  dist::Comm* comm = nullptr;  // null: one process, the whole batch
  int64_t global_batch = 0;
  bool split() const { return comm && comm->size() > 1; }
  int64_t begin(int64_t B) const { return split() ? B * comm->rank() / comm->size() : 0; }
  int64_t end(int64_t B) const { return split() ? B * (comm->rank() + 1) / comm->size() : B; }
};

// Latent parallel (docs/distributed.md): this rank holds latents [begin, begin + d_sae) of an
// SAE of `width` latents — a TrainingSae whose spec.d_sae is its count while spec.widths stay
// the whole SAE's — and every rank steps on the whole batch. The selection (one cut for the
// whole [B, width] matrix), the levels' reconstructions, AuxK's per-token choice and
// reconstruction, and b_dec's gradient are made global through `comm`; each rank's gradient
// rows are complete for its own latents, so each updates its rows with no further exchange.
struct LatentShard {
  dist::Comm* comm = nullptr;
  int64_t width = 0;  // latents of the whole SAE
  bool split() const { return comm && comm->size() > 1; }
  // The latents rank r holds: [first(r), first(r + 1)), contiguous blocks in rank order.
  int64_t first(int r) const { return split() ? width * r / comm->size() : 0; }
  int64_t begin() const { return split() ? first(comm->rank()) : 0; }
  int64_t count() const { return split() ? first(comm->rank() + 1) - begin() : width; }
};

// x: [B, d_in] inputs as the SAE sees them (already scaled): the whole batch, or this rank's
// rows of `shard`. dead: [d_sae] mask (empty = none; latent parallel: this rank's latents).
// Writes gradients of the total loss into g (after g.clear()). Under latent parallel `fired`
// and the gradients are this rank's latents'; every other number is the whole SAE's.
StepResult forward_backward(const TrainingSae& sae, const float* x, int64_t batch,
                            const std::vector<uint8_t>& dead, Grads& g, StepWorkspace& ws,
                            const BatchShard& shard = {}, const LatentShard& latents = {});

// Only the loss, in double precision with dense arithmetic and a full sort for the selection:
// the reference the sparse step is tested against and the finite-difference oracle. What the
// sparse step detaches (the AuxK residual; earlier levels when detach_levels) is computed from
// `frozen`, so finite differences taken in `p` with `frozen` fixed give the step's gradient.
struct ReferenceParams {
  std::vector<double> W_enc;  // [d_in, d_sae]
  std::vector<double> W_dec, b_enc, b_dec;
};
ReferenceParams reference_params(const TrainingSae& sae);
struct ReferenceLoss {
  double total = 0, aux = 0;
  std::vector<double> level;  // R_i per level
  int64_t n_active = 0;
};
ReferenceLoss reference_loss(const TrainSpec& spec, const ReferenceParams& p,
                             const ReferenceParams& frozen, const float* x, int64_t batch,
                             const std::vector<uint8_t>& dead);

}  // namespace sae::train
