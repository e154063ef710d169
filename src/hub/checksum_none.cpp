// Digests of a build without OpenSSL (and so without the Hub client, which needs both).
#include "core/error.h"
#include "hub/checksum.h"

namespace sae::hub {

std::string sha256_file_hex(const std::string& path) {
  fail(path, "", "this build has no SHA-256 (OpenSSL was not found when it was built)");
}
std::string git_blob_sha1_file_hex(const std::string& path) {
  fail(path, "", "this build has no SHA-1 (OpenSSL was not found when it was built)");
}

}  // namespace sae::hub
