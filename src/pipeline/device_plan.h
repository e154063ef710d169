// The GPU memory plan of `sae release --device cuda` (issue 11): what the release will hold on
// the device — the model's weights and forward activations, every SAE's training state, the
// activation store, the evaluation's SAE — printed first and checked against the free memory
// before anything is allocated; when it does not fit, the largest group of the requested layers
// that does. Pure arithmetic over the shapes (tested without a GPU); the terms mirror what
// DeviceGemma2, DeviceTrainer, DeviceRows and DeviceSae allocate.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/gemma2_config.h"
#include "train/train_config.h"

namespace sae::pipeline {

struct DevicePlanShape {
  model::Gemma2Config model;
  bool bf16_model = true;      // the forward's weights and GEMM operands
  bool forward = true;         // false: rows from an activation cache (no model on the device)
  bool ce_score = true;        // the CE-loss score: the whole model and the logits
  int64_t forward_tokens = 0;  // prompts_per_forward x context_size
  int64_t context_size = 0;
  int64_t store_rows = 0;      // the store's rows per layer (buffer plus one fill)
  bool store_on_host = false;  // the store's rows in pinned host memory mapped for the GPU
};

struct PlannedSae {
  int64_t layer = 0;
  train::TrainConfig cfg;
};

// AuxK's dense buffers grow with the dead latents; the plan sizes them for this share of each
// SAE's latents dead at once (a run with more allocates more, or stops with an out-of-memory
// error that names the buffer; checkpoints let it resume in a smaller group).
inline constexpr double kPlannedDeadShare = 0.25;

struct DeviceReleasePlan {
  int64_t model = 0, forward = 0, saes = 0, store = 0, eval = 0;
  int64_t host_store = 0;  // the store's pinned host memory instead (not in total())
  int64_t n_saes = 0;
  int64_t total() const { return model + forward + saes + store + eval; }
  std::string describe() const;  // one line, term by term
};

// The plan of training `saes` (their layers among `layers`, stored by the activation store),
// the SAEs sharing one step scratch (DeviceStepScratch) as the release runs them.
DeviceReleasePlan plan_device_release(const DevicePlanShape& shape,
                                      const std::vector<int64_t>& layers,
                                      const std::vector<PlannedSae>& saes);

// Where the activation store's rows go for `mode`: "device", "host" (pinned host memory), or
// "auto": the device when the whole plan fits in `free_bytes`, else the host when that plan
// fits, else the device (and the caller refuses). Returns `shape` with store_on_host set.
DevicePlanShape place_store(DevicePlanShape shape, const std::string& mode,
                            const std::vector<int64_t>& layers, const std::vector<PlannedSae>& saes,
                            int64_t free_bytes);

// The longest prefix of `layers` (ascending) whose SAEs fit in `free_bytes` (empty: not even
// one layer's).
std::vector<int64_t> layers_that_fit(const DevicePlanShape& shape,
                                     const std::vector<int64_t>& layers,
                                     const std::vector<PlannedSae>& saes, int64_t free_bytes);

// `layers` cut into runs one after another, each the longest prefix of the rest that fits (a
// release per group, joined by sae release-merge); empty when one layer alone does not fit.
std::vector<std::vector<int64_t>> layer_groups_that_fit(const DevicePlanShape& shape,
                                                        const std::vector<int64_t>& layers,
                                                        const std::vector<PlannedSae>& saes,
                                                        int64_t free_bytes);

// "0-11", "3,5,7-9": the layers as --layers takes them.
std::string layers_arg(const std::vector<int64_t>& layers);

}  // namespace sae::pipeline
