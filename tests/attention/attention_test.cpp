// The attention module against a float64 reference: MHA and GQA, every dtype, left padding,
// chunked prefill equal to one-shot prefill, and the property a KV cache exists for: a decode
// step with the cache equals recomputing attention over the whole sequence without it.
#include "kvcache/attention/attention.hpp"

#include <gtest/gtest.h>

#include <random>
#include <sstream>

#include "kvcache/attention/rope.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using reference::Array4;
using testing::random_tensor;
using testing::to_doubles;

double tolerance(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 2e-5;
    case DType::kFloat16:
      return 2e-3;
    default:
      return 1.6e-2;
  }
}

std::vector<std::vector<int>> mask_rows(const Tensor& mask) {
  std::vector<std::vector<int>> rows;
  if (!mask.defined()) return rows;
  const auto flat = to_doubles(mask);
  for (std::int64_t b = 0; b < mask.size(0); ++b) {
    rows.emplace_back();
    for (std::int64_t j = 0; j < mask.size(1); ++j)
      rows.back().push_back(static_cast<int>(flat[static_cast<std::size_t>(b * mask.size(1) + j)]));
  }
  return rows;
}

// A left-padded [batch, length] int64 mask: row b has pads[b] leading zeros.
Tensor left_padded_mask(const std::vector<std::int64_t>& pads, std::int64_t length) {
  Tensor mask = ones_mask(static_cast<std::int64_t>(pads.size()), length);
  for (std::size_t b = 0; b < pads.size(); ++b)
    for (std::int64_t j = 0; j < pads[b]; ++j)
      mask.data_as<std::int64_t>()[static_cast<std::int64_t>(b) * length + j] = 0;
  return mask;
}

struct Shape {
  std::int64_t batch, heads, kv_heads, q_len, head_dim;
};

class AttentionPrefill : public ::testing::TestWithParam<std::tuple<Shape, DType>> {};

TEST_P(AttentionPrefill, MatchesFloat64Reference) {
  const auto& [s, dtype] = GetParam();
  std::mt19937 rng(31);
  Tensor q = random_tensor({s.batch, s.heads, s.q_len, s.head_dim}, dtype, rng);
  Tensor k = random_tensor({s.batch, s.kv_heads, s.q_len, s.head_dim}, dtype, rng);
  Tensor v = random_tensor({s.batch, s.kv_heads, s.q_len, s.head_dim}, dtype, rng);
  Attention attention(0,
                      {.num_heads = s.heads, .num_kv_heads = s.kv_heads, .head_dim = s.head_dim});
  DynamicCache<> cache;
  const auto cache_position = make_cache_position(0, s.q_len);
  Tensor out = attention.forward(q, k, v, cache, Tensor(), cache_position);
  ASSERT_EQ(out.shape_string(),
            Tensor::empty({s.batch, s.q_len, s.heads, s.head_dim}, dtype).shape_string());
  EXPECT_EQ(out.dtype(), dtype);
  const Array4 expected =
      reference::attention(Array4::from(q), Array4::from(k), Array4::from(v), {}, cache_position, 0,
                           1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  const auto err = testing::compare(to_doubles(out), expected.data);
  EXPECT_LT(err.max_abs, tolerance(dtype)) << "max rel " << err.max_rel;
  EXPECT_EQ(cache.get_seq_length(), s.q_len);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionPrefill,
    ::testing::Combine(::testing::Values(Shape{2, 4, 4, 9, 16},    // MHA
                                         Shape{1, 8, 2, 37, 32},   // GQA
                                         Shape{2, 6, 3, 300, 64},  // several kv chunks
                                         Shape{1, 8, 2, 600, 32},  // several query blocks
                                         Shape{2, 4, 2, 5, 24},    // decode path, odd head_dim
                                         Shape{1, 3, 3, 1, 80}),   // one query, head_dim 5 × 16
                       ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16)),
    [](const auto& info) {
      const Shape& s = std::get<0>(info.param);
      std::ostringstream name;  // (operator+ on strings trips g++ 12's -Wrestrict)
      name << "b" << s.batch << "_h" << s.heads << "_kv" << s.kv_heads << "_q" << s.q_len << "_d"
           << s.head_dim << "_" << dtype_name(std::get<1>(info.param));
      return name.str();
    });

