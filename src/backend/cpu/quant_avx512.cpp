// AVX-512 VNNI matrix-vector kernels over quantized weights (decode). Each 64-byte load of weight
// payload meets the matching int8 x bytes in VPDPBUSD (unsigned weight bytes × signed x bytes,
// four products summed per int32 lane); every lane belongs to one block, so one float32 multiply
// by (weight scale × x scale) per lane finishes the blocks, and the lanes are summed once per row.
//   Q4_1: 64 payload bytes = 4 blocks; low nibbles meet the x bytes of elements 0..15, high
//         nibbles those of 16..31 (quantize_x lays x out that way); the minimum adds m·d_x·Σq_x.
//   Q8_0: 64 payload bytes = 2 blocks of q + 128; the accumulator starts at −128·Σ(x bytes) per
//         lane, which removes the offset exactly.
//   Q5_0 / Q5_1: Q4_1's loop; the fifth bits of a 64-byte load are one 64-bit mask (the layout
//         regroups qh so), added as 16 with a masked byte add; Q5_0's −16 is a minimum −16·d.
//   Q4_K / Q5_K: per superblock, the 12 packed bytes become 8 scales and 8 mins in one 128-bit
//         vector (32-bit shifts and masks), widened to floats ×d / ×dmin; each lane's sub-block
//         scale is a permute of them, and the mins meet x's d·Σq (dmin·mn·s) in one FMA.
//   Q6_K: the low nibbles as Q4_1's; the 2-bit highs of 64 payload bytes come from 32 bytes
//         broadcast to both halves and shifted (0 / 2 bits) per half; low and high nibbles get
//         their own dot products (their 16-element sub-blocks have their own scales), and the
//         −32 offset is −32·(d·sc)·(d_x·Σq_x per 16), one FMA per superblock.
// Compiled for AVX-512 with target attributes whatever the build's -march, and only called when
// the CPU has it (quantized.cpp checks).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // g++ 12: _mm512_undefined_* in intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments between this file's own functions
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_kernels.hpp"

#define KVCACHE_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
// Group helpers are forced inline (their accumulators then stay in registers); each format's
// row kernel is one function, called once per RB rows, so the register allocator sees it alone.
#define KVCACHE_ALWAYS_INLINE inline __attribute__((always_inline))
#define KVCACHE_NOINLINE __attribute__((noinline))

namespace kvcache::cpu::quant {
namespace {

// Bytes ahead of the row being read that are prefetched, so enough DRAM requests are in flight
// while each thread walks its contiguous share of rows.
constexpr std::int64_t kPrefetchBytes = 8192;

KVCACHE_AVX512 inline void prefetch_ahead(const std::uint8_t* row, std::size_t bytes) {
  for (std::size_t c = 0; c < bytes; c += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchBytes + c), _MM_HINT_T1);
}

// The four horizontal sums of a, b, c, d as one 128-bit vector [Σa, Σb, Σc, Σd]: about half the
// operations of four separate reductions, which matter when a row is only 4.5 groups long.
// (Helpers are functions, not lambdas: a lambda does not inherit the target attribute, and without
// -march=native its intrinsics fail to inline.)
KVCACHE_AVX512 inline __m256 half(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

KVCACHE_AVX512 inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 ab = _mm256_hadd_ps(half(a), half(b)), cd = _mm256_hadd_ps(half(c), half(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // [a b c d | a b c d] partial sums
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Sums of RB accumulator rows (RB = 1 or 4) into out[0..RB).
template <int RB>
KVCACHE_AVX512 inline void reduce_rows(const __m512 (&acc)[RB], float* out) {
  if constexpr (RB == 4) {
    _mm_storeu_ps(out, sum4(acc[0], acc[1], acc[2], acc[3]));
  } else {
    for (int i = 0; i < RB; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
  }
}

// Q8_0, one chunk of n ≤ 2 blocks at payload byte c·64: the same shape as nibble_group, the
// accumulator starting from −128·Σ(x bytes) per lane to undo the stored offset.
template <int RB, int R>
KVCACHE_AVX512 inline void q8_0_chunk(const std::uint8_t* p, std::size_t row_bytes, std::int64_t nb,
                                      const QuantizedX& x, std::int64_t r0, std::int64_t c,
                                      std::int64_t n, __m512 (&acc)[R][RB]) {
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __mmask64 m = n == 2 ? ~0ULL : 0xFFFFFFFFULL;
  const __mmask16 lanes = n == 2 ? 0xFFFF : 0x00FF;
  __m512i xq[R], start[R];
  __m512 xd[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = _mm512_maskz_loadu_epi8(m, x.q_row(r0 + r) + c * 64);
    start[r] = _mm512_maskz_loadu_epi32(lanes, x.corr_row(r0 + r) + c * 16);
    xd[r] = _mm512_loadu_ps(x.drep_row(r0 + r) + c * 16);
  }
  for (int i = 0; i < RB; ++i) {
    const std::uint8_t* row = p + static_cast<std::size_t>(i) * row_bytes;
    const __m512i v = _mm512_maskz_loadu_epi8(m, row + c * 64);
    const __m128i d2 =
        _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1), row + nb * 32 + c * 4);
    const __m512 dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(d2)));
    for (int r = 0; r < R; ++r) {
      const __m512i dot = _mm512_dpbusd_epi32(start[r], v, xq[r]);
      acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, xd[r]), acc[r][i]);
    }
  }
}

