// The CPU-only build: a DeviceTrainer cannot be made.
#include "core/device.h"
#include "core/error.h"
#include "train/device_step.h"

namespace sae::train {

struct DeviceTrainer::Impl {};

struct DeviceStepScratch {};

DeviceTrainer::DeviceTrainer(const TrainSpec&, const AdamConfig&, int64_t, const std::string&,
                             std::shared_ptr<DeviceStepScratch>) {
  require_device(Device::Cuda);  // throws: not built with CUDA
}
std::shared_ptr<DeviceStepScratch> DeviceTrainer::new_scratch() {
  return std::make_shared<DeviceStepScratch>();
}
DeviceTrainer::~DeviceTrainer() = default;
void DeviceTrainer::upload(const TrainingSae&, const Optimizer&, const std::vector<int64_t>&,
                           const std::vector<int64_t>&) {}
void DeviceTrainer::download(TrainingSae&, Optimizer*, std::vector<int64_t>*,
                             std::vector<int64_t>*) const {}
float* DeviceTrainer::host_batch() {
  return nullptr;
}
void DeviceTrainer::set_device_batch(const float*) {}
std::unique_ptr<DeviceSae> DeviceTrainer::inference_sae(double, bool, const SaeConfig&) const {
  return nullptr;
}
double DeviceTrainer::batch_sq_deviation() {
  return 0;
}
DeviceTrainer::StepScalars DeviceTrainer::step(double, double, int64_t, int64_t, bool) {
  return {};
}
StepResult DeviceTrainer::forward_backward(const float*, const std::vector<uint8_t>&, Grads&) {
  return {};
}
void DeviceTrainer::enable_timing(bool) {}
const DeviceStepTimes& DeviceTrainer::times() const {
  static DeviceStepTimes t;
  return t;
}
void DeviceTrainer::reset_times() {}
size_t DeviceTrainer::device_bytes() const {
  return 0;
}

}  // namespace sae::train
