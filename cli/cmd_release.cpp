// sae release: text corpus + Gemma-2 -> Matryoshka SAEs per (variant, layer) -> a release
// folder in SAELens layout with a model card (docs/release.md).
#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>

#include "commands.h"
#include "core/error.h"
#include "model/checkpoint.h"
#include "model/gemma2_config.h"
#include "pipeline/activation_cache.h"
#include "pipeline/release.h"
#include "pipeline/release_merge.h"
#include "prompts.h"

namespace sae::cli {

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) {
  g_stop = true;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t c = s.find(',', start);
    std::string part = s.substr(start, c == std::string::npos ? std::string::npos : c - start);
    if (!part.empty()) out.push_back(part);
    if (c == std::string::npos) break;
    start = c + 1;
  }
  return out;
}
}  // namespace

const std::atomic<bool>& stop_on_signals() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  return g_stop;
}

// The number at the start of `s` and how many characters it took (0: none).
double leading_number(const std::string& s, size_t& used) {
  used = 0;
  try {
    return std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
    return 0;
  }
}

int64_t parse_count(const std::string& option, const std::string& s) {
  if (s.empty()) fail(option, s, "empty");
  double mult = 1;
  std::string num = s;
  switch (s.back()) {
    case 'K':
    case 'k':
      mult = 1e3;
      num.pop_back();
      break;
    case 'M':
    case 'm':
      mult = 1e6;
      num.pop_back();
      break;
    case 'B':
    case 'b':
    case 'G':
    case 'g':
      mult = 1e9;
      num.pop_back();
      break;
    default:
      break;
  }
  size_t used = 0;
  const double v = leading_number(num, used);
  if (used != num.size() || v <= 0) fail(option, s, "expected a count like 750M or 20000");
  return int64_t(v * mult + 0.5);
}

// A memory size: bytes, or a number with M, G or T (binary: GiB; "GB" and "GiB" alike).
int64_t parse_memory(const std::string& option, const std::string& s) {
  size_t used = 0;
  const double v = leading_number(s, used);
  std::string unit = s.substr(used);
  for (const char* tail : {"iB", "B"})
    if (unit.size() > 1 && unit.ends_with(tail)) unit.resize(unit.size() - std::strlen(tail));
  const double mult = unit.empty()                 ? 1.0
                      : unit == "M" || unit == "m" ? double(int64_t(1) << 20)
                      : unit == "G" || unit == "g" ? double(int64_t(1) << 30)
                      : unit == "T" || unit == "t" ? double(int64_t(1) << 40)
                                                   : 0.0;
  if (used == 0 || mult == 0.0 || !(v > 0))
    fail(option, s, "expected a memory size like 80G, 141GiB or 96000M");
  return int64_t(v * mult);
}

