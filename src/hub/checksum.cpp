#include "hub/checksum.h"

#include <openssl/evp.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

#include "core/error.h"

namespace sae::hub {

namespace {

struct MdDeleter {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};

std::string digest_file(const std::string& path, const EVP_MD* md, const std::string& prefix) {
  std::unique_ptr<EVP_MD_CTX, MdDeleter> ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestInit_ex(ctx.get(), md, nullptr) != 1)
    fail(path, "", "cannot start a digest");
  EVP_DigestUpdate(ctx.get(), prefix.data(), prefix.size());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "", "cannot open to check its digest");
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    EVP_DigestUpdate(ctx.get(), buf.data(), size_t(in.gcount()));
  }
  if (in.bad()) fail(path, "", "read error while checking its digest");
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  EVP_DigestFinal_ex(ctx.get(), out, &len);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) s += hex[out[i] >> 4], s += hex[out[i] & 15];
  return s;
}

}  // namespace

std::string sha256_file_hex(const std::string& path) {
  return digest_file(path, EVP_sha256(), "");
}

std::string git_blob_sha1_file_hex(const std::string& path) {
  const auto size = std::filesystem::file_size(path);
  return digest_file(path, EVP_sha1(), "blob " + std::to_string(size) + std::string(1, '\0'));
}

}  // namespace sae::hub
