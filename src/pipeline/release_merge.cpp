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
  // Each SAE (variant/hook) from one group: the one that trained it, or, when a group set it
  // aside (it diverged again after its rollbacks, no folder), another that trained it again —
  // a repair group, every SAE of which replaces one set aside.
  struct Entry {
    size_t group;
    std::string variant, hook;
    int64_t layer;
    bool failed;
  };
  std::map<std::string, std::vector<Entry>> by_id;  // "variant/hook" -> its groups
  for (size_t i = 0; i < rel.size(); ++i)
    for (const auto& [variant, per_hook] : rel[i]["results"].items())
      for (const auto& [hook, res] : per_hook.items())
        by_id[variant + "/" + hook].push_back(
            {i, variant, hook, res.at("layer").get<int64_t>(), res.contains("failed")});
  for (const auto& [id, entries] : by_id) {
    const Entry* trained = nullptr;
    for (const Entry& e : entries) {
      if (e.failed) continue;
      if (trained)
        fail((fs::path(inputs[e.group]) / "release.json").string(), "results",
             cat("layer ", e.layer, " (", id, ") is also in ", inputs[trained->group],
                 ": each SAE must come from one group, unless it replaces one set aside there"));
      trained = &e;
    }
  }
  std::vector<uint8_t> repair(rel.size(), 0);  // every SAE of the group replaces one set aside
  for (size_t i = 0; i < rel.size(); ++i) {
    bool all = !rel[i]["results"].empty();
    for (const auto& [variant, per_hook] : rel[i]["results"].items())
      for (const auto& [hook, res] : per_hook.items()) {
        const auto& entries = by_id[variant + "/" + hook];
        all = all && !res.contains("failed") &&
              std::any_of(entries.begin(), entries.end(), [](const Entry& e) { return e.failed; });
      }
    repair[i] = all;
  }
  // Same recipe, same variants: all of it but the model's path (which may differ between
  // machines) and the bookkeeping that leaves the SAEs as they are (how often each group logged,
  // evaluated and checkpointed, its threads, and how many divergences it would survive: those it
  // did are in its results). A repair group may train its variants' SAEs with other settings
  // (a lower learning rate): recorded per SAE, not refused.
  auto comparable = [](ojson recipe) {
    recipe.erase("model");
    if (recipe.contains("variants") && recipe["variants"].is_object())
      for (auto& [name, v] : recipe["variants"].items())
        if (v.contains("config") && v["config"].contains("training"))
          for (const char* k : train::kBookkeepingKeys) v["config"]["training"].erase(k);
    return recipe;
  };
  // The first group that is not a repair (one is: a repair replaces another group's SAE).
  const size_t base = size_t(std::find(repair.begin(), repair.end(), 0) - repair.begin());
  const std::string base_file = (fs::path(inputs[base]) / "release.json").string();
  const ojson recipe0 = comparable(rel[base]["recipe"]);
  std::map<std::pair<size_t, std::string>, ojson> changes;  // (repair group, variant) -> changes
  for (size_t i = 0; i < rel.size(); ++i) {
    if (i == base) continue;
    const std::string file = (fs::path(inputs[i]) / "release.json").string();
    ojson r = comparable(rel[i]["recipe"]), r0 = recipe0;
    if (repair[i]) {  // its variants' SAE settings compared below, per variant
      for (const auto& [name, v] : r["variants"].items()) {
        if (!r0["variants"].contains(name))
          fail(file, "recipe.variants." + name, cat("is not a variant of ", base_file));
        ojson a = r0["variants"][name], b = v;
        a.erase("config"), b.erase("config");
        if (const std::string d = first_difference(a, b, ""); !d.empty())
          fail(file, "recipe.variants." + name + "." + d,
               cat("differs from ", base_file, " (", at_path(b, d).dump(), " against ",
                   at_path(a, d).dump(), "): an SAE trained again must keep its shape"));
        changes[{i, name}] =
            train::config_changes(nlohmann::json::parse(r0["variants"][name]["config"].dump()),
                                  nlohmann::json::parse(v["config"].dump()));
      }
      r.erase("variants"), r0.erase("variants");
    }
    if (const std::string d = first_difference(r0, r, ""); !d.empty())
      fail(file, "recipe." + d,
           cat("differs from ", base_file, " (", at_path(r, d).dump(), " against ",
               at_path(r0, d).dump(), "): groups of one release must be trained alike"));
    if (!repair[i] && rel[i]["variants"] != rel[base]["variants"])
      fail(file, "variants", cat("differs from ", base_file));
  }

  // Build beside the output, then rename: the merged release appears whole or not at all.
  const fs::path tmp = out.string() + ".merging";
  fs::remove_all(tmp);
  struct RemoveUnlessRenamed {  // a group's SAE folder found incomplete: nothing left behind
    fs::path path;
    ~RemoveUnlessRenamed() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } cleanup{tmp};
  ojson results = ojson::object();
  std::map<int64_t, size_t> owner;  // layer -> a group that holds it
  for (const auto& v : rel[base]["variants"]) {
    const std::string variant = v.get<std::string>();
    std::vector<std::pair<int64_t, std::string>> hooks;  // (layer, id) in layer order
    for (const auto& [id, entries] : by_id)
      if (entries.front().variant == variant) hooks.push_back({entries.front().layer, id});
    std::sort(hooks.begin(), hooks.end());
    for (const auto& [layer, id] : hooks) {
      const std::vector<Entry>& entries = by_id[id];
      const auto trained =
          std::find_if(entries.begin(), entries.end(), [](const Entry& e) { return !e.failed; });
      const Entry& e = trained != entries.end() ? *trained : entries.front();
      owner.emplace(layer, e.group);
      ojson res = rel[e.group]["results"][variant][e.hook];
      if (!e.failed) {
        link_or_copy_folder(fs::path(inputs[e.group]) / variant / e.hook, tmp / variant / e.hook);
        if (entries.size() > 1) {  // it replaces the one set aside: said, with what changed
          const Entry& aside = entries[trained == entries.begin() ? 1 : 0];
          res["replaces"] = {
              {"folder", fs::absolute(inputs[aside.group]).lexically_normal().string()},
              {"failed", rel[aside.group]["results"][variant][aside.hook]["failed"]}};
          if (const ojson& c = changes[{e.group, variant}]; !c.empty()) res["recipe_changes"] = c;
        }
      }
      results[variant][e.hook] = res;
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
  ojson release = rel[base];
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
