// The whole job of issue 5: text corpus -> Gemma-2 -> one activation stream -> an SAE per
// (variant, layer) -> held-out evaluation -> a release folder in SAELens layout with a model
// card. Resumable after a kill. Layout and options: docs/release.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "pipeline/activation_store.h"

namespace sae::pipeline {

struct ReleaseOptions {
  // The Gemma-2 checkpoint: a folder, or a Hugging Face repo id (model::resolve_checkpoint).
  std::string model;
  std::string output_dir = "out/release";
  data::CorpusConfig corpus;
  std::vector<int64_t> layers;
  std::string hook = "resid_post";
  // "standard" and "snap" are the release's presets (gemma-2-2b-matryoshka-*); any other
  // name is taken as a preset name (sae train --preset).
  std::vector<std::string> variants = {"standard", "snap"};
  int64_t total_tokens = 0;            // per SAE; 0: the preset's
  std::vector<std::string> overrides;  // section.key=value, applied to every SAE
  StoreConfig store;                   // batch_tokens comes from the SAE configs
  int64_t heldout_tokens = 16384;      // held-out tokens for L0 / EV
  int64_t ce_windows = 8;              // held-out windows for the CE-loss score (0: skip)
  int64_t log_every_steps = 100;       // the shared progress line
  // Every SAE and the data position are checkpointed every this many minutes of wall time
  // (0: every training.checkpoint_every_steps steps instead). A release's checkpoint is every
  // SAE's whole state (1.2 GB each at the seed's shape: 60 GB for 50): on a GPU, 1000 steps
  // take minutes, so a step cadence would spend much of the run writing.
  double checkpoint_minutes = 30;
  // In one process the SAEs' checkpoints are written on a thread beside the steps: SAE states
  // held at once while they wait for the disk (each ~1.2 GB of host memory at the seed's
  // shape). 0: as many as fit in 1 GiB, and at least 2 (the disk then never waits for one).
  int64_t checkpoint_snapshots = 0;
  // Refuse to start when the disk plan (pipeline/disk_plan.h) needs more than the output
  // folder's disk has free; false starts anyway (the job fails if the disk fills).
  bool check_disk = true;
  bool resume = false;
  int64_t stop_at_step = 0;  // > 0: checkpoint and return at this step (run in slices)
  // "cuda": the model forward, the activation store and every SAE's step on the GPU (one GPU
  // per rank under mpirun); `precision` is then the forward's (bf16: bf16 weights and GEMM
  // operands, fp32 accumulate; fp32). The SAEs' own precision is training.precision.
  std::string device = "cpu";
  std::string precision = "bf16";
  // The next fill's rows come on a thread of the activation store while the SAEs step on the
  // current batches (the same batches either way): the model's forwards on cuda, a cache's
  // reads on either device (every rank's under mpirun). false: between the steps.
  bool overlap_forward = true;
  // On cuda, where the activation store's rows live: "device", "host" (pinned host memory the
  // GPU reads across the bus: slower, leaves the GPU to the SAEs), or "auto" (the device when
  // the plan fits, else the host when that fits).
  std::string activation_store = "auto";
  // Print the plans (the memory of the host or of the GPU, the disk) and, on cuda, the groups of
  // the layers that fit, then return before anything is loaded or written (ReleaseEnd::plan).
  bool plan_only = false;
  // On cuda, the GPU memory (bytes) to plan against instead of the visible GPU's free memory
  // (0): with plan_only, a GPU this machine need not have; in a run, a cap below what is free.
  int64_t gpu_memory = 0;
  // With plan_only, N > 0 plans a job of N ranks (mpirun -np N; one GPU each on cuda) in this one
  // process: which SAEs each rank trains, each rank's memory, and, on cuda when a rank does not
  // fit, the fewest ranks that would ("ranks_that_fit").
  int64_t plan_ranks = 0;
  bool keep_bf16 = false;    // model weights kept in bf16
  bool bf16_matmul = false;  // ... and multiplied in bf16 (model::Gemma2Options)
  std::string release_name = "sae.cpp-gemma-2-2b-res-matryoshka";
  // What the release publishes carries no local path (cfg.json, release.json, the model card):
  std::string model_name;    // metadata.model_name ("" = the checkpoint's name, e.g. gemma-2-2b)
  std::string dataset_name;  // metadata.dataset_path ("" = the shards' file names)
  // Train from an activation cache (`sae cache`) instead of the model: the hook, the layers
  // (default all of the cache's), the context windows and the corpus come from its cache.json;
  // the held-out rows are its last shards (never trained on); no CE-loss score (no model).
  // Module parallel: each rank reads every N-th shard.
  std::string from_cache;
  // Launched as several ranks: "modules" (each SAE trained by one rank, or, with fewer SAEs than
  // ranks, by its own group of ranks in data parallel) or "data" (every SAE data parallel over
  // all the ranks). docs/distributed.md.
  std::string parallel = "modules";
  // Each record of .work/progress.jsonl (the progress line's and each checkpoint's; rank 0),
  // also handed here as it is written (the Python module relays them to a callback).
  std::function<void(const nlohmann::ordered_json&)> on_record;
};

struct ReleaseEnd {
  // false when `stop` or stop_at_step interrupted it (every SAE and the data position
  // checkpointed; run again with resume = true).
  bool finished = false;
  // The SAEs set aside ("variant/hook"): each diverged again after its rollbacks
  // (training.max_rollbacks) while others trained on. Not in the release folder; release.json's
  // results say where each stopped, and its last checkpoint stays in .work/.
  std::vector<std::string> set_aside;
  // plan_only: what was planned ({"fits", "saes", "memory" or "gpu" with its "groups" and
  // "ranks_that_fit", "disk"}; with plan_ranks, "ranks": [{"rank", "saes", "memory" or "gpu"}]).
  nlohmann::ordered_json plan;
};

// Runs (or resumes) the job. Errors throw; the last SAE training that diverges after its
// rollbacks is such an error (its checkpoint intact, a resume continues it).
ReleaseEnd run_release(const ReleaseOptions& opt, const std::atomic<bool>* stop = nullptr);

// The preset a variant name stands for.
std::string variant_preset(const std::string& variant);

}  // namespace sae::pipeline
