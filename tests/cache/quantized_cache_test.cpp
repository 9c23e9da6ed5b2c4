// QuantizedCache against naive references: the dequantized keys and values within the
// quantization bound of every group (computed in float64 from the inputs) for 8, 4 and 2 bits,
// both key axes and both scale dtypes; the residual exact; old blocks' bytes unchanged as tokens
// arrive (quantized once); bytes per token; attention over it against attention over the exact
// tokens; get_mask_sizes across residual flushes; crop, batch ops, reset and clone; errors that
// leave the cache unchanged; and greedy tokens on a transformers fixture equal to the
// DynamicCache's at 8 bits.
#include "kvcache/cache/quantized_cache.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <random>
#include <vector>

#include "cache/negative_crop.hpp"
#include "cache/quantized_mask_sizes.hpp"
#include "kvcache/attention/attention.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/safetensors.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;
using testing::to_doubles;

constexpr std::int64_t kBatch = 2, kHeads = 2, kDim = 32;

// History [b, h, t, d] in float64 of every token fed.
struct History {
  std::vector<std::vector<double>> k, v;  // per token: [b][h][d]
  void append(const Tensor& keys, const Tensor& values) {
    const auto kd = to_doubles(keys), vd = to_doubles(values);
    const std::int64_t q = keys.size(2);
    for (std::int64_t t = 0; t < q; ++t) {
      std::vector<double> kt, vt;
      for (std::int64_t bh = 0; bh < kBatch * kHeads; ++bh)
        for (std::int64_t c = 0; c < kDim; ++c) {
          kt.push_back(kd[static_cast<std::size_t>((bh * q + t) * kDim + c)]);
          vt.push_back(vd[static_cast<std::size_t>((bh * q + t) * kDim + c)]);
        }
      k.push_back(kt);
      v.push_back(vt);
    }
  }
};

// The bound of one group: half a step of its range, the range widened by float16's outward
// rounding of min and scale.
double group_bound(const std::vector<double>& xs, int nbits) {
  const double lo = *std::min_element(xs.begin(), xs.end());
  const double hi = *std::max_element(xs.begin(), xs.end());
  const double qmax = (1 << nbits) - 1;
  return 0.5 * ((hi - lo) * (1 + 4e-3) + std::abs(lo) * 4e-3) / qmax + 1e-6;
}

// Checks out [b, h, seen, d] against the history: tokens [0, quantized) within their group's
// bound, the rest exact. Returns the max abs error over the quantized tokens.
double check_output(const Tensor& out, const History& hist, bool keys, std::int64_t quantized,
                    const QuantizedCacheOptions& o) {
  const auto got = to_doubles(out);
  const auto& src = keys ? hist.k : hist.v;
  const std::int64_t seen = out.size(2);
  const bool per_channel = keys && o.key_axis == QuantAxis::kPerChannel;
  const std::int64_t g = std::min(o.group_size, kDim);
  double worst = 0;
  for (std::int64_t bh = 0; bh < kBatch * kHeads; ++bh)
    for (std::int64_t t = 0; t < seen; ++t)
      for (std::int64_t c = 0; c < kDim; ++c) {
        const double want =
            src[static_cast<std::size_t>(t)][static_cast<std::size_t>(bh * kDim + c)];
        const double have = got[static_cast<std::size_t>((bh * seen + t) * kDim + c)];
        if (t >= quantized) {
          EXPECT_EQ(have, want) << "residual token " << t;
          continue;
        }
        std::vector<double> group;
        if (per_channel) {
          const std::int64_t t0 = t / o.group_size * o.group_size;
          for (std::int64_t s = t0; s < t0 + o.group_size; ++s)
            group.push_back(
                src[static_cast<std::size_t>(s)][static_cast<std::size_t>(bh * kDim + c)]);
        } else {
          const std::int64_t c0 = c / g * g;
          for (std::int64_t e = c0; e < c0 + g; ++e)
            group.push_back(
                src[static_cast<std::size_t>(t)][static_cast<std::size_t>(bh * kDim + e)]);
        }
        const double err = std::abs(have - want);
        EXPECT_LE(err, group_bound(group, o.nbits)) << "token " << t << " channel " << c;
        worst = std::max(worst, err);
      }
  return worst;
}

