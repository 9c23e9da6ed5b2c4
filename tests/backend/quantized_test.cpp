// Quantized weight matrices: repacking ggml blocks keeps every value (checked against the GGUF
// reader's dequantizer, itself checked against the gguf package), quantize() follows ggml's
// reference rounding, and linear() over quantized weights computes what its numerics promise —
// for up to quantized_decode_rows() rows (batched decode included), the exact block dot products
// of the weights with x quantized to int8 per block (both the AVX-512 VNNI and the portable
// kernel, against a float64 emulation), within the bound
// x's rounding allows of the float32 product; for more rows without AMX, the exact float32 product.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "kvcache/kvcache.hpp"
#include "kvcache/model/gguf.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using cpu::CpuIsa;
using cpu::QuantFormat;
using cpu::QuantizedMatrix;

// Random ggml blocks for [rows, cols]: every byte random except the fp16 scales (and minimums),
// which are kept finite and of a realistic size (a random 16-bit pattern may be NaN or huge).
std::vector<std::byte> random_ggml(QuantFormat format, std::int64_t rows, std::int64_t cols,
                                   std::mt19937& rng) {
  const std::size_t block = cpu::quant_block_bytes(format);
  const std::int64_t per_block = cpu::quant_row_granule(format);
  std::vector<std::byte> out(static_cast<std::size_t>(rows * cols / per_block) * block);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(-0.02f, 0.02f);
  auto put = [](std::byte* p, float v) {
    const std::uint16_t bits = float_to_fp16(v).bits;
    std::memcpy(p, &bits, 2);
  };
  for (std::size_t b = 0; b < out.size() / block; ++b) {
    std::byte* p = out.data() + b * block;
    for (std::size_t i = 0; i < block; ++i) p[i] = static_cast<std::byte>(byte(rng));
    switch (format) {
      case QuantFormat::kQ4_1:
      case QuantFormat::kQ5_1:
        put(p, std::fabs(scale(rng)));
        put(p + 2, scale(rng) * 8);
        break;
      case QuantFormat::kQ4_K:
      case QuantFormat::kQ5_K:
        // d·sc·q − dmin·mn with 6-bit sc and mn: scales of a sixtieth keep weights near ±0.5.
        put(p, std::fabs(scale(rng)) / 60);
        put(p + 2, std::fabs(scale(rng)) / 60);
        break;
      case QuantFormat::kQ6_K:
        put(p + 208, scale(rng) / 60);  // int8 scales up to ±128
        break;
      default:  // Q8_0, Q5_0
        put(p, std::fabs(scale(rng)));
    }
  }
  return out;
}

GgufType ggml_type(QuantFormat f) {
  switch (f) {
    case QuantFormat::kQ4_1:
      return GgufType::kQ4_1;
    case QuantFormat::kQ5_0:
      return GgufType::kQ5_0;
    case QuantFormat::kQ5_1:
      return GgufType::kQ5_1;
    case QuantFormat::kQ4_K:
      return GgufType::kQ4_K;
    case QuantFormat::kQ5_K:
      return GgufType::kQ5_K;
    case QuantFormat::kQ6_K:
      return GgufType::kQ6_K;
    default:
      return GgufType::kQ8_0;
  }
}

bool is_k(QuantFormat f) { return cpu::quant_row_granule(f) == 256; }

// Row lengths the kernels' remainders need: 32-block formats every remainder of the 4- and
// 2-block groups; the K-quants (multiples of 256) one to six superblocks.
std::vector<std::int64_t> widths(QuantFormat f) {
  if (is_k(f)) return {256, 512, 768, 1536};
  return {32, 64, 96, 160, 576, 1536};
}

std::vector<float> floats(const Tensor& t) {
  return {t.data_as<float>(), t.data_as<float>() + t.numel()};
}

class QuantizedFormats : public ::testing::TestWithParam<QuantFormat> {};