template <int RB, int R>
KVCACHE_AVX512 inline void q8_0_rows(const std::uint8_t* p, std::size_t row_bytes, std::int64_t nb,
                                     const QuantizedX& x, std::int64_t r0, float (&sums)[R][RB]) {
  __m512 acc[R][RB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < RB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (std::int64_t c = 0; c < nb / 2; ++c) q8_0_chunk<RB, R>(p, row_bytes, nb, x, r0, c, 2, acc);
  if (nb % 2) q8_0_chunk<RB, R>(p, row_bytes, nb, x, r0, nb / 2, 1, acc);
  for (int r = 0; r < R; ++r) reduce_rows<RB>(acc[r], sums[r]);
}

// The fifth bits of a group of n blocks (the low halves' 2·n bytes at qh, then the high halves'),
// as two byte masks. A full group's are two 8-byte loads; a tail group's are loaded masked (a
// variable-length memcpy goes through the stack, and the 8-byte read of its bytes stalls).
template <bool kFull>
KVCACHE_AVX512 KVCACHE_ALWAYS_INLINE void fifth_bits(const std::uint8_t* qh, std::int64_t n,
                                                     __mmask64& lo, __mmask64& hi) {
  if constexpr (kFull) {
    std::uint64_t a, b;
    std::memcpy(&a, qh, 8);
    std::memcpy(&b, qh + 8, 8);
    lo = _cvtu64_mask64(a);
    hi = _cvtu64_mask64(b);
  } else {
    const auto bytes = static_cast<__mmask16>((1u << (2 * n)) - 1);
    lo = _cvtu64_mask64(
        static_cast<std::uint64_t>(_mm_cvtsi128_si64(_mm_maskz_loadu_epi8(bytes, qh))));
    hi = _cvtu64_mask64(
        static_cast<std::uint64_t>(_mm_cvtsi128_si64(_mm_maskz_loadu_epi8(bytes, qh + 2 * n))));
  }
}

// Q4_1 / Q5_0 / Q5_1, one group of n ≤ 4 blocks at payload byte g·64 (n = 4 when kFull) of RB
// consecutive weight rows (from p, row_bytes apart) against R rows of x, into acc[r][i]: the low
// nibbles meet x's elements 0..15 of each block, the high nibbles 16..31, and the 5-bit formats add
// 16 where the group's fifth bits say. The group's x bytes and scales are loaded once for all RB
// rows.
template <QuantFormat F, int RB, int R, bool kFull>
KVCACHE_AVX512 KVCACHE_ALWAYS_INLINE void nibble_group(const std::uint8_t* p, std::size_t row_bytes,
                                                       std::int64_t nb, const QuantizedX& x,
                                                       std::int64_t r0, std::int64_t g,
                                                       std::int64_t n, __m512 (&acc)[R][RB]) {
  constexpr bool k5 = F != QuantFormat::kQ4_1;
  if constexpr (kFull) n = 4;
  const __mmask64 m = kFull ? ~0ULL : ~0ULL >> (64 - 16 * n);
  const __m512i low4 = _mm512_set1_epi8(0x0F), k16 = _mm512_set1_epi8(16);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const std::int64_t d_at = nb * (k5 ? quant::kQ5D : 16);
  __m512i xlo[R], xhi[R];
  __m512 xd[R];
  for (int r = 0; r < R; ++r) {
    const std::int8_t* xq = x.q_row(r0 + r) + g * 128;
    xlo[r] = kFull ? _mm512_loadu_si512(xq) : _mm512_maskz_loadu_epi8(m, xq);
    xhi[r] = kFull ? _mm512_loadu_si512(xq + 64) : _mm512_maskz_loadu_epi8(m, xq + 16 * n);
    xd[r] = _mm512_loadu_ps(x.drep_row(r0 + r) + g * 16);
  }
  for (int i = 0; i < RB; ++i) {
    const std::uint8_t* row = p + static_cast<std::size_t>(i) * row_bytes;
    const __m512i v =
        kFull ? _mm512_loadu_si512(row + g * 64) : _mm512_maskz_loadu_epi8(m, row + g * 64);
    __m512i lo = _mm512_and_si512(v, low4);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if constexpr (k5) {
      __mmask64 bits_lo, bits_hi;
      fifth_bits<kFull>(row + nb * quant::kQ5Qh + g * 16, n, bits_lo, bits_hi);
      lo = _mm512_mask_add_epi8(lo, bits_lo, lo, k16);
      hi = _mm512_mask_add_epi8(hi, bits_hi, hi, k16);
    }
    const __m128i d4 =
        kFull ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d_at + g * 8))
              : _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1), row + d_at + g * 8);
    const __m512 dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(d4)));
    for (int r = 0; r < R; ++r) {
      const __m512i dot =
          _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[r]), hi, xhi[r]);
      acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, xd[r]), acc[r][i]);
    }
  }
}

