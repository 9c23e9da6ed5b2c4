// QuantizedCache<cuda::Backend> against QuantizedCache<cpu::Backend> fed the same states: after
// every step the same lengths and the same block bytes, bit for bit (8, 4 and 2 bits, keys per
// channel and per token, float16 and float32 scales, float32 / bfloat16 / float16 states, states
// of several ranges and signs, constant groups), the same residual views; update() dequantizes as
// the CPU does up to an FMA's rounding. cuda::attention_quantized gives cpu::attention_quantized's
// output (GQA, decode and prefill steps, padding, a sliding window over the block / residual
// boundary, a row that sees no key) and, with no quantized tokens, cuda::attention's.
// get_mask_sizes follows the tokens held across residual flushes, as on the CPU. Crop, beam
// reorder, batch operations, reset and clone keep the two caches equal; errors leave the GPU cache
// as it was; a GPU model over a GPU quantized cache gives the CPU model's logits, and generate()
// with cache_implementation "quantized" follows a hand-written loop. Skips where no GPU is
// present (CI).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cache/quantized_mask_sizes.hpp"
#include "cuda_test_util.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;
using testing::to_doubles;

class QuantizedCacheCuda : public testing::CudaTest {};

using GpuCache = QuantizedCache<cuda::Backend>;
using CpuCache = QuantizedCache<cpu::Backend>;

constexpr int kLayers = 2;
constexpr std::int64_t kBatch = 2, kKvHeads = 2, kDim = 32;

std::string describe(const QuantizedCacheOptions& o, DType dtype) {
  return std::to_string(o.nbits) + " bits, keys per " +
         (o.key_axis == QuantAxis::kPerChannel ? "channel" : "token") + ", group " +
         std::to_string(o.group_size) + ", residual " + std::to_string(o.residual_length) + ", " +
         std::string(dtype_name(o.scale_dtype)) + " scales, " + std::string(dtype_name(dtype)) +
         " states";
}

// States [batch, kKvHeads, q, d] of one of six kinds, so groups of every sort reach the
// quantizer: a wide range, negative only (min rounded outward below a negative value), a tiny
// range (float16 scales in the subnormals), constant (scale 0), values on a coarse grid (codes
// exactly on their steps) and positive only with an offset.
Tensor make_states(std::int64_t batch, std::int64_t q, std::int64_t d, DType dtype,
                   std::mt19937& rng, int kind, std::int64_t heads = kKvHeads) {
  Tensor f = random_tensor({batch, heads, q, d}, DType::kFloat32, rng);
  float* p = f.data_as<float>();
  for (std::int64_t i = 0; i < f.numel(); ++i) {
    switch (kind % 6) {
      case 0:
        p[i] *= 4.0f;
        break;
      case 1:
        p[i] = p[i] * 0.25f - 1.5f;
        break;
      case 2:
        p[i] *= 1e-3f;
        break;
      case 3:
        p[i] = -0.75f;
        break;
      case 4:
        p[i] = std::round(p[i] * 8.0f) / 8.0f;
        break;
      default:
        p[i] = p[i] * 0.5f + 3.0f;
        break;
    }
  }
  return dtype == DType::kFloat32 ? f : cpu::cast(f, dtype);
}

// Empty when the two byte strings are equal; else where they first differ and how many differ.
template <class A, class C>
std::string byte_difference(const A& gpu, const C& cpu) {
  if (gpu.size() != cpu.size()) {
    return "sizes differ: gpu " + std::to_string(gpu.size()) + ", cpu " +
           std::to_string(cpu.size());
  }
  std::size_t first = gpu.size(), count = 0;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    if (gpu[i] != cpu[i]) {
      if (count++ == 0) first = i;
    }
  }
  if (count == 0) return {};
  return std::to_string(count) + " of " + std::to_string(gpu.size()) +
         " bytes differ, the first at " + std::to_string(first) + " (gpu " +
         std::to_string(static_cast<unsigned>(gpu[first])) + ", cpu " +
         std::to_string(static_cast<unsigned>(cpu[first])) + ")";
}

// Empty when both caches hold the same layers, lengths, bytes held and block bytes; else the
// first difference.
std::string difference(const GpuCache& gpu, const CpuCache& cpu) {
  if (gpu.num_layers() != cpu.num_layers()) {
    return "num_layers: gpu " + std::to_string(gpu.num_layers()) + ", cpu " +
           std::to_string(cpu.num_layers());
  }
  if (gpu.batch_size() != cpu.batch_size()) {
    return "batch_size: gpu " + std::to_string(gpu.batch_size()) + ", cpu " +
           std::to_string(cpu.batch_size());
  }
  if (gpu.nbytes() != cpu.nbytes()) {
    return "nbytes: gpu " + std::to_string(gpu.nbytes()) + ", cpu " + std::to_string(cpu.nbytes());
  }
  for (int l = 0; l < cpu.num_layers(); ++l) {
    const std::string at = "layer " + std::to_string(l);
    if (gpu.get_seq_length(l) != cpu.get_seq_length(l)) {
      return at + " get_seq_length: gpu " + std::to_string(gpu.get_seq_length(l)) + ", cpu " +
             std::to_string(cpu.get_seq_length(l));
    }
    if (gpu.quantized_length(l) != cpu.quantized_length(l)) {
      return at + " quantized_length: gpu " + std::to_string(gpu.quantized_length(l)) + ", cpu " +
             std::to_string(cpu.quantized_length(l));
    }
    if (cpu.get_seq_length(l) == 0) continue;  // an emptied layer: nothing held
    for (std::int64_t b = 0; b < cpu.batch_size(); ++b) {
      const auto [gk, gv] = gpu.block_bytes(l, b);
      const auto [ck, cv] = cpu.block_bytes(l, b);
      std::string d = byte_difference(gk, ck);
      if (!d.empty()) return at + ", row " + std::to_string(b) + ", key blocks: " + d;
      d = byte_difference(gv, cv);
      if (!d.empty()) return at + ", row " + std::to_string(b) + ", value blocks: " + d;
    }
  }
  return {};
}

