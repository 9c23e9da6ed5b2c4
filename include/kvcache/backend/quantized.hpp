// Quantized weight matrices for the CPU backend: ggml's Q8_0, Q4_1, Q5_0, Q5_1 and K-quant (Q4_K,
// Q5_K, Q6_K) blocks kept as blocks in memory (not widened at load) and multiplied by kernels that
// read them directly, so a decode step reads 0.5625 (Q4_K) to 1.0625 (Q8_0) bytes per weight
// instead of 4 (float32) or 2 (bfloat16).
//
// Numerics, stated once here and in linear()'s comment:
// - Up to quantized_decode_rows() rows of x (decode and batched decode; 4 with AMX, 8–32 without):
//   each 32-element block of each x row is quantized to int8 with the float32 scale amax/127
//   (rounded to nearest, ties to even), as llama.cpp's q8 activations are; block dot products are
//   exact integers, scaled and summed in float32. The weights are used exactly; the error is x's
//   rounding (at most half a step, amax/254, per element). Past 4 rows the weights are read from
//   memory once per tile of 16 rows, which every group of 4 x rows then passes over in cache.
//   The K-quants' 32-weight sub-blocks (Q6_K: 16) meet x's 32-element blocks one to one.
// - More rows (prefill): for Q8_0 and Q4_1 with AMX-BF16 (Sapphire Rapids and later) each weight is
// dequantized
//   exactly (d·q + m in float32) and rounded to bfloat16, x is rounded to bfloat16 (elements below
//   float32's normal range, |x| < 2⁻¹²⁶, count as zero), and products are accumulated in float32
//   by the tile unit, starting from the bias. Without AMX, weights are dequantized exactly to
//   float32 a panel at a time and multiplied in float32 (no rounding beyond float32's).
// - Exact float32 throughout is one load option away (LoadOptions::dtype = kFloat32 dequantizes
//   every matrix once at load); the real-model parity tests use it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "kvcache/tensor.hpp"

namespace kvcache::cpu {

/// Block formats a QuantizedMatrix holds (ggml's, value for value), 32 weights a block:
///   Q8_0: fp16 scale d and 32 int8 q; weight = d·q.
///   Q4_1: fp16 scale d, fp16 minimum m and 32 4-bit q; weight = d·q + m.
///   Q5_0: fp16 d and 32 5-bit q; weight = d·(q − 16).
///   Q5_1: fp16 d, fp16 m and 32 5-bit q; weight = d·q + m.
/// and 256-weight superblocks (the K-quants):
///   Q4_K / Q5_K: fp16 d and dmin, 8 sub-blocks of 32 with 6-bit scale sc and min mn, 4-bit
///         (5-bit) q; weight = (d·sc)·q − (dmin·mn).
///   Q6_K: fp16 d, 16 sub-blocks of 16 with int8 scales sc, 6-bit q; weight = (d·sc)·(q − 32).
enum class QuantFormat : std::uint8_t { kQ8_0, kQ4_1, kQ5_0, kQ5_1, kQ4_K, kQ5_K, kQ6_K };

/// "Q8_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K" or "Q6_K".
std::string_view quant_format_name(QuantFormat format);

/// Weights per block of x (and per block or sub-block of the weights): 32 for every format.
constexpr std::int64_t kQuantBlock = 32;

/// Columns a row's length must be a multiple of: 32, or 256 for the K-quants' superblocks.
std::int64_t quant_row_granule(QuantFormat format);

/// Bytes of one ggml block (32 weights) or superblock (256, the K-quants): 34, 20, 22, 24, 144,
/// 176, 210.
std::size_t quant_block_bytes(QuantFormat format);

/// A [rows, cols] weight matrix held as quantized blocks along each row (cols a multiple of 32).
///
/// Layout (repacked from ggml's interleaved blocks so kernels load 64 payload bytes at a time):
/// each row is its blocks' payloads back to back — Q4_1: 16 bytes per block, ggml's nibble order
/// (byte i holds element i in its low nibble and element i + 16 in its high nibble); Q8_0: 32
/// bytes per block, each int8 stored as the unsigned byte q + 128 — then the blocks' fp16 scales,
/// then (Q4_1) the blocks' fp16 minimums. Q5_0 / Q5_1: the Q4_1 nibble payloads, then the fifth
/// bits regrouped per 4 blocks (the low 16 bits of each block's qh, then the high 16 bits, so one
/// 64-bit mask covers a 64-byte payload load), then the d's (and m's). K-quants keep ggml's
/// superblocks with each 32-weight sub-block's nibbles in Q4_1's order (Q5_K: its fifth bits
/// regrouped as Q5_0's; Q6_K: the 2-bit high parts of a 128-weight chunk in 32 bytes, byte k
/// holding those of the chunk's low-nibble bytes k and k + 32 and its high-nibble bytes k and
/// k + 32). A row takes exactly the bytes its ggml blocks take. Rows are contiguous. Copies share
/// the storage (it is never written after construction).
class QuantizedMatrix {
 public:
  QuantizedMatrix() = default;

