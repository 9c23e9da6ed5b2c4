// CPU attention: softmax(Q·Kᵀ·scale + mask)·V for every (batch row, kv head) group, with the
// num_heads / num_kv_heads query heads that share a kv head processed together so each key and
// value row is read from memory once per step. Scores, softmax and accumulation are float32.
//
// Two paths, chosen by how many query rows share a kv head in one call:
// - Decode (few rows): a streaming kernel. Each key row is read once and dotted with every query
//   row while it sits in L1; each value row is read once and added into every output row. No
//   packing, so a step runs near memory bandwidth. The key range is split across threads when
//   batch × num_kv_heads alone would leave a core idle; the pieces keep their own max and sum and
//   are merged exactly as online softmax does (flash-decoding).
// - Prefill (many rows): Eigen GEMMs over chunks of kKvChunk keys, whose packing cost is repaid by
//   the many query rows. Query blocks keep a block's scores within kScoreBudget floats, and keys
//   past a block's last visible slot (the causal frontier) are never touched.
// 16-bit keys and values are widened chunk by chunk into a per-thread float buffer.
//
// Both paths read keys and values through a source (DenseKV: tensors; QuantKV: a quantized
// cache layer's blocks, then its full-precision residual), which hands over a chunk of rows as
// float32: in place for float32 tensors, else widened or dequantized (16 codes to a vector:
// unpacked, converted, scaled and offset in registers) into the per-thread buffer. So
// attention_quantized runs the same masking, GQA grouping, window, splitting and merging as
// attention, over values equal to the dequantized ones, and never materializes the history.

// g++ 12 reports false -Wmaybe-uninitialized positives inside its own AVX-512 intrinsic headers
// when Eigen's GEMM kernels are inlined here with -march=native.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../../parallel_errors.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/attention_shapes.hpp"
#include "kvcache/backend/cpu.hpp"
#include "simd.hpp"

namespace kvcache::cpu {
namespace {

using namespace simd;
using ::kvcache::detail::ParallelErrors;

constexpr std::int64_t kKvChunk = 256;          // keys per GEMM chunk (prefill path)
constexpr std::int64_t kStreamChunk = 64;       // keys widened at once (decode path, 16-bit)
constexpr std::int64_t kScoreBudget = 1 << 19;  // floats per score block (2 MiB)
constexpr std::int64_t kMaxStreamRows = 16;     // query rows per kv head served by the decode path
constexpr std::int64_t kPieceKeys = 512;        // keys per piece of the decode path
constexpr std::int64_t kMaxPieces = 1024;       // pieces per (batch row, kv head), at most
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;

struct Problem {
  std::int64_t batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, n_rep;
  std::int64_t kv_offset;
  std::int64_t window;  // sliding window W (key slot > query slot - W), 0 = full attention
  float scale;
  const std::int64_t* cache_position;
  const std::uint8_t* mask;  // [batch, kv_len], 1 = attend; null = no padding
};

// Per-thread buffers, reused across work items.
struct Scratch {
  RowMatrix q_rows, scores, acc;
  std::vector<float> widened;
  std::vector<float> meta;  // a per-channel key block's scales and mins as float (quantized path)
};

template <class T>
void widen_rows(const T* src, std::int64_t row_stride, std::int64_t rows, std::int64_t cols,
                float* dst) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * row_stride;
    float* o = dst + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) o[c] = to_float(in[c]);
  }
}

// Rows [start, start + rows) of a [seq, head_dim] slice (head_dim contiguous) as float32: in place
// for float32, widened into `widened` otherwise. Returns the first row and the row stride.
template <class T>
std::pair<const float*, std::int64_t> rows_as_float(const T* base, std::int64_t row_stride,
                                                    std::int64_t start, std::int64_t rows,
                                                    std::int64_t cols,
                                                    std::vector<float>& widened) {
  if constexpr (std::is_same_v<T, float>) {
    return {base + start * row_stride, row_stride};
  } else {
    widened.resize(static_cast<std::size_t>(rows * cols));
    widen_rows(base + start * row_stride, row_stride, rows, cols, widened.data());
    return {widened.data(), cols};
  }
}

// Where the kernels read keys and values: rows(key, b, kvh, start, n, w) gives key (or value)
// slots [start, start + n) of head (b, kvh) as float32 rows (first row, row stride), in place or
// in w.widened. DenseKV reads [batch, num_kv_heads, kv_len, head_dim] tensors of T.
template <class T>
struct DenseKV {
  const Tensor& keys;
  const Tensor& values;
  std::pair<const float*, std::int64_t> rows(bool key, std::int64_t b, std::int64_t kvh,
                                             std::int64_t start, std::int64_t n, std::int64_t d,
                                             Scratch& w) const {
    const Tensor& t = key ? keys : values;
    const T* base = t.data_as<T>() + b * t.stride(0) + kvh * t.stride(1);
    return rows_as_float(base, t.stride(2), start, n, d, w.widened);
  }
};

