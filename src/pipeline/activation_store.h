// Text -> Gemma-2 -> shuffled SAE training batches, for several layers from one forward
// (SAELens's ActivationsStore + mixing_buffer): context windows are run `prompts_per_forward`
// at a time; the activations of every requested layer go into one buffer per layer of
// n_batches_in_buffer x prompts_per_forward x context_size tokens; once full it is shuffled
// (one permutation shared by the layers, so row i of every layer is the same token), the
// front half is served as batches and the back half kept to mix with the next fill.
// Special tokens (BOS, EOS, PAD) never reach the SAEs.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "data/context_windows.h"
#include "data/corpus.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "pipeline/device_rows.h"

namespace sae::pipeline {

// The requested layers sorted, without repeats, each checked against the model (`where` names
// the job in errors).
std::vector<int64_t> checked_layers(std::vector<int64_t> layers, int64_t n_layers,
                                    const std::string& where);

// keep[t] = 1 where ids[t] is not one of `special` (BOS/EOS/PAD never reach an SAE).
std::vector<uint8_t> non_special(std::span<const int32_t> ids, const std::vector<int32_t>& special);

struct StoreConfig {
  data::WindowConfig windows;
  int64_t prompts_per_forward = 8;  // SAELens store_batch_size_prompts
  int64_t n_batches_in_buffer = 4;  // SAELens n_batches_in_buffer
  int64_t batch_tokens = 4096;      // SAELens train_batch_size_tokens
  bool exclude_special = true;      // drop BOS/EOS/PAD positions (SAELens exclude_special_tokens)
  uint64_t seed = 0;
};

// Pulls context windows of a corpus split through the tokenizer and packer.
class WindowStream {
 public:
  WindowStream(data::Corpus& corpus, const model::Tokenizer& tok, data::WindowConfig cfg);
  // The next window (false when the corpus is exhausted) and, when asked, its tokens' origins.
  bool next(std::vector<int32_t>& window, std::vector<data::TokenOrigin>* origins = nullptr);
  int64_t windows() const { return windows_; }

 private:
  data::Corpus& corpus_;
  const model::Tokenizer& tok_;
  data::ContextWindows packer_;
  data::Document doc_;
  int64_t windows_ = 0;
};

// Where the store's rows come from: each call appends up to `max_rows` rows of every layer at
// dst[i] ([rows, d] each) and returns how many (0: no more).
using RowFill = std::function<int64_t(const std::vector<float*>& dst)>;

class ActivationStore {
 public:
  // Rows from the model's forward over the windows.
  ActivationStore(const model::Gemma2& m, WindowStream& windows, model::HookPoint point,
                  std::vector<int64_t> layers, StoreConfig cfg, std::vector<int32_t> special);
  // Rows from the model's forward on the GPU, kept in GPU memory (DeviceRows): the same
  // windows, rows, shuffle and batches as the CPU store, served in place by next_batch_view.
  ActivationStore(model::DeviceGemma2& m, WindowStream& windows, model::HookPoint point,
                  std::vector<int64_t> layers, StoreConfig cfg, std::vector<int32_t> special);
  // Rows from elsewhere (an activation cache): `fill` appends at most `max_fill_rows` rows of
  // each of `n_layers` layers of width d per call.
  ActivationStore(RowFill fill, int64_t max_fill_rows, int64_t d, size_t n_layers, StoreConfig cfg);
  // Writes the next batch [batch_tokens, hidden] of layer layers[i] to out[i] (host memory; a
  // GPU store copies it there); false when the corpus ran out before a whole batch.
  bool next_batch(const std::vector<float*>& out);
  // The next batch in place: rows[i] points at layer i's batch inside the store (device memory
  // for a GPU store, complete when this returns), valid until the next call.
  bool next_batch_view(std::vector<const float*>& rows);
  bool on_device() const { return bool(dev_rows_); }
  int64_t device_bytes() const { return dev_rows_ ? dev_rows_->bytes() : 0; }

  int64_t tokens_forwarded() const { return tokens_forwarded_; }
  double forward_seconds() const { return forward_seconds_; }
  int64_t buffer_tokens() const { return capacity_; }

 private:
  int64_t forward_once(const std::vector<float*>& dst);  // one forward: rows appended
  int64_t forward_once_on_device(int64_t at);            // ... on the GPU, at row `at`
  bool next_window_batch(model::TokenBatch& batch, std::vector<int32_t>& kept);
  void allocate(int64_t max_fill_rows, size_t n_layers);
  void refill();   // fill until full (or the rows end), shuffle, mark the serving half
  bool advance();  // the next batch's rows at serve_begin_ (refilled when needed)

  const model::Gemma2* m_ = nullptr;
  model::DeviceGemma2* dm_ = nullptr;
  std::unique_ptr<DeviceRows> dev_rows_;  // the buffer on the GPU (else buf_)
  WindowStream* windows_ = nullptr;
  model::HookPoint point_ = model::HookPoint::ResidPost;
  std::vector<int64_t> layers_;
  StoreConfig cfg_;
  std::vector<int32_t> special_;
  RowFill fill_;
  int64_t d_ = 0, capacity_ = 0;
  std::vector<std::vector<float>> buf_;  // per layer, [rows, d]
  int64_t rows_ = 0;                     // filled rows
  int64_t serve_begin_ = 0, serve_end_ = 0;
  bool exhausted_ = false;
  std::mt19937_64 rng_;
  int64_t tokens_forwarded_ = 0;
  double forward_seconds_ = 0;
};

// Activations of held-out windows for every layer: up to `n_tokens` non-special rows per layer
// ([n, hidden] each), and the windows themselves (for the CE-loss score).
struct Heldout {
  std::vector<std::vector<float>> acts;
  int64_t n = 0;
  std::vector<std::vector<int32_t>> windows;
};
Heldout collect_heldout(const model::Gemma2& m, WindowStream& windows, model::HookPoint point,
                        const std::vector<int64_t>& layers, int64_t n_tokens,
                        const std::vector<int32_t>& special);
// The same through the GPU forward (the rows come to the host).
Heldout collect_heldout(model::DeviceGemma2& m, WindowStream& windows, model::HookPoint point,
                        const std::vector<int64_t>& layers, int64_t n_tokens,
                        const std::vector<int32_t>& special);

}  // namespace sae::pipeline
