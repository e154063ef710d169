// An SAE's inference on a GPU: the same encode and decode as sae::Sae (the CPU version is the
// reference), weights resident in device memory, host batches in and sparse codes out.
// precision: "fp32", "tf32" or "bf16" for the encoder GEMM's operands (fp32 accumulate).
// In a build without CUDA the constructor throws a clear error.
#pragma once

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

class DeviceSae {
 public:
  // chunk_tokens: tokens per encoder GEMM (0: as many as keep [chunk, d_sae] under 1 GiB).
  DeviceSae(const Sae& sae, const std::string& precision = "fp32", int64_t chunk_tokens = 0);
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
