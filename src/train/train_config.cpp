#include "train/train_config.h"

#include <cmath>
#include <functional>
#include <set>

#include "core/error.h"

namespace sae::train {

using json = nlohmann::json;

double LrSchedule::at(int64_t step, int64_t total) const {
  const double end = lr_end < 0 ? lr / 10 : lr_end;
  if (step < warm_up_steps) {  // torch LinearLR from lr / W up to lr over W - 1 steps
    const double w = double(warm_up_steps);
    return lr * (1.0 / w + (1.0 - 1.0 / w) * double(step) / std::max(w - 1.0, 1.0));
  }
  const int64_t main_steps = std::max<int64_t>(total - warm_up_steps - decay_steps, 1);
  const int64_t s = step - warm_up_steps;
  if (s < main_steps || decay_steps == 0) {
    const double f = std::min(double(s) / double(main_steps), 1.0);
    if (name == "cosine") return end + (lr - end) * (1 + std::cos(M_PI * f)) / 2;
    if (name == "linear") return lr + (end - lr) * f;
    return lr;
  }
  const double start = name == "constant" ? lr : end;  // then linearly to 0
  return start * std::max(0.0, 1.0 - double(s - main_steps) / double(decay_steps));
}

namespace {

// Field readers that name the file and "section.field" in every error.
struct Reader {
  const std::string& where;
  std::string section;
  const json& j;
  std::set<std::string> seen;

