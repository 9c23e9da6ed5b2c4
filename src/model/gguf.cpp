// Reading GGUF files (llama.cpp's checkpoint format): the magic "GGUF", a version, tensor and
// metadata counts, the metadata key/values, the tensor infos, padding to the alignment and the data
// section. The file is mapped read-only and every number in it is checked against the bytes that
// remain before it is used: no count allocates before it is known to fit the file, no offset is
// followed before it is known to lie inside it. A truncated or hostile file is a kvcache::Error
// naming the file, the key or tensor, what was expected and what came, never a crash.
//
// Dequantization follows ggml's reference code (ggml-quants.c) and gguf-py's quants.py, bit for
// bit: each block holds an fp16 scale d (and for Q4_1 / Q5_1 an fp16 minimum m) and small integers
// q, and an element is d * q (+ m) in float32; the K-quants (256-element superblocks) add 4- to
// 8-bit scales (and mins) per 16- or 32-element sub-block.
#include "kvcache/model/gguf.hpp"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <numeric>
#include <sstream>
#include <utility>

#include "kvcache/error.hpp"
#include "kvcache/float16.hpp"
#include "mapped_file.hpp"

// Every number in a GGUF file is little-endian (version 3 files may be big-endian, which is
// detected and refused); they are read with memcpy as host integers.
static_assert(std::endian::native == std::endian::little,
              "kvcache's GGUF reader reads little-endian numbers as is");

namespace kvcache {

namespace {

using ValueType = GgufValue::Type;

// --- tensor types --------------------------------------------------------------------------------

struct TypeInfo {
  GgufType type;
  std::string_view name;
  std::int64_t block_size;  // elements per block
  std::uint64_t type_size;  // bytes per block
};

// Every type ggml numbers today, with ggml's block sizes (ggml.c's type_traits; gguf-py's
// GGML_QUANT_SIZES), so a file's layout is validated whether or not its values can be read.
constexpr TypeInfo kTypes[] = {
    {GgufType::kF32, "F32", 1, 4},
    {GgufType::kF16, "F16", 1, 2},
    {GgufType::kQ4_0, "Q4_0", 32, 18},
    {GgufType::kQ4_1, "Q4_1", 32, 20},
    {GgufType::kQ5_0, "Q5_0", 32, 22},
    {GgufType::kQ5_1, "Q5_1", 32, 24},
    {GgufType::kQ8_0, "Q8_0", 32, 34},
    {GgufType::kQ8_1, "Q8_1", 32, 36},
    {GgufType::kQ2_K, "Q2_K", 256, 84},
    {GgufType::kQ3_K, "Q3_K", 256, 110},
    {GgufType::kQ4_K, "Q4_K", 256, 144},
    {GgufType::kQ5_K, "Q5_K", 256, 176},
    {GgufType::kQ6_K, "Q6_K", 256, 210},
    {GgufType::kQ8_K, "Q8_K", 256, 292},
    {GgufType::kIQ2_XXS, "IQ2_XXS", 256, 66},
    {GgufType::kIQ2_XS, "IQ2_XS", 256, 74},
    {GgufType::kIQ3_XXS, "IQ3_XXS", 256, 98},
    {GgufType::kIQ1_S, "IQ1_S", 256, 50},
    {GgufType::kIQ4_NL, "IQ4_NL", 32, 18},
    {GgufType::kIQ3_S, "IQ3_S", 256, 110},
    {GgufType::kIQ2_S, "IQ2_S", 256, 82},
    {GgufType::kIQ4_XS, "IQ4_XS", 256, 136},
    {GgufType::kI8, "I8", 1, 1},
    {GgufType::kI16, "I16", 1, 2},
    {GgufType::kI32, "I32", 1, 4},
    {GgufType::kI64, "I64", 1, 8},
    {GgufType::kF64, "F64", 1, 8},
    {GgufType::kIQ1_M, "IQ1_M", 256, 56},
    {GgufType::kBF16, "BF16", 1, 2},
    {GgufType::kTQ1_0, "TQ1_0", 256, 54},
    {GgufType::kTQ2_0, "TQ2_0", 256, 66},
    {GgufType::kMXFP4, "MXFP4", 32, 17},
    {GgufType::kNVFP4, "NVFP4", 64, 36},
    {GgufType::kQ1_0, "Q1_0", 128, 18},
};

const TypeInfo* find_type(std::uint32_t number) {
  for (const auto& info : kTypes)
    if (static_cast<std::uint32_t>(info.type) == number) return &info;
  return nullptr;
}

const TypeInfo& type_info(GgufType type) {
  const TypeInfo* info = find_type(static_cast<std::uint32_t>(type));
  KVCACHE_CHECK(info != nullptr, "unknown GGUF tensor type ", static_cast<std::uint32_t>(type));
  return *info;
}

bool is_served(GgufType type) {
  switch (type) {
    case GgufType::kF32:
    case GgufType::kF16:
    case GgufType::kBF16:
    case GgufType::kQ8_0:
    case GgufType::kQ4_0:
    case GgufType::kQ4_1:
    case GgufType::kQ5_0:
    case GgufType::kQ5_1:
    case GgufType::kQ2_K:
    case GgufType::kQ3_K:
    case GgufType::kQ4_K:
    case GgufType::kQ5_K:
    case GgufType::kQ6_K:
    case GgufType::kQ8_K:
      return true;
    default:
      return false;
  }
}

constexpr std::string_view kServedTypes =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K";

// Bytes of `count` elements, or nullopt when count is negative, not whole blocks or overflows.
std::optional<std::uint64_t> bytes_of(const TypeInfo& info, std::int64_t count) {
  if (count < 0 || count % info.block_size != 0) return std::nullopt;
  std::uint64_t bytes = 0;
  if (__builtin_mul_overflow(static_cast<std::uint64_t>(count / info.block_size), info.type_size,
                             &bytes))
    return std::nullopt;
  return bytes;
}

// --- element readers: the data may sit at any byte offset, so everything goes through memcpy ----

template <class T>
T load(const std::byte* p) {
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

float load_fp16(const std::byte* p) { return fp16_to_float(float16{load<std::uint16_t>(p)}); }

// Block layouts from ggml-common.h. q * d (and q * d + m) are computed in float32; d has 11
// significant bits and q at most 8, so the product is exact and the result has one rounding (the
// + m), with or without FMA contraction: the values equal ggml's and gguf-py's bit for bit.
constexpr std::int64_t kQK = 32;   // elements per Q8_0 / Q4_0 / Q4_1 block
constexpr std::size_t kQ8_0 = 34;  // fp16 d, int8 qs[32]
constexpr std::size_t kQ4_0 = 18;  // fp16 d, uint8 qs[16]
constexpr std::size_t kQ4_1 = 20;  // fp16 d, fp16 m, uint8 qs[16]

void dequantize_q8_0(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ8_0, dst += kQK) {
    const float d = load_fp16(src);
    const std::byte* qs = src + 2;
    for (std::int64_t j = 0; j < kQK; ++j)
      dst[j] = d * static_cast<float>(static_cast<std::int8_t>(qs[j]));
  }
}

void dequantize_q4_0(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ4_0, dst += kQK) {
    const float d = load_fp16(src);
    const std::byte* qs = src + 2;
    // Byte j holds element j in its low nibble and element j + 16 in its high nibble.
    for (std::int64_t j = 0; j < kQK / 2; ++j) {
      const auto q = static_cast<unsigned>(qs[j]);
      dst[j] = d * static_cast<float>(static_cast<int>(q & 0x0Fu) - 8);
      dst[j + kQK / 2] = d * static_cast<float>(static_cast<int>(q >> 4) - 8);
    }
  }
}

void dequantize_q4_1(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ4_1, dst += kQK) {
    const float d = load_fp16(src);
    const float m = load_fp16(src + 2);
    const std::byte* qs = src + 4;
    for (std::int64_t j = 0; j < kQK / 2; ++j) {
      const auto q = static_cast<unsigned>(qs[j]);
      dst[j] = static_cast<float>(q & 0x0Fu) * d + m;
      dst[j + kQK / 2] = static_cast<float>(q >> 4) * d + m;
    }
  }
}

