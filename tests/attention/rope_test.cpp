// RoPE: inverse frequencies for default, linear and llama3 scaling against the formulas in
// float64, the rotation against a float64 reference, and position ids from a padded mask.
#include "kvcache/attention/rope.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <random>

#include "reference/reference.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::to_doubles;

std::vector<double> default_inv_freq(std::int64_t dim, double theta) {
  std::vector<double> f;
  for (std::int64_t k = 0; k < dim / 2; ++k)
    f.push_back(1.0 / std::pow(theta, static_cast<double>(2 * k) / static_cast<double>(dim)));
  return f;
}

TEST(Rope, DefaultInverseFrequencies) {
  const RotaryEmbedding rope({.head_dim = 64, .rope_theta = 10000.0});
  const auto expected = default_inv_freq(64, 10000.0);
  ASSERT_EQ(rope.inv_freq().size(), expected.size());
  for (std::size_t k = 0; k < expected.size(); ++k)
    EXPECT_NEAR(rope.inv_freq()[k], expected[k], 2e-7 * expected[k]) << k;
  EXPECT_EQ(rope.attention_scaling(), 1.0f);
}

TEST(Rope, LinearScalingDividesFrequencies) {
  const RotaryEmbedding rope({.head_dim = 32,
                              .rope_theta = 10000.0,
                              .scaling = {.type = RopeType::kLinear, .factor = 4.0}});
  const auto expected = default_inv_freq(32, 10000.0);
  for (std::size_t k = 0; k < expected.size(); ++k)
    EXPECT_NEAR(rope.inv_freq()[k], expected[k] / 4.0, 2e-7 * expected[k]);
}

TEST(Rope, Llama3ScalingMatchesItsDefinition) {
  // Llama 3.1's parameters: factor 8, low/high frequency factors 1 and 4, original context 8192.
  const RopeScaling scaling{.type = RopeType::kLlama3,
                            .factor = 8.0,
                            .low_freq_factor = 1.0,
                            .high_freq_factor = 4.0,
                            .original_max_position_embeddings = 8192};
  const RotaryEmbedding rope({.head_dim = 128, .rope_theta = 500000.0, .scaling = scaling});
  const auto base = default_inv_freq(128, 500000.0);
  int low = 0, high = 0, medium = 0;
  for (std::size_t k = 0; k < base.size(); ++k) {
    const double wavelen = 2 * std::numbers::pi / base[k];
    double expected;
    if (wavelen < 8192.0 / 4.0) {
      expected = base[k];  // high frequency: kept
      ++high;
    } else if (wavelen > 8192.0 / 1.0) {
      expected = base[k] / 8.0;  // low frequency: divided by factor
      ++low;
    } else {
      const double smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
      expected = (1 - smooth) * base[k] / 8.0 + smooth * base[k];
      ++medium;
    }
    EXPECT_NEAR(rope.inv_freq()[k], expected, 1e-6 * expected) << k;
  }
  EXPECT_GT(low, 0);  // the head_dim covers all three bands
  EXPECT_GT(high, 0);
  EXPECT_GT(medium, 0);
}

TEST(Rope, UnknownTypesAreNamed) {
  EXPECT_KVCACHE_ERROR(parse_rope_type("yarn"), "got 'yarn', which kvcache does not implement yet");
  EXPECT_EQ(parse_rope_type("llama3"), RopeType::kLlama3);
  EXPECT_KVCACHE_ERROR(RotaryEmbedding({.head_dim = 7}), "expected an even head_dim > 0, got 7");
}

TEST(Rope, RotationMatchesFloat64Reference) {
  std::mt19937 rng(41);
  const std::int64_t batch = 2, heads = 3, q_len = 6, dim = 16;
  const RotaryEmbedding rope({.head_dim = dim, .rope_theta = 10000.0});
  // Row 0 unpadded, row 1 with two pads: positions 1, 1, 0, 1, 2, 3.
  std::vector<std::int64_t> mask_values = {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1};
  Tensor mask = Tensor::from_blob(mask_values.data(), {2, 6}, DType::kInt64);
  Tensor pos = position_ids_from_attention_mask(mask);
  std::vector<std::vector<std::int64_t>> pos_rows = {{0, 1, 2, 3, 4, 5}, {1, 1, 0, 1, 2, 3}};
  EXPECT_EQ(to_doubles(pos), (std::vector<double>{0, 1, 2, 3, 4, 5, 1, 1, 0, 1, 2, 3}));
  std::vector<double> inv(rope.inv_freq().begin(), rope.inv_freq().end());
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    Tensor x = testing::random_tensor({batch, heads, q_len, dim}, dtype, rng);
    const auto expected = reference::rope(reference::Array4::from(x), pos_rows, inv);
    rope.apply(x, pos);
    const double tol = dtype == DType::kFloat32 ? 1e-6 : dtype == DType::kFloat16 ? 3e-3 : 2e-2;
    EXPECT_LT(testing::compare(to_doubles(x), expected.data).max_abs, tol) << dtype_name(dtype);
  }
}

TEST(Rope, CosSinAreCastToTheRequestedDtype) {
  const RotaryEmbedding rope({.head_dim = 8});
  std::vector<std::int64_t> p = {0, 3};
  auto [cos, sin] =
      rope.cos_sin(Tensor::from_blob(p.data(), {1, 2}, DType::kInt64), DType::kBFloat16);
  EXPECT_EQ(cos.dtype(), DType::kBFloat16);
  EXPECT_EQ(cos.shape_string(), "[1, 2, 8]");
  const auto c = to_doubles(cos);
  EXPECT_EQ(c[0], 1.0);  // position 0
  EXPECT_NEAR(c[8], std::cos(3.0), 4e-3);
  EXPECT_EQ(c[8], c[12]);  // the two halves share an angle
}

TEST(PositionIds, FromMaskTakesTheLastColumnsAndAdvances) {
  std::vector<std::int64_t> m = {0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
  Tensor mask = Tensor::from_blob(m.data(), {2, 5}, DType::kInt64);
  Tensor last2 = position_ids_from_attention_mask(mask, 2);
  EXPECT_EQ(to_doubles(last2), (std::vector<double>{1, 2, 3, 4}));
  Tensor next = next_position_ids(last2);
  EXPECT_EQ(next.shape_string(), "[2, 1]");
  EXPECT_EQ(to_doubles(next), (std::vector<double>{3, 5}));
  EXPECT_KVCACHE_ERROR(position_ids_from_attention_mask(mask, 6), "expected q_len <= 5");
}

TEST(Rope, BadPositionIdsAreErrors) {
  const RotaryEmbedding rope({.head_dim = 8});
  Tensor x = Tensor::zeros({1, 2, 3, 8}, DType::kFloat32);
  std::vector<std::int64_t> p = {0, 1};
  EXPECT_KVCACHE_ERROR(rope.apply(x, Tensor::from_blob(p.data(), {1, 2}, DType::kInt64)),
                       "expected position_ids [1, 3], got [1, 2]");
  std::vector<float> fp = {0, 1, 2};
  EXPECT_KVCACHE_ERROR(rope.apply(x, Tensor::from_blob(fp.data(), {1, 3}, DType::kFloat32)),
                       "expected position_ids [batch, q_len] int64");
}

}  // namespace
}  // namespace kvcache
