// AMX-BF16 prefill kernel for quantized weights: y = x · Wᵀ (+ bias) for many rows of x.
//
// TDPBF16PS multiplies a 16×32 bfloat16 A tile by a 32×16 B tile held as 16 rows of bfloat16
// pairs (row r, column n: two k of weight row n) into a 16×16 float32 C tile. A is x rounded to
// bfloat16 (to nearest even) and packed so each A tile is 1 KB contiguous. B is a panel of 32
// weight rows (output columns) dequantized exactly (d·q + m in float32, as dequantize_rows) and
// rounded to bfloat16 straight into that pair layout: the 16 rows' payload bytes are regrouped so
// a register's lanes are (row, pair element), and each B tile row is then one shift, one
// conversion and one FMA per 8 rows, then one VCVTNE2PS2BF16 (see PanelDequant). That needs the
// k inside each 32-element block in an order of the payload's choosing, which x is converted in
// too (a dot product does not care). Each 32×32 block of y is four C tiles (2×2: two A and two B
// tiles per k step, all eight tiles in use) that start from the bias and are stored into y.
// Elements of x below float32's normal range (|x| < 2⁻¹²⁶) count as zero: VCVTNE2PS2BF16 flushes
// them (as TDPBF16PS would). Dequantized weights never are: they are multiples of 2⁻²⁴ or zero.
//
// Each thread owns a rectangle of y, a range of 32-row blocks × a range of panels, and converts
// its own rows of x and dequantizes its own panels: handing written buffers between cores was
// measured slower on Sapphire Rapids than doing the work twice (threads that split N convert
// every row, threads that split M dequantize every panel; choose_split weighs the two). A thread
// sweeps each of its panels over all of its rows. The next panel is dequantized, and during the
// first panel the next rows of x converted, a slice per k step between the tile instructions, so
// that part of that vector work overlaps the tile unit's. Rows past m are zeros in A; C tiles
// that reach past m or N go through a scratch tile. Rows come in chunks of at most 256 so a
// thread's A stays in L2, each chunk split afresh.
//
// Compiled for AMX and AVX-512 with target attributes whatever the build's -march, and only
// called when detection found AMX with the OS's permission (quantized.cpp).
#if defined(__GNUC__) && !defined(__clang__)
// g++ 12: _mm512_undefined_* in intrinsics (-Wuninitialized where -march lacks AVX-512).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "quant_kernels.hpp"

#define KVCACHE_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

