// The CPU-only build: DeviceRows cannot be made.
#include "core/device.h"
#include "pipeline/device_rows.h"

namespace sae::pipeline {

struct DeviceRows::Impl {};

DeviceRows::DeviceRows(size_t, int64_t, int64_t, void*, bool) {
  require_device(Device::Cuda);  // throws: not built with CUDA
}
DeviceRows::~DeviceRows() = default;
float* DeviceRows::row(size_t, int64_t) {
  return nullptr;
}
void DeviceRows::set_kept(const std::vector<int32_t>&) {}
void DeviceRows::append_kept(size_t, int64_t, const float*, int64_t, int64_t) {}
void DeviceRows::permute(const std::vector<int64_t>&) {}
void DeviceRows::to_host(size_t, int64_t, int64_t, float*) {}
void DeviceRows::sync() const {}
int64_t DeviceRows::bytes() const {
  return 0;
}
bool DeviceRows::on_host() const {
  return false;
}

}  // namespace sae::pipeline
