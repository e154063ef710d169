// The non-GEMM kernels of a Gemma-2 forward on the GPU, each the device mirror of its CPU
// reference in ops/ (rms_norm.h, rope.h, attention.h, gelu.h): the same formulas in fp32, so
// the CPU functions are their references in the kernel tests.
//
// Activations that feed a GEMM may be written in bf16 as well as (or instead of) fp32: an
// ActOut names the buffers a kernel writes (row-major, the kernel's [rows, cols]).
#pragma once

#include <cstdint>

#include "ops/cuda/runtime.h"

namespace sae::cuda {

struct ActOut {
  float* f32 = nullptr;      // written when not null
  uint16_t* bf16 = nullptr;  // written (round to nearest even) when not null
};

// h[t, :] = embed[ids[t], :] * scale (fp32 multiply, as the CPU); embed is bf16 or fp32
// [vocab, d]. ids are checked on the host.
void embed_rows(const Context& ctx, const int32_t* ids, int64_t tokens, const void* embed,
                bool embed_bf16, int64_t d, float scale, float* h);

// Gemma's RMSNorm: y = x / sqrt(mean(x^2) + eps) * (1 + w), per row of [rows, d].
void rms_norm_gemma(const Context& ctx, const float* x, const float* w, int64_t rows, int64_t d,
                    float eps, ActOut y);

// Gemma-2's post-norm, residual add and the next block's pre-norm in one pass over each row:
// x = rms_norm_gemma(y, w_post); h += x; xn = rms_norm_gemma(h, w_next), the same bits as those
// three kernels. x_out: written when not null; w_next null: no next norm (xn untouched).
// d <= 4096 (fused_norm_fits).
bool fused_norm_fits(int64_t d);
void post_norm_add_norm(const Context& ctx, const float* y, const float* w_post, float* h,
                        const float* w_next, int64_t rows, int64_t d, float eps, float* x_out,
                        ActOut xn);

// Rotary embedding, rotate-half convention, in place on x [tokens, heads, head_dim] with
// positions [tokens] (inv_freq and the angle in fp32, as transformers).
void rope_half(const Context& ctx, float* x, const int32_t* positions, int64_t tokens,
               int64_t heads, int64_t head_dim, double theta);

// Causal attention over prompts packed end to end: token t sees the tokens of its own prompt
// (prompt_start[t] <= j <= t), and with window > 0 only the last `window` of them. Scores are
// scaled, soft-capped (softcap > 0: tanh(s / cap) * cap) before the mask, softmaxed in fp32.
// q [tokens, heads, hd], k and v [tokens, kv_heads, hd] (GQA: head h reads kv head
// h / (heads / kv_heads)); out [tokens, heads, hd]. head_dim <= 256.
// bf16_math: on tensor cores (sm_80 and later, head_dim a power of two from 16 to 256), q, k, v and
// the softmax weights rounded to bf16, fp32 accumulate; else fp32 throughout (the CPU's
// arithmetic). `kind` picks the tensor-core kernel: TwoPass (WMMA; the rows' max and sum, then
// P V: measured on an H200) or OnePass (FlashAttention-2's online softmax on mma.sync, S and P in
// registers: not yet run on a GPU, so not the default until the device check passes it).
struct AttentionDims {
  int64_t tokens, heads, kv_heads, head_dim;
  float scale, softcap;
  int64_t window;
};
enum class TensorCoreAttention { TwoPass, OnePass };
void attention_packed(const Context& ctx, const float* q, const float* k, const float* v,
                      const int32_t* prompt_start, const AttentionDims& dims, ActOut out,
                      bool bf16_math = false,
                      TensorCoreAttention kind = TensorCoreAttention::TwoPass);
// Whether attention_packed(..., bf16_math = true) runs on tensor cores for this head_dim here.
bool tensor_core_attention(int64_t head_dim);

// out[t, i] = gelu_tanh(gu[t, i]) * gu[t, inter + i] for gu [tokens, 2 * inter] (the fused
// gate and up projections).
void gelu_mul(const Context& ctx, const float* gu, int64_t tokens, int64_t inter, ActOut out);

// h += x, n elements.
void add_into(const Context& ctx, float* h, const float* x, int64_t n);

// x = tanh(x / cap) * cap, n elements.
void soft_cap(const Context& ctx, float* x, int64_t n, float cap);

}  // namespace sae::cuda
