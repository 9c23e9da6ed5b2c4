// Dense CPU layers for the models: linear (our GEMV for decode batches, Eigen's GEMM for prefill,
// threaded over output features), RMSNorm, the SiLU gate, residual adds and the embedding lookup.
// Activations are float32; weights may be float32, bfloat16 or float16, used in place: the GEMV
// widens 16-bit weights in registers, the GEMM a block of rows at a time into a per-thread buffer.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored \
    "-Wmaybe-uninitialized"  // g++ 12 false positives in Eigen's AVX-512 paths
#endif
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <omp.h>

#include "../../parallel_errors.hpp"
#include "internal.hpp"
#include "kvcache/backend/cpu.hpp"
#include "simd.hpp"

namespace kvcache::cpu {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;
using RowMap = Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>>;

void check_f32_matrix(const Tensor& t, const char* where, const char* what) {
  KVCACHE_CHECK(t.defined() && t.rank() == 2 && t.dtype() == DType::kFloat32 &&
                    t.device() == Device::kCpu && t.is_contiguous(),
                where, ": expected ", what, " as a contiguous [rows, n] float32 CPU tensor, got ",
                t.describe());
}

// Output features per work item: enough rows of W to amortise a GEMM's packing, few enough that
// both cores get work on the smallest projections.
constexpr std::int64_t kOutBlock = 64;

// Rows of x up to which the GEMV kernel serves one group of rows (decode of one to four
// sequences).
constexpr std::int64_t kGemvRows = 4;
// Rows of x up to which the tiled GEMV serves (a batch decoding together, a short prompt); above,
// Eigen's GEMM (over widened panels for 16-bit weights). Measured one thread on SmolLM2-135M's
// [1536, 576] and [576, 1536] matrices, GFLOP/s of linear() (benchmarks/README.md, "Dense weights:
// float16 in place and batched decode"): float32 weights, the GEMV 100-153 from 8 to 64 rows
// against the GEMM's 70-97 at 8-16 and 83-143 at 32-64, the GEMM even or ahead from 96; 16-bit
// weights, the GEMV 102-176 from 8 to 128 rows against 57-128 to 64 rows and 124-149 at 96-128.
constexpr std::int64_t kBatchedGemvRows = 64;
constexpr std::int64_t kBatchedGemvRows16 = 128;
// Bytes of weight rows per tile of the batched GEMV: read from memory once, then reused from L1
// (48 KiB here, shared with the four x rows of a group) by every group of four x rows.
// 12, 24, 64 and 128 KiB measured within noise of each other; 24 KiB keeps a tile and a group in L1
// for SmolLM2's 576-wide rows.
constexpr std::int64_t kTileBytes = 24 * 1024;

// y[r, o] = x[r] · w[o] (+ bias[o]) for R rows of x and outputs [o0, o1), `w` pointing at row o0:
// each weight row is read once for all R rows, four weight rows at a time so 4 × R accumulators
// stay in registers. 16-bit weights are widened in registers, so a decode step reads 2 bytes per
// weight, not 4.
template <class T, int R>
void gemv_range(const float* x, std::int64_t in, const T* w, std::int64_t o0, std::int64_t o1,
                const float* bias, float* y, std::int64_t out) {
  using namespace simd;
  const std::int64_t vec_end = in / kLanes * kLanes;
  auto tail = [&](const T* wrow, std::int64_t r) {
    float s = 0.0f;
    for (std::int64_t c = vec_end; c < in; ++c) s += to_float(wrow[c]) * x[r * in + c];
    return s;
  };
  std::int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const T* w0 = w + (o - o0) * in;
    Vec16 acc[4][R] = {};
    for (std::int64_t c = 0; c < vec_end; c += kLanes) {
      if (c % (64 / sizeof(T)) == 0) {
        // Rows two groups ahead, one cache line per line read here: keeps DRAM requests in flight
        // across the short streams (a row is a few dozen lines). bfloat16 decode went from 0.54
        // to 0.83 of the bandwidth floor with it (SmolLM2-135M shape, 2 cores).
        for (int i = 0; i < 4; ++i) __builtin_prefetch(w0 + (8 + i) * in + c, 0, 1);
      }
      Vec16 wv[4] = {load16(w0 + c), load16(w0 + in + c), load16(w0 + 2 * in + c),
                     load16(w0 + 3 * in + c)};
      if constexpr (R > 1) {
        for (Vec16& v : wv) in_register(v);
      }
      for (int r = 0; r < R; ++r) {
        Vec16 xv = load16(x + r * in + c);
        in_register(xv);
        for (int i = 0; i < 4; ++i) acc[i][r] += wv[i] * xv;
      }
    }
    for (int r = 0; r < R; ++r) {
      float four[4];
      sum16x4(acc[0][r], acc[1][r], acc[2][r], acc[3][r], four);
      for (int i = 0; i < 4; ++i) {
        y[r * out + o + i] = four[i] + tail(w0 + i * in, r) + (bias ? bias[o + i] : 0.0f);
      }
    }
  }
  for (; o < o1; ++o) {
    const T* wrow = w + (o - o0) * in;
    for (int r = 0; r < R; ++r) {
      Vec16 acc = {};
      for (std::int64_t c = 0; c < vec_end; c += kLanes)
        acc += load16(wrow + c) * load16(x + r * in + c);
      y[r * out + o] = sum16(acc) + tail(wrow, r) + (bias ? bias[o] : 0.0f);
    }
  }
}