TEST(Attention, LeftPaddingMasksPadsAndGivesZerosNotNaN) {
  std::mt19937 rng(32);
  const std::int64_t batch = 3, heads = 4, kv_heads = 2, len = 11, dim = 16;
  const Tensor mask = left_padded_mask({0, 3, 7}, len);
  Tensor q = random_tensor({batch, heads, len, dim}, DType::kFloat32, rng);
  Tensor k = random_tensor({batch, kv_heads, len, dim}, DType::kFloat32, rng);
  Tensor v = random_tensor({batch, kv_heads, len, dim}, DType::kFloat32, rng);
  Attention attention(0, {.num_heads = heads, .num_kv_heads = kv_heads, .head_dim = dim});
  DynamicCache<> cache;
  const auto pos = make_cache_position(0, len);
  Tensor out = attention.forward(q, k, v, cache, mask, pos);
  const Array4 expected = reference::attention(Array4::from(q), Array4::from(k), Array4::from(v),
                                               mask_rows(mask), pos, 0, 1.0 / 4.0);
  const auto got = to_doubles(out);
  EXPECT_LT(testing::compare(got, expected.data).max_abs, 2e-5);
  // Query rows at padded slots see no key at all: zeros (transformers #47651 gives NaN there).
  for (std::int64_t i = 0; i < 7; ++i)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t c = 0; c < dim; ++c)
        EXPECT_EQ(got[static_cast<std::size_t>(((2 * len + i) * heads + h) * dim + c)], 0.0);
  for (double x : got) EXPECT_FALSE(std::isnan(x));
  // Padding changes nothing for the real tokens: row 1 equals attending over its unpadded
  // suffix alone, as a batch of one with no mask.
  DynamicCache<> alone;
  const std::int64_t pad = 3, real = len - pad;
  const auto unpadded = to_doubles(attention.forward(
      q.slice(0, 1, 2).slice(2, pad, len), k.slice(0, 1, 2).slice(2, pad, len),
      v.slice(0, 1, 2).slice(2, pad, len), alone, Tensor(), make_cache_position(0, real)));
  double worst = 0;
  for (std::int64_t i = 0; i < real; ++i)
    for (std::int64_t x = 0; x < heads * dim; ++x)
      worst = std::max(
          worst, std::abs(unpadded[static_cast<std::size_t>(i * heads * dim + x)] -
                          got[static_cast<std::size_t>(((len + pad + i) * heads) * dim + x)]));
  EXPECT_LT(worst, 1e-6);
}

TEST(Attention, ChunkedPrefillEqualsOneShot) {
  std::mt19937 rng(33);
  const std::int64_t batch = 2, heads = 8, kv_heads = 2, len = 40, dim = 32;
  const Tensor mask = left_padded_mask({0, 5}, len);
  Tensor q = random_tensor({batch, heads, len, dim}, DType::kFloat32, rng);
  Tensor k = random_tensor({batch, kv_heads, len, dim}, DType::kFloat32, rng);
  Tensor v = random_tensor({batch, kv_heads, len, dim}, DType::kFloat32, rng);
  Attention attention(3, {.num_heads = heads, .num_kv_heads = kv_heads, .head_dim = dim});

  DynamicCache<> one_shot_cache;
  for (int layer = 0; layer < 3; ++layer) {  // the module is layer 3: earlier layers exist
    one_shot_cache.update(k.slice(2, 0, 1), v.slice(2, 0, 1), layer);
    one_shot_cache.crop(0);
  }
  const auto one_shot =
      to_doubles(attention.forward(q, k, v, one_shot_cache, mask, make_cache_position(0, len)));

  DynamicCache<> chunked_cache;
  for (int layer = 0; layer < 3; ++layer) {
    chunked_cache.update(k.slice(2, 0, 1), v.slice(2, 0, 1), layer);
    chunked_cache.crop(0);
  }
  std::vector<double> chunked(one_shot.size());
  const std::int64_t bounds[] = {0, 13, 14, 29, 40};
  for (int c = 0; c + 1 < 5; ++c) {
    const std::int64_t a = bounds[c], b = bounds[c + 1];
    Tensor part =
        attention.forward(q.slice(2, a, b), k.slice(2, a, b), v.slice(2, a, b), chunked_cache,
                          mask.slice(1, 0, b), make_cache_position(a, b - a));
    const auto got = to_doubles(part);  // [batch, b - a, heads, dim]
    for (std::int64_t r = 0; r < batch; ++r)
      for (std::int64_t i = 0; i < b - a; ++i)
        for (std::int64_t x = 0; x < heads * dim; ++x)
          chunked[static_cast<std::size_t>((r * len + a + i) * heads * dim + x)] =
              got[static_cast<std::size_t>((r * (b - a) + i) * heads * dim + x)];
  }
  EXPECT_LT(testing::compare(chunked, one_shot).max_abs, 1e-5);
  EXPECT_EQ(chunked_cache.get_seq_length(3), len);
}

