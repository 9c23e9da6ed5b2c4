// cuda::attention against cpu::attention on the same inputs (fresh random values, never zeros;
// `out` poisoned with NaN before each launch). The shapes reach every path of the CUDA code:
//   decode (q_len 1, 2, 5, 7, 8): the tensor-core flash-decoding kernel for bfloat16/float16 at
//     head_dim 64/128 (16 rows per block, up to 4 row blocks), the SIMT one for float32 with 1,
//     2, 4 or 8 rows per block, the generic SIMT kernel at 16/24 and for misaligned views;
//     contexts long enough (5000, 16411) that the keys are split across blocks and merged, with
//     left padding long enough that whole splits see no key, and queries in mid-cache whose
//     causal frontier ends splits early;
//   prefill (q_len 37, 128, 300): the tensor-core kernel for bfloat16/float16 at 64/128, the SIMT
//     kernel for float32 and the other head dims; causal from 0, chunked prefill against an
//     existing cache (positions past..past+q_len-1), a kv_offset (key 0 is not slot 0);
//   grouped-query ratios 1, 3, 4 and 8; query as a transposed view, keys and values as slices of
//   a larger-capacity cache; rows that see no key at all, which must be exact zeros.
// bfloat16/float16 are compared with the CPU run on the same 16-bit inputs: both round the output
// once, and the tensor-core path also rounds the probabilities to the input dtype before P·V,
// which is what the tolerances (2e-2 bfloat16, 4e-3 float16, 2e-5 float32) allow for.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "kvcache/kvcache.hpp"

namespace kvcache {
namespace {

using testing::compare;
using testing::poisoned_device;
using testing::random_tensor;
using testing::to_doubles;

class CudaAttention : public testing::CudaTest {};

using testing::kFloatTypes;

double tolerance(DType dtype) { return testing::attention_tolerance(dtype); }

struct HeadCounts {
  std::int64_t num_heads, num_kv_heads;  // ratio num_heads / num_kv_heads
};
constexpr HeadCounts kRatios[] = {{4, 4}, {6, 2}, {8, 2}, {16, 2}};  // 1, 3, 4, 8

enum class Layout {
  kContiguous,  // query [b, heads, q, d], keys/values [b, kv_heads, kv, d], all contiguous
  kStrided,     // query = [b, q, heads, d].transpose(1, 2); keys/values rows 3.. of a cache
  kMisaligned,  // every operand a column slice [1, d + 1) of a [.., d + 2] tensor
};

struct Case {
  std::int64_t batch = 2;
  std::int64_t num_heads = 4, num_kv_heads = 4;
  std::int64_t q_len = 1, kv_len = 16, head_dim = 64;
  std::int64_t past = -1;  // first cache position; -1: kv_offset + kv_len - q_len (the last keys)
  std::int64_t kv_offset = 0;
  std::int64_t left_pad = 0;  // batch row b starts with min(b · left_pad, kv_len) masked keys
  bool use_mask = true;       // false: no mask tensor at all (left_pad must be 0)
  Layout layout = Layout::kContiguous;
  DType dtype = DType::kFloat32;
  std::optional<std::int64_t> window;  // sliding window (none: full causal attention)