// One group of 1..4 x rows against weight rows [o0, o1) (`w` at row o0), one kernel instance per
// count.
template <class T>
void gemv_group(const float* x, std::int64_t rows, std::int64_t in, const T* w, std::int64_t o0,
                std::int64_t o1, const float* bias, float* y, std::int64_t out) {
  switch (rows) {
    case 1:
      return gemv_range<T, 1>(x, in, w, o0, o1, bias, y, out);
    case 2:
      return gemv_range<T, 2>(x, in, w, o0, o1, bias, y, out);
    case 3:
      return gemv_range<T, 3>(x, in, w, o0, o1, bias, y, out);
    default:
      return gemv_range<T, 4>(x, in, w, o0, o1, bias, y, out);
  }
}

// This thread's contiguous share of the output rows, in multiples of 4: each thread streams its
// share of the weight.
std::pair<std::int64_t, std::int64_t> thread_rows(std::int64_t out) {
  const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  const std::int64_t quads = (out + 3) / 4;
  return {std::min(out, quads * t / threads * 4), std::min(out, quads * (t + 1) / threads * 4)};
}

// Up to kGemvRows rows of x: one pass over the weight.
template <class T>
void gemv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y) {
  const std::int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  const float* xp = x.data_as<float>();
  const T* w = weight.data_as<T>();
  const float* b = bias.defined() ? bias.data_as<float>() : nullptr;
  float* yp = y.data_as<float>();
#pragma omp parallel
  {
    const auto [o0, o1] = thread_rows(out);
    if (o0 < o1) gemv_group(xp, rows, in, w + o0 * in, o0, o1, b, yp, out);
  }
}

// More rows (several sequences decoding together): the weight is still read from memory once per
// call, a tile of weight rows at a time, and every group of four x rows passes over the tile while
// it is in L1. 16-bit weights stay 16-bit in the tile and are widened in registers by each group
// (two uops a vector on the FMA ports, but half the L1 footprint of a float32 tile and no store
// and reload: one thread, [1536, 576], 8 to 64 rows, 125 GFLOP/s against 45 when each tile was
// widened once into a float32 buffer, both measured before in_register was added).
template <class T>
void gemv_batched(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y) {
  const std::int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  const float* xp = x.data_as<float>();
  const T* w = weight.data_as<T>();
  const float* b = bias.defined() ? bias.data_as<float>() : nullptr;
  float* yp = y.data_as<float>();
  // A multiple of 4 weight rows, about kTileBytes of them (at least 4).
  const std::int64_t tile_rows =
      std::max<std::int64_t>(4, kTileBytes / (in * static_cast<std::int64_t>(sizeof(T))) / 4 * 4);
#pragma omp parallel
  {
    const auto [o0, o1] = thread_rows(out);
    for (std::int64_t t0 = o0; t0 < o1; t0 += tile_rows) {
      const std::int64_t t1 = std::min(o1, t0 + tile_rows);
      for (std::int64_t r0 = 0; r0 < rows; r0 += kGemvRows) {
        gemv_group(xp + r0 * in, std::min(kGemvRows, rows - r0), in, w + t0 * in, t0, t1, b,
                   yp + r0 * out, out);
      }
    }
  }
}

