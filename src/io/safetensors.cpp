#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"

namespace sae {

namespace {

// Headers larger than this are refused (the Rust reader uses 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Element counts above this cannot be real and would overflow byte arithmetic.
constexpr uint64_t kMaxElements = uint64_t(1) << 56;

uint64_t read_le_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path), file_(path) {
  map_ = file_.bytes().data();
  map_size_ = file_.size();
  if (map_size_ < 8)
    fail(path, "header length",
         cat("file is ", map_size_, " bytes, shorter than the 8-byte header length"));
  {
    const uint64_t header_len = read_le_u64(map_);
    if (header_len > map_size_ - 8)
      fail(path, "header length",
           cat(header_len, " bytes runs past the end of the file (", map_size_, " bytes)"));
    if (header_len > kMaxHeaderBytes) fail(path, "header length", cat(header_len, " is too large"));
    if (header_len < 2) fail(path, "header", "is empty");
    data_ = map_ + 8 + header_len;
    const uint64_t data_size = map_size_ - 8 - header_len;

    nlohmann::json header;
    try {
      header = nlohmann::json::parse(map_ + 8, map_ + 8 + header_len);
    } catch (const nlohmann::json::parse_error& e) {
      fail(path, "header", cat("is not valid JSON (", e.what(), ")"));
    }
    if (!header.is_object()) fail(path, "header", "is not a JSON object");

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const auto& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail(path, "__metadata__", "is not an object");
        for (auto m2 = v.begin(); m2 != v.end(); ++m2) {
          if (!m2.value().is_string())
            fail(path, cat("__metadata__.", m2.key()), "is not a string");
          metadata_[m2.key()] = m2.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) fail(path, name, "entry is not an object");
      TensorInfo t;
      t.name = name;
      if (!v.contains("dtype") || !v["dtype"].is_string()) fail(path, name + ".dtype", "missing");
      auto dt = dtype_from_name(v["dtype"].get<std::string>());
      if (!dt) fail(path, name + ".dtype", cat("unknown dtype ", v["dtype"].dump()));
      t.dtype = *dt;
      if (!v.contains("shape") || !v["shape"].is_array()) fail(path, name + ".shape", "missing");
      uint64_t numel = 1;
      for (const auto& d : v["shape"]) {
        if (!d.is_number_unsigned()) fail(path, name + ".shape", cat("bad dimension ", d.dump()));
        uint64_t dim = d.get<uint64_t>();
        if (dim != 0 && numel > kMaxElements / dim)
          fail(path, name + ".shape", "element count overflows");
        numel *= dim;
        t.shape.push_back(int64_t(dim));
      }
      const auto& off = v.contains("data_offsets") ? v["data_offsets"] : nlohmann::json();
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
          !off[1].is_number_unsigned())
        fail(path, name + ".data_offsets", "missing or not two unsigned integers");
      t.begin = off[0].get<uint64_t>();
      t.end = off[1].get<uint64_t>();
      if (t.begin > t.end) fail(path, name + ".data_offsets", "begin is past end");
      if (t.end > data_size)
        fail(path, name + ".data_offsets",
             cat("end ", t.end, " is past the data section (", data_size, " bytes)"));
      if (t.end - t.begin != numel * dtype_size(t.dtype))
        fail(path, name + ".data_offsets",
             cat("span of ", t.end - t.begin, " bytes does not match shape and dtype (",
                 numel * dtype_size(t.dtype), " bytes)"));
      tensors_.push_back(std::move(t));
    }

    // No two tensors may share bytes.
    std::vector<const TensorInfo*> by_offset;
    for (const auto& t : tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(),
              [](auto* a, auto* b) { return a->begin < b->begin; });
    for (size_t i = 1; i < by_offset.size(); ++i)
      if (by_offset[i]->begin < by_offset[i - 1]->end && by_offset[i]->end > by_offset[i]->begin)
        fail(path, by_offset[i]->name + ".data_offsets",
             cat("overlaps tensor ", by_offset[i - 1]->name));
  }
}

bool SafetensorsFile::has(const std::string& name) const {
  return std::any_of(tensors_.begin(), tensors_.end(), [&](auto& t) { return t.name == name; });
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return t;
  fail(path_, name, "tensor is missing");
}

std::span<const uint8_t> SafetensorsFile::bytes(const TensorInfo& t) const {
  return {data_ + t.begin, size_t(t.end - t.begin)};
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name,
                                             const std::vector<int64_t>& expect_shape) const {
  const TensorInfo& t = info(name);
  if (!dtype_is_float(t.dtype))
    fail(path_, name, cat("dtype ", dtype_name(t.dtype), " is not a float type"));
  if (!expect_shape.empty() && t.shape != expect_shape) {
    auto fmt = [](const std::vector<int64_t>& s) {
      std::string r = "[";
      for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
      return r + "]";
    };
    fail(path_, name,
         cat("shape ", fmt(t.shape), " does not match the expected ", fmt(expect_shape)));
  }
  std::vector<float> out(static_cast<size_t>(t.numel()));
  convert_to_f32(t.dtype, bytes(t).data(), out.data(), out.size());
  return out;
}

