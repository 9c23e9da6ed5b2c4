// Attention that reads a QuantizedCache's blocks directly (cpu::attention_quantized, through
// Attention::forward and Cache::update_for_attention) against dequantize-then-attend: a float64
// reference over the dequantized blocks and the residual, and, for float32 states, the existing
// cpu::attention over update()'s dequantized tensors. Every nbits x key axis x group size, GQA,
// a batch with left padding, decode and multi-token steps (both kernel paths), a sliding window,
// head_dim off the vector width, float32 scales, float32 and bfloat16 states; the cache's own
// update is O(new tokens): the step's blocks are the blocks it held, bytes unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kvcache/attention/attention.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;
using testing::to_doubles;

constexpr std::int64_t kBatch = 2, kKvHeads = 2;
constexpr std::int64_t kPad = 5;  // row 1's left padding

struct Case {
  int nbits;
  QuantAxis axis;
  std::int64_t group;
  std::int64_t head_dim = 64;
  std::int64_t num_heads = 4;
  DType dtype = DType::kFloat32;
  DType scale_dtype = DType::kFloat16;
  std::optional<std::int64_t> window;
};

// The mask [batch, columns] int64: row 1 left-padded by kPad.
Tensor padded_mask(std::int64_t columns) {
  Tensor m = Tensor::empty({kBatch, columns}, DType::kInt64);
  for (std::int64_t b = 0; b < kBatch; ++b)
    for (std::int64_t j = 0; j < columns; ++j)
      m.data_as<std::int64_t>()[b * columns + j] = (b == 1 && j < kPad) ? 0 : 1;
  return m;
}

// softmax(q·kᵀ·scale + mask)·v in float64: keys / values [batch, kv_heads, kv_len, d] as doubles.
std::vector<double> reference(const std::vector<double>& q, const std::vector<double>& k,
                              const std::vector<double>& v, std::int64_t heads, std::int64_t q_len,
                              std::int64_t kv_len, std::int64_t d,
                              const std::vector<std::int64_t>& pos, const Tensor& mask,
                              std::optional<std::int64_t> window, double scale) {
  std::vector<double> out(static_cast<std::size_t>(kBatch * q_len * heads * d), 0.0);
  const std::int64_t rep = heads / kKvHeads;
  for (std::int64_t b = 0; b < kBatch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < q_len; ++i) {
        const std::int64_t kvh = h / rep;
        std::vector<double> s(static_cast<std::size_t>(kv_len), -INFINITY);
        double mx = -INFINITY;
        for (std::int64_t j = 0; j < kv_len; ++j) {
          const std::int64_t p = pos[static_cast<std::size_t>(i)];
          if (j > p || mask.data_as<std::int64_t>()[b * kv_len + j] == 0) continue;
          if (window && j <= p - *window) continue;
          double dot = 0;
          for (std::int64_t c = 0; c < d; ++c)
            dot += q[static_cast<std::size_t>(((b * heads + h) * q_len + i) * d + c)] *
                   k[static_cast<std::size_t>(((b * kKvHeads + kvh) * kv_len + j) * d + c)];
          s[static_cast<std::size_t>(j)] = dot * scale;
          mx = std::max(mx, dot * scale);
        }
        if (mx == -INFINITY) continue;  // sees nothing: zeros
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (std::int64_t j = 0; j < kv_len; ++j)
          for (std::int64_t c = 0; c < d; ++c)
            out[static_cast<std::size_t>(((b * q_len + i) * heads + h) * d + c)] +=
                s[static_cast<std::size_t>(j)] / sum *
                v[static_cast<std::size_t>(((b * kKvHeads + kvh) * kv_len + j) * d + c)];
      }
  return out;
}

