// The training loop: batches from a source, the sparse step, Adam, the threshold, dead-latent
// tracking, held-out evaluation, a progress line and a JSONL log, atomic checkpoints, resume,
// and the final SAELens-format save. Layout of the output folder: docs/training.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/source.h"
#include "dist/comm.h"
#include "eval/metrics.h"
#include "train/data_parallel.h"
#include "train/device_step.h"
#include "train/optimizer.h"
#include "train/train_config.h"

namespace sae::train {

struct EvalResult {
  Metrics metrics;
  std::vector<double> level_explained_variance;  // using latents [0, width_i) only
  nlohmann::ordered_json to_json() const;
};

// Evaluates an inference SAE on held-out tokens x [n, d_in] (raw activations).
EvalResult evaluate(const Sae& sae, const std::vector<int64_t>& widths, const float* x, int64_t n);
// The same with the encoder, the decoder and the levels' errors on the GPU (the metrics summed
// on the host, as sae eval --device cuda does); total_sq_deviation = sum_sq_deviation(x, n, d).
// A trainer on the GPU evaluates this way: the host's encoder GEMM would take seconds per SAE.
EvalResult evaluate(DeviceSae& sae, const std::vector<int64_t>& widths, const float* x, int64_t n,
                    double total_sq_deviation);
// Whether `minutes` (> 0) have passed since `since` (now_seconds()) on rank 0's clock: the same
// answer on every rank of `comm` (a collective when it has several; null: one process). The
// checkpoint clocks of `sae train` and of the release.
bool clock_due(double minutes, double since, dist::Comm* comm);
// sum_t ||x_t - mean||^2 over the rows of x [n, d] (n times the per-row variance).
double sum_sq_deviation(const float* x, int64_t n, int64_t d);

// How a Trainer with several ranks splits the work (docs/distributed.md).
enum class Parallel {
  Data,     // each rank steps on its rows of every batch; every rank holds the whole SAE
  Latents,  // each rank holds a block of latents (and their optimizer state) for every row
};

// A trainer's checkpoint, owned: the tensors of state.safetensors and state.json, taken at one
// step by Trainer::checkpoint_data and written by write_checkpoint — which may run on another
// thread while training goes on (the release's checkpoints, train/checkpoint_writer.h).
struct CheckpointData {
  std::string output_dir;
  int64_t step = 0, d_in = 0, d_sae = 0;
  std::vector<float> W_encT, W_dec, b_enc, b_dec, v_W_encT, v_W_dec, v_b_enc, v_b_dec;
  bool has_first_moment = false;  // Adam's m (beta1 != 0)
  std::vector<float> m_W_encT, m_W_dec, m_b_enc, m_b_dec;
  double threshold = 0;
  std::vector<int64_t> steps_since_fired, window_counts;
  nlohmann::json state;   // state.json
  int64_t bytes() const;  // the host memory it holds (about the size of state.safetensors)
};
// <output_dir>/checkpoint from `c`: written into checkpoint.tmp, then swapped in (the previous
// checkpoint stays until the new one is complete). Touches nothing else.
void write_checkpoint(const CheckpointData& c);

class CheckpointWriter;

// What Trainer::train_step throws when a step diverges on a finite batch and no rollback is
// left (none allowed, no checkpoint yet, or training.max_rollbacks spent): the
// SAE's state is spoiled, its last checkpoint is intact. Bad data throws a plain Error. A
// release sets such an SAE aside when it had rolled back before, and trains the others on.
class Diverged : public Error {
 public:
  Diverged(const std::string& what, std::string cause, int64_t step, int64_t rollbacks,
           int64_t checkpoint_step)
      : Error(what),
        cause(std::move(cause)),
        step(step),
        rollbacks(rollbacks),
        checkpoint_step(checkpoint_step) {}
  std::string cause;  // the step's loss and norms, and the rollbacks before (no advice to resume)
  int64_t step, rollbacks, checkpoint_step;  // the step that failed (1-based); -1: no checkpoint
};

class Trainer {
 public:
  // `label` prefixes the progress line (e.g. the variant name). With `comm` of several ranks
  // every rank runs the same loop on the same global batches; data parallel: each steps on its
  // block of rows (BatchShard) and applies the same update; latent parallel: each holds and
  // updates its block of latents (LatentShard), and the whole SAE is gathered for evaluation,
  // checkpoints and the final save. Rank 0 alone writes the output folder and prints. The folder
  // must be one every rank sees (resume reads it on every rank).
  Trainer(TrainConfig cfg, data::ActivationSource& source, std::string label = "train",
          dist::Comm* comm = nullptr, Parallel parallel = Parallel::Data);

