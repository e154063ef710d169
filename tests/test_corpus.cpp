// Corpus readers (every format, bad lines, split, seek), SAELens context windows (goldens from
// scripts/make_window_goldens.py) and the zstd line reader.
#include <gtest/gtest.h>

#include "core/error.h"
#include "data/context_windows.h"
#include "data/corpus.h"
#include "io/json_file.h"
#include "io/line_reader.h"
#include "test_util.h"
#include "test_zstd.h"

namespace sae::data {
namespace {

using test::zstd_compress;

std::vector<std::string> texts(Corpus& c) {
  std::vector<std::string> out;
  Document d;
  while (c.next(d)) out.push_back(d.text);
  return out;
}

TEST(ContextWindows, MatchSaeLensConcatAndBatchSequences) {
  auto g = read_json_file(test::golden("context_windows.json"));
  const auto docs = g["docs"].get<std::vector<std::vector<int32_t>>>();
  ASSERT_EQ(g["cases"].size(), 24u);
  for (const auto& c : g["cases"]) {
    WindowConfig cfg;
    cfg.context_size = c["context_size"].get<int64_t>();
    cfg.prepend_bos = c["prepend_bos"].get<bool>();
    cfg.bos_id = g["bos"].get<int32_t>();
    cfg.separator_id = c["separator"].is_null()
                           ? std::nullopt
                           : std::optional<int32_t>(c["separator"].get<int32_t>());
    cfg.concat = c["concat"].get<bool>();
    ContextWindows w(cfg);
    std::vector<std::vector<int32_t>> got;
    for (const auto& d : docs) {
      w.add(d);
      std::vector<int32_t> win;
      while (w.pop(win)) got.push_back(win);
    }
    EXPECT_EQ(got, c["windows"].get<std::vector<std::vector<int32_t>>>()) << c.dump();
  }
}

TEST(LineReader, PlainAndZstdGiveTheSameLines) {
  test::TempDir dir;
  std::string text;
  for (int i = 0; i < 50000; ++i) text += "line " + std::to_string(i) + (i % 7 ? "\n" : "\r\n");
  text += "last line without newline";
  test::write_bytes(dir / "a.txt", text);
  // Two concatenated zstd frames, as pzstd and shard concatenation produce.
  const size_t half = text.size() / 2;
  test::write_bytes(dir / "a.txt.zst",
                    zstd_compress(text.substr(0, half)) + zstd_compress(text.substr(half)));
  LineReader plain(dir / "a.txt"), z(dir / "a.txt.zst");
  std::string a, b;
  int64_t n = 0;
  while (plain.next(a)) {
    ASSERT_TRUE(z.next(b));
    ASSERT_EQ(a, b);
    ++n;
  }
  EXPECT_FALSE(z.next(b));
  EXPECT_EQ(n, 50001);
  EXPECT_EQ(a, "last line without newline");
  // A truncated file is an error naming it, not a silent short read.
  const std::string zst = test::read_bytes(dir / "a.txt.zst");
  test::write_bytes(dir / "cut.txt.zst", zst.substr(0, zst.size() / 3));
  LineReader cut(dir / "cut.txt.zst");
  try {
    while (cut.next(b)) {
    }
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cut.txt.zst"), std::string::npos) << e.what();
  }
}

TEST(Corpus, JsonlZstTxtAndSplit) {
  test::TempDir dir;
  std::string jl;
  for (int i = 0; i < 10; ++i)
    jl += R"({"text": "doc )" + std::to_string(i) +
          R"(", "meta": {}})"
          "\n";
  test::write_bytes(dir / "b.jsonl.zst", zstd_compress(jl));
  test::write_bytes(dir / "a.jsonl", R"({"content": "x", "text": "first"})"
                                     "\n\n");
  test::write_bytes(dir / "c.txt", "text one\n\n  \ntext two\n");
  CorpusConfig cfg;
  cfg.shards = {dir / "*.jsonl*", dir / "c.txt"};
  cfg.holdout_every = 4;
  Corpus train(cfg, Split::Train), held(cfg, Split::Heldout);
  // Order: a.jsonl, b.jsonl.zst (sorted glob), then c.txt; documents 0, 4, 8, 12 held out.
  EXPECT_EQ(texts(held), (std::vector<std::string>{"first", "doc 3", "doc 7", "text two"}));
  EXPECT_EQ(texts(train), (std::vector<std::string>{"doc 0", "doc 1", "doc 2", "doc 4", "doc 5",
                                                    "doc 6", "doc 8", "doc 9", "text one"}));
  // seek: resume at document 9 of the whole corpus.
  Corpus again(cfg, Split::Train);
  again.seek(9);
  EXPECT_EQ(texts(again), (std::vector<std::string>{"doc 8", "doc 9", "text one"}));
  // Shares (module parallel): every n-th training document, the shares partitioning the split
  // in turn, also after a seek; the held-out split is not divided.
  for (int n : {2, 3}) {
    std::vector<std::vector<std::string>> shares(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) {
      Corpus share(cfg, Split::Train);
      share.take_share(r, n);
      shares[size_t(r)] = texts(share);
    }
    Corpus whole(cfg, Split::Train), whole_held(cfg, Split::Heldout);
    const auto all = texts(whole);
    for (size_t i = 0; i < all.size(); ++i)
      EXPECT_EQ(shares[i % size_t(n)][i / size_t(n)], all[i]) << n << " shares, document " << i;
    size_t total = 0;
    for (const auto& sh : shares) total += sh.size();
    EXPECT_EQ(total, all.size());
    Corpus held_share(cfg, Split::Heldout);
    held_share.take_share(1, n);
    EXPECT_EQ(texts(held_share), texts(whole_held));
  }
  Corpus late(cfg, Split::Train);
  late.take_share(1, 2);
  late.seek(9);  // from index 9: doc 8 (train ordinal 6), doc 9 (7), "text one" (8)
  EXPECT_EQ(texts(late), (std::vector<std::string>{"doc 9"}));
  cfg.text_field = "content";
  cfg.holdout_every = 0;
  cfg.shards = {dir / "a.jsonl"};
  Corpus content(cfg, Split::Train);
  EXPECT_EQ(texts(content), (std::vector<std::string>{"x"}));
}

