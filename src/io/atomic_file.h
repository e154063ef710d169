// Writes a file so that readers see either the old file or the whole new one, never a part:
// data goes to "<path>.tmp.<pid>.<n>" in the same folder, is fsynced, then renamed over <path>.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace sae {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);  // opens the temp file; throws sae::Error
  ~AtomicFile();                          // removes the temp file unless commit() ran
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(std::span<const uint8_t> bytes);
  void write(std::string_view text);
  void commit();  // fsync, close, rename over the target, fsync the folder

 private:
  std::string path_, tmp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

void write_file_atomic(const std::string& path, std::string_view text);

}  // namespace sae
