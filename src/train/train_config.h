// Everything a training run needs, from one JSON file (sections sae, loss, optimizer,
// training, data, output; every field documented in docs/training.md) plus presets and
// command-line overrides. Unknown fields are rejected, naming the file and the field.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "train/optimizer.h"
#include "train/training_sae.h"

namespace sae::train {

struct LrSchedule {
  std::string name = "constant";  // constant | linear | cosine
  double lr = 3e-4;
  int64_t warm_up_steps = 0, decay_steps = 0;
  double lr_end = -1;  // < 0: lr / 10 (SAELens's default)
  // The learning rate for update number `step` (0-based) of `total_steps`.
  double at(int64_t step, int64_t total_steps) const;
};

struct TrainConfig {
  TrainSpec spec;  // sae + loss sections (d_in comes from the data)
  double decoder_init_norm = 0.1;
  std::string b_dec_init = "zeros";            // zeros | mean (mean of the normalisation batches)
  std::string normalize_activations = "none";  // none | expected_average_only_in
  int64_t n_norm_batches = 10;
  int64_t dead_feature_window = 1000;  // steps without firing before a latent counts as dead
  AdamConfig adam;
  LrSchedule lr;
  int64_t total_tokens = 0, batch_size = 4096;
  uint64_t seed = 0;
  int64_t log_every_steps = 100, eval_every_steps = 1000, eval_tokens = 16384;
  int64_t checkpoint_every_steps = 1000, feature_sampling_window = 2000;
  // Also a checkpoint whenever this many minutes have passed since the last (0: off): at the
  // seed's shape a checkpoint is 1.21 GB, and on a GPU 1000 steps take seconds. On cuda
  // from_json's defaults are 0 steps and 30 minutes (0 when steps are given).
  double checkpoint_every_minutes = 0;
  // A step that diverges on a finite batch (its loss or gradient norm NaN or infinite) rolls the
  // SAE back to its last checkpoint and skips the batches since (recorded): at most this many
  // times per run, then the run stops as at any NaN (0: stop at the first). Trainer::train_step.
  int64_t max_rollbacks = 3;
  int threads = 0;
  std::string device = "cpu";      // cpu | cuda (train/device_step.h)
  std::string precision = "fp32";  // the encoder GEMM's operands: fp32 | bf16 | tf32 (cuda only)
  nlohmann::json data;             // the data section, parsed by the source
  std::string output_dir = "out/train";
  bool fold_decoder_norms = true;  // unit-norm decoder rows in the saved SAE
  std::string save_dtype = "f32";
  nlohmann::ordered_json metadata = nlohmann::ordered_json::object();  // into cfg.json

  int64_t total_steps() const { return total_tokens / batch_size; }
  // Builds from a JSON object (after presets and overrides are merged in); d_in is set later.
  static TrainConfig from_json(const nlohmann::json& j, const std::string& where);
  nlohmann::json to_json() const;
};

// Named starting points: "gemma-2-2b-matryoshka-standard", "gemma-2-2b-matryoshka-snap",
// "saelens", "hierarchy-batchtopk", "hierarchy-standard", "hierarchy-snap".
nlohmann::json preset(const std::string& name);
std::vector<std::string> preset_names();
// training.* settings that leave the SAE as it is (how often a run logs, evaluates and
// checkpoints, its threads, how many divergences it would survive): runs that differ only in
// these are the same recipe (release-merge), and a resume that changes them records nothing.
inline constexpr const char* kBookkeepingKeys[] = {
    "log_every_steps",          "eval_every_steps", "checkpoint_every_steps",
    "checkpoint_every_minutes", "threads",          "max_rollbacks"};
// What differs between two resolved configs (to_json()): {"section.key": {"from", "to"}} in key
// order (objects compared key by key, anything else as a whole), without output.dir (where the
// run writes) and the bookkeeping keys. A run resumed with other settings records it.
nlohmann::ordered_json config_changes(const nlohmann::json& before, const nlohmann::json& after);
// Deep-merges `patch` into `base` (objects merge; anything else replaces).
void merge_json(nlohmann::json& base, const nlohmann::json& patch);
// "section.key=value": value parsed as JSON, else taken as a string.
void apply_override(nlohmann::json& j, const std::string& assignment);

}  // namespace sae::train
