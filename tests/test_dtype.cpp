#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/finite.h"

namespace sae {
namespace {

TEST(DType, NamesRoundTrip) {
  for (auto t :
       {DType::F32, DType::BF16, DType::F16, DType::I32, DType::I64, DType::U16, DType::F64}) {
    auto back = dtype_from_name(dtype_name(t));
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(*back, t);
  }
  EXPECT_FALSE(dtype_from_name("F33").has_value());
  EXPECT_EQ(dtype_from_torch_name("torch.bfloat16"), DType::BF16);
  EXPECT_EQ(dtype_from_torch_name("float32"), DType::F32);
  EXPECT_FALSE(dtype_from_torch_name("int8").has_value());
}

TEST(DType, Bf16KnownValues) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (down to 1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3*2^-8 is halfway too: ties to even (up).
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::infinity()))));
}

TEST(DType, F16KnownValuesAndRoundTrip) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);               // largest half
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);                   // overflow to inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x3555), 0.333251953125f);
  // Every finite half survives half -> float -> half.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;  // inf/nan
    ASSERT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), h) << std::hex << h;
  }
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::nanf("")))));
}

// The bit-pattern scan finds every NaN and infinity (quiet, signalling, negative) at any
// place, and nothing else (the largest finite values, denormals, signed zeros).
TEST(Finite, FirstNonFiniteFindsEveryKindAndOnlyThose) {
  const float lim = std::numeric_limits<float>::max();
  std::vector<float> x = {0.0f,   -0.0f,   lim,  -lim,
                          1e-45f, -1e-45f, 3.0f, std::numeric_limits<float>::min()};
  for (int i = 0; i < 40; ++i) x.push_back(float(i) - 20.5f);
  EXPECT_EQ(first_non_finite(x), -1);
  EXPECT_EQ(first_non_finite({}), -1);
  uint32_t neg_nan_bits = 0xffc00001u;
  float neg_nan;
  std::memcpy(&neg_nan, &neg_nan_bits, 4);
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::signaling_NaN(), neg_nan})
    for (size_t at : {size_t(0), size_t(7), x.size() - 1}) {
      std::vector<float> y = x;
      y[at] = bad;
      y.push_back(bad);  // a later one is not reported first
      EXPECT_EQ(first_non_finite(y), int64_t(at)) << bad << " at " << at;
    }
  // check_finite names the place: row and column, counted from first_row.
  std::vector<float> rows(12, 1.0f);
  rows[7] = std::numeric_limits<float>::quiet_NaN();
  try {
    check_finite(rows, 3, 4, "shard.npy", 100);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("shard.npy: row 101, column 3: activation is nan"),
              std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(check_finite(rows, 1, 4, "shard.npy"));  // only the first n rows are read
}

}  // namespace
}  // namespace sae