// The central property: decoding with the cache equals recomputing without it. A left-padded batch,
// RoPE from the mask's position ids, prefill then single-token steps; each step's output must equal
// the last query row of a cache-free attention over the whole sequence so far.
TEST(Attention, DecodeWithCacheEqualsFullRecomputation) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    std::mt19937 rng(34);
    const std::int64_t batch = 3, heads = 6, kv_heads = 2, dim = 32, prompt = 9, steps = 12,
                       total = prompt + steps;
    const std::vector<std::int64_t> pads = {0, 2, 6};
    // Raw (pre-RoPE) states for every position, as a model would produce them.
    Tensor q_all = random_tensor({batch, heads, total, dim}, dtype, rng);
    Tensor k_all = random_tensor({batch, kv_heads, total, dim}, dtype, rng);
    Tensor v_all = random_tensor({batch, kv_heads, total, dim}, dtype, rng);
    const RotaryEmbedding rope({.head_dim = dim, .rope_theta = 10000.0});
    Attention attention(0, {.num_heads = heads, .num_kv_heads = kv_heads, .head_dim = dim});

    DynamicCache<> cache;
    Tensor mask = left_padded_mask(pads, prompt);
    Tensor position_ids = position_ids_from_attention_mask(mask);
    std::vector<std::int64_t> cache_position = make_cache_position(0, prompt);
    std::int64_t start = 0, q_len = prompt;
    for (int step = 0; step <= steps; ++step) {
      Tensor q = cpu::clone(q_all.slice(2, start, start + q_len));
      Tensor k = cpu::clone(k_all.slice(2, start, start + q_len));
      Tensor v = cpu::clone(v_all.slice(2, start, start + q_len));
      rope.apply(q, position_ids);
      rope.apply(k, position_ids);
      const auto with_cache = to_doubles(attention.forward(q, k, v, cache, mask, cache_position));

      // Without a cache: RoPE over the whole sequence so far, one fresh prefill.
      const std::int64_t upto = start + q_len;
      Tensor full_mask = mask;  // already past + new
      Tensor full_pos = position_ids_from_attention_mask(full_mask);
      Tensor fq = cpu::clone(q_all.slice(2, 0, upto));
      Tensor fk = cpu::clone(k_all.slice(2, 0, upto));
      Tensor fv = cpu::clone(v_all.slice(2, 0, upto));
      rope.apply(fq, full_pos);
      rope.apply(fk, full_pos);
      DynamicCache<> scratch;
      const auto without = to_doubles(
          attention.forward(fq, fk, fv, scratch, full_mask, make_cache_position(0, upto)));
      // Compare the step's query rows with the same rows of the full computation.
      const std::int64_t row = heads * dim;
      double worst = 0;
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t i = 0; i < q_len; ++i)
          for (std::int64_t x = 0; x < row; ++x) {
            const double a = with_cache[static_cast<std::size_t>((b * q_len + i) * row + x)];
            const double e = without[static_cast<std::size_t>((b * upto + start + i) * row + x)];
            ASSERT_FALSE(std::isnan(a));
            worst = std::max(worst, std::abs(a - e));
          }
      EXPECT_LE(worst, dtype == DType::kFloat32 ? 1e-6 : 1e-2)
          << "step " << step << " " << dtype_name(dtype);

      // The seed's loop: grow the mask by one column, cache_position = last + 1, positions + 1.
      start = upto;
      q_len = 1;
      mask = extend_attention_mask(mask);
      position_ids = next_position_ids(position_ids);
      cache_position = {cache_position.back() + 1};
      EXPECT_EQ(cache.get_seq_length(), upto);
    }
  }
}