namespace kvcache::cpu::quant {

bool enable_amx() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
  if (!tile || !bf16) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

namespace {

constexpr std::int64_t kTile = 16;  // rows of a tile; float32 columns of a C tile
constexpr std::int64_t kStep = 32;  // k per tile product (= kQuantBlock: one block per B tile)
constexpr std::int64_t kTileDwords = kTile * kTile;  // one B tile: 16 rows of 16 bf16 pairs

// Palette 1, all eight tiles 16 rows × 64 bytes. A constant in memory: g++'s _tile_loadconfig
// tells the compiler it reads only 8 bytes, so a local config could be half written.
struct alignas(64) TileConfig {
  std::uint8_t palette_id;
  std::uint8_t start_row;
  std::uint8_t reserved[14];
  std::uint16_t colsb[16];
  std::uint8_t rows[16];
};
constexpr TileConfig kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// A 64-byte line, so std::vector hands out buffers aligned for tile and vector loads.
struct alignas(64) Line {
  std::byte bytes[64];
};

template <class T>
T* line_ptr(Line* lines, std::size_t line) {
  return reinterpret_cast<T*>(lines + line);
}

std::size_t lines_for(std::size_t bytes) { return (bytes + 63) / 64; }

// The tile macros are asm statements that do not tell the compiler they read memory; this keeps
// the vector stores that fill a buffer before the tile loads that read it.
inline void compiler_barrier() { __asm__ volatile("" ::: "memory"); }

// ---- the k order inside a block ----------------------------------------------------------------

// TDPBF16PS multiplies word w of an A tile row by element w % 2 of the pairs in B tile row w / 2.
// Which of a block's 32 k sits at word w is free as long as A and B agree, so it is the order that
// makes the weights cheap to lay out (see PanelDequant). Word w = 2r + j holds element order.w[w]:
//   Q4_1, r = 8h + s: the nibble s % 2 of payload byte 8h + 4j + s/2 (low nibble: element = the
//         byte's index; high nibble: index + 16);
//   Q8_0, r = 4c + s: payload byte 8c + 4j + s (the element itself).
struct KOrder {
  std::uint16_t w[32];
};

constexpr KOrder make_order(QuantFormat f) {
  KOrder o{};
  for (int r = 0; r < 16; ++r) {
    for (int j = 0; j < 2; ++j) {
      const int q41 = 8 * (r / 8) + 4 * j + (r % 8) / 2 + 16 * (r % 2);
      const int q80 = 8 * (r / 4) + 4 * j + r % 4;
      o.w[2 * r + j] = static_cast<std::uint16_t>(f == QuantFormat::kQ4_1 ? q41 : q80);
    }
  }
  return o;
}

alignas(64) constexpr KOrder kOrderQ4_1 = make_order(QuantFormat::kQ4_1);
alignas(64) constexpr KOrder kOrderQ8_0 = make_order(QuantFormat::kQ8_0);

// ---- x to bfloat16 ---------------------------------------------------------------------------

// Packed A: row tile i, block b is 16 rows × 32 bfloat16 contiguous at a + (i·nb + b)·512.
constexpr std::int64_t kTileElems = kTile * kStep;

// Row r of x [m, k] (zeros when r ≥ m) rounded to bfloat16 (to nearest even), each block's
// elements in `order`, into row `local` of packed A.
KVCACHE_AMX void convert_row(const float* x, std::int64_t m, std::int64_t nb, const KOrder& order,
                             std::int64_t r, std::int64_t local, std::uint16_t* a) {
  std::uint16_t* out = a + local / kTile * nb * kTileElems + local % kTile * kStep;
  if (r >= m) {
    for (std::int64_t b = 0; b < nb; ++b)
      _mm512_store_si512(out + b * kTileElems, _mm512_setzero_si512());
    return;
  }
  const __m512i perm = _mm512_load_si512(order.w);
  const float* in = x + r * nb * kStep;
  for (std::int64_t b = 0; b < nb; ++b) {
    const __m512bh v =
        _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + b * kStep + 16), _mm512_loadu_ps(in + b * kStep));
    _mm512_store_si512(out + b * kTileElems,
                       _mm512_permutexvar_epi16(perm, reinterpret_cast<__m512i>(v)));
  }
}

// ---- weights to B tiles ----------------------------------------------------------------------

// The 16×16 matrix of dwords in r transposed in place (r[j] ends up holding column j).
KVCACHE_AMX inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4g + c], 128-bit lane L: column 4L + c of rows 4g..4g+3.
  __m512i u[16];
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  // A 4×4 transpose of 128-bit lanes among u[c], u[4 + c], u[8 + c], u[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

