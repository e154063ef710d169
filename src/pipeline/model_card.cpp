#include "pipeline/model_card.h"

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <utility>
#include <vector>

#include "core/error.h"

namespace sae::pipeline {

std::string model_card(const nlohmann::ordered_json& release) {
  const auto& r = release.at("recipe");
  const std::string model_name = r.at("model_name"), hook = r.at("hook");
  const bool with_ce = r.at("ce_windows").get<int64_t>() > 0;
  std::ostringstream md;
  md << "---\nlibrary_name: saelens\ntags:\n- sparse-autoencoder\n- matryoshka\n- sae.cpp\n---\n\n";
  md << "# " << release.at("release").get<std::string>() << "\n\n";
  md << "Batch-TopK Matryoshka sparse autoencoders on the " << hook << " activations of "
     << model_name << ", one per layer and variant, trained with sae.cpp "
     << r.at("sae_cpp_version").get<std::string>() << " and saved in SAELens format.\n\n";
  md << "## How they were trained\n\n";
  md << "- Model: `" << model_name << "` (" << r.at("model").get<std::string>()
     << "), hook `blocks.L.hook_" << hook << "`";
  if (r.value("model_bf16_matmul", false))  // other activations than an f32 forward's
    md << "; the model run in bf16 (bf16 weights and GEMM operands, f32 sums and residual "
          "stream)";
  if (release.contains("device"))
    md << "; trained on " << release.at("device").value("gpu", std::string("a GPU"));
  md << "\n";
  const std::string dataset = r.at("dataset");
  md << "- Data: " << (dataset.empty() ? std::string("see the shards below") : dataset)
     << "; context windows of " << r.at("context_size").get<int64_t>() << " tokens, BOS first, "
     << (r.at("packed").get<bool>() ? "documents packed" : "documents truncated")
     << "; BOS/EOS/PAD positions excluded; every "
     << r.at("corpus").at("holdout_every").get<int64_t>() << "th document held out\n";
  md << "- " << r.at("training_tokens").get<int64_t>() << " training tokens per SAE, batches of "
     << r.at("batch_size").get<int64_t>() << " tokens from a shuffled buffer of "
     << r.at("buffer_tokens").get<int64_t>() << " tokens\n";
  if (release.contains("from_cache")) {
    const auto& c = release.at("from_cache");
    md << "- Trained from an activation cache (`sae cache`) of " << c.at("shards").get<int64_t>()
       << " shards of " << c.at("shard_tokens").get<int64_t>()
       << " tokens: " << c.at("trained_shards").get<int64_t>() << " trained on, the last "
       << c.at("heldout_shards").get<int64_t>()
       << " held out for the evaluation below (training-split documents never trained on)\n";
  }
  md << "- Corpus shards:";
  for (const auto& sh : r.at("corpus").at("shards")) md << " `" << sh.get<std::string>() << "`";
  const auto& variants = r.at("variants");
  const auto& v0 = variants.begin().value();
  md << "\n- Width " << v0.at("d_sae").get<int64_t>() << ", k = " << v0.at("k").get<double>()
     << ", Matryoshka widths";
  for (const auto& w : v0.at("widths")) md << " " << w.get<int64_t>();
  md << "\n- Variants:";
  for (const auto& [v, vr] : variants.items())
    md << " `" << v << "` (preset " << vr.at("preset").get<std::string>() << ", level losses "
       << vr.at("level_losses").get<std::string>() << ")";
  // SAEs that diverged and were rolled back to a checkpoint (training.max_rollbacks) skipped
  // the batches between: said, since they saw fewer tokens than the rest.
  for (const auto& [v, per_hook] : release.at("results").items())
    for (const auto& [h, res] : per_hook.items()) {
      if (!res.contains("rollbacks")) continue;
      md << "\n- `" << v << "/" << h << "` diverged and was rolled back to its last checkpoint";
      for (const auto& b : res.at("rollbacks"))
        md << " (step " << b.at("step").get<int64_t>() << " to step "
           << b.at("to_step").get<int64_t>() << ")";
      md << ": " << res.at("skipped_tokens").get<int64_t>()
         << " training tokens skipped, trained on the rest";
    }
  // SAEs set aside: they diverged again after their rollbacks while the others trained on;
  // and those trained again in a group of their own (release-merge), with what it changed.
  auto aside = [](const nlohmann::ordered_json& f) {
    const int64_t rollbacks = f.at("rollbacks").get<int64_t>();
    return cat("diverged at step ", f.at("step").get<int64_t>(), " again after ", rollbacks,
               " rollback", rollbacks == 1 ? "" : "s");
  };
  for (const auto& [v, per_hook] : release.at("results").items())
    for (const auto& [h, res] : per_hook.items()) {
      if (res.contains("failed"))
        md << "\n- `" << v << "/" << h << "` is not in this release: it " << aside(res["failed"])
           << " and was set aside while the others trained on";
      if (!res.contains("replaces")) continue;
      md << "\n- `" << v << "/" << h << "` was trained again after its first run "
         << aside(res["replaces"].at("failed")) << " and was set aside";
      if (res.contains("recipe_changes")) {
        md << ", with";
        for (const auto& [key, ch] : res["recipe_changes"].items())
          md << " `" << key << "` " << ch.at("from").dump() << " -> " << ch.at("to").dump();
      }
    }
  // A job resumed with other settings: the recipe is the last run's; what came before, said
  // once when every SAE has the same history (a release resumed whole), else per SAE.
  auto history = [](const nlohmann::ordered_json& changes) {
    std::string s;
    for (const auto& c : changes) {
      s += cat(s.empty() ? "" : ";", " from step ", c.at("step").get<int64_t>());
      for (const auto& [key, ch] : c.at("changed").items())
        s += cat(", `", key, "` ", ch.at("from").dump(), " -> ", ch.at("to").dump());
    }
    return s;
  };
  std::vector<std::pair<std::string, std::string>> histories;  // (variant/hook, history)
  for (const auto& [v, per_hook] : release.at("results").items())
    for (const auto& [h, res] : per_hook.items())
      if (!res.contains("failed"))
        histories.push_back(
            {v + "/" + h, history(res.value("config_changes", nlohmann::ordered_json::array()))});
  const bool same = std::all_of(histories.begin(), histories.end(),
                                [&](const auto& x) { return x.second == histories[0].second; });
  if (same && !histories.empty() && !histories[0].second.empty())
    md << "\n- Every SAE was resumed with other settings:" << histories[0].second;
  else
    for (const auto& [id, text] : histories)
      if (!text.empty()) md << "\n- `" << id << "` was resumed with other settings:" << text;
  md << "\n\n## Evaluation (held-out tokens)\n\n";
  md << "L0: mean active latents per token. Explained variance: 1 - sum|x - x_hat|^2 / "
        "sum|x - mean x|^2 over the held-out set (SAELens's conventional definition; the legacy "
        "per-token mean is in release.json).";
  if (with_ce)
    md << " CE-loss score: (CE zero-ablated - CE with SAE) / (CE zero-ablated - CE clean) on "
       << r.at("ce_windows").get<int64_t>() << " held-out windows, BOS never replaced.";
  md << "\n";
  std::string first_id;
  for (const auto& [v, per_hook] : release.at("results").items()) {
    md << "\n### " << v << "\n\n| layer | SAE ID | width | l0 | explained variance |"
       << (with_ce ? " CE-loss score |" : "") << "\n|---|---|---|---|---|"
       << (with_ce ? "---|" : "") << "\n";
    for (const auto& [h, res] : per_hook.items()) {
      if (res.contains("failed")) {  // said above
        md << "| " << res.at("layer").get<int64_t>() << " | " << v << "/" << h << " | "
           << res.at("width").get<int64_t>() << " | set aside | - |" << (with_ce ? " - |" : "")
           << "\n";
        continue;
      }
      if (first_id.empty()) first_id = v + "/" + h;
      char row[256];
      std::snprintf(row, sizeof row, "| %lld | %s/%s | %lld | %.2f | %.4f |",
                    (long long)res.at("layer").get<int64_t>(), v.c_str(), h.c_str(),
                    (long long)res.at("width").get<int64_t>(), res.at("l0").get<double>(),
                    res.at("explained_variance").get<double>());
      md << row;
      if (with_ce) {
        char ce[32];
        std::snprintf(ce, sizeof ce, " %.4f |", res.at("ce_loss_score").get<double>());
        md << ce;
      }
      md << "\n";
    }
  }
  md << "\n## Loading\n\nSAELens, from a local copy of this folder:\n\n```python\n"
     << "from sae_lens import SAE\nsae = SAE.load_from_disk(\"" << first_id
     << "\")\n```\n\nSAELens, once this folder is uploaded to a Hugging Face repo "
        "`<org>/<repo>`:\n\n```python\nsae = SAE.from_pretrained(release=\"<org>/<repo>\", "
        "sae_id=\""
     << first_id
     << "\")\n```\n\nsae.cpp, Python (a folder, or the repo id: downloaded into the Hugging "
        "Face cache on first use):\n\n```python\nimport saecpp\nsae, cfg, sparsity = "
        "saecpp.SAE.from_pretrained(\"<org>/<repo>\", \""
     << first_id << "\")\n```\n\nsae.cpp, command line:\n\n```\nsae info <org>/<repo>:" << first_id
     << "\n```\n";
  md << "\n## Publishing\n\nA release folder is published by uploading it, without the "
        "training state in `.work/`, to a Hugging Face model repo (after `hf auth login`, or "
        "with HF_TOKEN set), from inside the folder:\n\n```\nhf upload <org>/<repo> . . "
        "--exclude \".work/*\"\n```\n\n(`huggingface-cli upload` with the same arguments in "
        "huggingface_hub before 1.0.)\n";
  return md.str();
}

}  // namespace sae::pipeline
