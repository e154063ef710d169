// sae dashboard: feature dashboards for an SAE's latents from one pass over held-out text
// (docs/dashboards.md).
#include <cstdio>

#include "commands.h"
#include "core/error.h"
#include "model/checkpoint.h"
#include "pipeline/dashboard.h"
#include "prompts.h"
#include "sae/load.h"

namespace sae::cli {

Runner add_dashboard(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "dashboard", "Feature dashboards (offline HTML, Neuronpedia files) for an SAE's latents");
  struct Opts {
    pipeline::DashboardOptions d;
    std::string tokens = "1M", latents, context = "24,8", stop_after;
    int64_t holdout_every = 100;
    bool truncate = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("sae", o->d.sae, "SAE folder or release:sae_id (its hook names the layer)")
      ->required();
  cmd->add_option("--model", o->d.model, "Gemma-2 folder or Hugging Face repo id")->required();
  cmd->add_option("--dataset", o->d.corpus.shards,
                  "Corpus shards: paths or globs of .jsonl(.zst), .txt, .npy, .bin (repeatable)")
      ->required();
  cmd->add_option("--tokens", o->tokens, "Tokens to run, e.g. 1M (default 1M)");
  cmd->add_option("-o,--output", o->d.output_dir, "Dashboard folder, new (default out/dashboard)");
  cmd->add_option("--latents", o->latents, "Pages for these latents, e.g. 0-99,512 (default all)");
  cmd->add_option("--context", o->context,
                  "Tokens shown before,after each example's token (default 24,8)");
  cmd->add_option("--context-size", o->d.windows.context_size,
                  "Tokens per context window (default 128)");
  cmd->add_flag("--truncate", o->truncate,
                "One window per document (truncated; shorter ones dropped) instead of packing");
  cmd->add_option("--text-field", o->d.corpus.text_field, "JSONL field holding the text");
  cmd->add_option("--bin-dtype", o->d.corpus.bin_dtype, "Token width of .bin shards: u16|u32");
  cmd->add_option("--holdout-every", o->holdout_every,
                  "The held-out split: every Nth document, as in `sae release` (default 100)");
  cmd->add_flag("--training-split", o->d.training_split,
                "Read the training split instead of the held-out documents");
  cmd->add_option("--prompts-per-forward", o->d.prompts_per_forward,
                  "Context windows per model forward");
  cmd->add_option("--top-k", o->d.stats.top_k, "Top activating tokens per latent (default 20)");
  cmd->add_option("--interval-samples", o->d.stats.interval_samples,
                  "Tokens sampled per activation interval (default 5)");
  cmd->add_flag("--neuronpedia", o->d.neuronpedia,
                "Also write SAEDashboard's Neuronpedia batch files (neuronpedia/)");
  cmd->add_option("--neuronpedia-set", o->d.neuronpedia_set,
                  "sae_set of the Neuronpedia batches (default: the SAE folder's name)");
  cmd->add_flag("--bf16", o->d.keep_bf16, "Keep the model weights in bf16");
  cmd->add_flag(
      "--bf16-matmul", o->d.bf16_matmul,
      "Weights in bf16 and multiplied in bf16 (implies --bf16; bf16 GEMM operands, f32 sums, as "
      "transformers in bf16; oneDNN where the CPU has bf16 dot products)");
  add_device_options(cmd, o->d.device, o->d.precision,
                     "the model forward, the SAE's encoder and the logit effects on the GPU",
                     "On cuda, the forward: bf16 (bf16 weights and GEMM operands, fp32 "
                     "accumulate) or fp32 (default bf16; the SAE's encoder is fp32 either way)");
  cmd->add_flag("--resume", o->d.resume,
                "Continue an interrupted dashboard (its checkpoint in <output>.partial)");
  cmd->add_option("--checkpoint-every", o->d.checkpoint_seconds,
                  "Seconds between checkpoints of the pass (default 600; also on Ctrl-C)");
  auto* stop_after =
      cmd->add_option("--stop-after-tokens", o->stop_after,
                      "Checkpoint and exit 0 after this many tokens (then --resume)");
  (void)stop_after;
  return [=] {
    pipeline::DashboardOptions d = o->d;
    d.model = model::resolve_checkpoint(d.model).folder;
    d.tokens = parse_count("--tokens", o->tokens);
    d.corpus.holdout_every = o->holdout_every;
    if (!d.training_split && d.corpus.holdout_every <= 0)
      fail("--holdout-every", std::to_string(d.corpus.holdout_every),
           "holds out nothing: pass --training-split to read the training documents");
    d.windows.concat = !o->truncate;
    const size_t comma = o->context.find(',');
    try {
      if (comma == std::string::npos) throw std::invalid_argument("no comma");
      d.context_before = std::stoi(o->context.substr(0, comma));
      d.context_after = std::stoi(o->context.substr(comma + 1));
    } catch (const std::exception&) {
      fail("--context", o->context, "expected BEFORE,AFTER token counts like 24,8");
    }
    if (!o->latents.empty()) {
      // Checked against the SAE's width once it is loaded; here only the syntax.
      d.latents = parse_ranges("--latents", o->latents, int64_t(1) << 40, "latent");
    }
    if (!o->stop_after.empty())
      d.stop_after_tokens = parse_count("--stop-after-tokens", o->stop_after);
    const std::atomic<bool>& stop = stop_on_signals();
    const pipeline::DashboardResult r = pipeline::run_dashboard(d, &stop);
    if (!r.finished) return stop ? 130 : 0;  // 130: interrupted by a signal, checkpointed
    std::printf("dashboard: %lld latents, %lld tokens, %.1f s: %s/index.html\n",
                (long long)r.latents_written, (long long)r.tokens, r.seconds, d.output_dir.c_str());
    return 0;
  };
}

}  // namespace sae::cli
