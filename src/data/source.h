// Where training activations come from. A batch is addressed by its index, so a run that
// resumes at batch b sees exactly the batches an uninterrupted run would.
#pragma once

#include <cstdint>
#include <string>

namespace sae::data {

class ActivationSource {
 public:
  virtual ~ActivationSource() = default;
  virtual int64_t d_in() const = 0;
  // Writes training batch `index` ([batch, d_in]) into out.
  virtual void train_batch(int64_t index, int64_t batch, float* out) = 0;
  // Held-out tokens never returned by train_batch; at most n (fewer if the source is small).
  virtual int64_t heldout_size(int64_t n) const = 0;
  virtual void heldout(int64_t n, float* out) = 0;
  virtual std::string describe() const = 0;
};

}  // namespace sae::data