  std::string describe() const {
    std::ostringstream s;
    s << "batch " << batch << ", heads " << num_heads << "/" << num_kv_heads << ", q_len " << q_len
      << ", kv_len " << kv_len << ", head_dim " << head_dim << ", past " << first_position()
      << ", kv_offset " << kv_offset << ", left_pad " << left_pad << ", mask " << use_mask
      << ", layout " << static_cast<int>(layout) << ", " << dtype_name(dtype) << ", window "
      << window.value_or(0);
    return s.str();
  }
  std::int64_t first_position() const { return past >= 0 ? past : kv_offset + kv_len - q_len; }
};

// The same random elements on the host and the device, viewed with the case's layout.
struct Operand {
  Tensor host, device;
};

// shape is the logical [a, b, c, d] of the view; `transposed` stores it as [a, c, b, d].
Operand make_operand(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d, Layout layout,
                     bool transposed, std::int64_t spare_rows, DType dtype, std::mt19937& rng,
                     float amplitude) {
  Operand base;
  switch (layout) {
    case Layout::kContiguous:
      base.host = random_tensor({a, b, c, d}, dtype, rng, amplitude);
      break;
    case Layout::kStrided:
      base.host = transposed ? random_tensor({a, c, b, d}, dtype, rng, amplitude)
                             : random_tensor({a, b, c + spare_rows, d}, dtype, rng, amplitude);
      break;
    case Layout::kMisaligned:
      base.host = random_tensor({a, b, c, d + 2}, dtype, rng, amplitude);
      break;
  }
  base.device = cuda::to_device(base.host);
  auto view = [&](const Tensor& t) {
    switch (layout) {
      case Layout::kContiguous:
        return t;
      case Layout::kStrided:
        return transposed ? t.transpose(1, 2) : t.slice(2, 3, 3 + c);
      case Layout::kMisaligned:
        return t.slice(3, 1, d + 1);
    }
    return t;
  };
  return {view(base.host), view(base.device)};
}

struct Outcome {
  testing::ErrorStats error;
  std::int64_t empty_rows = 0;  // (batch row, query) pairs that see no key
};

// Runs one case on both backends and checks the CUDA output against the CPU's.
Outcome run_case(const Case& c, std::mt19937& rng) {
  SCOPED_TRACE(c.describe());
  const Operand query = make_operand(c.batch, c.num_heads, c.q_len, c.head_dim, c.layout,
                                     /*transposed=*/true, 0, c.dtype, rng, 3.0f);
  const Operand keys = make_operand(c.batch, c.num_kv_heads, c.kv_len, c.head_dim, c.layout, false,
                                    7, c.dtype, rng, 1.0f);
  const Operand values = make_operand(c.batch, c.num_kv_heads, c.kv_len, c.head_dim, c.layout,
                                      false, 7, c.dtype, rng, 1.0f);

  // mask [batch, kv_len]: left padding, and one masked key inside row 0 when it is long enough.
  std::vector<std::uint8_t> mask;
  Tensor mask_device;
  if (c.use_mask) {
    mask.assign(static_cast<std::size_t>(c.batch * c.kv_len), 1);
    for (std::int64_t b = 0; b < c.batch; ++b) {
      const std::int64_t pad = std::min(b * c.left_pad, c.kv_len);
      std::fill_n(mask.begin() + b * c.kv_len, pad, std::uint8_t{0});
    }
    if (c.kv_len > 4) mask[static_cast<std::size_t>(c.kv_len / 2)] = 0;
    mask_device =
        cuda::to_device(Tensor::from_blob(mask.data(), {c.batch, c.kv_len}, DType::kUInt8));
  }
  std::vector<std::int64_t> positions(static_cast<std::size_t>(c.q_len));
  for (std::int64_t i = 0; i < c.q_len; ++i) positions[i] = c.first_position() + i;
  const Tensor positions_device =
      cuda::to_device(Tensor::from_blob(positions.data(), {c.q_len}, DType::kInt64));

  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  Tensor expected = Tensor::empty({c.batch, c.q_len, c.num_heads, c.head_dim}, c.dtype);
  cpu::attention(query.host, keys.host, values.host, std::span<const std::uint8_t>(mask),
                 std::span<const std::int64_t>(positions), c.kv_offset, scale, expected, c.window);
  Tensor out = poisoned_device({c.batch, c.q_len, c.num_heads, c.head_dim}, c.dtype);
  cuda::attention(query.device, keys.device, values.device, mask_device, positions_device,
                  c.kv_offset, scale, out, c.window);
  const std::vector<double> actual = to_doubles(cuda::to_host(out));
  const std::vector<double> reference = to_doubles(expected);

  Outcome outcome;
  outcome.error = compare(actual, reference);
  EXPECT_LE(outcome.error.max_abs, tolerance(c.dtype))
      << "max abs error " << outcome.error.max_abs << ", max rel error " << outcome.error.max_rel;

  // Rows that see no key: exact zeros, in every head.
  const std::int64_t row_elems = c.num_heads * c.head_dim;
  for (std::int64_t b = 0; b < c.batch; ++b) {
    for (std::int64_t i = 0; i < c.q_len; ++i) {
      bool sees_any = false;
      for (std::int64_t j = 0; j < c.kv_len && !sees_any; ++j) {
        const bool causal = c.kv_offset + j <= positions[i] &&
                            (!c.window || c.kv_offset + j > positions[i] - *c.window);
        sees_any = causal && (mask.empty() || mask[b * c.kv_len + j] != 0);
      }
      if (sees_any) continue;
      ++outcome.empty_rows;
      const std::int64_t first = (b * c.q_len + i) * row_elems;
      const auto bad = std::find_if(actual.begin() + first, actual.begin() + first + row_elems,
                                    [](double v) { return v != 0.0; });
      EXPECT_TRUE(bad == actual.begin() + first + row_elems)
          << "batch row " << b << ", query " << i << " sees no key, expected zeros, got " << *bad;
    }
  }
  return outcome;
}

TEST_F(CudaAttention, DecodeMatchesCpu) {
  std::mt19937 rng(601);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {16, 24, 64, 128})
      for (const HeadCounts& heads : kRatios)
        for (std::int64_t q_len : {1, 2, 5})
          for (std::int64_t kv_len : {q_len + 36, std::int64_t{700}}) {
            Case c;
            c.dtype = dtype;
            c.head_dim = head_dim;
            c.num_heads = heads.num_heads;
            c.num_kv_heads = heads.num_kv_heads;
            c.q_len = q_len;
            c.kv_len = kv_len;
            c.left_pad = 3;
            run_case(c, rng);
          }
}

TEST_F(CudaAttention, LongContextSplitsAndMerges) {
  std::mt19937 rng(602);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {24, 64, 128})
      for (std::int64_t kv_len : {5000, 16411})
        for (std::int64_t q_len : {1, 5}) {
          // Batch 3 with 1500 padded keys a row step: row 2 starts with 3000 masked keys, so
          // whole splits see nothing and the merge must skip them.
          Case c;
          c.dtype = dtype;
          c.head_dim = head_dim;
          c.batch = 3;
          c.num_heads = 8;
          c.num_kv_heads = 2;
          c.q_len = q_len;
          c.kv_len = kv_len;
          c.left_pad = 1500;
          run_case(c, rng);
          // One kv head of one row: as many splits as the planner allows.
          c.batch = 1;
          c.num_heads = 4;
          c.num_kv_heads = 1;
          c.left_pad = 0;
          run_case(c, rng);
        }
}

