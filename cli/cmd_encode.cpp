// sae encode <sae> <acts> -o out.safetensors: sparse codes (CSR) or, with --dense, [n, d_sae].
#include <cstdio>

#include "acts_file.h"
#include "commands.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "sae/device_sae.h"
#include "sae/load.h"

namespace sae::cli {

Runner add_encode(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "encode", "Encode activations (.npy/.safetensors [tokens, d_in]) to sparse codes");
  struct Opts {
    std::string ref, acts, out, tensor, device = "cpu", precision = "fp32";
    bool dense = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("sae", o->ref, "SAE folder or release:sae_id")->required();
  cmd->add_option("acts", o->acts, "Activations file")->required();
  cmd->add_option("-o,--output", o->out, "Output .safetensors")->required();
  cmd->add_option("--tensor", o->tensor, "Tensor name inside a .safetensors activations file");
  cmd->add_flag("--dense", o->dense, "Write dense feature activations \"feature_acts\" [n, d_sae]");
  cmd->add_option("--device", o->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", o->precision, "On cuda, the encoder GEMM: fp32, tf32 or bf16")
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}));
  return [=] {
    if (o->device == "cpu") require_cpu_precision(o->precision, "encode", "--device cuda");
    LoadedSae l = load_sae_ref(o->ref);
    Activations a = read_activations(o->acts, o->tensor);
    if (a.d != l.sae.cfg.d_in)
      fail(o->acts, "shape",
           cat("activations have d_in ", a.d, " but the SAE expects ", l.sae.cfg.d_in));
    SparseCodes codes = o->device == "cuda" ? DeviceSae(l.sae, o->precision).encode(a.data, a.n)
                                            : l.sae.encode(a.data, a.n);
    if (o->dense) {
      auto dense = codes.to_dense();
      write_safetensors(o->out, {tensor_view("feature_acts", std::span<const float>(dense),
                                             {a.n, l.sae.cfg.d_sae})});
    } else {
      save_sparse_codes(o->out, codes);
    }
    std::fprintf(stderr, "encoded %lld tokens, %lld active entries (L0 %.2f) -> %s\n",
                 (long long)a.n, (long long)codes.nnz(),
                 double(codes.nnz()) / double(std::max<int64_t>(a.n, 1)), o->out.c_str());
    return 0;
  };
}

}  // namespace sae::cli