  // Trains until total_steps, resuming from <output_dir>/checkpoint when `resume` and one
  // exists. If stop_at_step >= 0, checkpoints and returns false when that step is reached (a
  // controlled interruption); `stop` (e.g. set by SIGINT) does the same. Returns true when
  // training finished and the SAE was saved to <output_dir>/sae. The checkpoints on the
  // schedule are written on a thread of rank 0 while the steps go on (the steps pay for taking
  // the state); the stop's and the final one are written before it returns.
  bool run(bool resume, int64_t stop_at_step = -1, const std::atomic<bool>* stop = nullptr);

  // The pieces of run(), for a driver that feeds batches itself (many SAEs on one activation
  // stream). begin: resume from the checkpoint or initialise (normalisation batches come from
  // source.train_batch(0..)); returns whether it resumed. train_step: one step on a raw batch
  // x [batch_size, d_in] (scaled in place; data parallel: the whole global batch, of which this
  // rank steps on its rows), with logging, evaluation and — when
  // auto_checkpoint — checkpoints on the configured schedule. finish: final evaluation, the
  // SAE to <output_dir>/sae, eval.json, a last checkpoint.
  bool begin(bool resume);
  void train_step(float* x);
  // The same on a raw batch already in GPU memory (training.device = cuda; complete, its
  // producer's stream synchronized; read, not changed): no copy through the host.
  void train_step_on_device(const float* device_x);
  void finish();
  // checkpoint_data(), then write_checkpoint on rank 0.
  void save_checkpoint();
  // The checkpoint of this step, owned (a collective with several ranks: rank 0's holds the
  // whole state, the others' are empty); it counts as this trainer's checkpoint at this step.
  // `reuse`: a written checkpoint whose arrays are filled again — their pages are mapped
  // already (bench_upkeep, this machine: 1.21 GB copied into fresh memory 2.8-3.3 s, into
  // mapped memory 0.06 s).
  CheckpointData checkpoint_data(CheckpointData reuse = {});
  // The step of the last checkpoint written or taken (-1: none; a resumed trainer's: its step).
  int64_t checkpoint_step() const { return checkpoint_step_; }
  // What save_checkpoint and finish write for an SAE of this config on activations of width
  // d_in, in bytes (the tensors; the JSON beside them is small), for disk plans made before
  // training: its checkpoint (weights, Adam's moments, counters) and its SAELens folder.
  static int64_t planned_checkpoint_bytes(const TrainConfig& cfg, int64_t d_in);
  static int64_t planned_sae_bytes(const TrainConfig& cfg, int64_t d_in);
  bool auto_checkpoint = true;
  // A rollback reads the last checkpoint back: a driver that writes this trainer's checkpoints
  // on a thread of its own (the release) sets this to wait until they are on disk.
  std::function<void()> flush_checkpoints;
  // The divergences survived (training.max_rollbacks): each rolled the SAE back from the step
  // that failed to its last checkpoint and skipped the batches between. Kept in the checkpoints.
  struct Rollback {
    int64_t step = 0, to_step = 0;  // the step that diverged (1-based); the checkpoint's
  };
  const std::vector<Rollback>& rollbacks() const { return rollbacks_; }
  int64_t skipped_steps() const;  // batches skipped by the rollbacks, summed
  // Each resume with settings other than the checkpoint's (train::config_changes): [{"step",
  // "changed"}], in order. Kept in the checkpoints.
  const nlohmann::json& config_changes() const { return config_changes_; }
  // training.device = cuda: a step scratch shared with other trainers that step one after
  // another (set before begin(); null: its own).
  std::shared_ptr<DeviceStepScratch> device_scratch;
  // training.device = cuda: false drops the host copy of the weights and Adam's moments
  // whenever an evaluation or a checkpoint is done with it (pulled again from the GPU for the
  // next one, and by finish()); a release of 50 SAEs would otherwise hold ~1.2 GB each.
  bool keep_host_state = true;
  bool print_progress =
      true;  // progress and eval lines on stderr (the JSONL log is always written)
  double last_l0() const { return last_l0_; }            // from the last logged step
  double eval_seconds() const { return eval_seconds_; }  // wall time in held-out evaluations
  double last_ev() const { return last_ev_; }
  const TrainConfig& config() const { return cfg_; }