// The sliding window (key slot > query slot - W) on every kernel: decode (SIMT for float32 and
// odd head_dims, tensor cores for 16-bit), long contexts split across blocks, prefill (tensor
// cores for 16-bit) and chunked prefill, with padding and kv_offset > 0, against cpu::attention's
// rule. Windows from 1 (a query sees only itself) to wider than the keys (no effect).
TEST_F(CudaAttention, SlidingWindowMatchesCpu) {
  std::mt19937 rng(611);
  struct Shape {
    std::int64_t q_len, kv_len, kv_offset;
  };
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {24, 64, 128})
      for (const Shape& shape : {Shape{1, 300, 0}, Shape{3, 300, 40}, Shape{1, 5000, 0},
                                 Shape{150, 150, 0}, Shape{100, 400, 0}})
        for (std::int64_t window : {1, 7, 64, 129, 100000}) {
          Case c;
          c.dtype = dtype;
          c.head_dim = head_dim;
          c.num_heads = 8;
          c.num_kv_heads = 2;
          c.q_len = shape.q_len;
          c.kv_len = shape.kv_len;
          c.kv_offset = shape.kv_offset;
          if (shape.q_len == shape.kv_len) c.past = 0;
          c.left_pad = 3;
          c.window = window;
          run_case(c, rng);
        }
}

TEST_F(CudaAttention, SlidingWindowBelowOneIsAnError) {
  std::mt19937 rng(612);
  const Tensor q = cuda::to_device(random_tensor({1, 2, 1, 64}, DType::kFloat32, rng));
  const Tensor k = cuda::to_device(random_tensor({1, 2, 8, 64}, DType::kFloat32, rng));
  const Tensor pos =
      cuda::to_device(Tensor::from_blob(std::vector<std::int64_t>{7}.data(), {1}, DType::kInt64));
  const Tensor out = cuda::empty({1, 1, 2, 64}, DType::kFloat32);
  EXPECT_THROW(cuda::attention(q, k, k, Tensor(), pos, 0, 0.125f, out, std::int64_t{0}), Error);
  EXPECT_THROW(cuda::attention(q, k, k, Tensor(), pos, 0, 0.125f, out, std::int64_t{-3}), Error);
  EXPECT_NO_THROW(cuda::attention(q, k, k, Tensor(), pos, 0, 0.125f, out, std::int64_t{1}));
}