// Q rows of kv head `kvh` for queries [q0, q1), widened and pre-scaled: row g * (q1 - q0) + (i -
// q0) holds query head kvh * n_rep + g at query i.
template <class T>
void load_queries(const Problem& p, const Tensor& query, std::int64_t b, std::int64_t kvh,
                  std::int64_t q0, std::int64_t q1, RowMatrix& q_rows) {
  const std::int64_t d = p.head_dim, qn = q1 - q0;
  q_rows.resize(p.n_rep * qn, d);
  const T* qbase = query.data_as<T>();
  for (std::int64_t g = 0; g < p.n_rep; ++g) {
    const std::int64_t h = kvh * p.n_rep + g;
    for (std::int64_t i = q0; i < q1; ++i) {
      const T* src = qbase + b * query.stride(0) + h * query.stride(1) + i * query.stride(2);
      float* dst = q_rows.data() + (g * qn + (i - q0)) * d;
      for (std::int64_t c = 0; c < d; ++c) dst[c] = to_float(src[c * query.stride(3)]) * p.scale;
    }
  }
}

// Last key (exclusive) that any of queries [q0, q1) can see.
std::int64_t causal_end(const Problem& p, std::int64_t q0, std::int64_t q1) {
  std::int64_t max_pos = p.cache_position[q0];
  for (std::int64_t i = q0; i < q1; ++i) max_pos = std::max(max_pos, p.cache_position[i]);
  return std::clamp<std::int64_t>(max_pos - p.kv_offset + 1, 0, p.kv_len);
}

// First key that any of queries [q0, q1) can see under the sliding window (0 without one), at
// most `end`: keys before it are never read.
std::int64_t window_begin(const Problem& p, std::int64_t q0, std::int64_t q1, std::int64_t end) {
  if (p.window == 0) return 0;
  std::int64_t min_pos = p.cache_position[q0];
  for (std::int64_t i = q0; i < q1; ++i) min_pos = std::min(min_pos, p.cache_position[i]);
  return std::clamp<std::int64_t>(min_pos - p.window + 1 - p.kv_offset, 0, end);
}

struct RowStats {
  float max = kNegInf;  // -inf when no key in the range is visible
  float sum = 0.0f;
};

// Scores s[0, n) of keys j0 + [0, n) for query i become exp(s - max) where visible and 0 elsewhere
// (unnormalised). Visible: the key's slot is <= cache_position[i], it is not padding, and with a
// sliding window it is > cache_position[i] - window. Without a window visible_begin is 0 and
// every operation is the one full attention always ran (bit-identical results).
RowStats masked_exp(const Problem& p, std::int64_t b, std::int64_t i, std::int64_t j0,
                    std::int64_t n, float* s) {
  const std::int64_t visible_end =
      std::clamp<std::int64_t>(p.cache_position[i] - p.kv_offset + 1 - j0, 0, n);
  const std::int64_t visible_begin =
      p.window == 0 ? 0
                    : std::clamp<std::int64_t>(
                          p.cache_position[i] - p.window + 1 - p.kv_offset - j0, 0, visible_end);
  const std::int64_t visible = visible_end - visible_begin;
  const std::uint8_t* pad = p.mask ? p.mask + b * p.kv_len + j0 : nullptr;
  Eigen::Map<Eigen::ArrayXf> row(s, n);
  row.tail(n - visible_end) = kNegInf;
  row.head(visible_begin) = kNegInf;
  if (pad) {
    for (std::int64_t j = visible_begin; j < visible_end; ++j) s[j] = pad[j] ? s[j] : kNegInf;
  }
  RowStats stats;
  if (visible == 0) {
    row.setZero();
    return stats;
  }
  stats.max = row.segment(visible_begin, visible).maxCoeff();
  if (stats.max == kNegInf) {
    row.setZero();
    return stats;
  }
  // Eigen's vectorised exp
  row.segment(visible_begin, visible) = (row.segment(visible_begin, visible) - stats.max).exp();
  // Masked entries: exp(-inf) is clamped to a tiny number by the vectorised exp; make them 0.
  row.tail(n - visible_end) = 0.0f;
  row.head(visible_begin) = 0.0f;
  if (pad) {
    for (std::int64_t j = visible_begin; j < visible_end; ++j) s[j] = pad[j] ? s[j] : 0.0f;
  }
  stats.sum = row.segment(visible_begin, visible).sum();
  return stats;
}

template <class T>
void store_row(const float* src, float factor, std::int64_t d, T* dst, std::int64_t stride) {
  for (std::int64_t c = 0; c < d; ++c) dst[c * stride] = from_float<T>(src[c] * factor);
}

// --- decode path -------------------------------------------------------------------------------