TEST(QuantizedCache, RoundTripWithinTheGroupBound) {
  for (int nbits : {8, 4, 2})
    for (QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken})
      for (DType sd : {DType::kFloat16, DType::kFloat32})
        for (std::int64_t group : {8, 16, 64}) {
          const QuantizedCacheOptions o{.nbits = nbits,
                                        .group_size = group,
                                        .key_axis = axis,
                                        .residual_length = 5,
                                        .scale_dtype = sd};
          QuantizedCache<> cache(o);
          History hist;
          std::mt19937 rng(static_cast<unsigned>(nbits * 100 + group));
          double worst = 0;
          for (std::int64_t q : {9, 1, 1, 3, 1, 40, 1, 2, 17, 1}) {
            const Tensor k = random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng, 2.0f);
            const Tensor v = random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng, 2.0f);
            const std::int64_t quantized_before = cache.quantized_length();
            hist.append(k, v);
            const auto [ok, ov] = cache.update(k, v, 0);
            ASSERT_EQ(ok.size(2), static_cast<std::int64_t>(hist.k.size()));
            // The step attends over the blocks held before it; everything newer is exact.
            worst = std::max(worst, check_output(ok, hist, true, quantized_before, o));
            worst = std::max(worst, check_output(ov, hist, false, quantized_before, o));
            // What stays in full precision: at least residual_length tokens.
            EXPECT_GE(cache.get_seq_length() - cache.quantized_length(),
                      std::min<std::int64_t>(5, cache.get_seq_length()));
          }
          EXPECT_GT(cache.quantized_length(), 0);
          if (group == 16 && sd == DType::kFloat16)
            std::printf("nbits %d %s keys, group 16: max abs error %.4f (inputs in [-2, 2))\n",
                        nbits, axis == QuantAxis::kPerChannel ? "per-channel" : "per-token", worst);
        }
}

TEST(QuantizedCache, BlocksAreQuantizedOnce) {
  for (QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken}) {
    QuantizedCache<> cache({.nbits = 4, .group_size = 16, .key_axis = axis, .residual_length = 8});
    std::mt19937 rng(1);
    auto feed = [&](std::int64_t q) {
      cache.update(random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng),
                   random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng), 0);
    };
    feed(40);
    const auto [k0, v0] = cache.block_bytes(0, 1);
    const std::vector<unsigned char> keys(k0.begin(), k0.end()), values(v0.begin(), v0.end());
    ASSERT_FALSE(keys.empty());
    for (int i = 0; i < 70; ++i) feed(1);
    const auto [k1, v1] = cache.block_bytes(0, 1);
    ASSERT_GT(k1.size(), keys.size());
    EXPECT_TRUE(std::equal(keys.begin(), keys.end(), k1.begin()));
    EXPECT_TRUE(std::equal(values.begin(), values.end(), v1.begin()));
  }
}

TEST(QuantizedCache, BytesPerToken) {
  // One kv head of head_dim 64, group 64, float16 scale and min, keys + values.
  for (QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken}) {
    const auto bpt = [&](int nbits) {
      return QuantizedCache<>::bytes_per_token({.nbits = nbits, .group_size = 64, .key_axis = axis},
                                               1, 64);
    };
    EXPECT_DOUBLE_EQ(bpt(8), 136);
    EXPECT_DOUBLE_EQ(bpt(4), 72);
    EXPECT_DOUBLE_EQ(bpt(2), 40);
    EXPECT_LE(bpt(4), 0.3 * 256);  // bfloat16: 2 x 64 x 2 bytes
  }
  // nbytes counts the blocks and the float32 residual.
  QuantizedCache<> cache(
      {.nbits = 4, .group_size = 32, .key_axis = QuantAxis::kPerToken, .residual_length = 0});
  std::mt19937 rng(2);
  const Tensor k = random_tensor({kBatch, kHeads, 10, kDim}, DType::kFloat32, rng);
  cache.update(k, k, 0);
  EXPECT_EQ(cache.nbytes(),
            static_cast<std::size_t>(
                10 * QuantizedCache<>::bytes_per_token(cache.options(), kHeads, kDim) * kBatch));
}