TEST_F(CudaAttention, PrefillMatchesCpu) {
  std::mt19937 rng(603);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {16, 24, 64, 128})
      for (const HeadCounts& heads : kRatios)
        for (std::int64_t q_len : {37, 128, 300}) {
          // Causal from position 0; batch row 1 has 5 padded keys, so its first 5 queries see
          // nothing.
          Case c;
          c.dtype = dtype;
          c.head_dim = head_dim;
          c.num_heads = heads.num_heads;
          c.num_kv_heads = heads.num_kv_heads;
          c.q_len = q_len;
          c.kv_len = q_len;
          c.past = 0;
          c.left_pad = 5;
          const Outcome outcome = run_case(c, rng);
          EXPECT_EQ(outcome.empty_rows, 5) << c.describe();
        }
}

TEST_F(CudaAttention, ChunkedPrefillMatchesCpu) {
  std::mt19937 rng(604);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {24, 64, 128})
      for (std::int64_t past : {64, 1000})
        for (std::int64_t q_len : {37, 128}) {
          // q_len new tokens at positions past..past+q_len-1 against all past + q_len keys.
          Case c;
          c.dtype = dtype;
          c.head_dim = head_dim;
          c.num_heads = 8;
          c.num_kv_heads = 2;
          c.q_len = q_len;
          c.kv_len = past + q_len;
          c.past = past;
          c.left_pad = 40;
          run_case(c, rng);
          // The cache holds slots 10.. only (key 0 is slot 10), one query head per kv head.
          c.num_heads = c.num_kv_heads = 4;
          c.kv_offset = 10;
          c.kv_len = past + q_len - 10;
          run_case(c, rng);
        }
}

TEST_F(CudaAttention, StridedAndMisalignedViewsMatchCpu) {
  std::mt19937 rng(605);
  for (Layout layout : {Layout::kStrided, Layout::kMisaligned})
    for (DType dtype : kFloatTypes)
      for (std::int64_t head_dim : {24, 64, 128})
        for (std::int64_t q_len : {1, 5, 37, 128}) {
          Case c;
          c.layout = layout;
          c.dtype = dtype;
          c.head_dim = head_dim;
          c.num_heads = 8;
          c.num_kv_heads = 2;
          c.q_len = q_len;
          c.kv_len = q_len + 300;
          c.left_pad = 7;
          run_case(c, rng);
        }
}

TEST_F(CudaAttention, NoMaskMatchesCpu) {
  std::mt19937 rng(606);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {64, 128})
      for (std::int64_t q_len : {1, 3, 200}) {
        Case c;
        c.dtype = dtype;
        c.head_dim = head_dim;
        c.num_heads = 32;
        c.num_kv_heads = 8;
        c.q_len = q_len;
        c.kv_len = q_len + 1234;
        c.use_mask = false;
        run_case(c, rng);
      }
}

TEST_F(CudaAttention, RowsThatSeeNoKeyAreZeros) {
  std::mt19937 rng(607);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {24, 128})
      for (std::int64_t q_len : {1, 4, 70}) {
        // Batch row 1 entirely padding.
        Case c;
        c.dtype = dtype;
        c.head_dim = head_dim;
        c.num_heads = 8;
        c.num_kv_heads = 2;
        c.q_len = q_len;
        c.kv_len = q_len + 600;
        c.left_pad = c.kv_len;
        EXPECT_EQ(run_case(c, rng).empty_rows, q_len) << c.describe();
        // Every query before the first cached slot: nothing is visible to anyone.
        c.left_pad = 0;
        c.kv_offset = 5000;
        c.past = 0;
        EXPECT_EQ(run_case(c, rng).empty_rows, 2 * q_len) << c.describe();
      }
}

TEST_F(CudaAttention, DecodeManyRowsAndMidCacheFrontierMatchesCpu) {
  std::mt19937 rng(609);
  for (DType dtype : kFloatTypes)
    for (std::int64_t head_dim : {64, 128})
      for (const HeadCounts& heads : {HeadCounts{32, 4}, HeadCounts{12, 4}})
        for (std::int64_t q_len : {7, 8}) {
          // Up to 64 packed rows (several row blocks of the decode kernels), queries in the middle
          // of the cache (slots 10..; queries at 1500..): the causal frontier ends some splits
          // early, leaves later ones empty, and differs between the rows of one block.
          Case c;
          c.dtype = dtype;
          c.head_dim = head_dim;
          c.num_heads = heads.num_heads;
          c.num_kv_heads = heads.num_kv_heads;
          c.q_len = q_len;
          c.kv_len = 3000;
          c.kv_offset = 10;
          c.past = 1500;
          c.left_pad = 700;
          run_case(c, rng);
          // One unit, no mask: as many splits as the planner allows, all cut by the frontier.
          c.batch = 1;
          c.left_pad = 0;
          c.use_mask = false;
          c.num_heads = heads.num_heads / heads.num_kv_heads;
          c.num_kv_heads = 1;
          c.past = 40;
          run_case(c, rng);
        }
}

