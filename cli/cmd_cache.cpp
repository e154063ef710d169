// sae cache: text corpus + Gemma-2 -> activation shards per layer, to train SAEs from later
// without the model (sae train with data.type = "files"; docs/release.md).
#include "commands.h"
#include "model/checkpoint.h"
#include "model/gemma2_config.h"
#include "pipeline/activation_cache.h"
#include "prompts.h"

namespace sae::cli {

Runner add_cache(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "cache", "Write Gemma-2 activations of a text corpus to safetensors shards per layer");
  struct Opts {
    pipeline::CacheOptions c;
    std::string layers, tokens, shard_tokens = "65536";
    int64_t holdout_every = 100;
    bool truncate = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->c.model_dir, "Gemma-2 folder or Hugging Face repo id")->required();
  cmd->add_option("--dataset", o->c.corpus.shards,
                  "Corpus shards: paths or globs of .jsonl(.zst), .txt, .npy, .bin (repeatable)")
      ->required();
  cmd->add_option("--layers", o->layers, "Layers, e.g. 0-24 or 3,12")->required();
  cmd->add_option("--tokens", o->tokens, "Tokens per layer, e.g. 100M")->required();
  cmd->add_option("-o,--output", o->c.output_dir, "Cache folder (default out/cache)");
  cmd->add_option("--hook", o->c.hook, "resid_post, resid_pre, attn_out or mlp_out");
  cmd->add_option("--shard-tokens", o->shard_tokens, "Tokens per shard file (default 65536)");
  cmd->add_option("--dtype", o->c.dtype, "Stored activations: f32 or bf16")
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--context-size", o->c.windows.context_size, "Tokens per context window");
  cmd->add_flag("--truncate", o->truncate,
                "One window per document (truncated; shorter ones dropped) instead of packing");
  cmd->add_option("--text-field", o->c.corpus.text_field, "JSONL field holding the text");
  cmd->add_option("--bin-dtype", o->c.corpus.bin_dtype, "Token width of .bin shards: u16|u32");
  cmd->add_option("--holdout-every", o->holdout_every,
                  "Skip every Nth document (the release's held-out split; 0: none)");
  cmd->add_option("--prompts-per-forward", o->c.prompts_per_forward,
                  "Context windows per model forward");
  cmd->add_flag("--bf16", o->c.keep_bf16, "Keep the model weights in bf16");
  cmd->add_flag(
      "--bf16-matmul", o->c.bf16_matmul,
      "Weights in bf16 and multiplied in bf16 (implies --bf16; bf16 GEMM operands, f32 sums, as "
      "transformers in bf16; oneDNN where the CPU has bf16 dot products)");
  add_device_options(cmd, o->c.device, o->c.precision);
  cmd->add_flag("--resume", o->c.resume, "Continue an interrupted cache in the same folder");
  cmd->add_option("--stop-after-shards", o->c.stop_after_shards,
                  "Exit 0 after this many shards (continue later with --resume)");
  return [=] {
    pipeline::CacheOptions c = o->c;
    const model::Checkpoint ckpt = model::resolve_checkpoint(c.model_dir);
    c.model_dir = ckpt.folder;
    c.model_name = ckpt.name;
    c.model_id = ckpt.repo_id.empty() ? ckpt.name : ckpt.repo_id;
    const model::Gemma2Config mcfg = model::read_gemma2_config(c.model_dir);
    c.layers = parse_layers(o->layers, mcfg.num_layers);
    c.total_tokens = parse_count("--tokens", o->tokens);
    c.shard_tokens = parse_count("--shard-tokens", o->shard_tokens);
    c.corpus.holdout_every = o->holdout_every;
    c.windows.concat = !o->truncate;
    const std::atomic<bool>& stop = stop_on_signals();
    const bool finished = pipeline::write_activation_cache(c, &stop);
    return finished || !stop ? 0 : 130;
  };
}

}  // namespace sae::cli