// Scores of R query rows against keys [0, n): scores[r * ld + j] = q[r] · k[j]. head_dim % 16 == 0.
// Scores of R query rows against keys [0, n): scores[r * ld + j] = q[r] · k[j]. head_dim % 16 == 0.
// Two keys per iteration share the query loads.
template <int R>
void score_rows(const float* q, std::int64_t q_stride, const float* k, std::int64_t k_stride,
                std::int64_t n, std::int64_t d, float* scores, std::int64_t ld) {
  auto finish = [&](const Vec16* acc, std::int64_t j) {
    if constexpr (R == 4) {
      float four[4];
      sum16x4(acc[0], acc[1], acc[2], acc[3], four);
      for (int r = 0; r < 4; ++r) scores[r * ld + j] = four[r];
    } else {
      for (int r = 0; r < R; ++r) scores[r * ld + j] = sum16(acc[r]);
    }
  };
  std::int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const float* k0 = k + j * k_stride;
    const float* k1 = k0 + k_stride;
    prefetch_row(k0 + kPrefetchRows * k_stride, d);
    prefetch_row(k1 + kPrefetchRows * k_stride, d);
    Vec16 acc0[R] = {}, acc1[R] = {};
    for (std::int64_t c = 0; c < d; c += kLanes) {
      const Vec16 kv0 = load16(k0 + c), kv1 = load16(k1 + c);
      for (int r = 0; r < R; ++r) {
        const Vec16 qv = load16(q + r * q_stride + c);
        acc0[r] += qv * kv0;
        acc1[r] += qv * kv1;
      }
    }
    finish(acc0, j);
    finish(acc1, j + 1);
  }
  for (; j < n; ++j) {
    const float* krow = k + j * k_stride;
    Vec16 acc[R] = {};
    for (std::int64_t c = 0; c < d; c += kLanes) {
      const Vec16 kv = load16(krow + c);
      for (int r = 0; r < R; ++r) acc[r] += load16(q + r * q_stride + c) * kv;
    }
    finish(acc, j);
  }
}