// --- Q5_0, Q5_1 and the K-quants
// ------------------------------------------------------------------ Layouts from ggml-common.h;
// every element is computed as gguf-py's quants.py computes it (which is also ggml's order): scales
// first (d · sc, dmin · m, rounded to float32), then scale · q, then − min, each rounded once. This
// file is compiled with -ffp-contract=off (CMakeLists.txt) so that no compiler fuses scale · q −
// min into one FMA, which would round differently.
constexpr std::int64_t kQK_K = 256;  // elements per K-quant superblock
constexpr std::size_t kQ5_0 = 22;    // fp16 d, uint32 qh, uint8 qs[16]
constexpr std::size_t kQ5_1 = 24;    // fp16 d, fp16 m, uint32 qh, uint8 qs[16]
constexpr std::size_t kQ2_K = 84;    // uint8 scales[16], qs[64], fp16 d, fp16 dmin
constexpr std::size_t kQ3_K = 110;   // uint8 hmask[32], qs[64], scales[12], fp16 d
constexpr std::size_t kQ4_K = 144;   // fp16 d, fp16 dmin, uint8 scales[12], qs[128]
constexpr std::size_t kQ5_K = 176;   // fp16 d, fp16 dmin, uint8 scales[12], qh[32], qs[128]
constexpr std::size_t kQ6_K = 210;   // uint8 ql[128], qh[64], int8 scales[16], fp16 d
constexpr std::size_t kQ8_K = 292;   // float32 d, int8 qs[256], int16 bsums[16]

std::uint8_t byte_at(const std::byte* p, std::size_t i) { return static_cast<std::uint8_t>(p[i]); }

// Q5_0 / Q5_1: element e's low 4 bits are nibble e / 16 of byte e % 16, its fifth bit is bit e of
// qh.
int q5_value(const std::byte* qh_at, const std::byte* qs, int e) {
  const std::uint32_t qh = load<std::uint32_t>(qh_at);
  const int low = (byte_at(qs, static_cast<std::size_t>(e % 16)) >> (4 * (e / 16))) & 0x0F;
  return low | static_cast<int>(((qh >> e) & 1u) << 4);
}

void dequantize_q5_0(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ5_0, dst += kQK) {
    const float d = load_fp16(src);
    for (int e = 0; e < kQK; ++e)
      dst[e] = d * static_cast<float>(q5_value(src + 2, src + 6, e) - 16);
  }
}

void dequantize_q5_1(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ5_1, dst += kQK) {
    const float d = load_fp16(src), m = load_fp16(src + 2);
    for (int e = 0; e < kQK; ++e) {
      const float scaled = d * static_cast<float>(q5_value(src + 4, src + 8, e));
      dst[e] = scaled + m;
    }
  }
}

void dequantize_q2_k(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ2_K, dst += kQK_K) {
    const std::byte* scales = src;
    const std::byte* qs = src + 16;
    const float d = load_fp16(src + 80), dmin = load_fp16(src + 82);
    for (int e = 0; e < kQK_K; ++e) {
      // Element e = half · 128 + shift · 32 + l: two bits at 2 · shift of qs[half · 32 + l].
      const int half = e / 128, shift = (e % 128) / 32, l = e % 32;
      const int q = (byte_at(qs, static_cast<std::size_t>(half * 32 + l)) >> (2 * shift)) & 3;
      const std::uint8_t sc = byte_at(scales, static_cast<std::size_t>(e / 16));
      const float dl = d * static_cast<float>(sc & 0x0F);
      const float ml = dmin * static_cast<float>(sc >> 4);
      const float scaled = dl * static_cast<float>(q);
      dst[e] = scaled - ml;
    }
  }
}

void dequantize_q3_k(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ3_K, dst += kQK_K) {
    const std::byte* hmask = src;
    const std::byte* qs = src + 32;
    const std::byte* packed = src + 96;  // 16 six-bit scales: low nibbles, then 2-bit highs
    const float d = load_fp16(src + 108);
    float dl[16];
    for (int j = 0; j < 16; ++j) {
      const int low = j < 8 ? byte_at(packed, static_cast<std::size_t>(j)) & 0x0F
                            : byte_at(packed, static_cast<std::size_t>(j - 8)) >> 4;
      const int high = (byte_at(packed, static_cast<std::size_t>(8 + j % 4)) >> (2 * (j / 4))) & 3;
      dl[j] = d * static_cast<float>((low | (high << 4)) - 32);
    }
    for (int e = 0; e < kQK_K; ++e) {
      const int half = e / 128, shift = (e % 128) / 32, l = e % 32;
      const int low = (byte_at(qs, static_cast<std::size_t>(half * 32 + l)) >> (2 * shift)) & 3;
      // The high bit set means no offset; clear means − 4.
      const int high = (byte_at(hmask, static_cast<std::size_t>(l)) >> (e / 32)) & 1;
      dst[e] = dl[e / 16] * static_cast<float>(low - (high ? 0 : 4));
    }
  }
}

// Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes.
void k4_scales(const std::byte* packed, int (&sc)[8], int (&mn)[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = byte_at(packed, static_cast<std::size_t>(j)) & 0x3F;
    mn[j] = byte_at(packed, static_cast<std::size_t>(j + 4)) & 0x3F;
    const int both = byte_at(packed, static_cast<std::size_t>(j + 8));
    sc[j + 4] = (both & 0x0F) | ((byte_at(packed, static_cast<std::size_t>(j)) >> 2) & 0x30);
    mn[j + 4] = (both >> 4) | ((byte_at(packed, static_cast<std::size_t>(j + 4)) >> 2) & 0x30);
  }
}

// Q4_K (qh null) and Q5_K: element e = chunk · 64 + nibble · 32 + l is nibble `nibble` of
// qs[chunk · 32 + l] (plus bit e / 32 of qh[l] as its fifth bit), in sub-block e / 32.
void dequantize_k4_k5(const std::byte* src, float* dst, const std::byte* qh, const std::byte* qs) {
  const float d = load_fp16(src), dmin = load_fp16(src + 2);
  int sc[8], mn[8];
  k4_scales(src + 4, sc, mn);
  for (int e = 0; e < kQK_K; ++e) {
    const int chunk = e / 64, nibble = (e % 64) / 32, l = e % 32, sub = e / 32;
    int q = (byte_at(qs, static_cast<std::size_t>(chunk * 32 + l)) >> (4 * nibble)) & 0x0F;
    if (qh != nullptr) q |= ((byte_at(qh, static_cast<std::size_t>(l)) >> sub) & 1) << 4;
    const float scale = d * static_cast<float>(sc[sub]);
    const float min = dmin * static_cast<float>(mn[sub]);
    const float scaled = scale * static_cast<float>(q);
    dst[e] = scaled - min;
  }
}

void dequantize_q4_k(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ4_K, dst += kQK_K)
    dequantize_k4_k5(src, dst, nullptr, src + 16);
}

void dequantize_q5_k(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ5_K, dst += kQK_K)
    dequantize_k4_k5(src, dst, src + 16, src + 48);
}

void dequantize_q6_k(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ6_K, dst += kQK_K) {
    const std::byte* ql = src;
    const std::byte* qh = src + 128;
    const std::byte* scales = src + 192;
    const float d = load_fp16(src + 208);
    for (int e = 0; e < kQK_K; ++e) {
      // Low 4 bits: nibble (e % 128) / 64 of ql[half · 64 + e % 64]; high 2 bits: bits
      // 2 · ((e % 128) / 32) of qh[half · 32 + e % 32].
      const int half = e / 128, r = e % 128;
      const int low =
          (byte_at(ql, static_cast<std::size_t>(half * 64 + r % 64)) >> (4 * (r / 64))) & 0x0F;
      const int high =
          (byte_at(qh, static_cast<std::size_t>(half * 32 + r % 32)) >> (2 * (r / 32))) & 3;
      const auto sc = static_cast<std::int8_t>(byte_at(scales, static_cast<std::size_t>(e / 16)));
      const float scale = d * static_cast<float>(sc);
      dst[e] = scale * static_cast<float>((low | (high << 4)) - 32);
    }
  }
}

void dequantize_q8_k(const std::byte* src, float* dst, std::int64_t blocks) {
  for (std::int64_t b = 0; b < blocks; ++b, src += kQ8_K, dst += kQK_K) {
    const float d = load<float>(src);
    for (int e = 0; e < kQK_K; ++e)
      dst[e] = d * static_cast<float>(
                       static_cast<std::int8_t>(byte_at(src + 4, static_cast<std::size_t>(e))));
  }
}

// The kernels behind dequantize_row, for a served type and whole blocks (checked by the caller);
// it never throws, so it can run inside an OpenMP loop.
void dequantize_checked(GgufType type, const std::byte* src, float* dst,
                        std::int64_t count) noexcept {
  switch (type) {
    case GgufType::kF32:
      std::memcpy(dst, src, static_cast<std::size_t>(count) * sizeof(float));
      return;
    case GgufType::kF16:
      for (std::int64_t j = 0; j < count; ++j) dst[j] = load_fp16(src + 2 * j);
      return;
    case GgufType::kBF16:
      for (std::int64_t j = 0; j < count; ++j)
        dst[j] = bf16_to_float(bfloat16{load<std::uint16_t>(src + 2 * j)});
      return;
    case GgufType::kQ8_0:
      dequantize_q8_0(src, dst, count / kQK);
      return;
    case GgufType::kQ4_0:
      dequantize_q4_0(src, dst, count / kQK);
      return;
    case GgufType::kQ4_1:
      dequantize_q4_1(src, dst, count / kQK);
      return;
    case GgufType::kQ5_0:
      dequantize_q5_0(src, dst, count / kQK);
      return;
    case GgufType::kQ5_1:
      dequantize_q5_1(src, dst, count / kQK);
      return;
    case GgufType::kQ2_K:
      dequantize_q2_k(src, dst, count / kQK_K);
      return;
    case GgufType::kQ3_K:
      dequantize_q3_k(src, dst, count / kQK_K);
      return;
    case GgufType::kQ4_K:
      dequantize_q4_k(src, dst, count / kQK_K);
      return;
    case GgufType::kQ5_K:
      dequantize_q5_k(src, dst, count / kQK_K);
      return;
    case GgufType::kQ6_K:
      dequantize_q6_k(src, dst, count / kQK_K);
      return;
    case GgufType::kQ8_K:
      dequantize_q8_k(src, dst, count / kQK_K);
      return;
    default:
      return;  // unreachable: callers check is_served first
  }
}

// --- metadata value types ------------------------------------------------------------------------

constexpr std::uint32_t kValueTypeCount = 13;  // 0 uint8 ... 12 float64

