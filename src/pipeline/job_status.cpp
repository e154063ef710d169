#include "pipeline/job_status.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "core/error.h"
#include "core/memory.h"
#include "io/folder_lock.h"

namespace sae::pipeline {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

// The records of a JSONL log in order; a line still being written (the job runs) is skipped.
std::vector<ojson> read_jsonl(const fs::path& path) {
  std::vector<ojson> records;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    ojson r = ojson::parse(line, nullptr, false);
    if (!r.is_discarded() && r.is_object()) records.push_back(std::move(r));
  }
  return records;
}

ojson read_json(const fs::path& path) {
  std::ifstream in(path);
  ojson j = ojson::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail(path.string(), "", "not a JSON object");
  return j;
}

double seconds_since_written(const fs::path& path) {
  std::error_code ec;
  const auto t = fs::last_write_time(path, ec);
  if (ec) return -1;
  return std::chrono::duration<double>(fs::file_time_type::clock::now() - t).count();
}

// The config a training folder runs under: its last checkpoint's (a resume may have changed
// training.total_tokens), else the first run's config.json.
ojson current_config(const fs::path& dir) {
  const fs::path state = dir / "checkpoint" / "state.json";
  if (fs::exists(state)) {
    const ojson st = read_json(state);
    if (st.contains("config")) return st["config"];
  }
  return read_json(dir / "config.json");
}

int64_t total_steps_of(const ojson& config) {
  const auto& t = config.at("training");
  return t.at("total_tokens").get<int64_t>() / t.value("batch_size", int64_t(4096));
}

// The rollbacks and the resumes with other settings an SAE's log records (its checkpoints keep
// only those before them; the log has every one), and the error that stopped it when no step
// was logged since.
void add_history(const std::vector<ojson>& log, ojson& into) {
  for (const ojson& r : log) {
    if (r.contains("error")) into["error"] = r["error"];
    if (r.contains("loss")) into.erase("error");  // a later run went on
    if (r.contains("rollback")) {  // once each (a resume replays what followed a checkpoint)
      const ojson b = {{"step", r["rollback"]["step"]}, {"to_step", r["rollback"]["to_step"]}};
      auto& all = into["rollbacks"];
      if (!all.is_array() || std::find(all.begin(), all.end(), b) == all.end()) all.push_back(b);
    }
    if (r.contains("resumed_with_changes"))
      into["config_changes"].push_back(r["resumed_with_changes"]);
  }
}

// The last progress record (one with `key`), with its age: the log's last write.
ojson last_progress(const std::vector<ojson>& log, const char* key, const fs::path& file) {
  for (auto it = log.rbegin(); it != log.rend(); ++it)
    if (it->contains(key)) {
      ojson p = *it;
      p["seconds_ago"] = seconds_since_written(file);
      return p;
    }
  return nullptr;
}

ojson train_status(const fs::path& dir) {
  const ojson config = current_config(dir);
  const int64_t total = total_steps_of(config), batch = config["training"]["batch_size"];
  const std::vector<ojson> log = read_jsonl(dir / "log.jsonl");
  ojson s = {{"kind", "train"},
             {"folder", dir.string()},
             {"finished", false},
             {"total_steps", total},
             {"total_tokens", total * batch}};
  s["progress"] = last_progress(log, "loss", dir / "log.jsonl");
  int64_t step = s["progress"].is_null() ? 0 : s["progress"]["step"].get<int64_t>();
  const fs::path state = dir / "checkpoint" / "state.json";
  if (fs::exists(state)) {
    const ojson st = read_json(state);
    step = std::max(step, st.at("step").get<int64_t>());
    std::error_code ec;
    const auto bytes = fs::file_size(dir / "checkpoint" / "state.safetensors", ec);
    s["checkpoint"] = {{"step", st.at("step")},
                       {"seconds_ago", seconds_since_written(state)},
                       {"bytes", ec ? 0 : int64_t(bytes)}};
  }
  s["step"] = step;
  s["tokens"] = step * batch;
  // The SAE saved at the end (a run extended since has one from its earlier end).
  s["finished"] =
      step >= total && fs::exists(dir / "eval.json") && fs::exists(dir / "sae" / "cfg.json");
  for (auto it = log.rbegin(); it != log.rend(); ++it)
    if (it->contains("eval")) {
      s["eval"] = {{"step", (*it)["step"]}, {"metrics", (*it)["eval"]}};
      break;
    }
  add_history(log, s);
  return s;
}

