// Decoding from sparse codes: out[t] = bias + sum over active latents i of value_i * W[i, :].
// Codes are CSR: token t's entries are [offsets[t], offsets[t+1]) of indices/values.
#pragma once

#include <cstdint>

namespace sae::ops {

// w is [n_latents, d]; bias is [d] or null; out is [n_tokens, d].
void sparse_decode(int64_t n_tokens, const int64_t* offsets, const int32_t* indices,
                   const float* values, const float* w, int64_t d, const float* bias, float* out);

// Reference: builds the dense [n_tokens, n_latents] code matrix and multiplies in double.
void sparse_decode_reference(int64_t n_tokens, int64_t n_latents, const int64_t* offsets,
                             const int32_t* indices, const float* values, const float* w, int64_t d,
                             const float* bias, float* out);

}  // namespace sae::ops
