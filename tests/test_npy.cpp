#include <gtest/gtest.h>

#include "core/error.h"
#include "io/npy.h"
#include "test_util.h"

namespace sae {
namespace {

TEST(Npy, ReadsNumpyWrittenFile) {
  NpyFile f(test::golden("standard/x.npy"));
  EXPECT_EQ(f.dtype(), DType::F32);
  EXPECT_EQ(f.shape(), (std::vector<int64_t>{48, 16}));
}

TEST(Npy, WriteReadRoundTrip) {
  test::TempDir dir;
  std::vector<float> v = {1, 2, 3, 4, 5, 6};
  write_npy(dir / "a.npy", DType::F32, {2, 3},
            {reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4});
  NpyFile f(dir / "a.npy");
  EXPECT_EQ(f.shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(test::read_npy_f32(dir / "a.npy"), v);
  write_npy(dir / "b.npy", DType::F32, {6},
            {reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4});
  EXPECT_EQ(NpyFile(dir / "b.npy").shape(), (std::vector<int64_t>{6}));
}

TEST(NpyBadInput, MagicTruncationFortran) {
  test::TempDir dir;
  test::write_bytes(dir / "bad.npy", "not numpy at all");
  EXPECT_THROW(NpyFile(dir / "bad.npy"), Error);
  std::string good = test::read_bytes(test::golden("standard/x.npy"));
  test::write_bytes(dir / "trunc.npy", good.substr(0, good.size() - 10));
  try {
    NpyFile f(dir / "trunc.npy");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("trunc.npy: data"), std::string::npos) << e.what();
  }
  std::string fortran = good;
  auto p = fortran.find("False");
  fortran.replace(p, 5, "True ");
  test::write_bytes(dir / "f.npy", fortran);
  EXPECT_THROW(NpyFile(dir / "f.npy"), Error);
}

}  // namespace
}  // namespace sae