ojson release_status(const fs::path& dir) {
  const fs::path work = dir / ".work";
  const bool finished = fs::exists(dir / "release.json");
  ojson s = {{"kind", "release"}, {"folder", dir.string()}, {"finished", finished}};
  // The SAEs: one folder per variant and hook under .work, each a training folder.
  ojson saes = ojson::array();
  int64_t total = 0, batch = 0;
  if (fs::exists(work))
    for (const auto& variant : fs::directory_iterator(work)) {
      if (!variant.is_directory()) continue;
      for (const auto& hook : fs::directory_iterator(variant.path())) {
        if (!fs::exists(hook.path() / "config.json")) continue;
        const ojson config = current_config(hook.path());
        total = total_steps_of(config), batch = config["training"]["batch_size"];
        ojson sae = {
            {"id", variant.path().filename().string() + "/" + hook.path().filename().string()}};
        add_history(read_jsonl(hook.path() / "log.jsonl"), sae);
        saes.push_back(sae);
      }
    }
  if (saes.empty() && !finished)
    fail(dir.string(), ".work", "holds no SAE of a release (not a release folder, or not begun)");
  std::sort(saes.begin(), saes.end(),
            [](const ojson& a, const ojson& b) { return a["id"] < b["id"]; });
  // The release state: state.json, or under mpirun one per rank (state.rank<r>-of-<n>.json):
  // the checkpoint is the least advanced rank's, and the SAEs set aside (diverged again after
  // their rollbacks) are in their ranks' states.
  ojson checkpoint;
  if (fs::exists(work))
    for (const auto& e : fs::directory_iterator(work)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("state", 0) != 0 || e.path().extension() != ".json") continue;
      const ojson st = read_json(e.path());
      if (checkpoint.is_null() || st.at("step") < checkpoint["step"])
        checkpoint = {{"step", st.at("step")}, {"seconds_ago", seconds_since_written(e.path())}};
      if (!st.contains("failed")) continue;
      for (ojson& sae : saes)
        if (st["failed"].contains(sae["id"].get<std::string>()))
          sae["set_aside"] = st["failed"][sae["id"].get<std::string>()], sae.erase("error");
    }
  const std::vector<ojson> progress = read_jsonl(work / "progress.jsonl");
  // Set aside since the last state was written: rank 0's said in its progress records too.
  for (const ojson& r : progress)
    if (r.contains("set_aside"))
      for (ojson& sae : saes)
        if (sae["id"] == r["set_aside"].value("sae", std::string())) {
          ojson f = r["set_aside"];
          f.erase("sae");
          sae["set_aside"] = f, sae.erase("error");
        }
  s["progress"] = last_progress(progress, "mean_l0", work / "progress.jsonl");
  int64_t step = s["progress"].is_null() ? 0 : s["progress"]["step"].get<int64_t>();
  if (!checkpoint.is_null()) {
    step = std::max(step, checkpoint["step"].get<int64_t>());
    s["checkpoint"] = checkpoint;
  }
  s["step"] = step;
  s["total_steps"] = total;
  s["tokens"] = step * batch;
  s["total_tokens"] = total * batch;
  s["saes"] = saes;
  if (finished) {
    const ojson rel = read_json(dir / "release.json");
    double ev = 0, l0 = 0;
    int64_t n = 0, set_aside = 0;
    for (const auto& [v, per_hook] : rel.at("results").items())
      for (const auto& [h, r] : per_hook.items()) {
        if (r.contains("failed")) {
          ++set_aside;
          continue;
        }
        ev += r.at("explained_variance").get<double>(), l0 += r.at("l0").get<double>(), ++n;
      }
    s["results"] = {{"saes", n},
                    {"mean_l0", n ? l0 / double(n) : 0.0},
                    {"mean_explained_variance", n ? ev / double(n) : 0.0}};
    if (set_aside > 0) s["results"]["set_aside"] = set_aside;
  }
  return s;
}