TEST(Attention, ResultMatchesReferenceAfterDecodeSteps) {
  // Decode outputs checked against the float64 reference directly (not only self-consistency).
  std::mt19937 rng(35);
  const std::int64_t heads = 8, kv_heads = 2, dim = 64, prompt = 70;
  Attention attention(
      0, {.num_heads = heads, .num_kv_heads = kv_heads, .head_dim = dim, .scale = 0.1f});
  DynamicCache<> cache;
  Tensor k0 = random_tensor({1, kv_heads, prompt, dim}, DType::kFloat32, rng);
  Tensor v0 = random_tensor({1, kv_heads, prompt, dim}, DType::kFloat32, rng);
  attention.forward(random_tensor({1, heads, prompt, dim}, DType::kFloat32, rng), k0, v0, cache,
                    Tensor(), make_cache_position(0, prompt));
  reference::ConcatCache ref;
  ref.update(k0, v0, 0);
  for (std::int64_t t = prompt; t < prompt + 5; ++t) {
    Tensor q = random_tensor({1, heads, 1, dim}, DType::kFloat32, rng);
    Tensor k = random_tensor({1, kv_heads, 1, dim}, DType::kFloat32, rng);
    Tensor v = random_tensor({1, kv_heads, 1, dim}, DType::kFloat32, rng);
    const std::vector<std::int64_t> pos = {t};
    const auto got = to_doubles(attention.forward(q, k, v, cache, ones_mask(1, t + 1), pos));
    ref.update(k, v, 0);
    const Array4 expected =
        reference::attention(Array4::from(q), ref.keys[0], ref.values[0], {}, pos, 0, 0.1);
    EXPECT_LT(testing::compare(got, expected.data).max_abs, 2e-5);
  }
}

// --- errors leave the cache as it was --------------------------------------------------------

class AttentionErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    attention_.forward(random_tensor({2, 4, 5, 8}, DType::kFloat32, rng_),
                       random_tensor({2, 2, 5, 8}, DType::kFloat32, rng_),
                       random_tensor({2, 2, 5, 8}, DType::kFloat32, rng_), cache_, ones_mask(2, 5),
                       make_cache_position(0, 5));
    before_ = to_doubles(cache_.to_legacy_cache()[0].first);
  }
  void expect_unchanged() {
    EXPECT_EQ(cache_.get_seq_length(), 5);
    EXPECT_EQ(to_doubles(cache_.to_legacy_cache()[0].first), before_);
  }
  Tensor t(std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t d) {
    return random_tensor({b, h, q, d}, DType::kFloat32, rng_);
  }
  std::mt19937 rng_{36};
  Attention attention_{0, {.num_heads = 4, .num_kv_heads = 2, .head_dim = 8}};
  DynamicCache<> cache_;
  std::vector<double> before_;
};

TEST_F(AttentionErrors, MaskLengthMustBePastPlusNew) {
  const std::vector<std::int64_t> pos = {5};
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(2, 4, 1, 8), t(2, 2, 1, 8), t(2, 2, 1, 8), cache_, ones_mask(2, 5), pos),
      "expected attention_mask [batch, past + new] = [2, 6], got [2, 5]");
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(2, 4, 1, 8), t(2, 2, 1, 8), t(2, 2, 1, 8), cache_, ones_mask(3, 6), pos),
      "got [3, 6]");
  expect_unchanged();
}

TEST_F(AttentionErrors, MaskValuesMustBeZeroOrOne) {
  Tensor mask = ones_mask(2, 6);
  mask.data_as<std::int64_t>()[3] = -100;
  const std::vector<std::int64_t> pos = {5};
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(2, 4, 1, 8), t(2, 2, 1, 8), t(2, 2, 1, 8), cache_, mask, pos),
      "expected attention_mask values 0 or 1, got -100 at row 0, column 3");
  expect_unchanged();
}

