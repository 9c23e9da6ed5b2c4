// Private to the CPU backend: the pieces the quantized linear layers share — x quantized to int8
// per 32-element block in the order each format's kernels read it, and the kernel entry points
// (portable C++, AVX-512 VNNI, AMX-BF16) that src/quantized.cpp dispatches between.
#pragma once

#include <cstdint>
#include <vector>

#include "kvcache/backend/quantized.hpp"

namespace kvcache::cpu::quant {

// Element i (0..31) of block b of an x row sits at this index of the row's int8 q in a format's
// order. Q8_0 keeps x in order. Every other format (Q4_1, Q5_0, Q5_1 and the K-quants, whose
// payloads are all Q4_1-ordered nibbles) groups blocks by four: a group's first 16·n bytes hold its
// n blocks' elements 0..15 (block after block), the next 16·n their elements 16..31 — matching the
// low and high nibbles of the weights' 64 payload bytes, so one int32 lane of a dot product
// always sums four products of one block.
inline std::int64_t x_index(QuantFormat format, std::int64_t b, std::int64_t i, std::int64_t nb) {
  if (format == QuantFormat::kQ8_0) return b * kQuantBlock + i;
  const std::int64_t g = b / 4, in_group = std::min<std::int64_t>(4, nb - 4 * g);
  return g * 128 + (i < 16 ? 0 : 16 * in_group) + (b - 4 * g) * 16 + (i & 15);
}

// Lanes a 16-lane int32 dot product gives each block: four for the nibble formats (4 blocks per
// 64 payload bytes), Q8_0 eight (2 blocks per 64 bytes). Chunks of 64 payload bytes per row:
// ceil(nb / blocks).
inline std::int64_t blocks_per_chunk(QuantFormat format) {
  return format == QuantFormat::kQ8_0 ? 2 : 4;
}

// Rows of x quantized for one format's GEMV kernels (any count; the kernels take four at a time).
struct QuantizedX {
  QuantFormat format = QuantFormat::kQ8_0;
  std::int64_t rows = 0, cols = 0, nb = 0, chunks = 0;
  std::vector<std::int8_t> q;      // [rows, cols] in x_index order
  std::vector<float> d;            // [rows, nb] block scales: x ≈ d·q
  std::vector<float> s;            // [rows, nb] d·Σq (Q4_1's minimum term)
  std::vector<float> drep;         // [rows, chunks, 16] d of each lane's block
  std::vector<std::int32_t> corr;  // [rows, cols/4] −128·(sum of each lane's 4 q) (Q8_0's offset)
  std::vector<float> s16;          // [rows, 2·nb] d·Σq per 16 elements (Q6_K's offset term)

  const std::int8_t* q_row(std::int64_t r) const { return q.data() + r * cols; }
  const float* d_row(std::int64_t r) const { return d.data() + r * nb; }
  const float* s_row(std::int64_t r) const { return s.data() + r * nb; }
  const float* drep_row(std::int64_t r) const { return drep.data() + r * chunks * 16; }
  const std::int32_t* corr_row(std::int64_t r) const { return corr.data() + r * (cols / 4); }
  const float* s16_row(std::int64_t r) const { return s16.data() + r * 2 * nb; }
};

// Block b of a repacked 5-bit or K-format row: weight i = scale[i / 16]·q[i] (− min when
// has_min), q with any offset (16, 32) already removed; the float32 operations ggml's dequantizer
// does. (quantized.cpp.)
void unpack_block(QuantFormat f, const std::uint8_t* row, std::int64_t nb, std::int64_t b,
                  int (&q)[32], float (&scale)[2], float& min, bool& has_min);

// Quantizes x [rows, cols] (row-major float32) for `format`: d = amax/127 per block, q =
// round-to-nearest-even(x/d) (all zero when amax is 0).
void quantize_x(QuantFormat format, const float* x, std::int64_t rows, std::int64_t cols,
                QuantizedX& out);

// quantize_x's q, d, s and corr from AVX-512, the same bytes as its portable loop (sizes already
// set, and drep filled afterwards, by quantize_x, which calls it).
void quantize_x_avx512(QuantFormat format, const float* x, std::int64_t rows, std::int64_t cols,
                       QuantizedX& out);

// One repacked row of nb blocks (any format) dequantized to out[0, 32·nb): the same floats as
// QuantizedMatrix::dequantize_rows' portable loop (ggml's, bit for bit), AVX-512.
void dequantize_row_avx512(QuantFormat f, const std::uint8_t* row, std::int64_t nb, float* out);

// y[r, o] = Σ_blocks (weight row o's block · x row r's block) + bias[o] for o in [o0, o1), every
// x row of `x`; y is [x.rows, out] row-major. Portable and AVX-512 VNNI versions compute the same
// integers and differ only in float32 summation order.
void gemv_portable(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t o0, std::int64_t o1,
                   const float* bias, float* y);
void gemv_avx512(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t o0, std::int64_t o1,
                 const float* bias, float* y);

// y = x · Wᵀ (+ bias) for many rows on the AMX tile unit: weights dequantized and rounded to
// bfloat16 a panel at a time, x rounded to bfloat16, float32 accumulation. x [m, w.cols()]
// row-major float32, y [m, w.rows()]. Uses every OpenMP thread; call only when
// active_cpu_isa() == kAmx.
void linear_amx(const float* x, std::int64_t m, const QuantizedMatrix& w, const float* bias,
                float* y);

// Sets up the calling process for AMX (the kernel's tile-data permission); false when refused.
bool enable_amx();

}  // namespace kvcache::cpu::quant

namespace kvcache::cpu::quant {

// Byte offsets inside a repacked row or superblock (quantized.hpp describes the layouts), shared
// by the repacking, the dequantizer and both kernels.
//   Q5_0 / Q5_1 row of nb blocks: nibbles at 0 (16 per block), fifth bits at 16·nb (group g of
//   n ≤ 4 blocks at 16·nb + 16·g: n low halves of qh, then n high halves, 2 bytes each), d at
//   20·nb, m (Q5_1) at 22·nb.
//   Q4_K superblock (144 bytes): d 0, dmin 2, packed scales 4, nibbles 16 (16 per sub-block).
//   Q5_K (176): d 0, dmin 2, packed scales 4, fifth bits 16 (two groups of 4 sub-blocks: 8 bytes
//   of low halves, 8 of high halves), nibbles 48.
//   Q6_K (210): nibbles 0, 2-bit highs 128 (32 bytes per 128-weight chunk), int8 scales 192, d 208.
constexpr std::int64_t kQ5Qh = 16, kQ5D = 20, kQ5M = 22;
constexpr std::int64_t kQ4KNib = 16, kQ5KQh = 16, kQ5KNib = 48;
constexpr std::int64_t kQ6KHigh = 128, kQ6KScales = 192, kQ6KD = 208;

inline bool is_k_quant(QuantFormat f) {
  return f == QuantFormat::kQ4_K || f == QuantFormat::kQ5_K || f == QuantFormat::kQ6_K;
}

}  // namespace kvcache::cpu::quant
