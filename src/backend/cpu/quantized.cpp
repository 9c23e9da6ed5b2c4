// Quantized weight matrices: repacking ggml blocks, dequantizing, quantizing floats, the portable
// GEMV kernel and x's int8 quantization, and the dispatch of linear() between the decode (GEMV)
// and prefill (AMX or float32 panel) paths.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <omp.h>

#include "internal.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/quantized.hpp"
#include "kvcache/error.hpp"
#include "kvcache/float16.hpp"
#include "quant_kernels.hpp"

namespace kvcache::cpu {
namespace {

// Bytes one block takes in ggml's interleaved layout, and its payload in ours (Q8_0 / Q4_1).
std::size_t ggml_block_bytes(QuantFormat f) { return quant_block_bytes(f); }
std::size_t payload_bytes(QuantFormat f) { return f == QuantFormat::kQ4_1 ? 16 : 32; }

float load_half(const std::uint8_t* p) {
  std::uint16_t bits;
  std::memcpy(&bits, p, 2);
  return fp16_to_float(float16{bits});
}

std::uint16_t load_u16(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

void check_shape(QuantFormat format, std::int64_t rows, std::int64_t cols, const char* where) {
  const std::int64_t granule = quant_row_granule(format);
  KVCACHE_CHECK(rows > 0 && cols > 0 && cols % granule == 0, where, ": expected a ",
                quant_format_name(format),
                " matrix with rows > 0 and columns a positive multiple of ", granule, ", got [",
                rows, ", ", cols, "]");
}

// Q4_K / Q5_K: the eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4).
void k4_scales(const std::uint8_t* packed, int (&sc)[8], int (&mn)[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = packed[j] & 0x3F;
    mn[j] = packed[j + 4] & 0x3F;
    sc[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 2) & 0x30);
    mn[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 2) & 0x30);
  }
}

// ggml's bytes of one row (nb 32-blocks) into the repacked layout of the 5-bit and K formats.
void repack_row(QuantFormat f, const std::uint8_t* in, std::int64_t nb, std::uint8_t* out) {
  using namespace quant;
  if (f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1) {
    const bool q51 = f == QuantFormat::kQ5_1;
    const std::size_t block = q51 ? 24 : 22, head = q51 ? 4 : 2;
    for (std::int64_t b = 0; b < nb; ++b, in += block) {
      std::memcpy(out + kQ5D * nb + 2 * b, in, 2);               // d
      if (q51) std::memcpy(out + kQ5M * nb + 2 * b, in + 2, 2);  // m
      std::memcpy(out + 16 * b, in + head + 4, 16);              // nibbles, already Q4_1's order
      const std::int64_t g = b / 4, n = std::min<std::int64_t>(4, nb - 4 * g), slot = b % 4;
      std::uint8_t* qh = out + kQ5Qh * nb + 16 * g;
      std::memcpy(qh + 2 * slot, in + head, 2);              // bits of elements 0..15
      std::memcpy(qh + 2 * n + 2 * slot, in + head + 2, 2);  // bits of elements 16..31
    }
    return;
  }
  const std::int64_t superblocks = nb / 8;
  const std::size_t sb_bytes = quant_block_bytes(f);
  for (std::int64_t s = 0; s < superblocks; ++s, in += sb_bytes, out += sb_bytes) {
    if (f == QuantFormat::kQ6_K) {
      // ggml: element e = half·128 + r: low 4 bits nibble r / 64 of ql[half·64 + r % 64], high 2
      // bits at 2·(r / 32) of qh[half·32 + r % 32].
      std::uint8_t q[256];
      for (int e = 0; e < 256; ++e) {
        const int half = e / 128, r = e % 128;
        const int low = (in[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
        const int high = (in[128 + half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        q[e] = static_cast<std::uint8_t>(low | (high << 4));
      }
      std::memset(out, 0, kQ6KScales);
      for (int b = 0; b < 8; ++b) {
        for (int i = 0; i < 16; ++i) {
          out[16 * b + i] = static_cast<std::uint8_t>((q[32 * b + i] & 0x0F) |
                                                      ((q[32 * b + i + 16] & 0x0F) << 4));
        }
      }
      // Chunk c's low-nibble byte k (k < 64) is element 32·(4c + k / 16) + k % 16, its high-nibble
      // byte k the element 16 after; their 2-bit highs go to byte k % 32 of the chunk's 32, at
      // bits 2·(k / 32) (low) and 4 + 2·(k / 32) (high).
      for (int c = 0; c < 2; ++c) {
        for (int k = 0; k < 64; ++k) {
          const int e = 32 * (4 * c + k / 16) + k % 16;
          const int shift = 2 * (k / 32);
          out[kQ6KHigh + 32 * c + k % 32] |=
              static_cast<std::uint8_t>(((q[e] >> 4) << shift) | ((q[e + 16] >> 4) << (4 + shift)));
        }
      }
      std::memcpy(out + kQ6KScales, in + 192, 18);  // scales and d
      continue;
    }
    // Q4_K / Q5_K: d, dmin, packed scales as they are; element e = chunk·64 + nibble·32 + l of
    // sub-block j = e / 32 is nibble `nibble` of qs[chunk·32 + l] (Q5_K: bit j of qh[l] its fifth).
    const bool k5 = f == QuantFormat::kQ5_K;
    const std::uint8_t* qs = in + (k5 ? 48 : 16);
    std::memcpy(out, in, 16);
    std::uint8_t* nib = out + (k5 ? kQ5KNib : kQ4KNib);
    for (int j = 0; j < 8; ++j) {
      const int chunk = j / 2, nibble = j % 2;
      for (int i = 0; i < 16; ++i) {
        const int lo = (qs[chunk * 32 + i] >> (4 * nibble)) & 0x0F;
        const int hi = (qs[chunk * 32 + i + 16] >> (4 * nibble)) & 0x0F;
        nib[16 * j + i] = static_cast<std::uint8_t>(lo | (hi << 4));
      }
      if (k5) {
        std::uint32_t bits = 0;
        for (int i = 0; i < 32; ++i) bits |= static_cast<std::uint32_t>((in[16 + i] >> j) & 1) << i;
        std::uint8_t* qh = out + kQ5KQh + 16 * (j / 4);
        const auto low = static_cast<std::uint16_t>(bits),
                   high = static_cast<std::uint16_t>(bits >> 16);
        std::memcpy(qh + 2 * (j % 4), &low, 2);
        std::memcpy(qh + 8 + 2 * (j % 4), &high, 2);
      }
    }
  }
}

}  // namespace

namespace quant {

// Block b (32 weights) of a repacked row of the 5-bit or K formats: weight i = scale[i / 16]·q[i]
// − min (min only when has_min), the very float32 operations ggml's dequantizer does.
void unpack_block(QuantFormat f, const std::uint8_t* row, std::int64_t nb, std::int64_t b,
                  int (&q)[32], float (&scale)[2], float& min, bool& has_min) {
  if (f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1) {
    const std::int64_t g = b / 4, n = std::min<std::int64_t>(4, nb - 4 * g), slot = b % 4;
    const std::uint8_t* qh = row + kQ5Qh * nb + 16 * g;
    const std::uint32_t bits = load_u16(qh + 2 * slot) |
                               (static_cast<std::uint32_t>(load_u16(qh + 2 * n + 2 * slot)) << 16);
    const int offset = f == QuantFormat::kQ5_0 ? 16 : 0;
    for (int i = 0; i < 32; ++i) {
      const int low = (row[16 * b + i % 16] >> (4 * (i / 16))) & 0x0F;
      q[i] = (low | static_cast<int>(((bits >> i) & 1u) << 4)) - offset;
    }
    scale[0] = scale[1] = load_half(row + kQ5D * nb + 2 * b);
    has_min = f == QuantFormat::kQ5_1;
    min = has_min ? -load_half(row + kQ5M * nb + 2 * b) : 0.0f;
    return;
  }
  const std::int64_t s = b / 8, j = b % 8;
  const std::uint8_t* base = row + static_cast<std::size_t>(s) * quant_block_bytes(f);
  if (f == QuantFormat::kQ6_K) {
    const std::int64_t c = j / 4;
    for (int i = 0; i < 32; ++i) {
      const int low = (base[16 * j + i % 16] >> (4 * (i / 16))) & 0x0F;
      const std::int64_t k = 16 * (j % 4) + i % 16;
      const int high = (base[kQ6KHigh + 32 * c + k % 32] >> (2 * (k / 32) + (i < 16 ? 0 : 4))) & 3;
      q[i] = (low | (high << 4)) - 32;
    }
    const float d = load_half(base + kQ6KD);
    for (int h = 0; h < 2; ++h)
      scale[h] = d * static_cast<float>(static_cast<std::int8_t>(base[kQ6KScales + 2 * j + h]));
    min = 0.0f;
    has_min = false;
    return;
  }
  const bool k5 = f == QuantFormat::kQ5_K;
  const std::uint8_t* nib = base + (k5 ? kQ5KNib : kQ4KNib) + 16 * j;
  std::uint32_t bits = 0;
  if (k5) {
    const std::uint8_t* qh = base + kQ5KQh + 16 * (j / 4);
    bits = load_u16(qh + 2 * (j % 4)) |
           (static_cast<std::uint32_t>(load_u16(qh + 8 + 2 * (j % 4))) << 16);
  }
  for (int i = 0; i < 32; ++i) {
    q[i] = ((nib[i % 16] >> (4 * (i / 16))) & 0x0F) | static_cast<int>(((bits >> i) & 1u) << 4);
  }
  int sc[8], mn[8];
  k4_scales(base + 4, sc, mn);
  scale[0] = scale[1] = load_half(base) * static_cast<float>(sc[j]);
  min = load_half(base + 2) * static_cast<float>(mn[j]);
  has_min = true;
}

}  // namespace quant

std::string_view quant_format_name(QuantFormat format) {
  switch (format) {
    case QuantFormat::kQ8_0:
      return "Q8_0";
    case QuantFormat::kQ4_1:
      return "Q4_1";
    case QuantFormat::kQ5_0:
      return "Q5_0";
    case QuantFormat::kQ5_1:
      return "Q5_1";
    case QuantFormat::kQ4_K:
      return "Q4_K";
    case QuantFormat::kQ5_K:
      return "Q5_K";
    default:
      return "Q6_K";
  }
}

std::int64_t quant_row_granule(QuantFormat format) { return quant::is_k_quant(format) ? 256 : 32; }

std::size_t quant_block_bytes(QuantFormat format) {
  switch (format) {
    case QuantFormat::kQ8_0:
      return 34;
    case QuantFormat::kQ4_1:
      return 20;
    case QuantFormat::kQ5_0:
      return 22;
    case QuantFormat::kQ5_1:
      return 24;
    case QuantFormat::kQ4_K:
      return 144;
    case QuantFormat::kQ5_K:
      return 176;
    default:
      return 210;
  }
}

QuantizedMatrix QuantizedMatrix::from_ggml(QuantFormat format, std::span<const std::byte> blocks,
                                           std::int64_t rows, std::int64_t cols) {
  const char* where = "QuantizedMatrix::from_ggml";
  check_shape(format, rows, cols, where);
  const std::int64_t nb = cols / kQuantBlock, granule = quant_row_granule(format);
  const std::int64_t row_blocks = cols / granule;
  const std::size_t ggml_row = static_cast<std::size_t>(row_blocks) * ggml_block_bytes(format);
  KVCACHE_CHECK(static_cast<std::size_t>(rows) <= blocks.size() / ggml_row &&
                    blocks.size() == ggml_row * static_cast<std::size_t>(rows),
                where, ": expected ", rows, " rows of ", ggml_row, " bytes (", row_blocks, " ",
                quant_format_name(format), granule == 32 ? " blocks" : " superblocks", ") for [",
                rows, ", ", cols, "], got ", blocks.size(), " bytes");
  QuantizedMatrix m;
  m.format_ = format;
  m.rows_ = rows;
  m.cols_ = cols;
  m.row_bytes_ = ggml_row;
  m.storage_ = Tensor::empty({rows, static_cast<std::int64_t>(ggml_row)}, DType::kUInt8);
  const auto* src = reinterpret_cast<const std::uint8_t*>(blocks.data());
  if (format != QuantFormat::kQ8_0 && format != QuantFormat::kQ4_1) {
#pragma omp parallel for schedule(static) if (rows > 256)
    for (std::int64_t r = 0; r < rows; ++r) {
      repack_row(format, src + static_cast<std::size_t>(r) * ggml_row, nb,
                 m.storage_.data_as<std::uint8_t>() + static_cast<std::size_t>(r) * ggml_row);
    }
    return m;
  }
  const std::size_t payload = payload_bytes(format);
#pragma omp parallel for schedule(static) if (rows > 256)
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint8_t* in = src + static_cast<std::size_t>(r) * ggml_row;
    std::uint8_t* out = m.storage_.data_as<std::uint8_t>() + static_cast<std::size_t>(r) * ggml_row;
    std::uint8_t* scales = out + static_cast<std::size_t>(nb) * payload;
    for (std::int64_t b = 0; b < nb; ++b, in += ggml_block_bytes(format)) {
      std::memcpy(scales + 2 * b, in, 2);  // d
      if (format == QuantFormat::kQ4_1) {
        std::memcpy(scales + 2 * nb + 2 * b, in + 2, 2);  // m
        std::memcpy(out + b * 16, in + 4, 16);
      } else {
        // int8 q stored as the unsigned byte q + 128 (VNNI multiplies unsigned by signed bytes).
        for (int i = 0; i < 32; ++i) out[b * 32 + i] = static_cast<std::uint8_t>(in[2 + i] ^ 0x80);
      }
    }
  }
  return m;
}

std::optional<QuantizedMatrix> QuantizedMatrix::from_ggml_q4_0(std::span<const std::byte> blocks,
                                                               std::int64_t rows,
                                                               std::int64_t cols) {
  const char* where = "QuantizedMatrix::from_ggml_q4_0";
  check_shape(QuantFormat::kQ4_1, rows, cols, where);
  constexpr std::size_t kQ4_0 = 18;  // fp16 d, 16 bytes of nibbles
  const std::size_t count = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols / 32);
  KVCACHE_CHECK(count <= blocks.size() / kQ4_0 && blocks.size() == count * kQ4_0, where,
                ": expected ", count, " Q4_0 blocks (", count * kQ4_0, " bytes) for [", rows, ", ",
                cols, "], got ", blocks.size(), " bytes");
  std::vector<std::byte> q4_1(count * 20);
  for (std::size_t b = 0; b < count; ++b) {
    const std::byte* in = blocks.data() + b * kQ4_0;
    std::byte* out = q4_1.data() + b * 20;
    std::uint16_t d_bits;
    std::memcpy(&d_bits, in, 2);
    const float m = -8.0f * fp16_to_float(float16{d_bits});
    if (!std::isfinite(m) || std::fabs(m) > 65504.0f) return std::nullopt;
    const std::uint16_t m_bits = float_to_fp16(m).bits;  // exact: a power-of-two multiple
    std::memcpy(out, in, 2);
    std::memcpy(out + 2, &m_bits, 2);
    std::memcpy(out + 4, in + 2, 16);
  }
  return from_ggml(QuantFormat::kQ4_1, q4_1, rows, cols);
}

QuantizedMatrix QuantizedMatrix::from_ggml_q5_0(std::span<const std::byte> blocks,
                                                std::int64_t rows, std::int64_t cols) {
  const char* where = "QuantizedMatrix::from_ggml_q5_0";
  check_shape(QuantFormat::kQ8_0, rows, cols, where);
  constexpr std::size_t kQ5_0 = 22;  // fp16 d, uint32 qh (fifth bits), 16 bytes of nibbles
  const std::size_t count = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols / 32);
  KVCACHE_CHECK(count <= blocks.size() / kQ5_0 && blocks.size() == count * kQ5_0, where,
                ": expected ", count, " Q5_0 blocks (", count * kQ5_0, " bytes) for [", rows, ", ",
                cols, "], got ", blocks.size(), " bytes");
  std::vector<std::byte> q8_0(count * 34);
  for (std::size_t b = 0; b < count; ++b) {
    const std::byte* in = blocks.data() + b * kQ5_0;
    std::byte* out = q8_0.data() + b * 34;
    std::memcpy(out, in, 2);  // d
    std::uint32_t qh;
    std::memcpy(&qh, in + 2, 4);
    for (int e = 0; e < 32; ++e) {
      // Element e: nibble e / 16 of byte e % 16, fifth bit e of qh.
      const int low = (static_cast<int>(in[6 + e % 16]) >> (4 * (e / 16))) & 0x0F;
      const int q = (low | static_cast<int>(((qh >> e) & 1u) << 4)) - 16;
      out[2 + e] = static_cast<std::byte>(static_cast<std::int8_t>(q));
    }
  }
  return from_ggml(QuantFormat::kQ8_0, q8_0, rows, cols);
}

QuantizedMatrix QuantizedMatrix::quantize(const Tensor& weight, QuantFormat format) {
  const char* where = "QuantizedMatrix::quantize";
  KVCACHE_CHECK(weight.defined() && weight.rank() == 2 && is_floating(weight.dtype()) &&
                    weight.device() == Device::kCpu,
                where, ": expected a float [rows, cols] CPU tensor, got ", weight.describe());
  KVCACHE_CHECK(format == QuantFormat::kQ8_0 || format == QuantFormat::kQ4_1, where,
                ": quantizes to Q8_0 or Q4_1, got ", quant_format_name(format));
  const std::int64_t rows = weight.size(0), cols = weight.size(1);
  check_shape(format, rows, cols, where);
  const Tensor w = weight.dtype() == DType::kFloat32 && weight.is_contiguous()
                       ? weight
                       : cast(weight, DType::kFloat32);
  const std::int64_t nb = cols / kQuantBlock;
  const std::size_t block = ggml_block_bytes(format);
  std::vector<std::byte> ggml(static_cast<std::size_t>(rows * nb) * block);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t b = 0; b < nb; ++b) {
      const float* x = w.data_as<float>() + r * cols + b * kQuantBlock;
      std::byte* out = ggml.data() + static_cast<std::size_t>(r * nb + b) * block;
      auto put_half = [](std::byte* p, float v) {
        const std::uint16_t bits = float_to_fp16(v).bits;
        std::memcpy(p, &bits, 2);
      };
      if (format == QuantFormat::kQ8_0) {
        // ggml's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d).
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        put_half(out, d);
        for (int i = 0; i < 32; ++i)
          out[2 + i] = static_cast<std::byte>(static_cast<std::int8_t>(std::roundf(x[i] * id)));
      } else {
        // ggml's quantize_row_q4_1_ref: d = (max − min) / 15, m = min, q = round((x − m) / d).
        float lo = x[0], hi = x[0];
        for (int i = 1; i < 32; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
        const float d = (hi - lo) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        put_half(out, d);
        put_half(out + 2, lo);
        for (int i = 0; i < 16; ++i) {
          const int q0 = std::min(15, static_cast<int>((x[i] - lo) * id + 0.5f));
          const int q1 = std::min(15, static_cast<int>((x[i + 16] - lo) * id + 0.5f));
          out[4 + i] = static_cast<std::byte>(q0 | (q1 << 4));
        }
      }
    }
  }
  return from_ggml(format, ggml, rows, cols);
}