TEST_P(QuantizedFormats, RepackedBlocksDequantizeLikeTheGgufReader) {
  const QuantFormat f = GetParam();
  std::mt19937 rng(1);
  const std::int64_t rows = 7, cols = is_k(f) ? 768 : 32 * 9;
  const std::vector<std::byte> ggml = random_ggml(f, rows, cols, rng);
  const QuantizedMatrix m = QuantizedMatrix::from_ggml(f, ggml, rows, cols);
  EXPECT_EQ(m.rows(), rows);
  EXPECT_EQ(m.cols(), cols);
  EXPECT_EQ(m.nbytes(), ggml.size());  // repacking takes no extra memory
  std::vector<float> expected(static_cast<std::size_t>(rows * cols));
  dequantize_row(ggml_type(f), ggml.data(), expected.data(), rows * cols);
  EXPECT_EQ(floats(m.dequantize()), expected);

  // gather_rows moves whole rows.
  const std::vector<std::int64_t> order = {6, 0, 0, 3};
  const QuantizedMatrix g = m.gather_rows(order);
  ASSERT_EQ(g.rows(), 4);
  std::vector<float> row(static_cast<std::size_t>(cols));
  for (std::size_t i = 0; i < order.size(); ++i) {
    g.dequantize_rows(static_cast<std::int64_t>(i), static_cast<std::int64_t>(i) + 1, row.data());
    EXPECT_TRUE(std::equal(row.begin(), row.end(), expected.begin() + order[i] * cols)) << i;
  }
}

// Restores the instruction-set cap when a test ends, whatever it asserted.
struct IsaLimit {
  explicit IsaLimit(CpuIsa limit) : previous(cpu::set_cpu_isa_limit(limit)) {}
  ~IsaLimit() { cpu::set_cpu_isa_limit(previous); }
  CpuIsa previous;
};

TEST_P(QuantizedFormats, DequantizedRowsAreBitExactOnEveryInstructionSet) {
  // The prefill panels' dequantizer (AVX-512 where present, the portable loop otherwise) against
  // the GGUF reader's: every width's group tails, any row range, nothing written outside it.
  const QuantFormat f = GetParam();
  std::mt19937 rng(9);
  for (const CpuIsa isa : {CpuIsa::kPortable, CpuIsa::kAvx512Vnni}) {
    if (isa > cpu::detected_cpu_isa()) continue;
    const IsaLimit limit(isa);
    for (const std::int64_t cols : widths(f)) {
      const std::int64_t rows = 9;
      const std::vector<std::byte> ggml = random_ggml(f, rows, cols, rng);
      const QuantizedMatrix m = QuantizedMatrix::from_ggml(f, ggml, rows, cols);
      std::vector<float> expected(static_cast<std::size_t>(rows * cols));
      dequantize_row(ggml_type(f), ggml.data(), expected.data(), rows * cols);
      for (const auto& [r0, r1] :
           {std::pair<std::int64_t, std::int64_t>{0, rows}, {3, 4}, {2, 7}}) {
        std::vector<float> got(static_cast<std::size_t>((r1 - r0 + 2) * cols), -7.0f);
        m.dequantize_rows(r0, r1, got.data() + cols);  // a poisoned row either side
        for (std::int64_t i = 0; i < (r1 - r0) * cols; ++i) {
          ASSERT_EQ(got[static_cast<std::size_t>(cols + i)],
                    expected[static_cast<std::size_t>(r0 * cols + i)])
              << cpu::cpu_isa_name(isa) << " cols " << cols << " rows [" << r0 << ", " << r1
              << ") at " << i;
        }
        for (std::int64_t i = 0; i < cols; ++i) {
          ASSERT_EQ(got[static_cast<std::size_t>(i)], -7.0f) << "written before the rows";
          ASSERT_EQ(got[static_cast<std::size_t>((r1 - r0 + 1) * cols + i)], -7.0f)
              << "written after the rows";
        }
      }
    }
  }
}