// Empty when two views of the blocks describe the same layout and tokens, and the GPU one keeps
// its rows at a fixed stride in one buffer.
std::string view_difference(const QuantizedKVView& g, const QuantizedKVView& c) {
  if (g.nbits != c.nbits || g.scale_dtype != c.scale_dtype ||
      g.keys_per_channel != c.keys_per_channel || g.batch != c.batch || g.heads != c.heads ||
      g.head_dim != c.head_dim || g.chunk != c.chunk || g.token_group != c.token_group ||
      g.token_record != c.token_record || g.key_head_bytes != c.key_head_bytes ||
      g.value_head_bytes != c.value_head_bytes) {
    return "the views' geometry differs";
  }
  if (g.tokens != c.tokens) {
    return "view tokens: gpu " + std::to_string(g.tokens) + ", cpu " + std::to_string(c.tokens);
  }
  if (static_cast<std::int64_t>(g.keys.size()) != g.batch ||
      static_cast<std::int64_t>(g.values.size()) != g.batch) {
    return "the GPU view has the wrong number of row pointers";
  }
  if (g.tokens > 0) {
    const auto used_k = static_cast<std::int64_t>(g.tokens / g.chunk * g.heads) *
                        static_cast<std::int64_t>(g.key_head_bytes);
    const auto used_v = static_cast<std::int64_t>(g.tokens / g.chunk * g.heads) *
                        static_cast<std::int64_t>(g.value_head_bytes);
    if (g.key_row_stride < used_k || g.value_row_stride < used_v) {
      return "the GPU view's row strides are shorter than the blocks in use";
    }
    for (std::int64_t b = 0; b < g.batch; ++b) {
      const auto i = static_cast<std::size_t>(b);
      if (g.keys[i] != g.keys[0] + b * g.key_row_stride ||
          g.values[i] != g.values[0] + b * g.value_row_stride) {
        return "the GPU view's row " + std::to_string(b) + " is not at the row stride";
      }
    }
  }
  return {};
}

// One update_for_attention step of both caches on the same states (CPU tensors; the GPU cache
// gets device copies). Empty when the returned views agree exactly: the blocks' view, the
// residual keys and values (whose last q tokens are the states given).
std::string step_difference(GpuCache& gpu, CpuCache& cpu, int layer, const Tensor& k,
                            const Tensor& v) {
  const AttentionKV c = cpu.update_for_attention(k, v, layer);
  const AttentionKV g = gpu.update_for_attention(cuda::to_device(k), cuda::to_device(v), layer);
  if (!c.quantized || !g.quantized) return "update_for_attention gave no quantized view";
  std::string d = view_difference(*g.quantized, *c.quantized);
  if (!d.empty()) return d;
  if (g.keys.device() != Device::kCuda || g.values.device() != Device::kCuda) {
    return "the GPU residual is not on the GPU";
  }
  if (g.keys.shape_string() != c.keys.shape_string() ||
      g.values.shape_string() != c.values.shape_string()) {
    return "residual shapes: gpu " + g.keys.shape_string() + ", cpu " + c.keys.shape_string();
  }
  if (g.keys.dtype() != k.dtype() || g.values.dtype() != k.dtype()) {
    return "the GPU residual is not in the states' dtype";
  }
  const Tensor hk = cuda::to_host(g.keys), hv = cuda::to_host(g.values);
  if (to_doubles(hk) != to_doubles(c.keys)) return "residual keys differ";
  if (to_doubles(hv) != to_doubles(c.values)) return "residual values differ";
  const std::int64_t res = hk.size(2), q = k.size(2);
  if (to_doubles(hk.slice(2, res - q, res)) != to_doubles(k)) {
    return "the residual's last keys are not the new states";
  }
  if (to_doubles(hv.slice(2, res - q, res)) != to_doubles(v)) {
    return "the residual's last values are not the new states";
  }
  if (c.quantized->tokens + res != cpu.get_seq_length(layer)) {
    return "the view does not cover every token";
  }
  return {};
}

// One update() (the dequantizing API) of both caches on the same states. Empty when the outputs
// agree: tokens held in blocks before the step within an FMA's rounding of code · scale + min
// (and, for 16-bit outputs, one rounding step of the dtype), the rest exactly.
std::string update_difference(GpuCache& gpu, CpuCache& cpu, int layer, const Tensor& k,
                              const Tensor& v) {
  const std::int64_t blocks_before = cpu.quantized_length(layer);
  if (gpu.quantized_length(layer) != blocks_before) return "quantized lengths differ";
  const auto [ck, cv] = cpu.update(k, v, layer);
  const auto [gk, gv] = gpu.update(cuda::to_device(k), cuda::to_device(v), layer);
  if (gk.device() != Device::kCuda || gv.device() != Device::kCuda) {
    return "update() did not return device tensors";
  }
  if (gk.shape_string() != ck.shape_string() || gv.shape_string() != cv.shape_string()) {
    return "update() shapes: gpu " + gk.shape_string() + ", cpu " + ck.shape_string();
  }
  if (gk.dtype() != k.dtype() || gv.dtype() != k.dtype()) return "update() dtype";
  const DType dt = k.dtype();
  const double rel = dt == DType::kBFloat16 ? 0x1p-7 : dt == DType::kFloat16 ? 0x1p-10 : 0.0;
  const double abs16 = dt == DType::kFloat16 ? 6e-8 : 0.0;  // float16's subnormal step
  const std::int64_t seen = ck.size(2), d = ck.size(3);
  for (int which = 0; which < 2; ++which) {
    const std::vector<double> got = to_doubles(cuda::to_host(which == 0 ? gk : gv));
    const std::vector<double> want = to_doubles(which == 0 ? ck : cv);
    double m = 0;
    for (double x : want) m = std::max(m, std::abs(x));
    for (std::size_t i = 0; i < want.size(); ++i) {
      const std::int64_t t = static_cast<std::int64_t>(i) / d % seen;
      const double diff = std::abs(got[i] - want[i]);
      const double tol =
          t < blocks_before ? 1e-6 * m + rel * std::max(std::abs(got[i]), std::abs(want[i])) + abs16
                            : 0.0;
      if (!(diff <= tol)) {  // NaN fails too
        return std::string(which == 0 ? "keys" : "values") + " element " + std::to_string(i) +
               " (token " + std::to_string(t) + ", " + std::to_string(blocks_before) +
               " in blocks): gpu " + std::to_string(got[i]) + ", cpu " + std::to_string(want[i]);
      }
    }
  }
  return {};
}