// Q4_1 / Q5_0 / Q5_1: RB rows against x rows [r0, r0 + R); the minimum term Σ m_b·(d_x·Σq_x)_b
// with Q4_1's or Q5_1's m, or Q5_0's −16·d.
template <QuantFormat F, int RB, int R>
KVCACHE_AVX512 KVCACHE_NOINLINE void nibble_rows(const std::uint8_t* p, std::size_t row_bytes,
                                                 std::int64_t nb, const QuantizedX& x,
                                                 std::int64_t r0, float (&sums)[R][RB]) {
  const std::int64_t full = nb / 4, tail = nb % 4;
  __m512 acc[R][RB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < RB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (std::int64_t g = 0; g < full; ++g)
    nibble_group<F, RB, R, true>(p, row_bytes, nb, x, r0, g, 4, acc);
  if (tail) nibble_group<F, RB, R, false>(p, row_bytes, nb, x, r0, full, tail, acc);
  const bool q50 = F == QuantFormat::kQ5_0;
  const std::int64_t m_at = nb * (F == QuantFormat::kQ4_1 ? 18 : (q50 ? quant::kQ5D : quant::kQ5M));
  const __m512 factor = _mm512_set1_ps(q50 ? -16.0f : 1.0f);
  for (std::int64_t b = 0; b < nb; b += 16) {
    const __mmask16 m = nb - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nb - b)) - 1);
    for (int r = 0; r < R; ++r) {
      __m512 s = _mm512_maskz_loadu_ps(m, x.s_row(r0 + r) + b);
      if (q50) s = _mm512_mul_ps(s, factor);
      for (int i = 0; i < RB; ++i) {
        const std::uint8_t* mins = p + static_cast<std::size_t>(i) * row_bytes + m_at + b * 2;
        acc[r][i] =
            _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, mins)), s, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r) reduce_rows<RB>(acc[r], sums[r]);
}

