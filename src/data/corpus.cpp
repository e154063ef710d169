#include "data/corpus.h"

#include <glob.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "core/error.h"
#include "io/line_reader.h"
#include "io/npy.h"

namespace sae::data {

using json = nlohmann::json;

CorpusConfig CorpusConfig::from_json(const json& j, const std::string& where) {
  CorpusConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k == "shards")
      c.shards = it->is_string() ? std::vector<std::string>{it->get<std::string>()}
                                 : it->get<std::vector<std::string>>();
    else if (k == "text_field")
      c.text_field = it->get<std::string>();
    else if (k == "bin_dtype")
      c.bin_dtype = it->get<std::string>();
    else if (k == "holdout_every")
      c.holdout_every = it->get<int64_t>();
    else if (k == "max_bad_fraction")
      c.max_bad_fraction = it->get<double>();
    else
      fail(where, "corpus." + k, "unknown field");
  }
  if (c.shards.empty()) fail(where, "corpus.shards", "missing");
  if (c.bin_dtype != "u16" && c.bin_dtype != "u32")
    fail(where, "corpus.bin_dtype", "must be u16 or u32");
  if (c.holdout_every < 0 || c.holdout_every == 1)
    fail(where, "corpus.holdout_every", "must be 0 (no held-out split) or >= 2");
  return c;
}

json CorpusConfig::to_json() const {
  return {{"shards", shards},
          {"text_field", text_field},
          {"bin_dtype", bin_dtype},
          {"holdout_every", holdout_every},
          {"max_bad_fraction", max_bad_fraction}};
}

std::vector<std::string> expand_shards(const std::vector<std::string>& patterns) {
  std::vector<std::string> out;
  for (const std::string& p : patterns) {
    glob_t g{};
    const int rc = ::glob(p.c_str(), 0, nullptr, &g);
    std::vector<std::string> found;
    if (rc == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i) found.emplace_back(g.gl_pathv[i]);
    globfree(&g);
    if (found.empty()) fail(p, "", "no file matches this corpus shard pattern");
    std::sort(found.begin(), found.end());
    out.insert(out.end(), found.begin(), found.end());
  }
  return out;
}

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
constexpr int64_t kStreamChunk = 1 << 16;  // tokens per document cut from a flat stream
}  // namespace

// One shard. Returns documents; `bad` counts malformed lines it skipped.
class Corpus::Reader {
 public:
  Reader(const std::string& path, const CorpusConfig& cfg) : path_(path), cfg_(cfg) {
    if (ends_with(path, ".jsonl") || ends_with(path, ".jsonl.zst")) {
      kind_ = Kind::Jsonl;
      lines_ = std::make_unique<LineReader>(path);
    } else if (ends_with(path, ".txt") || ends_with(path, ".txt.zst")) {
      kind_ = Kind::Text;
      lines_ = std::make_unique<LineReader>(path);
    } else if (ends_with(path, ".npy")) {
      kind_ = Kind::Npy;
      npy_ = std::make_unique<NpyFile>(path);
      const auto& s = npy_->shape();
      if (s.empty() || s.size() > 2) fail(path, "shape", "token arrays must be 1-D or 2-D");
      const DType t = npy_->dtype();
      if (dtype_is_float(t) || t == DType::BOOL)
        fail(path, "dtype", "token arrays must hold integers");
      rows_ = s.size() == 2 ? s[0] : (s[0] + kStreamChunk - 1) / kStreamChunk;
      row_len_ = s.size() == 2 ? s[1] : kStreamChunk;
      total_ = npy_->numel();
    } else if (ends_with(path, ".bin")) {
      kind_ = Kind::Bin;
      bin_.open(path, std::ios::binary);
      if (!bin_) fail(path, "", "cannot open");
      elem_ = cfg.bin_dtype == "u32" ? 4 : 2;
    } else {
      fail(path, "", "unknown corpus format (.jsonl, .jsonl.zst, .txt, .npy, .bin)");
    }
  }

