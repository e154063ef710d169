// Bad SAE folders and activation files: a clear sae::Error naming the file and the field, a
// non-zero CLI exit, and no output file.
#include <gtest/gtest.h>

#include <functional>
#include <limits>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "sae/load.h"
#include "test_util.h"

namespace sae {
namespace {

namespace fs = std::filesystem;

// A copy of a golden SAE folder that a test may damage.
struct SaeCopy {
  test::TempDir dir;
  std::string folder;
  explicit SaeCopy(const std::string& c = "jumprelu") {
    folder = dir / "sae";
    fs::copy(test::golden(c + "/sae"), folder);
  }
  std::string file(const std::string& name) const { return folder + "/" + name; }
  void rewrite_cfg(const std::function<void(nlohmann::ordered_json&)>& edit) const {
    auto j = read_json_file(file("cfg.json"));
    edit(j);
    test::write_bytes(file("cfg.json"), j.dump());
  }
  // Rewrites the weights with one tensor replaced or dropped.
  void rewrite_weights(const std::string& name, const std::vector<int64_t>& shape, DType dtype,
                       bool drop = false) const {
    SafetensorsFile f(file("sae_weights.safetensors"));
    std::vector<std::vector<uint8_t>> keep;
    std::vector<TensorToWrite> out;
    for (const auto& t : f.tensors()) {
      if (t.name == name) {
        if (drop) continue;
        int64_t numel = 1;
        for (auto d : shape) numel *= d;
        keep.emplace_back(size_t(numel) * dtype_size(dtype), 0);
        out.push_back({t.name, dtype, shape, keep.back()});
      } else {
        auto b = f.bytes(t);
        keep.emplace_back(b.begin(), b.end());
        out.push_back({t.name, t.dtype, t.shape, keep.back()});
      }
    }
    std::string tmp = dir / "w.safetensors";
    write_safetensors(tmp, out);
    fs::rename(tmp, file("sae_weights.safetensors"));
  }
};

void expect_load_error(const std::string& folder, const std::string& file_part,
                       const std::string& field) {
  try {
    load_from_disk(folder);
    FAIL() << "loaded without error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file_part), std::string::npos) << msg;
    EXPECT_NE(msg.find(field), std::string::npos) << msg;
  }
}

TEST(SaeBadInput, CfgNotJson) {
  SaeCopy s;
  test::write_bytes(s.file("cfg.json"), "{\"d_in\": 16,");
  expect_load_error(s.folder, "cfg.json", "not valid JSON");
}

TEST(SaeBadInput, UnknownArchitecture) {
  SaeCopy s;
  s.rewrite_cfg([](auto& j) { j["architecture"] = "hypercube"; });
  expect_load_error(s.folder, "cfg.json", "architecture");
}

TEST(SaeBadInput, BadDims) {
  SaeCopy s;
  s.rewrite_cfg([](auto& j) { j["d_in"] = -3; });
  expect_load_error(s.folder, "cfg.json", "d_in");
  SaeCopy t("topk");
  t.rewrite_cfg([](auto& j) { j["k"] = 1000; });
  expect_load_error(t.folder, "cfg.json", "k");
}

TEST(SaeBadInput, MissingTensor) {
  SaeCopy s;
  s.rewrite_weights("threshold", {}, DType::F32, /*drop=*/true);
  expect_load_error(s.folder, "sae_weights.safetensors", "threshold");
}

TEST(SaeBadInput, ShapeDisagreesWithCfg) {
  SaeCopy s;
  s.rewrite_cfg([](auto& j) { j["d_sae"] = 65; });
  expect_load_error(s.folder, "sae_weights.safetensors", "W_enc");
  SaeCopy t;
  t.rewrite_weights("b_dec", {17}, DType::F32);
  expect_load_error(t.folder, "sae_weights.safetensors", "b_dec");
}

TEST(SaeBadInput, NonFloatDtype) {
  SaeCopy s;
  s.rewrite_weights("W_dec", {64, 16}, DType::I32);
  expect_load_error(s.folder, "sae_weights.safetensors", "W_dec");
}

TEST(SaeBadInput, TruncatedWeights) {
  SaeCopy s;
  std::string w = test::read_bytes(s.file("sae_weights.safetensors"));
  test::write_bytes(s.file("sae_weights.safetensors"), w.substr(0, w.size() / 2));
  expect_load_error(s.folder, "sae_weights.safetensors", "data_offsets");
}

// A NaN or infinity in the weights (a damaged file, or an SAE saved after its training
// diverged) is refused naming the tensor and the place, not encoded into NaN codes.
TEST(SaeBadInput, NonFiniteWeights) {
  SaeCopy s;
  test::patch_f32(s.file("sae_weights.safetensors"), "W_dec", 3 * 16 + 5, NAN);
  expect_load_error(s.folder, "sae_weights.safetensors: W_dec", "row 3, column 5 is nan");
  SaeCopy t;
  test::patch_f32(t.file("sae_weights.safetensors"), "threshold", 7, INFINITY);
  expect_load_error(t.folder, "sae_weights.safetensors: threshold", "element 7 is inf");
  auto r = test::run_cli("info " + t.folder);
  EXPECT_EQ(r.exit_code, 1) << r.output;
}

TEST(SaeBadInput, MissingFiles) {
  SaeCopy s;
  fs::remove(s.file("cfg.json"));
  expect_load_error(s.folder, "cfg.json", "missing");
  expect_load_error(s.dir / "nope", "nope", "not a folder");
}

// ---- through the CLI: non-zero exit, message names file and field, no output left ----------

void write_acts_npy(const std::string& path, const std::vector<float>& v, int64_t n, int64_t d) {
  write_npy(path, DType::F32, {n, d}, {reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4});
}

TEST(CliBadInput, DInMismatch) {
  test::TempDir dir;
  write_acts_npy(dir / "acts.npy", test::random_vector(5 * 17, 1), 5, 17);
  auto r = test::run_cli("encode " + test::golden("topk/sae") + " " + (dir / "acts.npy") + " -o " +
                         (dir / "out.safetensors"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("acts.npy: shape: activations have d_in 17"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
}

// --precision tf32|bf16 is the GPU encoder's: on the CPU it is refused, not silently fp32.
TEST(CliBadInput, GpuPrecisionOnTheCpuIsRefused) {
  test::TempDir dir;
  write_acts_npy(dir / "acts.npy", test::random_vector(4 * 16, 3), 4, 16);
  for (std::string cmd : {"encode", "eval"}) {
    std::string args = cmd + " " + test::golden("topk/sae") + " " + (dir / "acts.npy");
    if (cmd == "encode") args += " -o " + (dir / "out.safetensors");
    auto r = test::run_cli(args + " --precision bf16");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find("precision"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("--device cuda"), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
    EXPECT_EQ(test::run_cli(args + " --precision fp32").exit_code, 0) << cmd;
    fs::remove(dir / "out.safetensors");
  }
}

TEST(CliBadInput, NanAndInfActivationsAreRejected) {
  test::TempDir dir;
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto v = test::random_vector(4 * 16, 2);
    v[2 * 16 + 5] = bad;
    write_acts_npy(dir / "acts.npy", v, 4, 16);
    for (std::string cmd : {"encode", "eval"}) {
      std::string args = cmd + " " + test::golden("jumprelu/sae") + " " + (dir / "acts.npy");
      if (cmd == "encode") args += " -o " + (dir / "out.safetensors");
      auto r = test::run_cli(args);
      EXPECT_EQ(r.exit_code, 1) << r.output;
      EXPECT_NE(r.output.find("acts.npy: row 2, column 5"), std::string::npos) << r.output;
      EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
    }
  }
}

TEST(CliBadInput, CorruptSaeGivesErrorNotCrash) {
  SaeCopy s;
  std::string w = test::read_bytes(s.file("sae_weights.safetensors"));
  test::write_bytes(s.file("sae_weights.safetensors"), w.substr(0, 5));
  auto r = test::run_cli("info " + s.folder);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("sae_weights.safetensors: header length"), std::string::npos) << r.output;
  auto c = test::run_cli("convert " + s.folder + " -o " + (s.dir / "conv"));
  EXPECT_EQ(c.exit_code, 1);
  EXPECT_FALSE(fs::exists(s.dir / "conv"));
}

TEST(CliBadInput, UnknownActivationFormatAndUsage) {
  test::TempDir dir;
  test::write_bytes(dir / "acts.csv", "1,2,3");
  auto r = test::run_cli("eval " + test::golden("topk/sae") + " " + (dir / "acts.csv"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find(".npy or .safetensors"), std::string::npos) << r.output;
  EXPECT_NE(test::run_cli("encode").exit_code, 0);  // missing arguments: usage error
}

}  // namespace
}  // namespace sae