// Q4_K / Q5_K superblock scales: [d·sc0 … d·sc7, dmin·mn0 … dmin·mn7] from the superblock's
// first 16 bytes (fp16 d, dmin, then the 12 packed bytes q0..q11 of ggml's get_scale_min_k4):
// two byte shuffles line up [q0..q3, q8..q11, q4..q7, q8..q11] (the low 6 bits of sc0..3 and
// mn0..3, the low nibbles of sc4..7 and, shifted by 4, those of mn4..7) and q0..q7 under sc4..7 /
// mn4..7 (whose top 2 bits they hold), then masks and one OR.
KVCACHE_AVX512 inline __m512 k4_scales(const std::uint8_t* base) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base));
  const __m128i a =
      _mm_shuffle_epi8(v, _mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m128i b =
      _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
  const __m128i low = _mm_and_si128(_mm_mask_blend_epi8(0xF000, a, _mm_srli_epi16(a, 4)),
                                    _mm_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
  const __m128i high =
      _mm_and_si128(_mm_srli_epi16(b, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
  const __m128i bytes = _mm_or_si128(low, high);
  const __m512 d_dmin =
      _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                            _mm512_castps128_ps512(_mm_cvtph_ps(v)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), d_dmin);
}

// Q4_K / Q5_K: RB rows of nb / 8 superblocks against x rows [r0, r0 + R).
template <bool K5, int RB, int R>
KVCACHE_AVX512 inline void k4_rows(const std::uint8_t* p, std::size_t row_bytes, std::int64_t nb,
                                   const QuantizedX& x, std::int64_t r0, float (&sums)[R][RB]) {
  constexpr std::size_t kBytes = K5 ? 176 : 144;
  constexpr std::int64_t kNib = K5 ? quant::kQ5KNib : quant::kQ4KNib;
  const __m512i low4 = _mm512_set1_epi8(0x0F), k16 = _mm512_set1_epi8(16);
  // Lane l of chunk c belongs to sub-block 4c + l / 4.
  const __m512i sub[2] = {_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                          _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4)};
  __m512 acc[R][RB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < RB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (std::int64_t sb = 0; sb < nb / 8; ++sb) {
    __m512 f[RB];
    for (int i = 0; i < RB; ++i) {
      const std::uint8_t* base = p + static_cast<std::size_t>(i) * row_bytes + sb * kBytes;
      f[i] = k4_scales(base);
      const __m512 mins = _mm512_shuffle_f32x4(f[i], f[i], 0xEE);  // dmin·mn in lanes 0..7
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_maskz_loadu_ps(0x00FF, x.s_row(r0 + r) + sb * 8);
        acc[r][i] = _mm512_fnmadd_ps(mins, s, acc[r][i]);
      }
    }
    for (int c = 0; c < 2; ++c) {
      const std::int64_t g = 2 * sb + c;
      __m512i xlo[R], xhi[R];
      __m512 xd[R];
      for (int r = 0; r < R; ++r) {
        const std::int8_t* xq = x.q_row(r0 + r) + g * 128;
        xlo[r] = _mm512_loadu_si512(xq);
        xhi[r] = _mm512_loadu_si512(xq + 64);
        xd[r] = _mm512_loadu_ps(x.drep_row(r0 + r) + g * 16);
      }
      for (int i = 0; i < RB; ++i) {
        const std::uint8_t* base = p + static_cast<std::size_t>(i) * row_bytes + sb * kBytes;
        const __m512i v = _mm512_loadu_si512(base + kNib + 64 * c);
        __m512i lo = _mm512_and_si512(v, low4);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        if constexpr (K5) {
          std::uint64_t bits_lo, bits_hi;
          std::memcpy(&bits_lo, base + quant::kQ5KQh + 16 * c, 8);
          std::memcpy(&bits_hi, base + quant::kQ5KQh + 16 * c + 8, 8);
          lo = _mm512_mask_add_epi8(lo, bits_lo, lo, k16);
          hi = _mm512_mask_add_epi8(hi, bits_hi, hi, k16);
        }
        const __m512 sc = _mm512_permutexvar_ps(sub[c], f[i]);
        for (int r = 0; r < R; ++r) {
          const __m512i dot = _mm512_dpbusd_epi32(
              _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[r]), hi, xhi[r]);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, xd[r]), acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) reduce_rows<RB>(acc[r], sums[r]);
}

// Q6_K: RB rows of nb / 8 superblocks against x rows [r0, r0 + R).
template <int RB, int R>
KVCACHE_AVX512 inline void q6_k_rows(const std::uint8_t* p, std::size_t row_bytes, std::int64_t nb,
                                     const QuantizedX& x, std::int64_t r0, float (&sums)[R][RB]) {
  constexpr std::size_t kBytes = 210;
  const __m512i low4 = _mm512_set1_epi8(0x0F), k30 = _mm512_set1_epi8(0x30);
  // Shift the broadcast high bytes by 0 bits in the low 256, by 2 in the high 256.
  const __m512i shifts =
      _mm512_set_epi64(2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL,
                       2 * 0x0001000100010001LL, 0, 0, 0, 0);
  // Low-nibble lane l of chunk c is in 16-element sub-block 8c + 2·(l / 4), high-nibble lane one
  // after.
  const __m512i sub_lo[2] = {
      _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0),
      _mm512_set_epi32(14, 14, 14, 14, 12, 12, 12, 12, 10, 10, 10, 10, 8, 8, 8, 8)};
  const __m512i one = _mm512_set1_epi32(1);
  __m512 acc[R][RB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < RB; ++i) acc[r][i] = _mm512_setzero_ps();
  for (std::int64_t sb = 0; sb < nb / 8; ++sb) {
    __m512 sc[RB];
    for (int i = 0; i < RB; ++i) {
      const std::uint8_t* base = p + static_cast<std::size_t>(i) * row_bytes + sb * kBytes;
      const __m128i s8 =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + quant::kQ6KScales));
      std::uint16_t dbits;
      std::memcpy(&dbits, base + quant::kQ6KD, 2);
      const __m512 d = _mm512_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(dbits))));
      sc[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(s8)), d);
      const __m512 minus32 = _mm512_mul_ps(sc[i], _mm512_set1_ps(-32.0f));
      for (int r = 0; r < R; ++r)
        acc[r][i] =
            _mm512_fmadd_ps(minus32, _mm512_loadu_ps(x.s16_row(r0 + r) + sb * 16), acc[r][i]);
    }
    for (int c = 0; c < 2; ++c) {
      const std::int64_t g = 2 * sb + c;
      __m512i xlo[R], xhi[R];
      __m512 xd[R];
      for (int r = 0; r < R; ++r) {
        const std::int8_t* xq = x.q_row(r0 + r) + g * 128;
        xlo[r] = _mm512_loadu_si512(xq);
        xhi[r] = _mm512_loadu_si512(xq + 64);
        xd[r] = _mm512_loadu_ps(x.drep_row(r0 + r) + g * 16);
      }
      for (int i = 0; i < RB; ++i) {
        const std::uint8_t* base = p + static_cast<std::size_t>(i) * row_bytes + sb * kBytes;
        const __m512i v = _mm512_loadu_si512(base + 64 * c);
        const __m512i h = _mm512_srlv_epi16(
            _mm512_broadcast_i64x4(_mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(base + quant::kQ6KHigh + 32 * c))),
            shifts);
        const __m512i lo = _mm512_or_si512(_mm512_and_si512(v, low4),
                                           _mm512_and_si512(_mm512_slli_epi16(h, 4), k30));
        const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4),
                                           _mm512_and_si512(h, k30));
        const __m512 sl = _mm512_permutexvar_ps(sub_lo[c], sc[i]);
        const __m512 sh = _mm512_permutexvar_ps(_mm512_add_epi32(sub_lo[c], one), sc[i]);
        for (int r = 0; r < R; ++r) {
          const __m512i dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[r]);
          const __m512i dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi[r]);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dlo), _mm512_mul_ps(sl, xd[r]), acc[r][i]);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dhi), _mm512_mul_ps(sh, xd[r]), acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) reduce_rows<RB>(acc[r], sums[r]);
}

