// Tests of the AMX-BF16 prefill kernel (quant::linear_amx, reached through cpu::linear with more
// than 4 rows of x on a CPU with AMX): results against a float64 reference that rounds every
// weight and x element to bfloat16 as the kernel does, so what is left is float32 accumulation;
// edge shapes (m, N not whole tiles, a single block per row), bias, zeros and extreme magnitudes,
// agreement with the exact float32 path, and identical results whatever the thread count.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvcache/backend/quantized.hpp"
#include "kvcache/float16.hpp"
#include "test_util.hpp"

namespace {

using kvcache::DType;
using kvcache::Tensor;
using kvcache::cpu::CpuIsa;
using kvcache::cpu::QuantFormat;
using kvcache::cpu::QuantizedMatrix;
using kvcache::testing::random_tensor;

#define SKIP_WITHOUT_AMX()                                                          \
  do {                                                                              \
    if (kvcache::cpu::active_cpu_isa() != CpuIsa::kAmx)                             \
      GTEST_SKIP() << "this CPU (or its OS) does not offer AMX-BF16 to the kernel"; \
  } while (false)

double to_bf16(float v) { return kvcache::bf16_to_float(kvcache::float_to_bf16(v)); }

// y = bf16(x) · bf16(W)ᵀ (+ bias) in float64, and per output Σ|x·w| (+ |bias|): the scale the
// kernel's float32 accumulation error is measured against.
struct Reference {
  std::vector<double> y, scale;
};

Reference bf16_reference(const Tensor& x, const QuantizedMatrix& w, const Tensor& bias) {
  const std::int64_t m = x.size(0), k = x.size(1), n = w.rows();
  const Tensor wd = w.dequantize();
  std::vector<double> xr(static_cast<std::size_t>(m * k)), wr(static_cast<std::size_t>(n * k));
  for (std::size_t i = 0; i < xr.size(); ++i) xr[i] = to_bf16(x.data_as<float>()[i]);
  for (std::size_t i = 0; i < wr.size(); ++i) wr[i] = to_bf16(wd.data_as<float>()[i]);
  Reference ref;
  ref.y.resize(static_cast<std::size_t>(m * n));
  ref.scale.resize(ref.y.size());
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t o = 0; o < n; ++o) {
      double sum = 0, abs_sum = 0;
      for (std::int64_t c = 0; c < k; ++c) {
        const double p =
            xr[static_cast<std::size_t>(i * k + c)] * wr[static_cast<std::size_t>(o * k + c)];
        sum += p;
        abs_sum += std::abs(p);
      }
      if (bias.defined()) {
        sum += bias.data_as<float>()[o];
        abs_sum += std::abs(bias.data_as<float>()[o]);
      }
      ref.y[static_cast<std::size_t>(i * n + o)] = sum;
      ref.scale[static_cast<std::size_t>(i * n + o)] = abs_sum;
    }
  }
  return ref;
}

// Every output within `tol`·Σ|x·w| of the reference. With bfloat16 inputs every product is exact
// in float32, so only the accumulation of k products (and the bias) rounds: (k + 1)·2⁻²⁴ bounds
// it, capped at 1e-5 for long rows (Sapphire Rapids stays near 5e-8 at every k tried). Rounding x
// by truncation instead of to nearest even already fails by 1000×.
void expect_matches_reference(const Tensor& x, const QuantizedMatrix& w, const Tensor& bias,
                              const std::string& what) {
  SCOPED_TRACE(what);
  const Tensor y = kvcache::cpu::linear(x, w, bias);
  ASSERT_EQ(y.size(0), x.size(0));
  ASSERT_EQ(y.size(1), w.rows());
  const Reference ref = bf16_reference(x, w, bias);
  const double tol = std::min(static_cast<double>(x.size(1) + 1) * std::ldexp(1.0, -24), 1e-5);
  double worst = 0;
  std::int64_t bad = 0;
  for (std::size_t i = 0; i < ref.y.size(); ++i) {
    const double got = y.data_as<float>()[i];
    const double err = std::abs(got - ref.y[i]) / std::max(ref.scale[i], 1e-30);
    if (!(err <= tol) && bad++ < 5) {
      ADD_FAILURE() << "output " << i / w.rows() << ", " << i % w.rows() << ": got " << got
                    << ", expected " << ref.y[i] << " (Σ|x·w| " << ref.scale[i] << ")";
    }
    if (std::isfinite(err)) worst = std::max(worst, err);
  }
  EXPECT_EQ(bad, 0) << "worst relative error " << worst << ", tolerance " << tol;
}

