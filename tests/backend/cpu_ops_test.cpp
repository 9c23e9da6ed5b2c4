// The dense CPU layers the models use, against float64: silu_mul (whose e^x is a polynomial where
// the build has AVX-512), rms_norm and add_inplace — on sizes with vector tails and on sizes big
// enough to run threaded; linear with float32, bfloat16 and float16 weights at every row count
// of its three paths (GEMV, tiled batch GEMV, GEMM); and the float16 widening (the backend's
// private simd.hpp, included here) bit for bit against fp16_to_float.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

// g++ 12 flags the "undefined" pass-through operand of its own _mm512_cvtph_ps (a false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "../../src/backend/cpu/simd.hpp"
#include "kvcache/kvcache.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

TEST(CpuOps, SiluMulIsWithinAFewUlpOfFloat64) {
  std::mt19937 rng(1);
  for (const std::int64_t cols : {1, 17, 1536}) {
    for (const std::int64_t rows : {1, 3, 256}) {  // 256 × 1536 runs threaded
      Tensor gate = testing::random_tensor({rows, cols}, DType::kFloat32, rng, 12.0f);
      const Tensor up = testing::random_tensor({rows, cols}, DType::kFloat32, rng, 2.0f);
      // The far ends: e^−g overflows (g ≪ 0) or vanishes (g ≫ 0); zero and a subnormal.
      const float specials[] = {-100.0f, -87.5f, 88.9f, 100.0f, 0.0f, 1e-40f, -30.0f, 30.0f};
      for (std::int64_t i = 0; i < std::min<std::int64_t>(8, gate.numel()); ++i)
        gate.data_as<float>()[i] = specials[i];
      const Tensor y = cpu::silu_mul(gate, up);
      for (std::int64_t i = 0; i < gate.numel(); ++i) {
        const double g = gate.data_as<float>()[i], u = up.data_as<float>()[i];
        const double want = g / (1.0 + std::exp(-g)) * u;
        const double got = y.data_as<float>()[i];
        ASSERT_TRUE(std::isfinite(got)) << i;
        ASSERT_NEAR(got, want, 4e-7 * std::fabs(want) + 1e-37) << "g " << g << " u " << u;
      }
    }
  }
}

TEST(CpuOps, RmsNormAndAddInplaceMatchFloat64) {
  std::mt19937 rng(2);
  for (const std::int64_t rows : {1, 5, 300}) {
    const std::int64_t n = 576;
    const Tensor x = testing::random_tensor({rows, n}, DType::kFloat32, rng, 3.0f);
    const Tensor w = testing::random_tensor({n}, DType::kFloat32, rng);
    const Tensor y = cpu::rms_norm(x, w, 1e-5f);
    for (std::int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (std::int64_t i = 0; i < n; ++i) ss += std::pow(x.data_as<float>()[r * n + i], 2);
      const double inv = 1.0 / std::sqrt(ss / n + 1e-5);
      for (std::int64_t i = 0; i < n; ++i) {
        const double want = w.data_as<float>()[i] * (x.data_as<float>()[r * n + i] * inv);
        ASSERT_NEAR(y.data_as<float>()[r * n + i], want, 1e-5 * std::fabs(want) + 1e-7);
      }
    }
    const Tensor before = cpu::clone(y);
    cpu::add_inplace(y, x);
    for (std::int64_t i = 0; i < y.numel(); ++i)
      ASSERT_EQ(y.data_as<float>()[i], before.data_as<float>()[i] + x.data_as<float>()[i]);
  }
}