KVCACHE_AMX inline __m128i load16(const std::uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// A B tile row: rows 0..7's pairs from lo, rows 8..15's from hi, rounded to bfloat16.
KVCACHE_AMX inline void store_tile_row(std::uint32_t* out, __m512 lo, __m512 hi) {
  _mm512_store_si512(out, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

// One panel (up to 32 weight rows from `rows`) dequantized into B tiles, one job (a column tile's
// block) at a time, so the work can be interleaved with the tile products of the previous panel;
// jobs run in order. Block b of column tile t lands at dst + (2b + t)·256 dwords; rows past the
// panel are zeros.
//
// The work is done already transposed: 16 lanes of a float32 register are (weight row n, pair
// element j) for 8 rows, and two such registers rounded by one VCVTNE2PS2BF16 are a whole B tile
// row. The payload bytes of the 16 rows are first regrouped so that lane (n, j) holds 4 bytes of
// row n (8 bytes per row and register, two XMM loads per 128-bit lane); each tile row then takes
// one shift to bring its nibble or byte to the bottom of every lane, a conversion (VPERMPS from
// 0..15 for a nibble, a sign-extending shift and VCVTDQ2PS for a byte), and one FMA (or multiply)
// by per-lane scale registers — the k order above is what makes one shift per row enough.
template <QuantFormat F>
struct PanelDequant {
  static constexpr std::int64_t kPayload = F == QuantFormat::kQ4_1 ? 16 : 32;
  const std::uint8_t* rows;
  std::size_t row_bytes;
  std::int64_t cols, nb;
  float* scales;  // scratch: the column tile's d then m transposed, [nb rounded up to 16][16] each
  std::uint32_t* dst;

  std::int64_t jobs() const { return (cols + kTile - 1) / kTile * nb; }

  // d (and m) of blocks [b, b + 16) of the 16 rows, as one register of the 16 rows per block.
  KVCACHE_AMX void transpose_scales(const std::uint8_t* first, std::int64_t nn,
                                    std::int64_t b) const {
    const std::int64_t count = std::min<std::int64_t>(16, nb - b), padded = (nb + 15) / 16 * 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    for (int which = 0; which < (F == QuantFormat::kQ4_1 ? 2 : 1); ++which) {
      __m512i v[16];
      for (std::int64_t n = 0; n < kTile; ++n) {
        const std::uint8_t* half = first + n * row_bytes + nb * (kPayload + 2 * which) + 2 * b;
        v[n] = n < nn ? _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, half)))
                      : _mm512_setzero_si512();
      }
      transpose16(v);
      float* out = scales + which * padded * kTile + b * kTile;
      for (std::int64_t i = 0; i < count; ++i) _mm512_store_si512(out + i * kTile, v[i]);
    }
  }

  KVCACHE_AMX void run(std::int64_t job) const {
    const std::int64_t t = job / nb, b = job % nb, nn = std::min(kTile, cols - t * kTile);
    const std::uint8_t* first = rows + static_cast<std::size_t>(t * kTile) * row_bytes;
    if (b % 16 == 0) transpose_scales(first, nn, b);
    // Per-lane scales: lane (n, j) of the low register is row n's, of the high one row 8 + n's.
    const __m512i pair_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i pair_hi =
        _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    const std::int64_t padded = (nb + 15) / 16 * 16;
    const __m512 d = _mm512_load_ps(scales + b * kTile);
    const __m512 d_lo = _mm512_permutexvar_ps(pair_lo, d), d_hi = _mm512_permutexvar_ps(pair_hi, d);
    // Payload regrouped: g[h][p] (h: rows 0..7 or 8..15), 64-bit lane n = bytes 8p..8p+7 of the
    // row's block. Rows past the panel repeat its last row; their scales are zero.
    constexpr int kParts = static_cast<int>(kPayload / 8);
    __m512i g[2][kParts];
    for (int h = 0; h < 2; ++h) {
      const std::uint8_t* r[8];
      for (int n = 0; n < 8; ++n)
        r[n] = first + std::min<std::int64_t>(8 * h + n, nn - 1) * row_bytes + b * kPayload;
      for (int p = 0; p < kParts; p += 2) {
        __m512i even = _mm512_castsi128_si512(load16(r[0] + 8 * p)),
                odd = _mm512_castsi128_si512(load16(r[1] + 8 * p));
        even = _mm512_inserti32x4(even, load16(r[2] + 8 * p), 1);
        odd = _mm512_inserti32x4(odd, load16(r[3] + 8 * p), 1);
        even = _mm512_inserti32x4(even, load16(r[4] + 8 * p), 2);
        odd = _mm512_inserti32x4(odd, load16(r[5] + 8 * p), 2);
        even = _mm512_inserti32x4(even, load16(r[6] + 8 * p), 3);
        odd = _mm512_inserti32x4(odd, load16(r[7] + 8 * p), 3);
        g[h][p] = _mm512_unpacklo_epi64(even, odd);
        g[h][p + 1] = _mm512_unpackhi_epi64(even, odd);
      }
    }
    std::uint32_t* out = dst + (2 * b + t) * kTileDwords;
    if constexpr (F == QuantFormat::kQ4_1) {
      const __m512 m = _mm512_load_ps(scales + padded * kTile + b * kTile);
      const __m512 m_lo = _mm512_permutexvar_ps(pair_lo, m),
                   m_hi = _mm512_permutexvar_ps(pair_hi, m);
      const __m512 nibble = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (int h = 0; h < 2; ++h) {
        for (int s = 0; s < 8; ++s) {
          // VPERMPS reads only the low 4 bits of each index: float(nibble s) in one instruction.
          const __m512 q0 = _mm512_permutexvar_ps(_mm512_srli_epi32(g[0][h], 4 * s), nibble);
          const __m512 q1 = _mm512_permutexvar_ps(_mm512_srli_epi32(g[1][h], 4 * s), nibble);
          store_tile_row(out + (8 * h + s) * kTile, _mm512_fmadd_ps(q0, d_lo, m_lo),
                         _mm512_fmadd_ps(q1, d_hi, m_hi));
        }
      }
    } else {
      const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // q + 128 back to int8
      for (int c = 0; c < 4; ++c) {
        const __m512i v0 = _mm512_xor_si512(g[0][c], flip), v1 = _mm512_xor_si512(g[1][c], flip);
        for (int s = 0; s < 4; ++s) {
          const __m512i q0 = _mm512_srai_epi32(_mm512_slli_epi32(v0, 24 - 8 * s), 24);
          const __m512i q1 = _mm512_srai_epi32(_mm512_slli_epi32(v1, 24 - 8 * s), 24);
          store_tile_row(out + (4 * c + s) * kTile, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d_lo),
                         _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d_hi));
        }
      }
    }
  }
};