TEST_P(QuantizedFormats, QuantizeFollowsGgmlRounding) {
  const QuantFormat f = GetParam();
  if (f != QuantFormat::kQ8_0 && f != QuantFormat::kQ4_1) {
    EXPECT_KVCACHE_ERROR(QuantizedMatrix::quantize(Tensor::zeros({1, 256}, DType::kFloat32), f),
                         "quantizes to Q8_0 or Q4_1");
    return;
  }
  std::mt19937 rng(2);
  const Tensor w = testing::random_tensor({5, 64}, DType::kFloat32, rng, 0.5f);
  const QuantizedMatrix q = QuantizedMatrix::quantize(w, f);
  const std::vector<float> back = floats(q.dequantize());
  for (std::int64_t r = 0; r < 5; ++r) {
    for (std::int64_t b = 0; b < 2; ++b) {
      float lo = 1e30f, hi = -1e30f, amax = 0;
      for (int i = 0; i < 32; ++i) {
        const float v = w.data_as<float>()[r * 64 + b * 32 + i];
        lo = std::min(lo, v), hi = std::max(hi, v), amax = std::max(amax, std::fabs(v));
      }
      // Half a step, plus the fp16 rounding of the scale (and minimum) it was made with.
      const float step = f == QuantFormat::kQ8_0 ? amax / 127 : (hi - lo) / 15;
      const float tol = step * 0.5f + (f == QuantFormat::kQ8_0 ? 127 : 15) * step * 1e-3f +
                        (f == QuantFormat::kQ4_1 ? std::fabs(lo) * 1e-3f : 0.0f);
      for (int i = 0; i < 32; ++i) {
        const std::int64_t e = r * 64 + b * 32 + i;
        EXPECT_NEAR(back[static_cast<std::size_t>(e)], w.data_as<float>()[e], tol) << e;
      }
    }
  }
  // The extremes are hit: Q8_0's largest magnitude maps to ±127, Q4_1's minimum is exact-ish.
  const Tensor ramp = Tensor::empty({1, 32}, DType::kFloat32);
  for (int i = 0; i < 32; ++i) ramp.data_as<float>()[i] = static_cast<float>(i) - 15.0f;
  const std::vector<float> r = floats(QuantizedMatrix::quantize(ramp, f).dequantize());
  EXPECT_NEAR(r[31], 16.0f, 1e-2f);
  EXPECT_NEAR(r[0], -15.0f, f == QuantFormat::kQ8_0 ? 0.07f : 1e-2f);
}

// What linear() promises for decode rows, in float64: x quantized per block with d = amax/127 and
// round-half-even, then Σ over blocks of the exact integer dot products scaled by d_w·d_x (Q4_1:
// plus m·d_x·Σq_x) — equivalently, the dequantized weights times the dequantized x.
std::vector<double> emulate_gemv(const QuantizedMatrix& w, const Tensor& x, const Tensor& bias) {
  const std::int64_t rows = x.size(0), in = x.size(1), out = w.rows();
  const std::vector<float> dense = floats(w.dequantize());
  std::vector<double> xq(static_cast<std::size_t>(rows * in));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t b = 0; b < in / 32; ++b) {
      const float* v = x.data_as<float>() + r * in + b * 32;
      float amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.0f, id = amax != 0 ? 127.0f / amax : 0.0f;
      for (int i = 0; i < 32; ++i)
        xq[static_cast<std::size_t>(r * in + b * 32 + i)] =
            static_cast<double>(d) * std::nearbyint(v[i] * id);
    }
  }
  std::vector<double> y(static_cast<std::size_t>(rows * out));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t o = 0; o < out; ++o) {
      double s = bias.defined() ? bias.data_as<float>()[o] : 0.0;
      for (std::int64_t k = 0; k < in; ++k)
        s += static_cast<double>(dense[static_cast<std::size_t>(o * in + k)]) *
             xq[static_cast<std::size_t>(r * in + k)];
      y[static_cast<std::size_t>(r * out + o)] = s;
    }
  return y;
}

// Σ|w·x| per output: the scale float32 summation errors are measured against.
std::vector<double> magnitudes(const QuantizedMatrix& w, const Tensor& x) {
  const std::int64_t rows = x.size(0), in = x.size(1), out = w.rows();
  const std::vector<float> dense = floats(w.dequantize());
  std::vector<double> m(static_cast<std::size_t>(rows * out));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t o = 0; o < out; ++o)
      for (std::int64_t k = 0; k < in; ++k)
        m[static_cast<std::size_t>(r * out + o)] +=
            std::fabs(dense[static_cast<std::size_t>(o * in + k)] * x.data_as<float>()[r * in + k]);
  return m;
}

