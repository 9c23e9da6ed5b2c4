// CPU attention: softmax(Q·Kᵀ·scale + mask)·V for every (batch row, kv head) group, with the
// num_heads / num_kv_heads query heads that share a kv head processed together so each key and
// value row is read from memory once per step. Keys and values are walked in chunks of
// kKvChunk rows: float32 rows are used in place through Eigen maps, 16-bit rows are widened into a
// per-thread float buffer first. Scores, softmax and the value accumulation are float32.
//
// Work is split over (batch, kv head, query block) items across OpenMP threads. Query blocks are
// sized so a block's score matrix stays within kScoreBudget floats; keys past the last visible
// slot of a block (the causal frontier) are never touched.
// g++ 12 reports false -Wmaybe-uninitialized positives inside its own AVX-512 intrinsic headers
// when Eigen's GEMM kernels are inlined here with -march=native.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cpu.hpp"

namespace kvcache::cpu {
namespace {

constexpr std::int64_t kKvChunk = 256;
constexpr std::int64_t kScoreBudget = 1 << 19;  // floats per score block (2 MiB)

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

template <class T>
void widen_rows(const T* src, std::int64_t row_stride, std::int64_t rows, std::int64_t cols,
                float* dst) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * row_stride;
    float* o = dst + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) o[c] = to_float(in[c]);
  }
}

// Gives a float32 view of rows [start, start + rows) of a [seq, head_dim] slice whose head_dim is
// contiguous: in place for float32, widened into `scratch` otherwise.
template <class T>
ConstRowMap rows_as_float(const T* base, std::int64_t row_stride, std::int64_t start,
                          std::int64_t rows, std::int64_t cols, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return ConstRowMap(base + start * row_stride, rows, cols, Eigen::OuterStride<>(row_stride));
  } else {
    scratch.resize(static_cast<std::size_t>(rows * cols));
    widen_rows(base + start * row_stride, row_stride, rows, cols, scratch.data());
    return ConstRowMap(scratch.data(), rows, cols, Eigen::OuterStride<>(cols));
  }
}

struct Problem {
  std::int64_t batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, n_rep;
  std::int64_t kv_offset;
  float scale;
  const std::int64_t* cache_position;
  const std::uint8_t* mask;  // [batch, kv_len], 1 = attend; null = no padding
};

template <class T>
void attend_block(const Problem& p, const Tensor& query, const Tensor& keys, const Tensor& values,
                  const Tensor& out, std::int64_t b, std::int64_t kvh, std::int64_t q0,
                  std::int64_t q1, RowMatrix& q_rows, RowMatrix& scores, RowMatrix& acc,
                  std::vector<float>& scratch) {
  const std::int64_t d = p.head_dim;
  const std::int64_t qn = q1 - q0;
  const std::int64_t rows = p.n_rep * qn;  // row r = g * qn + (i - q0) for query head kvh*n_rep+g
  // Keys beyond the block's furthest query slot are invisible to every row.
  std::int64_t max_pos = p.cache_position[q0];
  for (std::int64_t i = q0; i < q1; ++i) max_pos = std::max(max_pos, p.cache_position[i]);
  const std::int64_t kv_end = std::clamp<std::int64_t>(max_pos - p.kv_offset + 1, 0, p.kv_len);

  // Q rows, widened and pre-scaled: [rows, d].
  q_rows.resize(rows, d);
  const T* qbase = query.data_as<T>();
  for (std::int64_t g = 0; g < p.n_rep; ++g) {
    const std::int64_t h = kvh * p.n_rep + g;
    for (std::int64_t i = q0; i < q1; ++i) {
      const T* src = qbase + b * query.stride(0) + h * query.stride(1) + i * query.stride(2);
      float* dst = q_rows.data() + (g * qn + (i - q0)) * d;
      for (std::int64_t c = 0; c < d; ++c) dst[c] = to_float(src[c * query.stride(3)]) * p.scale;
    }
  }

  const T* kbase = keys.data_as<T>() + b * keys.stride(0) + kvh * keys.stride(1);
  const T* vbase = values.data_as<T>() + b * values.stride(0) + kvh * values.stride(1);
  scores.resize(rows, std::max<std::int64_t>(kv_end, 1));
  for (std::int64_t c0 = 0; c0 < kv_end; c0 += kKvChunk) {
    const std::int64_t cn = std::min(kKvChunk, kv_end - c0);
    ConstRowMap k = rows_as_float(kbase, keys.stride(2), c0, cn, d, scratch);
    scores.middleCols(c0, cn).noalias() = q_rows * k.transpose();
  }

  // Mask and softmax per row, float32. A row with no visible key becomes all zeros.
  const std::uint8_t* mask_row = p.mask ? p.mask + b * p.kv_len : nullptr;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<char> empty_row(static_cast<std::size_t>(rows), 0);
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t i = q0 + r % qn;
    const std::int64_t visible_end = std::clamp<std::int64_t>(p.cache_position[i] - p.kv_offset + 1, 0, kv_end);
    float* s = scores.data() + r * scores.cols();
    float row_max = kNegInf;
    for (std::int64_t j = 0; j < kv_end; ++j) {
      const bool visible = j < visible_end && (mask_row == nullptr || mask_row[j] != 0);
      if (!visible) s[j] = kNegInf;
      row_max = std::max(row_max, s[j]);
    }
    if (row_max == kNegInf) {
      std::fill(s, s + kv_end, 0.0f);
      empty_row[static_cast<std::size_t>(r)] = 1;
      continue;
    }
    float sum = 0.0f;
    for (std::int64_t j = 0; j < kv_end; ++j) {
      s[j] = std::exp(s[j] - row_max);
      sum += s[j];
    }
    const float inv = 1.0f / sum;
    for (std::int64_t j = 0; j < kv_end; ++j) s[j] *= inv;
  }

  acc.setZero(rows, d);
  for (std::int64_t c0 = 0; c0 < kv_end; c0 += kKvChunk) {
    const std::int64_t cn = std::min(kKvChunk, kv_end - c0);
    ConstRowMap v = rows_as_float(vbase, values.stride(2), c0, cn, d, scratch);
    acc.noalias() += scores.middleCols(c0, cn) * v;
  }

  T* obase = out.data_as<T>();
  for (std::int64_t g = 0; g < p.n_rep; ++g) {
    const std::int64_t h = kvh * p.n_rep + g;
    for (std::int64_t i = q0; i < q1; ++i) {
      const std::int64_t r = g * qn + (i - q0);
      const float* src = acc.data() + r * d;
      T* dst = obase + b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
      const bool zero = empty_row[static_cast<std::size_t>(r)] != 0;
      for (std::int64_t c = 0; c < d; ++c) dst[c * out.stride(3)] = from_float<T>(zero ? 0.0f : src[c]);
    }
  }
}

