#include "data/activation_files.h"

#include <numeric>

#include "core/error.h"
#include "core/finite.h"
#include "core/rng.h"
#include "data/corpus.h"
#include "io/npy.h"
#include "io/safetensors.h"

namespace sae::data {

struct FileSource::Shard {
  std::unique_ptr<NpyFile> npy;
  std::unique_ptr<SafetensorsFile> st;
  const uint8_t* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;
};

FilesConfig FilesConfig::from_json(const nlohmann::json& j, const std::string& where) {
  FilesConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k == "type") continue;
    if (k == "paths") {
      if (!it->is_array() || it->empty()) fail(where, "data.paths", "must be a non-empty list");
      for (const auto& p : *it) {
        if (!p.is_string()) fail(where, "data.paths", "must hold strings");
        c.paths.push_back(p.get<std::string>());
      }
    } else if (k == "tensor") {
      c.tensor = it->get<std::string>();
    } else if (k == "heldout_tokens") {
      if (!it->is_number_integer() || it->get<int64_t>() < 0)
        fail(where, "data.heldout_tokens", "must be a non-negative integer");
      c.heldout_tokens = it->get<int64_t>();
    } else if (k == "seed") {
      c.seed = it->get<uint64_t>();
    } else {
      fail(where, cat("data.", k), "unknown field");
    }
  }
  if (c.paths.empty()) fail(where, "data.paths", "missing");
  return c;
}

nlohmann::json FilesConfig::to_json() const {
  return {{"type", "files"},
          {"paths", paths},
          {"tensor", tensor},
          {"heldout_tokens", heldout_tokens},
          {"seed", seed}};
}

FileSource::FileSource(FilesConfig cfg) : cfg_(std::move(cfg)) {
  // Glob patterns (an activation cache's "layer/*.safetensors") expand to their sorted matches.
  std::vector<std::string> paths;
  for (const auto& p : cfg_.paths) {
    const bool pattern = p.find_first_of("*?[") != std::string::npos;
    std::vector<std::string> found = pattern ? expand_shards({p}) : std::vector<std::string>{p};
    paths.insert(paths.end(), found.begin(), found.end());
  }
  cfg_.paths = std::move(paths);
  shard_start_.push_back(0);
  for (const auto& path : cfg_.paths) {
    auto s = std::make_unique<Shard>();
    std::vector<int64_t> shape;
    if (path.ends_with(".npy")) {
      s->npy = std::make_unique<NpyFile>(path);
      s->dtype = s->npy->dtype();
      shape = s->npy->shape();
      s->data = s->npy->data().data();
    } else if (path.ends_with(".safetensors")) {
      s->st = std::make_unique<SafetensorsFile>(path);
      std::string name = cfg_.tensor;
      if (name.empty())
        name = s->st->has("activations")
                   ? "activations"
                   : (s->st->tensors().size() == 1 ? s->st->tensors()[0].name : "");
      if (name.empty())
        fail(path, "", "holds several tensors and none is named \"activations\"; set data.tensor");
      const TensorInfo& t = s->st->info(name);
      s->dtype = t.dtype;
      shape = t.shape;
      s->data = s->st->bytes(t).data();
    } else {
      fail(path, "", "activation shards must be .npy or .safetensors");
    }
    if (!dtype_is_float(s->dtype)) fail(path, "dtype", "activations must be a float type");
    if (shape.size() != 2) fail(path, "shape", "activations must be [tokens, d_in]");
    if (d_in_ == 0) d_in_ = shape[1];
    if (shape[1] != d_in_)
      fail(path, "shape", cat("d_in ", shape[1], " differs from the first shard's ", d_in_));
    s->rows = shape[0];
    n_rows_ += s->rows;
    shard_start_.push_back(n_rows_);
    shards_.push_back(std::move(s));
  }
  if (n_rows_ == 0) fail(cfg_.paths[0], "shape", "the activation files hold no tokens");
  n_heldout_ = std::min(cfg_.heldout_tokens, n_rows_ / 2);
  n_train_ = n_rows_ - n_heldout_;
}

FileSource::FileSource(const float* data, int64_t rows, int64_t d_in, int64_t heldout_tokens,
                       uint64_t seed) {
  if (rows <= 0 || d_in <= 0)
    fail("activations", "shape", "must be a non-empty [tokens, d_in] array");
  cfg_.paths = {"<memory>"};
  cfg_.heldout_tokens = heldout_tokens;
  cfg_.seed = seed;
  auto s = std::make_unique<Shard>();
  s->data = reinterpret_cast<const uint8_t*>(data);
  s->rows = rows;
  shards_.push_back(std::move(s));
  d_in_ = d_in;
  n_rows_ = rows;
  shard_start_ = {0, rows};
  n_heldout_ = std::min(heldout_tokens, n_rows_ / 2);
  n_train_ = n_rows_ - n_heldout_;
}

FileSource::~FileSource() = default;

void FileSource::read_row(int64_t row, float* out) const {
  size_t s = size_t(std::upper_bound(shard_start_.begin(), shard_start_.end(), row) -
                    shard_start_.begin() - 1);
  const Shard& sh = *shards_[s];
  const int64_t r = row - shard_start_[s];
  convert_to_f32(sh.dtype, sh.data + size_t(r * d_in_) * dtype_size(sh.dtype), out, size_t(d_in_));
  check_finite({out, size_t(d_in_)}, 1, d_in_, cfg_.paths[s], r);  // a damaged shard stops here
}

const std::vector<int64_t>& FileSource::permutation(int64_t epoch) {
  if (epoch != perm_epoch_) {
    perm_.resize(size_t(n_train_));
    std::iota(perm_.begin(), perm_.end(), 0);
    Rng rng(cfg_.seed * 0x9e3779b97f4a7c15ull + uint64_t(epoch));
    for (int64_t i = n_train_ - 1; i > 0; --i)
      std::swap(perm_[size_t(i)], perm_[size_t(rng.below(i + 1))]);
    perm_epoch_ = epoch;
  }
  return perm_;
}

void FileSource::train_batch(int64_t index, int64_t batch, float* out) {
  for (int64_t t = 0; t < batch; ++t) {
    const int64_t pos = index * batch + t;
    const auto& perm = permutation(pos / n_train_);
    read_row(perm[size_t(pos % n_train_)], out + t * d_in_);
  }
}

void FileSource::heldout(int64_t n, float* out) {
  const int64_t m = heldout_size(n);
  for (int64_t t = 0; t < m; ++t) read_row(n_train_ + t, out + t * d_in_);
}

std::string FileSource::describe() const {
  return cat("activation files: ", cfg_.paths.size(), " shard(s), ", n_rows_, " tokens of d_in ",
             d_in_, " (", n_heldout_, " held out)");
}

}  // namespace sae::data
