// Gemma's SentencePiece tokenizer (tokenizer.model) through libsentencepiece.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sae::model {

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);  // throws sae::Error naming the file
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // SentencePiece's Encode adds no BOS; Gemma expects one at position 0.
  std::vector<int32_t> encode(std::string_view text, bool add_bos = true) const;
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts,
                                                 bool add_bos = true) const;
  std::string decode(std::span<const int32_t> ids) const;  // for display; skips BOS/EOS/PAD

  std::string piece(int32_t id) const;  // the vocabulary entry, e.g. "▁the" or "<0x0A>"

  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t pad_id() const;
  int64_t vocab_size() const;
  bool is_special(int32_t id) const;  // control tokens (pad, eos, bos, ...) and unknown

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
};

}  // namespace sae::model