// ---- the tile loop ---------------------------------------------------------------------------

struct Problem {
  const float* x;
  std::int64_t m, n, nb;  // rows of x, rows of W, blocks per row
  const float* bias;      // padded to whole panels, or null
  float* y;
};

void store_edge(const float* edge, const Problem& p, std::int64_t r0, std::int64_t c0) {
  const std::int64_t rows = std::min(kTile, p.m - r0), cols = std::min(kTile, p.n - c0);
  for (std::int64_t r = 0; r < rows; ++r)
    std::memcpy(p.y + (r0 + r) * p.n + c0, edge + r * kTile, static_cast<std::size_t>(cols) * 4);
}

// C tile stored into y at (r0, c0): straight when it fits, else through `edge`.
#define KVCACHE_STORE_C(tile, r0, c0)                     \
  do {                                                    \
    if ((r0) + kTile <= p.m && (c0) + kTile <= p.n) {     \
      _tile_stored(tile, p.y + (r0)*p.n + (c0), p.n * 4); \
    } else {                                              \
      _tile_stored(tile, edge, kTile * 4);                \
      store_edge(edge, p, r0, c0);                        \
    }                                                     \
  } while (false)

// y rows [r0, r0 + 16·MR) × columns [c0, c0 + 16·NR): A tiles from `a` (the first row tile's
// block 0, the second row tile nb tiles on), B tiles from the panel (block b's pair at
// panel + b·512 dwords). Tiles: C 0..3, A 4..5, B 6..7. `step` runs after each k step's tile
// instructions are issued: vector work there overlaps the tile unit's.
template <int MR, int NR, class Step>
KVCACHE_AMX void tile_block(const Problem& p, const std::uint16_t* a, std::int64_t r0,
                            std::int64_t c0, const std::uint32_t* panel, float* edge, Step&& step) {
  compiler_barrier();  // the A rows and B tiles written before are in memory
  if (p.bias) {
    _tile_loadd(0, p.bias + c0, 0);  // stride 0: every row of C starts as the bias
    if constexpr (NR == 2) _tile_loadd(1, p.bias + c0 + kTile, 0);
    if constexpr (MR == 2) _tile_loadd(2, p.bias + c0, 0);
    if constexpr (MR == 2 && NR == 2) _tile_loadd(3, p.bias + c0 + kTile, 0);
  } else {
    _tile_zero(0);
    if constexpr (NR == 2) _tile_zero(1);
    if constexpr (MR == 2) _tile_zero(2);
    if constexpr (MR == 2 && NR == 2) _tile_zero(3);
  }
  const std::uint16_t* a1 = a + p.nb * kTileElems;
  for (std::int64_t b = 0; b < p.nb; ++b) {
    const std::uint32_t* bt = panel + b * 2 * kTileDwords;
    _tile_loadd(4, a + b * kTileElems, 64);
    _tile_loadd(6, bt, 64);
    if constexpr (NR == 2) _tile_loadd(7, bt + kTileDwords, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NR == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MR == 2) {
      _tile_loadd(5, a1 + b * kTileElems, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NR == 2) _tile_dpbf16ps(3, 5, 7);
    }
    step();
  }
  KVCACHE_STORE_C(0, r0, c0);
  if constexpr (NR == 2) KVCACHE_STORE_C(1, r0, c0 + kTile);
  if constexpr (MR == 2) KVCACHE_STORE_C(2, r0 + kTile, c0);
  if constexpr (MR == 2 && NR == 2) KVCACHE_STORE_C(3, r0 + kTile, c0 + kTile);
}