std::string shape_name(QuantFormat f, std::int64_t m, std::int64_t n, std::int64_t k, bool bias) {
  return std::string(kvcache::cpu::quant_format_name(f)) + " m=" + std::to_string(m) +
         " N=" + std::to_string(n) + " K=" + std::to_string(k) + (bias ? " +bias" : "");
}

void check_shapes(QuantFormat format, std::initializer_list<std::int64_t> ms,
                  std::initializer_list<std::int64_t> ns, std::initializer_list<std::int64_t> ks,
                  std::uint32_t seed) {
  std::mt19937 rng(seed);
  for (std::int64_t k : ks) {
    for (std::int64_t n : ns) {
      const QuantizedMatrix w =
          QuantizedMatrix::quantize(random_tensor({n, k}, DType::kFloat32, rng, 0.5f), format);
      const Tensor bias = random_tensor({n}, DType::kFloat32, rng, 2.0f);
      for (std::int64_t m : ms) {
        const Tensor x = random_tensor({m, k}, DType::kFloat32, rng, 3.0f);
        expect_matches_reference(x, w, Tensor(), shape_name(format, m, n, k, false));
        expect_matches_reference(x, w, bias, shape_name(format, m, n, k, true));
      }
    }
  }
}

TEST(QuantizedAmx, EdgeShapesQ4_1) {
  SKIP_WITHOUT_AMX();
  check_shapes(QuantFormat::kQ4_1, {5, 17, 33}, {1, 15, 16, 17, 33}, {32, 64, 96}, 1);
}

TEST(QuantizedAmx, EdgeShapesQ8_0) {
  SKIP_WITHOUT_AMX();
  check_shapes(QuantFormat::kQ8_0, {5, 17, 33}, {1, 15, 16, 17, 33}, {32, 64, 96}, 2);
}

// Whole tiles, several 32-row blocks and panels: the shapes of SmolLM2-135M's prefill.
TEST(QuantizedAmx, ModelShapesQ4_1) {
  SKIP_WITHOUT_AMX();
  check_shapes(QuantFormat::kQ4_1, {256}, {192}, {576}, 3);
  check_shapes(QuantFormat::kQ4_1, {47}, {576}, {1536}, 4);
}

TEST(QuantizedAmx, ModelShapesQ8_0) {
  SKIP_WITHOUT_AMX();
  check_shapes(QuantFormat::kQ8_0, {256}, {192}, {576}, 5);
  check_shapes(QuantFormat::kQ8_0, {100}, {65, 97}, {576}, 6);
}

// Rows of zeros, a column of zeros, rows scaled far up and down (still normal in bfloat16, whose
// exponent range is float32's), and values that sit exactly between two bfloat16 neighbours.
TEST(QuantizedAmx, ZerosAndMagnitudes) {
  SKIP_WITHOUT_AMX();
  std::mt19937 rng(7);
  for (QuantFormat format : {QuantFormat::kQ4_1, QuantFormat::kQ8_0}) {
    const std::int64_t m = 40, n = 48, k = 128;
    const QuantizedMatrix w =
        QuantizedMatrix::quantize(random_tensor({n, k}, DType::kFloat32, rng), format);
    Tensor x = random_tensor({m, k}, DType::kFloat32, rng);
    float* px = x.data_as<float>();
    for (std::int64_t c = 0; c < k; ++c) {
      px[3 * k + c] = 0.0f;             // a row of zeros
      px[10 * k + c] *= 1e20f;          // large
      px[11 * k + c] *= 1e-20f;         // small
      px[(12 + c % 3) * k + c] = 0.0f;  // scattered zeros
      // Halfway between two bfloat16 values: ties go to the even one.
      px[20 * k + c] = std::ldexp(1.0f + (2 * (c % 64) + 1) / 256.0f, static_cast<int>(c % 7));
    }
    for (std::int64_t r = 0; r < m; ++r) px[r * k + 5] = 0.0f;  // a column of zeros
    expect_matches_reference(x, w, Tensor(), std::string(kvcache::cpu::quant_format_name(format)));
  }
}