// Runs the step pattern through a cache read directly by the attention module and a twin read
// through update_for_attention + dequantize; returns the worst error against the float64
// reference (and, float32, against cpu::attention over update()'s tensors, into *vs_existing).
double run_case(const Case& c, double* vs_existing) {
  const QuantizedCacheOptions o{.nbits = c.nbits,
                                .group_size = c.group,
                                .key_axis = c.axis,
                                .residual_length = 16,
                                .scale_dtype = c.scale_dtype};
  QuantizedCache<> direct(o), twin(o), plain(o);
  const Attention attn(0, {.num_heads = c.num_heads,
                           .num_kv_heads = kKvHeads,
                           .head_dim = c.head_dim,
                           .sliding_window = c.window});
  std::mt19937 rng(static_cast<unsigned>(c.nbits * 1000 + c.group * 10 + c.head_dim));
  const std::int64_t d = c.head_dim;
  double worst = 0;
  *vs_existing = 0;
  std::int64_t seen = 0;
  for (std::int64_t q : {37, 1, 1, 3, 1, 20, 1, 1, 5, 1, 64, 1, 2, 1, 40, 1, 3}) {
    const Tensor query = random_tensor({kBatch, c.num_heads, q, d}, c.dtype, rng);
    const Tensor k = random_tensor({kBatch, kKvHeads, q, d}, c.dtype, rng);
    const Tensor v = random_tensor({kBatch, kKvHeads, q, d}, c.dtype, rng);
    const std::vector<std::int64_t> pos = make_cache_position(seen, q);
    const Tensor mask = padded_mask(seen + q);
    const std::int64_t blocks_before = direct.quantized_length();
    const auto bytes_before =
        blocks_before > 0 ? std::vector<unsigned char>(direct.block_bytes(0, 0).first.begin(),
                                                       direct.block_bytes(0, 0).first.end())
                          : std::vector<unsigned char>();
    const Tensor got = attn.forward(query, k, v, direct, mask, pos);
    // Blocks are only ever appended: the bytes held before the step are unchanged.
    if (blocks_before > 0) {
      const auto now = direct.block_bytes(0, 0).first;
      EXPECT_GE(now.size(), bytes_before.size());
      EXPECT_TRUE(now.size() >= bytes_before.size() &&
                  std::equal(bytes_before.begin(), bytes_before.end(), now.begin()));
    }

    // The twin: the same step's view, dequantized in float32, then the residual.
    const AttentionKV kv = twin.update_for_attention(k, v, 0);
    EXPECT_TRUE(kv.quantized.has_value());
    const std::int64_t tokens = kv.quantized->tokens, kv_len = tokens + kv.keys.size(2);
    EXPECT_EQ(kv_len, seen + q);
    const Tensor dk = Tensor::zeros({kBatch, kKvHeads, kv_len, d}, DType::kFloat32);
    const Tensor dv = Tensor::zeros({kBatch, kKvHeads, kv_len, d}, DType::kFloat32);
    QuantizedCache<>::dequantize(*kv.quantized, dk, dv);
    const Tensor rk = cpu::cast(kv.keys, DType::kFloat32);
    const Tensor rv = cpu::cast(kv.values, DType::kFloat32);
    cpu::copy(dk.slice(2, tokens, kv_len), rk);
    cpu::copy(dv.slice(2, tokens, kv_len), rv);
    const auto want = reference(to_doubles(query), to_doubles(dk), to_doubles(dv), c.num_heads, q,
                                kv_len, d, pos, mask, c.window, attn.scale());
    const auto have = to_doubles(got);
    const double rel = c.dtype == DType::kFloat32 ? 0.0 : 0x1p-8;  // the output's rounding
    for (std::size_t i = 0; i < have.size(); ++i) {
      const double err = std::abs(have[i] - want[i]);
      EXPECT_LE(err, 2e-5 + rel * std::abs(want[i])) << "element " << i << " step q " << q;
      worst = std::max(worst, err - rel * std::abs(want[i]));
    }

    if (c.dtype == DType::kFloat32) {  // the existing path over update()'s dequantized tensors
      const auto [pk, pv] = plain.update(k, v, 0);
      const Tensor out = Tensor::empty({kBatch, q, c.num_heads, d}, DType::kFloat32);
      cpu::attention(query, pk, pv, mask, pos, 0, attn.scale(), out, c.window);
      const auto old = to_doubles(out);
      for (std::size_t i = 0; i < have.size(); ++i)
        *vs_existing = std::max(*vs_existing, std::abs(have[i] - old[i]));
    }
    seen += q;
  }
  EXPECT_GT(direct.quantized_length(), 0);
  return worst;
}