// out[r] += Σ_j w[r * ld + j] · v[j] for R rows, 64 columns at a time so the R × 4 accumulators
// stay in registers while the value rows stream past. head_dim % 16 == 0.
template <int R>
void accumulate_rows(const float* w, std::int64_t ld, const float* v, std::int64_t v_stride,
                     std::int64_t n, std::int64_t d, float* out, std::int64_t out_stride) {
  for (std::int64_t c0 = 0; c0 < d; c0 += 4 * kLanes) {
    const int blocks = static_cast<int>(std::min<std::int64_t>(4, (d - c0) / kLanes));
    Vec16 acc[R][4] = {};
    for (std::int64_t j = 0; j < n; ++j) {
      const float* vrow = v + j * v_stride + c0;
      prefetch_row(vrow + kPrefetchRows * v_stride, std::min<std::int64_t>(4 * kLanes, d - c0));
      Vec16 vv[4];
      for (int b = 0; b < blocks; ++b) vv[b] = load16(vrow + b * kLanes);
      for (int r = 0; r < R; ++r) {
        const float weight = w[r * ld + j];
        for (int b = 0; b < blocks; ++b) acc[r][b] += weight * vv[b];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < blocks; ++b) {
        float* o = out + r * out_stride + c0 + b * kLanes;
        store16(o, load16(o) + acc[r][b]);
      }
  }
}

// Scalar fallbacks for head_dim not a multiple of 16.
void score_rows_any(const float* q, std::int64_t q_stride, int rows, const float* k,
                    std::int64_t k_stride, std::int64_t n, std::int64_t d, float* scores,
                    std::int64_t ld) {
  for (std::int64_t j = 0; j < n; ++j)
    for (int r = 0; r < rows; ++r) {
      float s = 0;
      for (std::int64_t c = 0; c < d; ++c) s += q[r * q_stride + c] * k[j * k_stride + c];
      scores[r * ld + j] = s;
    }
}

void accumulate_rows_any(const float* w, std::int64_t ld, int rows, const float* v,
                         std::int64_t v_stride, std::int64_t n, std::int64_t d, float* out,
                         std::int64_t out_stride) {
  for (std::int64_t j = 0; j < n; ++j)
    for (int r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < d; ++c)
        out[r * out_stride + c] += w[r * ld + j] * v[j * v_stride + c];
}

// Calls f(std::integral_constant<int, R>, first_row) for groups of R <= 4 rows, so each group
// runs a register-blocked kernel compiled for its row count.
template <class F>
void for_row_groups(std::int64_t rows, F&& f) {
  for (std::int64_t r = 0; r < rows; r += 4) {
    switch (std::min<std::int64_t>(4, rows - r)) {
      case 4:
        f(std::integral_constant<int, 4>{}, r);
        break;
      case 3:
        f(std::integral_constant<int, 3>{}, r);
        break;
      case 2:
        f(std::integral_constant<int, 2>{}, r);
        break;
      default:
        f(std::integral_constant<int, 1>{}, r);
        break;
    }
  }
}

void score_all(const float* q, std::int64_t q_stride, std::int64_t rows, const float* k,
               std::int64_t k_stride, std::int64_t n, std::int64_t d, float* scores,
               std::int64_t ld) {
  for_row_groups(rows, [&](auto group, std::int64_t r) {
    if (d % kLanes == 0) {
      score_rows<group()>(q + r * q_stride, q_stride, k, k_stride, n, d, scores + r * ld, ld);
    } else {
      score_rows_any(q + r * q_stride, q_stride, group(), k, k_stride, n, d, scores + r * ld, ld);
    }
  });
}

void accumulate_all(const float* w, std::int64_t ld, std::int64_t rows, const float* v,
                    std::int64_t v_stride, std::int64_t n, std::int64_t d, float* out,
                    std::int64_t out_stride) {
  for_row_groups(rows, [&](auto group, std::int64_t r) {
    if (d % kLanes == 0) {
      accumulate_rows<group()>(w + r * ld, ld, v, v_stride, n, d, out + r * out_stride, out_stride);
    } else {
      accumulate_rows_any(w + r * ld, ld, group(), v, v_stride, n, d, out + r * out_stride,
                          out_stride);
    }
  });
}

inline void axpy(float w, const float* x, float* y, std::int64_t d) {
  for (std::int64_t c = 0; c < d; ++c) y[c] += w * x[c];
}

// One piece of the decode path: every query row of kv head `kvh` against keys [j0, j1). Writes
// per row: max, sum, and the unnormalised sum of exp-weighted values, to partial[r * (d + 2)].
template <class T, class Src>
void decode_piece(const Problem& p, const Tensor& query, const Src& src, std::int64_t b,
                  std::int64_t kvh, std::int64_t j0, std::int64_t j1, float* partial, Scratch& w) {
  const std::int64_t d = p.head_dim, rows = p.n_rep * p.q_len,
                     n = std::max<std::int64_t>(j1 - j0, 0);
  load_queries<T>(p, query, b, kvh, 0, p.q_len, w.q_rows);
  w.scores.resize(rows, std::max<std::int64_t>(n, 1));
  const std::int64_t ld = w.scores.cols();

  // Scores: each key row is read once and used by every query row.
  for (std::int64_t c0 = 0; c0 < n; c0 += kStreamChunk) {
    const std::int64_t cn = std::min(kStreamChunk, n - c0);
    auto [k, k_stride] = src.rows(true, b, kvh, j0 + c0, cn, d, w);
    score_all(w.q_rows.data(), d, rows, k, k_stride, cn, d, w.scores.data() + c0, ld);
  }

  for (std::int64_t r = 0; r < rows; ++r) {
    const RowStats stats = masked_exp(p, b, r % p.q_len, j0, n, w.scores.data() + r * ld);
    partial[r * (d + 2)] = stats.max;
    partial[r * (d + 2) + 1] = stats.sum;
    std::fill_n(partial + r * (d + 2) + 2, d, 0.0f);
  }

  // Values: each value row is read once and added into every output row.
  for (std::int64_t c0 = 0; c0 < n; c0 += kStreamChunk) {
    const std::int64_t cn = std::min(kStreamChunk, n - c0);
    auto [v, v_stride] = src.rows(false, b, kvh, j0 + c0, cn, d, w);
    accumulate_all(w.scores.data() + c0, ld, rows, v, v_stride, cn, d, partial + 2, d + 2);
  }
}

template <class T, class Src>
void run_decode(const Problem& p, const Tensor& query, const Src& src, const Tensor& out) {
  const std::int64_t d = p.head_dim, rows = p.n_rep * p.q_len;
  const std::int64_t groups = p.batch * p.num_kv_heads;
  const std::int64_t kv_end = causal_end(p, 0, p.q_len);
  const std::int64_t kv_begin = window_begin(p, 0, p.q_len, kv_end);  // 0 without a window
  const std::int64_t kv_span = kv_end - kv_begin;
  // Pieces of about kPieceKeys keys: a piece's keys and then its values are read close together
  // in time (two streams in flight per core instead of one), and there are enough pieces for
  // every thread whatever batch × num_kv_heads is. Each piece leaves rows × (d + 2) floats.
  const std::int64_t splits = std::clamp<std::int64_t>(kv_span / kPieceKeys, 1, kMaxPieces);
  const std::int64_t piece = (kv_span + splits - 1) / splits;
  const std::int64_t row_floats = d + 2;
  // Reused across calls: a decode step should not pay for zeroing a fresh buffer. Every field a
  // piece owns is written by decode_piece before the merge reads it.
  thread_local std::vector<float> partials;
  // (thread_local to the caller; the OpenMP workers reach it through this pointer.)
  partials.resize(
      std::max(partials.size(), static_cast<std::size_t>(groups * splits * rows * row_floats)));
  float* const part_base = partials.data();

  // A std::bad_alloc from a scratch buffer must not leave the region (std::terminate): each
  // piece runs through `errors`, which the caller's thread rethrows after the region.
  ParallelErrors errors;
#pragma omp parallel
  {
    Scratch w;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < groups * splits; ++item) {
      errors.run([&] {
        const std::int64_t s = item % splits, g = item / splits;
        const std::int64_t j0 = kv_begin + std::min(s * piece, kv_span);
        const std::int64_t j1 = std::min(j0 + piece, kv_end);
        decode_piece<T>(p, query, src, g / p.num_kv_heads, g % p.num_kv_heads, j0, j1,
                        part_base + item * rows * row_floats, w);
      });
    }
    // Merge the pieces of each row: rescale each to the global max, add, normalise. (A failed
    // piece leaves the merge's loop running empty: every thread still meets its barrier.)
    std::vector<float> acc;
    errors.run([&] { acc.resize(static_cast<std::size_t>(d)); });
#pragma omp for schedule(static)
    for (std::int64_t gr = 0; gr < groups * rows; ++gr) {
      errors.run([&] {
        const std::int64_t g = gr / rows, r = gr % rows;
        const std::int64_t b = g / p.num_kv_heads, kvh = g % p.num_kv_heads;
        const std::int64_t h = kvh * p.n_rep + r / p.q_len, i = r % p.q_len;
        float global_max = kNegInf;
        for (std::int64_t s = 0; s < splits; ++s)
          global_max = std::max(global_max, part_base[((g * splits + s) * rows + r) * row_floats]);
        T* dst = out.data_as<T>() + b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
        std::fill(acc.begin(), acc.end(), 0.0f);
        float total = 0.0f;
        if (global_max != kNegInf) {
          for (std::int64_t s = 0; s < splits; ++s) {
            const float* part = part_base + ((g * splits + s) * rows + r) * row_floats;
            if (part[0] == kNegInf) continue;
            const float factor = std::exp(part[0] - global_max);
            total += part[1] * factor;
            axpy(factor, part + 2, acc.data(), d);
          }
        }
        // A row that sees no key at all gives zeros (left padding), never NaN.
        store_row(acc.data(), total > 0.0f ? 1.0f / total : 0.0f, d, dst, out.stride(3));
      });
    }
  }
  errors.rethrow_if_failed();
}