// Every one of the 65536 binary16 patterns, sixteen at a time, through the load the kernels use
// (VCVTPH2PS, F16C or portable, as this build has it) and through the portable form, against
// fp16_to_float: equal bits, except that the instructions quiet a signalling NaN.
TEST(CpuSimd, Float16LoadsWidenEveryPatternExactly) {
  int quieted = 0;
  for (std::uint32_t base = 0; base < 65536; base += 16) {
    float16 h[16];
    cpu::simd::U16x16 bits;
    for (int i = 0; i < 16; ++i) {
      h[i].bits = static_cast<std::uint16_t>(base + i);
      bits[i] = h[i].bits;
    }
    const cpu::simd::Vec16 loaded = cpu::simd::load16(h);
    const cpu::simd::Vec16 portable = cpu::simd::fp16_bits_to_float(bits);
    for (int i = 0; i < 16; ++i) {
      const std::uint32_t want = std::bit_cast<std::uint32_t>(fp16_to_float(h[i]));
      const std::uint32_t got = std::bit_cast<std::uint32_t>(static_cast<float>(loaded[i]));
      ASSERT_EQ(std::bit_cast<std::uint32_t>(static_cast<float>(portable[i])), want)
          << "portable, half 0x" << std::hex << h[i].bits;
      if (got != want) {
        // A signalling NaN (exponent 31, mantissa's top bit clear): quieted, sign and payload kept.
        const bool snan = (h[i].bits & 0x7c00u) == 0x7c00u && (h[i].bits & 0x3ffu) != 0 &&
                          (h[i].bits & 0x200u) == 0;
        ASSERT_TRUE(snan && got == (want | 0x00400000u)) << "half 0x" << std::hex << h[i].bits;
        ++quieted;
      }
    }
  }
  EXPECT_TRUE(quieted == 0 || quieted == 2 * 511) << quieted;
}

// y = x · wᵀ + bias in float64 from the weight's stored values, and Σ |x_i w_i| + |bias| per
// output (the scale a float32 sum's rounding error is proportional to).
void linear_reference(const Tensor& x, const Tensor& w, const Tensor& bias, std::vector<double>& y,
                      std::vector<double>& scale) {
  const std::int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  const std::vector<double> xd = testing::to_doubles(x), wd = testing::to_doubles(w);
  const std::vector<double> bd = bias.defined() ? testing::to_doubles(bias) : std::vector<double>();
  y.assign(static_cast<std::size_t>(rows * out), 0.0);
  scale.assign(y.size(), 0.0);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t o = 0; o < out; ++o) {
      double sum = bd.empty() ? 0.0 : bd[static_cast<std::size_t>(o)];
      double mag = std::abs(sum);
      for (std::int64_t i = 0; i < in; ++i) {
        const double p =
            xd[static_cast<std::size_t>(r * in + i)] * wd[static_cast<std::size_t>(o * in + i)];
        sum += p;
        mag += std::abs(p);
      }
      y[static_cast<std::size_t>(r * out + o)] = sum;
      scale[static_cast<std::size_t>(r * out + o)] = mag;
    }
  }
}

// Every row count from 1 to 66 (the GEMV for up to 4 rows, the tiled batch GEMV above, with tails
// of 1..3 rows; the GEMM past 64 for float32 weights) and 96..130 (the 16-bit weights' GEMV to
// 128 rows, their GEMM past it), for each weight dtype, `in` not a multiple of 16 and
// `out` not a multiple of 4 or of the 16-row tile, with and without a bias. The bound, 1e-5 of
// Σ|x_i w_i|, is far above a float32 sum's rounding (about 1e-7 of it here) and far below what one
// wrong, dropped or doubled term gives (about 1/in of it: 3e-3 and 2e-4).
TEST(CpuOps, LinearMatchesFloat64ForEveryWeightDtypeAndRowCount) {
  std::mt19937 rng(12);
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (const auto& [in, out] : {std::pair<std::int64_t, std::int64_t>{35, 37}, {579, 70}}) {
      const Tensor w = testing::random_tensor({out, in}, dtype, rng);
      const Tensor bias = testing::random_tensor({out}, DType::kFloat32, rng);
      double worst = 0.0;
      std::vector<std::int64_t> row_counts;
      for (std::int64_t rows = 1; rows <= 66; ++rows) row_counts.push_back(rows);
      for (const std::int64_t rows : {96, 127, 128, 129, 130}) row_counts.push_back(rows);
      for (const std::int64_t rows : row_counts) {
        const Tensor x = testing::random_tensor({rows, in}, DType::kFloat32, rng);
        for (const bool with_bias : {false, true}) {
          const Tensor b = with_bias ? bias : Tensor();
          std::vector<double> want, scale;
          linear_reference(x, w, b, want, scale);
          const std::vector<double> got = testing::to_doubles(cpu::linear(x, w, b));
          ASSERT_EQ(got.size(), want.size());
          for (std::size_t i = 0; i < got.size(); ++i) {
            const double err = std::abs(got[i] - want[i]) / scale[i];
            worst = std::max(worst, std::isnan(got[i]) ? INFINITY : err);
            ASSERT_LE(err, 1e-5) << dtype_name(dtype) << " in " << in << " out " << out << " rows "
                                 << rows << " bias " << with_bias << " element " << i << ": "
                                 << got[i] << " against " << want[i];
          }
        }
      }
      std::printf("[ linear   ] %s weight [%lld, %lld], rows 1..130: max error %.2e of sum |x w|\n",
                  std::string(dtype_name(dtype)).c_str(), static_cast<long long>(out),
                  static_cast<long long>(in), worst);
    }
  }
}