TEST_F(QuantizedCacheCuda, EveryStepMatchesTheCpuBitForBit) {
  // A prefill past the residual, 30 decode steps (per-channel blocks flushed every 8), a 5-token
  // step, a 13-token one that flushes in the middle, a 40-token one that flushes several blocks.
  std::vector<std::int64_t> steps = {21};
  for (int i = 0; i < 30; ++i) steps.push_back(1);
  for (std::int64_t q : {5, 1, 1, 13, 2, 1, 1, 40, 1, 3}) steps.push_back(q);
  for (const int nbits : {2, 4, 8})
    for (const QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken})
      for (const DType scale : {DType::kFloat16, DType::kFloat32})
        for (const DType dtype : testing::kFloatTypes) {
          // Per-channel keys: blocks of 8 tokens, values in groups of 8 channels; per-token keys:
          // groups of 16 channels (two per token of head_dim 32).
          const QuantizedCacheOptions o{.nbits = nbits,
                                        .group_size = axis == QuantAxis::kPerChannel ? 8 : 16,
                                        .key_axis = axis,
                                        .residual_length = 12,
                                        .scale_dtype = scale};
          const std::string what = describe(o, dtype);
          std::mt19937 rng(static_cast<unsigned>(1000 * nbits + 10 * static_cast<int>(axis) +
                                                 static_cast<int>(dtype)));
          CpuCache cpu(o), cpu_update(o);
          GpuCache gpu(o), gpu_update(o);
          std::int64_t seen = 0;
          int flushes = 0;
          bool ok = true;
          for (std::size_t s = 0; s < steps.size() && ok; ++s) {
            const std::string at = what + ", step " + std::to_string(s) + " (q_len " +
                                   std::to_string(steps[s]) + ", " + std::to_string(seen) +
                                   " seen)";
            const std::int64_t quantized_before = cpu.quantized_length(0);
            for (int layer = 0; layer < kLayers && ok; ++layer) {
              const int kind = static_cast<int>(s) + 2 * layer;
              const Tensor k = make_states(kBatch, steps[s], kDim, dtype, rng, kind);
              const Tensor v = make_states(kBatch, steps[s], kDim, dtype, rng, kind + 1);
              const std::string d = step_difference(gpu, cpu, layer, k, v);
              EXPECT_EQ(d, "") << at << ", layer " << layer;
              const std::string u = update_difference(gpu_update, cpu_update, layer, k, v);
              EXPECT_EQ(u, "") << at << ", layer " << layer << ", update()";
              ok = d.empty() && u.empty();
            }
            if (!ok) break;
            seen += steps[s];
            const std::string d = difference(gpu, cpu);
            EXPECT_EQ(d, "") << at << ", after the step";
            const std::string u = difference(gpu_update, cpu_update);
            EXPECT_EQ(u, "") << at << ", after the step, the update() pair";
            ok = d.empty() && u.empty();
            EXPECT_EQ(gpu.get_seq_length(0), seen) << at;
            if (cpu.quantized_length(0) > quantized_before) ++flushes;
          }
          if (!ok) continue;
          EXPECT_GE(flushes, 5) << what << ": the steps should flush blocks again and again";
          EXPECT_GE(gpu.get_seq_length(0) - gpu.quantized_length(0), o.residual_length) << what;
        }

  // Model-sized layers (head_dim 64 and 128, 8 kv heads, groups of 32 to 128, the default
  // residual of 128) over a few hundred tokens: blocks of every record size, long rows.
  struct Big {
    QuantizedCacheOptions o;
    std::int64_t heads, head_dim;
    DType dtype;
  };
  const Big bigs[] = {
      {{.nbits = 4, .group_size = 64}, 8, 128, DType::kBFloat16},
      {{.nbits = 4, .group_size = 128, .residual_length = 32}, 8, 128, DType::kFloat16},
      {{.nbits = 2, .group_size = 32, .key_axis = QuantAxis::kPerToken, .residual_length = 16},
       8,
       64,
       DType::kFloat16},
      {{.nbits = 8, .group_size = 32, .residual_length = 40, .scale_dtype = DType::kFloat32},
       4,
       64,
       DType::kFloat32},
  };
  for (const Big& big : bigs) {
    const std::string what = describe(big.o, big.dtype) + ", head_dim " +
                             std::to_string(big.head_dim) + ", " + std::to_string(big.heads) +
                             " kv heads";
    std::mt19937 rng(static_cast<unsigned>(big.head_dim + big.o.group_size));
    CpuCache cpu(big.o);
    GpuCache gpu(big.o);
    std::vector<std::int64_t> big_steps = {200};
    for (int i = 0; i < 40; ++i) big_steps.push_back(1);
    big_steps.push_back(130);
    big_steps.push_back(1);
    bool ok = true;
    for (std::size_t s = 0; s < big_steps.size() && ok; ++s) {
      for (int layer = 0; layer < kLayers && ok; ++layer) {
        const int kind = static_cast<int>(s) + layer;
        const Tensor k =
            make_states(kBatch, big_steps[s], big.head_dim, big.dtype, rng, kind, big.heads);
        const Tensor v =
            make_states(kBatch, big_steps[s], big.head_dim, big.dtype, rng, kind + 3, big.heads);
        const std::string d = step_difference(gpu, cpu, layer, k, v);
        EXPECT_EQ(d, "") << what << ", step " << s << ", layer " << layer;
        ok = d.empty();
      }
      if (!ok) break;
      const std::string d = difference(gpu, cpu);
      EXPECT_EQ(d, "") << what << ", after step " << s;
      ok = d.empty();
    }
    EXPECT_GE(gpu.quantized_length(0), 128) << what;
  }
}

// Mask bytes [batch, kv_len] for the attention test: row 0 has holes inside the blocks and the
// residual, row 1 is left-padded, row 2 hides every key up to the step's first position, so its
// first query sees no key at all.
std::vector<std::uint8_t> attention_mask_bytes(std::int64_t batch, std::int64_t kv_len,
                                               std::int64_t first_position) {
  std::vector<std::uint8_t> m(static_cast<std::size_t>(batch * kv_len), 1);
  for (std::int64_t j = 0; j < kv_len; ++j) {
    const auto at = [&](std::int64_t b) { return static_cast<std::size_t>(b * kv_len + j); };
    if (j == 2 || j == 9 || j == 25 || j == 30 || j == 36) m[at(0)] = 0;
    if (j < 5) m[at(1)] = 0;
    if (j <= first_position) m[at(2)] = 0;
  }
  return m;
}

