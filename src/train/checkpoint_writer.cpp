#include "train/checkpoint_writer.h"

#include <utility>

#include "core/clock.h"

namespace sae::train {

CheckpointWriter::CheckpointWriter(int64_t max_bytes)
    : max_bytes_(max_bytes), thread_([this] { run(); }) {}

CheckpointWriter::~CheckpointWriter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();  // after the queue (a failed write has cleared it)
}

void CheckpointWriter::raise_locked() {
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

bool CheckpointWriter::has_room(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  raise_locked();
  return held_bytes_ == 0 || held_bytes_ + bytes <= max_bytes_;
}

void CheckpointWriter::submit(CheckpointData c) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    raise_locked();
    held_bytes_ += c.bytes();
    queue_.push_back(std::move(c));
  }
  cv_.notify_all();
}

CheckpointData CheckpointWriter::take_spare() {
  std::lock_guard<std::mutex> lock(mu_);
  raise_locked();
  if (spares_.empty()) return {};
  CheckpointData c = std::move(spares_.front());
  spares_.pop_front();
  spare_bytes_ -= c.bytes();
  return c;
}

bool CheckpointWriter::idle() {
  std::lock_guard<std::mutex> lock(mu_);
  raise_locked();
  return queue_.empty() && !writing_;
}

void CheckpointWriter::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return (queue_.empty() && !writing_) || error_; });
  raise_locked();
}

double CheckpointWriter::write_seconds() {
  std::lock_guard<std::mutex> lock(mu_);
  return write_seconds_;
}

void CheckpointWriter::run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopped, and nothing left to write
    CheckpointData c = std::move(queue_.front());
    queue_.pop_front();
    writing_ = true;
    lock.unlock();
    const double t0 = now_seconds();
    std::exception_ptr err;
    try {
      write_checkpoint(c);
    } catch (...) {
      err = std::current_exception();
    }
    const double seconds = now_seconds() - t0;
    const int64_t bytes = c.bytes();
    lock.lock();
    writing_ = false;
    held_bytes_ -= bytes;
    write_seconds_ += seconds;
    if (!err && held_bytes_ + spare_bytes_ + bytes <= max_bytes_) {
      spare_bytes_ += bytes;
      spares_.push_back(std::move(c));
    } else {
      lock.unlock();
      c = CheckpointData();  // its memory goes (outside the lock)
      lock.lock();
    }
    if (err) {  // the rest would be checkpoints of a job that is about to fail
      error_ = err;
      for (const CheckpointData& q : queue_) held_bytes_ -= q.bytes();
      queue_.clear();
    }
    cv_.notify_all();
  }
}

}  // namespace sae::train