// --- prefill path ------------------------------------------------------------------------------

template <class T, class Src>
void prefill_block(const Problem& p, const Tensor& query, const Src& src, const Tensor& out,
                   std::int64_t b, std::int64_t kvh, std::int64_t q0, std::int64_t q1, Scratch& w) {
  const std::int64_t d = p.head_dim, qn = q1 - q0, rows = p.n_rep * qn;
  const std::int64_t kv_end = causal_end(p, q0, q1);
  // Keys before the block's first visible slot under the window are skipped (0 without one).
  const std::int64_t kv_begin = window_begin(p, q0, q1, kv_end);
  const std::int64_t span = kv_end - kv_begin;
  load_queries<T>(p, query, b, kvh, q0, q1, w.q_rows);
  w.scores.resize(rows, std::max<std::int64_t>(span, 1));
  for (std::int64_t c0 = 0; c0 < span; c0 += kKvChunk) {
    const std::int64_t cn = std::min(kKvChunk, span - c0);
    auto [k, k_stride] = src.rows(true, b, kvh, kv_begin + c0, cn, d, w);
    w.scores.middleCols(c0, cn).noalias() =
        w.q_rows * ConstRowMap(k, cn, d, Eigen::OuterStride<>(k_stride)).transpose();
  }
  std::vector<float> inv_sum(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    const RowStats stats =
        masked_exp(p, b, q0 + r % qn, kv_begin, span, w.scores.data() + r * w.scores.cols());
    inv_sum[static_cast<std::size_t>(r)] = stats.sum > 0.0f ? 1.0f / stats.sum : 0.0f;
  }
  w.acc.setZero(rows, d);
  for (std::int64_t c0 = 0; c0 < span; c0 += kKvChunk) {
    const std::int64_t cn = std::min(kKvChunk, span - c0);
    auto [v, v_stride] = src.rows(false, b, kvh, kv_begin + c0, cn, d, w);
    w.acc.noalias() +=
        w.scores.middleCols(c0, cn) * ConstRowMap(v, cn, d, Eigen::OuterStride<>(v_stride));
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t h = kvh * p.n_rep + r / qn, i = q0 + r % qn;
    T* dst = out.data_as<T>() + b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
    store_row(w.acc.data() + r * d, inv_sum[static_cast<std::size_t>(r)], d, dst, out.stride(3));
  }
}

template <class T, class Src>
void run_prefill(const Problem& p, const Tensor& query, const Src& src, const Tensor& out) {
  // Query block: as many queries as keep n_rep × block × kv_len scores within budget.
  const std::int64_t per_query = p.n_rep * std::max<std::int64_t>(p.kv_len, 1);
  const std::int64_t block = std::clamp<std::int64_t>(kScoreBudget / per_query, 1, p.q_len);
  const std::int64_t q_blocks = (p.q_len + block - 1) / block;
  const std::int64_t items = p.batch * p.num_kv_heads * q_blocks;
  ParallelErrors errors;  // as in run_decode: a scratch allocation fails without terminating
#pragma omp parallel
  {
    Scratch w;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < items; ++item) {
      errors.run([&] {
        const std::int64_t qb = item % q_blocks;
        const std::int64_t kvh = (item / q_blocks) % p.num_kv_heads;
        const std::int64_t b = item / (q_blocks * p.num_kv_heads);
        const std::int64_t q0 = qb * block;
        prefill_block<T>(p, query, src, out, b, kvh, q0, std::min(p.q_len, q0 + block), w);
      });
    }
  }
  errors.rethrow_if_failed();
}