TEST(QuantizedCache, AttentionCloseToTheExactCache) {
  const Attention attn(0, {.num_heads = 4, .num_kv_heads = kHeads, .head_dim = kDim});
  for (int nbits : {8, 4, 2}) {
    QuantizedCache<> quant({.nbits = nbits, .group_size = 32, .residual_length = 16});
    DynamicCache<> exact;
    std::mt19937 rng(9);
    double worst = 0;
    std::int64_t seen = 0;
    for (std::int64_t q : {50, 1, 1, 1, 30, 1, 1}) {
      const Tensor query = random_tensor({kBatch, 4, q, kDim}, DType::kFloat32, rng);
      const Tensor k = random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng);
      const Tensor v = random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng);
      const std::vector<std::int64_t> pos = make_cache_position(seen, q);
      const Tensor a = attn.forward(query, k, v, quant, Tensor(), pos);
      const Tensor b = attn.forward(query, k, v, exact, Tensor(), pos);
      const auto x = to_doubles(a), y = to_doubles(b);
      for (std::size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(x[i] - y[i]));
      seen += q;
    }
    std::printf("attention over %d-bit cache vs exact: max abs error %.4g\n", nbits, worst);
    EXPECT_LT(worst, nbits == 8 ? 0.01 : nbits == 4 ? 0.1 : 0.5);
  }
}

TEST(QuantizedCache, MaskSizesAreSeqLengthPlusQueryAcrossFlushes) {
  testing::expect_quantized_mask_sizes_follow_the_tokens<cpu::Backend>();
}

TEST(QuantizedCache, CropBatchOpsResetClone) {
  const QuantizedCacheOptions o{.nbits = 8, .group_size = 8, .residual_length = 4};
  QuantizedCache<> cache(o);
  std::mt19937 rng(4);
  auto feed = [&](QuantizedCache<>& c, std::int64_t q) {
    const Tensor k = random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng);
    return c.update(k, k, 0);
  };
  feed(cache, 30);  // 24 quantized (3 blocks of 8), 6 in the residual
  ASSERT_EQ(cache.quantized_length(), 24);
  const std::size_t bytes = cache.nbytes();
  EXPECT_THROW(cache.crop(21), Error);  // inside a block
  EXPECT_EQ(cache.get_seq_length(), 30);
  EXPECT_EQ(cache.nbytes(), bytes);
  QuantizedCache<> copy = cache.clone();
  cache.crop(26);  // within the residual
  EXPECT_EQ(cache.get_seq_length(), 26);
  cache.crop(16);  // a block boundary
  EXPECT_EQ(cache.get_seq_length(), 16);
  EXPECT_EQ(cache.quantized_length(), 16);
  EXPECT_EQ(copy.get_seq_length(), 30);  // the clone is independent
  // reorder: the next step's rows come back swapped.
  QuantizedCache<> swapped = copy.clone();
  swapped.reorder_cache({1, 0});
  const Tensor k = random_tensor({kBatch, kHeads, 1, kDim}, DType::kFloat32, rng);
  const Tensor k_swapped = cpu::clone(k);
  cpu::copy(k_swapped.slice(0, 0, 1), k.slice(0, 1, 2));
  cpu::copy(k_swapped.slice(0, 1, 2), k.slice(0, 0, 1));
  const auto a = to_doubles(copy.update(k, k, 0).first);
  const auto b = to_doubles(swapped.update(k_swapped, k_swapped, 0).first);
  const std::size_t row = a.size() / 2;
  for (std::size_t i = 0; i < row; ++i) {
    ASSERT_EQ(a[i], b[i + row]);
    ASSERT_EQ(a[i + row], b[i]);
  }
  EXPECT_THROW(swapped.reorder_cache({0, 5}), Error);
  swapped.batch_select_indices({1});
  EXPECT_EQ(swapped.batch_size(), 1);
  swapped.batch_repeat_interleave(3);
  EXPECT_EQ(swapped.batch_size(), 3);
  swapped.reset();
  EXPECT_EQ(swapped.get_seq_length(), 0);
  EXPECT_EQ(copy.get_seq_length(), 31);
}

