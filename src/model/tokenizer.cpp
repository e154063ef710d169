#include "model/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>

#include "core/error.h"

namespace sae::model {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer(const std::string& path) : impl_(std::make_unique<Impl>()), path_(path) {
  if (!std::filesystem::exists(path)) fail(path, "", "tokenizer model not found");
  const auto status = impl_->sp.Load(path);
  if (!status.ok()) fail(path, "", cat("not a SentencePiece model (", status.ToString(), ")"));
}

Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int> ids;
  const auto status = impl_->sp.Encode(text, &ids);
  if (!status.ok()) fail(path_, "encode", status.ToString());
  std::vector<int32_t> out;
  out.reserve(ids.size() + 1);
  if (add_bos) out.push_back(bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts,
                                                          bool add_bos) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  for (size_t i = 0; i < texts.size(); ++i) out[i] = encode(texts[i], add_bos);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::vector<int> keep;
  for (int32_t id : ids)
    if (id >= 0 && id < vocab_size() && !impl_->sp.IsControl(id)) keep.push_back(id);
  std::string text;
  const auto status = impl_->sp.Decode(keep, &text);
  if (!status.ok()) fail(path_, "decode", status.ToString());
  return text;
}

std::string Tokenizer::piece(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    fail(path_, "piece", cat("token id ", id, " is outside the vocabulary"));
  return impl_->sp.IdToPiece(id);
}

int32_t Tokenizer::bos_id() const {
  return impl_->sp.bos_id();
}
int32_t Tokenizer::eos_id() const {
  return impl_->sp.eos_id();
}
int32_t Tokenizer::pad_id() const {
  return impl_->sp.pad_id();
}
int64_t Tokenizer::vocab_size() const {
  return impl_->sp.GetPieceSize();
}
bool Tokenizer::is_special(int32_t id) const {
  return impl_->sp.IsControl(id) || impl_->sp.IsUnknown(id);
}

}  // namespace sae::model