#undef KVCACHE_STORE_C

// Per-thread scratch: its rows of x as packed A, two panels of B tiles (the one in use, the next
// being dequantized), the scales of a column tile's rows, one C tile for edges.
struct ThreadScratch {
  std::uint16_t* a;
  std::uint32_t* panel[2];
  float* scales;
  float* edge;
};

// One thread's rectangle of y: rows [r0, r1) (r0 a multiple of 32, r1 of 16) × panels [p0, p1).
template <QuantFormat F>
KVCACHE_AMX void run_rectangle(const Problem& p, const std::uint8_t* w0, std::size_t row_bytes,
                               std::int64_t r0, std::int64_t r1, std::int64_t p0, std::int64_t p1,
                               const ThreadScratch& s) {
  const std::int64_t rows = r1 - r0, blocks = (rows + 2 * kTile - 1) / (2 * kTile);
  const KOrder& order = F == QuantFormat::kQ4_1 ? kOrderQ4_1 : kOrderQ8_0;
  auto convert = [&](std::int64_t local) {
    convert_row(p.x, p.m, p.nb, order, r0 + local, local, s.a);
  };
  auto dequant = [&](std::int64_t panel) {
    const std::int64_t c0 = panel * 2 * kTile;
    return PanelDequant<F>{w0 + static_cast<std::size_t>(c0) * row_bytes,
                           row_bytes,
                           std::min(2 * kTile, p.n - c0),
                           p.nb,
                           s.scales,
                           s.panel[(panel - p0) & 1]};
  };
  // The first row block and the first panel up front; the rest overlaps tile work.
  for (std::int64_t r = 0; r < std::min(2 * kTile, rows); ++r) convert(r);
  {
    const PanelDequant<F> first = dequant(p0);
    for (std::int64_t j = 0; j < first.jobs(); ++j) first.run(j);
  }
  for (std::int64_t panel = p0; panel < p1; ++panel) {
    const std::uint32_t* b = s.panel[(panel - p0) & 1];
    const std::int64_t c0 = panel * 2 * kTile;
    const bool two_cols = p.n - c0 > kTile;
    // The next panel's dequantization, spread evenly over this panel's k steps.
    const PanelDequant<F> next = panel + 1 < p1 ? dequant(panel + 1) : PanelDequant<F>{};
    const std::int64_t jobs = panel + 1 < p1 ? next.jobs() : 0, steps = blocks * p.nb;
    std::int64_t step = 0, done = 0;
    for (std::int64_t i = 0; i < blocks; ++i) {
      // During the first panel: the next row block's rows of x, spread over this block's steps.
      const std::int64_t next_row = (i + 1) * 2 * kTile;
      const std::int64_t to_convert =
          panel == p0 ? std::clamp<std::int64_t>(rows - next_row, 0, 2 * kTile) : 0;
      std::int64_t block_step = 0, converted = 0;
      auto work = [&] {
        for (const std::int64_t due = ++step * jobs / steps; done < due; ++done) next.run(done);
        if (to_convert == 0) return;
        for (const std::int64_t due = ++block_step * to_convert / p.nb; converted < due;
             ++converted)
          convert(next_row + converted);
      };
      const std::uint16_t* a = s.a + i * 2 * p.nb * kTileElems;
      const std::int64_t y0 = r0 + i * 2 * kTile;
      if (i * 2 * kTile + kTile < rows) {
        if (two_cols) {
          tile_block<2, 2>(p, a, y0, c0, b, s.edge, work);
        } else {
          tile_block<2, 1>(p, a, y0, c0, b, s.edge, work);
        }
      } else if (two_cols) {
        tile_block<1, 2>(p, a, y0, c0, b, s.edge, work);
      } else {
        tile_block<1, 1>(p, a, y0, c0, b, s.edge, work);
      }
    }
  }
}

