#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace sae {
namespace {

using test::TempDir;
namespace fs = std::filesystem;

// The tensors scripts/make_goldens.py wrote with the reference (Rust) writer.
TEST(Safetensors, ReadsReferenceFile) {
  SafetensorsFile f(test::golden("safetensors/mixed.safetensors"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.read_f32("w", {2, 3}), (std::vector<float>{0, 0.25f, 0.5f, 0.75f, 1.0f, 1.25f}));
  EXPECT_EQ(f.read_f32("b"), (std::vector<float>{0, 0.5f, 1, 1.5f, 2}));
  EXPECT_EQ(f.read_f32("h"), (std::vector<float>{-1, 0, 1}));
  EXPECT_EQ(f.read_i64("idx"), (std::vector<int64_t>{0, 3, 6, 9}));
  EXPECT_EQ(f.read_i64("i32"), (std::vector<int64_t>{-7, -6}));
  EXPECT_EQ(f.read_scalar_f64("a_scalar"), 2.5);
  EXPECT_EQ(f.info("a_scalar").shape.size(), 0u);
}

TEST(Safetensors, WritesByteIdenticalToReference) {
  std::vector<float> w = {0, 0.25f, 0.5f, 0.75f, 1.0f, 1.25f};
  std::vector<uint16_t> b(5), h(3);
  for (int i = 0; i < 5; ++i) b[size_t(i)] = f32_to_bf16(float(i) / 2);
  for (int i = 0; i < 3; ++i) h[size_t(i)] = f32_to_f16(float(i) - 1);
  std::vector<int64_t> idx = {0, 3, 6, 9};
  std::vector<int32_t> i32 = {-7, -6};
  std::vector<double> scalar = {2.5};
  TempDir dir;
  write_safetensors(dir / "mine.safetensors",
                    {tensor_view("w", std::span<const float>(w), {2, 3}),
                     tensor_view("b", std::span<const uint16_t>(b), DType::BF16, {5}),
                     tensor_view("h", std::span<const uint16_t>(h), DType::F16, {3}),
                     tensor_view("idx", std::span<const int64_t>(idx), {4}),
                     tensor_view("i32", std::span<const int32_t>(i32), {2}),
                     tensor_view("a_scalar", std::span<const double>(scalar), {})},
                    {{"format", "pt"}});
  EXPECT_EQ(test::read_bytes(dir / "mine.safetensors"),
            test::read_bytes(test::golden("safetensors/mixed.safetensors")));
}

TEST(Safetensors, RoundTripU16AndEmpty) {
  TempDir dir;
  std::vector<uint16_t> u = {1, 65535, 7};
  std::vector<float> empty;
  write_safetensors(dir / "t.safetensors",
                    {tensor_view("u", std::span<const uint16_t>(u), DType::U16, {3}),
                     tensor_view("e", std::span<const float>(empty), {0, 4})});
  SafetensorsFile f(dir / "t.safetensors");
  EXPECT_EQ(f.read_i64("u"), (std::vector<int64_t>{1, 65535, 7}));
  EXPECT_EQ(f.read_f32("e").size(), 0u);
  EXPECT_TRUE(f.metadata().empty());
}

// ---- bad input: each must throw sae::Error naming the file and the field --------------------

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char((n >> (8 * i)) & 0xff);
  return s;
}
std::string file_with_header(const std::string& header, size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\0');
}

void expect_error(const std::string& path, const std::string& field) {
  try {
    SafetensorsFile f(path);
    FAIL() << "no error for " << path;
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(field), std::string::npos) << msg;
  }
}

TEST(SafetensorsBadInput, TruncatedFile) {
  TempDir dir;
  std::string good = test::read_bytes(test::golden("safetensors/mixed.safetensors"));
  test::write_bytes(dir / "t.safetensors", good.substr(0, good.size() - 3));
  expect_error(dir / "t.safetensors", "data_offsets");
  test::write_bytes(dir / "short.safetensors", "abc");
  expect_error(dir / "short.safetensors", "header length");
  test::write_bytes(dir / "empty.safetensors", "");
  expect_error(dir / "empty.safetensors", "header length");
}

TEST(SafetensorsBadInput, HeaderLengthPastEnd) {
  TempDir dir;
  test::write_bytes(dir / "t.safetensors", le64(1000) + "{}");
  expect_error(dir / "t.safetensors", "header length");
  test::write_bytes(dir / "huge.safetensors", le64(~0ull) + "{}");
  expect_error(dir / "huge.safetensors", "header length");
}

TEST(SafetensorsBadInput, OverlappingOffsets) {
  TempDir dir;
  test::write_bytes(dir / "t.safetensors",
                    file_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                     R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                     12));
  expect_error(dir / "t.safetensors", "data_offsets");
}

TEST(SafetensorsBadInput, OutOfRangeOffsets) {
  TempDir dir;
  test::write_bytes(
      dir / "t.safetensors",
      file_with_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8));
  expect_error(dir / "t.safetensors", "a.data_offsets");
  test::write_bytes(
      dir / "rev.safetensors",
      file_with_header(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8));
  expect_error(dir / "rev.safetensors", "a.data_offsets");
}

TEST(SafetensorsBadInput, ShapeDisagreesWithOffsets) {
  TempDir dir;
  test::write_bytes(
      dir / "t.safetensors",
      file_with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8));
  expect_error(dir / "t.safetensors", "a.data_offsets");
  test::write_bytes(
      dir / "neg.safetensors",
      file_with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8));
  expect_error(dir / "neg.safetensors", "a.shape");
  test::write_bytes(
      dir / "ovf.safetensors",
      file_with_header(
          R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8));
  expect_error(dir / "ovf.safetensors", "a.shape");
}

TEST(SafetensorsBadInput, UnknownDtypeAndBadJson) {
  TempDir dir;
  test::write_bytes(
      dir / "t.safetensors",
      file_with_header(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8));
  expect_error(dir / "t.safetensors", "a.dtype");
  test::write_bytes(dir / "j.safetensors", file_with_header(R"({"a":{"dtype":"F32",)", 8));
  expect_error(dir / "j.safetensors", "header");
  test::write_bytes(dir / "m.safetensors", file_with_header(R"({"__metadata__":{"x":1}})", 0));
  expect_error(dir / "m.safetensors", "__metadata__.x");
}

TEST(SafetensorsBadInput, MissingTensorAndWrongShape) {
  SafetensorsFile f(test::golden("safetensors/mixed.safetensors"));
  EXPECT_THROW(f.info("nope"), Error);
  EXPECT_THROW(f.read_f32("w", {3, 2}), Error);
  EXPECT_THROW(f.read_f32("idx"), Error);  // integer tensor read as float
}

TEST(SafetensorsWrite, FailedWriteLeavesNoFile) {
  TempDir dir;
  std::vector<float> a = {1, 2};
  // Duplicate names are refused before anything is written.
  EXPECT_THROW(write_safetensors(dir / "dup.safetensors",
                                 {tensor_view("x", std::span<const float>(a), {2}),
                                  tensor_view("x", std::span<const float>(a), {2})}),
               Error);
  EXPECT_FALSE(fs::exists(dir / "dup.safetensors"));
  for (auto& e : fs::directory_iterator(dir.path)) ADD_FAILURE() << "left behind: " << e.path();
}

}  // namespace
}  // namespace sae
