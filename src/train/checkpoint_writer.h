// Trainers' checkpoints written on a thread of their own, one after another, so that training
// goes on while they reach the disk. A release at the seed's shape checkpoints 50 SAEs of 1.21 GB
// each (bench_upkeep: 3.1 s each at the development machine's 0.39 GB/s, 2.6 minutes in all),
// which its steps no longer wait for: they pay only for taking each state (a copy, or the pull
// from the GPU). Snapshots wait in a queue of at most max_bytes (one is always accepted, so a
// single SAE larger than the budget still goes through). A written snapshot is kept as a spare
// while the spares and the queue stay within max_bytes: the next state is taken into its arrays,
// whose pages are mapped (Trainer::checkpoint_data's `reuse`; into fresh memory the copy costs
// as much as the write on this machine). An error in a write (a full disk) is raised by the next
// call, and drops what was still queued. Destroyed, the writer first writes what it holds: the
// states taken before whatever ended the job (a stop, a NaN, a diverged SAE) are good ones.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "train/trainer.h"

namespace sae::train {

class CheckpointWriter {
 public:
  explicit CheckpointWriter(int64_t max_bytes);
  ~CheckpointWriter();  // what is queued is written first (unless a write has failed)
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // Whether a snapshot of `bytes` fits beside those held now (queued or being written).
  bool has_room(int64_t bytes);
  void submit(CheckpointData c);
  // A written snapshot to fill again (arrays allocated and mapped), or an empty one.
  CheckpointData take_spare();
  // Nothing queued or being written.
  bool idle();
  void wait();             // until idle
  double write_seconds();  // the writes' wall time so far

 private:
  void run();
  void raise_locked();  // rethrows a write's error (the caller holds mu_)

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<CheckpointData> queue_, spares_;
  const int64_t max_bytes_;
  int64_t held_bytes_ = 0;   // queued and being written
  int64_t spare_bytes_ = 0;  // in spares_
  bool writing_ = false, stop_ = false;
  std::exception_ptr error_;
  double write_seconds_ = 0;
  std::thread thread_;  // last: started once the rest is initialised
};

}  // namespace sae::train