TEST_F(QuantizedCacheCuda, AttentionMatchesTheCpu) {
  constexpr std::int64_t kAttnBatch = 3, kHeads = 4;  // GQA: 2 query heads per kv head
  const QuantizedCacheOptions configs[] = {
      {.nbits = 4, .group_size = 8, .key_axis = QuantAxis::kPerChannel, .residual_length = 8},
      {.nbits = 2,
       .group_size = 16,
       .key_axis = QuantAxis::kPerToken,
       .residual_length = 8,
       .scale_dtype = DType::kFloat32},
      {.nbits = 8, .group_size = 16, .key_axis = QuantAxis::kPerChannel, .residual_length = 8},
      // Groups of 4 channels: no run of 8 channels shares one meta, so the kernel reads this layer
      // element by element (QuantBlocksView::vec false); the three above take the word loads.
      {.nbits = 4, .group_size = 4, .key_axis = QuantAxis::kPerChannel, .residual_length = 8},
  };
  int cases = 0;
  // head_dim 32 runs in the generic kernel; 64 and 128 in the quantized decode kernel for q_len 1
  // and 3 where the blocks allow word loads (q_len 20: the generic kernel). At 128 the history is
  // long enough for the decode to split over the keys and merge.
  for (const std::int64_t dim : {kDim, std::int64_t{64}, std::int64_t{128}})
    for (const QuantizedCacheOptions& o : configs)
      for (const DType dtype : testing::kFloatTypes)
        for (const std::int64_t q_len : {std::int64_t{1}, std::int64_t{3}, std::int64_t{20}})
          for (const bool padded : {false, true})
            for (const std::optional<std::int64_t> window :
                 {std::optional<std::int64_t>{}, std::optional<std::int64_t>{30}}) {
              const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
              const std::string what = describe(o, dtype) + ", head_dim " + std::to_string(dim) +
                                       ", q_len " + std::to_string(q_len) +
                                       (padded ? ", padded" : "") +
                                       (window ? ", window " + std::to_string(*window) : "");
              std::mt19937 rng(static_cast<unsigned>(100 * o.nbits + q_len));
              CpuCache cpu(o);
              GpuCache gpu(o), twin(o);  // twin: the same steps through update()
              // 37 (600 at head_dim 128) + 1 + 1 tokens held: blocks and a residual.
              std::int64_t seen = 0;
              for (const std::int64_t q : {dim == 128 ? std::int64_t{600} : std::int64_t{37},
                                           std::int64_t{1}, std::int64_t{1}}) {
                const Tensor k = random_tensor({kAttnBatch, kKvHeads, q, dim}, dtype, rng);
                const Tensor v = random_tensor({kAttnBatch, kKvHeads, q, dim}, dtype, rng);
                cpu.update_for_attention(k, v, 0);
                gpu.update_for_attention(cuda::to_device(k), cuda::to_device(v), 0);
                twin.update(cuda::to_device(k), cuda::to_device(v), 0);
                seen += q;
              }
              const Tensor k = random_tensor({kAttnBatch, kKvHeads, q_len, dim}, dtype, rng);
              const Tensor v = random_tensor({kAttnBatch, kKvHeads, q_len, dim}, dtype, rng);
              const Tensor query = random_tensor({kAttnBatch, kHeads, q_len, dim}, dtype, rng);
              const AttentionKV c = cpu.update_for_attention(k, v, 0);
              const AttentionKV g =
                  gpu.update_for_attention(cuda::to_device(k), cuda::to_device(v), 0);
              ASSERT_TRUE(c.quantized && g.quantized) << what;
              ASSERT_EQ(view_difference(*g.quantized, *c.quantized), "") << what;
              const std::int64_t kv_len = seen + q_len;
              ASSERT_GT(c.quantized->tokens, 0) << what;
              ASSERT_LT(c.quantized->tokens, seen - 6)
                  << what << ": some held keys in the residual";
              ASSERT_EQ(c.quantized->tokens + c.keys.size(2), kv_len) << what;
              if (window) {
                // The window of the step's first query (keys seen - 29 .. seen) reaches into the
                // blocks and the residual.
                ASSERT_LT(seen - *window + 1, c.quantized->tokens) << what;
              }

              const std::vector<std::uint8_t> mask =
                  padded ? attention_mask_bytes(kAttnBatch, kv_len, seen)
                         : std::vector<std::uint8_t>();
              const std::vector<std::int64_t> pos = make_cache_position(seen, q_len);
              const Tensor cpu_out = Tensor::empty({kAttnBatch, q_len, kHeads, dim}, dtype);
              cpu::attention_quantized(query, *c.quantized, c.keys, c.values, mask, pos, 0, scale,
                                       cpu_out, window);
              const Tensor dmask = mask.empty() ? Tensor() : cuda::upload(mask.data(), mask.size());
              const Tensor dpos = cuda::to_device(
                  Tensor::from_blob(const_cast<std::int64_t*>(pos.data()), {q_len}, DType::kInt64));
              const Tensor dquery = cuda::to_device(query);
              const Tensor gpu_out =
                  testing::poisoned_device({kAttnBatch, q_len, kHeads, dim}, dtype);
              cuda::attention_quantized(dquery, *g.quantized, g.keys, g.values, dmask, dpos, 0,
                                        scale, gpu_out, window);
              const std::vector<double> got = to_doubles(cuda::to_host(gpu_out));
              const std::vector<double> want = to_doubles(cpu_out);
              ASSERT_EQ(got.size(), want.size());
              std::size_t non_finite = 0;
              for (double x : got) non_finite += std::isfinite(x) ? 0 : 1;
              EXPECT_EQ(non_finite, 0u) << what << ": outputs left unwritten or NaN";
              // Relative to max(|expected|, 0.01): float32 noise on outputs near zero is not an
              // error.
              const testing::ErrorStats e = testing::compare(got, want, 1e-2);
              EXPECT_LT(e.max_rel, testing::attention_tolerance(dtype)) << what;
              if (padded) {
                // Row 2's first query sees no key: zeros on both backends, never NaN.
                for (std::int64_t h = 0; h < kHeads; ++h)
                  for (std::int64_t c2 = 0; c2 < dim; ++c2) {
                    const auto i =
                        static_cast<std::size_t>(((2 * q_len + 0) * kHeads + h) * dim + c2);
                    EXPECT_EQ(got[i], 0.0) << what << ": the fully masked row, head " << h;
                    EXPECT_EQ(want[i], 0.0) << what << ": the CPU's fully masked row, head " << h;
                  }
              }
              if (dtype == DType::kFloat32) {
                // The GPU's own dequantize-then-attend: cuda::attention over update()'s tensors.
                const auto [fk, fv] = twin.update(cuda::to_device(k), cuda::to_device(v), 0);
                ASSERT_EQ(fk.size(2), kv_len) << what;
                const Tensor plain =
                    testing::poisoned_device({kAttnBatch, q_len, kHeads, dim}, dtype);
                cuda::attention(dquery, fk, fv, dmask, dpos, 0, scale, plain, window);
                // Two float32 kernels summing in different orders (lane groups, warps, the split
                // merge): float32 noise, relative to max(|expected|, 0.01) as above.
                const testing::ErrorStats p =
                    testing::compare(got, to_doubles(cuda::to_host(plain)), 1e-2);
                EXPECT_LT(p.max_rel, 1e-4) << what << ": against cuda::attention over update()";
              }
              if (HasFatalFailure()) return;
              ++cases;
            }
  EXPECT_EQ(cases, 3 * 4 * 3 * 3 * 2 * 2);

  // With no quantized token yet (a residual of 64), attention_quantized is cuda::attention over
  // the residual, bit for bit.
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  for (const DType dtype : testing::kFloatTypes)
    for (const bool padded : {false, true}) {
      std::mt19937 rng(77);
      GpuCache gpu({.nbits = 2, .group_size = 8, .residual_length = 64});
      std::int64_t seen = 0;
      for (const std::int64_t q_len : {std::int64_t{9}, std::int64_t{1}, std::int64_t{3}}) {
        const Tensor k =
            cuda::to_device(random_tensor({kAttnBatch, kKvHeads, q_len, kDim}, dtype, rng));
        const Tensor v =
            cuda::to_device(random_tensor({kAttnBatch, kKvHeads, q_len, kDim}, dtype, rng));
        const Tensor query =
            cuda::to_device(random_tensor({kAttnBatch, kHeads, q_len, kDim}, dtype, rng));
        const AttentionKV g = gpu.update_for_attention(k, v, 0);
        ASSERT_TRUE(g.quantized.has_value());
        ASSERT_EQ(g.quantized->tokens, 0);
        const std::int64_t kv_len = seen + q_len;
        ASSERT_EQ(g.keys.size(2), kv_len);
        const std::vector<std::uint8_t> mask =
            padded ? attention_mask_bytes(kAttnBatch, kv_len, seen) : std::vector<std::uint8_t>();
        const Tensor dmask = mask.empty() ? Tensor() : cuda::upload(mask.data(), mask.size());
        const std::vector<std::int64_t> pos = make_cache_position(seen, q_len);
        const Tensor dpos = cuda::to_device(
            Tensor::from_blob(const_cast<std::int64_t*>(pos.data()), {q_len}, DType::kInt64));
        for (const std::optional<std::int64_t> window :
             {std::optional<std::int64_t>{}, std::optional<std::int64_t>{4}}) {
          const Tensor a = testing::poisoned_device({kAttnBatch, q_len, kHeads, kDim}, dtype);
          const Tensor b = testing::poisoned_device({kAttnBatch, q_len, kHeads, kDim}, dtype);
          cuda::attention_quantized(query, *g.quantized, g.keys, g.values, dmask, dpos, 0, scale, a,
                                    window);
          cuda::attention(query, g.keys, g.values, dmask, dpos, 0, scale, b, window);
          const std::vector<double> x = to_doubles(cuda::to_host(a));
          const std::vector<double> y = to_doubles(cuda::to_host(b));
          for (double e : x) ASSERT_TRUE(std::isfinite(e)) << dtype_name(dtype);
          EXPECT_EQ(x, y) << dtype_name(dtype) << ", q_len " << q_len << ", padded " << padded
                          << ", window " << window.value_or(0);
        }
        seen += q_len;
      }
    }
}