// One format's kernel for RB weight rows at p.
template <int RB, int R>
KVCACHE_AVX512 inline void format_rows(QuantFormat f, const std::uint8_t* p, std::size_t row_bytes,
                                       std::int64_t nb, const QuantizedX& x, std::int64_t r0,
                                       float (&sums)[R][RB]) {
  switch (f) {
    case QuantFormat::kQ4_1:
      return nibble_rows<QuantFormat::kQ4_1, RB, R>(p, row_bytes, nb, x, r0, sums);
    case QuantFormat::kQ8_0:
      return q8_0_rows<RB, R>(p, row_bytes, nb, x, r0, sums);
    case QuantFormat::kQ5_0:
      return nibble_rows<QuantFormat::kQ5_0, RB, R>(p, row_bytes, nb, x, r0, sums);
    case QuantFormat::kQ5_1:
      return nibble_rows<QuantFormat::kQ5_1, RB, R>(p, row_bytes, nb, x, r0, sums);
    case QuantFormat::kQ4_K:
      return k4_rows<false, RB, R>(p, row_bytes, nb, x, r0, sums);
    case QuantFormat::kQ5_K:
      return k4_rows<true, RB, R>(p, row_bytes, nb, x, r0, sums);
    default:
      return q6_k_rows<RB, R>(p, row_bytes, nb, x, r0, sums);
  }
}