template <class T, class Src>
void run(const Problem& p, const Tensor& query, const Src& src, const Tensor& out) {
  if (p.n_rep * p.q_len <= kMaxStreamRows) {
    run_decode<T>(p, query, src, out);
  } else {
    run_prefill<T>(p, query, src, out);
  }
}

// --- quantized layers --------------------------------------------------------------------------
// QuantKV reads a QuantizedKVView's blocks for slots [0, tokens) and DenseKV tensors after them.
// A chunk of keys is dequantized into w.widened (kStreamChunk or kKvChunk rows: L1 / L2 sized),
// sixteen codes at a time: the bytes holding them are spread one to a 32-bit lane, shifted and
// masked, converted and scaled (x = code * scale + min) in registers.

template <int NB>
inline float code_at(const unsigned char* codes, std::int64_t idx) {
  constexpr std::int64_t per = 8 / NB;
  return static_cast<float>((codes[idx / per] >> ((idx % per) * NB)) & ((1u << NB) - 1u));
}

// Codes idx .. idx + 15 (idx a multiple of 16, so they start on a byte) as floats. With AVX-512:
// the 2 * NB bytes are repeated 8 / NB times each (unpack), widened one to a 32-bit lane, shifted
// lane by lane to their code and masked (vpsrlvd, vpandd), converted (vcvtdq2ps).
template <int NB>
inline Vec16 unpack16(const unsigned char* codes, std::int64_t idx) {
  const unsigned char* p = codes + idx * NB / 8;
#ifdef __AVX512F__
  __m128i bytes;
  if constexpr (NB == 8) {
    bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else if constexpr (NB == 4) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    bytes = _mm_unpacklo_epi8(b, b);
  } else {
    std::int32_t word;
    std::memcpy(&word, p, sizeof(word));
    const __m128i b = _mm_cvtsi32_si128(word);
    const __m128i two = _mm_unpacklo_epi8(b, b);
    bytes = _mm_unpacklo_epi16(two, two);
  }
  __m512i w = _mm512_cvtepu8_epi32(bytes);
  if constexpr (NB == 4) {
    w = _mm512_and_si512(
        _mm512_srlv_epi32(w, _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0)),
        _mm512_set1_epi32(0xf));
  } else if constexpr (NB == 2) {
    w = _mm512_and_si512(
        _mm512_srlv_epi32(w, _mm512_set_epi32(6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0)),
        _mm512_set1_epi32(0x3));
  }
  return reinterpret_cast<Vec16>(_mm512_cvtepi32_ps(w));
#else
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = code_at<NB>(p, i);
  return load16(f);
#endif
}

// One token record (head_dim codes in groups of token_group channels) into dst[0, d).
template <int NB>
void dequant_token(const QuantizedKVView& q, const unsigned char* rec, float* dst) {
  const std::int64_t d = q.head_dim, g = q.token_group, groups = d / g;
  const std::size_t mb = kvcache::detail::quant_meta_bytes(q.scale_dtype);
  const unsigned char* codes = rec + static_cast<std::size_t>(groups) * mb;
  for (std::int64_t grp = 0; grp < groups; ++grp) {
    const auto [sc, mn] =
        kvcache::detail::quant_meta(rec + static_cast<std::size_t>(grp) * mb, q.scale_dtype);
    const std::int64_t c0 = grp * g, c1 = c0 + g;
    std::int64_t c = c0;
    if (g % kLanes == 0) {
      const Vec16 vs = Vec16{} + sc, vm = Vec16{} + mn;
      for (; c < c1; c += kLanes) store16(dst + c, unpack16<NB>(codes, c) * vs + vm);
    }
    for (; c < c1; ++c) dst[c] = code_at<NB>(codes, c) * sc + mn;
  }
}

// Tokens [i0, i1) of a per-channel key block into dst rows of d floats.
template <int NB>
void dequant_channel_block(const QuantizedKVView& q, const unsigned char* rec, std::int64_t i0,
                           std::int64_t i1, float* dst, std::vector<float>& meta) {
  const std::int64_t d = q.head_dim;
  const std::size_t mb = kvcache::detail::quant_meta_bytes(q.scale_dtype);
  meta.resize(static_cast<std::size_t>(2 * d));
  float* sc = meta.data();
  float* mn = sc + d;
  std::int64_t c = 0;
#ifdef __AVX512F__
  if (q.scale_dtype == DType::kFloat16) {
    // Eight (scale, min) pairs at a time: widened, then split into the two halves.
    const __m512i split = _mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0);
    for (; c + 8 <= d; c += 8) {
      const __m512 pairs = _mm512_cvtph_ps(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(rec + static_cast<std::size_t>(c) * mb)));
      const __m512 parted = _mm512_permutexvar_ps(split, pairs);
      _mm256_storeu_ps(sc + c, _mm512_castps512_ps256(parted));
      _mm256_storeu_ps(mn + c,
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(parted), 1)));
    }
  }