TEST_F(QuantizedCacheCuda, MaskSizesAreSeqLengthPlusQueryAcrossFlushes) {
  testing::expect_quantized_mask_sizes_follow_the_tokens<cuda::Backend>();
}

// A negative crop of layers of different lengths (mid-step) takes one target, get_seq_length()
// minus the drop, for every layer, as the CPU cache does; an empty cache checks the argument.
TEST_F(QuantizedCacheCuda, NegativeCropTakesOneTargetForEveryLayerAsTheCpu) {
  const QuantizedCacheOptions o{.nbits = 4, .group_size = 8, .residual_length = 4};
  const DType dtype = DType::kBFloat16;
  std::mt19937 rng(41);
  CpuCache cpu(o);
  GpuCache gpu(o);
  EXPECT_KVCACHE_ERROR(gpu.crop(std::numeric_limits<std::int64_t>::min()),
                       "expected to drop at most 0 tokens");
  int kind = 0;
  for (const auto& [layer, q] : {std::pair{0, 14}, std::pair{1, 10}}) {
    const Tensor k = make_states(kBatch, q, kDim, dtype, rng, kind++);
    const Tensor v = make_states(kBatch, q, kDim, dtype, rng, kind++);
    EXPECT_EQ(step_difference(gpu, cpu, layer, k, v), "") << "layer " << layer;
  }
  for (const std::int64_t n : {std::int64_t{-1}, std::int64_t{-3}}) {
    cpu.crop(n);
    gpu.crop(n);
    EXPECT_EQ(difference(gpu, cpu), "") << "crop(" << n << ")";
  }
  EXPECT_EQ(gpu.get_seq_length(0), 10);
  EXPECT_EQ(gpu.get_seq_length(1), 10);
  EXPECT_KVCACHE_ERROR(gpu.crop(-11), "expected to drop at most 10 tokens");
}

