// sae dashboard: one pass of text through Gemma-2 and an SAE -> a static, offline folder of
// feature dashboards for its latents (docs/dashboards.md), and optionally SAEDashboard's
// Neuronpedia batch files.
//
//   out/index.html, latent.html, assets/   the pages (no network: everything is in the folder)
//   out/data/meta.js, vocab.js              run settings; every token's display text
//   out/data/index-NNN.js                   the index rows of 1024 latents
//   out/data/latents-NNN.js                 the full data of 128 latents (loaded per page)
//   out/dashboard.json                      what was run, with the timings
//   out/neuronpedia/batch-N.json, run_settings.json   (--neuronpedia)
//
// The data files are JavaScript that hands its content to the page (`saeDash.add(...)`), so a
// browser opening the folder from file:// loads only the files it shows.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "data/context_windows.h"
#include "data/corpus.h"
#include "eval/latent_stats.h"

namespace sae::pipeline {

struct DashboardOptions {
  std::string sae;    // folder or release:sae_id
  std::string model;  // Gemma-2 folder (resolved)
  data::CorpusConfig corpus;
  bool training_split = false;  // default: only held-out documents (unseen in training)
  int64_t tokens = 1 << 20;     // non-special tokens to run
  std::string output_dir = "out/dashboard";
  std::vector<int64_t> latents;  // pages for these (empty: all)
  int context_before = 24, context_after = 8;
  data::WindowConfig windows{.context_size = 128};
  int64_t prompts_per_forward = 8;
  bool keep_bf16 = false;
  bool bf16_matmul = false;  // with keep_bf16: multiply in bf16 (model::Gemma2Options)
  // "cuda": the forward (in `precision`, bf16 or fp32), the SAE's encoder (fp32) and the logit
  // effects' products on the GPU (model::DeviceGemma2, DeviceSae).
  std::string device = "cpu";
  std::string precision = "bf16";
  bool neuronpedia = false;
  std::string neuronpedia_set;      // sae_set of the batch files (default: the SAE's folder name)
  eval::LatentStatsConfig stats;    // d_sae is taken from the SAE
  bool resume = false;              // continue the interrupted run in <output_dir>.partial
  double checkpoint_seconds = 600;  // between checkpoints of the pass (and at a stop)
  int64_t stop_after_tokens = 0;    // > 0: checkpoint and return once this many are done
};

struct DashboardResult {
  bool finished = false;  // false: stopped (signal or stop_after_tokens); resume to finish
  int64_t tokens = 0, latents_written = 0;
  double seconds = 0, model_seconds = 0, encode_seconds = 0, stats_seconds = 0, write_seconds = 0;
};

// Runs the pass and writes the folder. The pass checkpoints into <output_dir>.partial every
// checkpoint_seconds and when stopped; `resume` continues it exactly. Returns the counts and
// timings.
DashboardResult run_dashboard(const DashboardOptions& opt, const std::atomic<bool>* stop = nullptr);

// The display text of a SentencePiece piece: "▁" as a space, byte pieces <0xNN> as their
// character (a newline as "↵" + newline, a tab as "→"), control tokens in angle brackets.
std::string display_piece(const std::string& piece);

}  // namespace sae::pipeline