TEST_P(QuantizedFormats, DecodeRowsComputeTheQuantizedBlockDotProducts) {
  const QuantFormat f = GetParam();
  std::mt19937 rng(3);
  for (const CpuIsa isa : {CpuIsa::kPortable, CpuIsa::kAvx512Vnni}) {
    if (isa > cpu::detected_cpu_isa()) continue;
    const IsaLimit limit(isa);
    // Block counts with every remainder of the kernels' 4- and 2-block groups; odd output counts.
    for (const std::int64_t in : widths(f)) {
      for (const std::int64_t rows : {1, 2, 3, 4, 5, 8, 13, 32}) {
        if (rows > cpu::quantized_decode_rows(f)) continue;
        const std::int64_t out = in == 1536 ? 67 : 37;
        const QuantizedMatrix w =
            QuantizedMatrix::from_ggml(f, random_ggml(f, out, in, rng), out, in);
        Tensor x = testing::random_tensor({rows, in}, DType::kFloat32, rng, 2.0f);
        x.data_as<float>()[0] = 0.0f;
        for (int i = 0; i < 32 && in >= 64; ++i) x.data_as<float>()[32 + i] = 0.0f;  // amax 0
        const Tensor bias =
            rows % 2 ? testing::random_tensor({out}, DType::kFloat32, rng) : Tensor();
        const Tensor y = cpu::linear(x, w, bias);
        ASSERT_EQ(y.size(0), rows);
        ASSERT_EQ(y.size(1), out);
        const std::vector<double> want = emulate_gemv(w, x, bias), mag = magnitudes(w, x);
        for (std::size_t i = 0; i < want.size(); ++i) {
          ASSERT_NEAR(y.data_as<float>()[i], want[i], 2e-6 * mag[i] + 1e-6)
              << cpu::cpu_isa_name(isa) << " in " << in << " rows " << rows << " at " << i;
        }
      }
    }
  }
}

TEST_P(QuantizedFormats, DecodeRowsStayWithinXsRoundingOfTheFloat32Product) {
  const QuantFormat f = GetParam();
  std::mt19937 rng(4);
  const std::int64_t in = is_k(f) ? 1536 : 576, out = 64;
  const QuantizedMatrix w = QuantizedMatrix::from_ggml(f, random_ggml(f, out, in, rng), out, in);
  const Tensor x = testing::random_tensor({1, in}, DType::kFloat32, rng, 3.0f);
  const Tensor y = cpu::linear(x, w);
  const Tensor exact = cpu::linear(x, w.dequantize());
  const std::vector<float> dense = floats(w.dequantize());
  for (std::int64_t o = 0; o < out; ++o) {
    // Each x element moves at most half a step (amax/254) of its block.
    double bound = 0;
    for (std::int64_t b = 0; b < in / 32; ++b) {
      float amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x.data_as<float>()[b * 32 + i]));
      for (int i = 0; i < 32; ++i)
        bound += std::fabs(dense[static_cast<std::size_t>(o * in + b * 32 + i)]) * amax / 254.0;
    }
    EXPECT_NEAR(y.data_as<float>()[o], exact.data_as<float>()[o], bound * 1.001 + 1e-5) << o;
  }
}

TEST_P(QuantizedFormats, ManyRowsWithoutAmxAreTheExactFloat32Product) {
  const QuantFormat f = GetParam();
  const IsaLimit limit(CpuIsa::kAvx512Vnni);
  std::mt19937 rng(5);
  const std::int64_t rows = cpu::quantized_decode_rows(f) + 1, in = is_k(f) ? 512 : 96, out = 70;
  const QuantizedMatrix w = QuantizedMatrix::from_ggml(f, random_ggml(f, out, in, rng), out, in);
  const Tensor x = testing::random_tensor({rows, in}, DType::kFloat32, rng);
  const Tensor bias = testing::random_tensor({out}, DType::kFloat32, rng);
  const Tensor y = cpu::linear(x, w, bias);
  const std::vector<float> dense = floats(w.dequantize());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t o = 0; o < out; ++o) {
      double s = bias.data_as<float>()[o], mag = std::fabs(s);
      for (std::int64_t k = 0; k < in; ++k) {
        const double p = static_cast<double>(dense[static_cast<std::size_t>(o * in + k)]) *
                         x.data_as<float>()[r * in + k];
        s += p, mag += std::fabs(p);
      }
      EXPECT_NEAR(y.data_as<float>()[r * out + o], s, 1e-6 * mag) << r << "," << o;
    }
}