TEST_F(CudaAttention, ChecksArguments) {
  std::mt19937 rng(608);
  const std::int64_t b = 1, h = 4, kvh = 2, q = 3, kv = 9, d = 16;
  const Tensor query = cuda::to_device(random_tensor({b, h, q, d}, DType::kFloat32, rng));
  const Tensor keys = cuda::to_device(random_tensor({b, kvh, kv, d}, DType::kFloat32, rng));
  const Tensor values = cuda::to_device(random_tensor({b, kvh, kv, d}, DType::kFloat32, rng));
  std::vector<std::int64_t> positions = {6, 7, 8};
  const Tensor cache_position =
      cuda::to_device(Tensor::from_blob(positions.data(), {q}, DType::kInt64));
  const Tensor out = poisoned_device({b, q, h, d}, DType::kFloat32);
  const float scale = 0.25f;

  EXPECT_KVCACHE_ERROR(
      cuda::attention(cuda::to_host(query), keys, values, Tensor(), cache_position, 0, scale, out),
      "expected query on the cuda device");
  const Tensor three_heads = cuda::to_device(random_tensor({b, 3, q, d}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::attention(three_heads, keys, values, Tensor(), cache_position, 0,
                                       scale, poisoned_device({b, q, 3, d}, DType::kFloat32)),
                       "to be a multiple of num_kv_heads");
  EXPECT_KVCACHE_ERROR(
      cuda::attention(query, keys, values.slice(1, 0, 1), Tensor(), cache_position, 0, scale, out),
      "expected values shaped like keys");
  EXPECT_KVCACHE_ERROR(cuda::attention(query, keys, values, Tensor(), cache_position, 0, scale,
                                       poisoned_device({b, h, q, d}, DType::kFloat32)),
                       "expected out [");
  EXPECT_KVCACHE_ERROR(cuda::attention(query, cuda::cast(keys, DType::kFloat16), values, Tensor(),
                                       cache_position, 0, scale, out),
                       "(the query's dtype)");
  const Tensor odd_query = cuda::to_device(random_tensor({b, h, q, 15}, DType::kFloat32, rng));
  const Tensor odd_keys = cuda::to_device(random_tensor({b, kvh, kv, 15}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::attention(odd_query, odd_keys, odd_keys, Tensor(), cache_position, 0,
                                       scale, poisoned_device({b, q, h, 15}, DType::kFloat32)),
                       "even head_dim up to 256");
  const Tensor long_mask =
      cuda::to_device(Tensor::zeros({b, kv + 1}, DType::kUInt8));  // one key too many
  EXPECT_KVCACHE_ERROR(
      cuda::attention(query, keys, values, long_mask, cache_position, 0, scale, out),
      "expected a padding mask");
  const Tensor int_mask = cuda::to_device(Tensor::zeros({b, kv}, DType::kInt64));
  EXPECT_KVCACHE_ERROR(
      cuda::attention(query, keys, values, int_mask, cache_position, 0, scale, out),
      "expected a padding mask");
  EXPECT_KVCACHE_ERROR(
      cuda::attention(query, keys, values, Tensor(), cache_position.slice(0, 0, 2), 0, scale, out),
      "expected cache_position [");
  EXPECT_KVCACHE_ERROR(cuda::attention(query, keys, values, Tensor(), Tensor(), 0, scale, out),
                       "expected cache_position [");

  // Nothing was written by the calls that threw.
  for (double v : to_doubles(cuda::to_host(out))) ASSERT_TRUE(std::isnan(v));
  // And the same arguments, corrected, work.
  cuda::attention(query, keys, values, Tensor(), cache_position, 0, scale, out);
  for (double v : to_doubles(cuda::to_host(out))) ASSERT_FALSE(std::isnan(v));
}

}  // namespace
}  // namespace kvcache
