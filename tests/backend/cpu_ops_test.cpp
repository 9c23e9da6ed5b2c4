// The dense CPU layers the models use, against float64: silu_mul (whose e^x is a polynomial where
// the build has AVX-512), rms_norm and add_inplace — on sizes with vector tails and on sizes big
// enough to run threaded.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

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