TEST_P(QuantizedFormats, EmbeddingRowsAreExact) {
  const QuantFormat f = GetParam();
  std::mt19937 rng(6);
  const std::int64_t cols = is_k(f) ? 256 : 64;
  const QuantizedMatrix table =
      QuantizedMatrix::from_ggml(f, random_ggml(f, 11, cols, rng), 11, cols);
  Tensor ids = Tensor::empty({2, 2}, DType::kInt64);
  const std::int64_t picks[] = {10, 0, 3, 10};
  std::copy(picks, picks + 4, ids.data_as<std::int64_t>());
  const cpu::Weight weight = table;
  const Tensor e = cpu::embedding(weight, ids);
  const std::vector<float> dense = floats(table.dequantize());
  ASSERT_EQ(e.size(0), 4);
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < cols; ++c)
      EXPECT_EQ(e.data_as<float>()[i * cols + c],
                dense[static_cast<std::size_t>(picks[i] * cols + c)]);
  ids.data_as<std::int64_t>()[1] = 11;
  EXPECT_KVCACHE_ERROR(cpu::embedding(weight, ids), "token ids in [0, 11)");
}

TEST_P(QuantizedFormats, FusedProjectionsEqualSeparateOnes) {
  const QuantFormat f = GetParam();
  std::mt19937 rng(8);
  const std::int64_t in = is_k(f) ? 256 : 96;
  const cpu::Weight a = QuantizedMatrix::from_ggml(f, random_ggml(f, 13, in, rng), 13, in);
  const cpu::Weight b = QuantizedMatrix::from_ggml(f, random_ggml(f, 3, in, rng), 3, in);
  const cpu::Weight c = QuantizedMatrix::from_ggml(f, random_ggml(f, 29, in, rng), 29, in);
  const Tensor bias_b = testing::random_tensor({3}, DType::kFloat32, rng);
  const Tensor none;
  const cpu::Weight* weights[] = {&a, &b, &c};
  const Tensor* biases[] = {&none, &bias_b, &none};
  // The last count is past the decode kernels: not fused, one linear() each.
  for (const std::int64_t rows : {std::int64_t{1}, std::int64_t{3}, std::int64_t{4},
                                  std::int64_t{7}, cpu::quantized_decode_rows(f) + 3}) {
    const Tensor x = testing::random_tensor({rows, in}, DType::kFloat32, rng);
    const std::vector<Tensor> fused = cpu::linear_fused(x, weights, biases);
    ASSERT_EQ(fused.size(), 3u);
    for (std::size_t i = 0; i < 3; ++i) {
      const Tensor alone = cpu::linear(x, *weights[i], *biases[i]);
      EXPECT_EQ(floats(fused[i]), floats(alone)) << "rows " << rows << " weight " << i;
    }
  }
  // A bad bias is reported before anything is computed, naming what was expected.
  const Tensor wrong = Tensor::zeros({4}, DType::kFloat32);
  const Tensor* bad[] = {&none, &wrong, &none};
  EXPECT_KVCACHE_ERROR(cpu::linear_fused(Tensor::zeros({1, in}, DType::kFloat32), weights, bad),
                       "expected bias [3] float32");
  const Tensor* two[] = {&none, &none};
  EXPECT_KVCACHE_ERROR(cpu::linear_fused(Tensor::zeros({1, in}, DType::kFloat32), weights, two),
                       "expected 3 biases");
}

