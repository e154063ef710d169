// sae convert <sae> -o <folder>: change the stored dtype and/or fold decoder norms.
#include <cstdio>

#include "commands.h"
#include "core/error.h"
#include "sae/load.h"
#include "sae/save.h"

namespace sae::cli {

Runner add_convert(CLI::App& app) {
  auto* cmd = app.add_subcommand("convert", "Rewrite an SAE: dtype (f32/bf16/f16), folding");
  struct Opts {
    std::string ref, out, dtype = "f32";
    bool fold_dec_norm = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("sae", o->ref, "SAE folder or release:sae_id")->required();
  cmd->add_option("-o,--output", o->out, "Output SAE folder")->required();
  cmd->add_option("--dtype", o->dtype, "Stored dtype of the weights")
      ->check(CLI::IsMember({"f32", "bf16", "f16", "float32", "bfloat16", "float16"}));
  cmd->add_flag(
      "--fold-dec-norm", o->fold_dec_norm,
      "Fold decoder row norms into the encoder (unit-norm decoder, same reconstructions)");
  return [=] {
    LoadedSae l = load_sae_ref(o->ref);
    if (o->fold_dec_norm) l.sae.fold_W_dec_norm();
    DType dt = o->dtype.starts_with("bf")                     ? DType::BF16
               : (o->dtype == "f16" || o->dtype == "float16") ? DType::F16
                                                              : DType::F32;
    save_to_disk(l.sae, o->out, dt, l.sparsity);
    std::fprintf(stderr, "wrote %s (%s)\n", o->out.c_str(), std::string(dtype_name(dt)).c_str());
    return 0;
  };
}

}  // namespace sae::cli