  bool has(const char* k) {
    seen.insert(k);
    return j.contains(k) && !j[k].is_null();
  }
  std::string field(const char* k) const { return section + "." + k; }
  double number(const char* k, double v) {
    if (!has(k)) return v;
    if (!j[k].is_number()) fail(where, field(k), cat("must be a number, got ", j[k].dump()));
    return j[k].get<double>();
  }
  int64_t integer(const char* k, int64_t v, int64_t min = 0) {
    if (!has(k)) return v;
    if (!j[k].is_number_integer() || j[k].get<int64_t>() < min)
      fail(where, field(k), cat("must be an integer >= ", min, ", got ", j[k].dump()));
    return j[k].get<int64_t>();
  }
  bool boolean(const char* k, bool v) {
    if (!has(k)) return v;
    if (!j[k].is_boolean()) fail(where, field(k), cat("must be true or false, got ", j[k].dump()));
    return j[k].get<bool>();
  }
  std::string str(const char* k, std::string v, std::initializer_list<const char*> allowed = {}) {
    if (!has(k)) return v;
    if (!j[k].is_string()) fail(where, field(k), "must be a string");
    std::string s = j[k].get<std::string>();
    if (allowed.size() &&
        std::none_of(allowed.begin(), allowed.end(), [&](const char* a) { return s == a; })) {
      std::string list;
      for (const char* a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
      fail(where, field(k), cat("\"", s, "\" is not one of: ", list));
    }
    return s;
  }
  void reject_unknown() const {
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!seen.count(it.key())) fail(where, section + "." + it.key(), "unknown field");
  }
};

const json& section(const json& root, const char* name, const std::string& where) {
  static const json empty = json::object();
  if (!root.contains(name)) return empty;
  if (!root[name].is_object()) fail(where, name, "must be an object");
  return root[name];
}

}  // namespace

TrainConfig TrainConfig::from_json(const json& root, const std::string& where) {
  if (!root.is_object()) fail(where, "", "config must be a JSON object");
  for (auto it = root.begin(); it != root.end(); ++it)
    if (!std::set<std::string>{"sae", "loss", "optimizer", "training", "data", "output"}.count(
            it.key()))
      fail(where, it.key(),
           "unknown section (sections: sae, loss, optimizer, training, data, output)");
  TrainConfig c;
  TrainSpec& sp = c.spec;

  Reader s{where, "sae", section(root, "sae", where), {}};
  sp.d_sae = s.integer("d_sae", 0, 1);
  if (sp.d_sae == 0) fail(where, "sae.d_sae", "missing");
  sp.k = s.number("k", 40);
  if (s.has("matryoshka_widths")) {
    const json& w = s.j["matryoshka_widths"];
    if (!w.is_array()) fail(where, "sae.matryoshka_widths", "must be a list of integers");
    for (const auto& v : w) {
      if (!v.is_number_integer())
        fail(where, "sae.matryoshka_widths", "must be a list of integers");
      sp.widths.push_back(v.get<int64_t>());
    }
  }
  // As SAELens: a final level of width d_sae is added when the list does not end with it.
  if (sp.widths.empty() || sp.widths.back() != sp.d_sae) sp.widths.push_back(sp.d_sae);
  sp.rescale_acts_by_decoder_norm = s.boolean("rescale_acts_by_decoder_norm", false);
  sp.apply_b_dec_to_input = s.boolean("apply_b_dec_to_input", true);
  c.decoder_init_norm = s.number("decoder_init_norm", 0.1);
  c.b_dec_init = s.str("b_dec_init", "zeros", {"zeros", "mean"});
  c.normalize_activations =
      s.str("normalize_activations", "none", {"none", "expected_average_only_in"});
  s.reject_unknown();

  Reader l{where, "loss", section(root, "loss", where), {}};
  const int64_t n = sp.n_levels();
  if (l.has("level_losses") && l.j["level_losses"].is_array()) {
    for (const auto& v : l.j["level_losses"]) {
      if (v == "mse")
        sp.level_loss.push_back(LevelLoss::Mse);
      else if (v == "l2")
        sp.level_loss.push_back(LevelLoss::L2);
      else
        fail(where, "loss.level_losses", cat("entries must be \"mse\" or \"l2\", got ", v.dump()));
    }
  } else {
    const std::string kind = l.str("level_losses", "mse", {"mse", "l2", "snap"});
    for (int64_t i = 0; i < n; ++i)
      sp.level_loss.push_back(kind == "mse" || (kind == "snap" && i == n - 1) ? LevelLoss::Mse
                                                                              : LevelLoss::L2);
  }
  sp.l2_power = l.number("l2_power", 1.0);
  if (l.has("level_weights")) {
    if (l.has("balance_beta"))
      fail(where, "loss.balance_beta", "give level_weights or balance_beta, not both");
    if (!l.j["level_weights"].is_array())
      fail(where, "loss.level_weights", "must be a list of numbers");
    for (const auto& v : l.j["level_weights"]) sp.level_weight.push_back(v.get<double>());
  } else {
    const double beta = l.number("balance_beta", 1.0);  // c_i = beta^(n - i), outer level 1
    for (int64_t i = 0; i < n; ++i) sp.level_weight.push_back(std::pow(beta, double(n - 1 - i)));
  }
  sp.detach_levels = l.boolean("detach_levels", false);
  sp.aux_coefficient = l.number("aux_coefficient", 1.0);
  sp.per_level_aux = l.boolean("per_level_aux", false);
  sp.topk_threshold_lr = l.number("topk_threshold_lr", 0.01);
  c.dead_feature_window = l.integer("dead_feature_window", 1000, 1);
  l.reject_unknown();

  Reader o{where, "optimizer", section(root, "optimizer", where), {}};
  c.lr.lr = o.number("lr", 3e-4);
  c.adam.beta1 = o.number("adam_beta1", 0.9);
  c.adam.beta2 = o.number("adam_beta2", 0.999);
  c.adam.eps = o.number("adam_eps", 1e-8);
  c.adam.grad_clip = o.number("grad_clip", 1.0);
  c.lr.name = o.str("lr_scheduler", "constant", {"constant", "linear", "cosine"});
  c.lr.warm_up_steps = o.integer("lr_warm_up_steps", 0);
  c.lr.decay_steps = o.integer("lr_decay_steps", 0);
  c.lr.lr_end = o.number("lr_end", -1);
  o.reject_unknown();
  if (!(c.lr.lr > 0)) fail(where, "optimizer.lr", "must be positive");

  Reader t{where, "training", section(root, "training", where), {}};
  c.total_tokens = t.integer("total_tokens", 0, 1);
  if (c.total_tokens == 0) fail(where, "training.total_tokens", "missing");
  c.batch_size = t.integer("batch_size", 4096, 1);
  c.seed = uint64_t(t.integer("seed", 0));
  c.log_every_steps = t.integer("log_every_steps", 100, 1);
  c.eval_every_steps = t.integer("eval_every_steps", 1000, 0);
  c.eval_tokens = t.integer("eval_tokens", 16384, 1);
  // On a GPU a step takes milliseconds (3.9 ms at the release's shape on an H200,
  // docs/benchmarks.md): 1000 steps would write the whole state (1.2 GB there) every few
  // seconds. There the cadence is the clock's unless steps are given: every 30 minutes, as
  // sae release's.
  const bool gpu = t.has("device") && t.j["device"] == "cuda";
  const bool steps_given = t.has("checkpoint_every_steps");
  c.checkpoint_every_steps = t.integer("checkpoint_every_steps", gpu ? 0 : 1000, 0);
  c.checkpoint_every_minutes = t.number("checkpoint_every_minutes", gpu && !steps_given ? 30 : 0);
  if (!(c.checkpoint_every_minutes >= 0) || !std::isfinite(c.checkpoint_every_minutes))
    fail(where, "training.checkpoint_every_minutes",
         cat("must be a number of minutes >= 0 (0: off), got ", c.checkpoint_every_minutes));
  c.max_rollbacks = t.integer("max_rollbacks", 3, 0);
  c.feature_sampling_window = t.integer("feature_sampling_window", 2000, 1);
  c.n_norm_batches = t.integer("n_norm_batches", 10, 1);
  c.threads = int(t.integer("threads", 0));
  c.device = t.str("device", "cpu", {"cpu", "cuda"});
  c.precision = t.str("precision", "fp32", {"fp32", "tf32", "bf16"});
  t.reject_unknown();
  if (c.total_steps() < 1) fail(where, "training.total_tokens", "must be at least one batch");

  if (!root.contains("data") || !root["data"].is_object() || !root["data"].contains("type"))
    fail(where, "data.type", "missing (\"synthetic\" or \"files\")");
  c.data = root["data"];

  Reader out{where, "output", section(root, "output", where), {}};
  c.output_dir = out.str("dir", "out/train");
  c.fold_decoder_norms = out.boolean("fold_decoder_norms", true);
  c.save_dtype = out.str("save_dtype", "f32", {"f32", "bf16"});
  if (out.has("metadata")) {
    if (!out.j["metadata"].is_object()) fail(where, "output.metadata", "must be an object");
    c.metadata = nlohmann::ordered_json::parse(out.j["metadata"].dump());
  }
  out.reject_unknown();
  return c;
}

json TrainConfig::to_json() const {
  json levels = json::array();
  for (auto l : spec.level_loss) levels.push_back(l == LevelLoss::Mse ? "mse" : "l2");
  return {
      {"sae",
       {{"d_sae", spec.d_sae},
        {"k", spec.k},
        {"matryoshka_widths", spec.widths},
        {"rescale_acts_by_decoder_norm", spec.rescale_acts_by_decoder_norm},
        {"apply_b_dec_to_input", spec.apply_b_dec_to_input},
        {"decoder_init_norm", decoder_init_norm},
        {"b_dec_init", b_dec_init},
        {"normalize_activations", normalize_activations}}},
      {"loss",
       {{"level_losses", levels},
        {"l2_power", spec.l2_power},
        {"level_weights", spec.level_weight},
        {"detach_levels", spec.detach_levels},
        {"aux_coefficient", spec.aux_coefficient},
        {"per_level_aux", spec.per_level_aux},
        {"topk_threshold_lr", spec.topk_threshold_lr},
        {"dead_feature_window", dead_feature_window}}},
      {"optimizer",
       {{"lr", lr.lr},
        {"adam_beta1", adam.beta1},
        {"adam_beta2", adam.beta2},
        {"adam_eps", adam.eps},
        {"grad_clip", adam.grad_clip},
        {"lr_scheduler", lr.name},
        {"lr_warm_up_steps", lr.warm_up_steps},
        {"lr_decay_steps", lr.decay_steps},
        {"lr_end", lr.lr_end}}},
      {"training",
       {{"total_tokens", total_tokens},
        {"batch_size", batch_size},
        {"seed", seed},
        {"log_every_steps", log_every_steps},
        {"eval_every_steps", eval_every_steps},
        {"eval_tokens", eval_tokens},
        {"checkpoint_every_steps", checkpoint_every_steps},
        {"checkpoint_every_minutes", checkpoint_every_minutes},
        {"max_rollbacks", max_rollbacks},
        {"feature_sampling_window", feature_sampling_window},
        {"n_norm_batches", n_norm_batches},
        {"threads", threads},
        {"device", device},
        {"precision", precision}}},
      {"data", data},
      {"output",
       {{"dir", output_dir},
        {"fold_decoder_norms", fold_decoder_norms},
        {"save_dtype", save_dtype},
        {"metadata", json::parse(metadata.dump())}}},
  };
}

nlohmann::ordered_json config_changes(const json& before, const json& after) {
  nlohmann::ordered_json changed = nlohmann::ordered_json::object();
  std::function<void(const std::string&, const json&, const json&)> walk =
      [&](const std::string& at, const json& a, const json& b) {
        if (a.is_object() && b.is_object()) {
          std::set<std::string> keys;
          for (const auto& [k, v] : a.items()) keys.insert(k);
          for (const auto& [k, v] : b.items()) keys.insert(k);
          for (const std::string& k : keys)
            walk(at.empty() ? k : at + "." + k, a.value(k, json()), b.value(k, json()));
        } else if (a != b) {
          changed[at] = {{"from", nlohmann::ordered_json::parse(a.dump())},
                         {"to", nlohmann::ordered_json::parse(b.dump())}};
        }
      };
  json a = before, b = after;
  for (json* c : {&a, &b}) {
    if (c->contains("output") && (*c)["output"].is_object()) (*c)["output"].erase("dir");
    if (c->contains("training") && (*c)["training"].is_object())
      for (const char* k : kBookkeepingKeys) (*c)["training"].erase(k);
  }
  walk("", a, b);
  return changed;
}

void merge_json(json& base, const json& patch) {
  if (!base.is_object() || !patch.is_object()) {
    base = patch;
    return;
  }
  for (auto it = patch.begin(); it != patch.end(); ++it) {
    if (base.contains(it.key()) && base[it.key()].is_object() && it->is_object())
      merge_json(base[it.key()], *it);
    else
      base[it.key()] = *it;
  }
}

void apply_override(json& j, const std::string& a) {
  const size_t eq = a.find('=');
  if (eq == std::string::npos || eq == 0) fail("--set", a, "must look like section.key=value");
  const std::string path = a.substr(0, eq), text = a.substr(eq + 1);
  json value;
  try {
    value = json::parse(text);
  } catch (const json::parse_error&) {
    value = text;
  }
  json* node = &j;
  size_t start = 0;
  for (size_t dot = path.find('.');; dot = path.find('.', start)) {
    const std::string key =
        path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (dot == std::string::npos) {
      (*node)[key] = value;
      break;
    }
    if (!(*node)[key].is_object()) (*node)[key] = json::object();
    node = &(*node)[key];
    start = dot + 1;
  }
}

namespace {

json gemma_release(const char* level_losses) {
  // The release's recipe (DESIGN.md §3; best public evidence, the authors' SAELens 5.x code).
  return {
      {"sae",
       {{"d_sae", 32768},
        {"k", 40},
        {"matryoshka_widths", {128, 512, 2048, 8192, 32768}},
        {"rescale_acts_by_decoder_norm", false},
        {"decoder_init_norm", 0.1},
        {"b_dec_init", "zeros"},
        {"apply_b_dec_to_input", true},
        {"normalize_activations", "none"}}},
      {"loss",
       {{"level_losses", level_losses},
        {"per_level_aux", true},
        {"aux_coefficient", 1.0},
        {"dead_feature_window", 1000},
        {"topk_threshold_lr", 0.01}}},
      {"optimizer",
       {{"lr", 1e-4},
        {"adam_beta1", 0.0},
        {"adam_beta2", 0.999},
        {"lr_scheduler", "constant"},
        {"grad_clip", 1.0}}},
      {"training", {{"batch_size", 4096}, {"total_tokens", 750000000}}},
      {"output",
       {{"fold_decoder_norms", true},
        {"metadata",
         {{"model_name", "gemma-2-2b"},
          {"context_size", 1024},
          {"prepend_bos", true},
          {"dataset_path", "monology/pile-uncopyrighted"}}}}},
  };
}

json hierarchy(const char* level_losses, bool matryoshka) {
  json j = {
      {"sae", {{"d_sae", 128}, {"k", 4}, {"decoder_init_norm", 0.1}}},
      {"loss",
       {{"level_losses", level_losses},
        {"per_level_aux", matryoshka},
        {"dead_feature_window", 400}}},
      {"optimizer",
       {{"lr", 3e-3},
        {"adam_beta1", 0.9},
        {"adam_beta2", 0.999},
        {"lr_scheduler", "linear"},
        {"lr_end", 3e-4}}},
      {"training",
       {{"batch_size", 1024},
        {"total_tokens", 6000000},
        {"eval_every_steps", 1000},
        {"eval_tokens", 16384},
        {"log_every_steps", 500},
        {"checkpoint_every_steps", 0}}},
      {"data", {{"type", "synthetic"}}},
  };
  if (matryoshka) j["sae"]["matryoshka_widths"] = {16, 48, 128};
  return j;
}

}  // namespace

std::vector<std::string> preset_names() {
  return {"gemma-2-2b-matryoshka-standard",
          "gemma-2-2b-matryoshka-snap",
          "saelens",
          "hierarchy-batchtopk",
          "hierarchy-standard",
          "hierarchy-snap"};
}

json preset(const std::string& name) {
  if (name == "gemma-2-2b-matryoshka-standard") return gemma_release("mse");
  if (name == "gemma-2-2b-matryoshka-snap") return gemma_release("snap");
  if (name == "saelens")  // SAELens 6 MatryoshkaBatchTopKTrainingSAE + trainer defaults
    return {{"sae",
             {{"k", 100},
              {"rescale_acts_by_decoder_norm", true},
              {"decoder_init_norm", 0.1},
              {"apply_b_dec_to_input", true}}},
            {"loss",
             {{"level_losses", "mse"},
              {"per_level_aux", false},
              {"aux_coefficient", 1.0},
              {"dead_feature_window", 1000},
              {"topk_threshold_lr", 0.01}}},
            {"optimizer",
             {{"lr", 3e-4},
              {"adam_beta1", 0.9},
              {"adam_beta2", 0.999},
              {"lr_scheduler", "constant"},
              {"grad_clip", 1.0}}},
            {"training", {{"batch_size", 4096}, {"feature_sampling_window", 2000}}}};
  if (name == "hierarchy-batchtopk") return hierarchy("mse", false);
  if (name == "hierarchy-standard") return hierarchy("mse", true);
  if (name == "hierarchy-snap") return hierarchy("snap", true);
  std::string names;
  for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
  fail("--preset", name, cat("unknown preset (known: ", names, ")"));
}

}  // namespace sae::train