TEST(QuantizedCache, ErrorsLeaveTheCacheUnchanged) {
  EXPECT_THROW(QuantizedCache<>({.nbits = 3}), Error);
  EXPECT_THROW(QuantizedCache<>({.nbits = 16}), Error);
  EXPECT_THROW(QuantizedCache<>({.group_size = 0}), Error);
  EXPECT_THROW(QuantizedCache<>({.residual_length = -1}), Error);
  EXPECT_THROW(QuantizedCache<>({.scale_dtype = DType::kBFloat16}), Error);
  QuantizedCache<> cache({.nbits = 4, .group_size = 32, .residual_length = 2});
  std::mt19937 rng(6);
  const Tensor k = random_tensor({kBatch, kHeads, 40, kDim}, DType::kFloat32, rng);
  cache.update(k, k, 0);
  const std::size_t bytes = cache.nbytes();
  // head_dim 48 is not a multiple of the per-token group of 32 values.
  const Tensor odd = random_tensor({kBatch, kHeads, 1, 48}, DType::kFloat32, rng);
  EXPECT_THROW(cache.update(odd, odd, 1), Error);
  const Tensor wrong = random_tensor({3, kHeads, 1, kDim}, DType::kFloat32, rng);
  EXPECT_THROW(cache.update(wrong, wrong, 0), Error);
  EXPECT_THROW(cache.update(k, k, 3), Error);
  EXPECT_EQ(cache.num_layers(), 1);
  EXPECT_EQ(cache.get_seq_length(), 40);
  EXPECT_EQ(cache.nbytes(), bytes);
}

// Extreme arguments (issue #10): crop of any int64 (INT64_MIN is not negated) and repeat counts
// whose batch overflows int64 or cannot be allocated end in a kvcache::Error naming the call, and
// every layer's lengths, quantized blocks and residual are as they were (the next step returns
// what a clone taken before returns); crop(INT64_MAX) keeps everything.
// An empty cache holds 0 tokens: dropping any is an error, as in a DynamicCache (fuzz_cache found
// crop(INT64_MIN) of a SinkCache with no layer accepted; this cache had the same gap).
TEST(QuantizedCache, CropOfACacheWithNoLayerChecksItsArgument) {
  QuantizedCache<> cache({.nbits = 4, .group_size = 16, .residual_length = 8});
  EXPECT_KVCACHE_ERROR(
      cache.crop(std::numeric_limits<std::int64_t>::min()),
      "QuantizedCache::crop(-9223372036854775808): expected to drop at most 0 tokens");
  EXPECT_KVCACHE_ERROR(cache.crop(-1), "expected to drop at most 0 tokens");
  cache.crop(0);
  cache.crop(5);
  EXPECT_EQ(cache.num_layers(), 0);
}

// A negative crop drops from get_seq_length() (layer 0) and crops every layer to that one target,
// as DynamicCache and transformers do; it used to drop |n| from each layer's own length.
TEST(QuantizedCache, NegativeCropTakesOneTargetForEveryLayer) {
  QuantizedCache<> cache({.nbits = 4, .group_size = 16, .residual_length = 8});
  testing::expect_negative_crop_takes_one_target(cache, kBatch, kHeads, kDim);
}

// A group holding a NaN or an infinity quantizes without undefined behaviour (the sanitizer stage
// runs this under UBSan): a NaN code is 0, as the GPU's conversion makes it, and the finite groups
// are unaffected.
TEST(QuantizedCache, NonFiniteValuesQuantizeWithoutUndefinedBehaviour) {
  for (QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken}) {
    QuantizedCache<> cache({.nbits = 4, .group_size = 16, .key_axis = axis, .residual_length = 0});
    std::mt19937 rng(4);
    Tensor k = random_tensor({kBatch, kHeads, 16, kDim}, DType::kFloat32, rng);
    const Tensor v = random_tensor({kBatch, kHeads, 16, kDim}, DType::kFloat32, rng);
    float* kp = k.data_as<float>();
    kp[0] = std::numeric_limits<float>::quiet_NaN();
    kp[1] = std::numeric_limits<float>::infinity();
    kp[2] = -std::numeric_limits<float>::infinity();
    const auto [keys, values] = cache.update(k, v, 0);
    EXPECT_EQ(cache.get_seq_length(), 16);
    EXPECT_EQ(cache.quantized_length(), 16);
    // Batch row 1 holds only finite values: its keys are within the 4-bit error of the input.
    const float* out = keys.data_as<float>();
    const std::int64_t row = kHeads * 16 * kDim;
    double worst = 0.0;
    for (std::int64_t i = row; i < 2 * row; ++i)
      worst = std::max(worst, static_cast<double>(std::abs(out[i] - kp[i])));
    EXPECT_LT(worst, 0.2) << (axis == QuantAxis::kPerChannel ? "per-channel" : "per-token");
  }
}