std::string QuantizedMatrix::describe() const {
  if (!defined()) return "QuantizedMatrix(undefined)";
  return std::string(quant_format_name(format_)) + " [" + std::to_string(rows_) + ", " +
         std::to_string(cols_) + "]";
}

const std::uint8_t* QuantizedMatrix::row(std::int64_t r) const {
  KVCACHE_CHECK(r >= 0 && r < rows_, "QuantizedMatrix::row: expected a row in [0, ", rows_,
                "), got ", r);
  return storage_.data_as<std::uint8_t>() + static_cast<std::size_t>(r) * row_bytes_;
}

QuantizedMatrix QuantizedMatrix::gather_rows(std::span<const std::int64_t> order) const {
  KVCACHE_CHECK(defined() && !order.empty(),
                "QuantizedMatrix::gather_rows: expected a defined matrix and at least one row");
  for (std::size_t i = 0; i < order.size(); ++i) {
    KVCACHE_CHECK(order[i] >= 0 && order[i] < rows_,
                  "QuantizedMatrix::gather_rows: expected rows "
                  "in [0, ",
                  rows_, "), got ", order[i], " at position ", i);
  }
  QuantizedMatrix m = *this;
  m.rows_ = static_cast<std::int64_t>(order.size());
  m.storage_ = Tensor::empty({m.rows_, static_cast<std::int64_t>(row_bytes_)}, DType::kUInt8);
  for (std::size_t i = 0; i < order.size(); ++i) {
    std::memcpy(m.storage_.data_as<std::uint8_t>() + i * row_bytes_, row(order[i]), row_bytes_);
  }
  return m;
}

