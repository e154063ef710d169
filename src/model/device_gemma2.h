// Gemma-2 on the GPU: the forward of model/gemma2.h (the CPU version is its reference) with the
// weights resident in device memory and the activations kept there. Hooks receive device
// pointers, so what consumes them (an SAE being trained, a spliced reconstruction) can stay on
// the device too.
//
// precision "bf16": bf16 weights and GEMM operands, fp32 accumulate, fp32 residual stream and
// non-GEMM arithmetic. "fp32": fp32 throughout. In a build without CUDA the constructor throws
// a clear error.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/gemma2.h"

namespace sae::model {

// Called at every hook point with the device activation [tokens, hidden] (fp32), on the
// forward's stream: work the hook queues there is ordered with the forward. The hook may
// overwrite it (splicing); the forward continues with what it wrote.
using DeviceHookFn =
    std::function<void(HookPoint point, int64_t layer, float* device_act, int64_t tokens)>;

class DeviceGemma2 {
 public:
  // Uploads the embedding, the final norm and the layers `host` loaded.
  explicit DeviceGemma2(const Gemma2& host, const std::string& precision = "bf16");
  ~DeviceGemma2();
  DeviceGemma2(const DeviceGemma2&) = delete;
  DeviceGemma2& operator=(const DeviceGemma2&) = delete;

  const Gemma2Config& cfg() const;
  int64_t n_layers_loaded() const;
  int64_t weight_bytes() const;  // device memory the weights take

  // As Gemma2::forward; `logits` (host, [tokens, vocab], soft-capped) needs the last layer.
  // hook_writes = false promises that the hook only reads what it is given: the forward may
  // then run a residual add and the next norm in one kernel (Kernels::fused_add_norm), the
  // hook seeing the same values, called after both.
  void forward(const TokenBatch& batch, int64_t last_layer, const DeviceHookFn& hook,
               std::vector<float>* logits = nullptr, bool hook_writes = true);

  // rows [n, hidden] (host) times the tied unembedding: [n, vocab] on the host, without the
  // final norm and the soft-cap (the dashboard's logit effects), in the model's precision.
  std::vector<float> unembed(std::span<const float> rows, int64_t n);

  // A device activation copied to the host (after the work queued before it), and host rows
  // copied back over it (ordered on the forward's stream).
  std::vector<float> to_host(const float* device_act, int64_t n) const;
  void to_device(const std::vector<float>& host, float* device_act) const;
  // The stream the forward runs on (a cudaStream_t).
  void* stream() const;

  // Kernels written without a GPU at hand, off until a device check has passed them and
  // measured them faster (docs/gpu.md): the one-pass bf16 attention (ops/cuda/transformer.h,
  // TensorCoreAttention) and the post-norm, residual add and next norm in one kernel
  // (post_norm_add_norm; with hooks that only read).
  struct Kernels {
    bool one_pass_attention = false;
    bool fused_add_norm = false;
  };
  void set_kernels(Kernels k);
  Kernels kernels() const;
  // The set a name stands for: baseline (the defaults), one-pass, fused, or new (both). The
  // constructor takes SAECPP_FORWARD_KERNELS from the environment when it is set (the device
  // check's release benchmark runs the new kernels that way); a bad name is an error.
  static Kernels kernels_named(const std::string& name);
  // "bf16" or "fp32", else an error naming `where` (checked before anything loads, in every
  // build).
  static void check_precision(const std::string& where, const std::string& precision);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sae::model