std::string_view value_type_name(ValueType type) {
  switch (type) {
    case ValueType::kUInt8:
      return "uint8";
    case ValueType::kInt8:
      return "int8";
    case ValueType::kUInt16:
      return "uint16";
    case ValueType::kInt16:
      return "int16";
    case ValueType::kUInt32:
      return "uint32";
    case ValueType::kInt32:
      return "int32";
    case ValueType::kFloat32:
      return "float32";
    case ValueType::kBool:
      return "bool";
    case ValueType::kString:
      return "string";
    case ValueType::kArray:
      return "array";
    case ValueType::kUInt64:
      return "uint64";
    case ValueType::kInt64:
      return "int64";
    case ValueType::kFloat64:
      return "float64";
  }
  return "?";
}

// "uint32", "array of string", "array of array": for error messages.
std::string describe(const GgufValue& value) {
  if (value.type != ValueType::kArray) return std::string(value_type_name(value.type));
  return detail::concat("array of ", value_type_name(value.array_type));
}

// The fewest bytes one value of `type` takes in the file: what a count is checked against.
std::uint64_t min_value_bytes(ValueType type) {
  switch (type) {
    case ValueType::kUInt8:
    case ValueType::kInt8:
    case ValueType::kBool:
      return 1;
    case ValueType::kUInt16:
    case ValueType::kInt16:
      return 2;
    case ValueType::kUInt32:
    case ValueType::kInt32:
    case ValueType::kFloat32:
      return 4;
    case ValueType::kUInt64:
    case ValueType::kInt64:
    case ValueType::kFloat64:
    case ValueType::kString:  // uint64 length
      return 8;
    case ValueType::kArray:  // uint32 element type + uint64 count
      return 12;
  }
  return 1;
}

bool is_unsigned(ValueType t) {
  return t == ValueType::kUInt8 || t == ValueType::kUInt16 || t == ValueType::kUInt32 ||
         t == ValueType::kUInt64;
}
bool is_signed(ValueType t) {
  return t == ValueType::kInt8 || t == ValueType::kInt16 || t == ValueType::kInt32 ||
         t == ValueType::kInt64;
}
bool is_integer(ValueType t) { return is_unsigned(t) || is_signed(t); }

// Arrays of arrays recurse; the depth is bounded so a file of nested headers cannot exhaust the
// stack. Real files use one level (token lists); a few more are allowed.
constexpr int kMaxArrayDepth = 16;

// Length of the well-formed UTF-8 sequence at the start of `text` (1 to 4), or 0 when it is not
// one (a stray continuation byte, an overlong form, a surrogate, a value past U+10FFFF).
std::size_t utf8_length(std::string_view text) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  std::size_t length = 0;
  unsigned char low = 0x80, high = 0xBF;  // the allowed range of the second byte
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;   // no overlong forms
    if (lead == 0xED) high = 0x9F;  // no surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;  // nothing past U+10FFFF
  } else {
    return 0;
  }
  if (text.size() < length || byte(1) < low || byte(1) > high) return 0;
  for (std::size_t i = 2; i < length; ++i)
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  return length;
}

// A key or name for an error message: cut short, with control bytes and bytes that are not UTF-8
// escaped, so a hostile string can neither flood nor garble the message.
std::string quote(std::string_view text) {
  constexpr std::size_t kMax = 80;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "'";
  std::size_t i = 0;
  while (i < text.size() && i < kMax) {
    const auto c = static_cast<unsigned char>(text[i]);
    const std::size_t length = utf8_length(text.substr(i));
    if (length == 0 || c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
      ++i;
    } else {
      out.append(text.substr(i, length));
      i += length;
    }
  }
  if (i < text.size()) out += "...";
  out += "'";
  return out;
}

std::string ne_text(const std::vector<std::int64_t>& ne) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < ne.size(); ++i) out << (i ? ", " : "") << ne[i];
  out << ']';
  return out.str();
}

}  // namespace

// Fills and walks GgufValue::Array's private fields: the reader below keeps each array's bytes as
// the file encodes them instead of a GgufValue per element (about 100 bytes each).
namespace detail {

struct GgufArrayAccess {
  // Holds `count` elements of `type` encoded in bytes[0, size); `offsets` are the element starts
  // for strings and arrays (empty: found by walking the bytes).
  static void fill(GgufValue::Array& array, ValueType type, std::uint64_t count,
                   const std::byte* bytes, std::uint64_t size, std::vector<std::uint64_t> offsets) {
    array.type_ = type;
    array.count_ = static_cast<std::size_t>(count);
    array.bytes_.assign(bytes, bytes + size);
    const bool variable = type == ValueType::kString || type == ValueType::kArray;
    if (variable && offsets.empty() && count > 0) {
      offsets.reserve(static_cast<std::size_t>(count));
      std::uint64_t pos = 0;
      for (std::uint64_t k = 0; k < count; ++k) {
        offsets.push_back(pos);
        pos += extent(bytes + pos, size - pos, type);
      }
    }
    array.offsets_ = std::move(offsets);
  }

  // Bytes of the one value of `type` at p (at most `size`); the bytes were validated when the
  // file was read, so running past `size` means a bug, reported rather than followed.
  static std::uint64_t extent(const std::byte* p, std::uint64_t size, ValueType type) {
    const auto need = [&](std::uint64_t n) {
      KVCACHE_CHECK(n <= size, "GGUF array: an element runs past its array's bytes");
    };
    if (type == ValueType::kString) {
      need(8);
      const auto length = load<std::uint64_t>(p);
      need(8 + length);
      return 8 + length;
    }
    if (type != ValueType::kArray) {
      need(min_value_bytes(type));
      return min_value_bytes(type);
    }
    need(12);
    const auto element = static_cast<ValueType>(load<std::uint32_t>(p));
    const auto count = load<std::uint64_t>(p + 4);
    std::uint64_t pos = 12;
    if (element != ValueType::kString && element != ValueType::kArray) {
      KVCACHE_CHECK(count <= (size - pos) / min_value_bytes(element),
                    "GGUF array: an element runs past its array's bytes");
      return pos + count * min_value_bytes(element);
    }
    for (std::uint64_t k = 0; k < count; ++k) pos += extent(p + pos, size - pos, element);
    return pos;
  }
};

}  // namespace detail