void QuantizedMatrix::dequantize_rows(std::int64_t r0, std::int64_t r1, float* dst) const {
  KVCACHE_CHECK(0 <= r0 && r0 <= r1 && r1 <= rows_,
                "QuantizedMatrix::dequantize_rows: expected 0 "
                "<= r0 <= r1 <= ",
                rows_, ", got [", r0, ", ", r1, ")");
  const std::int64_t nb = blocks_per_row();
  if (active_cpu_isa() >= CpuIsa::kAvx512Vnni) {
    // The prefill panels' dequantization: the same floats, a block's 32 at a time.
    for (std::int64_t r = r0; r < r1; ++r, dst += cols_) {
      quant::dequantize_row_avx512(
          format_, storage_.data_as<std::uint8_t>() + static_cast<std::size_t>(r) * row_bytes_, nb,
          dst);
    }
    return;
  }
  if (format_ != QuantFormat::kQ8_0 && format_ != QuantFormat::kQ4_1) {
    for (std::int64_t r = r0; r < r1; ++r, dst += cols_) {
      const std::uint8_t* p =
          storage_.data_as<std::uint8_t>() + static_cast<std::size_t>(r) * row_bytes_;
      for (std::int64_t b = 0; b < nb; ++b) {
        int q[32];
        float scale[2], min;
        bool has_min;
        quant::unpack_block(format_, p, nb, b, q, scale, min, has_min);
        float* out = dst + b * kQuantBlock;
        // ggml's order: scale·q rounded, then − min rounded (this file is compiled without FMA
        // contraction, CMakeLists.txt).
        if (has_min) {
          for (int i = 0; i < 32; ++i) out[i] = scale[i / 16] * static_cast<float>(q[i]) - min;
        } else {
          for (int i = 0; i < 32; ++i) out[i] = scale[i / 16] * static_cast<float>(q[i]);
        }
      }
    }
    return;
  }
  for (std::int64_t r = r0; r < r1; ++r, dst += cols_) {
    const std::uint8_t* p =
        storage_.data_as<std::uint8_t>() + static_cast<std::size_t>(r) * row_bytes_;
    const std::uint8_t* scales = p + static_cast<std::size_t>(nb) * payload_bytes(format_);
    for (std::int64_t b = 0; b < nb; ++b) {
      const float d = load_half(scales + 2 * b);
      float* out = dst + b * kQuantBlock;
      if (format_ == QuantFormat::kQ8_0) {
        for (int i = 0; i < 32; ++i)
          out[i] = d * static_cast<float>(static_cast<int>(p[b * 32 + i]) - 128);
      } else {
        const float m = load_half(scales + 2 * nb + 2 * b);
        for (int i = 0; i < 16; ++i) {
          const unsigned q = p[b * 16 + i];
          out[i] = static_cast<float>(q & 0x0Fu) * d + m;
          out[i + 16] = static_cast<float>(q >> 4) * d + m;
        }
      }
    }
  }
}