// The GEMV for this weight's dtype: gemv (one group of rows) or gemv_batched.
void gemv_dispatch(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& y) {
  const bool one_group = x.size(0) <= kGemvRows;
  switch (weight.dtype()) {
    case DType::kFloat32:
      return one_group ? gemv<float>(x, weight, bias, y) : gemv_batched<float>(x, weight, bias, y);
    case DType::kBFloat16:
      return one_group ? gemv<bfloat16>(x, weight, bias, y)
                       : gemv_batched<bfloat16>(x, weight, bias, y);
    default:
      return one_group ? gemv<float16>(x, weight, bias, y)
                       : gemv_batched<float16>(x, weight, bias, y);
  }
}

}  // namespace

namespace detail {

void linear_panels(const float* x, std::int64_t rows, std::int64_t in, std::int64_t out,
                   std::int64_t block, const float* bias, float* y, const PanelRows& panel_rows) {
  const ConstRowMap X(x, rows, in, Eigen::OuterStride<>(in));
  const std::int64_t blocks = (out + block - 1) / block;
  // The scratch panel and Eigen's GEMM allocate: a std::bad_alloc must not leave the region
  // (std::terminate), so each panel runs through `errors` and this thread rethrows after it.
  ::kvcache::detail::ParallelErrors errors;
#pragma omp parallel
  {
    std::vector<float> scratch;
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < blocks; ++blk) {
      errors.run([&] {
        const std::int64_t o0 = blk * block, on = std::min(block, out - o0);
        const float* wf = panel_rows(o0, on, scratch);
        RowMap Y(y + o0, rows, on, Eigen::OuterStride<>(out));
        Y.noalias() = X * ConstRowMap(wf, on, in, Eigen::OuterStride<>(in)).transpose();
        if (bias) Y.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias + o0, on);
      });
    }
  }
  errors.rethrow_if_failed();
}

}  // namespace detail

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  const char* where = "cpu::linear";
  check_f32_matrix(x, where, "x");
  KVCACHE_CHECK(weight.defined() && weight.rank() == 2 && is_floating(weight.dtype()) &&
                    weight.device() == Device::kCpu && weight.is_contiguous(),
                where, ": expected a contiguous [out, in] float weight on the CPU, got ",
                weight.describe());
  KVCACHE_CHECK(weight.size(1) == x.size(1), where, ": expected x with ", weight.size(1),
                " features (the weight's in), got ", x.shape_string());
  if (bias.defined()) {
    KVCACHE_CHECK(
        bias.rank() == 1 && bias.size(0) == weight.size(0) && bias.dtype() == DType::kFloat32,
        where, ": expected bias [", weight.size(0), "] float32, got ", bias.describe());
  }
  Tensor y = Tensor::empty({x.size(0), weight.size(0)}, DType::kFloat32);
  if (x.size(0) == 0 || weight.size(0) == 0) return y;
  const std::int64_t gemv_rows =
      weight.dtype() == DType::kFloat32 ? kBatchedGemvRows : kBatchedGemvRows16;
  if (x.size(0) <= gemv_rows) {
    gemv_dispatch(x, weight, bias, y);
    return y;
  }
  // Many rows: Eigen's GEMM over panels of W; 16-bit rows are widened a panel at a time. Many
  // rows (prefill) get detail::kPanelShares panels of a multiple of 16 rows (few packings of x;
  // a count that does not follow the thread count, so neither do the bits); few rows panels of 64.
  const std::int64_t in = weight.size(1), out = weight.size(0);
  const std::int64_t share =
      ((out + detail::kPanelShares - 1) / detail::kPanelShares + 15) / 16 * 16;
  const std::int64_t panel = x.size(0) > 16 ? std::max<std::int64_t>(kOutBlock, share) : kOutBlock;
  detail::linear_panels(
      x.data_as<float>(), x.size(0), in, out, panel,
      bias.defined() ? bias.data_as<float>() : nullptr, y.data_as<float>(),
      [&](std::int64_t o0, std::int64_t n, std::vector<float>& scratch) -> const float* {
        if (weight.dtype() == DType::kFloat32) return weight.data_as<float>() + o0 * in;
        scratch.resize(static_cast<std::size_t>(n * in));
        if (weight.dtype() == DType::kBFloat16) {
          simd::widen(weight.data_as<bfloat16>() + o0 * in, n * in, scratch.data());
        } else {
          simd::widen(weight.data_as<float16>() + o0 * in, n * in, scratch.data());
        }
        return scratch.data();
      });
  return y;
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps) {
  check_f32_matrix(x, "cpu::rms_norm", "x");
  KVCACHE_CHECK(weight.defined() && weight.rank() == 1 && weight.size(0) == x.size(1) &&
                    weight.dtype() == DType::kFloat32,
                "cpu::rms_norm: expected weight [", x.size(1), "] float32, got ",
                weight.describe());
  const std::int64_t rows = x.size(0), n = x.size(1);
  Tensor y = Tensor::empty({rows, n}, DType::kFloat32);
  const float* w = weight.data_as<float>();
#pragma omp parallel for schedule(static) if (rows > 16)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* in = x.data_as<float>() + r * n;
    float* out = y.data_as<float>() + r * n;
    // transformers: variance = x.pow(2).mean(-1); x * torch.rsqrt(variance + eps); weight * x.
    float sum = 0.0f;
    for (std::int64_t i = 0; i < n; ++i) sum += in[i] * in[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
    for (std::int64_t i = 0; i < n; ++i) out[i] = w[i] * (in[i] * inv);
  }
  return y;
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  check_f32_matrix(gate, "cpu::silu_mul", "gate");
  check_f32_matrix(up, "cpu::silu_mul", "up");
  KVCACHE_CHECK(gate.size(0) == up.size(0) && gate.size(1) == up.size(1),
                "cpu::silu_mul: expected equal shapes, got ", gate.shape_string(), " and ",
                up.shape_string());
  Tensor y = Tensor::empty({gate.size(0), gate.size(1)}, DType::kFloat32);
  const float* g = gate.data_as<float>();
  const float* u = up.data_as<float>();
  float* o = y.data_as<float>();
  const std::int64_t n = gate.numel();
  // silu(g) = g / (1 + e^−g), as torch computes it in float32; e^x sixteen lanes at a time where
  // the build has AVX-512 (within about 1 ulp of expf; prefill spent an eighth of its time in
  // scalar expf).
  const std::int64_t chunks = (n + 1023) / 1024;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t end = std::min(n, (c + 1) * 1024);
    std::int64_t i = c * 1024;
#ifdef __AVX512F__
    for (; i + 16 <= end; i += 16) {
      const __m512 gv = _mm512_loadu_ps(g + i);
      const __m512 e = simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
      _mm512_storeu_ps(o + i,
                       _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                     _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < end; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
  return y;
}

void add_inplace(const Tensor& y, const Tensor& x) {
  KVCACHE_CHECK(y.dtype() == DType::kFloat32 && x.dtype() == DType::kFloat32 && y.is_contiguous() &&
                    x.is_contiguous() && y.numel() == x.numel(),
                "cpu::add_inplace: expected two contiguous float32 tensors of one size, got ",
                y.describe(), " and ", x.describe());
  float* a = y.data_as<float>();
  const float* b = x.data_as<float>();
  const std::int64_t n = y.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
  for (std::int64_t i = 0; i < n; ++i) a[i] += b[i];
}

Tensor embedding(const Tensor& table, const Tensor& ids) {
  KVCACHE_CHECK(
      table.defined() && table.rank() == 2 && is_floating(table.dtype()) && table.is_contiguous(),
      "cpu::embedding: expected a contiguous [vocab, hidden] table, got ", table.describe());
  KVCACHE_CHECK(ids.defined() && ids.dtype() == DType::kInt64 && ids.is_contiguous(),
                "cpu::embedding: expected contiguous int64 ids, got ", ids.describe());
  const std::int64_t vocab = table.size(0), hidden = table.size(1), n = ids.numel();
  const std::int64_t* id = ids.data_as<std::int64_t>();
  for (std::int64_t i = 0; i < n; ++i) {
    KVCACHE_CHECK(id[i] >= 0 && id[i] < vocab, "cpu::embedding: expected token ids in [0, ", vocab,
                  ") (the vocabulary), got ", id[i], " at position ", i);
  }
  Tensor out = Tensor::empty({n, hidden}, DType::kFloat32);
  for (std::int64_t i = 0; i < n; ++i) {
    copy(out.slice(0, i, i + 1), table.slice(0, id[i], id[i] + 1));
  }
  return out;
}

namespace {

// Sixteen floats rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), float_to_bf16's
// rule lane by lane.
inline void store16_bf16(bfloat16* p, simd::Vec16 v) {
  simd::U32x16 u;
  std::memcpy(&u, &v, sizeof(u));
  const simd::U32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const simd::U32x16 nan = (u >> 16) | 0x40u;
  const simd::U32x16 r = ((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded;
  const simd::U16x16 h = __builtin_convertvector(r, simd::U16x16);
  std::memcpy(static_cast<void*>(p), &h, sizeof(h));
}

template <class T>
void rotate_rows_as(const T* src, T* dst, std::int64_t rows, std::int64_t d,
                    std::int64_t src_stride, std::int64_t dst_stride, const float* cos,
                    const float* sin) {
  using simd::kLanes;
  const std::int64_t half = d / 2;
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* x = src + r * src_stride;
    T* y = dst + r * dst_stride;
    std::int64_t i = 0;
    if constexpr (!std::is_same_v<T, float16>) {
      for (; i + kLanes <= half; i += kLanes) {
        const simd::Vec16 x1 = simd::load16(x + i), x2 = simd::load16(x + i + half);
        const simd::Vec16 c = simd::load16(cos + i), s = simd::load16(sin + i);
        const simd::Vec16 y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        if constexpr (std::is_same_v<T, float>) {
          simd::store16(y + i, y1);
          simd::store16(y + i + half, y2);
        } else {
          store16_bf16(y + i, y1);
          store16_bf16(y + i + half, y2);
        }
      }
    }
    for (; i < half; ++i) {
      const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
      y[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      y[i + half] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

}  // namespace

void rotate_rows(const void* src, void* dst, DType dtype, std::int64_t rows, std::int64_t head_dim,
                 std::int64_t src_stride, std::int64_t dst_stride, const float* cos,
                 const float* sin) {
  switch (dtype) {
    case DType::kFloat32:
      return rotate_rows_as(static_cast<const float*>(src), static_cast<float*>(dst), rows,
                            head_dim, src_stride, dst_stride, cos, sin);
    case DType::kBFloat16:
      return rotate_rows_as(static_cast<const bfloat16*>(src), static_cast<bfloat16*>(dst), rows,
                            head_dim, src_stride, dst_stride, cos, sin);
    case DType::kFloat16:
      return rotate_rows_as(static_cast<const float16*>(src), static_cast<float16*>(dst), rows,
                            head_dim, src_stride, dst_stride, cos, sin);
    default:
      KVCACHE_FAIL("cpu::rotate_rows: expected float32, float16 or bfloat16, got ",
                   dtype_name(dtype));
  }
}

}  // namespace kvcache::cpu