// float16 weights that are subnormal, the largest finite, signed zeros, infinities and NaN come
// out of linear() as fp16_to_float says, on every path: one-hot rows of x pick single weights
// (exact), rows of ones sum a row of infinities to infinity and a row with NaN to NaN.
TEST(CpuOps, LinearUsesFloat16SpecialValuesExactly) {
  const std::uint16_t finite[] = {0x0001, 0x8001, 0x03ff, 0x83ff, 0x0200, 0x0400, 0x7bff, 0xfbff,
                                  0x0000, 0x8000, 0x3c00, 0x3555, 0x0155, 0x07ff, 0xc000, 0x1234};
  constexpr std::int64_t in = 19, out = 6;
  // Rows 0-3: finite patterns (cycling through the list), rows 4 and 5: +inf / NaN in column 3.
  Tensor w = Tensor::empty({out, in}, DType::kFloat16);
  float16* wp = w.data_as<float16>();
  for (std::int64_t i = 0; i < out * in; ++i) wp[i].bits = finite[i % 16];
  wp[4 * in + 3].bits = 0x7c00;  // +inf
  wp[5 * in + 3].bits = 0x7e01;  // a quiet NaN
  for (const std::int64_t rows : {1, 3, 4, 5, 8, 19, 64, 70, 128, 131}) {
    Tensor hot = Tensor::empty({rows, in}, DType::kFloat32);
    Tensor ones = Tensor::empty({rows, in}, DType::kFloat32);
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t i = 0; i < in; ++i) {
        hot.data_as<float>()[r * in + i] = i == r % in ? 1.0f : 0.0f;
        ones.data_as<float>()[r * in + i] = 1.0f;
      }
    }
    const Tensor picked = cpu::linear(hot, w), summed = cpu::linear(ones, w);
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t o = 0; o < 4; ++o) {
        const float want = fp16_to_float(wp[o * in + r % in]);
        // +0 from the zero products and the pick: -0 shows as +0, the value is what matters.
        EXPECT_EQ(picked.data_as<float>()[r * out + o], want)
            << "rows " << rows << " row " << r << " out " << o;
      }
      EXPECT_EQ(summed.data_as<float>()[r * out + 4], std::numeric_limits<float>::infinity())
          << "rows " << rows;
      EXPECT_TRUE(std::isnan(summed.data_as<float>()[r * out + 5])) << "rows " << rows;
    }
  }
}

TEST(CpuThreads, SetNumThreadsChangesWhatTheKernelsUse) {
  const int before = cpu::num_threads();
  cpu::set_num_threads(1);
  EXPECT_EQ(cpu::num_threads(), 1);
  EXPECT_KVCACHE_ERROR(cpu::set_num_threads(0), "expected at least 1 thread, got 0");
  EXPECT_KVCACHE_ERROR(cpu::set_num_threads(-3), "got -3");
  EXPECT_EQ(cpu::num_threads(), 1);  // a refused call changes nothing
  cpu::set_num_threads(3);
  EXPECT_EQ(cpu::num_threads(), 3);
  // The kernels still compute the same thing with more threads than cores.
  std::mt19937 rng(4);
  const Tensor x = testing::random_tensor({3, 64}, DType::kFloat32, rng);
  const Tensor w = testing::random_tensor({40, 64}, DType::kFloat32, rng);
  const Tensor three = cpu::linear(x, w);
  cpu::set_num_threads(1);
  const Tensor one = cpu::linear(x, w);
  EXPECT_EQ(testing::to_doubles(three), testing::to_doubles(one));
  cpu::set_num_threads(before);
}

}  // namespace
}  // namespace kvcache
