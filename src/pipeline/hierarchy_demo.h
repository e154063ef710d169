// The built-in default job: plain BatchTopK, Matryoshka (standard) and Matryoshka snap trained
// on the synthetic hierarchy, compared on what each recovers of the known features.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "eval/ground_truth.h"
#include "train/trainer.h"

namespace sae::pipeline {

struct DemoOptions {
  std::string output_dir = "out/demo";
  int64_t total_tokens = 0;  // 0: each preset's own budget
  bool resume = false;
  std::vector<std::string> overrides;  // "section.key=value", applied to every variant
};

struct DemoRow {
  std::string variant;
  int64_t width = 0;
  train::EvalResult eval;
  GroundTruthMetrics truth;
};

// Trains the three variants (each SAE saved in SAELens format under output_dir/<variant>/sae),
// prints the comparison table and writes it to output_dir/results.json and results.md.
std::vector<DemoRow> run_hierarchy_demo(const DemoOptions& opts);

}  // namespace sae::pipeline
