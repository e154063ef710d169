// Reads a text file line by line, decompressing .zst on the fly (libzstd streaming API), so a
// multi-GB Pile shard never sits in memory.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace sae {

class LineReader {
 public:
  explicit LineReader(const std::string& path);  // .zst by extension; throws if unreadable
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  // Next line without its '\n' (and '\r'); false at the end of the file.
  bool next(std::string& line);
  int64_t line_number() const { return line_no_; }  // 1-based number of the last line read

 private:
  bool fill();  // more decompressed bytes into buf_; false at the end

  std::string path_;
  std::FILE* file_ = nullptr;
  struct Zstd;
  std::unique_ptr<Zstd> zstd_;
  std::vector<char> in_, buf_;
  size_t pos_ = 0, end_ = 0;
  bool eof_ = false;
  int64_t line_no_ = 0;
};

}  // namespace sae