Runner add_release(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "release", "Train Matryoshka SAEs on Gemma-2 activations from text; write a release");
  cmd->footer(
      "Exit status: 0 written (or stopped at --stop-at-step; with --plan-only: it fits), 1 an "
      "error (--plan-only: it does not fit), 2 written without the "
      "SAEs set aside (each diverged again after training.max_rollbacks rollbacks while the "
      "others trained on; release.json says where), 130 stopped by a signal (state saved).");
  struct Opts {
    pipeline::ReleaseOptions r;
    std::string layers, variants = "standard,snap", tokens, gpu_memory;
    int64_t holdout_every = 100;
    bool truncate = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option(
      "--model", o->r.model,
      "Gemma-2 checkpoint: a folder or a Hugging Face repo id (e.g. google/gemma-2-2b)");
  cmd->add_option("--dataset", o->r.corpus.shards,
                  "Corpus shards: paths or globs of .jsonl(.zst), .txt, .npy, .bin (repeatable)");
  cmd->add_option("--layers", o->layers,
                  "Layers, e.g. 0-24 or 3,12 (with --from-cache: default the cache's)");
  cmd->add_option("--from-cache", o->r.from_cache,
                  "Train from an activation cache (sae cache) instead of running the model: "
                  "hook, layers, windows and corpus from its cache.json; its last shards are "
                  "the held-out rows");
  cmd->add_option("--variants", o->variants, "standard,snap (or preset names)");
  cmd->add_option("--tokens", o->tokens, "Training tokens per SAE, e.g. 750M (default: preset)");
  cmd->add_option("-o,--output", o->r.output_dir, "Release folder (default out/release)");
  cmd->add_option("--hook", o->r.hook, "resid_post, resid_pre, attn_out or mlp_out");
  cmd->add_option("--context-size", o->r.store.windows.context_size, "Tokens per context window");
  cmd->add_flag("--truncate", o->truncate,
                "One window per document (truncated; shorter ones dropped) instead of packing");
  cmd->add_option("--text-field", o->r.corpus.text_field, "JSONL field holding the text");
  cmd->add_option("--bin-dtype", o->r.corpus.bin_dtype, "Token width of .bin shards: u16|u32");
  cmd->add_option("--holdout-every", o->holdout_every, "Hold out every Nth document");
  cmd->add_option("--heldout-tokens", o->r.heldout_tokens, "Held-out tokens for L0 / EV");
  cmd->add_option("--ce-windows", o->r.ce_windows,
                  "Held-out windows for the CE-loss score (0: skip; needs all layers loaded)");
  cmd->add_option("--prompts-per-forward", o->r.store.prompts_per_forward,
                  "Context windows per model forward (SAELens store_batch_size_prompts)");
  cmd->add_option("--n-batches-in-buffer", o->r.store.n_batches_in_buffer,
                  "Mixing buffer size in forwards (SAELens n_batches_in_buffer)");
  cmd->add_option("--set", o->r.overrides,
                  "Override a field of every SAE's training config: section.key=value");
  cmd->add_option("--log-every", o->r.log_every_steps, "Steps between progress lines");
  cmd->add_option("--checkpoint-minutes", o->r.checkpoint_minutes,
                  "Checkpoint every SAE and the data position every this many minutes (default "
                  "30; 0: every training.checkpoint_every_steps steps)");
  cmd->add_option("--checkpoint-snapshots", o->r.checkpoint_snapshots,
                  "SAE states held in host memory while their checkpoints are written beside "
                  "the steps (default 0: as many as fit in 1 GiB, at least 2)");
  cmd->add_flag("!--ignore-disk-plan", o->r.check_disk,
                "Start even when the disk plan (checkpoints and SAE folders, printed first) "
                "needs more than the output folder's disk has free");
  cmd->add_option("--release-name", o->r.release_name, "Name in the model card");
  cmd->add_option("--model-name", o->r.model_name,
                  "cfg.json metadata.model_name (default: the checkpoint's name, e.g. gemma-2-2b)");
  cmd->add_option("--dataset-name,--dataset-path", o->r.dataset_name,
                  "The corpus as cfg.json metadata.dataset_path and the model card name it, e.g. "
                  "monology/pile-uncopyrighted (default: the shards' file names)");
  cmd->add_flag("--bf16", o->r.keep_bf16, "Keep the model weights in bf16");
  cmd->add_flag(
      "--bf16-matmul", o->r.bf16_matmul,
      "Weights in bf16 and multiplied in bf16 (implies --bf16; bf16 GEMM operands, f32 sums, as "
      "transformers in bf16; oneDNN where the CPU has bf16 dot products)");
  add_device_options(cmd, o->r.device, o->r.precision,
                     "the model forward, the activation store and every SAE's step on the GPU "
                     "(one GPU per rank under mpirun), after a memory plan is checked",
                     "On cuda, the model forward's: bf16 (bf16 weights and GEMM operands, fp32 "
                     "accumulate; default) or fp32. The SAEs' own: --set training.precision=...");
  cmd->add_option("--activation-store", o->r.activation_store,
                  "On cuda, where the activation store's rows live: device, host (pinned host "
                  "memory read across the bus: slower, leaves the GPU to the SAEs) or auto "
                  "(default: the device when the memory plan fits, else the host)")
      ->check(CLI::IsMember({"auto", "device", "host"}));
  cmd->add_flag("!--no-overlap", o->r.overlap_forward,
                "Run the model's forwards (on cuda) or the cache's reads (--from-cache) between "
                "the SAE steps instead of beside them on their own thread (the same batches; for "
                "measuring the overlap)");
  cmd->add_flag("--plan-only", o->r.plan_only,
                "Print the plans (memory of the host or the GPU, disk; on cuda the groups of "
                "layers that fit) and exit before anything is loaded or written: 0 when it fits, "
                "1 when not");
  cmd->add_option("--gpu-memory", o->gpu_memory,
                  "On cuda, plan against this much GPU memory (e.g. 80G, 141G) instead of what "
                  "is free: with --plan-only, a GPU this machine need not have; in a run, a cap "
                  "below what is free");
  cmd->add_option("--ranks", o->r.plan_ranks,
                  "With --plan-only: plan a job of N ranks (mpirun -np N, one GPU each on cuda) "
                  "in this one process: each rank's SAEs and memory; on cuda, when a rank does "
                  "not fit, the fewest ranks that would");
  cmd->add_flag("--resume", o->r.resume, "Continue an interrupted release in the same folder");
  cmd->add_option("--stop-at-step", o->r.stop_at_step,
                  "Checkpoint and exit 0 at this step (continue later with --resume)");
  cmd->add_option("--parallel", o->r.parallel,
                  "Under mpirun/srun: modules (default: each rank forwards its share of the "
                  "corpus and trains its share of the SAEs on every rank's activations; with "
                  "fewer SAEs than ranks each SAE gets a group of ranks, data parallel inside "
                  "it) or data (every SAE data parallel over all the ranks); "
                  "docs/distributed.md")
      ->check(CLI::IsMember({"modules", "data"}));
  return [=] {
    pipeline::ReleaseOptions r = o->r;
    if (!r.from_cache.empty()) {
      if (!r.model.empty() || !r.corpus.shards.empty())
        fail("--from-cache", r.from_cache,
             "takes the model and the corpus from the cache: drop --model and --dataset");
      const pipeline::CacheManifest c = pipeline::read_cache_manifest(r.from_cache);
      if (!o->layers.empty())
        r.layers = parse_layers(o->layers, *std::max_element(c.layers.begin(), c.layers.end()) + 1);
    } else {
      for (auto [name, missing] :
           {std::pair{"--model", r.model.empty()}, std::pair{"--dataset", r.corpus.shards.empty()},
            std::pair{"--layers", o->layers.empty()}})
        if (missing) fail(name, "", "required (or --from-cache CACHE)");
      r.model = model::resolve_checkpoint(r.model).folder;  // once, before the layers are checked
      const model::Gemma2Config mcfg = model::read_gemma2_config(r.model);
      r.layers = parse_layers(o->layers, mcfg.num_layers);
    }
    r.variants = split_commas(o->variants);
    if (!o->tokens.empty()) r.total_tokens = parse_count("--tokens", o->tokens);
    if (!o->gpu_memory.empty()) r.gpu_memory = parse_memory("--gpu-memory", o->gpu_memory);
    r.corpus.holdout_every = o->holdout_every;
    r.store.windows.concat = !o->truncate;
    const std::atomic<bool>& stop = stop_on_signals();
    const pipeline::ReleaseEnd end = pipeline::run_release(r, &stop);
    if (r.plan_only) return end.plan.is_object() && end.plan.value("fits", false) ? 0 : 1;
    if (!end.finished) return stop ? 130 : 0;  // 130: interrupted by a signal, state saved
    return end.set_aside.empty() ? 0 : 2;      // 2: written, but without the SAEs set aside
  };
}

Runner add_release_merge(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("release-merge",
                         "Merge releases run in groups of layers into one release folder (a group "
                         "that trained SAEs set aside again replaces them)");
  auto inputs = std::make_shared<std::vector<std::string>>();
  auto output = std::make_shared<std::string>();
  cmd->add_option("inputs", *inputs, "Release folders (each written by sae release)")
      ->required()
      ->expected(2, -1);
  cmd->add_option("-o,--output", *output, "The merged release folder (new)")->required();
  return [=] {
    pipeline::merge_releases(*inputs, *output);
    std::printf("release-merge: %zu releases merged into %s (model card README.md, release.json)\n",
                inputs->size(), output->c_str());
    return 0;
  };
}

}  // namespace sae::cli
