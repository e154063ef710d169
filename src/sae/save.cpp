#include "sae/save.h"

#include <unistd.h>

#include <filesystem>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "sae/load.h"

namespace sae {

namespace fs = std::filesystem;

namespace {

void write_files(const Sae& sae, const std::string& folder, DType dtype,
                 const std::optional<std::vector<float>>& sparsity) {
  const int64_t din = sae.cfg.d_in, dsae = sae.cfg.d_sae;
  // Converted copies must outlive the write; f32 tensors are written from the SAE directly.
  std::vector<std::vector<uint16_t>> half;
  auto add = [&](std::vector<TensorToWrite>& t, const char* name, const std::vector<float>& v,
                 std::vector<int64_t> shape) {
    if (dtype == DType::F32) {
      t.push_back(tensor_view(name, std::span<const float>(v), std::move(shape)));
    } else {
      half.emplace_back(v.size());
      convert_from_f32(v.data(), dtype, half.back().data(), v.size());
      t.push_back(
          tensor_view(name, std::span<const uint16_t>(half.back()), dtype, std::move(shape)));
    }
  };
  half.reserve(5);
  std::vector<TensorToWrite> tensors;
  add(tensors, "W_enc", sae.W_enc, {din, dsae});
  add(tensors, "W_dec", sae.W_dec, {dsae, din});
  add(tensors, "b_enc", sae.b_enc, {dsae});
  add(tensors, "b_dec", sae.b_dec, {din});
  if (sae.cfg.architecture == Architecture::JumpReLU)
    add(tensors, "threshold", sae.threshold, {dsae});
  write_safetensors((fs::path(folder) / kWeightsFile).string(), std::move(tensors));

  if (sparsity) {
    SAE_CHECK(int64_t(sparsity->size()) == dsae, "sparsity has the wrong length");
    write_safetensors((fs::path(folder) / kSparsityFile).string(),
                      {tensor_view("sparsity", std::span<const float>(*sparsity), {dsae})});
  }

  SaeConfig cfg = sae.cfg;
  cfg.dtype = dtype;
  write_file_atomic((fs::path(folder) / kCfgFile).string(), cfg.to_json().dump(2) + "\n");
}

}  // namespace

void save_to_disk(const Sae& sae, const std::string& folder_in, DType dtype,
                  const std::optional<std::vector<float>>& sparsity) {
  if (dtype != DType::F32 && dtype != DType::BF16 && dtype != DType::F16)
    fail(folder_in, "dtype", cat("cannot save weights as ", dtype_name(dtype)));
  // A new folder appears whole: written as a hidden sibling, then renamed into place. Into an
  // existing folder each file is replaced atomically and other files are left alone.
  fs::path target = fs::path(folder_in).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();  // "out/" -> "out"
  std::error_code ec;
  if (fs::exists(target)) {
    if (!fs::is_directory(target)) fail(folder_in, "", "exists and is not a folder");
    write_files(sae, target.string(), dtype, sparsity);
    return;
  }
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  fs::create_directories(parent, ec);
  const fs::path tmp = parent / cat(".", target.filename().string(), ".tmp.", ::getpid());
  fs::remove_all(tmp, ec);
  if (!fs::create_directories(tmp, ec) || ec)
    fail(folder_in, "", cat("cannot create folder: ", ec.message()));
  try {
    write_files(sae, tmp.string(), dtype, sparsity);
    fs::rename(tmp, target);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace sae
