#include "pipeline/release_merge.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/json_file.h"
#include "pipeline/model_card.h"
#include "train/train_config.h"

namespace sae::pipeline {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

// The first place where two JSON values differ, as a dotted path ("" when equal).
std::string first_difference(const ojson& a, const ojson& b, const std::string& path) {
  if (a.is_object() && b.is_object()) {
    for (const auto& [k, v] : a.items()) {
      const std::string p = path.empty() ? k : path + "." + k;
      if (!b.contains(k)) return p;
      if (auto d = first_difference(v, b.at(k), p); !d.empty()) return d;
    }
    for (const auto& [k, v] : b.items())
      if (!a.contains(k)) return path.empty() ? k : path + "." + k;
    return "";
  }
  return a == b ? "" : (path.empty() ? std::string("(value)") : path);
}

ojson at_path(const ojson& j, const std::string& dotted) {
  const ojson* cur = &j;
  size_t start = 0;
  while (start <= dotted.size()) {
    const size_t dot = dotted.find('.', start);
    const std::string key = dotted.substr(start, dot == std::string::npos ? dot : dot - start);
    if (!cur->is_object() || !cur->contains(key)) return nullptr;
    cur = &cur->at(key);
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return *cur;
}

// One SAE folder into place: hard links when possible (no copy of hundreds of MB), else a copy.
void link_or_copy_folder(const fs::path& from, const fs::path& to) {
  for (const char* required : {"cfg.json", "sae_weights.safetensors"})
    if (!fs::exists(from / required))
      fail((from / required).string(), "file", "missing: not a complete SAE folder");
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) {
    if (!e.is_regular_file()) continue;
    std::error_code ec;
    fs::create_hard_link(e.path(), to / e.path().filename(), ec);
    if (ec) fs::copy_file(e.path(), to / e.path().filename(), fs::copy_options::overwrite_existing);
  }
}

}  // namespace

void merge_releases(const std::vector<std::string>& inputs, const std::string& output) {
  if (inputs.size() < 2) fail("release-merge", "inputs", "give at least two release folders");
  const fs::path out(output);
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    fail(output, "output", "exists and is not empty; give a new folder");

  std::vector<ojson> rel;
  for (const std::string& in : inputs) {
    const std::string file = (fs::path(in) / "release.json").string();
    if (!fs::exists(file)) fail(file, "release.json", "missing: not a release folder");
    rel.push_back(read_json_file(file));
    for (const char* key : {"recipe", "results", "layers", "variants"})
      if (!rel.back().contains(key))
        fail(file, key,
             "missing (a release written before sae.cpp recorded its recipe cannot be merged)");
  }
  // Same recipe, same variants: all of it but the model's path (which may differ between
  // machines) and the bookkeeping that leaves the SAEs as they are (how often each group logged,
  // evaluated and checkpointed, its threads, and how many divergences it would survive: those it
  // did are in its results).
  auto comparable = [](ojson recipe) {
    recipe.erase("model");
    if (recipe.contains("variants") && recipe["variants"].is_object())
      for (auto& [name, v] : recipe["variants"].items())
        if (v.contains("config") && v["config"].contains("training"))
          for (const char* k : train::kBookkeepingKeys) v["config"]["training"].erase(k);
    return recipe;
  };
  const std::string first_file = (fs::path(inputs[0]) / "release.json").string();
  const ojson recipe0 = comparable(rel[0]["recipe"]);
  for (size_t i = 1; i < rel.size(); ++i) {
    const ojson r = comparable(rel[i]["recipe"]);
    if (const std::string d = first_difference(recipe0, r, ""); !d.empty())
      fail((fs::path(inputs[i]) / "release.json").string(), "recipe." + d,
           cat("differs from ", first_file, " (", at_path(r, d).dump(), " against ",
               at_path(recipe0, d).dump(), "): groups of one release must be trained alike"));
    if (rel[i]["variants"] != rel[0]["variants"])
      fail((fs::path(inputs[i]) / "release.json").string(), "variants",
           cat("differs from ", first_file));
  }
  // Layers: each in one group only.
  std::map<int64_t, size_t> owner;
  for (size_t i = 0; i < rel.size(); ++i)
    for (const auto& l : rel[i]["layers"]) {
      const int64_t layer = l.get<int64_t>();
      if (auto it = owner.find(layer); it != owner.end())
        fail((fs::path(inputs[i]) / "release.json").string(), "layers",
             cat("layer ", layer, " is also in ", inputs[it->second],
                 "; each layer must come from one group"));
      owner[layer] = i;
    }

  // Build beside the output, then rename: the merged release appears whole or not at all.
  const fs::path tmp = out.string() + ".merging";
  fs::remove_all(tmp);
  ojson results = ojson::object();
  for (const auto& v : rel[0]["variants"]) {
    const std::string variant = v.get<std::string>();
    std::vector<std::pair<int64_t, std::pair<std::string, size_t>>> hooks;  // layer -> hook, group
    for (size_t i = 0; i < rel.size(); ++i) {
      if (!rel[i]["results"].contains(variant))
        fail((fs::path(inputs[i]) / "release.json").string(), "results." + variant, "missing");
      for (const auto& [hook, res] : rel[i]["results"][variant].items())
        hooks.push_back({res.at("layer").get<int64_t>(), {hook, i}});
    }
    std::sort(hooks.begin(), hooks.end());
    for (const auto& [layer, hg] : hooks) {
      const auto& [hook, i] = hg;
      // An SAE its group set aside (it diverged) has no folder: it stays set aside, said.
      if (!rel[i]["results"][variant][hook].contains("failed"))
        link_or_copy_folder(fs::path(inputs[i]) / variant / hook, tmp / variant / hook);
      results[variant][hook] = rel[i]["results"][variant][hook];
    }
  }
  std::vector<int64_t> layers;
  for (const auto& [layer, i] : owner) layers.push_back(layer);
  ojson merged_from = ojson::array();
  int64_t forwarded = 0;
  for (size_t i = 0; i < rel.size(); ++i) {
    forwarded += rel[i].value("tokens_forwarded", int64_t(0));
    merged_from.push_back({{"folder", fs::absolute(inputs[i]).lexically_normal().string()},
                           {"layers", rel[i]["layers"]},
                           {"tokens_forwarded", rel[i].value("tokens_forwarded", int64_t(0))}});
  }
  ojson release = rel[0];
  release["layers"] = layers;
  release["tokens_forwarded"] = forwarded;
  release["merged_from"] = merged_from;
  release.erase("results");
  release["results"] = results;  // last, as in a release written at once
  write_file_atomic((tmp / "release.json").string(), release.dump(2) + "\n");
  write_file_atomic((tmp / "README.md").string(), model_card(release));
  if (fs::exists(out)) fs::remove(out);  // an empty folder (checked above)
  fs::rename(tmp, out);
}

}  // namespace sae::pipeline
