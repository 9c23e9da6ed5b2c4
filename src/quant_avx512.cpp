// AVX-512 VNNI matrix-vector kernels over quantized weights (decode). Each 64-byte load of weight
// payload meets the matching int8 x bytes in VPDPBUSD (unsigned weight bytes × signed x bytes,
// four products summed per int32 lane); every lane belongs to one block, so one float32 multiply
// by (weight scale × x scale) per lane finishes the blocks, and the lanes are summed once per row.
//   Q4_1: 64 payload bytes = 4 blocks; low nibbles meet the x bytes of elements 0..15, high
//         nibbles those of 16..31 (quantize_x lays x out that way); the minimum adds m·d_x·Σq_x.
//   Q8_0: 64 payload bytes = 2 blocks of q + 128; the accumulator starts at −128·Σ(x bytes) per
//         lane, which removes the offset exactly.
// Compiled for AVX-512 with target attributes whatever the build's -march, and only called when
// the CPU has it (quantized.cpp checks).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // g++ 12: _mm512_undefined_* in intrinsics
#endif
#include <immintrin.h>

#include <cstdint>

#include "quant_kernels.hpp"

#define KVCACHE_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

namespace kvcache::cpu::quant {
namespace {

// Bytes ahead of the row being read that are prefetched, so enough DRAM requests are in flight
// while each thread walks its contiguous share of rows.
constexpr std::int64_t kPrefetchBytes = 2048;

KVCACHE_AVX512 inline void prefetch_ahead(const std::uint8_t* row, std::size_t bytes) {
  for (std::size_t c = 0; c < bytes; c += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchBytes + c), _MM_HINT_T0);
}

template <int R>
KVCACHE_AVX512 void gemv_q4_1(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t o0,
                              std::int64_t o1, const float* bias, float* y) {
  const std::int64_t nb = w.blocks_per_row(), out = w.rows();
  const std::int64_t full = nb / 4, tail = nb % 4;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __mmask64 tail_bytes = tail ? (~0ULL >> (64 - 16 * tail)) : 0;
  const __mmask8 tail_halves = static_cast<__mmask8>((1u << tail) - 1);
  if (o0 >= o1) return;
  const std::uint8_t* first = w.row(o0);
  for (std::int64_t o = o0; o < o1; ++o) {
    const std::uint8_t* p = first + static_cast<std::size_t>(o - o0) * w.row_bytes();
    const std::uint8_t* dw = p + nb * 16;
    const std::uint8_t* mw = dw + nb * 2;
    prefetch_ahead(p, w.row_bytes());
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    auto group = [&](std::int64_t g, __m512i v, __m128i d4, std::int64_t hi_offset, __mmask64 m) {
      const __m512i lo = _mm512_and_si512(v, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m512 dscale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(d4)));
      for (int r = 0; r < R; ++r) {
        const std::int8_t* xq = x.q_row(r) + g * 128;
        const __m512i xlo = _mm512_maskz_loadu_epi8(m, xq);
        const __m512i xhi = _mm512_maskz_loadu_epi8(m, xq + hi_offset);
        const __m512i dot =
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
        const __m512 scale = _mm512_mul_ps(dscale, _mm512_loadu_ps(x.drep_row(r) + g * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      }
    };
    for (std::int64_t g = 0; g < full; ++g) {
      group(g, _mm512_loadu_si512(p + g * 64), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(dw + g * 8)),
            64, ~0ULL);
    }
    if (tail) {
      group(full, _mm512_maskz_loadu_epi8(tail_bytes, p + full * 64),
            _mm_maskz_loadu_epi16(tail_halves, dw + full * 8), 16 * tail, tail_bytes);
    }
    // The minimums: Σ_b m_b · (d_x · Σq_x)_b, sixteen blocks at a time.
    for (int r = 0; r < R; ++r) {
      __m512 macc = _mm512_setzero_ps();
      for (std::int64_t b = 0; b < nb; b += 16) {
        const __mmask16 m = nb - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nb - b)) - 1);
        const __m512 mins = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, mw + b * 2));
        macc = _mm512_fmadd_ps(mins, _mm512_maskz_loadu_ps(m, x.s_row(r) + b), macc);
      }
      y[r * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], macc)) + (bias ? bias[o] : 0.0f);
    }
  }
}

template <int R>
KVCACHE_AVX512 void gemv_q8_0(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t o0,
                              std::int64_t o1, const float* bias, float* y) {
  const std::int64_t nb = w.blocks_per_row(), out = w.rows();
  const std::int64_t full = nb / 2;
  const bool odd = nb % 2 != 0;
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  if (o0 >= o1) return;
  const std::uint8_t* first = w.row(o0);
  for (std::int64_t o = o0; o < o1; ++o) {
    const std::uint8_t* p = first + static_cast<std::size_t>(o - o0) * w.row_bytes();
    const std::uint8_t* dw = p + nb * 32;
    prefetch_ahead(p, w.row_bytes());
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    auto chunk = [&](std::int64_t c, __m512i v, __m128i d2, __mmask64 m, __mmask16 lanes) {
      const __m512 dscale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(d2)));
      for (int r = 0; r < R; ++r) {
        const __m512i start = _mm512_maskz_loadu_epi32(lanes, x.corr_row(r) + c * 16);
        const __m512i dot =
            _mm512_dpbusd_epi32(start, v, _mm512_maskz_loadu_epi8(m, x.q_row(r) + c * 64));
        const __m512 scale = _mm512_mul_ps(dscale, _mm512_loadu_ps(x.drep_row(r) + c * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
      }
    };
    for (std::int64_t c = 0; c < full; ++c) {
      std::uint32_t d2;
      __builtin_memcpy(&d2, dw + c * 4, 4);
      chunk(c, _mm512_loadu_si512(p + c * 64), _mm_cvtsi32_si128(static_cast<int>(d2)), ~0ULL,
            0xFFFF);
    }
    if (odd) {
      std::uint16_t d1;
      __builtin_memcpy(&d1, dw + full * 4, 2);
      chunk(full, _mm512_maskz_loadu_epi8(0xFFFFFFFFULL, p + full * 64), _mm_cvtsi32_si128(d1),
            0xFFFFFFFFULL, 0x00FF);
    }
    for (int r = 0; r < R; ++r)
      y[r * out + o] = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[o] : 0.0f);
  }
}

}  // namespace

void gemv_avx512(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t o0, std::int64_t o1,
                 const float* bias, float* y) {
  const bool q41 = w.format() == QuantFormat::kQ4_1;
  switch (x.rows) {
    case 1:
      return q41 ? gemv_q4_1<1>(w, x, o0, o1, bias, y) : gemv_q8_0<1>(w, x, o0, o1, bias, y);
    case 2:
      return q41 ? gemv_q4_1<2>(w, x, o0, o1, bias, y) : gemv_q8_0<2>(w, x, o0, o1, bias, y);
    case 3:
      return q41 ? gemv_q4_1<3>(w, x, o0, o1, bias, y) : gemv_q8_0<3>(w, x, o0, o1, bias, y);
    default:
      return q41 ? gemv_q4_1<4>(w, x, o0, o1, bias, y) : gemv_q8_0<4>(w, x, o0, o1, bias, y);
  }
}

}  // namespace kvcache::cpu::quant
