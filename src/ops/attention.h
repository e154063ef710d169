// Causal grouped-query attention for one sequence, with Gemma-2's logit soft-cap and an
// optional sliding window. Softmax in f32.
#pragma once

#include <cstdint>

namespace sae::ops {

struct AttentionShape {
  int64_t tokens, heads, kv_heads, head_dim;
  float scale;     // multiplies q.k
  float softcap;   // <= 0: none; else s = softcap * tanh(s / softcap)
  int64_t window;  // <= 0: none; else key j is visible from query i when i - j < window
};

// q: [T, heads, hd], k, v: [T, kv_heads, hd], out: [T, heads, hd]. Query head h reads KV head
// h / (heads / kv_heads). Scores and weighted sums are GEMMs over blocks of queries, each
// block only against the keys some query in it can see.
void attention_causal(const float* q, const float* k, const float* v, float* out,
                      const AttentionShape& s);

// The same with plain loops, one query at a time.
void attention_causal_reference(const float* q, const float* k, const float* v, float* out,
                                const AttentionShape& s);

}  // namespace sae::ops