TEST(Corpus, TokenShardsNpyAndBin) {
  test::TempDir dir;
  std::vector<int32_t> rows = {2, 5, 6, 7, 2, 8, 9, 10};  // 2 documents of 4
  write_npy(dir / "t.npy", DType::I32, {2, 4},
            {reinterpret_cast<const uint8_t*>(rows.data()), rows.size() * 4});
  std::vector<uint16_t> flat = {11, 12, 13, 65535};
  test::write_bytes(dir / "t.bin", std::string(reinterpret_cast<const char*>(flat.data()), 8));
  CorpusConfig cfg;
  cfg.shards = {dir / "t.npy", dir / "t.bin"};
  cfg.holdout_every = 0;
  Corpus c(cfg, Split::Train);
  Document d;
  ASSERT_TRUE(c.next(d));
  EXPECT_TRUE(d.tokenized);
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{2, 5, 6, 7}));
  ASSERT_TRUE(c.next(d));
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{2, 8, 9, 10}));
  ASSERT_TRUE(c.next(d));
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{11, 12, 13, 65535}));
  EXPECT_FALSE(c.next(d));
  // A .bin whose size is not a whole number of tokens is an error naming the file.
  test::write_bytes(dir / "odd.bin", "abc");
  cfg.shards = {dir / "odd.bin"};
  Corpus odd(cfg, Split::Train);
  EXPECT_THROW(odd.next(d), Error);
}

TEST(Corpus, BadInputs) {
  test::TempDir dir;
  CorpusConfig cfg;
  cfg.holdout_every = 0;
  // No file matches: the pattern is named.
  cfg.shards = {dir / "nothing-*.jsonl.zst"};
  try {
    Corpus c(cfg, Split::Train);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nothing-*.jsonl.zst"), std::string::npos);
  }
  // Unknown format.
  test::write_bytes(dir / "x.parquet", "PAR1");
  cfg.shards = {dir / "x.parquet"};
  Corpus unknown(cfg, Split::Train);
  Document d;
  EXPECT_THROW(unknown.next(d), Error);
  // A few malformed lines are skipped (counted); too many is an error naming the shard.
  std::string jl;
  for (int i = 0; i < 300; ++i)
    jl += (i % 100 == 99 ? std::string("{broken\n")
                         : R"({"text": "ok"})"
                           "\n");
  test::write_bytes(dir / "few.jsonl", jl);
  cfg.shards = {dir / "few.jsonl"};
  Corpus few(cfg, Split::Train);
  int64_t n = 0;
  while (few.next(d)) ++n;
  EXPECT_EQ(n, 297);
  EXPECT_EQ(few.bad_lines(), 3);
  jl.clear();
  for (int i = 0; i < 300; ++i)
    jl += (i % 10 == 0 ? std::string("[1, 2]\n")
                       : R"({"text": "ok"})"
                         "\n");
  test::write_bytes(dir / "many.jsonl", jl);
  cfg.shards = {dir / "many.jsonl"};
  Corpus many(cfg, Split::Train);
  try {
    while (many.next(d)) {
    }
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("many.jsonl"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("malformed"), std::string::npos);
  }
  // Config errors name the field.
  EXPECT_THROW(CorpusConfig::from_json({{"shards", "x"}, {"holdout_every", 1}}, "cfg"), Error);
  EXPECT_THROW(CorpusConfig::from_json({{"shards", "x"}, {"bogus", 1}}, "cfg"), Error);
  EXPECT_THROW(CorpusConfig::from_json(nlohmann::json::object(), "cfg"), Error);
}

}  // namespace
}  // namespace sae::data