TEST_F(QuantizedCacheCuda, CropReorderBatchOpsResetAndCloneMatchTheCpu) {
  for (const QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken}) {
    const QuantizedCacheOptions o{
        .nbits = 4, .group_size = 8, .key_axis = axis, .residual_length = 6};
    const DType dtype = DType::kBFloat16;
    const std::string what = describe(o, dtype);
    const std::int64_t chunk = axis == QuantAxis::kPerChannel ? o.group_size : 1;
    std::mt19937 rng(axis == QuantAxis::kPerChannel ? 31 : 32);
    CpuCache cpu(o);
    GpuCache gpu(o);
    int kind = 0;
    // q tokens of `batch` rows to both layers of both caches; the views and then the caches
    // must agree.
    auto feed = [&](GpuCache& g, CpuCache& c, std::int64_t q, std::int64_t batch,
                    const std::string& step) {
      for (int layer = 0; layer < kLayers; ++layer) {
        const Tensor k = make_states(batch, q, kDim, dtype, rng, kind++);
        const Tensor v = make_states(batch, q, kDim, dtype, rng, kind++);
        EXPECT_EQ(step_difference(g, c, layer, k, v), "")
            << what << ", " << step << ", layer " << layer;
      }
      EXPECT_EQ(difference(g, c), "") << what << ", after " << step;
    };
    auto check = [&](const std::string& step) {
      EXPECT_EQ(difference(gpu, cpu), "") << what << ", " << step;
    };

    feed(gpu, cpu, 30, kBatch, "the prefill");
    feed(gpu, cpu, 1, kBatch, "a decode step");
    ASSERT_GE(cpu.quantized_length(), 24) << what;
    ASSERT_GE(cpu.get_seq_length() - cpu.quantized_length(), 6) << what;

    // A crop inside the residual.
    const std::int64_t in_residual =
        cpu.quantized_length() + (cpu.get_seq_length() - cpu.quantized_length()) / 2;
    cpu.crop(in_residual);
    gpu.crop(in_residual);
    check("crop(" + std::to_string(in_residual) + ") inside the residual");
    EXPECT_EQ(gpu.get_seq_length(), in_residual);
    feed(gpu, cpu, 3, kBatch, "a step after the crop");
    feed(gpu, cpu, 9, kBatch, "a flushing step after the crop");

    // A crop to a block boundary below the quantized tokens: whole blocks dropped.
    const std::int64_t boundary = (cpu.quantized_length() / chunk - 1) * chunk;
    ASSERT_GT(boundary, 0);
    cpu.crop(boundary);
    gpu.crop(boundary);
    check("crop(" + std::to_string(boundary) + ") to a block boundary");
    EXPECT_EQ(gpu.get_seq_length(), boundary);
    EXPECT_EQ(gpu.quantized_length(), boundary);
    feed(gpu, cpu, 11, kBatch, "a step after the block crop");
    feed(gpu, cpu, 5, kBatch, "a flushing step after the block crop (blocks rewritten)");
    ASSERT_GT(cpu.quantized_length(), boundary) << what;

    if (axis == QuantAxis::kPerChannel) {
      // Below the quantized tokens and not on a block boundary: refused, nothing changes.
      const std::int64_t illegal = cpu.quantized_length() - 3;
      const std::int64_t length = gpu.get_seq_length(), quantized = gpu.quantized_length();
      EXPECT_KVCACHE_ERROR(gpu.crop(illegal), "must land on a block boundary");
      EXPECT_KVCACHE_ERROR(cpu.crop(illegal), "must land on a block boundary");
      EXPECT_EQ(gpu.get_seq_length(), length);
      EXPECT_EQ(gpu.quantized_length(), quantized);
      check("a refused crop(" + std::to_string(illegal) + ")");
    }
    // Dropping more tokens than held: refused, nothing changes.
    EXPECT_KVCACHE_ERROR(gpu.crop(-1000), "expected to drop at most");
    check("a refused crop(-1000)");
    // A negative length drops from the end (inside the residual here).
    ASSERT_GE(cpu.get_seq_length() - cpu.quantized_length(), 2);
    cpu.crop(-2);
    gpu.crop(-2);
    check("crop(-2)");
    feed(gpu, cpu, 1, kBatch, "a step after crop(-2)");

    // Beam reorder, repeat, select.
    const std::vector<std::int64_t> beams = {1, 0};
    cpu.reorder_cache(beams);
    gpu.reorder_cache(beams);
    check("reorder_cache({1, 0})");
    feed(gpu, cpu, 2, kBatch, "a step after the reorder");
    cpu.batch_repeat_interleave(2);
    gpu.batch_repeat_interleave(2);
    check("batch_repeat_interleave(2)");
    EXPECT_EQ(gpu.batch_size(), 2 * kBatch);
    feed(gpu, cpu, 9, 2 * kBatch, "a flushing step after the repeat");
    const std::vector<std::int64_t> keep = {3, 0, 2};
    cpu.batch_select_indices(keep);
    gpu.batch_select_indices(keep);
    check("batch_select_indices({3, 0, 2})");
    EXPECT_EQ(gpu.batch_size(), 3);
    feed(gpu, cpu, 1, 3, "a step after the select");

    // Clones are deep both ways: the clone moving on leaves the original as it was, and the
    // original moving on leaves the clone as it was.
    GpuCache gpu_copy = gpu.clone();
    CpuCache cpu_copy = cpu.clone();
    EXPECT_EQ(difference(gpu_copy, cpu), "") << what << ": the clone";
    const auto original_bytes = gpu.block_bytes(0, 1);
    const std::int64_t original_length = gpu.get_seq_length();
    feed(gpu_copy, cpu_copy, 17, 3, "the clone's flushing step");
    EXPECT_GT(gpu_copy.quantized_length(), gpu.quantized_length()) << what;
    EXPECT_EQ(gpu.get_seq_length(), original_length) << what;
    EXPECT_EQ(gpu.block_bytes(0, 1), original_bytes) << what;
    check("the original after its clone moved on");
    feed(gpu, cpu, 5, 3, "the original's step after the clone");
    EXPECT_EQ(difference(gpu_copy, cpu_copy), "") << what << ": the clone after the original moved";
    feed(gpu_copy, cpu_copy, 1, 3, "the clone's next step");
    // Behind the base class too.
    const std::unique_ptr<Cache<cuda::Backend>> base =
        static_cast<const Cache<cuda::Backend>&>(gpu).clone();
    const auto* base_copy = dynamic_cast<const GpuCache*>(base.get());
    ASSERT_NE(base_copy, nullptr) << what;
    EXPECT_EQ(difference(*base_copy, cpu), "") << what << ": Cache<cuda::Backend>::clone()";

    // crop(0) lands on a block boundary: the cache is empty and takes a new batch.
    cpu.crop(0);
    gpu.crop(0);
    check("crop(0)");
    EXPECT_EQ(gpu.get_seq_length(), 0);
    EXPECT_EQ(gpu.batch_size(), -1);
    feed(gpu, cpu, 10, kBatch, "a prefill after crop(0)");

    // reset keeps the GPU storage; the next prefill may take another layout or the same one.
    const std::size_t capacity = gpu.capacity_bytes();
    cpu.reset();
    gpu.reset();
    check("reset");
    EXPECT_EQ(gpu.get_seq_length(), 0);
    EXPECT_EQ(gpu.quantized_length(), 0);
    EXPECT_EQ(gpu.batch_size(), -1);
    EXPECT_EQ(gpu.nbytes(), 0u);
    EXPECT_EQ(gpu.capacity_bytes(), capacity);
    gpu.reorder_cache(beams);  // an empty cache: nothing to reorder
    cpu.reorder_cache(beams);
    feed(gpu, cpu, 13, 3, "a prefill of another batch after reset");
    cpu.reset();
    gpu.reset();
    feed(gpu, cpu, 20, 3, "a prefill of the same layout after reset (storage reused)");
    feed(gpu, cpu, 1, 3, "a step after it");
    EXPECT_GT(gpu.quantized_length(), 0) << what;
  }
}