namespace {

// A bounds-checked cursor over the mapped file. `context` names what is being read (the header,
// a metadata key, a tensor) and leads every error message after the file's path.
class Reader {
 public:
  Reader(const std::string& path, const std::byte* bytes, std::uint64_t size)
      : path_(path), bytes_(bytes), size_(size) {}

  std::uint64_t offset() const { return pos_; }
  std::uint64_t remaining() const { return size_ - pos_; }
  void set_context(std::string context) { context_ = std::move(context); }

  // Prefix for error messages: "GGUF <path>: <context>".
  std::string where() const { return detail::concat("GGUF ", path_, ": ", context_); }

  void need(std::uint64_t n, std::string_view what) const {
    KVCACHE_CHECK(n <= remaining(), where(), ": expected ", n, " bytes for ", what, " at offset ",
                  pos_, ", but only ", remaining(), " remain (the file has ", size_, " bytes)");
  }

  template <class T>
  T read(std::string_view what) {
    need(sizeof(T), what);
    const T value = load<T>(bytes_ + pos_);
    pos_ += sizeof(T);
    return value;
  }

  std::string read_string(std::string_view what) {
    const auto length = read<std::uint64_t>(what);
    need(length, what);
    std::string text(reinterpret_cast<const char*>(bytes_ + pos_),
                     static_cast<std::size_t>(length));
    pos_ += length;
    return text;
  }

  ValueType read_value_type(std::string_view what) {
    const auto number = read<std::uint32_t>(what);
    KVCACHE_CHECK(number < kValueTypeCount, where(), ": unknown ", what, " ", number,
                  " (expected 0..12: uint8, int8, uint16, int16, uint32, int32, float32, bool, "
                  "string, array, uint64, int64, float64)");
    return static_cast<ValueType>(number);
  }

  // `keep` false validates and steps over a value without building it: the elements of an array,
  // whose bytes the array keeps instead (GgufValue::Array).
  GgufValue read_value(ValueType type, int depth, bool keep = true) {
    GgufValue value;
    value.type = type;
    switch (type) {
      case ValueType::kUInt8:
        value.u = read<std::uint8_t>("a uint8 value");
        break;
      case ValueType::kInt8:
        value.i = read<std::int8_t>("an int8 value");
        break;
      case ValueType::kUInt16:
        value.u = read<std::uint16_t>("a uint16 value");
        break;
      case ValueType::kInt16:
        value.i = read<std::int16_t>("an int16 value");
        break;
      case ValueType::kUInt32:
        value.u = read<std::uint32_t>("a uint32 value");
        break;
      case ValueType::kInt32:
        value.i = read<std::int32_t>("an int32 value");
        break;
      case ValueType::kUInt64:
        value.u = read<std::uint64_t>("a uint64 value");
        break;
      case ValueType::kInt64:
        value.i = read<std::int64_t>("an int64 value");
        break;
      case ValueType::kFloat32:
        value.f = read<float>("a float32 value");
        break;
      case ValueType::kFloat64:
        value.f = read<double>("a float64 value");
        break;
      case ValueType::kBool: {
        const auto byte = read<std::uint8_t>("a bool value");
        KVCACHE_CHECK(byte <= 1, where(), ": expected a bool of 0 or 1 at offset ", pos_ - 1,
                      ", got ", static_cast<int>(byte));
        value.b = byte != 0;
        break;
      }
      case ValueType::kString:
        if (keep) {
          value.s = read_string("a string value");
        } else {
          const auto length = read<std::uint64_t>("a string value");
          need(length, "a string value");
          pos_ += length;
        }
        break;
      case ValueType::kArray: {
        KVCACHE_CHECK(depth < kMaxArrayDepth, where(), ": arrays nest deeper than ", kMaxArrayDepth,
                      " levels at offset ", pos_);
        value.array_type = read_value_type("array element type");
        const auto count = read<std::uint64_t>("the array's length");
        // The count is checked against the bytes left before anything is allocated for it.
        const std::uint64_t each = min_value_bytes(value.array_type);
        KVCACHE_CHECK(count <= remaining() / each, where(), ": an array of ", count, " ",
                      value_type_name(value.array_type), " values (at least ", each,
                      " bytes each) does not fit the ", remaining(), " bytes left at offset ",
                      pos_);
        // The elements stay as the file encodes them (about one byte a uint8, not a GgufValue);
        // strings and nested arrays are validated one by one and their starts recorded.
        const std::uint64_t begin = pos_;
        const bool variable =
            value.array_type == ValueType::kString || value.array_type == ValueType::kArray;
        std::vector<std::uint64_t> offsets;
        if (keep && variable) offsets.reserve(static_cast<std::size_t>(count));
        if (!variable && value.array_type != ValueType::kBool) {
          pos_ += count * each;  // fits: count <= remaining() / each
        } else {
          for (std::uint64_t k = 0; k < count; ++k) {
            if (keep && variable) offsets.push_back(pos_ - begin);
            (void)read_value(value.array_type, depth + 1, /*keep=*/false);
          }
        }
        if (keep) {
          detail::GgufArrayAccess::fill(value.array, value.array_type, count, bytes_ + begin,
                                        pos_ - begin, std::move(offsets));
        }
        break;
      }
    }
    return value;
  }

 private:
  const std::string& path_;
  const std::byte* bytes_;
  std::uint64_t size_;
  std::uint64_t pos_ = 0;
  std::string context_ = "header";
};

// An integer value as int64, or an error naming the key when it does not fit.
std::int64_t to_int64(const std::string& where, const GgufValue& value) {
  if (is_signed(value.type)) return value.i;
  KVCACHE_CHECK(value.u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                where, ": expected an integer that fits int64, got ", value.u);
  return static_cast<std::int64_t>(value.u);
}

}  // namespace

// --- compact arrays (GgufValue::Array) -----------------------------------------------------------

