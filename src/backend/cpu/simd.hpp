// Private to the CPU backend: 16-float vectors through GCC/Clang vector extensions (a zmm register
// with AVX-512; the compiler splits them on narrower machines), loads that widen bfloat16 and
// float16 (exactly), the horizontal sums the dot-product kernels need, and software prefetch.
// Explicit vectors keep R rows of accumulators in registers, which plain loops did not.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvcache/float16.hpp"

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// Vector types passed by value between these inline helpers trigger g++'s note that their ABI
// changed across compiler versions; nothing here crosses a library boundary.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace kvcache::cpu::simd {

typedef float Vec16 __attribute__((vector_size(64)));
constexpr std::int64_t kLanes = 16;

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }
// Keeps v in a register: g++ otherwise folds a float32 load into every FMA that uses it (one
// weight vector reloaded for each of R rows of x), which makes the GEMV kernels load-bound.
inline void in_register(Vec16& v) {
#if defined(__AVX512F__) && defined(__GNUC__)
  __asm__("" : "+v"(v));
#else
  (void)v;
#endif
}

// Horizontal sum as a tree of halves (4 dependent adds, not 15: this runs once per key and row).
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
inline float sum16(Vec16 v) {
  Vec8 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const Vec8 s8 = lo + hi;
  Vec4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof(lo4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(lo4), sizeof(hi4));
  const Vec4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Rows this far ahead are prefetched: the hardware prefetcher alone leaves each core well short
// of its share of DRAM bandwidth when every 512-byte row also costs ~100 instructions. A prefetch
// past the end of the buffer is harmless (prefetches never fault).
constexpr std::int64_t kPrefetchRows = 16;
inline void prefetch_row(const float* row, std::int64_t d) {
  for (std::int64_t c = 0; c < d; c += 64 / sizeof(float)) __builtin_prefetch(row + c, 0, 1);
}

// The four horizontal sums of a, b, c, d as lanes 0..3, by halving all four together: 12 vector
// operations where four separate trees take about 28.
inline void sum16x4(Vec16 a, Vec16 b, Vec16 c, Vec16 d, float* out) {
  const Vec16 ab =
      __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
      __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const Vec16 cd =
      __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
      __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // Lanes 4r..4r+3 now hold row r's four partial sums.
  const Vec16 u =
      __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
      __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const Vec16 v =
      __builtin_shufflevector(u, u, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
      __builtin_shufflevector(u, u, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
  out[0] = v[0] + v[1];
  out[1] = v[2] + v[3];
  out[2] = v[4] + v[5];
  out[3] = v[6] + v[7];
}

// Sixteen bfloat16 widened to float: the bits move to the top half of each 32-bit lane.
typedef std::uint16_t U16x16 __attribute__((vector_size(32)));
typedef std::uint32_t U32x16 __attribute__((vector_size(64)));
inline Vec16 load16(const bfloat16* p) {
#ifdef __AVX512F__
  // One vpmovzxwd zmm and a shift; the generic form below compiles to twice the instructions.
  const __m512i wide =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<Vec16>(_mm512_slli_epi32(wide, 16));
#endif
  U16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  Vec16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// Sixteen binary16 bit patterns as floats, exactly, by fp16_to_float's arithmetic on all lanes at
// once: the portable form of load16(const float16*) below (named, so the tests can check it on
// every build).
inline Vec16 fp16_bits_to_float(U16x16 h) {
  const U32x16 bits = __builtin_convertvector(h, U32x16);
  // Exponent and mantissa moved to float32's places; the exponent is still biased by 15.
  const U32x16 shifted = (bits & 0x7fffu) << 13;
  const U32x16 exponent = shifted & 0x0f800000u;
  // Normal halves: rebias 15 -> 127. Inf/NaN (exponent 31): on to 255, mantissa kept.
  U32x16 out = shifted + (112u << 23);
  out = exponent == 0x0f800000u ? out + (112u << 23) : out;
  // Zero and subnormal halves (exponent 0): one more step of exponent makes the bits read as
  // 2^-14 · (1 + m/1024); subtracting the float 2^-14 leaves m · 2^-24 exactly (0 for m = 0).
  const U32x16 one_more = out + (1u << 23);
  Vec16 sub;
  std::memcpy(&sub, &one_more, sizeof(sub));
  sub -= 6.103515625e-05f;  // 2^-14
  U32x16 sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
  out = exponent == 0u ? sub_bits : out;
  out |= (bits & 0x8000u) << 16;
  Vec16 v;
  std::memcpy(&v, &out, sizeof(v));
  return v;
}

// Sixteen float16 widened to float, exactly (every binary16 value is a float32 value): VCVTPH2PS
// on a zmm where the build has AVX-512, two F16C ymm conversions where it has F16C only, and
// fp16_bits_to_float otherwise. One difference: the instructions set the quiet bit of a
// signalling NaN (sign and payload kept), where the portable form, like fp16_to_float, keeps the
// bits; a NaN stays a NaN either way. Subnormal halves become normal floats, so MXCSR's DAZ and
// FTZ never apply.
inline Vec16 load16(const float16* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec16>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  Vec16 v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  U16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return fp16_bits_to_float(h);
#endif
}

// n values of a float, bfloat16 or float16 row widened into dst (float32), sixteen at a time;
// exact. What the prefill path's GEMM and the batched decode tiles read.
template <class T>
inline void widen(const T* src, std::int64_t n, float* dst) {
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store16(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

#ifdef __AVX512F__
// e^x for sixteen floats, within about 1 ulp of expf: e^x = 2^n · e^r with n = round(x·log2 e)
// and r = x − n·ln 2 (ln 2 in two parts, so r is exact to float precision), e^r from Cephes'
// degree-6 polynomial on |r| ≤ ln2/2, and 2^n applied by VSCALEFPS (which overflows to +inf and
// underflows through the subnormals to 0 as expf does). Inputs are clamped to [-104, 89] first,
// past where expf is already 0 or +inf, so r stays finite; NaN comes out finite.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 er = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(er, n);
}
#endif

}  // namespace kvcache::cpu::simd
