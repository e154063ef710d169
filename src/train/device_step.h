// The training step on a GPU: the same semantics as train/step.h (BatchTopK over the batch, all
// Matryoshka levels in one sweep, AuxK, sparse backward) followed by the fused clip + Adam, the
// threshold update and the dead-latent counters, with every parameter, gradient and optimizer
// moment resident in device memory. Only the batch goes in and a few logging scalars come out.
// In a build without CUDA the constructor throws a clear error (core/device.h says why).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sae/device_sae.h"
#include "train/optimizer.h"
#include "train/step.h"

namespace sae::train {

// Where a device step's time went (milliseconds of GPU time, accumulated; CUDA events).
struct DeviceStepTimes {
  double upload = 0, encoder_gemm = 0, select = 0, levels = 0, backward = 0, aux = 0, optimizer = 0;
  int64_t steps = 0;
};

// A step's scratch on the device (gradients, the batch, pre-activations, selection, level and
// AuxK buffers: nothing that outlives a step). Trainers that step one after another — a
// release's SAEs on one GPU — can share one, so that it is held once instead of once per SAE.
struct DeviceStepScratch;

class DeviceTrainer {
 public:
  // precision: "fp32", "tf32" or "bf16" (the encoder GEMM's operands; every other sum, the
  // master weights and the optimizer state stay fp32). shared_scratch: null for its own.
  DeviceTrainer(const TrainSpec& spec, const AdamConfig& adam, int64_t batch,
                const std::string& precision,
                std::shared_ptr<DeviceStepScratch> shared_scratch = nullptr);
  // A scratch for trainers to share (on a GPU build; its buffers are allocated by the trainers).
  static std::shared_ptr<DeviceStepScratch> new_scratch();
  ~DeviceTrainer();
  DeviceTrainer(const DeviceTrainer&) = delete;
  DeviceTrainer& operator=(const DeviceTrainer&) = delete;

  // Host <-> device copies of the whole training state (parameters, threshold, Adam moments,
  // per-latent counters). Synchronous.
  void upload(const TrainingSae& sae, const Optimizer& opt,
              const std::vector<int64_t>& steps_since_fired,
              const std::vector<int64_t>& window_counts);
  void download(TrainingSae& sae, Optimizer* opt, std::vector<int64_t>* steps_since_fired,
                std::vector<int64_t>* window_counts) const;

  // Page-locked [batch, d_in] buffer for the source to fill before step().
  float* host_batch();
  // Or a batch already in device memory ([batch, d_in], this GPU, complete: its producer's
  // stream synchronized): the next step() copies it from there instead of host_batch().
  void set_device_batch(const float* device_x);
  // The inference SAE of the state on the device, made there with TrainingSae::to_inference's
  // arithmetic (input scale and decoder norms folded in, W_enc transposed) and copied into a
  // DeviceSae in fp32 (`cfg`: TrainingSae::inference_config): what a trainer on the GPU
  // evaluates, with no weight through the host.
  std::unique_ptr<DeviceSae> inference_sae(double input_scale, bool fold_decoder_norms,
                                           const SaeConfig& cfg) const;
  // sum_t ||x_t - mean||^2 of the last step's batch as the SAE saw it (scaled), computed on the
  // device (the progress line's explained variance; no copy of the batch to the host).
  double batch_sq_deviation();

  struct StepScalars {
    StepResult result;  // fired is left empty: the counters live on the device
    double grad_norm = 0;
    double threshold = 0;
    int64_t dead_after = 0;  // latents past the dead window after this step's counters
  };
  // One training step on the raw batch in host_batch(): scaled by input_scale on the device,
  // dead latents from the counters (> dead_window steps without firing), forward/backward,
  // threshold, counters (new_window zeroes the firing counts first), clip + Adam update number
  // adam_step (1-based) at learning rate lr.
  StepScalars step(double input_scale, double lr, int64_t adam_step, int64_t dead_window,
                   bool new_window);

  // Forward and backward only, on x [batch, d_in] as the SAE sees it, with an explicit dead
  // mask (empty = none): the same contract as train::forward_backward, gradients to the host.
  StepResult forward_backward(const float* x, const std::vector<uint8_t>& dead, Grads& g);

  // Phase timing with CUDA events (off by default: it costs a little).
  void enable_timing(bool on);
  const DeviceStepTimes& times() const;
  void reset_times();
  // Device memory in use on this GPU (total - free: this process, its CUDA context, others).
  size_t device_bytes() const;

  // What a DeviceTrainer of this shape allocates on the device, for memory plans made before
  // anything is allocated (computable without a GPU): its own state (parameters, optimizer
  // moments, counters, its stream's cuBLAS workspace) and its step scratch, with AuxK's
  // buffers sized for `max_dead` dead latents. Trainers sharing a scratch hold the largest one.
  static int64_t planned_state_bytes(const TrainSpec& spec, const AdamConfig& adam,
                                     const std::string& precision);
  static int64_t planned_scratch_bytes(const TrainSpec& spec, int64_t batch,
                                       const std::string& precision, int64_t max_dead);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sae::train
