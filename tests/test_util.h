// Helpers shared by the tests: temp folders, golden paths, running the CLI.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/dtype.h"
#include "data/source.h"
#include "data/synthetic.h"
#include "io/npy.h"
#include "train/train_config.h"

// In a CUDA test: skip, with one line saying why, where no GPU can run it.
#define REQUIRE_GPU()                                                                            \
  do {                                                                                           \
    if (!::sae::cuda_compiled()) GTEST_SKIP() << "CUDA test skipped: this build has no CUDA";    \
    if (::sae::cuda_device_count() == 0) GTEST_SKIP() << "CUDA test skipped: no GPU is visible"; \
  } while (0)

namespace sae::test {

namespace fs = std::filesystem;

// tests/ of the source tree: where the build saw it, or $SAECPP_TEST_DIR (the GPU check runs
// the test binaries from a copy of the repository elsewhere).
inline fs::path test_dir() {
  const char* env = std::getenv("SAECPP_TEST_DIR");
  return env && *env ? fs::path(env) : fs::path(SAECPP_TEST_DIR);
}

inline std::string golden(const std::string& rel) {
  return (test_dir() / "goldens" / rel).string();
}

// A fresh folder under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("saecpp_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline std::vector<float> read_npy_f32(const std::string& path) {
  NpyFile f(path);
  std::vector<float> v(size_t(f.numel()));
  convert_to_f32(f.dtype(), f.data().data(), v.data(), v.size());
  return v;
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}
inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Overwrites element `index` of the f32 tensor `name` in a safetensors file, in place (a file
// damaged on disk, or saved from a state that had gone NaN).
inline void patch_f32(const std::string& path, const std::string& name, size_t index, float value) {
  std::string bytes = read_bytes(path);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  const auto meta = nlohmann::json::parse(bytes.substr(8, header));
  const size_t at = 8 + header + meta.at(name).at("data_offsets")[0].get<size_t>() + 4 * index;
  ASSERT_LE(at + 4, bytes.size()) << name << " in " << path;
  std::memcpy(bytes.data() + at, &value, 4);
  write_bytes(path, bytes);
}

// Element-wise |a - b| <= rel * (|b| + rms(b)): a relative bound that stays meaningful for
// entries near zero, where f32 sums of mixed-sign terms lose relative accuracy.
inline void expect_close(const std::vector<float>& a, const std::vector<float>& b, double rel,
                         const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double ss = 0;
  for (float v : b) ss += double(v) * v;
  const double rms = b.empty() ? 0 : std::sqrt(ss / double(b.size()));
  size_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::abs(double(a[i]) - b[i]) > rel * (std::abs(double(b[i])) + rms)) {
      if (bad++ < 5) ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << a.size() << " entries differ";
}

struct CliResult {
  int exit_code;
  std::string output;  // stdout and stderr together
};

// A shell command's exit code and its stdout and stderr together.
inline CliResult run_shell(const std::string& command) {
  const std::string cmd = command + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

// The `sae` binary of this build, or $SAECPP_CLI (the GPU check runs a relocated bundle), run
// after `prefix` (e.g. "env -u OMP_WAIT_POLICY").
inline CliResult run_cli_env(const std::string& prefix, const std::string& args) {
  const char* env = std::getenv("SAECPP_CLI");
  return run_shell(prefix + " " + std::string(env && *env ? env : SAECPP_CLI) + " " + args);
}

inline CliResult run_cli(const std::string& args) {
  return run_cli_env("", args);
}

// `sae cache` of the tiny Gemma-2's resid_post at layers 0 and 2 from `corpus` into `cache`: 20
// shards of 1024 tokens in windows of 16, the cache the release tests train from.
inline CliResult tiny_cache(const std::string& corpus, const std::string& cache) {
  return run_cli("cache --model " + golden("gemma2/gqa_window/model") + " --dataset '" + corpus +
                 "' --layers 0,2 --shard-tokens 1024 --context-size 16 --prompts-per-forward 4 "
                 "--tokens 20480 -o " +
                 cache);
}

// Row `row` of the f32 tensor `name` [rows, d] of a safetensors file set to +-value (signs
// alternating), in place: at 1e30 an outlier that is finite (it passes every read's check) and
// overflows an SAE step's f32 arithmetic.
inline void patch_outlier_row(const std::string& path, const std::string& name, int64_t row,
                              int64_t d, float value) {
  std::string bytes = read_bytes(path);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  const auto meta = nlohmann::json::parse(bytes.substr(8, header));
  const size_t at =
      8 + header + meta.at(name).at("data_offsets")[0].get<size_t>() + size_t(4 * row * d);
  ASSERT_LE(at + size_t(4 * d), bytes.size()) << name << " in " << path;
  for (int64_t c = 0; c < d; ++c) {
    const float v = c % 2 ? -value : value;
    std::memcpy(bytes.data() + at + 4 * c, &v, 4);
  }
  write_bytes(path, bytes);
}

// The tiny cache (tiny_cache) with two outlier rows in layer 2's shards 5 and 8 (read from step
// 80 in one process, 64 under 2 or 4 ranks: after the first checkpoint either way), and the
// arguments, up to -o, of a release from it whose layer-2 SAEs roll back at the first and
// diverge again at the second (one rollback allowed, a checkpoint every 10 steps).
inline std::string diverging_release_args(const std::string& corpus, const std::string& cache) {
  const CliResult r = tiny_cache(corpus, cache);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* shard : {"shard-00005", "shard-00008"})
    patch_outlier_row(cache + "/blocks.2.hook_resid_post/" + shard + ".safetensors", "activations",
                      10, 64, 1e30f);
  return "release --from-cache " + cache +
         " --tokens 12800 --heldout-tokens 512 --prompts-per-forward 4 --n-batches-in-buffer 4 "
         "--log-every 50 --set sae.d_sae=64 --set sae.k=4 --set sae.matryoshka_widths=[16,64] "
         "--set training.batch_size=64 --set optimizer.lr=3e-3 --checkpoint-minutes 0 "
         "--set training.checkpoint_every_steps=10 --set training.max_rollbacks=1 -o ";
}

// n rows of the synthetic hierarchy at d_in 24 (12 roots, 4 parents): activation files for the
// CLI's training tests.
inline std::vector<float> synthetic_rows(int64_t n) {
  data::SyntheticConfig sc;
  sc.d_in = 24;
  sc.n_roots = 12;
  sc.n_parents = 4;
  data::SyntheticSource src(sc);
  std::vector<float> x(size_t(n * 24));
  src.train_batch(0, n, x.data());
  return x;
}

// mpirun as CI runs it: as root (Open MPI refuses root unless told), N ranks on 2 cores, one
// thread each. Shared-memory single copy (CMA) is blocked in some containers: vader copies
// through its buffers instead. Under AddressSanitizer, what Open MPI itself never frees is not
// ours to report (the ranks inherit the environment).
inline std::string mpirun(int ranks) {
  return "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 "
         "ASAN_OPTIONS=detect_leaks=0 " +
         std::string(SAECPP_MPIEXEC) + " -np " + std::to_string(ranks) +
         " --oversubscribe --mca btl_vader_single_copy_mechanism none ";
}

#define REQUIRE_MPI()                                                                 \
  do {                                                                                \
    if (std::string(SAECPP_MPIEXEC).empty()) GTEST_SKIP() << "this build has no MPI"; \
  } while (0)

// Sets (or, with nullopt, unsets) an environment variable for its lifetime.
struct EnvVar {
  std::string name;
  std::optional<std::string> old;
  EnvVar(std::string n, const std::optional<std::string>& value) : name(std::move(n)) {
    if (const char* v = std::getenv(name.c_str())) old = v;
    if (value)
      ::setenv(name.c_str(), value->c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
  ~EnvVar() {
    if (old)
      ::setenv(name.c_str(), old->c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
  EnvVar(const EnvVar&) = delete;
  EnvVar& operator=(const EnvVar&) = delete;
};

inline std::vector<float> random_vector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// A small training job on the synthetic hierarchy (48 latents, 40 steps of 128 tokens, AuxK
// running, a checkpoint every 15 steps) writing to `out`: the trainer tests' starting point.
inline nlohmann::json tiny_trainer_config(const std::string& out) {
  nlohmann::json j = train::preset("hierarchy-snap");
  j["sae"]["d_sae"] = 48;
  j["sae"]["matryoshka_widths"] = {8, 24, 48};
  j["sae"]["normalize_activations"] = "expected_average_only_in";
  j["data"] = {{"type", "synthetic"},
               {"d_in", 24},
               {"n_roots", 12},
               {"n_parents", 4},
               {"heldout_tokens", 512}};
  j["training"] = {{"batch_size", 128},  {"total_tokens", 128 * 40}, {"eval_every_steps", 10},
                   {"eval_tokens", 512}, {"log_every_steps", 10},    {"checkpoint_every_steps", 15},
                   {"n_norm_batches", 2}};
  j["loss"]["dead_feature_window"] = 5;  // so AuxK runs within the test
  j["output"] = {{"dir", out}};
  return j;
}

// A source whose training batches from index `from` (to `to`, excluded) are spoiled (the
// normalisation batches, 0 and 1, stay clean).
class SpoiledSource : public data::ActivationSource {
 public:
  SpoiledSource(data::ActivationSource& inner, int64_t from,
                std::function<void(float*, int64_t)> spoil,
                int64_t to = std::numeric_limits<int64_t>::max())
      : inner_(inner), from_(from), to_(to), spoil_(std::move(spoil)) {}
  int64_t d_in() const override { return inner_.d_in(); }
  void train_batch(int64_t index, int64_t batch, float* out) override {
    inner_.train_batch(index, batch, out);
    if (index >= from_ && index < to_) spoil_(out, batch * d_in());
  }
  int64_t heldout_size(int64_t n) const override { return inner_.heldout_size(n); }
  void heldout(int64_t n, float* out) override { inner_.heldout(n, out); }
  std::string describe() const override { return inner_.describe(); }

 private:
  data::ActivationSource& inner_;
  int64_t from_, to_;
  std::function<void(float*, int64_t)> spoil_;
};

}  // namespace sae::test