INSTANTIATE_TEST_SUITE_P(Quantized, QuantizedFormats,
                         ::testing::Values(QuantFormat::kQ8_0, QuantFormat::kQ4_1,
                                           QuantFormat::kQ5_0, QuantFormat::kQ5_1,
                                           QuantFormat::kQ4_K, QuantFormat::kQ5_K,
                                           QuantFormat::kQ6_K),
                         [](const auto& info) {
                           return std::string(quant_format_name(info.param));
                         });

TEST(Quantized, FusedProjectionsOfMixedFormatsEqualSeparateOnesForAnyThreadCount) {
  // A Q4_K_M file fuses Q5_0 q / k with a Q8_0 v: the threads' shares are cut by bytes, so a cut
  // may fall anywhere in any matrix (odd row counts, a matrix smaller than a share).
  std::mt19937 rng(10);
  const std::int64_t in = 512;
  const std::pair<QuantFormat, std::int64_t> mats[] = {{QuantFormat::kQ5_0, 13},
                                                       {QuantFormat::kQ8_0, 3},
                                                       {QuantFormat::kQ6_K, 29},
                                                       {QuantFormat::kQ4_1, 1},
                                                       {QuantFormat::kQ4_K, 6}};
  std::vector<cpu::Weight> weights;
  for (const auto& [f, rows] : mats)
    weights.emplace_back(QuantizedMatrix::from_ggml(f, random_ggml(f, rows, in, rng), rows, in));
  std::vector<const cpu::Weight*> ptrs;
  for (const cpu::Weight& w : weights) ptrs.push_back(&w);
  const int threads_before = cpu::num_threads();
  for (const int threads : {1, 2, 3, 5}) {
    cpu::set_num_threads(threads);
    for (const std::int64_t rows : {1, 2, 5}) {
      const Tensor x = testing::random_tensor({rows, in}, DType::kFloat32, rng);
      const std::vector<Tensor> fused = cpu::linear_fused(x, ptrs, {});
      ASSERT_EQ(fused.size(), weights.size());
      for (std::size_t i = 0; i < weights.size(); ++i) {
        EXPECT_EQ(floats(fused[i]), floats(cpu::linear(x, weights[i])))
            << "threads " << threads << " rows " << rows << " weight " << i;
      }
    }
  }
  cpu::set_num_threads(threads_before);
}

TEST(Quantized, RealBlocksOfTheDefaultModelKeepTheirValues) {
  // tests/data/gguf/smollm2_blocks.gguf holds rows copied from SmolLM2's Q8_0 embedding and Q4_1
  // layers; the GGUF reader's float32 values for them are checked against the gguf package.
  const GgufFile file =
      GgufFile::open(std::string(KVCACHE_TEST_DATA_DIR) + "/gguf/smollm2_blocks.gguf");
  int checked = 0;
  for (const GgufTensorInfo& info : file.tensors()) {
    if (info.type != GgufType::kQ8_0 && info.type != GgufType::kQ4_1) continue;
    const QuantFormat f = info.type == GgufType::kQ4_1 ? QuantFormat::kQ4_1 : QuantFormat::kQ8_0;
    const std::vector<std::int64_t> shape = info.shape();
    const std::int64_t cols = shape.back(), rows = info.numel() / cols;
    const QuantizedMatrix m = QuantizedMatrix::from_ggml(
        f, {file.data(info), static_cast<std::size_t>(info.nbytes)}, rows, cols);
    EXPECT_EQ(floats(m.dequantize()), floats(file.to_float32(info.name))) << info.name;
    ++checked;
  }
  EXPECT_GE(checked, 2);
}