ojson cache_status(const fs::path& dir) {
  const ojson m = read_json(dir / "cache.json");
  ojson s = {{"kind", "cache"},
             {"folder", dir.string()},
             {"finished", m.value("complete", false)},
             {"shards", m.value("shards", int64_t(0))},
             {"tokens", m.value("tokens", int64_t(0))},
             {"layers", m.value("layers", ojson::array())},
             {"seconds_ago", seconds_since_written(dir / "cache.json")}};
  // The plan and the pace (caches written before they were kept have neither).
  if (m.contains("planned_shards")) {
    s["planned_shards"] = m["planned_shards"];
    s["total_tokens"] = m["planned_shards"].get<int64_t>() * m.value("shard_tokens", int64_t(0));
  }
  if (m.contains("tokens_per_s"))
    s["progress"] = {{"tokens_per_s", m["tokens_per_s"]}, {"seconds_ago", s["seconds_ago"]}};
  return s;
}

// A dashboard: being written into DIR.partial (its pass's state in .work/state.json, its lock),
// or finished into DIR (dashboard.json).
ojson dashboard_status(const fs::path& dir) {
  ojson s = {{"kind", "dashboard"}, {"folder", dir.string()}};
  if (fs::exists(dir / "dashboard.json")) {
    const ojson d = read_json(dir / "dashboard.json");
    s["finished"] = true;
    s["tokens"] = d.at("meta").value("tokens", int64_t(0));
    s["latents"] = d.at("meta").value("latents", int64_t(0));
    s["seconds"] = d.value("seconds", 0.0);
    return s;
  }
  const fs::path state = dir / ".work" / "state.json";
  s["finished"] = false;
  s["tokens"] = int64_t(0);
  if (fs::exists(state)) {  // its last checkpoint
    const ojson st = read_json(state);
    s["tokens"] = st.value("tokens", int64_t(0));
    if (st.contains("planned_tokens")) s["total_tokens"] = st["planned_tokens"];
    s["checkpoint"] = {{"seconds_ago", seconds_since_written(state)}};
    if (st.value("tokens_per_s", 0.0) > 0)
      s["progress"] = {{"tokens_per_s", st["tokens_per_s"]},
                       {"seconds_ago", s["checkpoint"]["seconds_ago"]}};
  }
  return s;
}

std::string fmt_age(double seconds) {
  if (seconds < 0) return "?";
  if (seconds < 120) return cat(int64_t(seconds), " s");
  if (seconds < 7200) return cat(int64_t(seconds / 60), " min");
  char b[32];
  std::snprintf(b, sizeof b, "%.1f h", seconds / 3600);
  return b;
}

std::string fmt_history(const ojson& s) {
  std::string out;
  if (s.contains("set_aside"))
    out += cat("set aside at step ", s["set_aside"]["step"].get<int64_t>(),
               " (diverged again after its rollbacks; its last checkpoint, step ",
               s["set_aside"]["last_checkpoint_step"].get<int64_t>(), ", kept); ");
  if (s.contains("error"))
    out += cat("stopped by an error at step ", s["error"]["step"].get<int64_t>(), ": ",
               s["error"]["message"].get<std::string>(), "; ");
  for (const auto& b : s.value("rollbacks", ojson::array()))
    out += cat("rolled back at step ", b["step"].get<int64_t>(), " to step ",
               b["to_step"].get<int64_t>(), "; ");
  for (const auto& c : s.value("config_changes", ojson::array())) {
    out += cat("resumed at step ", c["step"].get<int64_t>(), " with");
    for (const auto& [key, ch] : c["changed"].items())
      out += cat(" ", key, " ", ch["from"].dump(), " -> ", ch["to"].dump());
    out += "; ";
  }
  if (!out.empty()) out.resize(out.size() - 2);
  return out;
}

}  // namespace

