#include "io/line_reader.h"

#include <zstd.h>

#include <cstring>

#include "core/error.h"

namespace sae {

struct LineReader::Zstd {
  ZSTD_DStream* stream = ZSTD_createDStream();
  ZSTD_inBuffer in{nullptr, 0, 0};
  bool frame_done = true;  // between frames (a clean end of file)
  ~Zstd() { ZSTD_freeDStream(stream); }
};

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

LineReader::LineReader(const std::string& path) : path_(path) {
  file_ = std::fopen(path.c_str(), "rb");
  if (!file_) fail(path, "", cat("cannot open: ", std::strerror(errno)));
  buf_.resize(1 << 20);
  if (ends_with(path, ".zst")) {
    zstd_ = std::make_unique<Zstd>();
    in_.resize(ZSTD_DStreamInSize());
    ZSTD_initDStream(zstd_->stream);
  }
}

LineReader::~LineReader() {
  if (file_) std::fclose(file_);
}

bool LineReader::fill() {
  // Keep the unread tail at the front.
  if (pos_ > 0) {
    std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
    end_ -= pos_;
    pos_ = 0;
  }
  if (end_ == buf_.size()) buf_.resize(buf_.size() * 2);  // a very long line
  if (!zstd_) {
    const size_t n = std::fread(buf_.data() + end_, 1, buf_.size() - end_, file_);
    if (n == 0 && std::ferror(file_)) fail(path_, "", "read error");
    end_ += n;
    return n > 0;
  }
  Zstd& z = *zstd_;
  while (true) {
    if (z.in.pos == z.in.size) {
      const size_t n = std::fread(in_.data(), 1, in_.size(), file_);
      if (n == 0) {
        if (std::ferror(file_)) fail(path_, "", "read error");
        if (!z.frame_done) fail(path_, "zstd", "truncated: the file ends inside a frame");
        return false;
      }
      z.in = {in_.data(), n, 0};
    }
    ZSTD_outBuffer out{buf_.data() + end_, buf_.size() - end_, 0};
    const size_t r = ZSTD_decompressStream(z.stream, &out, &z.in);
    if (ZSTD_isError(r)) fail(path_, "zstd", ZSTD_getErrorName(r));
    z.frame_done = r == 0;
    end_ += out.pos;
    if (out.pos > 0) return true;
  }
}

bool LineReader::next(std::string& line) {
  while (true) {
    const char* start = buf_.data() + pos_;
    const void* nl = std::memchr(start, '\n', end_ - pos_);
    if (nl) {
      const size_t len = size_t(static_cast<const char*>(nl) - start);
      line.assign(start, len);
      pos_ += len + 1;
      break;
    }
    if (eof_ || !fill()) {
      eof_ = true;
      if (pos_ == end_) return false;
      line.assign(buf_.data() + pos_, end_ - pos_);  // last line without '\n'
      pos_ = end_;
      break;
    }
  }
  if (!line.empty() && line.back() == '\r') line.pop_back();
  ++line_no_;
  return true;
}

}  // namespace sae