  // Next document (text or tokens) from this shard; false at its end.
  bool next(Document& d, int64_t& lines, int64_t& bad) {
    switch (kind_) {
      case Kind::Jsonl:
        while (lines_->next(line_)) {
          ++lines;
          if (line_.find_first_not_of(" \t") == std::string::npos) continue;
          json j = json::parse(line_, nullptr, /*allow_exceptions=*/false);
          if (j.is_object() && j.contains(cfg_.text_field) && j[cfg_.text_field].is_string()) {
            d.tokenized = false;
            d.text = j[cfg_.text_field].get<std::string>();
            return true;
          }
          ++bad;
          std::fprintf(stderr, "warning: %s:%lld: %s; line skipped\n", path_.c_str(),
                       (long long)lines_->line_number(),
                       j.is_discarded() ? "not valid JSON"
                                        : ("no string field \"" + cfg_.text_field + "\"").c_str());
        }
        return false;
      case Kind::Text:
        while (lines_->next(line_)) {
          ++lines;
          if (line_.find_first_not_of(" \t") == std::string::npos) continue;
          d.tokenized = false;
          d.text = line_;
          return true;
        }
        return false;
      case Kind::Npy: {
        if (row_ >= rows_) return false;
        const int64_t begin = row_ * row_len_, end = std::min(total_, begin + row_len_);
        d.tokenized = true;
        d.tokens.resize(size_t(end - begin));
        const uint8_t* p = npy_->data().data();
        for (int64_t i = begin; i < end; ++i) {
          int64_t v = 0;
          switch (npy_->dtype()) {
            case DType::U8:
              v = p[i];
              break;
            case DType::I8:
              v = int8_t(p[i]);
              break;
            case DType::U16:
              v = reinterpret_cast<const uint16_t*>(p)[i];
              break;
            case DType::I16:
              v = reinterpret_cast<const int16_t*>(p)[i];
              break;
            case DType::U32:
              v = reinterpret_cast<const uint32_t*>(p)[i];
              break;
            case DType::I32:
              v = reinterpret_cast<const int32_t*>(p)[i];
              break;
            case DType::U64:
              v = int64_t(reinterpret_cast<const uint64_t*>(p)[i]);
              break;
            default:
              v = reinterpret_cast<const int64_t*>(p)[i];
              break;
          }
          if (v < 0 || v > INT32_MAX) fail(path_, "tokens", cat("token id ", v, " out of range"));
          d.tokens[size_t(i - begin)] = int32_t(v);
        }
        ++row_;
        return true;
      }
      case Kind::Bin: {
        std::vector<uint8_t> raw(size_t(kStreamChunk * elem_));
        bin_.read(reinterpret_cast<char*>(raw.data()), std::streamsize(raw.size()));
        const int64_t n = int64_t(bin_.gcount()) / elem_;
        if (bin_.gcount() % elem_ != 0)
          fail(path_, "size", cat("not a whole number of ", cfg_.bin_dtype, " tokens"));
        if (n == 0) return false;
        d.tokenized = true;
        d.tokens.resize(size_t(n));
        for (int64_t i = 0; i < n; ++i) {
          uint32_t v = 0;
          std::memcpy(&v, raw.data() + i * elem_, size_t(elem_));
          if (v > INT32_MAX) fail(path_, "tokens", cat("token id ", v, " out of range"));
          d.tokens[size_t(i)] = int32_t(v);
        }
        return true;
      }
    }
    return false;
  }

 private:
  enum class Kind { Jsonl, Text, Npy, Bin };
  std::string path_;
  const CorpusConfig& cfg_;
  Kind kind_ = Kind::Text;
  std::unique_ptr<LineReader> lines_;
  std::string line_;
  std::unique_ptr<NpyFile> npy_;
  int64_t rows_ = 0, row_len_ = 0, row_ = 0, total_ = 0;
  std::ifstream bin_;
  int64_t elem_ = 2;
};

Corpus::Corpus(CorpusConfig cfg, Split split)
    : cfg_(std::move(cfg)), split_(split), paths_(expand_shards(cfg_.shards)) {}

Corpus::~Corpus() = default;

bool Corpus::next_any(Document& doc) {
  while (shard_ < paths_.size()) {
    if (!reader_) reader_ = std::make_unique<Reader>(paths_[shard_], cfg_);
    if (reader_->next(doc, lines_, bad_)) {
      doc.index = next_index_++;
      return true;
    }
    reader_.reset();
    ++shard_;
  }
  return false;
}

bool Corpus::next(Document& doc) {
  while (next_any(doc)) {
    if (bad_ > 0 && lines_ > 100 && double(bad_) > cfg_.max_bad_fraction * double(lines_))
      fail(paths_[std::min(shard_, paths_.size() - 1)], "lines",
           cat(bad_, " malformed lines out of ", lines_, " read, more than the allowed ",
               cfg_.max_bad_fraction * 100, "%"));
    const bool held = cfg_.holdout_every > 0 && doc.index % cfg_.holdout_every == 0;
    if (held != (split_ == Split::Heldout)) continue;
    if (n_shares_ > 1 && !held) {
      // The document's position in the training split: its index less the held-out indices
      // (0, h, 2h, ...) below it. A function of the index alone, so a seek keeps the shares.
      const int64_t h = cfg_.holdout_every;
      const int64_t ordinal = h > 0 ? doc.index - (doc.index + h - 1) / h : doc.index;
      if (ordinal % n_shares_ != share_) continue;
    }
    return true;
  }
  return false;
}

void Corpus::take_share(int share, int n) {
  SAE_CHECK(n >= 1 && share >= 0 && share < n, "corpus share ", share, " of ", n);
  share_ = share, n_shares_ = n;
}

void Corpus::seek(int64_t index) {
  Document d;
  while (next_index_ < index && next_any(d)) {
  }
}

}  // namespace sae::data
