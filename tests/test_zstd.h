// Compressing test corpora to .zst (the tests link libzstd).
#pragma once

#include <zstd.h>

#include <string>

namespace sae::test {

inline std::string zstd_compress(const std::string& s) {
  std::string out(ZSTD_compressBound(s.size()), '\0');
  const size_t n = ZSTD_compress(out.data(), out.size(), s.data(), s.size(), 3);
  out.resize(n);
  return out;
}

}  // namespace sae::test
