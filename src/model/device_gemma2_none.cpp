// The CPU-only build: a DeviceGemma2 cannot be made.
#include "core/device.h"
#include "model/device_gemma2.h"

namespace sae::model {

struct DeviceGemma2::Impl {
  Gemma2Config cfg;
};

DeviceGemma2::DeviceGemma2(const Gemma2&, const std::string&) {
  require_device(Device::Cuda);
}
DeviceGemma2::~DeviceGemma2() = default;
const Gemma2Config& DeviceGemma2::cfg() const {
  return impl_->cfg;
}
int64_t DeviceGemma2::n_layers_loaded() const {
  return 0;
}
int64_t DeviceGemma2::weight_bytes() const {
  return 0;
}
void DeviceGemma2::forward(const TokenBatch&, int64_t, const DeviceHookFn&, std::vector<float>*,
                           bool) {}
std::vector<float> DeviceGemma2::unembed(std::span<const float>, int64_t) {
  return {};
}
std::vector<float> DeviceGemma2::to_host(const float*, int64_t) const {
  return {};
}
void DeviceGemma2::to_device(const std::vector<float>&, float*) const {}
void* DeviceGemma2::stream() const {
  return nullptr;
}
void DeviceGemma2::set_kernels(Kernels) {}
DeviceGemma2::Kernels DeviceGemma2::kernels() const {
  return {};
}

}  // namespace sae::model
