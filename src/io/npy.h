// NumPy .npy files (format versions 1–3, little-endian, C order), memory-mapped.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/mapped_file.h"

namespace sae {

class NpyFile {
 public:
  explicit NpyFile(const std::string& path);  // throws sae::Error naming path and field

  const std::string& path() const { return path_; }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const;
  std::span<const uint8_t> data() const { return data_; }

 private:
  std::string path_;
  MappedFile file_;
  DType dtype_ = DType::F32;
  std::vector<int64_t> shape_;
  std::span<const uint8_t> data_;
};

// Writes a C-order little-endian array atomically (format version 1.0).
void write_npy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
               std::span<const uint8_t> data);

}  // namespace sae