// Element i decoded from the bytes the file stored it in (validated when the file was read).
GgufValue GgufValue::Array::operator[](std::size_t i) const {
  KVCACHE_CHECK(i < count_, "GGUF array: expected an index below ", count_, ", got ", i);
  const bool variable = type_ == ValueType::kString || type_ == ValueType::kArray;
  const std::size_t begin = variable ? static_cast<std::size_t>(offsets_[i])
                                     : i * static_cast<std::size_t>(min_value_bytes(type_));
  const std::size_t end =
      variable ? (i + 1 < count_ ? static_cast<std::size_t>(offsets_[i + 1]) : bytes_.size())
               : begin + static_cast<std::size_t>(min_value_bytes(type_));
  const std::byte* p = bytes_.data() + begin;
  GgufValue value;
  value.type = type_;
  switch (type_) {
    case ValueType::kUInt8:
      value.u = load<std::uint8_t>(p);
      break;
    case ValueType::kInt8:
      value.i = load<std::int8_t>(p);
      break;
    case ValueType::kUInt16:
      value.u = load<std::uint16_t>(p);
      break;
    case ValueType::kInt16:
      value.i = load<std::int16_t>(p);
      break;
    case ValueType::kUInt32:
      value.u = load<std::uint32_t>(p);
      break;
    case ValueType::kInt32:
      value.i = load<std::int32_t>(p);
      break;
    case ValueType::kUInt64:
      value.u = load<std::uint64_t>(p);
      break;
    case ValueType::kInt64:
      value.i = load<std::int64_t>(p);
      break;
    case ValueType::kFloat32:
      value.f = load<float>(p);
      break;
    case ValueType::kFloat64:
      value.f = load<double>(p);
      break;
    case ValueType::kBool:
      value.b = load<std::uint8_t>(p) != 0;
      break;
    case ValueType::kString:
      value.s.assign(reinterpret_cast<const char*>(p + 8), end - begin - 8);
      break;
    case ValueType::kArray:
      value.array_type = static_cast<ValueType>(load<std::uint32_t>(p));
      detail::GgufArrayAccess::fill(value.array, value.array_type, load<std::uint64_t>(p + 4),
                                    p + 12, end - begin - 12, {});
      break;
  }
  return value;
}

// --- public helpers ------------------------------------------------------------------------------

std::string gguf_type_name(GgufType type) {
  const TypeInfo* info = find_type(static_cast<std::uint32_t>(type));
  if (info == nullptr) return detail::concat("type ", static_cast<std::uint32_t>(type));
  return std::string(info->name);
}

std::int64_t gguf_block_size(GgufType type) { return type_info(type).block_size; }

std::uint64_t gguf_type_bytes(GgufType type, std::int64_t count) {
  const TypeInfo& info = type_info(type);
  const auto bytes = bytes_of(info, count);
  KVCACHE_CHECK(bytes.has_value(), "GGUF tensor type ", info.name, ": expected a count of ",
                info.block_size == 1 ? "elements >= 0"
                                     : detail::concat("whole ", info.block_size, "-element blocks"),
                " whose bytes fit 64 bits, got ", count);
  return *bytes;
}

void dequantize_row(GgufType type, const void* src, float* dst, std::int64_t count) {
  const TypeInfo& info = type_info(type);
  KVCACHE_CHECK(is_served(type), "GGUF tensor type ", info.name,
                " is not supported yet (served: ", kServedTypes, ")");
  KVCACHE_CHECK(count >= 0 && count % info.block_size == 0, "dequantize_row: ", info.name,
                " expects a count of whole ", info.block_size, "-element blocks, got ", count);
  dequantize_checked(type, static_cast<const std::byte*>(src), dst, count);
}

std::int64_t GgufTensorInfo::numel() const {
  std::int64_t count = 1;
  for (const std::int64_t size : ne) count *= size;
  return count;
}

// --- GgufFile ------------------------------------------------------------------------------------