Tensor QuantizedMatrix::dequantize() const {
  KVCACHE_CHECK(defined(), "QuantizedMatrix::dequantize: the matrix is undefined");
  Tensor out = Tensor::empty({rows_, cols_}, DType::kFloat32);
  dequantize_rows(0, rows_, out.data_as<float>());
  return out;
}

// --- Weight --------------------------------------------------------------------------------------

std::int64_t Weight::rows() const { return is_quantized() ? quantized_.rows() : dense_.size(0); }
std::int64_t Weight::cols() const { return is_quantized() ? quantized_.cols() : dense_.size(1); }
std::size_t Weight::nbytes() const {
  return is_quantized() ? quantized_.nbytes() : (dense_.defined() ? dense_.nbytes() : 0);
}
const void* Weight::data() const {
  return is_quantized() ? static_cast<const void*>(quantized_.row(0)) : dense_.data();
}
std::string Weight::describe() const {
  return is_quantized() ? quantized_.describe() : dense_.describe();
}

// --- instruction sets
// ------------------------------------------------------------------------------

namespace {

CpuIsa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  if (!vnni) return CpuIsa::kPortable;
  return quant::enable_amx() ? CpuIsa::kAmx : CpuIsa::kAvx512Vnni;
#else
  return CpuIsa::kPortable;
#endif
}