  /// Copies ggml blocks (row-major: rows × cols/32 blocks, or cols/256 superblocks, as llama.cpp
  /// stores a [rows, cols] tensor) into the repacked layout. Throws kvcache::Error when cols is not
  /// a positive multiple of quant_row_granule(format), rows is not positive, or `blocks` does not
  /// hold exactly the bytes the shape needs.
  static QuantizedMatrix from_ggml(QuantFormat format, std::span<const std::byte> blocks,
                                   std::int64_t rows, std::int64_t cols);

  /// ggml's Q4_0 blocks (fp16 d, 32 4-bit q; weight = d·(q − 8)) held as Q4_1 with m = −8·d,
  /// which gives every weight bit for bit (q·d and 8·d are exact in float32, so is their sum) at
  /// 20 bytes per block instead of 18. Empty when some 8·d overflows fp16 (|d| > 8188); the
  /// caller dequantizes such a tensor instead. Sizes are checked as in from_ggml.
  static std::optional<QuantizedMatrix> from_ggml_q4_0(std::span<const std::byte> blocks,
                                                       std::int64_t rows, std::int64_t cols);

  /// ggml's Q5_0 blocks (fp16 d, 32 5-bit q; weight = d·(q − 16)) held as Q8_0 with the same d
  /// and q − 16 in −16..15 as its int8: every weight bit for bit, 34 bytes per block instead of 22,
  /// read by the Q8_0 kernels. Sizes are checked as in from_ggml. (The GGUF loader holds Q5_0 as
  /// kQ5_0 instead: the same values in 22 bytes, read by its own kernel.)
  static QuantizedMatrix from_ggml_q5_0(std::span<const std::byte> blocks, std::int64_t rows,
                                        std::int64_t cols);

  /// Quantizes a float [rows, cols] CPU tensor (float32/bfloat16/float16) with ggml's reference
  /// rounding (Q8_0: d = amax/127, q = round(w/d); Q4_1: d = (max−min)/15, m = min,
  /// q = round((w−m)/d) clamped to 0..15), for tests, benchmarks and float checkpoints run
  /// quantized. Only Q8_0 and Q4_1 (others throw).
  static QuantizedMatrix quantize(const Tensor& weight, QuantFormat format);

  /// Whether it holds a matrix (a default-constructed one does not).
  bool defined() const { return storage_.defined(); }
  /// The block format of its rows.
  QuantFormat format() const { return format_; }
  /// Rows (output features).
  std::int64_t rows() const { return rows_; }
  /// Columns (input features).
  std::int64_t cols() const { return cols_; }
  /// 32-value blocks per row.
  std::int64_t blocks_per_row() const { return cols_ / kQuantBlock; }
  /// Bytes of one row's blocks.
  std::size_t row_bytes() const { return row_bytes_; }
  /// Bytes of the whole matrix.
  std::size_t nbytes() const { return row_bytes_ * static_cast<std::size_t>(rows_); }
  /// "Q4_1 [576, 1536]".
  std::string describe() const;

  /// Start of row r's bytes (r checked).
  const std::uint8_t* row(std::int64_t r) const;

  /// The matrix with its rows reordered: row i of the result is row order[i] of this one. Every
  /// index is checked; the result may repeat or drop rows.
  QuantizedMatrix gather_rows(std::span<const std::int64_t> order) const;

  /// Rows [r0, r1) dequantized into dst ([r1 − r0, cols] row-major float32): exactly as ggml (and
  /// the GGUF reader) dequantizes, bit for bit. Range checked.
  void dequantize_rows(std::int64_t r0, std::int64_t r1, float* dst) const;

  /// The whole matrix as a float32 [rows, cols] tensor.
  Tensor dequantize() const;

