// Storage types for the two 16-bit float formats the library holds (IEEE binary16 and bfloat16),
// with round-to-nearest-even conversions to and from float. They are plain 16-bit structs, so the
// same bytes can be handed to CUDA's __half / __nv_bfloat16 without conversion.
#pragma once

#include <bit>
#include <cstdint>

namespace kvcache {

/// IEEE 754 binary16, stored as its bits.
struct float16 {
  /// The binary16 bit pattern: sign, 5 exponent bits, 10 mantissa bits.
  std::uint16_t bits = 0;
};

/// bfloat16: the upper 16 bits of a float32, stored as its bits.
struct bfloat16 {
  /// The bfloat16 bit pattern: sign, 8 exponent bits, 7 mantissa bits.
  std::uint16_t bits = 0;
};

static_assert(sizeof(float16) == 2 && sizeof(bfloat16) == 2);

/// The float a bfloat16 holds (exact).
inline float bf16_to_float(bfloat16 h) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h.bits) << 16);
}

/// `f` rounded to the nearest bfloat16, ties to even (NaN stays NaN).
inline bfloat16 float_to_bf16(float f) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                           // round to nearest, ties to even
  return {static_cast<std::uint16_t>(u >> 16)};
}

/// The float a float16 holds (exact, subnormals included).
inline float fp16_to_float(float16 h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
  std::uint32_t mantissa = h.bits & 0x3ffu;
  std::uint32_t out;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);  // inf or NaN
  } else if (exponent != 0) {
    out = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    out = sign;  // signed zero
  } else {
    // Subnormal half: normalise into a float32 normal number.
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    out = sign | (static_cast<std::uint32_t>(113 - shift) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(out);
}

/// `f` rounded to the nearest float16, ties to even (overflow to infinity, NaN stays NaN).
inline float16 float_to_fp16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return {static_cast<std::uint16_t>(sign | 0x7e00u)};   // NaN
  if (abs >= 0x477ff000u) return {static_cast<std::uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in half: shift the implicit-one mantissa into place with
    // round-to-nearest-even on the dropped bits.
    if (abs < 0x33000000u) return {sign};  // below half the smallest subnormal
    const std::uint32_t exponent = abs >> 23;
    const std::uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exponent;  // 14..24
    std::uint32_t half_mantissa = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return {static_cast<std::uint16_t>(sign | half_mantissa)};
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  std::uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return {static_cast<std::uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

/// Converts any of the library's element types to float.
inline float to_float(float x) { return x; }
/// The float a float16 holds.
inline float to_float(float16 x) { return fp16_to_float(x); }
/// The float a bfloat16 holds.
inline float to_float(bfloat16 x) { return bf16_to_float(x); }

/// Converts a float to element type T with round-to-nearest-even.
template <class T>
T from_float(float x);
template <>
/// `x` itself.
inline float from_float<float>(float x) {
  return x;
}
template <>
/// `x` rounded to float16.
inline float16 from_float<float16>(float x) {
  return float_to_fp16(x);
}
template <>
/// `x` rounded to bfloat16.
inline bfloat16 from_float<bfloat16>(float x) {
  return float_to_bf16(x);
}

}  // namespace kvcache