TEST(QuantizedCache, ExtremeArgumentsAreErrorsAndLeaveTheCacheUnchanged) {
  constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  QuantizedCache<> cache({.nbits = 4, .group_size = 8, .residual_length = 4});
  std::mt19937 rng(8);
  for (int layer = 0; layer < 2; ++layer) {
    const Tensor k = random_tensor({kBatch, kHeads, 30, kDim}, DType::kFloat32, rng);
    const Tensor v = random_tensor({kBatch, kHeads, 30, kDim}, DType::kFloat32, rng);
    cache.update(k, v, layer);  // 24 quantized (3 blocks of 8), 6 in the residual
  }
  ASSERT_EQ(cache.quantized_length(1), 24);
  const QuantizedCache<> before = cache.clone();
  const std::size_t bytes = cache.nbytes();
  using Bytes = std::vector<unsigned char>;
  std::vector<Bytes> blocks;  // [layer][row]: keys then values
  for (int layer = 0; layer < 2; ++layer)
    for (std::int64_t row = 0; row < kBatch; ++row) {
      const auto [k, v] = cache.block_bytes(layer, row);
      blocks.emplace_back(k.begin(), k.end());
      blocks.emplace_back(v.begin(), v.end());
    }
  auto unchanged = [&] {
    EXPECT_EQ(cache.num_layers(), 2);
    EXPECT_EQ(cache.batch_size(), kBatch);
    EXPECT_EQ(cache.nbytes(), bytes);
    std::size_t i = 0;
    for (int layer = 0; layer < 2; ++layer) {
      EXPECT_EQ(cache.get_seq_length(layer), 30);
      EXPECT_EQ(cache.quantized_length(layer), 24);
      for (std::int64_t row = 0; row < kBatch; ++row) {
        const auto [k, v] = cache.block_bytes(layer, row);
        EXPECT_EQ(Bytes(k.begin(), k.end()), blocks[i++]);
        EXPECT_EQ(Bytes(v.begin(), v.end()), blocks[i++]);
      }
    }
  };
  EXPECT_KVCACHE_ERROR(cache.crop(kMin),
                       "QuantizedCache::crop(-9223372036854775808): expected to drop at most 30 "
                       "tokens (the cache length), got 9223372036854775808");
  unchanged();
  EXPECT_KVCACHE_ERROR(cache.crop(kMin + 1), "got 9223372036854775807");
  unchanged();
  EXPECT_KVCACHE_ERROR(cache.crop(-31), "expected to drop at most 30 tokens");
  unchanged();
  cache.crop(kMax);  // past the length: nothing to drop
  unchanged();
  cache.crop(30);
  unchanged();
  // 2 rows x 2^62 and x INT64_MAX overflow int64 (2^62 used to wrap to batch 0).
  EXPECT_KVCACHE_ERROR(cache.batch_repeat_interleave(std::int64_t{1} << 62),
                       "QuantizedCache::batch_repeat_interleave: the new batch of 2 x "
                       "4611686018427387904 does not fit in 64 bits");
  unchanged();
  EXPECT_KVCACHE_ERROR(cache.batch_repeat_interleave(kMax), "does not fit in 64 bits");
  unchanged();
  // 2^41 rows fit in int64 but not in memory: a kvcache::Error before anything is allocated.
  EXPECT_KVCACHE_ERROR(cache.batch_repeat_interleave(std::int64_t{1} << 40),
                       "QuantizedCache::batch_repeat_interleave: out of memory");
  unchanged();
  EXPECT_KVCACHE_ERROR(cache.batch_repeat_interleave(0), "expected repeats >= 1, got 0");
  EXPECT_KVCACHE_ERROR(cache.batch_repeat_interleave(kMin),
                       "expected repeats >= 1, got -9223372036854775808");
  unchanged();
  // The residual too: the next step of every layer returns exactly what the clone's does.
  QuantizedCache<> reference = before.clone();
  for (int layer = 0; layer < 2; ++layer) {
    const Tensor k = random_tensor({kBatch, kHeads, 1, kDim}, DType::kFloat32, rng);
    const auto [got_k, got_v] = cache.update(k, k, layer);
    const auto [want_k, want_v] = reference.update(k, k, layer);
    EXPECT_EQ(to_doubles(got_k), to_doubles(want_k)) << "layer " << layer;
    EXPECT_EQ(to_doubles(got_v), to_doubles(want_v)) << "layer " << layer;
  }
}