TEST_F(QuantizedCacheCuda, ErrorsLeaveTheCacheUnchanged) {
  std::mt19937 rng(41);
  const QuantizedCacheOptions o{.nbits = 8, .group_size = 8, .residual_length = 4};
  GpuCache gpu(o);
  CpuCache cpu(o);  // the reference: never given the refused calls
  for (int layer = 0; layer < kLayers; ++layer) {
    const Tensor k = random_tensor({kBatch, kKvHeads, 19, kDim}, DType::kFloat32, rng);
    const Tensor v = random_tensor({kBatch, kKvHeads, 19, kDim}, DType::kFloat32, rng);
    ASSERT_EQ(step_difference(gpu, cpu, layer, k, v), "");
  }
  ASSERT_EQ(difference(gpu, cpu), "");
  ASSERT_GT(gpu.quantized_length(), 0);
  const std::size_t nbytes = gpu.nbytes();
  auto unchanged = [&](const std::string& call) {
    EXPECT_EQ(gpu.num_layers(), kLayers) << call;
    EXPECT_EQ(gpu.get_seq_length(0), 19) << call;
    EXPECT_EQ(gpu.nbytes(), nbytes) << call;
    EXPECT_EQ(difference(gpu, cpu), "") << call;
  };

  // Host states: the error names both devices.
  const Tensor host = random_tensor({kBatch, kKvHeads, 1, kDim}, DType::kFloat32, rng);
  const Tensor dev = cuda::to_device(host);
  EXPECT_KVCACHE_ERROR(gpu.update(host, host, 0),
                       "QuantizedCache::update: expected states on cuda (the cache's backend), "
                       "got cpu and cpu");
  unchanged("update() with host states");
  EXPECT_KVCACHE_ERROR(gpu.update_for_attention(host, host, 1),
                       "expected states on cuda (the cache's backend), got cpu and cpu");
  unchanged("update_for_attention() with host states");
  EXPECT_KVCACHE_ERROR(gpu.update_for_attention(dev, host, 0),
                       "expected states on cuda (the cache's backend), got cuda and cpu");
  unchanged("update_for_attention() with host values");

  // Another layout for a layer that holds tokens: head_dim, heads, dtype.
  const std::string layout =
      "layer 0 holds [2, 2, 19, 32] float32; expected new states of that layout";
  const Tensor wide =
      cuda::to_device(random_tensor({kBatch, kKvHeads, 1, 2 * kDim}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(gpu.update_for_attention(wide, wide, 0), layout);
  unchanged("another head_dim");
  const Tensor heads = cuda::to_device(random_tensor({kBatch, 1, 1, kDim}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(gpu.update(heads, heads, 0), layout);
  unchanged("other heads");
  const Tensor half =
      cuda::to_device(random_tensor({kBatch, kKvHeads, 1, kDim}, DType::kBFloat16, rng));
  EXPECT_KVCACHE_ERROR(gpu.update_for_attention(half, half, 0), layout);
  unchanged("another dtype");

  // Another batch: for a layer that holds tokens, and for a new layer.
  const Tensor three = cuda::to_device(random_tensor({3, kKvHeads, 1, kDim}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(gpu.update_for_attention(three, three, 1), "layer 1 holds [2, 2, 19, 32]");
  unchanged("another batch for layer 1");
  EXPECT_KVCACHE_ERROR(gpu.update_for_attention(three, three, 2),
                       "expected batch 2 (the batch the cache holds), got 3");
  unchanged("another batch for a new layer");

  // A layer index past the next one; a head_dim the groups do not divide.
  EXPECT_KVCACHE_ERROR(gpu.update(dev, dev, 5), "expected layer_idx in [0, 2]");
  unchanged("layer 5");
  const Tensor odd =
      cuda::to_device(random_tensor({kBatch, kKvHeads, 1, 12}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(gpu.update_for_attention(odd, odd, 2), "to divide head_dim 12");
  unchanged("head_dim 12");
  // Mismatched key and value states.
  const Tensor longer =
      cuda::to_device(random_tensor({kBatch, kKvHeads, 2, kDim}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(gpu.update(dev, longer, 0), "expected value_states shaped like key_states");
  unchanged("mismatched values");

  // Batch operations with bad arguments.
  EXPECT_KVCACHE_ERROR(gpu.reorder_cache(std::vector<std::int64_t>{0}),
                       "expected 2 beam indices (one per row), got 1");
  unchanged("reorder_cache with one index");
  EXPECT_KVCACHE_ERROR(gpu.reorder_cache(std::vector<std::int64_t>{0, 2}),
                       "expected indices in [0, 2), got 2 at position 1");
  unchanged("reorder_cache out of range");
  EXPECT_KVCACHE_ERROR(gpu.batch_select_indices(std::vector<std::int64_t>{}),
                       "expected at least one index");
  unchanged("batch_select_indices with none");
  EXPECT_KVCACHE_ERROR(gpu.batch_select_indices(std::vector<std::int64_t>{-1}),
                       "expected indices in [0, 2), got -1");
  unchanged("batch_select_indices out of range");
  EXPECT_KVCACHE_ERROR(gpu.batch_repeat_interleave(0), "expected repeats >= 1");
  unchanged("batch_repeat_interleave(0)");
  EXPECT_KVCACHE_ERROR(gpu.block_bytes(0, 2), "no row 2");
  EXPECT_KVCACHE_ERROR(gpu.block_bytes(2, 0), "no layer 2");

  // The kernels' own checks.
  const AttentionKV probe_view = [&] {
    GpuCache probe(o);
    return probe.update_for_attention(dev, dev, 0);
  }();
  ASSERT_TRUE(probe_view.quantized.has_value());
  QuantizedKVView bad = *probe_view.quantized;
  bad.batch = 3;
  const Tensor q1 = cuda::to_device(random_tensor({kBatch, 4, 1, kDim}, DType::kFloat32, rng));
  const Tensor out = cuda::empty({kBatch, 1, 4, kDim}, DType::kFloat32);
  const std::vector<std::int64_t> pos0 = {0};
  const Tensor dpos = cuda::to_device(
      Tensor::from_blob(const_cast<std::int64_t*>(pos0.data()), {1}, DType::kInt64));
  EXPECT_KVCACHE_ERROR(cuda::attention_quantized(q1, bad, probe_view.keys, probe_view.values,
                                                 Tensor(), dpos, 0, 0.1f, out),
                       "expected quantized blocks of batch 2");
  EXPECT_KVCACHE_ERROR(
      cuda::dequantize_kv_blocks(*probe_view.quantized,
                                 cuda::empty({kBatch, kKvHeads, 1, kDim + 2}, DType::kFloat32),
                                 cuda::empty({kBatch, kKvHeads, 1, kDim + 2}, DType::kFloat32)),
      "cuda::dequantize_kv_blocks: expected out");

  // Options the cache cannot serve.
  EXPECT_KVCACHE_ERROR(GpuCache({.nbits = 3}), "expected nbits 2, 4 or 8");
  EXPECT_KVCACHE_ERROR(GpuCache({.group_size = 0}), "expected group_size in [1, 2^20]");
  EXPECT_KVCACHE_ERROR(GpuCache({.residual_length = -1}), "expected residual_length");
  EXPECT_KVCACHE_ERROR(GpuCache({.scale_dtype = DType::kBFloat16}),
                       "expected scale_dtype float16 or float32");

  // The cache still works, as the CPU one: its residual was untouched too.
  for (int layer = 0; layer < kLayers; ++layer) {
    const Tensor k = random_tensor({kBatch, kKvHeads, 6, kDim}, DType::kFloat32, rng);
    EXPECT_EQ(step_difference(gpu, cpu, layer, k, k), "") << "a step after the errors";
  }
  EXPECT_EQ(difference(gpu, cpu), "") << "after a step";
}

// A GPU model over a GPU quantized cache against the CPU model over a CPU one (float32, a
// transformers fixture's weights), teacher-forced on the CPU's greedy tokens with blocks quantized
// during the run: every step's logits agree to float32 noise. The two models' keys differ in their
// last bits, so a value lying on a code's rounding boundary may get another code; the block bytes
// are compared, and only where they differ is the bound looser. generate() with
// cache_implementation "quantized" on the GPU gives the hand-written GPU loop's tokens.
// One model in float32 on both backends over 4-bit quantized caches: the GPU's logits
// teacher-forced along the CPU's greedy tokens, the two caches' block bytes, and generate() on the
// GPU against the GPU's own loop.
void expect_quantized_model_matches(const LlamaModel& gpu_model, const LlamaModel& cpu_model,
                                    const char* name) {
  // Per-channel key blocks of 16 tokens, 8 kept in full precision: blocks are flushed at the
  // 24th and 40th tokens.
  const QuantizedCacheOptions opts{.nbits = 4, .group_size = 16, .residual_length = 8};
  Tensor ids = Tensor::empty({1, 6}, DType::kInt64);
  for (std::int64_t i = 0; i < ids.numel(); ++i) ids.data_as<std::int64_t>()[i] = 3 + 11 * i % 60;
  constexpr int kSteps = 40;

  auto run_loop = [&](const LlamaModel& model, Cache<cuda::Backend>* gpu_cache,
                      Cache<cpu::Backend>* cpu_cache, const std::vector<std::int64_t>* forced,
                      std::vector<Tensor>& logits) {
    Tensor mask = ones_mask(1, 6);
    std::vector<std::int64_t> pos = make_cache_position(0, 6);
    Tensor step = ids;
    std::vector<std::int64_t> tokens;
    for (int i = 0; i < kSteps; ++i) {
      Tensor out;
      if (gpu_cache) {
        out = cuda::to_host(model.forward({.input_ids = step,
                                           .attention_mask = mask,
                                           .cache_position = pos,
                                           .past_key_values = gpu_cache,
                                           .logits_to_keep = 1}));
      } else {
        out = model.forward({.input_ids = step,
                             .attention_mask = mask,
                             .cache_position = pos,
                             .past_key_values = cpu_cache,
                             .logits_to_keep = 1});
      }
      logits.push_back(out);
      const std::int64_t next =
          forced ? (*forced)[static_cast<std::size_t>(i)] : argmax_last(out)[0];
      tokens.push_back(next);
      step = token_column({next});
      mask = extend_attention_mask(mask);
      pos = {pos.back() + 1};
    }
    return tokens;
  };
  CpuCache cpu_cache(opts);
  std::vector<Tensor> cpu_logits, gpu_logits, free_logits;
  const std::vector<std::int64_t> cpu_tokens =
      run_loop(cpu_model, nullptr, &cpu_cache, nullptr, cpu_logits);
  GpuCache gpu_cache(opts);
  run_loop(gpu_model, &gpu_cache, nullptr, &cpu_tokens, gpu_logits);
  const int layers = cpu_model.config().num_hidden_layers;
  ASSERT_EQ(gpu_cache.num_layers(), layers);
  for (int l = 0; l < layers; ++l) {
    EXPECT_EQ(gpu_cache.get_seq_length(l), 6 + kSteps - 1);
    EXPECT_EQ(gpu_cache.quantized_length(l), cpu_cache.quantized_length(l));
    EXPECT_EQ(gpu_cache.quantized_length(l), 32) << "two blocks of 16 quantized during the run";
  }
  std::size_t differing = 0, total = 0;
  for (int l = 0; l < layers; ++l) {
    const auto [gk, gv] = gpu_cache.block_bytes(l, 0);
    const auto [ck, cv] = cpu_cache.block_bytes(l, 0);
    ASSERT_EQ(gk.size(), ck.size());
    ASSERT_EQ(gv.size(), cv.size());
    for (std::size_t i = 0; i < ck.size(); ++i) differing += gk[i] != ck[i] ? 1 : 0;
    for (std::size_t i = 0; i < cv.size(); ++i) differing += gv[i] != cv[i] ? 1 : 0;
    total += ck.size() + cv.size();
  }
  double worst = 0.0;
  int worst_step = -1;
  for (int i = 0; i < kSteps; ++i) {
    const std::vector<double> c = to_doubles(cpu_logits[static_cast<std::size_t>(i)]);
    const std::vector<double> g = to_doubles(gpu_logits[static_cast<std::size_t>(i)]);
    ASSERT_EQ(c.size(), g.size());
    double diff = 0.0, scale = 0.0;
    for (std::size_t j = 0; j < c.size(); ++j) {
      diff = std::max(diff, std::isnan(g[j]) ? INFINITY : std::abs(c[j] - g[j]));
      scale = std::max(scale, std::abs(c[j]));
    }
    ASSERT_GT(scale, 0.0);
    if (diff / scale > worst) {
      worst = diff / scale;
      worst_step = i;
    }
  }
  std::cout << "[ quantized 4-bit, GPU vs CPU ] " << name << ": worst relative logit error over "
            << kSteps << " steps: " << worst << " (step " << worst_step << "); " << differing
            << " of " << total << " block bytes differ between the two models' caches\n";
  EXPECT_LT(worst, differing == 0 ? 1e-4 : 2e-3)
      << "worst relative logit error at step " << worst_step << " (" << differing
      << " block bytes differ)";
  EXPECT_LE(differing, total / 100)
      << "the two models' blocks should differ in a few codes at most";

  // generate() on the GPU: the free-running GPU loop's tokens, and its cache's bytes.
  GpuCache loop_cache(opts);
  const std::vector<std::int64_t> gpu_tokens =
      run_loop(gpu_model, &loop_cache, nullptr, nullptr, free_logits);
  GenerationConfig config{.max_new_tokens = kSteps, .cache_implementation = "quantized"};
  config.cache_config.nbits = opts.nbits;
  config.cache_config.q_group_size = opts.group_size;
  config.cache_config.axis_key = "channel";
  config.cache_config.residual_length = opts.residual_length;
  const GenerateResult gen = generate(gpu_model, ids, Tensor(), config);
  ASSERT_EQ(gen.new_tokens.size(), 1u);
  ASSERT_EQ(gen.new_tokens[0].size(), static_cast<std::size_t>(kSteps));
  // The loop's i-th logits give generate()'s token i (its first comes from the prefill).
  for (int i = 0; i < kSteps; ++i) {
    ASSERT_EQ(gen.new_tokens[0][static_cast<std::size_t>(i)],
              gpu_tokens[static_cast<std::size_t>(i)])
        << "token " << i;
  }
  // Both caches saw the prompt and kSteps - 1 tokens in the same steps.
  EXPECT_EQ(gen.cache_bytes, loop_cache.nbytes());
  const ModelConfig& c = cpu_model.config();
  EXPECT_LT(gen.cache_bytes, static_cast<std::size_t>(2 * c.num_key_value_heads * c.head_dim * 4) *
                                 (6 + kSteps - 1) * static_cast<std::size_t>(layers))
      << "fewer bytes than float32 keys and values";
  EXPECT_EQ(gen.graph_steps, 0);  // kernel by kernel: the storage moves as it grows
}

TEST_F(QuantizedCacheCuda, ModelLogitsMatchTheCpuAndGenerateFollowsTheLoop) {
  const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/llama_gqa";
  expect_quantized_model_matches(
      LlamaModel::from_pretrained(dir, {.dtype = DType::kFloat32, .device = Device::kCuda}),
      LlamaModel::from_pretrained(dir, {.dtype = DType::kFloat32}), "llama_gqa");
}

TEST_F(QuantizedCacheCuda, DefaultModelLogitsMatchTheCpu) {
  // head_dim 64 and 3 query heads per kv head: the quantized decode kernel's shape.
  const std::string path = KVCACHE_DEFAULT_MODEL_PATH;
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no default model (scripts/setup-model.sh)";
  expect_quantized_model_matches(
      LlamaModel::from_gguf(path, {.dtype = DType::kFloat32, .device = Device::kCuda}),
      LlamaModel::from_gguf(path, {.dtype = DType::kFloat32}), "default model");
}

}  // namespace
}  // namespace kvcache