// The AMX path against the exact float32 path (the cap hides AMX): they differ only by the
// bfloat16 roundings of x and the weights, at most 2⁻⁸ of Σ|x·w| (plus float32 noise).
TEST(QuantizedAmx, AgreesWithFloat32Path) {
  SKIP_WITHOUT_AMX();
  std::mt19937 rng(8);
  for (QuantFormat format : {QuantFormat::kQ4_1, QuantFormat::kQ8_0}) {
    const std::int64_t m = 64, n = 80, k = 576;
    const QuantizedMatrix w =
        QuantizedMatrix::quantize(random_tensor({n, k}, DType::kFloat32, rng), format);
    const Tensor x = random_tensor({m, k}, DType::kFloat32, rng);
    const Tensor bias = random_tensor({n}, DType::kFloat32, rng);
    const Tensor amx = kvcache::cpu::linear(x, w, bias);
    const CpuIsa previous = kvcache::cpu::set_cpu_isa_limit(CpuIsa::kAvx512Vnni);
    const Tensor exact = kvcache::cpu::linear(x, w, bias);
    kvcache::cpu::set_cpu_isa_limit(previous);
    const Reference ref = bf16_reference(x, w, bias);  // for Σ|x·w|
    double worst = 0, mean = 0;
    for (std::size_t i = 0; i < ref.y.size(); ++i) {
      const double err =
          std::abs(static_cast<double>(amx.data_as<float>()[i]) - exact.data_as<float>()[i]) /
          ref.scale[i];
      worst = std::max(worst, err);
      mean += err / static_cast<double>(ref.y.size());
    }
    EXPECT_LE(worst, std::ldexp(1.0, -8)) << kvcache::cpu::quant_format_name(format);
    // Roundings of random data mostly cancel: the typical difference is far below the bound.
    EXPECT_LE(mean, std::ldexp(1.0, -11)) << kvcache::cpu::quant_format_name(format);
    EXPECT_GT(worst, 0.0) << "the float32 path ran on AMX too?";
  }
}

// Every output is computed the same way whichever thread computes it (how M and N are split only
// decides which), so 1 to 4 threads give the same bits. The shapes split N, M, and both (2×2 on 4
// threads); 300 rows come in two chunks.
TEST(QuantizedAmx, SameBitsForAnyThreadCount) {
  SKIP_WITHOUT_AMX();
  struct Shape {
    std::int64_t m, n, k;
  };
  std::mt19937 rng(9);
  const int previous = omp_get_max_threads();
  for (const Shape s : {Shape{75, 97, 192}, Shape{256, 192, 576}, Shape{96, 320, 64},
                        Shape{128, 192, 96}, Shape{300, 40, 64}}) {
    const QuantizedMatrix w = QuantizedMatrix::quantize(
        random_tensor({s.n, s.k}, DType::kFloat32, rng), QuantFormat::kQ4_1);
    const Tensor x = random_tensor({s.m, s.k}, DType::kFloat32, rng);
    const Tensor bias = random_tensor({s.n}, DType::kFloat32, rng);
    std::vector<Tensor> results;
    for (int threads : {1, 2, 3, 4}) {
      omp_set_num_threads(threads);
      results.push_back(kvcache::cpu::linear(x, w, bias));
    }
    omp_set_num_threads(previous);
    for (std::size_t i = 1; i < results.size(); ++i) {
      EXPECT_EQ(std::memcmp(results[0].data(), results[i].data(), results[0].nbytes()), 0)
          << "m=" << s.m << " N=" << s.n << " K=" << s.k << ", " << i + 1 << " threads";
    }
  }
}

// More than 256 rows are done in chunks (here 2 and 3), each with its own split.
TEST(QuantizedAmx, ManyRowsInChunks) {
  SKIP_WITHOUT_AMX();
  check_shapes(QuantFormat::kQ4_1, {300, 600}, {40}, {64}, 11);
  check_shapes(QuantFormat::kQ8_0, {300}, {33}, {96}, 12);
}

// Scratch kept between calls: a large call, then a smaller one, then the large one again.
TEST(QuantizedAmx, ScratchReusedAcrossShapes) {
  SKIP_WITHOUT_AMX();
  std::mt19937 rng(10);
  const QuantizedMatrix big = QuantizedMatrix::quantize(
      random_tensor({64, 1536}, DType::kFloat32, rng), QuantFormat::kQ4_1);
  const QuantizedMatrix small =
      QuantizedMatrix::quantize(random_tensor({17, 32}, DType::kFloat32, rng), QuantFormat::kQ8_0);
  const Tensor xb = random_tensor({70, 1536}, DType::kFloat32, rng);
  const Tensor xs = random_tensor({6, 32}, DType::kFloat32, rng);
  const Tensor first = kvcache::cpu::linear(xb, big);
  expect_matches_reference(xs, small, Tensor(), "small after big");
  const Tensor again = kvcache::cpu::linear(xb, big);
  EXPECT_EQ(std::memcmp(first.data(), again.data(), first.nbytes()), 0);
  expect_matches_reference(xb, big, Tensor(), "big after small");
}

}  // namespace
