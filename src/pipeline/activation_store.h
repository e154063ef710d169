// Text -> Gemma-2 -> shuffled SAE training batches, for several layers from one forward
// (SAELens's ActivationsStore + mixing_buffer): context windows are run `prompts_per_forward`
// at a time; the activations of every requested layer go into one buffer per layer of
// n_batches_in_buffer x prompts_per_forward x context_size tokens; once full it is shuffled
// (one permutation shared by the layers, so row i of every layer is the same token), the
// front half is served as batches and the back half kept to mix with the next fill.
// Special tokens (BOS, EOS, PAD) never reach the SAEs.
//
// The buffer is a ring of capacity + one forward's rows: a fill writes its rows after the kept
// ones and wraps into the rows already served, so the next fill can run while the current
// batches are served (fill ahead: on a thread of the store, for a GPU release where the
// forward then overlaps the SAE steps, or a release reading a cache's shards beside its steps)
// without more memory and with the same batches.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
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

// Where the store's rows come from: a stream of rows; each call appends up to `max_rows` rows of
// every layer at dst[i] ([rows, d] each) and returns how many (0: no more).
using RowFill = std::function<int64_t(const std::vector<float*>& dst, int64_t max_rows)>;

class ActivationStore {
 public:
  // Rows from the model's forward over the windows.
  ActivationStore(const model::Gemma2& m, WindowStream& windows, model::HookPoint point,
                  std::vector<int64_t> layers, StoreConfig cfg, std::vector<int32_t> special);
  // Rows from the model's forward on the GPU, kept in GPU memory (DeviceRows): the same
  // windows, rows, shuffle and batches as the CPU store, served in place by next_batch_view
  // (device addresses). rows_on_host: the rows in pinned host memory mapped for the GPU (when
  // they do not fit on it; slower, the same batches).
  ActivationStore(model::DeviceGemma2& m, WindowStream& windows, model::HookPoint point,
                  std::vector<int64_t> layers, StoreConfig cfg, std::vector<int32_t> special,
                  bool rows_on_host = false);
  // Rows from elsewhere (an activation cache): `fill` is asked for at most `max_fill_rows` rows
  // of each of `n_layers` layers of width d per call.
  ActivationStore(RowFill fill, int64_t max_fill_rows, int64_t d, size_t n_layers, StoreConfig cfg);
  ~ActivationStore();
  ActivationStore(const ActivationStore&) = delete;
  ActivationStore& operator=(const ActivationStore&) = delete;

  // From now on each fill runs on a thread of the store while the batches of the previous one are
  // served (the batches are the same). A GPU store's forwards then overlap the SAE steps. The
  // caller must not use the store's model, window stream or source meanwhile (its position:
  // checkpoint_position()). A CPU model's forward must not run beside other CPU GEMMs:
  // OpenBLAS built for OpenMP keeps its buffers per OpenMP thread number, which two host
  // threads share (seen as wrong rows in a test), so the release fills ahead on the GPU only,
  // or from a cache (reading its shards runs no GEMM).
  void fill_ahead();
  // Ends the filling thread (after its current forward) so that the model is the caller's again;
  // the store serves only the batches it has already shuffled, then refuses to refill.
  void stop_filling();
  // The position of the store's source (a corpus's next document, a cache's next shard: what
  // `position` returns) that a checkpoint records, from which a resumed store reads again. When
  // filling ahead, the position where the fill on the thread began: its rows are served only
  // after the next shuffle, so none of them was trained on, and a resume reads them again
  // rather than losing them. Otherwise the position now (after the last fill). Either way the
  // position after the last shuffled fill, whatever the thread's timing: a checkpoint records the
  // same position with and without filling ahead, and a resumed run is the same.
  void track_position(std::function<int64_t()> position) { position_ = std::move(position); }
  int64_t checkpoint_position();

  // Writes the next batch [batch_tokens, hidden] of layer layers[i] to out[i] (host memory; a
  // GPU store copies it there); false when the corpus ran out before a whole batch.
  bool next_batch(const std::vector<float*>& out);
  // The next batch in place: rows[i] points at layer i's batch inside the store (device memory
  // for a GPU store, complete when this returns), valid until the next call.
  bool next_batch_view(std::vector<const float*>& rows);
  bool on_device() const { return bool(dev_rows_); }
  // The rows' memory on the GPU, or pinned on the host for it.
  int64_t device_bytes() const {
    return dev_rows_ && !dev_rows_->on_host() ? dev_rows_->bytes() : 0;
  }
  int64_t pinned_host_bytes() const {
    return dev_rows_ && dev_rows_->on_host() ? dev_rows_->bytes() : 0;
  }

  int64_t tokens_forwarded() const { return tokens_forwarded_; }
  // Seconds spent in the model's forwards or reading the rows from elsewhere (on the filling
  // thread when filling ahead), and seconds the batch calls waited for a fill.
  double forward_seconds() const { return forward_seconds_; }
  double wait_seconds() const { return wait_seconds_; }
  int64_t buffer_tokens() const { return capacity_; }

 private:
  struct Stopped {};  // thrown on the filling thread when stop_filling() interrupts a fill
  enum class Round { Pending, Filling, Done };  // the next fill: not started, on the thread, done

  void allocate(int64_t max_fill_rows, size_t n_layers, bool rows_on_host = false);
  // Where the fill's row i goes: after the kept rows, wrapping into the served ones.
  int64_t slot(int64_t i) const { return (rows_ + i) % total_; }
  bool next_window_batch(model::TokenBatch& batch, std::vector<int32_t>& kept);
  void wait_for_slots(int64_t n);  // until the next n rows of the fill have served slots
  int64_t fill_chunk();            // one forward (or fill_ call): its rows added (0: the end)
  void fill_round();               // fill until the buffer is full (or the rows end)
  void shuffle_round();   // the kept and new rows, shuffled, at the front; the serving range
  void release_served();  // rows before serve_begin_ are no longer read
  void begin_round();     // the next fill, handed to the thread when filling ahead
  void finish_round();    // that fill done (here, or waited for)
  void filler_main();
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
  int64_t d_ = 0, capacity_ = 0, max_fill_ = 0;
  int64_t total_ = 0;                    // rows per layer: capacity_ + max_fill_
  std::vector<std::vector<float>> buf_;  // per layer, [total_, d]
  std::vector<float> spare_;             // [total_, d]: the target of the shuffle's gather
  int64_t rows_ = 0;                     // shuffled rows at the front: served, then kept
  int64_t serve_begin_ = 0, serve_end_ = 0;
  int64_t n_new_ = 0;  // rows of the fill in progress, at slot(0), slot(1), ...
  bool exhausted_ = false;
  std::mt19937_64 rng_;
  std::atomic<int64_t> tokens_forwarded_ = 0;
  std::atomic<double> forward_seconds_ = 0;
  double wait_seconds_ = 0;

  // Filling ahead. mu_ guards consumed_, round_ and fill_error_; the fill's own fields (n_new_,
  // exhausted_) pass between the threads with round_.
  std::mutex mu_, source_mu_;
  std::condition_variable cv_;
  int64_t consumed_ = 0;  // rows [0, consumed_) are served and free for the fill
  Round round_ = Round::Pending;
  bool ahead_ = false;
  std::atomic<bool> stopping_ = false;
  std::exception_ptr fill_error_;
  std::function<int64_t()> position_;  // the source's position (track_position)
  int64_t round_position_ = 0;         // where the round on the thread began
  int cuda_device_ = 0;                // the GPU of a device store, made current on the thread
  std::thread filler_;
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