GgufFile GgufFile::open(const std::string& path) {
  return detail::out_of_memory_as_error("GgufFile::open", [&]() -> GgufFile {
    GgufFile file;
    file.path_ = path;

    constexpr std::uint64_t kHeaderBytes = 4 + 4 + 8 + 8;  // magic, version, two counts
    const auto mapping = detail::MappedFile::open(path, "GGUF", kHeaderBytes,
                                                  "magic, version, tensor and metadata counts");
    file.mapping_ = mapping;
    const std::uint64_t file_size = mapping->size();
    const std::byte* bytes = mapping->bytes();
    Reader in(file.path_, bytes, file_size);

    // --- header ---
    if (std::memcmp(bytes, "GGUF", 4) != 0) {
      KVCACHE_FAIL("GGUF ", path, ": expected the magic 'GGUF' at the start, got ",
                   quote(std::string_view(reinterpret_cast<const char*>(bytes), 4)),
                   " (not a GGUF file)");
    }
    (void)in.read<std::uint32_t>("the magic");
    file.version_ = in.read<std::uint32_t>("the version");
    if (file.version_ != 2 && file.version_ != 3) {
      const std::uint32_t swapped = __builtin_bswap32(file.version_);
      KVCACHE_CHECK(swapped != 2 && swapped != 3, "GGUF ", path, ": the version reads as ",
                    file.version_, " little-endian and ", swapped,
                    " big-endian; big-endian GGUF files are not supported");
      KVCACHE_FAIL(
          "GGUF ", path, ": expected version 2 or 3, got ", file.version_,
          file.version_ == 1 ? " (version 1 used 32-bit counts and is not supported)" : "");
    }
    const auto tensor_count = in.read<std::uint64_t>("the tensor count");
    const auto kv_count = in.read<std::uint64_t>("the metadata count");
    // Each metadata entry takes at least a key length, a value type and one value byte; each tensor
    // info at least a name length, n_dims, a type and an offset. Both counts must fit what remains.
    constexpr std::uint64_t kMinKv = 8 + 4 + 1;
    constexpr std::uint64_t kMinTensorInfo = 8 + 4 + 4 + 8;
    KVCACHE_CHECK(kv_count <= in.remaining() / kMinKv, "GGUF ", path, ": header: ", kv_count,
                  " metadata entries (at least ", kMinKv, " bytes each) do not fit the ",
                  in.remaining(), " bytes after the header");
    KVCACHE_CHECK(tensor_count <= (in.remaining() - kv_count * kMinKv) / kMinTensorInfo, "GGUF ",
                  path, ": header: ", tensor_count, " tensor infos (at least ", kMinTensorInfo,
                  " bytes each) and ", kv_count, " metadata entries do not fit the ",
                  in.remaining(), " bytes after the header");

    // --- metadata ---
    for (std::uint64_t k = 0; k < kv_count; ++k) {
      in.set_context(detail::concat("metadata entry ", k, " (of ", kv_count, ")"));
      std::string key = in.read_string("the key");
      in.set_context(detail::concat("metadata key ", quote(key)));
      KVCACHE_CHECK(!file.metadata_.contains(key), in.where(), ": the key appears twice");
      const ValueType type = in.read_value_type("value type");
      file.metadata_.emplace(std::move(key), in.read_value(type, 0));
    }

    if (const GgufValue* alignment = file.find("general.alignment")) {
      const std::string where = detail::concat("GGUF ", path, ": metadata key 'general.alignment'");
      KVCACHE_CHECK(alignment->type == ValueType::kUInt32, where, ": expected a uint32, got ",
                    describe(*alignment));
      KVCACHE_CHECK(alignment->u != 0 && std::has_single_bit(alignment->u), where,
                    ": expected a power of two, got ", alignment->u);
      file.alignment_ = alignment->u;
    }

    // --- tensor infos ---
    file.tensors_.reserve(static_cast<std::size_t>(tensor_count));
    for (std::uint64_t t = 0; t < tensor_count; ++t) {
      in.set_context(detail::concat("tensor info ", t, " (of ", tensor_count, ")"));
      GgufTensorInfo info;
      info.name = in.read_string("the name");
      in.set_context(detail::concat("tensor ", quote(info.name)));
      const std::string where = in.where();
      KVCACHE_CHECK(!file.tensor_index_.contains(info.name), where, ": the name appears twice");

      const auto n_dims = in.read<std::uint32_t>("n_dims");
      KVCACHE_CHECK(n_dims <= static_cast<std::uint32_t>(kMaxRank), where, ": expected at most ",
                    kMaxRank, " dimensions, got n_dims = ", n_dims);
      bool overflow = false;
      std::int64_t numel = 1;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto size = in.read<std::int64_t>("a dimension size");
        KVCACHE_CHECK(size >= 0, where, ": expected sizes >= 0, got ne[", d, "] = ", size);
        info.ne.push_back(size);
        overflow = overflow || __builtin_mul_overflow(numel, size, &numel);
      }
      KVCACHE_CHECK(!overflow, where, ": ne = ", ne_text(info.ne),
                    " has more elements than int64 can count");

      const auto type_number = in.read<std::uint32_t>("the tensor type");
      const TypeInfo* type = find_type(type_number);
      KVCACHE_CHECK(type != nullptr, where, ": unknown tensor type ", type_number,
                    " (expected a ggml type: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, 30 BF16, ...)");
      info.type = type->type;
      // Blocks run along ne[0] (a row); a scalar (n_dims = 0) is a row of one element.
      const std::int64_t row = info.ne.empty() ? 1 : info.ne[0];
      KVCACHE_CHECK(row % type->block_size == 0, where, ": ", type->name, " stores blocks of ",
                    type->block_size, " elements along ne[0], but ne = ", ne_text(info.ne));
      const auto nbytes = bytes_of(*type, numel);
      KVCACHE_CHECK(nbytes.has_value(), where, ": ", type->name, " x ", ne_text(info.ne),
                    " has more bytes than a file can hold");
      info.nbytes = *nbytes;

      info.offset = in.read<std::uint64_t>("the data offset");
      KVCACHE_CHECK(info.offset % file.alignment_ == 0, where,
                    ": expected a data offset that is a ", "multiple of the alignment ",
                    file.alignment_, ", got ", info.offset);
      file.tensor_index_.emplace(info.name, file.tensors_.size());
      file.tensors_.push_back(std::move(info));
    }

    // --- data section: after the tensor infos, padded to the alignment ---
    in.set_context("data section");
    const std::uint64_t infos_end = in.offset();
    // Overflow-safe round up: infos_end <= file_size, and the alignment is a power of two < 2^32.
    const std::uint64_t data_start =
        (infos_end + file.alignment_ - 1) / file.alignment_ * file.alignment_;
    // A file without tensors may end before the padding (llama.cpp writes metadata-only files so);
    // with tensors the data section must start inside the file.
    KVCACHE_CHECK(tensor_count == 0 || data_start <= file_size, in.where(),
                  ": expected to start at ", data_start, " (the tensor infos end at ", infos_end,
                  ", padded to the alignment ", file.alignment_, "), but the file has ", file_size,
                  " bytes");
    const std::uint64_t data_size = data_start <= file_size ? file_size - data_start : 0;
    file.data_begin_ = bytes + std::min(data_start, file_size);

    for (const GgufTensorInfo& info : file.tensors_) {
      KVCACHE_CHECK(info.offset <= data_size && info.nbytes <= data_size - info.offset, "GGUF ",
                    path, ": tensor ", quote(info.name), ": ", gguf_type_name(info.type), " x ",
                    ne_text(info.ne), " needs bytes [", info.offset, ", ", info.offset, " + ",
                    info.nbytes, ") of the data section, which has ", data_size,
                    " bytes (it starts at file offset ", data_start, ")");
    }
    // No two tensors may share bytes: sorted by offset, each must start at or after the end of the
    // one before. Empty tensors hold no bytes and cannot overlap.
    std::vector<std::size_t> order(file.tensors_.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::erase_if(order, [&](std::size_t i) { return file.tensors_[i].nbytes == 0; });
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return file.tensors_[a].offset < file.tensors_[b].offset;
    });
    for (std::size_t k = 1; k < order.size(); ++k) {
      const GgufTensorInfo& prev = file.tensors_[order[k - 1]];
      const GgufTensorInfo& next = file.tensors_[order[k]];
      KVCACHE_CHECK(next.offset >= prev.offset + prev.nbytes, "GGUF ", path, ": tensors ",
                    quote(prev.name), " (data bytes [", prev.offset, ", ",
                    prev.offset + prev.nbytes, ")) and ", quote(next.name), " (data bytes [",
                    next.offset, ", ", next.offset + next.nbytes, ")) overlap");
    }
    return file;
  });
}

