// Gemma-2 forward pass over ops/ kernels: weights from a Hugging Face checkpoint folder
// (model.safetensors or shards with model.safetensors.index.json), kept as f32 or as bf16
// upcast one matrix at a time; batches of prompts packed end to end; stops after the last
// layer anyone needs.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "model/gemma2_config.h"

namespace sae::model {

// TransformerLens hook points, named blocks.L.hook_<name>: the residual stream entering and
// leaving layer L, and what the attention and MLP blocks add to it (after their post-norms).
enum class HookPoint { ResidPre, AttnOut, MlpOut, ResidPost };
std::string hook_name(HookPoint p, int64_t layer);
// Parses "blocks.L.hook_resid_post" (and resid_pre, attn_out, mlp_out); throws otherwise.
std::pair<HookPoint, int64_t> parse_hook_name(const std::string& name);
HookPoint parse_hook_kind(const std::string& kind);  // "resid_post", ...

// Called at every hook point with the activation [tokens, hidden] of the whole batch.
using HookFn = std::function<void(HookPoint point, int64_t layer, float* act, int64_t tokens)>;

// Prompts packed end to end, no padding: prompt s is ids[starts[s] .. starts[s + 1]). Each
// prompt attends only to itself and its positions count from 0 — the same numbers as running
// each alone, and as a right-padded batch with an attention mask.
struct TokenBatch {
  std::vector<int32_t> ids;
  std::vector<int64_t> starts{0};

  void add(std::span<const int32_t> prompt);
  int64_t n_prompts() const { return int64_t(starts.size()) - 1; }
  int64_t n_tokens() const { return int64_t(ids.size()); }
};

// Checks a batch against the model (not empty, no empty prompt, none longer than the context,
// every id in the vocabulary; errors name the prompt or id) and returns each token's position
// in its prompt. Both forwards (CPU and GPU) start with it.
std::vector<int64_t> check_batch(const TokenBatch& batch, const Gemma2Config& c);

// A weight matrix [rows, cols]: f32, or bf16 upcast into a scratch buffer when used.
struct Weight {
  int64_t rows = 0, cols = 0;
  std::vector<float> f32;
  std::vector<uint16_t> bf16;

  // Pointer to f32 rows [r0, r1): the weight itself, or `scratch` filled from bf16.
  const float* rows_f32(int64_t r0, int64_t r1, std::vector<float>& scratch) const;
  const float* f32_data(std::vector<float>& scratch) const { return rows_f32(0, rows, scratch); }
  int64_t bytes() const { return int64_t(f32.size() * 4 + bf16.size() * 2); }
};

struct Gemma2Layer {
  std::vector<float> input_norm, post_attn_norm, pre_ff_norm, post_ff_norm;
  Weight q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
};

struct Gemma2Options {
  int64_t last_layer = -1;  // load layers 0..last_layer only (-1: all; logits need all)
  bool keep_bf16 = false;   // keep matrices in bf16 (half the memory, upcast per use)
  // With keep_bf16: multiply by them in bf16 instead — activations rounded to bf16 at every
  // weight GEMM, products summed in f32, as transformers' bf16 linear layers (ops/gemm_bf16.h;
  // about twice the f32 rate where the CPU has bf16 dot products).
  bool bf16_matmul = false;
  bool verbose = true;  // print the memory plan before allocating
};

class Gemma2 {
 public:
  // Reads config.json and the weights; prints the memory the weights need before allocating.
  static Gemma2 load(const std::string& folder, const Gemma2Options& opt = {});

  Gemma2Config cfg;
  Weight embed;                     // [vocab, hidden] (tied: also the output projection)
  std::vector<float> final_norm;    // [hidden]
  std::vector<Gemma2Layer> layers;  // the loaded ones: 0..last_layer
  bool bf16_matmul = false;         // Gemma2Options::bf16_matmul

  // Runs layers 0..last_layer on a batch, calling `hook` at every hook point with the
  // activation [n_tokens, hidden]; the hook may overwrite it (splicing) and the forward
  // continues with what it wrote. When last_layer is the model's final layer and `logits` is
  // given, applies the final norm and writes soft-capped logits [n_tokens, vocab];
  // `final_hidden` (optional) receives the normed final hidden states [n_tokens, hidden].
  // Prompts longer than max_position_embeddings are rejected.
  void forward(const TokenBatch& batch, int64_t last_layer, const HookFn& hook,
               std::vector<float>* final_hidden = nullptr,
               std::vector<float>* logits = nullptr) const;
  // One prompt.
  void forward(std::span<const int32_t> ids, int64_t last_layer, const HookFn& hook,
               std::vector<float>* final_hidden = nullptr,
               std::vector<float>* logits = nullptr) const;

  int64_t weight_bytes() const;
};

// Bytes the weights of layers 0..last_layer (and the embedding) take, f32 or bf16.
int64_t gemma2_weight_bytes(const Gemma2Config& c, int64_t last_layer, bool bf16);
// Device memory DeviceGemma2::forward's activations take for a batch of `tokens` tokens (bf16
// or fp32 operands; with logits: the vocabulary slice it projects at a time), plus its context's
// cuBLASLt workspace: for memory plans, made without a GPU.
int64_t device_forward_bytes(const Gemma2Config& c, int64_t tokens, bool bf16, bool logits);

}  // namespace sae::model