  // Optional hooks for embedding (the Python module): every log record (progress and eval) is
  // passed to on_record; should_stop is polled before each step and stops like `stop` does.
  std::function<void(const nlohmann::json&)> on_record;
  std::function<bool()> should_stop;

  const TrainingSae& sae() const { return sae_; }
  double input_scale() const { return input_scale_; }
  int64_t step() const { return step_; }
  const EvalResult& final_eval() const { return final_eval_; }
  // The SAE as it would be saved now (not under latent parallel: see gathered_inference_sae).
  Sae inference_sae() const;
  // training.device = cuda: the inference SAE made on the GPU from the state there (no host copy
  // of the weights needed: with keep_host_state = false there is none after finish()), in fp32;
  // what the trainer's evaluations and a release's CE-loss score run.
  std::unique_ptr<DeviceSae> device_inference_sae() const;
  // The same for any layout; under latent parallel a collective that gathers the blocks on
  // rank 0, where it returns the SAE (nullopt on the other ranks).
  std::optional<Sae> gathered_inference_sae() const;
  std::vector<float> log_sparsity() const;  // log10 firing frequency over the current window
  // With several ranks: whether this rank writes the output folder and prints (rank 0).
  bool lead() const { return !many_ranks() || comm_->rank() == 0; }

 private:
  void prepare_normalisation();
  void eval_and_log(bool final);
  void log_progress(const StepResult& r, double lr, double grad_norm);
  // A step whose loss or gradient norm is NaN or infinite has poisoned the state it updated:
  // an error that says whether the batch held NaN/Inf (bad data; x: the host batch, null when
  // it is on the GPU) or the training diverged, and which checkpoint is intact. Thrown before
  // anything of this step is logged or saved.
  // `bad`: bad_batch(x).
  [[noreturn]] void fail_non_finite(const StepResult& r, double grad_norm, const float* x,
                                    const std::string& bad);
  // The batch that gave a non-finite step, as the SAE saw it: "" when finite (the training
  // diverged), else where it holds NaN/Inf (x: the host batch, null when it is on the GPU).
  std::string bad_batch(const float* x) const;
  // "the batch" (or its GPU copy) with its input scale where that copy is scaled.
  std::string batch_name(bool device_copy) const;
  // training.max_rollbacks allows one more and there is a checkpoint to go back to (the same on
  // every rank).
  bool can_roll_back() const;
  // The state of the last checkpoint read back (on the GPU, uploaded) and the step counter left
  // past the step that diverged: the batches since the checkpoint are skipped. Logged.
  void roll_back(const StepResult& r, double grad_norm);
  // `saved_config`: the config the checkpoint was taken under.
  bool load_checkpoint(nlohmann::json* saved_config = nullptr);
  // With training.device = cuda the state lives on the GPU: pull copies it to the host
  // (parameters and threshold; everything when `all`) before evaluation and checkpoints.
  void pull(bool all);
  // checkpoint_data; `lend`: the big arrays moved out of the trainer, for save_checkpoint to
  // give back (lends_arrays) after the write.
  CheckpointData gather_checkpoint(CheckpointData reuse, bool lend);
  bool lends_arrays() const;
  void drop_host_state();  // !keep_host_state: the big host arrays freed (device state is whole)
  void append_log(const nlohmann::json& record);
  // run()'s checkpoints on the schedule, on rank 0 (which holds writer_): the state taken
  // between two steps (a collective with several ranks) and handed to writer_. The last one
  // still being written is waited for first (a disk slower than the cadence slows the steps,
  // never skips a checkpoint).
  void checkpoint_beside_steps();
  // Rank 0: once the pending checkpoint is on disk (or after waiting for it, `wait`), its log
  // record and line; a write's error is raised here.
  void report_written(bool wait);
  // training.checkpoint_every_steps or _minutes says so (a collective with several ranks when
  // on the clock).
  bool checkpoint_due() const;
  bool many_ranks() const { return comm_ && comm_->size() > 1; }
  // Each latent's firings in the window: data parallel, summed over the ranks; latent
  // parallel, every rank's block gathered (collectives).
  std::vector<int64_t> window_counts_all() const;
  // Latent parallel: every rank's block of a per-latent count, in latent order, on every rank
  // (a collective; the float arrays go to rank 0 through train::gather_latent_rows).
  std::vector<int64_t> gather_latent_values(const std::vector<int64_t>& mine) const;
  std::optional<TrainingSae> whole_sae() const;    // every block, on rank 0 (nullopt elsewhere)
  Sae inference_of(const TrainingSae& sae) const;  // with this run's metadata and scale
  // Data parallel: every rank must hold the same parameters; a difference is an error that
  // names the rank (collective; a hash of the parameters through one allgather).
  void check_ranks_agree(const char* when) const;

