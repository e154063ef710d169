// One job per output folder: a job holds an exclusive lock (flock) on <folder>/<name> while it
// writes there, so that a second process started on the same folder (a resume launched while
// the first still runs, a requeued cluster job) stops at once instead of interleaving its
// checkpoints with the first's. The lock goes with the process however it ends (the kernel
// releases it); the file stays, naming the last holder. `sae status` asks whether it is held.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace sae {

class FolderLock {
 public:
  // Takes the lock on `path` (created if missing) and writes this process's pid, host and
  // start time into it; throws sae::Error naming the holder when another process holds it.
  // `job` says what holds it ("sae train", ...). On a file system without locks it warns and
  // holds nothing (the job is not stopped for it).
  FolderLock(std::string path, const std::string& job);
  ~FolderLock();  // releases it
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;

 private:
  std::string path_;
  int fd_ = -1;
};

// Who holds the lock on `path` now ({"job", "pid", "host", "started"}), or nullopt when nobody
// does (no file, or its last holder is gone). Takes nothing.
std::optional<nlohmann::json> folder_lock_holder(const std::string& path);

}  // namespace sae
