// NCCL between the GPUs of a job's ranks (issue 12): device buffers go straight from one
// rank's GPU to another's (NVLink, or InfiniBand with GPUDirect), bootstrapped through the job's
// Comm (rank 0's unique id, broadcast). Built when CUDA, MPI and NCCL are all there; otherwise
// nccl_compiled() is false and the constructor throws. dist/ stays free of CUDA's types: a
// stream is a void* (cudaStream_t).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "dist/comm.h"

namespace sae::dist {

bool nccl_compiled();

// One point-to-point transfer of `floats` floats of device memory with rank `peer`.
struct DeviceSend {
  int peer = 0;
  const float* data = nullptr;
  int64_t floats = 0;
};
struct DeviceRecv {
  int peer = 0;
  float* data = nullptr;
  int64_t floats = 0;
};

class NcclComm {
 public:
  // A collective over `comm`; every rank's GPU already chosen (one GPU per rank: NCCL refuses
  // two ranks on one GPU).
  explicit NcclComm(Comm& comm);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Every send and receive of one exchange as one NCCL group (sends to and receives from this
  // rank itself included) on the communicator's own stream, then waits for it. Its own: another
  // thread may be running the model's forwards on theirs meanwhile (the release's overlap), and
  // the exchange must not queue behind them. The sends must be complete when it is called.
  void exchange(std::span<const DeviceSend> sends, std::span<const DeviceRecv> recvs);
  std::string describe() const;  // "NCCL 2.27.7"

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sae::dist
