// safetensors: read by mmap with every header field validated before data is touched;
// write atomically (temp file in the same folder, fsync, rename) in the byte layout of the
// reference Rust writer.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/mapped_file.h"

namespace sae {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;

  int64_t numel() const;
};

// A read-only, memory-mapped safetensors file. Tensors are views into the mapping.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws sae::Error naming path and field

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // throws if missing

  // Raw bytes of a tensor, inside the mapping.
  std::span<const uint8_t> bytes(const TensorInfo& t) const;
  // Tensor converted to f32 (F32, F16, BF16, F64). Checks that the shape is `expect_shape`
  // when given (an empty expectation means "any shape").
  std::vector<float> read_f32(const std::string& name,
                              const std::vector<int64_t>& expect_shape = {}) const;
  std::vector<int64_t> read_i64(const std::string& name) const;  // I32, I64, U16, U32, U8
  double read_scalar_f64(const std::string& name) const;         // any float/int scalar

 private:
  std::string path_;
  MappedFile file_;
  const uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write: bytes are little-endian, already in `dtype`.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::span<const uint8_t> data;
};

// Helpers that build a TensorToWrite over an existing buffer (the buffer must outlive the write).
TensorToWrite tensor_view(std::string name, std::span<const float> v, std::vector<int64_t> shape);
TensorToWrite tensor_view(std::string name, std::span<const int64_t> v, std::vector<int64_t> shape);
TensorToWrite tensor_view(std::string name, std::span<const int32_t> v, std::vector<int64_t> shape);
TensorToWrite tensor_view(std::string name, std::span<const double> v, std::vector<int64_t> shape);
TensorToWrite tensor_view(std::string name, std::span<const uint16_t> v, DType dtype,
                          std::vector<int64_t> shape);

// Serialises as the Rust writer does: tensors sorted by dtype (descending) then name, compact
// JSON header with "__metadata__" first, padded with spaces to a multiple of 8.
std::vector<uint8_t> safetensors_header(const std::vector<TensorToWrite>& tensors,
                                        const std::map<std::string, std::string>& metadata);
void write_safetensors(const std::string& path, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace sae
