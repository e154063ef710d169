// sae activations / sae lm-loss: run Gemma-2 from a Hugging Face checkpoint folder.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "eval/lm_score.h"
#include "io/safetensors.h"
#include "model/activations.h"
#include "model/checkpoint.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "model/tokenizer.h"
#include "prompts.h"

namespace sae::cli {

std::vector<std::string> read_prompts(const std::vector<std::string>& texts,
                                      const std::string& file) {
  std::vector<std::string> out = texts;
  if (!file.empty()) {
    std::ifstream in(file);
    if (!in) fail(file, "", "cannot open");
    std::string line;
    while (std::getline(in, line))
      if (line.find_first_not_of(" \t\r") != std::string::npos) out.push_back(line);
  }
  if (out.empty())
    fail(file.empty() ? "--text" : file, "", "no prompts (give --text or a non-empty --file)");
  return out;
}

std::vector<std::vector<int32_t>> tokenize_prompts(const std::string& model_dir,
                                                   const std::vector<std::string>& texts) {
  model::Tokenizer tok((std::filesystem::path(model_dir) / "tokenizer.model").string());
  return tok.encode_batch(texts, /*add_bos=*/true);
}

std::vector<int64_t> parse_ranges(const std::string& option, const std::string& spec, int64_t n,
                                  const std::string& what) {
  std::set<int64_t> out;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    std::string part =
        spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    size_t dash = part.find('-');
    try {
      int64_t a = std::stoll(part.substr(0, dash)),
              b = dash == std::string::npos ? a : std::stoll(part.substr(dash + 1));
      for (int64_t l = a; l <= b; ++l) out.insert(l);
    } catch (const std::exception&) {
      fail(option, spec, "expected a list like 0-24 or 3,5,7");
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  for (int64_t l : out)
    if (l < 0 || l >= n) fail(option, spec, cat(what, " ", l, " is outside 0..", n - 1));
  return {out.begin(), out.end()};
}

std::vector<int64_t> parse_layers(const std::string& spec, int64_t n_layers) {
  return parse_ranges("--layers", spec, n_layers, "layer");
}

void add_device_options(CLI::App* cmd, std::string& device, std::string& precision,
                        const std::string& on_gpu, const std::string& precision_help) {
  cmd->add_option("--device", device, "cpu or cuda (" + on_gpu + ")")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", precision, precision_help)->check(CLI::IsMember({"bf16", "fp32"}));
}

Runner add_activations(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("activations", "Gemma-2 activations at hook points, to safetensors");
  struct Opts {
    std::string model, file, layers = "0", hook = "resid_post", out;
    std::vector<std::string> texts;
    bool bf16 = false, bf16_matmul = false;
    std::string device = "cpu", precision = "bf16";
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model,
                  "Gemma-2 checkpoint: a folder (config.json, safetensors, tokenizer.model) or a "
                  "Hugging Face repo id (downloaded into the HF cache on a miss)")
      ->required();
  cmd->add_option("--text", o->texts, "A prompt (repeatable)");
  cmd->add_option("--file", o->file, "Prompts, one per line");
  cmd->add_option("--layers", o->layers, "Layers, e.g. 0-24 or 3,5,7");
  cmd->add_option("--hook", o->hook, "resid_post, resid_pre, attn_out or mlp_out");
  cmd->add_option("-o,--output", o->out, "Output .safetensors")->required();
  cmd->add_flag("--bf16", o->bf16, "Keep the weights in bf16 (half the memory; computes in f32)");
  cmd->add_flag(
      "--bf16-matmul", o->bf16_matmul,
      "On the CPU, weights in bf16 and multiplied in bf16 (implies --bf16; bf16 GEMM operands, "
      "f32 sums, as transformers in bf16)");
  add_device_options(cmd, o->device, o->precision);
  return [=] {
    const model::HookPoint point = model::parse_hook_kind(o->hook);
    auto texts = read_prompts(o->texts, o->file);
    const std::string model_dir = model::resolve_checkpoint(o->model).folder;
    const model::Gemma2Config cfg = model::read_gemma2_config(model_dir);
    const auto layers = parse_layers(o->layers, cfg.num_layers);
    const bool cuda = parse_device(o->device, "--device") == Device::Cuda;
    if (cuda) require_device(Device::Cuda);  // before loading anything
    // The GPU in bf16 reads bf16 weights: the host copy need not be upcast first.
    model::Gemma2 m = model::Gemma2::load(
        model_dir, {.last_layer = layers.back(),
                    .keep_bf16 = o->bf16 || o->bf16_matmul || (cuda && o->precision == "bf16"),
                    .bf16_matmul = o->bf16_matmul && !cuda});
    auto prompts = tokenize_prompts(model_dir, texts);
    const int64_t H = m.cfg.hidden_size;
    std::vector<std::vector<float>> acts;
    if (cuda) {
      model::DeviceGemma2 g(m, o->precision);
      acts = model::collect_activations(g, prompts, point, layers);
    } else {
      acts = model::collect_activations(m, prompts, point, layers);
    }
    std::vector<int32_t> tokens;
    std::vector<int64_t> offsets = {0};
    for (const auto& ids : prompts) {
      tokens.insert(tokens.end(), ids.begin(), ids.end());
      offsets.push_back(int64_t(tokens.size()));
    }
    const int64_t N = int64_t(tokens.size());
    std::vector<TensorToWrite> t;
    for (size_t i = 0; i < layers.size(); ++i)
      t.push_back(
          tensor_view(model::hook_name(point, layers[i]), std::span<const float>(acts[i]), {N, H}));
    t.push_back(tensor_view("tokens", std::span<const int32_t>(tokens), {N}));
    t.push_back(
        tensor_view("offsets", std::span<const int64_t>(offsets), {int64_t(offsets.size())}));
    write_safetensors(
        o->out, std::move(t),
        {{"model", o->model}, {"hook", o->hook}, {"bos", "position 0 of each prompt"}});
    std::fprintf(stderr, "%zu prompts, %lld tokens, %zu layer(s) -> %s\n", prompts.size(),
                 (long long)N, layers.size(), o->out.c_str());
    return 0;
  };
}

Runner add_lm_loss(CLI::App& app) {
  auto* cmd = app.add_subcommand("lm-loss", "Gemma-2 next-token cross-entropy on text");
  struct Opts {
    std::string model, file;
    std::vector<std::string> texts;
    bool bf16 = false, bf16_matmul = false;
    std::string device = "cpu", precision = "bf16";
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Gemma-2 folder or Hugging Face repo id")->required();
  cmd->add_option("--text", o->texts, "A prompt (repeatable)");
  cmd->add_option("--file", o->file, "Prompts, one per line");
  cmd->add_flag("--bf16", o->bf16, "Keep the weights in bf16 (half the memory; computes in f32)");
  cmd->add_flag(
      "--bf16-matmul", o->bf16_matmul,
      "On the CPU, weights in bf16 and multiplied in bf16 (implies --bf16; bf16 GEMM operands, "
      "f32 sums, as transformers in bf16)");
  add_device_options(cmd, o->device, o->precision);
  return [=] {
    auto texts = read_prompts(o->texts, o->file);
    const bool cuda = parse_device(o->device, "--device") == Device::Cuda;
    if (cuda) require_device(Device::Cuda);  // before loading anything
    const std::string model_dir = model::resolve_checkpoint(o->model).folder;
    model::Gemma2 m = model::Gemma2::load(
        model_dir, {.keep_bf16 = o->bf16 || o->bf16_matmul || (cuda && o->precision == "bf16"),
                    .bf16_matmul = o->bf16_matmul && !cuda});
    int64_t n = 0;
    double ce = 0;
    if (cuda) {
      model::DeviceGemma2 g(m, o->precision);
      ce = lm_loss(g, tokenize_prompts(model_dir, texts), &n);
    } else {
      ce = lm_loss(m, tokenize_prompts(model_dir, texts), &n);
    }
    std::printf("cross-entropy %.6f nats/token over %lld predictions (%zu prompts)\n", ce,
                (long long)n, texts.size());
    return 0;
  };
}

}  // namespace sae::cli
