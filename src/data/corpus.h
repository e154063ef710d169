// A streaming text corpus: shards named by globs, read in a fixed order, one document at a
// time. Formats by extension: .jsonl / .jsonl.zst (the Pile: one JSON object per line, text in
// `text_field`), .txt (one document per non-empty line), and pre-tokenised shards — .npy
// (int, 1-D: one token stream; 2-D: one document per row) and .bin (a flat u16 or u32 stream).
// Every `holdout_every`-th document is held out (a deterministic split that needs no count).
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace sae::data {

struct CorpusConfig {
  std::vector<std::string> shards;  // paths or globs; expanded and sorted, order kept
  std::string text_field = "text";
  std::string bin_dtype = "u16";  // .bin token streams: u16 | u32
  int64_t holdout_every = 100;    // document i is held out when i % holdout_every == 0 (0: none)
  // A malformed line is skipped with a warning; more than this fraction of the lines read so
  // far (after the first 100 lines) is an error.
  double max_bad_fraction = 0.01;
  static CorpusConfig from_json(const nlohmann::json& j, const std::string& where);
  nlohmann::json to_json() const;
};

enum class Split { Train, Heldout };

struct Document {
  int64_t index = 0;       // position in the whole corpus (both splits)
  bool tokenized = false;  // tokens (pre-tokenised shards) or text
  std::string text;
  std::vector<int32_t> tokens;
};

// Expands globs (sorted within each pattern); throws naming the pattern when one matches
// nothing.
std::vector<std::string> expand_shards(const std::vector<std::string>& patterns);

class Corpus {
 public:
  Corpus(CorpusConfig cfg, Split split);
  ~Corpus();
  // The next document of this split; false when every shard is read.
  bool next(Document& doc);
  // Skips ahead so the next document returned has index >= `index` (resume).
  void seek(int64_t index);
  // Several processes reading one corpus (module parallel): this one takes every n-th document
  // of the training split, starting at the `share`-th, so that the shares partition it.
  // The held-out split is not divided (every process evaluates on the same documents).
  void take_share(int share, int n);
  int64_t bad_lines() const { return bad_; }
  int64_t next_document() const { return next_index_; }  // the position to seek to on resume
  const std::vector<std::string>& shard_paths() const { return paths_; }

 private:
  class Reader;
  bool next_any(Document& doc);  // the next document of either split

  CorpusConfig cfg_;
  Split split_;
  std::vector<std::string> paths_;
  size_t shard_ = 0;
  std::unique_ptr<Reader> reader_;
  int64_t next_index_ = 0, lines_ = 0, bad_ = 0;
  int share_ = 0, n_shares_ = 1;
};

}  // namespace sae::data
