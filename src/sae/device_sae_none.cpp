// The CPU-only build: a DeviceSae cannot be made.
#include "core/device.h"
#include "sae/device_sae.h"

namespace sae {

struct DeviceSae::Impl {
  SaeConfig cfg;
};

DeviceSae::DeviceSae(const Sae&, const std::string&, int64_t) {
  require_device(Device::Cuda);
}
DeviceSae::DeviceSae(const SaeConfig&, const DeviceSaeWeights&, const std::string&, int64_t) {
  require_device(Device::Cuda);
}
DeviceSae::~DeviceSae() = default;
const SaeConfig& DeviceSae::cfg() const {
  return impl_->cfg;
}
SparseCodes DeviceSae::encode(std::span<const float>, int64_t) {
  return {};
}
SparseCodes DeviceSae::encode_decode(std::span<const float>, int64_t, std::vector<float>&) {
  return {};
}
SparseCodes DeviceSae::encode_decode(std::span<const float>, int64_t, std::vector<float>&,
                                     std::span<const int64_t>, std::vector<double>&) {
  return {};
}

}  // namespace sae