#endif
  for (; c < d; ++c)
    std::tie(sc[c], mn[c]) =
        kvcache::detail::quant_meta(rec + static_cast<std::size_t>(c) * mb, q.scale_dtype);
  const unsigned char* codes = rec + static_cast<std::size_t>(d) * mb;
  for (std::int64_t i = i0; i < i1; ++i) {
    float* o = dst + (i - i0) * d;
    c = 0;
    if (d % kLanes == 0) {
      for (; c < d; c += kLanes)
        store16(o + c, unpack16<NB>(codes, i * d + c) * load16(sc + c) + load16(mn + c));
    }
    for (; c < d; ++c) o[c] = code_at<NB>(codes, i * d + c) * sc[c] + mn[c];
  }
}

template <class T>
struct QuantKV {
  const QuantizedKVView& q;
  DenseKV<T> tail;  // slots [q.tokens, kv_len)

  std::pair<const float*, std::int64_t> rows(bool key, std::int64_t b, std::int64_t kvh,
                                             std::int64_t start, std::int64_t n, std::int64_t d,
                                             Scratch& w) const {
    if (start >= q.tokens) return tail.rows(key, b, kvh, start - q.tokens, n, d, w);
    switch (q.nbits) {
      case 8:
        return dequant_rows<8>(key, b, kvh, start, n, d, w);
      case 4:
        return dequant_rows<4>(key, b, kvh, start, n, d, w);
      default:
        return dequant_rows<2>(key, b, kvh, start, n, d, w);
    }
  }

  template <int NB>
  std::pair<const float*, std::int64_t> dequant_rows(bool key, std::int64_t b, std::int64_t kvh,
                                                     std::int64_t start, std::int64_t n,
                                                     std::int64_t d, Scratch& w) const {
    w.widened.resize(static_cast<std::size_t>(n * d));
    float* dst = w.widened.data();
    const std::int64_t end = start + n, qend = std::min(end, q.tokens);
    const unsigned char* row = (key ? q.keys : q.values)[static_cast<std::size_t>(b)];
    const std::size_t head_bytes = key ? q.key_head_bytes : q.value_head_bytes;
    for (std::int64_t t = start; t < qend;) {
      const std::int64_t blk = t / q.chunk, i0 = t % q.chunk;
      const std::int64_t i1 = std::min(q.chunk, i0 + (qend - t));
      const unsigned char* rec = row + static_cast<std::size_t>(blk * q.heads + kvh) * head_bytes;
      float* o = dst + (t - start) * d;
      if (key && q.keys_per_channel) {
        dequant_channel_block<NB>(q, rec, i0, i1, o, w.meta);
      } else {
        for (std::int64_t i = i0; i < i1; ++i)
          dequant_token<NB>(q, rec + static_cast<std::size_t>(i) * q.token_record,
                            o + (i - i0) * d);
      }
      t += i1 - i0;
    }
    if (qend < end) {  // the chunk runs on into the full-precision tokens
      const Tensor& t = key ? tail.keys : tail.values;
      const T* base = t.data_as<T>() + b * t.stride(0) + kvh * t.stride(1);
      widen_rows(base, t.stride(2), end - qend, d, dst + (qend - start) * d);
    }
    return {dst, d};
  }
};

}  // namespace

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) {
#ifdef _OPENMP
  KVCACHE_CHECK(n >= 1, "cpu::set_num_threads: expected at least 1 thread, got ", n);
  omp_set_num_threads(n);
#else
  KVCACHE_CHECK(n == 1, "cpu::set_num_threads: this build has no OpenMP: expected 1 thread, got ",
                n);
#endif
}

void attention(const Tensor& query, const Tensor& keys, const Tensor& values,
               const Tensor& attention_mask, std::span<const std::int64_t> cache_position,
               std::int64_t kv_offset, float scale, const Tensor& out,
               std::optional<std::int64_t> sliding_window) {
  KVCACHE_CHECK(query.defined() && query.rank() == 4 && keys.defined() && keys.rank() == 4,
                "cpu::attention: expected rank-4 query and keys, got ", query.describe(), " and ",
                keys.describe());
  const std::vector<std::uint8_t> mask =
      mask_to_bytes(attention_mask, query.size(0), keys.size(2), "cpu::attention");
  attention(query, keys, values, mask, cache_position, kv_offset, scale, out, sliding_window);
}