TEST(Quantized, Q4_0BlocksBecomeQ4_1WithTheSameValues) {
  std::mt19937 rng(9);
  const std::int64_t rows = 5, cols = 96;
  std::vector<std::byte> q4_0(static_cast<std::size_t>(rows * cols / 32) * 18);
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : q4_0) b = static_cast<std::byte>(byte(rng));
  for (std::size_t b = 0; b < q4_0.size() / 18; ++b) {
    // Scales of every size fp16 has that 8·d does not overflow, signs included, zero too.
    const float d = b == 0 ? 0.0f : std::ldexp(b % 2 ? 1.0f : -1.0f, static_cast<int>(b % 36) - 24);
    const std::uint16_t bits = float_to_fp16(d).bits;
    std::memcpy(q4_0.data() + b * 18, &bits, 2);
  }
  const std::optional<QuantizedMatrix> m = QuantizedMatrix::from_ggml_q4_0(q4_0, rows, cols);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->format(), QuantFormat::kQ4_1);
  std::vector<float> expected(static_cast<std::size_t>(rows * cols));
  dequantize_row(GgufType::kQ4_0, q4_0.data(), expected.data(), rows * cols);
  EXPECT_EQ(floats(m->dequantize()), expected);  // bit for bit
  // A scale whose 8·d overflows fp16 cannot be a Q4_1 minimum: no matrix, the caller dequantizes.
  const std::uint16_t big = float_to_fp16(10000.0f).bits;
  std::memcpy(q4_0.data() + 18, &big, 2);
  EXPECT_FALSE(QuantizedMatrix::from_ggml_q4_0(q4_0, rows, cols).has_value());
  EXPECT_KVCACHE_ERROR(QuantizedMatrix::from_ggml_q4_0(q4_0, rows + 1, cols),
                       "expected 18 Q4_0 blocks (324 bytes) for [6, 96], got 270 bytes");
}

TEST(Quantized, BadShapesAndInputsAreClearErrors) {
  std::mt19937 rng(7);
  const std::vector<std::byte> blocks = random_ggml(QuantFormat::kQ4_1, 2, 64, rng);
  EXPECT_KVCACHE_ERROR(QuantizedMatrix::from_ggml(QuantFormat::kQ4_1, blocks, 2, 48),
                       "columns a positive multiple of 32, got [2, 48]");
  EXPECT_KVCACHE_ERROR(QuantizedMatrix::from_ggml(QuantFormat::kQ4_1, blocks, 3, 64),
                       "expected 3 rows of 40 bytes");
  EXPECT_KVCACHE_ERROR(QuantizedMatrix::from_ggml(QuantFormat::kQ8_0, blocks, 2, 64),
                       "got 80 bytes");
  const QuantizedMatrix w = QuantizedMatrix::from_ggml(QuantFormat::kQ4_1, blocks, 2, 64);
  EXPECT_KVCACHE_ERROR(cpu::linear(Tensor::zeros({1, 32}, DType::kFloat32), w),
                       "expected x with 64 features");
  EXPECT_KVCACHE_ERROR(cpu::linear(Tensor::zeros({1, 64}, DType::kBFloat16), w),
                       "contiguous [rows, n] float32");
  EXPECT_KVCACHE_ERROR(
      cpu::linear(Tensor::zeros({1, 64}, DType::kFloat32), w, Tensor::zeros({3}, DType::kFloat32)),
      "expected bias [2] float32");
  EXPECT_KVCACHE_ERROR(w.gather_rows(std::vector<std::int64_t>{0, 2}), "rows in [0, 2), got 2");
  EXPECT_KVCACHE_ERROR(w.dequantize_rows(1, 3, nullptr), "0 <= r0 <= r1 <= 2");
  EXPECT_KVCACHE_ERROR(
      QuantizedMatrix::quantize(Tensor::zeros({2, 40}, DType::kFloat32), QuantFormat::kQ8_0),
      "multiple of 32");
  EXPECT_EQ(cpu::Weight(w).describe(), "Q4_1 [2, 64]");
}

TEST(Quantized, IsaLimitCapsTheDetectedSet) {
  const CpuIsa detected = cpu::detected_cpu_isa(), active = cpu::active_cpu_isa();
  EXPECT_LE(active, detected);  // below it only when KVCACHE_CPU_ISA caps it
  {
    const IsaLimit limit(CpuIsa::kPortable);
    EXPECT_EQ(cpu::active_cpu_isa(), CpuIsa::kPortable);
  }
  EXPECT_EQ(cpu::active_cpu_isa(), active);
  {
    const IsaLimit limit(CpuIsa::kAmx);
    EXPECT_EQ(cpu::active_cpu_isa(), detected);
  }
  EXPECT_FALSE(cpu::cpu_isa_name(detected).empty());
}

}  // namespace
}  // namespace kvcache
