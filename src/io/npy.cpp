#include "io/npy.h"

#include <cstring>

#include "core/error.h"
#include "io/atomic_file.h"

namespace sae {

namespace {

struct DescrMap {
  std::string_view descr;
  DType dtype;
};
constexpr DescrMap kDescr[] = {
    {"<f4", DType::F32}, {"<f2", DType::F16}, {"<f8", DType::F64},  {"<i4", DType::I32},
    {"<i8", DType::I64}, {"<u2", DType::U16}, {"<u4", DType::U32},  {"|u1", DType::U8},
    {"|i1", DType::I8},  {"<i2", DType::I16}, {"|b1", DType::BOOL}, {"<u8", DType::U64},
};

// Returns the text after `'key':` in a NumPy header dict, with leading spaces skipped.
std::string_view value_after(std::string_view header, std::string_view key,
                             const std::string& path) {
  std::string quoted = cat("'", key, "'");
  size_t p = header.find(quoted);
  if (p == std::string_view::npos) fail(path, key, "missing from the .npy header");
  p = header.find(':', p + quoted.size());
  if (p == std::string_view::npos) fail(path, key, "has no value in the .npy header");
  ++p;
  while (p < header.size() && header[p] == ' ') ++p;
  return header.substr(p);
}

}  // namespace

int64_t NpyFile::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

NpyFile::NpyFile(const std::string& path) : path_(path), file_(path) {
  auto b = file_.bytes();
  if (b.size() < 10 || std::memcmp(b.data(), "\x93NUMPY", 6) != 0)
    fail(path, "magic", "not a .npy file");
  const int major = b[6];
  size_t header_len, header_start;
  if (major == 1) {
    header_len = size_t(b[8]) | (size_t(b[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (b.size() < 12) fail(path, "header length", "file is truncated");
    header_len = size_t(b[8]) | (size_t(b[9]) << 8) | (size_t(b[10]) << 16) | (size_t(b[11]) << 24);
    header_start = 12;
  } else {
    fail(path, "version", cat("unsupported .npy format version ", major));
  }
  if (header_start + header_len > b.size())
    fail(path, "header length", "runs past the end of the file");
  std::string_view header(reinterpret_cast<const char*>(b.data() + header_start), header_len);

  std::string_view descr = value_after(header, "descr", path);
  if (descr.size() < 2 || descr[0] != '\'') fail(path, "descr", "is not a string");
  descr = descr.substr(1, descr.find('\'', 1) - 1);
  bool known = false;
  for (const auto& d : kDescr)
    if (d.descr == descr || (d.descr[0] == '<' && descr == cat("|", d.descr.substr(1)))) {
      dtype_ = d.dtype;
      known = true;
    }
  if (!known) fail(path, "descr", cat("unsupported dtype '", descr, "' (need little-endian)"));

  std::string_view fortran = value_after(header, "fortran_order", path);
  if (fortran.starts_with("True"))
    fail(path, "fortran_order", "Fortran-order arrays are not supported");

  std::string_view shape = value_after(header, "shape", path);
  if (shape.empty() || shape[0] != '(') fail(path, "shape", "is not a tuple");
  size_t close = shape.find(')');
  if (close == std::string_view::npos) fail(path, "shape", "is not a tuple");
  shape = shape.substr(1, close - 1);
  uint64_t numel = 1;
  size_t i = 0;
  while (i < shape.size()) {
    while (i < shape.size() && (shape[i] == ' ' || shape[i] == ',')) ++i;
    if (i >= shape.size()) break;
    if (shape[i] < '0' || shape[i] > '9') fail(path, "shape", "has a non-integer dimension");
    uint64_t d = 0;
    while (i < shape.size() && shape[i] >= '0' && shape[i] <= '9') {
      d = d * 10 + uint64_t(shape[i] - '0');
      if (d > (uint64_t(1) << 48)) fail(path, "shape", "dimension too large");
      ++i;
    }
    if (d != 0 && numel > (uint64_t(1) << 56) / d) fail(path, "shape", "element count overflows");
    numel *= d;
    shape_.push_back(int64_t(d));
  }
  const size_t data_start = header_start + header_len;
  const uint64_t need = numel * dtype_size(dtype_);
  if (b.size() - data_start < need)
    fail(path, "data",
         cat("file holds ", b.size() - data_start, " data bytes, shape needs ", need));
  data_ = b.subspan(data_start, size_t(need));
}

void write_npy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
               std::span<const uint8_t> data) {
  std::string_view descr;
  for (const auto& d : kDescr)
    if (d.dtype == dtype) descr = d.descr;
  if (descr.empty()) fail(path, "dtype", cat(dtype_name(dtype), " cannot be written to .npy"));
  std::string shape_str = "(";
  for (size_t i = 0; i < shape.size(); ++i) shape_str += cat(i ? ", " : "", shape[i]);
  shape_str += shape.size() == 1 ? ",)" : ")";  // NumPy writes (n,) for one dimension
  std::string header =
      cat("{'descr': '", descr, "', 'fortran_order': False, 'shape': ", shape_str, ", }");
  // Pad so the data starts on a 64-byte boundary, ending the header with '\n'.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string prefix = "\x93NUMPY\x01";
  prefix += '\0';
  prefix += char(header.size() & 0xff);
  prefix += char(header.size() >> 8);
  AtomicFile f(path);
  f.write(prefix);
  f.write(header);
  f.write(data);
  f.commit();
}

}  // namespace sae