std::vector<int64_t> SafetensorsFile::read_i64(const std::string& name) const {
  const TensorInfo& t = info(name);
  std::vector<int64_t> out(size_t(t.numel()));
  const uint8_t* p = bytes(t).data();
  for (size_t i = 0; i < out.size(); ++i) {
    switch (t.dtype) {
      case DType::I64: {
        int64_t v;
        std::memcpy(&v, p + 8 * i, 8);
        out[i] = v;
        break;
      }
      case DType::I32: {
        int32_t v;
        std::memcpy(&v, p + 4 * i, 4);
        out[i] = v;
        break;
      }
      case DType::U32: {
        uint32_t v;
        std::memcpy(&v, p + 4 * i, 4);
        out[i] = v;
        break;
      }
      case DType::U16: {
        uint16_t v;
        std::memcpy(&v, p + 2 * i, 2);
        out[i] = v;
        break;
      }
      case DType::U8:
        out[i] = p[i];
        break;
      default:
        fail(path_, name, cat("dtype ", dtype_name(t.dtype), " is not an integer type"));
    }
  }
  return out;
}

double SafetensorsFile::read_scalar_f64(const std::string& name) const {
  const TensorInfo& t = info(name);
  if (t.numel() != 1) fail(path_, name, "is not a scalar");
  if (t.dtype == DType::F64) {
    double v;
    std::memcpy(&v, bytes(t).data(), 8);
    return v;
  }
  if (dtype_is_float(t.dtype)) return read_f32(name)[0];
  return double(read_i64(name)[0]);
}

// ---- writing ----------------------------------------------------------------------------------

namespace {
template <class T>
std::span<const uint8_t> as_bytes_span(std::span<const T> v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}
}  // namespace

TensorToWrite tensor_view(std::string name, std::span<const float> v, std::vector<int64_t> shape) {
  return {std::move(name), DType::F32, std::move(shape), as_bytes_span(v)};
}
TensorToWrite tensor_view(std::string name, std::span<const int64_t> v,
                          std::vector<int64_t> shape) {
  return {std::move(name), DType::I64, std::move(shape), as_bytes_span(v)};
}
TensorToWrite tensor_view(std::string name, std::span<const int32_t> v,
                          std::vector<int64_t> shape) {
  return {std::move(name), DType::I32, std::move(shape), as_bytes_span(v)};
}
TensorToWrite tensor_view(std::string name, std::span<const double> v, std::vector<int64_t> shape) {
  return {std::move(name), DType::F64, std::move(shape), as_bytes_span(v)};
}
TensorToWrite tensor_view(std::string name, std::span<const uint16_t> v, DType dtype,
                          std::vector<int64_t> shape) {
  return {std::move(name), dtype, std::move(shape), as_bytes_span(v)};
}

namespace {
void sort_like_rust(std::vector<TensorToWrite>& tensors) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) {
    if (a.dtype != b.dtype) return a.dtype > b.dtype;
    return a.name < b.name;
  });
}
}  // namespace

std::vector<uint8_t> safetensors_header(const std::vector<TensorToWrite>& tensors_in,
                                        const std::map<std::string, std::string>& metadata) {
  std::vector<TensorToWrite> tensors = tensors_in;
  sort_like_rust(tensors);
  std::string h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":" + nlohmann::json(metadata).dump();
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= uint64_t(d);
    SAE_CHECK(numel * dtype_size(t.dtype) == t.data.size(), "tensor ", t.name,
              ": data size does not match shape");
    if (!first) h += ",";
    first = false;
    h += nlohmann::json(t.name).dump() + ":{\"dtype\":\"" + std::string(dtype_name(t.dtype)) +
         "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) h += (i ? "," : "") + std::to_string(t.shape[i]);
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," +
         std::to_string(offset + t.data.size()) + "]}";
    offset += t.data.size();
  }
  h += "}";
  while (h.size() % 8 != 0) h += ' ';
  std::vector<uint8_t> out(8 + h.size());
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = uint8_t(n >> (8 * i));
  std::memcpy(out.data() + 8, h.data(), h.size());
  return out;
}

void write_safetensors(const std::string& path, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata) {
  sort_like_rust(tensors);
  for (size_t i = 1; i < tensors.size(); ++i)
    if (tensors[i].name == tensors[i - 1].name)
      fail(path, tensors[i].name, "duplicate tensor name");
  AtomicFile f(path);
  f.write(safetensors_header(tensors, metadata));
  for (const auto& t : tensors) f.write(t.data);
  f.commit();
}

}  // namespace sae