// Rows [o0, o1) of w against x rows [r0, r0 + R): four weight rows at a time for one x row
// (decode), one at a time for several, each row's bytes prefetched ahead of use.
template <int R>
KVCACHE_AVX512 void gemv_rows(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t r0,
                              std::int64_t o0, std::int64_t o1, const float* bias, float* y) {
  if (o0 >= o1) return;
  constexpr int RB = R <= 2 ? 4 : 2;  // weight rows per pass: x registers reused across them
  const std::int64_t nb = w.blocks_per_row(), out = w.rows();
  const std::size_t row_bytes = w.row_bytes();
  const std::uint8_t* first = w.row(o0);
  std::int64_t o = o0;
  for (; o + RB <= o1; o += RB) {
    const std::uint8_t* p = first + static_cast<std::size_t>(o - o0) * row_bytes;
    prefetch_ahead(p, RB * row_bytes);
    float sums[R][RB];
    format_rows<RB, R>(w.format(), p, row_bytes, nb, x, r0, sums);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < RB; ++i)
        y[(r0 + r) * out + o + i] = sums[r][i] + (bias ? bias[o + i] : 0.0f);
  }
  for (; o < o1; ++o) {
    const std::uint8_t* p = first + static_cast<std::size_t>(o - o0) * row_bytes;
    float sums[R][1];
    format_rows<1, R>(w.format(), p, row_bytes, nb, x, r0, sums);
    for (int r = 0; r < R; ++r) y[(r0 + r) * out + o] = sums[r][0] + (bias ? bias[o] : 0.0f);
  }
}

}  // namespace

// --- dequantization (the prefill panels) ------------------------------------------------------

namespace {

// out[0..16) = scale·(q − offset) (− min), q the 16 unsigned bytes of `q8`. The multiply and the
// subtraction carry explicit rounding (_round_ forms), so no compiler contracts them into an FMA:
// the result is ggml's two float32 roundings, bit for bit, as the scalar dequantizer's.
template <bool kMin>
KVCACHE_AVX512 KVCACHE_ALWAYS_INLINE void put16(float* out, __m128i q8, int offset, float scale,
                                                float min) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(q8), _mm512_set1_epi32(offset));
  __m512 v = _mm512_mul_round_ps(_mm512_set1_ps(scale), _mm512_cvtepi32_ps(q), kRound);
  if constexpr (kMin) v = _mm512_sub_round_ps(v, _mm512_set1_ps(min), kRound);
  _mm512_storeu_ps(out, v);
}

KVCACHE_AVX512 KVCACHE_ALWAYS_INLINE float half_at(const std::uint8_t* p) {
  std::uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
}

// The 16 fifth bits `bits` added to q8's bytes as 16.
KVCACHE_AVX512 KVCACHE_ALWAYS_INLINE __m128i add_fifth(__m128i q8, std::uint16_t bits) {
  return _mm_mask_add_epi8(q8, static_cast<__mmask16>(bits), q8, _mm_set1_epi8(16));
}