ojson job_status(const std::string& folder) {
  fs::path dir(folder);
  // A dashboard being written lives in DIR.partial until it is whole.
  if (!fs::is_directory(dir) && fs::is_directory(dir.string() + ".partial"))
    dir = dir.string() + ".partial";
  if (!fs::is_directory(dir)) fail(folder, "", "no such folder");
  ojson s;
  fs::path lock;
  if (fs::exists(dir / "dashboard.json") ||
      (dir.extension() == ".partial" && (fs::exists(dir / ".lock") || fs::exists(dir / ".work")))) {
    s = dashboard_status(dir);
    lock = dir / ".lock";
  } else if (fs::exists(dir / ".work") || fs::exists(dir / "release.json")) {
    s = release_status(dir);
    lock = dir / ".work" / ".lock";
  } else if (fs::exists(dir / "config.json") && fs::exists(dir / "log.jsonl")) {
    s = train_status(dir);
    lock = dir / ".lock";
  } else if (fs::exists(dir / "cache.json")) {
    s = cache_status(dir);
    lock = dir / ".lock";
  } else {
    fail(folder, "",
         "holds no job: neither a training folder (config.json, log.jsonl), a release (.work/, "
         "release.json), an activation cache (cache.json) nor a dashboard (dashboard.json, or "
         "one being written in DIR.partial)");
  }
  // Whether a process runs it now: the job's folder lock is held (io/folder_lock.h).
  const auto holder = folder_lock_holder(lock.string());
  s["running"] = holder ? ojson::parse(holder->dump()) : ojson(false);
  if (holder) {  // an error logged before belongs to a run that ended: this one goes on
    s.erase("error");
    if (s.contains("saes"))
      for (auto& sae : s["saes"]) sae.erase("error");
  }
  // The time left at the last progress record's speed (tokens per second of the job), while
  // it runs.
  if (holder && !s["finished"].get<bool>() && s.contains("total_tokens") &&
      s["progress"].is_object() && s["progress"].value("tokens_per_s", 0.0) > 0) {
    const double left = double(s["total_tokens"].get<int64_t>() - s["tokens"].get<int64_t>());
    s["eta_seconds"] = std::max(0.0, left / s["progress"]["tokens_per_s"].get<double>());
  }
  return s;
}

// ", N tok/s" at the pace of the last progress record (a cache's, a dashboard's), or "".
std::string pace(const ojson& s) {
  if (!s["progress"].is_object()) return "";
  char rate[32];
  std::snprintf(rate, sizeof rate, ", %.0f tok/s", s["progress"]["tokens_per_s"].get<double>());
  return rate;
}

// Who runs a cache or a dashboard now, and the time left at that pace; or that nobody does.
std::string running_or_not(const ojson& s) {
  if (!s["running"].is_object())
    return "not running (stopped, or its process ended; --resume continues it)";
  return cat("running: ", s["running"].value("job", std::string("a process")), ", pid ",
             s["running"].value("pid", int64_t(0)),
             s.contains("eta_seconds")
                 ? cat(", ETA ", fmt_age(s["eta_seconds"].get<double>()), " at that speed")
                 : "");
}