  TrainConfig cfg_;
  data::ActivationSource& source_;
  std::string label_;
  dist::Comm* comm_ = nullptr;
  BatchShard shard_;     // data parallel
  LatentShard latents_;  // latent parallel
  TrainingSae sae_;      // latent parallel: this rank's latents (spec.widths the whole SAE's)
  std::unique_ptr<ShardedUpdate> update_;  // data parallel only
  Optimizer opt_;
  Grads grads_;
  std::unique_ptr<DeviceTrainer> dev_;  // null on the CPU
  int64_t dead_now_ = 0;                // from the device counters (CPU: counted on the host)
  StepWorkspace ws_;
  std::vector<uint8_t> dead_;
  int64_t step_ = 0;
  double input_scale_ = 1.0;
  std::vector<int64_t> steps_since_fired_;
  std::vector<int64_t> window_counts_;  // firings per latent in the current sampling window
                                        // (data parallel: of this rank's rows)
  int64_t window_steps_ = 0, window_tokens_ = 0;
  std::vector<float> heldout_;        // rank 0's
  int64_t n_heldout_ = 0;             // tokens rank 0 evaluates on (known to every rank)
  double heldout_sq_deviation_ = -1;  // of heldout_, once (the levels' EV denominator on a GPU)
  EvalResult final_eval_;
  // progress timing
  double interval_start_ = 0, run_start_ = 0;
  int64_t interval_steps_ = 0, run_start_step_ = 0;
  double batch_variance_ = 0;
  double last_l0_ = 0, last_ev_ = 0;
  double eval_seconds_ = 0;
  int64_t checkpoint_step_ = -1;  // the step of the last checkpoint this trainer wrote
  std::vector<Rollback> rollbacks_;
  nlohmann::json config_changes_ = nlohmann::json::array();
  double checkpoint_time_ = 0;  // when it was written (or when training began)
  // Within run(), on rank 0: the writer of the checkpoints beside the steps (null: between them).
  CheckpointWriter* writer_ = nullptr;
  struct PendingCheckpoint {
    int64_t step = 0, bytes = 0;
    double taken_at = 0, paused = 0;  // when the state was taken; the steps' pause for it
  };
  std::optional<PendingCheckpoint> pending_;  // handed to writer_, not yet reported
};

}  // namespace sae::train