 private:
  Tensor storage_;  // uint8 [rows, row_bytes]
  QuantFormat format_ = QuantFormat::kQ8_0;
  std::int64_t rows_ = 0, cols_ = 0;
  std::size_t row_bytes_ = 0;
};

/// A model's weight matrix [out, in]: dense (a float32/bfloat16/float16 tensor) or quantized.
/// Converts implicitly from either, so layers hold one type whatever the checkpoint held.
class Weight {
 public:
  Weight() = default;
  /// A dense weight (float32, bfloat16 or float16 [out, in]).
  Weight(Tensor dense) : dense_(std::move(dense)) {}  // NOLINT(google-explicit-constructor)
  /// A weight held as quantized blocks.
  Weight(QuantizedMatrix q) : quantized_(std::move(q)) {}  // NOLINT(google-explicit-constructor)

  /// Whether it holds a matrix.
  bool defined() const { return dense_.defined() || quantized_.defined(); }
  /// Whether it is held as quantized blocks (else dense).
  bool is_quantized() const { return quantized_.defined(); }
  /// The dense tensor (undefined when quantized).
  const Tensor& dense() const { return dense_; }
  /// The quantized blocks (undefined when dense).
  const QuantizedMatrix& quantized() const { return quantized_; }
  /// Rows (output features).
  std::int64_t rows() const;
  /// Columns (input features).
  std::int64_t cols() const;
  /// Bytes held.
  std::size_t nbytes() const;
  /// Where the bytes live, to tell tied weights apart (the same pointer means the same matrix).
  const void* data() const;
  /// "Q4_1 [576, 1536]" or the dense tensor's describe().
  std::string describe() const;

 private:
  Tensor dense_;
  QuantizedMatrix quantized_;
};

/// y = x · Wᵀ (+ bias) with W quantized: x [rows, in] contiguous float32, bias [out] float32 or
/// undefined; returns [rows, out] float32. Numerics as this header's opening comment says:
/// up to quantized_decode_rows() rows use int8 x per block (AVX-512 VNNI when the CPU has it,
/// portable C++ otherwise, same integers); more rows use AMX-BF16 when present, float32
/// otherwise. Threaded over outputs.
Tensor linear(const Tensor& x, const QuantizedMatrix& weight, const Tensor& bias = Tensor());

/// Rows of x up to which linear() runs the int8 block kernels for `format` on this CPU: 4 where
/// AMX-BF16 serves more rows (Q8_0, Q4_1); otherwise 32 for Q4_1, 16 for Q5_0 / Q5_1 and 8 for
/// Q8_0 and the K-quants; more rows take the prefill path (AMX for Q8_0 / Q4_1, else exact
/// float32 panels).
std::int64_t quantized_decode_rows(QuantFormat format);

/// linear() for either kind of weight.
Tensor linear(const Tensor& x, const Weight& weight, const Tensor& bias = Tensor());

/// Several projections of one x (q/k/v; gate/up): the same as linear(x, weights[i], biases[i])
/// for each i, but when every weight is quantized (in any formats) and x has at most
/// quantized_decode_rows() rows for each, x is quantized once per order the formats read (Q8_0's;
/// the nibble formats') and all outputs are computed in one parallel region (their rows split
/// across threads as one range), which saves a fork/join and a quantization per extra weight on
/// every decode step. `biases` is empty or has one (possibly undefined) tensor per weight.
std::vector<Tensor> linear_fused(const Tensor& x, std::span<const Weight* const> weights,
                                 std::span<const Tensor* const> biases = {});

/// Rows of a quantized `table` [vocab, hidden] picked by `ids` (int64, values checked), exactly
/// dequantized: returns [numel(ids), hidden] float32.
Tensor embedding(const QuantizedMatrix& table, const Tensor& ids);

/// embedding() for either kind of table.
Tensor embedding(const Weight& table, const Tensor& ids);

/// Instruction sets the quantized kernels can use, from least to most. The best one the CPU (and
/// the OS, for AMX's tile state) allows is used unless capped with set_cpu_isa_limit or, from the
/// start, with the environment variable KVCACHE_CPU_ISA=portable|avx512-vnni|amx.
enum class CpuIsa : std::uint8_t { kPortable, kAvx512Vnni, kAmx };

/// "portable", "avx512-vnni" or "amx".
std::string_view cpu_isa_name(CpuIsa isa);

/// The best instruction set this machine offers the kernels (detected once).
CpuIsa detected_cpu_isa();

/// Caps the instruction set the quantized kernels use (process-wide; for tests that compare the
/// paths and for debugging); kAmx lifts the cap. Returns the previous cap.
CpuIsa set_cpu_isa_limit(CpuIsa limit);

/// The instruction set in use: min(detected, limit).
CpuIsa active_cpu_isa();

}  // namespace kvcache::cpu
