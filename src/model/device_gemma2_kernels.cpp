// DeviceGemma2's kernel sets by name (device_gemma2.h), in every build: the names are checked
// where no GPU is present too.
#include "core/error.h"
#include "model/device_gemma2.h"

namespace sae::model {

DeviceGemma2::Kernels DeviceGemma2::kernels_named(const std::string& name) {
  if (name == "baseline") return {};
  if (name == "one-pass") return {.one_pass_attention = true};
  if (name == "fused") return {.fused_add_norm = true};
  if (name == "new") return {.one_pass_attention = true, .fused_add_norm = true};
  fail("SAECPP_FORWARD_KERNELS", name, "unknown kernel set (baseline, one-pass, fused or new)");
}

void DeviceGemma2::check_precision(const std::string& where, const std::string& precision) {
  if (precision != "bf16" && precision != "fp32")
    fail(where, "precision",
         cat("'", precision, "' is not a precision of the GPU forward (bf16 or fp32)"));
}

}  // namespace sae::model