// The cap starts from the environment: KVCACHE_CPU_ISA=portable|avx512-vnni|amx.
CpuIsa initial_limit() {
  const char* env = std::getenv("KVCACHE_CPU_ISA");
  if (env == nullptr) return CpuIsa::kAmx;
  const std::string_view name(env);
  for (const CpuIsa isa : {CpuIsa::kPortable, CpuIsa::kAvx512Vnni, CpuIsa::kAmx}) {
    if (name == cpu_isa_name(isa)) return isa;
  }
  KVCACHE_CHECK(false, "KVCACHE_CPU_ISA: expected portable, avx512-vnni or amx, got '", name, "'");
  return CpuIsa::kAmx;
}

std::atomic<CpuIsa>& isa_limit() {
  static std::atomic<CpuIsa> limit{initial_limit()};
  return limit;
}

}  // namespace

std::string_view cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kPortable:
      return "portable";
    case CpuIsa::kAvx512Vnni:
      return "avx512-vnni";
    default:
      return "amx";
  }
}

CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa set_cpu_isa_limit(CpuIsa limit) { return isa_limit().exchange(limit); }

CpuIsa active_cpu_isa() { return std::min(detected_cpu_isa(), isa_limit().load()); }

// --- x quantization and the portable kernel --------------------------------------------------

namespace quant {

namespace {
void quantize_x_portable(QuantFormat format, const float* x, std::int64_t rows, std::int64_t cols,
                         QuantizedX& out);
}  // namespace

void quantize_x(QuantFormat format, const float* x, std::int64_t rows, std::int64_t cols,
                QuantizedX& out) {
  const std::int64_t nb = cols / kQuantBlock, per_chunk = blocks_per_chunk(format);
  out.format = format;
  out.rows = rows;
  out.cols = cols;
  out.nb = nb;
  out.chunks = (nb + per_chunk - 1) / per_chunk;
  out.q.resize(static_cast<std::size_t>(rows * cols));
  out.d.resize(static_cast<std::size_t>(rows * nb));
  out.s.resize(static_cast<std::size_t>(rows * nb));
  out.drep.assign(static_cast<std::size_t>(rows * out.chunks * 16), 0.0f);  // tails stay 0
  out.corr.resize(static_cast<std::size_t>(rows * cols / 4));
  if (active_cpu_isa() >= CpuIsa::kAvx512Vnni) {
    quantize_x_avx512(format, x, rows, cols, out);
  } else {
    quantize_x_portable(format, x, rows, cols, out);
  }
  if (format == QuantFormat::kQ6_K) {
    // d·Σq over each 16 elements: Q6_K's −32 offset, scaled per 16-element sub-block.
    out.s16.resize(static_cast<std::size_t>(rows * 2 * nb));
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int8_t* q = out.q_row(r);
      for (std::int64_t b = 0; b < nb; ++b) {
        for (int h = 0; h < 2; ++h) {
          int sum = 0;
          for (int i = 16 * h; i < 16 * h + 16; ++i) sum += q[x_index(format, b, i, nb)];
          out.s16[static_cast<std::size_t>(r * 2 * nb + 2 * b + h)] =
              out.d[static_cast<std::size_t>(r * nb + b)] * static_cast<float>(sum);
        }
      }
    }
  }
  // Each lane's block scale, for the kernels' per-lane multiply.
  const std::int64_t lanes_per_block = 16 / per_chunk;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t b = 0; b < nb; ++b) {
      float* rep = out.drep.data() + (r * out.chunks + b / per_chunk) * 16;
      std::fill_n(rep + (b % per_chunk) * lanes_per_block, lanes_per_block,
                  out.d[static_cast<std::size_t>(r * nb + b)]);
    }
  }
}

