// An SAE's inference on a GPU: the same encode and decode as sae::Sae (the CPU version is the
// reference), weights resident in device memory, host batches in and sparse codes out.
// precision: "fp32", "tf32" or "bf16" for the encoder GEMM's operands (fp32 accumulate).
// In a build without CUDA the constructor throws a clear error.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"
#include "sae/sae.h"

namespace sae {

// The encoder GEMM's precision is the GPU's choice: on the CPU inference runs in fp32, and any
// other precision is a clear error (`where`: the command; `gpu_hint`: how to ask for the GPU).
inline void require_cpu_precision(const std::string& precision, const std::string& where,
                                  const std::string& gpu_hint) {
  if (precision != "fp32")
    fail(where, "precision",
         cat(precision, " is the GPU encoder's (", gpu_hint,
             "); on the CPU the encoder runs in fp32"));
}

// Tokens per encoder GEMM when the caller does not say: as many as keep the [chunk, d_sae] fp32
// pre-activations under 1 GiB.
inline int64_t default_chunk_tokens(int64_t d_sae) {
  return std::clamp<int64_t>((int64_t(1) << 30) / (4 * d_sae), 256, 16384);
}

// What a DeviceSae with the default chunk allocates for encode_decode (with n_levels levels),
// for memory plans made before anything is allocated (computable without a GPU): weights,
// the staged batches, sae_in, the reconstruction, the pre-activations, codes sized for
// codes_per_token per token, the levels' errors.
inline int64_t planned_device_sae_bytes(int64_t d_in, int64_t d_sae, const std::string& precision,
                                        int64_t n_levels, int64_t codes_per_token) {
  const int64_t chunk = default_chunk_tokens(d_sae);
  const int64_t weights = (2 * d_sae * d_in + 2 * d_sae + d_in) * 4;
  const int64_t bf16 = precision == "bf16" ? (d_sae * d_in + chunk * d_in) * 2 : 0;
  const int64_t buffers = (4 * chunk * d_in + chunk * d_sae) * 4 + chunk * (2 * 4 + 2 * 8);
  return weights + bf16 + buffers + chunk * codes_per_token * 8 + chunk * n_levels * 8;
}

// An SAE's weights already in this GPU's memory, in Sae's layouts: W_enc [d_in, d_sae], W_dec
// [d_sae, d_in], b_enc [d_sae], b_dec [d_in], threshold [d_sae] (null without one).
struct DeviceSaeWeights {
  const float *W_enc = nullptr, *W_dec = nullptr, *b_enc = nullptr, *b_dec = nullptr;
  const float* threshold = nullptr;
};

class DeviceSae {
 public:
  // chunk_tokens: tokens per encoder GEMM (0: as many as keep [chunk, d_sae] under 1 GiB).
  DeviceSae(const Sae& sae, const std::string& precision = "fp32", int64_t chunk_tokens = 0);
  // The same from weights on the device, copied there (a trainer on the GPU evaluates its SAE
  // without bringing it to the host).
  DeviceSae(const SaeConfig& cfg, const DeviceSaeWeights& weights,
            const std::string& precision = "fp32", int64_t chunk_tokens = 0);
  ~DeviceSae();
  DeviceSae(const DeviceSae&) = delete;
  DeviceSae& operator=(const DeviceSae&) = delete;

  const SaeConfig& cfg() const;
  // x [n, d_in] row-major; rejects NaN/Inf like Sae::encode.
  SparseCodes encode(std::span<const float> x, int64_t n);
  // Codes and the reconstruction [n, d_in] from one pass (for evaluation).
  SparseCodes encode_decode(std::span<const float> x, int64_t n, std::vector<float>& x_hat);
  // The same, and the squared error of each Matryoshka level's prefix decode, summed over the
  // tokens as train::evaluate does on the host: level_sq_error[i] = sum_t ||x_t - (b_dec + sum
  // of value * W_dec row over the token's codes with index < widths[i])||^2 (no normalisation
  // or decoder-norm scaling), so a trainer on the GPU evaluates without the host's encoder.
  SparseCodes encode_decode(std::span<const float> x, int64_t n, std::vector<float>& x_hat,
                            std::span<const int64_t> widths, std::vector<double>& level_sq_error);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sae