TEST(QuantizedCache, EightBitGreedyTokensMatchTheDynamicCacheOnAFixture) {
  const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/llama_gqa";
  const LlamaModel model = LlamaModel::from_pretrained(dir);
  const SafetensorsFile expected = SafetensorsFile::open(dir + "/expected.safetensors");
  const Tensor input_ids = cpu::clone(expected.tensor("input_ids"));
  const Tensor mask = cpu::clone(expected.tensor("attention_mask"));
  GenerationConfig config{.max_new_tokens = 16};
  config.pad_token_id = 0;
  const GenerateResult dynamic = generate(model, input_ids, mask, config);
  config.cache_implementation = "quantized";
  // Everything but the newest token quantized (group 8 of head_dim 16; per-channel key blocks of
  // 8 tokens), so the fixture's 25 tokens really go through the blocks.
  config.cache_config = {.nbits = 8, .q_group_size = 8, .residual_length = 0};
  const GenerateResult quant = generate(model, input_ids, mask, config);
  EXPECT_EQ(quant.new_tokens, dynamic.new_tokens);
  // Per-token keys run too (on this random-weight fixture the 2-token row meets a near-tie
  // after a few tokens, so only the first tokens are compared).
  config.cache_config.axis_key = "token";
  const GenerateResult per_token = generate(model, input_ids, mask, config);
  for (std::size_t r = 0; r < per_token.new_tokens.size(); ++r)
    EXPECT_EQ(per_token.new_tokens[r][0], dynamic.new_tokens[r][0]);
  config.cache_config.axis_key = "rows";
  EXPECT_THROW(generate(model, input_ids, mask, config), Error);
}

}  // namespace
}  // namespace kvcache

namespace kvcache {
namespace {

// The logits error of the quantized cache against the DynamicCache on transformers fixtures,
// teacher-forced along the DynamicCache's greedy tokens (printed; bounded loosely per nbits).
TEST(QuantizedCache, LogitsErrorOnFixtures) {
  for (const char* name : {"llama_gqa", "llama_mha", "llama_long"}) {
    const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/" + name;
    const LlamaModel model = LlamaModel::from_pretrained(dir);
    const SafetensorsFile expected = SafetensorsFile::open(dir + "/expected.safetensors");
    const Tensor input_ids = cpu::clone(expected.tensor("input_ids"));
    const Tensor mask0 = cpu::clone(expected.tensor("attention_mask"));
    GenerationConfig config{.max_new_tokens = 16};
    config.pad_token_id = 0;
    const GenerateResult dynamic = generate(model, input_ids, mask0, config);
    const std::int64_t hd = model.config().head_dim;
    for (int nbits : {8, 4, 2}) {
      DynamicCache<> exact;
      QuantizedCache<> quant(
          {.nbits = nbits, .group_size = std::min<std::int64_t>(hd, 8), .residual_length = 0});
      Tensor mask = mask0, step = input_ids;
      std::vector<std::int64_t> pos = make_cache_position(0, input_ids.size(1));
      double worst = 0;
      for (std::size_t i = 0; i < 16; ++i) {
        const Tensor a = model.forward({.input_ids = step,
                                        .attention_mask = mask,
                                        .cache_position = pos,
                                        .past_key_values = &exact,
                                        .logits_to_keep = 1});
        const Tensor b = model.forward({.input_ids = step,
                                        .attention_mask = mask,
                                        .cache_position = pos,
                                        .past_key_values = &quant,
                                        .logits_to_keep = 1});
        const auto x = to_doubles(a), y = to_doubles(b);
        for (std::size_t j = 0; j < x.size(); ++j) worst = std::max(worst, std::abs(x[j] - y[j]));
        std::vector<std::int64_t> next;
        for (const auto& row : dynamic.new_tokens) next.push_back(row[i]);
        step = token_column(next);
        mask = extend_attention_mask(mask);
        pos = {pos.back() + 1};
      }
      std::printf("%s, %d bits (group %lld, residual 0): max logits error %.4g\n", name, nbits,
                  static_cast<long long>(std::min<std::int64_t>(hd, 8)), worst);
      EXPECT_LT(worst, nbits == 8 ? 1.0 : nbits == 4 ? 8.0 : 30.0);
    }
  }
}

}  // namespace
}  // namespace kvcache
