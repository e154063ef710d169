#include "hub/settings.h"

#include <wordexp.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace sae::hub {

namespace fs = std::filesystem;

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

// huggingface_hub's _is_true: "1", "ON", "YES", "TRUE" in any case.
bool env_true(const char* name) {
  std::string v = env(name);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::toupper(c); });
  return v == "1" || v == "ON" || v == "YES" || v == "TRUE";
}

// os.path.expandvars(os.path.expanduser(p)), without running any command.
std::string expand(const std::string& p) {
  if (p.empty()) return p;
  wordexp_t w;
  if (wordexp(p.c_str(), &w, WRDE_NOCMD) != 0) return p;
  std::string out = w.we_wordc == 1 ? std::string(w.we_wordv[0]) : p;
  wordfree(&w);
  return out;
}

std::string hf_home() {
  if (std::string h = env("HF_HOME"); !h.empty()) return expand(h);
  std::string xdg = env("XDG_CACHE_HOME");
  if (xdg.empty()) xdg = (fs::path(env("HOME").empty() ? "." : env("HOME")) / ".cache").string();
  return (fs::path(expand(xdg)) / "huggingface").string();
}

std::string trim(std::string s) {
  const auto ws = [](unsigned char c) { return std::isspace(c); };
  s.erase(s.begin(), std::find_if_not(s.begin(), s.end(), ws));
  s.erase(std::find_if_not(s.rbegin(), s.rend(), ws).base(), s.end());
  return s;
}

}  // namespace

std::string hub_cache_dir() {
  if (std::string v = env("HF_HUB_CACHE"); !v.empty()) return expand(v);
  if (std::string v = env("HUGGINGFACE_HUB_CACHE"); !v.empty()) return expand(v);
  return (fs::path(hf_home()) / "hub").string();
}

HubSettings hub_settings() {
  HubSettings s;
  s.endpoint = env("HF_ENDPOINT");
  if (s.endpoint.empty()) s.endpoint = "https://huggingface.co";
  while (!s.endpoint.empty() && s.endpoint.back() == '/') s.endpoint.pop_back();
  s.cache_dir = hub_cache_dir();
  for (const char* name : {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}) {
    if (std::string t = trim(env(name)); !t.empty()) {
      s.token = t, s.token_source = std::string("$") + name;
      break;
    }
  }
  if (s.token.empty()) {
    std::string file = env("HF_TOKEN_PATH");
    file = file.empty() ? (fs::path(hf_home()) / "token").string() : expand(file);
    std::ifstream in(file);
    std::string t;
    if (in && std::getline(in, t) && !(t = trim(t)).empty()) s.token = t, s.token_source = file;
  }
  s.offline = env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE");
  s.progress = !env_true("HF_HUB_DISABLE_PROGRESS_BARS");
  return s;
}

}  // namespace sae::hub