namespace {

// q, d, s and corr of quantize_x in plain C++.
void quantize_x_portable(QuantFormat format, const float* x, std::int64_t rows, std::int64_t cols,
                         QuantizedX& out) {
  const std::int64_t nb = cols / kQuantBlock;
  for (std::int64_t r = 0; r < rows; ++r) {
    std::int8_t* q = out.q.data() + r * cols;
    for (std::int64_t b = 0; b < nb; ++b) {
      const float* v = x + r * cols + b * kQuantBlock;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
      int sum = 0;
      for (int i = 0; i < 32; ++i) {
        const int qi = static_cast<int>(std::nearbyint(v[i] * id));
        q[x_index(format, b, i, nb)] = static_cast<std::int8_t>(qi);
        sum += qi;
      }
      out.d[static_cast<std::size_t>(r * nb + b)] = d;
      out.s[static_cast<std::size_t>(r * nb + b)] = d * static_cast<float>(sum);
    }
    for (std::int64_t l = 0; l < cols / 4; ++l) {
      out.corr[static_cast<std::size_t>(r * (cols / 4) + l)] =
          -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
    }
  }
}

}  // namespace

void gemv_portable(const QuantizedMatrix& w, const QuantizedX& x, std::int64_t o0, std::int64_t o1,
                   const float* bias, float* y) {
  const std::int64_t nb = w.blocks_per_row(), cols = w.cols(), out = w.rows();
  const bool q41 = w.format() == QuantFormat::kQ4_1;
  if (w.format() != QuantFormat::kQ8_0 && !q41) {
    // The 5-bit and K formats: each block's integers unpacked (offsets removed), one integer dot
    // product per 16 elements (Q6_K's scales change there; the others' do not), scaled by
    // scale·d_x, minus min·d_x·Σq_x.
    for (std::int64_t o = o0; o < o1; ++o) {
      const std::uint8_t* p = w.row(o);
      for (std::int64_t r = 0; r < x.rows; ++r) {
        const std::int8_t* q = x.q_row(r);
        float acc = 0.0f;
        for (std::int64_t b = 0; b < nb; ++b) {
          int wq[32];
          float scale[2], min;
          bool has_min;
          unpack_block(w.format(), p, nb, b, wq, scale, min, has_min);
          std::int32_t dot[2] = {0, 0};
          for (int i = 0; i < 32; ++i) dot[i / 16] += wq[i] * q[x_index(w.format(), b, i, nb)];
          const float dx = x.d_row(r)[b];
          acc += static_cast<float>(dot[0]) * (scale[0] * dx) +
                 static_cast<float>(dot[1]) * (scale[1] * dx);
          if (has_min) acc -= min * x.s_row(r)[b];
        }
        y[r * out + o] = acc + (bias ? bias[o] : 0.0f);
      }
    }
    return;
  }
  for (std::int64_t o = o0; o < o1; ++o) {
    const std::uint8_t* p = w.row(o);
    const std::uint8_t* scales = p + nb * (q41 ? 16 : 32);
    for (std::int64_t r = 0; r < x.rows; ++r) {
      const std::int8_t* q = x.q_row(r);
      float acc = 0.0f;
      for (std::int64_t b = 0; b < nb; ++b) {
        std::int32_t dot = 0;
        float extra = 0.0f;
        if (q41) {
          for (int i = 0; i < 16; ++i) {
            const unsigned n = p[b * 16 + i];
            dot += static_cast<std::int32_t>(n & 0x0Fu) * q[x_index(w.format(), b, i, nb)] +
                   static_cast<std::int32_t>(n >> 4) * q[x_index(w.format(), b, i + 16, nb)];
          }
          extra = load_half(scales + 2 * nb + 2 * b) * x.s_row(r)[b];
        } else {
          // Σ byte·q − 128·Σq, as the VNNI kernel computes it. (g++ 12 with AVX-VNNI vectorizes
          // the signed-by-signed form, Σ (byte − 128)·q, into wrong code.)
          std::int32_t sum_q = 0;
          for (int i = 0; i < 32; ++i) {
            dot += static_cast<std::int32_t>(p[b * 32 + i]) * q[b * 32 + i];
            sum_q += q[b * 32 + i];
          }
          dot -= 128 * sum_q;
        }
        acc += static_cast<float>(dot) * (load_half(scales + 2 * b) * x.d_row(r)[b]) + extra;
      }
      y[r * out + o] = acc + (bias ? bias[o] : 0.0f);
    }
  }
  (void)cols;
}

}  // namespace quant

// --- linear and embedding ----------------------------------------------------------------------

