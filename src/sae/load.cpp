#include "sae/load.h"

#include <filesystem>

#include "core/error.h"
#include "core/finite.h"
#include "io/safetensors.h"
#include "sae/pretrained.h"

namespace sae {

namespace fs = std::filesystem;

namespace {

void read_param(const SafetensorsFile& f, const std::string& name, std::vector<int64_t> shape,
                std::vector<float>& dst) {
  const TensorInfo& t = f.info(name);  // throws "tensor is missing" naming the file
  if (!dtype_is_float(t.dtype))
    fail(f.path(), name, cat("dtype ", dtype_name(t.dtype), " is not a float type"));
  dst = f.read_f32(name, shape);  // throws on a shape that disagrees with cfg.json
  // A NaN or infinity would make every code and reconstruction NaN without a word.
  if (const int64_t i = first_non_finite(dst); i >= 0)
    fail(f.path(), name,
         cat(shape.size() == 2 ? cat("row ", i / shape[1], ", column ", i % shape[1])
                               : cat("element ", i),
             " is ", dst[size_t(i)],
             ": the file is damaged, or the SAE was saved after its "
             "training diverged"));
}

}  // namespace

LoadedSae load_from_disk(const std::string& folder) {
  if (!fs::is_directory(folder)) fail(folder, "", "is not a folder");
  const std::string cfg_path = (fs::path(folder) / kCfgFile).string();
  const std::string w_path = (fs::path(folder) / kWeightsFile).string();
  if (!fs::exists(cfg_path)) fail(cfg_path, "", "missing (not a SAELens SAE folder?)");
  if (!fs::exists(w_path)) fail(w_path, "", "missing (not a SAELens SAE folder?)");

  LoadedSae out{Sae(read_sae_config(cfg_path), /*allocate=*/false), folder, std::nullopt};
  Sae& s = out.sae;
  const int64_t din = s.cfg.d_in, dsae = s.cfg.d_sae;
  SafetensorsFile w(w_path);
  read_param(w, "W_enc", {din, dsae}, s.W_enc);
  read_param(w, "W_dec", {dsae, din}, s.W_dec);
  read_param(w, "b_enc", {dsae}, s.b_enc);
  read_param(w, "b_dec", {din}, s.b_dec);
  if (s.cfg.architecture == Architecture::JumpReLU) read_param(w, "threshold", {dsae}, s.threshold);
  s.stored_dtype = w.info("W_enc").dtype;

  // Old SAELens files may carry a `scaling_factor`; SAELens ignores it when it is all ones.
  if (w.has("scaling_factor")) {
    for (float v : w.read_f32("scaling_factor"))
      if (v != 1.0f)
        fail(
            w_path, "scaling_factor",
            "finetuning scaling factors other than 1 are not supported (SAELens 6 drops them too)");
  }

  const std::string sp_path = (fs::path(folder) / kSparsityFile).string();
  if (fs::exists(sp_path)) {
    SafetensorsFile sp(sp_path);
    out.sparsity = sp.read_f32("sparsity", {dsae});
  }
  return out;
}

LoadedSae from_pretrained(const std::string& release, const std::string& sae_id) {
  return load_from_disk(resolve_pretrained(release, sae_id));
}

LoadedSae load_sae_ref(const std::string& ref) {
  if (fs::is_directory(ref)) {
    // A folder holding SAEs (a release's, a training run's sae/) given for one: how to name one.
    if (!fs::exists(fs::path(ref) / "cfg.json"))
      if (const std::vector<std::string> ids = sae_ids_in_folder(ref); !ids.empty())
        fail(ref, "",
             cat("is not an SAE folder (no cfg.json) but holds ", ids.size(), " SAE",
                 ids.size() == 1 ? "" : "s", ": name one as ", ref, ":", ids[0],
                 ", or give its folder (", some_sae_ids(ids), ")"));
    return load_from_disk(ref);
  }
  const size_t colon = ref.find(':');
  if (colon == std::string::npos)
    fail(ref, "", "is neither a folder nor a release:sae_id reference");
  return from_pretrained(ref.substr(0, colon), ref.substr(colon + 1));
}

}  // namespace sae
