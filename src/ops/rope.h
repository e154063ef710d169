// Rotary position embeddings, half-rotation layout (HF Llama/Gemma): for i < hd/2,
// (a, b) = (x[i], x[i + hd/2]) rotates by angle pos * theta^(-2i/hd).
#pragma once

#include <cstdint>

namespace sae::ops {

// x: [tokens, heads, head_dim] in place; positions: [tokens].
void rope_half(float* x, const int64_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
               double theta);

}  // namespace sae::ops