namespace {

// Output rows per dequantized panel of the prefill path: about 64 (a panel of 64 × 576 float32
// stays in L2 between its dequantization and the GEMM), a multiple of 16, and a count of panels
// that detail::kPanelShares divides — linear_panels hands them out statically, and 64-row panels
// of a 576- or 192-row matrix (9 and 3 of them) would leave one of two threads idle for a panel.
// The count does not follow the thread count, so neither do the prefill's bits.
std::int64_t panel_rows(std::int64_t out) {
  const std::int64_t threads = detail::kPanelShares;
  for (std::int64_t per_thread = (out + 64 * threads - 1) / (64 * threads);; ++per_thread) {
    const std::int64_t rows = (out + threads * per_thread - 1) / (threads * per_thread);
    const std::int64_t panel = (rows + 15) / 16 * 16;
    if (panel <= 16 || ((out + panel - 1) / panel) % threads == 0) return panel;
  }
}

}  // namespace

// Measured on the 2-core AVX-512 VNNI machines (no AMX) with SmolLM2's shapes, one linear()
// against the float32 panel path: the Q4_1 kernel is 1.5–2.8× faster up to 32 rows, the Q8_0 one
// 1.05–1.6× at 8 rows and slower from 16 on.
// The 5-bit and K formats' kernels were not measured against the float32 path by row count; they
// take Q8_0's 8 (K-quants: a few more operations per byte than Q8_0) and Q5_x 16 (Q4_1's kernel
// plus a masked add).
std::int64_t quantized_decode_rows(QuantFormat format) {
  const bool amx_served = format == QuantFormat::kQ8_0 || format == QuantFormat::kQ4_1;
  if (active_cpu_isa() == CpuIsa::kAmx && amx_served) return 4;
  switch (format) {
    case QuantFormat::kQ4_1:
      return 32;
    case QuantFormat::kQ5_0:
    case QuantFormat::kQ5_1:
      return 16;
    default:
      return 8;
  }
}

namespace {

// y_i = x · W_iᵀ (+ bias_i) for decode rows of x and matrices of any formats: x quantized once per
// order the formats need (Q8_0's, and the nibble formats' — one quantization serves all of those,
// with Q6_K's per-16 sums when a Q6_K matrix is there), then one parallel region whose threads
// each take an equal share of all the matrices' bytes, cut as one range at quads of rows. linear()
// calls it with one matrix, linear_fused() with several (a Q4_K_M file mixes Q5_0 q/k with Q8_0 v).
void gemv(const Tensor& x, std::span<const QuantizedMatrix* const> ws,
          std::span<const float* const> biases, std::span<float* const> ys) {
  // The caller's scratch, named by a reference: inside the parallel region the thread_local name
  // would mean each worker's own (empty) copy.
  thread_local quant::QuantizedX scratch_q8, scratch_nibbles;
  quant::QuantizedX& q8 = scratch_q8;
  quant::QuantizedX& nibbles = scratch_nibbles;
  bool any_q8 = false, any_nibbles = false;
  QuantFormat nibble_format = QuantFormat::kQ4_1;
  for (const QuantizedMatrix* w : ws) {
    if (w->format() == QuantFormat::kQ8_0) {
      any_q8 = true;
    } else {
      if (!any_nibbles || w->format() == QuantFormat::kQ6_K) nibble_format = w->format();
      any_nibbles = true;
    }
  }
  if (any_q8) quant::quantize_x(QuantFormat::kQ8_0, x.data_as<float>(), x.size(0), x.size(1), q8);
  if (any_nibbles)
    quant::quantize_x(nibble_format, x.data_as<float>(), x.size(0), x.size(1), nibbles);
  const CpuIsa isa = active_cpu_isa();
  std::int64_t total_bytes = 0;
  for (const QuantizedMatrix* w : ws)
    total_bytes += w->rows() * static_cast<std::int64_t>(w->row_bytes());
  // Where share k of `shares` begins, as a row of all the matrices taken one after another: the
  // shares hold equal bytes (a Q8_0 v row is half again a Q5_0 q row), cut at quads of rows of
  // one matrix.
  auto cut = [&](std::int64_t k, std::int64_t shares) {
    const std::int64_t at = total_bytes * k / shares;
    std::int64_t rows_before = 0, bytes_before = 0;
    for (const QuantizedMatrix* w : ws) {
      const auto quad_bytes = 4 * static_cast<std::int64_t>(w->row_bytes());
      const std::int64_t bytes = w->rows() * static_cast<std::int64_t>(w->row_bytes());
      if (at < bytes_before + bytes) {
        const std::int64_t quads = (at - bytes_before + quad_bytes / 2) / quad_bytes;
        return rows_before + std::min(w->rows(), 4 * quads);
      }
      rows_before += w->rows();
      bytes_before += bytes;
    }
    return rows_before;
  };
#pragma omp parallel
  {
    const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const std::int64_t begin = cut(t, threads), end = cut(t + 1, threads);
    std::int64_t offset = 0;
    for (std::size_t i = 0; i < ws.size(); ++i) {
      const QuantizedMatrix& w = *ws[i];
      const std::int64_t o0 = std::clamp(begin - offset, std::int64_t{0}, w.rows()),
                         o1 = std::clamp(end - offset, std::int64_t{0}, w.rows());
      offset += w.rows();
      if (o0 >= o1) continue;
      const quant::QuantizedX& qx = w.format() == QuantFormat::kQ8_0 ? q8 : nibbles;
      if (isa >= CpuIsa::kAvx512Vnni) {
        quant::gemv_avx512(w, qx, o0, o1, biases[i], ys[i]);
      } else {
        quant::gemv_portable(w, qx, o0, o1, biases[i], ys[i]);
      }
    }
  }
}

void check_linear_args(const Tensor& x, const QuantizedMatrix& weight, const Tensor& bias) {
  const char* where = "cpu::linear";
  KVCACHE_CHECK(x.defined() && x.rank() == 2 && x.dtype() == DType::kFloat32 &&
                    x.device() == Device::kCpu && x.is_contiguous(),
                where, ": expected x as a contiguous [rows, n] float32 CPU tensor, got ",
                x.describe());
  KVCACHE_CHECK(weight.defined(), where, ": the quantized weight is undefined");
  KVCACHE_CHECK(weight.cols() == x.size(1), where, ": expected x with ", weight.cols(),
                " features (the weight's in), got ", x.shape_string());
  if (bias.defined()) {
    KVCACHE_CHECK(bias.rank() == 1 && bias.size(0) == weight.rows() &&
                      bias.dtype() == DType::kFloat32 && bias.is_contiguous(),
                  where, ": expected bias [", weight.rows(), "] float32, got ", bias.describe());
  }
}

}  // namespace

