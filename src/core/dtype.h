// Element types as safetensors names them, and the float conversions the engine needs.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>

namespace sae {

// Listed in the order of the Rust `safetensors` Dtype enum, which its writer sorts by
// (descending) — keeping that order lets us write byte-identical files.
enum class DType : uint8_t { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

std::string_view dtype_name(DType t);                      // "F32", "BF16", ...
std::optional<DType> dtype_from_name(std::string_view s);  // safetensors header name
size_t dtype_size(DType t);                                // bytes per element
bool dtype_is_float(DType t);

// SAELens cfg.json spells dtypes as torch does ("float32", "torch.bfloat16", "bfloat16").
std::optional<DType> dtype_from_torch_name(std::string_view s);
std::string_view dtype_torch_name(DType t);  // "float32", "bfloat16", "float16"

// bf16 is the top half of an f32; rounding is round-to-nearest-even, NaN stays NaN.
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of a float type (F32, F16, BF16, F64) to f32 / from f32.
void convert_to_f32(DType src_type, const void* src, float* dst, size_t n);
void convert_from_f32(const float* src, DType dst_type, void* dst, size_t n);

}  // namespace sae