template <class T>
void run(const Problem& p, const Tensor& query, const Tensor& keys, const Tensor& values,
         const Tensor& out) {
  // Query block: as many queries as keep n_rep × block × kv_len scores within budget.
  const std::int64_t per_query = p.n_rep * std::max<std::int64_t>(p.kv_len, 1);
  const std::int64_t block = std::clamp<std::int64_t>(kScoreBudget / per_query, 1, std::max<std::int64_t>(p.q_len, 1));
  const std::int64_t q_blocks = (p.q_len + block - 1) / block;
  const std::int64_t items = p.batch * p.num_kv_heads * q_blocks;
#pragma omp parallel
  {
    RowMatrix q_rows, scores, acc;
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t qb = item % q_blocks;
      const std::int64_t kvh = (item / q_blocks) % p.num_kv_heads;
      const std::int64_t b = item / (q_blocks * p.num_kv_heads);
      const std::int64_t q0 = qb * block;
      attend_block<T>(p, query, keys, values, out, b, kvh, q0, std::min(p.q_len, q0 + block), q_rows,
                      scores, acc, scratch);
    }
  }
}

}  // namespace

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void attention(const Tensor& query, const Tensor& keys, const Tensor& values,
               const Tensor& attention_mask, std::span<const std::int64_t> cache_position,
               std::int64_t kv_offset, float scale, const Tensor& out) {
  const char* where = "cpu::attention";
  for (const Tensor* t : {&query, &keys, &values, &out}) {
    KVCACHE_CHECK(t->defined() && t->rank() == 4, where, ": expected rank-4 tensors, got ", t->describe());
    KVCACHE_CHECK(t->device() == Device::kCpu, where, ": expected CPU tensors, got ", t->describe());
    KVCACHE_CHECK(t->dtype() == query.dtype(), where, ": expected every tensor in ", dtype_name(query.dtype()),
                  " (the query's dtype), got ", t->describe());
  }
  KVCACHE_CHECK(is_floating(query.dtype()), where, ": expected float32, float16 or bfloat16, got ",
                dtype_name(query.dtype()));
  const std::int64_t batch = query.size(0), num_heads = query.size(1), q_len = query.size(2),
                     head_dim = query.size(3);
  const std::int64_t num_kv_heads = keys.size(1), kv_len = keys.size(2);
  KVCACHE_CHECK(keys.size(0) == batch && keys.size(3) == head_dim, where, ": expected keys [", batch,
                ", num_kv_heads, kv_len, ", head_dim, "], got ", keys.shape_string());
  KVCACHE_CHECK(values.size(0) == batch && values.size(1) == num_kv_heads && values.size(2) == kv_len &&
                    values.size(3) == head_dim,
                where, ": expected values shaped like keys ", keys.shape_string(), ", got ", values.shape_string());
  KVCACHE_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, where, ": expected num_heads (", num_heads,
                ") to be a multiple of num_kv_heads, got ", num_kv_heads);
  KVCACHE_CHECK(out.size(0) == batch && out.size(1) == q_len && out.size(2) == num_heads && out.size(3) == head_dim,
                where, ": expected out [", batch, ", ", q_len, ", ", num_heads, ", ", head_dim, "], got ",
                out.shape_string());
  KVCACHE_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, where,
                ": expected keys and values with contiguous head_dim, got ", keys.describe(), " and ",
                values.describe());
  KVCACHE_CHECK(static_cast<std::int64_t>(cache_position.size()) == q_len, where, ": expected ", q_len,
                " cache positions (one per query), got ", cache_position.size());
  const std::vector<std::uint8_t> mask = mask_to_bytes(attention_mask, batch, kv_len, where);
  if (batch == 0 || q_len == 0) return;

  Problem p{batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, num_heads / num_kv_heads, kv_offset,
            scale, cache_position.data(), mask.empty() ? nullptr : mask.data()};
  switch (query.dtype()) {
    case DType::kFloat32:
      return run<float>(p, query, keys, values, out);
    case DType::kFloat16:
      return run<float16>(p, query, keys, values, out);
    case DType::kBFloat16:
      return run<bfloat16>(p, query, keys, values, out);
    default:
      break;
  }
}

}  // namespace kvcache::cpu