Tensor linear(const Tensor& x, const QuantizedMatrix& weight, const Tensor& bias) {
  check_linear_args(x, weight, bias);
  Tensor y = Tensor::empty({x.size(0), weight.rows()}, DType::kFloat32);
  if (x.size(0) == 0) return y;
  const float* b = bias.defined() ? bias.data_as<float>() : nullptr;
  const CpuIsa isa = active_cpu_isa();
  if (x.size(0) <= quantized_decode_rows(weight.format())) {
    const QuantizedMatrix* w = &weight;
    float* yp = y.data_as<float>();
    gemv(x, {&w, 1}, {&b, 1}, {&yp, 1});
  } else if (isa == CpuIsa::kAmx &&
             (weight.format() == QuantFormat::kQ8_0 || weight.format() == QuantFormat::kQ4_1)) {
    quant::linear_amx(x.data_as<float>(), x.size(0), weight, b, y.data_as<float>());
  } else {
    // Without AMX: panels of about 64 weight rows (panel_rows) dequantized exactly to float32,
    // then Eigen's GEMM (small panels stay in L2 between the dequantization and the GEMM; one
    // panel per thread, as dense weights use, measured 16% slower).
    detail::linear_panels(x.data_as<float>(), x.size(0), x.size(1), weight.rows(),
                          panel_rows(weight.rows()), b, y.data_as<float>(),
                          [&](std::int64_t o0, std::int64_t n, std::vector<float>& scratch) {
                            scratch.resize(static_cast<std::size_t>(n * weight.cols()));
                            weight.dequantize_rows(o0, o0 + n, scratch.data());
                            return static_cast<const float*>(scratch.data());
                          });
  }
  return y;
}

Tensor linear(const Tensor& x, const Weight& weight, const Tensor& bias) {
  KVCACHE_CHECK(weight.defined(), "cpu::linear: the weight is undefined");
  return weight.is_quantized() ? linear(x, weight.quantized(), bias)
                               : linear(x, weight.dense(), bias);
}

std::vector<Tensor> linear_fused(const Tensor& x, std::span<const Weight* const> weights,
                                 std::span<const Tensor* const> biases) {
  const char* where = "cpu::linear_fused";
  KVCACHE_CHECK(biases.empty() || biases.size() == weights.size(), where, ": expected ",
                weights.size(), " biases (one per weight) or none, got ", biases.size());
  auto bias_of = [&](std::size_t i) { return biases.empty() ? Tensor() : *biases[i]; };
  bool fusable = !weights.empty() && x.defined() && x.rank() == 2;
  for (const Weight* w : weights) {
    fusable = fusable && w != nullptr && w->is_quantized() &&
              x.size(0) <= quantized_decode_rows(w->quantized().format());
  }
  std::vector<Tensor> out;
  if (!fusable) {
    for (std::size_t i = 0; i < weights.size(); ++i) {
      KVCACHE_CHECK(weights[i] != nullptr, where, ": weight ", i, " is null");
      out.push_back(linear(x, *weights[i], bias_of(i)));
    }
    return out;
  }
  // Every check linear() makes, before anything is computed.
  std::vector<const QuantizedMatrix*> ws;
  std::vector<const float*> bs;
  std::vector<float*> ys;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    const QuantizedMatrix& w = weights[i]->quantized();
    const Tensor bias = bias_of(i);
    check_linear_args(x, w, bias);
    out.push_back(Tensor::empty({x.size(0), w.rows()}, DType::kFloat32));
    ws.push_back(&w);
    bs.push_back(bias.defined() ? bias.data_as<float>() : nullptr);
    ys.push_back(out.back().data_as<float>());
  }
  if (x.size(0) > 0) gemv(x, ws, bs, ys);
  return out;
}

Tensor embedding(const QuantizedMatrix& table, const Tensor& ids) {
  KVCACHE_CHECK(table.defined(), "cpu::embedding: the quantized table is undefined");
  KVCACHE_CHECK(ids.defined() && ids.dtype() == DType::kInt64 && ids.is_contiguous(),
                "cpu::embedding: expected contiguous int64 ids, got ", ids.describe());
  const std::int64_t vocab = table.rows(), n = ids.numel();
  const std::int64_t* id = ids.data_as<std::int64_t>();
  for (std::int64_t i = 0; i < n; ++i) {
    KVCACHE_CHECK(id[i] >= 0 && id[i] < vocab, "cpu::embedding: expected token ids in [0, ", vocab,
                  ") (the vocabulary), got ", id[i], " at position ", i);
  }
  Tensor out = Tensor::empty({n, table.cols()}, DType::kFloat32);
  for (std::int64_t i = 0; i < n; ++i)
    table.dequantize_rows(id[i], id[i] + 1, out.data_as<float>() + i * table.cols());
  return out;
}

Tensor embedding(const Weight& table, const Tensor& ids) {
  KVCACHE_CHECK(table.defined(), "cpu::embedding: the table is undefined");
  return table.is_quantized() ? embedding(table.quantized(), ids) : embedding(table.dense(), ids);
}

}  // namespace kvcache::cpu