const GgufValue* GgufFile::find(const std::string& key) const {
  const auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::optional<std::int64_t> GgufFile::get_int(const std::string& key) const {
  const GgufValue* value = find(key);
  if (value == nullptr) return std::nullopt;
  const std::string where = detail::concat("GGUF ", path_, ": metadata key ", quote(key));
  KVCACHE_CHECK(is_integer(value->type), where, ": expected an integer, got ", describe(*value));
  return to_int64(where, *value);
}

std::optional<double> GgufFile::get_float(const std::string& key) const {
  const GgufValue* value = find(key);
  if (value == nullptr) return std::nullopt;
  const std::string where = detail::concat("GGUF ", path_, ": metadata key ", quote(key));
  if (value->type == ValueType::kFloat32 || value->type == ValueType::kFloat64) return value->f;
  KVCACHE_CHECK(is_integer(value->type), where, ": expected a number, got ", describe(*value));
  return is_signed(value->type) ? static_cast<double>(value->i) : static_cast<double>(value->u);
}

std::optional<std::string> GgufFile::get_string(const std::string& key) const {
  const GgufValue* value = find(key);
  if (value == nullptr) return std::nullopt;
  KVCACHE_CHECK(value->type == ValueType::kString, "GGUF ", path_, ": metadata key ", quote(key),
                ": expected a string, got ", describe(*value));
  return value->s;
}

std::optional<bool> GgufFile::get_bool(const std::string& key) const {
  const GgufValue* value = find(key);
  if (value == nullptr) return std::nullopt;
  KVCACHE_CHECK(value->type == ValueType::kBool, "GGUF ", path_, ": metadata key ", quote(key),
                ": expected a bool, got ", describe(*value));
  return value->b;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufValue* value = find(key);
  if (value == nullptr) return {};
  KVCACHE_CHECK(value->type == ValueType::kArray && value->array_type == ValueType::kString,
                "GGUF ", path_, ": metadata key ", quote(key),
                ": expected an array of string, got ", describe(*value));
  std::vector<std::string> out;
  out.reserve(value->array.size());
  for (std::size_t k = 0; k < value->array.size(); ++k) out.push_back(value->array[k].s);
  return out;
}

std::vector<std::int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufValue* value = find(key);
  if (value == nullptr) return {};
  const std::string where = detail::concat("GGUF ", path_, ": metadata key ", quote(key));
  KVCACHE_CHECK(value->type == ValueType::kArray && is_integer(value->array_type), where,
                ": expected an array of integers, got ", describe(*value));
  std::vector<std::int64_t> out;
  out.reserve(value->array.size());
  for (std::size_t k = 0; k < value->array.size(); ++k)
    out.push_back(to_int64(where, value->array[k]));
  return out;
}

const std::byte* GgufFile::data(const GgufTensorInfo& info) const {
  // Infos from tensors() were checked at open; one built by hand is checked here.
  const auto data_size =
      static_cast<std::uint64_t>(mapping_->bytes() + mapping_->size() - data_begin_);
  KVCACHE_CHECK(info.offset <= data_size && info.nbytes <= data_size - info.offset, "GGUF ", path_,
                ": tensor ", quote(info.name), ": bytes [", info.offset, ", ", info.offset, " + ",
                info.nbytes, ") lie outside the ", data_size, "-byte data section");
  return data_begin_ + info.offset;
}

Tensor GgufFile::to_float32(const std::string& name) const {
  const GgufTensorInfo* info = find_tensor(name);
  KVCACHE_CHECK(info != nullptr, "GGUF ", path_, ": no tensor ", quote(name), " (the file holds ",
                tensors_.size(), " tensors)");
  KVCACHE_CHECK(is_served(info->type), "GGUF ", path_, ": tensor ", quote(name),
                ": GGUF tensor type ", gguf_type_name(info->type),
                " is not supported yet (served: ", kServedTypes, ")");
  const std::vector<std::int64_t> shape = info->shape();
  Tensor out = Tensor::empty(Shape(shape.data(), shape.size()), DType::kFloat32);
  const std::int64_t row = info->ne.empty() ? 1 : info->ne[0];  // elements per row
  const std::int64_t rows = row == 0 ? 0 : info->numel() / row;
  const std::uint64_t row_bytes = gguf_type_bytes(info->type, row);
  const std::byte* src = data(*info);  // [rows, row_bytes]
  float* dst = out.data_as<float>();   // [rows, row]
  // Rows are independent; the embedding of the default model has 49152 of them. Small tensors
  // stay on one thread.
  constexpr std::int64_t kParallelElements = std::int64_t{1} << 16;
#pragma omp parallel for schedule(static) if (rows * row >= kParallelElements)
  for (std::int64_t r = 0; r < rows; ++r)
    dequantize_checked(info->type, src + static_cast<std::uint64_t>(r) * row_bytes, dst + r * row,
                       row);
  return out;
}

Tensor GgufFile::view(const std::string& name) const {
  const GgufTensorInfo* info = find_tensor(name);
  KVCACHE_CHECK(info != nullptr, "GGUF ", path_, ": no tensor ", quote(name), " (the file holds ",
                tensors_.size(), " tensors)");
  DType dtype;
  switch (info->type) {
    case GgufType::kF32:
      dtype = DType::kFloat32;
      break;
    case GgufType::kF16:
      dtype = DType::kFloat16;
      break;
    case GgufType::kBF16:
      dtype = DType::kBFloat16;
      break;
    default:
      KVCACHE_FAIL("GGUF ", path_, ": tensor ", quote(name),
                   ": view() serves F32, F16 and BF16 tensors in place, got ",
                   gguf_type_name(info->type), " (to_float32 dequantizes it)");
  }
  const std::byte* data_ptr = data(*info);
  // The mapping is page-aligned and offsets are multiples of the alignment, so data is aligned
  // unless the file chose an alignment smaller than the element.
  KVCACHE_CHECK(reinterpret_cast<std::uintptr_t>(data_ptr) % dtype_size(dtype) == 0, "GGUF ", path_,
                ": tensor ", quote(name), ": data at offset ", info->offset, " is not aligned for ",
                gguf_type_name(info->type), " (", dtype_size(dtype),
                " bytes; the file's alignment is ", alignment_, "); use to_float32");
  const std::vector<std::int64_t> shape = info->shape();
  // Read-only memory: writing through the view faults. The aliasing constructor shares ownership
  // of the whole mapping while pointing at the tensor.
  void* ptr = const_cast<std::byte*>(data_ptr);
  std::shared_ptr<void> storage(mapping_, ptr);
  return Tensor::from_storage(std::move(storage), ptr, Shape(shape.data(), shape.size()), dtype,
                              Device::kCpu);
}

}  // namespace kvcache