KVCACHE_AVX512 KVCACHE_ALWAYS_INLINE std::uint16_t u16_at(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace

KVCACHE_AVX512 void dequantize_row_avx512(QuantFormat f, const std::uint8_t* row, std::int64_t nb,
                                          float* out) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  switch (f) {
    case QuantFormat::kQ8_0:
      // ggml: d · q, q stored as q + 128.
      for (std::int64_t b = 0; b < nb; ++b, out += 32) {
        const float d = half_at(row + nb * 32 + 2 * b);
        const auto* q = reinterpret_cast<const __m128i*>(row + 32 * b);
        put16<false>(out, _mm_loadu_si128(q), 128, d, 0.0f);
        put16<false>(out + 16, _mm_loadu_si128(q + 1), 128, d, 0.0f);
      }
      return;
    case QuantFormat::kQ4_1:
    case QuantFormat::kQ5_0:
    case QuantFormat::kQ5_1: {
      // Q4_1 / Q5_1: d·q + m (as d·q − (−m), the same float); Q5_0: d·(q − 16).
      const bool k5 = f != QuantFormat::kQ4_1, q50 = f == QuantFormat::kQ5_0;
      const std::int64_t d_at = nb * (k5 ? quant::kQ5D : 16);
      const std::int64_t m_at = nb * (k5 ? quant::kQ5M : 18);
      for (std::int64_t b = 0; b < nb; ++b, out += 32) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b));
        __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        if (k5) {
          const std::int64_t g = b / 4, n = std::min<std::int64_t>(4, nb - 4 * g), slot = b % 4;
          const std::uint8_t* qh = row + quant::kQ5Qh * nb + 16 * g;
          lo = add_fifth(lo, u16_at(qh + 2 * slot));
          hi = add_fifth(hi, u16_at(qh + 2 * n + 2 * slot));
        }
        const float d = half_at(row + d_at + 2 * b);
        if (q50) {
          put16<false>(out, lo, 16, d, 0.0f);
          put16<false>(out + 16, hi, 16, d, 0.0f);
        } else {
          const float minus_m = -half_at(row + m_at + 2 * b);
          put16<true>(out, lo, 0, d, minus_m);
          put16<true>(out + 16, hi, 0, d, minus_m);
        }
      }
      return;
    }
    case QuantFormat::kQ4_K:
    case QuantFormat::kQ5_K: {
      // Sub-block j: (d·sc_j)·q − dmin·mn_j, both products rounded to float32 first as ggml's.
      const bool k5 = f == QuantFormat::kQ5_K;
      const std::size_t sb_bytes = k5 ? 176 : 144;
      for (std::int64_t s = 0; s < nb / 8; ++s) {
        const std::uint8_t* base = row + static_cast<std::size_t>(s) * sb_bytes;
        const std::uint8_t* nib = base + (k5 ? quant::kQ5KNib : quant::kQ4KNib);
        const float d = half_at(base), dmin = half_at(base + 2);
        const std::uint8_t* packed = base + 4;
        for (int j = 0; j < 8; ++j, out += 32) {
          const int sc =
              j < 4 ? packed[j] & 0x3F : (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 2) & 0x30);
          const int mn =
              j < 4 ? packed[j + 4] & 0x3F : (packed[j + 4] >> 4) | ((packed[j] >> 2) & 0x30);
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nib + 16 * j));
          __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
          if (k5) {
            const std::uint8_t* qh = base + quant::kQ5KQh + 16 * (j / 4);
            lo = add_fifth(lo, u16_at(qh + 2 * (j % 4)));
            hi = add_fifth(hi, u16_at(qh + 8 + 2 * (j % 4)));
          }
          const float scale = d * static_cast<float>(sc), min = dmin * static_cast<float>(mn);
          put16<true>(out, lo, 0, scale, min);
          put16<true>(out + 16, hi, 0, scale, min);
        }
      }
      return;
    }
    default: {
      // Q6_K block j of a superblock: low nibbles as Q4_1's; its 2-bit highs are bits s and s + 4
      // (s = 0 or 2) of 16 bytes of the chunk's 32 (repack_row's layout), minus 32; scale d·sc per
      // 16 elements.
      for (std::int64_t s = 0; s < nb / 8; ++s) {
        const std::uint8_t* base = row + static_cast<std::size_t>(s) * 210;
        const float d = half_at(base + quant::kQ6KD);
        const auto* sc = reinterpret_cast<const std::int8_t*>(base + quant::kQ6KScales);
        for (int j = 0; j < 8; ++j, out += 32) {
          const int c = j / 4, k = j % 4;
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + 16 * j));
          const __m128i h = _mm_srl_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                              base + quant::kQ6KHigh + 32 * c + 16 * (k % 2))),
                                          _mm_cvtsi32_si128(2 * (k / 2)));
          const __m128i three = _mm_set1_epi8(0x30);
          const __m128i lo =
              _mm_or_si128(_mm_and_si128(v, low4), _mm_and_si128(_mm_slli_epi16(h, 4), three));
          const __m128i hi =
              _mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(h, three));
          put16<false>(out, lo, 32, d * static_cast<float>(sc[2 * j]), 0.0f);
          put16<false>(out + 16, hi, 32, d * static_cast<float>(sc[2 * j + 1]), 0.0f);
        }
      }
    }
  }
}