KVCACHE_AMX void load_tile_config() { _tile_loadconfig(&kTileConfig); }
KVCACHE_AMX void release_tiles() { _tile_release(); }

// Threads as a grid: `tm` groups of row blocks × `tn` groups of panels (tm·tn = threads).
struct Split {
  std::int64_t tm, tn;
};

// The grid that gives the busiest thread the fewest 32×32 units of tile work; between equals, the
// one with the least conversion and dequantization per thread, converting a row of x counted as
// three rows of weights dequantized (as measured at m = 256: the conversion waits on x's loads,
// the dequantization is arithmetic that partly overlaps the tile unit). At 256 rows on 2 threads
// SmolLM2's q, k, v, o and down projections split M, gate and up split N.
Split choose_split(std::int64_t threads, std::int64_t rows, std::int64_t n) {
  const auto ceil_div = [](std::int64_t a, std::int64_t b) { return (a + b - 1) / b; };
  const std::int64_t blocks = ceil_div(rows, 2 * kTile), panels = ceil_div(n, 2 * kTile);
  Split best{1, threads};
  std::int64_t best_units = -1, best_extra = 0;
  for (std::int64_t tm = 1; tm <= threads; ++tm) {
    if (threads % tm != 0) continue;
    const std::int64_t tn = threads / tm;
    const std::int64_t units = ceil_div(blocks, tm) * ceil_div(panels, tn);
    const std::int64_t extra = 3 * ceil_div(blocks, tm) + ceil_div(panels, tn);
    if (best_units < 0 || units < best_units || (units == best_units && extra < best_extra)) {
      best = {tm, tn};
      best_units = units;
      best_extra = extra;
    }
  }
  return best;
}

// Rows per chunk: at most 256, as even as whole 32-row blocks allow.
std::int64_t chunk_rows(std::int64_t m) {
  constexpr std::int64_t kMaxRows = 256;
  const std::int64_t chunks = (m + kMaxRows - 1) / kMaxRows;
  return ((m + chunks - 1) / chunks + 2 * kTile - 1) / (2 * kTile) * (2 * kTile);
}

}  // namespace