TEST(QuantizedAttention, EqualsDequantizeThenAttend) {
  for (int nbits : {8, 4, 2})
    for (QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken})
      for (std::int64_t group : {16, 32, 64, 128}) {
        const Case c{nbits, axis, group};
        double existing = 0;
        const double worst = run_case(c, &existing);
        std::printf(
            "%d bits %s group %3lld: max abs error vs float64 %.3g, vs existing path %.3g\n", nbits,
            axis == QuantAxis::kPerChannel ? "per-channel" : "per-token  ",
            static_cast<long long>(group), worst, existing);
        EXPECT_LT(existing, 2e-5);
      }
}

TEST(QuantizedAttention, ShapesDtypesAndWindows) {
  const Case cases[] = {
      // n_rep 8: decode steps of one token take the streaming path, longer ones the GEMM one.
      {4, QuantAxis::kPerChannel, 32, 64, 16},
      // head_dim and groups off the 16-lane vector width: the scalar code paths.
      {4, QuantAxis::kPerToken, 8, 24, 4},
      {2, QuantAxis::kPerChannel, 8, 24, 2},
      {8, QuantAxis::kPerChannel, 8, 40, 4},
      // float32 scales; bfloat16 states (bfloat16 residual); a sliding window.
      {4, QuantAxis::kPerChannel, 32, 64, 4, DType::kFloat32, DType::kFloat32},
      {4, QuantAxis::kPerChannel, 32, 64, 4, DType::kBFloat16},
      {2, QuantAxis::kPerToken, 64, 64, 4, DType::kBFloat16},
      {8, QuantAxis::kPerChannel, 64, 64, 4, DType::kFloat32, DType::kFloat16, 24},
  };
  for (const Case& c : cases) {
    double existing = 0;
    const double worst = run_case(c, &existing);
    std::printf(
        "%d bits group %lld head_dim %lld heads %lld %s%s: vs float64 %.3g, existing %.3g\n",
        c.nbits, static_cast<long long>(c.group), static_cast<long long>(c.head_dim),
        static_cast<long long>(c.num_heads), std::string(dtype_name(c.dtype)).c_str(),
        c.window ? " windowed" : "", worst, existing);
    if (c.dtype == DType::kFloat32) {
      EXPECT_LT(existing, 2e-5);
    }
  }
}

TEST(QuantizedAttention, ResidualKeepsTheStatesDtype) {
  QuantizedCache<> cache({.nbits = 4, .group_size = 32, .residual_length = 8});
  std::mt19937 rng(3);
  const Tensor k = random_tensor({1, 2, 50, 32}, DType::kBFloat16, rng);
  const Tensor v = random_tensor({1, 2, 50, 32}, DType::kBFloat16, rng);
  const AttentionKV kv = cache.update_for_attention(k, v, 0);
  EXPECT_EQ(kv.keys.dtype(), DType::kBFloat16);
  EXPECT_EQ(kv.keys.size(2), 50);  // the prefill attends over its own tokens exactly
  EXPECT_EQ(cache.quantized_length(), 32);
  // 18 residual tokens x 2 heads x 32 channels x 2 bytes, keys and values, beside the blocks.
  const auto [kb, vb] = cache.block_bytes(0, 0);
  EXPECT_EQ(cache.nbytes(), kb.size() + vb.size() + 2 * 18 * 2 * 32 * 2);
}

TEST(QuantizedAttention, RejectsInconsistentViews) {
  std::mt19937 rng(5);
  const Tensor query = random_tensor({1, 2, 1, 32}, DType::kFloat32, rng);
  const Tensor k = random_tensor({1, 2, 1, 32}, DType::kFloat32, rng);
  const Tensor out = Tensor::empty({1, 1, 2, 32}, DType::kFloat32);
  QuantizedKVView view;
  view.batch = 1;
  view.heads = 2;
  view.head_dim = 32;
  view.nbits = 3;
  view.keys = view.values = {nullptr};
  const std::int64_t pos[] = {0};
  EXPECT_THROW(cpu::attention_quantized(query, view, k, k, {}, pos, 0, 1.0f, out), Error);
  view.nbits = 4;
  view.heads = 1;
  EXPECT_THROW(cpu::attention_quantized(query, view, k, k, {}, pos, 0, 1.0f, out), Error);
  view.heads = 2;
  view.chunk = 32;
  view.tokens = 5;  // not whole blocks
  EXPECT_THROW(cpu::attention_quantized(query, view, k, k, {}, pos, 0, 1.0f, out), Error);
}

}  // namespace
}  // namespace kvcache