KVCACHE_AVX512 void quantize_x_avx512(QuantFormat format, const float* x, std::int64_t rows,
                                      std::int64_t cols, QuantizedX& out) {
  const std::int64_t nb = cols / kQuantBlock;
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (std::int64_t r = 0; r < rows; ++r) {
    std::int8_t* q = out.q.data() + r * cols;
    for (std::int64_t b = 0; b < nb; ++b) {
      const float* v = x + r * cols + b * kQuantBlock;
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_and_ps(v0, sign_off), _mm512_and_ps(v1, sign_off)));
      // The same float operations as the portable quantize_x, rounded the same way (to nearest
      // even, the MXCSR default), so both give identical bytes.
      const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + x_index(format, b, 0, nb)),
                       _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + x_index(format, b, 16, nb)),
                       _mm512_cvtsepi32_epi8(q1));
      const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      out.d[static_cast<std::size_t>(r * nb + b)] = d;
      out.s[static_cast<std::size_t>(r * nb + b)] = d * static_cast<float>(sum);
    }
    if (format == QuantFormat::kQ8_0) {
      // −128 · (sum of each lane's four bytes): VPDPBUSD of 128s against the bytes, negated.
      const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
      std::int32_t* corr = out.corr.data() + r * (cols / 4);
      for (std::int64_t c = 0; c < cols; c += 64) {
        const std::int64_t n = std::min<std::int64_t>(64, cols - c);  // 64 or 32 bytes
        const __mmask64 m = ~0ULL >> (64 - n);
        const __m512i sums =
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, _mm512_maskz_loadu_epi8(m, q + c));
        _mm512_mask_storeu_epi32(corr + c / 4, static_cast<__mmask16>(0xFFFFu >> (16 - n / 4)),
                                 _mm512_sub_epi32(_mm512_setzero_si512(), sums));
      }
    }
  }
}

namespace {

// x rows [r0, r0 + rows) with rows ≤ 4, one kernel instance per count.
void gemv_group(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t r0, std::int64_t rows,
                std::int64_t o0, std::int64_t o1, const float* bias, float* y) {
  switch (rows) {
    case 1:
      return gemv_rows<1>(w, x, r0, o0, o1, bias, y);
    case 2:
      return gemv_rows<2>(w, x, r0, o0, o1, bias, y);
    case 3:
      return gemv_rows<3>(w, x, r0, o0, o1, bias, y);
    default:
      return gemv_rows<4>(w, x, r0, o0, o1, bias, y);
  }
}

}  // namespace

void gemv_avx512(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t o0, std::int64_t o1,
                 const float* bias, float* y) {
  if (x.rows <= 4) return gemv_group(w, x, 0, x.rows, o0, o1, bias, y);
  // More rows (a batch decoding together): a tile of weight rows is read from memory once and
  // then stays in L1/L2 while every group of four x rows passes over it.
  constexpr std::int64_t kTileRows = 16;
  for (std::int64_t t0 = o0; t0 < o1; t0 += kTileRows) {
    const std::int64_t t1 = std::min(o1, t0 + kTileRows);
    for (std::int64_t r0 = 0; r0 < x.rows; r0 += 4)
      gemv_group(w, x, r0, std::min<std::int64_t>(4, x.rows - r0), t0, t1, bias, y);
  }
}

}  // namespace kvcache::cpu::quant