void attention(const Tensor& query, const Tensor& keys, const Tensor& values,
               std::span<const std::uint8_t> mask, std::span<const std::int64_t> cache_position,
               std::int64_t kv_offset, float scale, const Tensor& out,
               std::optional<std::int64_t> sliding_window) {
  const char* where = "cpu::attention";
  const detail::AttentionShape shape =
      detail::check_attention_operands(query, keys, values, out, Device::kCpu, where);
  const std::int64_t batch = shape.batch, num_heads = shape.num_heads, q_len = shape.q_len,
                     head_dim = shape.head_dim, num_kv_heads = shape.num_kv_heads,
                     kv_len = shape.kv_len;
  KVCACHE_CHECK(static_cast<std::int64_t>(cache_position.size()) == q_len, where, ": expected ",
                q_len, " cache positions (one per query), got ", cache_position.size());
  KVCACHE_CHECK(mask.empty() || static_cast<std::int64_t>(mask.size()) == batch * kv_len, where,
                ": expected a padding mask of [batch, kv_len] = ", batch * kv_len, " bytes, got ",
                mask.size());
  KVCACHE_CHECK(!sliding_window || *sliding_window >= 1, where,
                ": expected a sliding window >= 1 (or none), got ", sliding_window.value_or(0));
  if (batch == 0 || q_len == 0) return;

  Problem p{batch,
            num_heads,
            num_kv_heads,
            q_len,
            kv_len,
            head_dim,
            num_heads / num_kv_heads,
            kv_offset,
            sliding_window.value_or(0),
            scale,
            cache_position.data(),
            mask.empty() ? nullptr : mask.data()};
  switch (query.dtype()) {
    case DType::kFloat32:
      return run<float>(p, query, DenseKV<float>{keys, values}, out);
    case DType::kFloat16:
      return run<float16>(p, query, DenseKV<float16>{keys, values}, out);
    case DType::kBFloat16:
      return run<bfloat16>(p, query, DenseKV<bfloat16>{keys, values}, out);
    default:
      break;
  }
}

}  // namespace kvcache::cpu

namespace kvcache::cpu {

void attention_quantized(const Tensor& query, const QuantizedKVView& blocks, const Tensor& keys,
                         const Tensor& values, std::span<const std::uint8_t> mask,
                         std::span<const std::int64_t> cache_position, std::int64_t kv_offset,
                         float scale, const Tensor& out,
                         std::optional<std::int64_t> sliding_window) {
  const char* where = "cpu::attention_quantized";
  const detail::AttentionShape shape =
      detail::check_attention_operands(query, keys, values, out, Device::kCpu, where);
  const std::int64_t batch = shape.batch, head_dim = shape.head_dim;
  const QuantizedKVView& q = blocks;
  KVCACHE_CHECK(q.nbits == 2 || q.nbits == 4 || q.nbits == 8, where,
                ": expected 2, 4 or 8 bits, got ", q.nbits);
  KVCACHE_CHECK(q.scale_dtype == DType::kFloat16 || q.scale_dtype == DType::kFloat32, where,
                ": expected float16 or float32 scales, got ", dtype_name(q.scale_dtype));
  KVCACHE_CHECK(q.batch == batch && q.heads == shape.num_kv_heads && q.head_dim == head_dim &&
                    static_cast<std::int64_t>(q.keys.size()) == batch &&
                    static_cast<std::int64_t>(q.values.size()) == batch,
                where, ": expected blocks of [", batch, ", ", shape.num_kv_heads, ", *, ", head_dim,
                "] (the full-precision keys' layout), got [", q.batch, ", ", q.heads, ", ",
                q.tokens, ", ", q.head_dim, "] with ", q.keys.size(), " rows");
  KVCACHE_CHECK(q.chunk >= 1 && q.tokens >= 0 && q.tokens % q.chunk == 0 && q.token_group >= 1 &&
                    head_dim % q.token_group == 0 && (head_dim * q.nbits) % 8 == 0,
                where, ": inconsistent block geometry (chunk ", q.chunk, ", tokens ", q.tokens,
                ", token_group ", q.token_group, ", head_dim ", head_dim, ")");
  KVCACHE_CHECK(q.tokens <= std::numeric_limits<std::int64_t>::max() - shape.kv_len, where, ": ",
                q.tokens, " quantized + ", shape.kv_len, " key slots overflow");
  const std::int64_t kv_len = q.tokens + shape.kv_len;
  KVCACHE_CHECK(static_cast<std::int64_t>(cache_position.size()) == shape.q_len, where,
                ": expected ", shape.q_len, " cache positions (one per query), got ",
                cache_position.size());
  KVCACHE_CHECK(mask.empty() || static_cast<std::int64_t>(mask.size()) == batch * kv_len, where,
                ": expected a padding mask of [batch, kv_len] = ", batch * kv_len, " bytes, got ",
                mask.size());
  KVCACHE_CHECK(!sliding_window || *sliding_window >= 1, where,
                ": expected a sliding window >= 1 (or none), got ", sliding_window.value_or(0));
  if (batch == 0 || shape.q_len == 0) return;
  Problem p{batch,
            shape.num_heads,
            shape.num_kv_heads,
            shape.q_len,
            kv_len,
            head_dim,
            shape.num_heads / shape.num_kv_heads,
            kv_offset,
            sliding_window.value_or(0),
            scale,
            cache_position.data(),
            mask.empty() ? nullptr : mask.data()};
  switch (query.dtype()) {
    case DType::kFloat32:
      return run<float>(p, query, QuantKV<float>{q, {keys, values}}, out);
    case DType::kFloat16:
      return run<float16>(p, query, QuantKV<float16>{q, {keys, values}}, out);
    case DType::kBFloat16:
      return run<bfloat16>(p, query, QuantKV<bfloat16>{q, {keys, values}}, out);
    default:
      break;
  }
}

}  // namespace kvcache::cpu