TEST_F(AttentionErrors, CachePositionMustFit) {
  const std::vector<std::int64_t> two = {5, 6};
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(2, 4, 1, 8), t(2, 2, 1, 8), t(2, 2, 1, 8), cache_, ones_mask(2, 6), two),
      "expected 1 cache positions (one per new token), got 2");
  const std::vector<std::int64_t> far = {9};
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(2, 4, 1, 8), t(2, 2, 1, 8), t(2, 2, 1, 8), cache_, ones_mask(2, 6), far),
      "expected cache_position in [0, 6) (past + new), got 9");
  expect_unchanged();
}

TEST_F(AttentionErrors, HeadsAndShapesMustMatch) {
  const std::vector<std::int64_t> pos = {5};
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(2, 3, 1, 8), t(2, 2, 1, 8), t(2, 2, 1, 8), cache_, ones_mask(2, 6), pos),
      "expected query_states [batch, 4, q_len, 8], got [2, 3, 1, 8]");
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(2, 4, 1, 8), t(2, 4, 1, 8), t(2, 4, 1, 8), cache_, ones_mask(2, 6), pos),
      "expected key/value states [2, 2, 1, 8], got [2, 4, 1, 8]");
  EXPECT_KVCACHE_ERROR(
      attention_.forward(t(3, 4, 1, 8), t(3, 2, 1, 8), t(3, 2, 1, 8), cache_, ones_mask(3, 6), pos),
      "expected new states [2, 2, q_len, 8] float32, got [3, 2, 1, 8]");
  expect_unchanged();
}

TEST(Attention, BadOptionsAreErrors) {
  EXPECT_KVCACHE_ERROR(Attention(0, {.num_heads = 6, .num_kv_heads = 4, .head_dim = 8}),
                       "expected num_heads (6) to be a multiple of num_kv_heads, got 4");
  EXPECT_KVCACHE_ERROR(Attention(-1, {.num_heads = 4, .num_kv_heads = 4, .head_dim = 8}),
                       "expected layer_idx >= 0");
}

}  // namespace
}  // namespace kvcache

namespace kvcache {
namespace {

// The decode path splits long key ranges across threads and merges the pieces; pieces that are
// all padding must drop out of the merge. Checked against the float64 reference with a long,
// heavily left-padded row and a few query tokens at once.
TEST(Attention, SplitDecodeMatchesReference) {
  std::mt19937 rng(37);
  const std::int64_t batch = 2, heads = 4, kv_heads = 2, dim = 64, past = 3000;
  for (std::int64_t q_len : {1, 3}) {
    Attention attention(0, {.num_heads = heads, .num_kv_heads = kv_heads, .head_dim = dim});
    DynamicCache<> cache;
    Tensor k0 = random_tensor({batch, kv_heads, past, dim}, DType::kFloat32, rng);
    Tensor v0 = random_tensor({batch, kv_heads, past, dim}, DType::kFloat32, rng);
    cache.update(k0, v0, 0);
    reference::ConcatCache ref;
    ref.update(k0, v0, 0);
    Tensor q = random_tensor({batch, heads, q_len, dim}, DType::kFloat32, rng);
    Tensor k = random_tensor({batch, kv_heads, q_len, dim}, DType::kFloat32, rng);
    Tensor v = random_tensor({batch, kv_heads, q_len, dim}, DType::kFloat32, rng);
    Tensor mask = left_padded_mask({0, 2100}, past + q_len);
    const auto pos = make_cache_position(past, q_len);
    const auto got = to_doubles(attention.forward(q, k, v, cache, mask, pos));
    ref.update(k, v, 0);
    const Array4 expected = reference::attention(Array4::from(q), ref.keys[0], ref.values[0],
                                                 mask_rows(mask), pos, 0, 1.0 / 8.0);
    EXPECT_LT(testing::compare(got, expected.data).max_abs, 2e-5) << "q_len " << q_len;
  }
}

}  // namespace
}  // namespace kvcache