void linear_amx(const float* x, std::int64_t m, const QuantizedMatrix& w, const float* bias,
                float* y) {
  const std::int64_t n = w.rows(), nb = w.blocks_per_row();
  const std::int64_t mp = (m + kTile - 1) / kTile * kTile;  // rows of A: whole tiles
  const std::int64_t panels = (n + 2 * kTile - 1) / (2 * kTile);
  const std::int64_t per_chunk = chunk_rows(m);
  const int max_threads = omp_get_max_threads();

  // All scratch is allocated here, outside the parallel region, and kept for the next call.
  const std::size_t bias_lines =
      bias ? lines_for(static_cast<std::size_t>(panels * 2 * kTile) * 4) : 0;
  const std::size_t a_lines = lines_for(static_cast<std::size_t>(per_chunk * nb * kStep) * 2);
  const std::size_t panel_lines = lines_for(static_cast<std::size_t>(nb * 2 * kTileDwords) * 4);
  const std::size_t scale_lines =
      lines_for(static_cast<std::size_t>(2 * ((nb + 15) / 16 * 16) * kTile) * 4);
  const std::size_t edge_lines = lines_for(kTile * kTile * 4);
  const std::size_t thread_lines = a_lines + 2 * panel_lines + scale_lines + edge_lines;
  thread_local std::vector<Line> scratch;
  const std::size_t total = bias_lines + thread_lines * static_cast<std::size_t>(max_threads);
  if (scratch.size() < total) scratch.resize(total);
  Line* const buf = scratch.data();  // the caller's thread_local: the team sees it by pointer

  float* bias_pad = nullptr;
  if (bias) {
    bias_pad = line_ptr<float>(buf, 0);
    std::memcpy(bias_pad, bias, static_cast<std::size_t>(n) * 4);
    std::fill(bias_pad + n, bias_pad + panels * 2 * kTile, 0.0f);
  }
  const Problem p{x, m, n, nb, bias_pad, y};
  const std::uint8_t* w0 = w.row(0);
  const std::size_t row_bytes = w.row_bytes();
  const bool q41 = w.format() == QuantFormat::kQ4_1;

#pragma omp parallel num_threads(max_threads)
  {
    const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    Line* const mine = buf + bias_lines + thread_lines * static_cast<std::size_t>(t);
    const ThreadScratch s{line_ptr<std::uint16_t>(mine, 0),
                          {line_ptr<std::uint32_t>(mine, a_lines),
                           line_ptr<std::uint32_t>(mine, a_lines + panel_lines)},
                          line_ptr<float>(mine, a_lines + 2 * panel_lines),
                          line_ptr<float>(mine, a_lines + 2 * panel_lines + scale_lines)};
    bool configured = false;
    for (std::int64_t c0 = 0; c0 < mp; c0 += per_chunk) {
      const std::int64_t c1 = std::min(mp, c0 + per_chunk);
      const Split split = choose_split(threads, c1 - c0, n);
      const std::int64_t tm = t / split.tn, tn = t % split.tn;
      const std::int64_t blocks = (c1 - c0 + 2 * kTile - 1) / (2 * kTile);
      const std::int64_t r0 = c0 + blocks * tm / split.tm * 2 * kTile;
      const std::int64_t r1 = std::min(c1, c0 + blocks * (tm + 1) / split.tm * 2 * kTile);
      const std::int64_t p0 = panels * tn / split.tn, p1 = panels * (tn + 1) / split.tn;
      if (r0 >= r1 || p0 >= p1) continue;
      if (!configured) load_tile_config();
      configured = true;
      if (q41) {
        run_rectangle<QuantFormat::kQ4_1>(p, w0, row_bytes, r0, r1, p0, p1, s);
      } else {
        run_rectangle<QuantFormat::kQ8_0>(p, w0, row_bytes, r0, r1, p0, p1, s);
      }
    }
    if (configured) release_tiles();
  }
}

}  // namespace kvcache::cpu::quant
