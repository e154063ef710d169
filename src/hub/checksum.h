// The digests the Hub names files by: an LFS file's ETag is the SHA-256 of its bytes, a regular
// (git) file's ETag is its git blob id, SHA-1 of "blob <size>\0" + bytes.
#pragma once

#include <string>

namespace sae::hub {

std::string sha256_file_hex(const std::string& path);
std::string git_blob_sha1_file_hex(const std::string& path);

}  // namespace sae::hub