std::string describe_job_status(const ojson& s) {
  if (s["kind"] == "dashboard") {
    if (s["finished"].get<bool>()) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%.1f", s.value("seconds", 0.0));
      return cat("dashboard ", s["folder"].get<std::string>(),
                 ": finished (index.html written): ", s["latents"].get<int64_t>(), " latents from ",
                 s["tokens"].get<int64_t>(), " tokens in ", secs, " s\n");
    }
    const int64_t tokens = s["tokens"], total = s.value("total_tokens", int64_t(0));
    return cat("dashboard ", s["folder"].get<std::string>(), ": ", tokens,
               total > 0 ? cat(" of ", total, " tokens (",
                               int64_t(100.0 * double(tokens) / double(total)), "%)")
                         : std::string(" tokens"),
               s.contains("checkpoint")
                   ? cat(" at its last checkpoint, written ",
                         fmt_age(s["checkpoint"]["seconds_ago"].get<double>()), " ago")
                   : std::string(" (no checkpoint yet)"),
               pace(s), "; ", running_or_not(s), "\n");
  }
  if (s["kind"] == "cache")
    return cat("cache ", s["folder"].get<std::string>(), ": ", s["shards"].get<int64_t>(),
               s.contains("planned_shards") ? cat(" of ", s["planned_shards"].get<int64_t>()) : "",
               " shards per layer (", s["tokens"].get<int64_t>(),
               s.contains("total_tokens") ? cat(" of ", s["total_tokens"].get<int64_t>()) : "",
               " tokens) of ", s["layers"].size(), " layer(s), last written ",
               fmt_age(s["seconds_ago"].get<double>()), " ago", pace(s), "; ",
               s["finished"].get<bool>() ? "complete" : running_or_not(s), "\n");
  const bool release = s["kind"] == "release";
  const int64_t step = s["step"], total = s["total_steps"];
  std::string out = cat(
      s["kind"].get<std::string>(), " ", s["folder"].get<std::string>(), ": ",
      total > 0  // (a merged release keeps no training state)
          ? cat("step ", step, " of ", total, " (", int64_t(100.0 * double(step) / double(total)),
                "%), ", s["tokens"].get<int64_t>(), " of ", s["total_tokens"].get<int64_t>(),
                " tokens", release ? " per SAE" : "", "; ")
          : "",
      s["finished"].get<bool>()
          ? (release ? "finished (release.json written)" : "finished (sae/ written)")
      : s["running"].is_object()
          ? cat("running: ", s["running"].value("job", std::string("a process")), ", pid ",
                s["running"].value("pid", int64_t(0)), " on ",
                s["running"].value("host", std::string("?")), " since ",
                s["running"].value("started", std::string("?")))
          : "not running (stopped, or its process ended)",
      "\n");
  if (s["progress"].is_object()) {
    const ojson& p = s["progress"];
    char rate[32];
    std::snprintf(rate, sizeof rate, "%.0f", p.value("tokens_per_s", 0.0));
    out += cat("  last progress record (step ", p["step"].get<int64_t>(), ") written ",
               fmt_age(p["seconds_ago"].get<double>()), " ago: ", rate, " tok/s");
    char nums[96];
    if (release)
      std::snprintf(nums, sizeof nums, ", mean L0 %.2f, mean EV %.4f", p.value("mean_l0", 0.0),
                    p.value("mean_ev", 0.0));
    else
      std::snprintf(nums, sizeof nums, ", loss %.4g, L0 %.2f, EV (batch) %.4f",
                    p.value("loss", 0.0), p.value("l0", 0.0),
                    p.value("explained_variance_batch", 0.0));
    out += nums;
    if (s.contains("eta_seconds"))
      out += cat(", ETA ", fmt_age(s["eta_seconds"].get<double>()), " at that speed");
    out += "\n";
  }
  if (s.contains("checkpoint"))
    out += cat("  last checkpoint", release ? " (every SAE and the data position)" : "", ": step ",
               s["checkpoint"]["step"].get<int64_t>(), ", written ",
               fmt_age(s["checkpoint"]["seconds_ago"].get<double>()), " ago",
               s["checkpoint"].contains("bytes")
                   ? cat(", ", fmt_bytes(double(s["checkpoint"]["bytes"].get<int64_t>())))
                   : "",
               "\n");
  if (s.contains("eval")) {
    const ojson& m = s["eval"]["metrics"];
    char e[128];
    std::snprintf(e, sizeof e, "L0 %.2f, EV %.4f, dead latents %lld", m.value("l0", 0.0),
                  m.value("explained_variance", 0.0),
                  (long long)m.value("dead_latents", int64_t(0)));
    out +=
        cat("  last held-out evaluation (step ", s["eval"]["step"].get<int64_t>(), "): ", e, "\n");
  }
  if (release) {
    int64_t troubled = 0;
    std::string lines;
    for (const auto& sae : s["saes"]) {
      const std::string h = fmt_history(sae);
      if (h.empty()) continue;
      ++troubled;
      lines += cat("    ", sae["id"].get<std::string>(), ": ", h, "\n");
    }
    out +=
        cat("  ", s["saes"].size(), " SAEs",
            troubled ? cat(", ", troubled, " with rollbacks, resumes, an error or set aside:") : "",
            "\n", lines);
    if (s.contains("results")) {
      char r[128];
      std::snprintf(r, sizeof r, "  results: %lld SAEs, mean L0 %.2f, mean EV %.4f",
                    (long long)s["results"]["saes"].get<int64_t>(),
                    s["results"]["mean_l0"].get<double>(),
                    s["results"]["mean_explained_variance"].get<double>());
      out += r;
      if (s["results"].contains("set_aside"))
        out +=
            cat("; ", s["results"]["set_aside"].get<int64_t>(), " set aside, not in the release");
      out += "\n";
    }
  } else if (const std::string h = fmt_history(s); !h.empty()) {
    out += cat("  ", h, "\n");
  }
  return out;
}

}  // namespace sae::pipeline
