// Picking the next token on the GPU: argmax (greedy decoding) and sample (temperature, top-k,
// top-p and a draw driven by the caller's uniform), so only [rows] int64 ids travel to the host.
//
// argmax: one block per row, launched overlapped (programmatic dependent launch) after the LM
// head; each thread scans a strided share of the row (four logits per load
// where the row is 16-byte aligned), keeping the best (value, index) with ties to the lower index;
// a shuffle tree then a pass over the warps' winners give the row's first maximum, as
// std::max_element and torch.argmax give it. NaN logits are skipped (never chosen).
//
// sample: kvcache::choose_token's order of operations, with the draw made from `uniforms`:
//   1. keys: every logit becomes a 64-bit key (row << 32 | ~orderable(logit)), the value its index;
//      one device-wide stable radix sort (CUB) of all rows at once then leaves each row's entries
//      contiguous, best logit first, equal logits in index order — the CPU's stable_sort order.
//   2. one block per row walks the sorted row's first keep = min(top_k, vocab) entries, computes
//      p_j = exp(logit_j / T − logit_0 / T) (float32 division and exp, as the CPU divides in
//      float32; sums in double, as the CPU sums) and stores the running sums P_j in scratch.
//   3. thread 0 finds the top-p cut (the first c with P_c / P_keep−1 ≥ top_p, so entries 0..c are
//      kept; skipped for top_p = 1) and the draw (the first j ≤ c with P_j > u · P_c), both by
//      binary search over the non-decreasing P, and writes the index of entry j.
// The scratch (keys in and out, values in and out, sums: 32 bytes per logit, plus CUB's temporary
// storage) comes from the stream-ordered pool and goes back to it when the call returns. This is
// the simple, exact version: a full sort per step, even for top_k = 50 (a radix select would skip
// most of it).
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <climits>
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"
#include "mma.cuh"

namespace kvcache::cuda {
namespace {

// A [rows, vocab] float32 CUDA view with a contiguous last dimension and rows that do not overlap.
void check_logits(const Tensor& logits, const char* where) {
  KVCACHE_CHECK(logits.defined() && logits.device() == Device::kCuda && logits.rank() == 2 &&
                    logits.dtype() == DType::kFloat32 &&
                    (logits.size(1) <= 1 || logits.stride(1) == 1) &&
                    (logits.size(0) <= 1 || logits.stride(0) >= logits.size(1)),
                where,
                ": expected logits [rows, vocab] float32 on CUDA with a contiguous last "
                "dimension, got ",
                logits.describe());
  KVCACHE_CHECK(logits.size(1) > 0 && logits.size(1) <= (std::int64_t{1} << 30), where,
                ": expected a vocabulary of 1 to 2^30 logits, got ", logits.describe());
}

std::int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// --- argmax
// ---------------------------------------------------------------------------------------
constexpr int kArgmaxThreads = 512;

// (v, i) beats (best_v, best_i): a larger value, or the same value at a lower index. NaN never
// beats anything (and best_v is never NaN), so the order is total over what is kept.
__device__ __forceinline__ bool beats(float v, int i, float best_v, int best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

// logits [rows, vocab] float32, row stride ld; out [rows] int64. kVec = 4 requires the row
// starts to be 16-byte aligned (base aligned, ld % 4 == 0); the last vocab % 4 logits are read
// one by one.
template <int kVec>
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(const float* __restrict__ logits, std::int64_t ld, int vocab,
                  std::int64_t* __restrict__ out) {
  detail::grid_dependency_wait();  // launched overlapped: the logits are the last kernel's output
  detail::allow_dependent_launch();
  const float* row = logits + static_cast<std::int64_t>(blockIdx.x) * ld;
  float best_v = -INFINITY;
  int best_i = INT_MAX;
  const int packs = kVec == 4 ? vocab / 4 : 0;  // the scalar kernel reads every logit below
  if constexpr (kVec == 4) {
    const auto* row4 = reinterpret_cast<const float4*>(row);
#pragma unroll 4
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      const float4 v = row4[p];
      const int i = p * 4;
      if (beats(v.x, i, best_v, best_i)) best_v = v.x, best_i = i;
      if (beats(v.y, i + 1, best_v, best_i)) best_v = v.y, best_i = i + 1;
      if (beats(v.z, i + 2, best_v, best_i)) best_v = v.z, best_i = i + 2;
      if (beats(v.w, i + 3, best_v, best_i)) best_v = v.w, best_i = i + 3;
    }
  }
  for (int i = packs * kVec + threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = row[i];
    if (beats(v, i, best_v, best_i)) best_v = v, best_i = i;
  }
  // Warp butterfly: with a total order every lane ends with the warp's best.
  for (int offset = 16; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(0xffffffffu, best_v, offset);
    const int i = __shfl_xor_sync(0xffffffffu, best_i, offset);
    if (beats(v, i, best_v, best_i)) best_v = v, best_i = i;
  }
  __shared__ float warp_v[32];
  __shared__ int warp_i[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_v[warp] = best_v;
    warp_i[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    best_v = lane < warps ? warp_v[lane] : -INFINITY;
    best_i = lane < warps ? warp_i[lane] : INT_MAX;
    for (int offset = 16; offset > 0; offset /= 2) {
      const float v = __shfl_xor_sync(0xffffffffu, best_v, offset);
      const int i = __shfl_xor_sync(0xffffffffu, best_i, offset);
      if (beats(v, i, best_v, best_i)) best_v = v, best_i = i;
    }
    // A row of NaN only keeps no index: report 0.
    if (lane == 0) out[blockIdx.x] = best_i == INT_MAX ? 0 : best_i;
  }
}

// --- sample
// -----------------------------------------------------------------------------------------
constexpr int kKeyThreads = 256;
constexpr int kSelectThreads = 256;
constexpr int kSelectItems = 8;  // consecutive sorted entries per thread per chunk

// float bits → unsigned bits in the same order (negative values flipped, positive ones offset).
__device__ __forceinline__ std::uint32_t orderable(float v) {
  if (v == 0.0f) v = 0.0f;  // −0 and +0 compare equal on the CPU: one key for both
  const std::uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float logit_of(std::uint64_t key) {
  const std::uint32_t o = ~static_cast<std::uint32_t>(key);
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// keys/values [rows, vocab] contiguous: key = row << 32 | ~orderable(logit) (ascending keys =
// rows in order, each row's logits descending), value = the logit's index in its row.
__global__ void __launch_bounds__(kKeyThreads)
    make_keys_kernel(const float* __restrict__ logits, std::int64_t ld, std::int64_t rows,
                     std::int64_t vocab, std::uint64_t* __restrict__ keys,
                     std::int32_t* __restrict__ values) {
  for (std::int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
         i < vocab; i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      const std::uint32_t low = ~orderable(logits[r * ld + i]);
      keys[r * vocab + i] = (static_cast<std::uint64_t>(r) << 32) | low;
      values[r * vocab + i] = static_cast<std::int32_t>(i);
    }
  }
}

// First index in [0, n) where pred(p[index]) holds, for a predicate false then true along p;
// n - 1 if it never holds (n >= 1).
template <class Pred>
__device__ std::int64_t first_where(const double* p, std::int64_t n, Pred pred) {
  std::int64_t lo = 0, hi = n;
  while (lo < hi) {
    const std::int64_t mid = lo + (hi - lo) / 2;
    if (pred(p[mid])) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo < n ? lo : n - 1;
}

// One block per row. keys/values: the sorted [rows, vocab] entries; sums: [rows, vocab] double
// scratch for the running sums P_j of the row's first `keep` entries; uniforms [rows]; out [rows].
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const std::uint64_t* __restrict__ keys, const std::int32_t* __restrict__ values,
                  double* __restrict__ sums, const float* __restrict__ uniforms,
                  std::int64_t* __restrict__ out, std::int64_t vocab, std::int64_t keep,
                  float temperature, float top_p) {
  using BlockScan = cub::BlockScan<double, kSelectThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const std::int64_t r = blockIdx.x;
  const std::uint64_t* key = keys + r * vocab;
  double* sum = sums + r * vocab;
  // The CPU: probs = exp(logit / T − top) with top = logit_0 / T, logit / T in float32.
  const float top = __fdiv_rn(logit_of(key[0]), temperature);
  double carry = 0.0;  // P of the entries before this chunk (the same in every thread)
  constexpr std::int64_t kChunk = static_cast<std::int64_t>(kSelectThreads) * kSelectItems;
  for (std::int64_t chunk = 0; chunk < keep; chunk += kChunk) {
    const std::int64_t first = chunk + static_cast<std::int64_t>(threadIdx.x) * kSelectItems;
    double p[kSelectItems];
    for (int q = 0; q < kSelectItems; ++q) {
      const std::int64_t j = first + q;
      if (j < keep) {
        const float scaled = __fdiv_rn(logit_of(key[j]), temperature);
        // Equal to the top (also when both are infinite) is probability 1, not exp(inf − inf).
        p[q] = scaled == top ? 1.0 : static_cast<double>(expf(__fsub_rn(scaled, top)));
      } else {
        p[q] = 0.0;
      }
    }
    double chunk_total = 0.0;
    BlockScan(scan_storage).InclusiveSum(p, p, chunk_total);
    for (int q = 0; q < kSelectItems; ++q) {
      if (first + q < keep) sum[first + q] = carry + p[q];
    }
    carry += chunk_total;
    __syncthreads();  // scan_storage is reused by the next chunk; the sums are visible after it
  }
  if (threadIdx.x != 0) return;
  std::int64_t kept = keep;
  if (top_p < 1.0f) {
    // The smallest prefix whose probability reaches top_p (at least one entry).
    const double total = sum[keep - 1];
    const double p_target = top_p;
    kept = first_where(sum, keep, [&](double s) { return s / total >= p_target; }) + 1;
  }
  float u = uniforms[r];
  if (!(u >= 0.0f)) u = 0.0f;                         // NaN or negative
  if (!(u < 1.0f)) u = __uint_as_float(0x3f7fffffu);  // the largest float below 1
  const double target = static_cast<double>(u) * sum[kept - 1];
  const std::int64_t j = first_where(sum, kept, [&](double s) { return s > target; });
  out[r] = values[r * vocab + j];
}

}  // namespace

Tensor argmax(const Tensor& logits) {
  check_logits(logits, "cuda::argmax");
  const std::int64_t rows = logits.size(0), vocab = logits.size(1), ld = row_stride(logits);
  Tensor out = empty({rows}, DType::kInt64);
  if (rows == 0) return out;
  KVCACHE_CHECK(rows <= INT_MAX, "cuda::argmax: expected at most 2^31 - 1 rows, got ", rows);
  const float* p = static_cast<const float*>(logits.data());
  auto* o = static_cast<std::int64_t*>(out.data());
  const bool vec = reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && ld % 4 == 0;
  const auto blocks = static_cast<unsigned>(rows);
  KVCACHE_CUDA_CHECK(detail::launch_overlapped(
      vec ? argmax_kernel<4> : argmax_kernel<1>, dim3(blocks), dim3(kArgmaxThreads), 0,
      detail::stream(), p, ld, static_cast<int>(vocab), o));
  return out;
}

Tensor sample(const Tensor& logits, float temperature, std::int64_t top_k, float top_p,
              const Tensor& uniforms) {
  const char* where = "cuda::sample";
  check_logits(logits, where);
  KVCACHE_CHECK(temperature > 0.0f, where, ": expected temperature > 0, got ", temperature);
  KVCACHE_CHECK(top_p > 0.0f && top_p <= 1.0f, where, ": expected top_p in (0, 1], got ", top_p);
  const std::int64_t rows = logits.size(0), vocab = logits.size(1), ld = row_stride(logits);
  KVCACHE_CHECK(uniforms.defined() && uniforms.device() == Device::kCuda &&
                    uniforms.dtype() == DType::kFloat32 && uniforms.rank() == 1 &&
                    uniforms.size(0) == rows && uniforms.is_contiguous(),
                where, ": expected uniforms [", rows, "] float32 contiguous on CUDA, got ",
                uniforms.describe());
  Tensor out = empty({rows}, DType::kInt64);
  if (rows == 0) return out;
  const std::int64_t total = rows * vocab;
  KVCACHE_CHECK(total <= INT_MAX, where, ": expected rows · vocab < 2^31, got ", logits.describe());
  const std::int64_t keep = top_k > 0 && top_k < vocab ? top_k : vocab;  // top_k <= 0: all

  // Scratch, [rows, vocab] each: keys in/out (uint64), values in/out (int32), running sums
  // (double). The pool has no uint64 or float64 dtype; int64 tensors serve as 8-byte storage.
  Tensor keys_in = empty({rows, vocab}, DType::kInt64);
  Tensor keys_out = empty({rows, vocab}, DType::kInt64);
  Tensor values_in = empty({rows, vocab}, DType::kInt32);
  Tensor values_out = empty({rows, vocab}, DType::kInt32);
  Tensor sums = empty({rows, vocab}, DType::kInt64);
  auto* k_in = static_cast<std::uint64_t*>(keys_in.data());
  auto* k_out = static_cast<std::uint64_t*>(keys_out.data());
  auto* v_in = static_cast<std::int32_t*>(values_in.data());
  auto* v_out = static_cast<std::int32_t*>(values_out.data());

  // Only the row bits that can be nonzero (and the 32 logit bits) need sorting.
  int row_bits = 0;
  while ((std::int64_t{1} << row_bits) < rows) ++row_bits;
  const int end_bit = 32 + row_bits;
  std::size_t temp_bytes = 0;
  KVCACHE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, k_in, k_out, v_in, v_out,
                                                     static_cast<int>(total), 0, end_bit,
                                                     detail::stream()));
  Tensor temp = empty({static_cast<std::int64_t>(temp_bytes)}, DType::kUInt8);

  const dim3 key_grid(static_cast<unsigned>(detail::grid_for(vocab, kKeyThreads, 1024)),
                      static_cast<unsigned>(rows < 65535 ? rows : 65535));
  make_keys_kernel<<<key_grid, kKeyThreads, 0, detail::stream()>>>(
      static_cast<const float*>(logits.data()), ld, rows, vocab, k_in, v_in);
  KVCACHE_CUDA_CHECK(cudaGetLastError());
  KVCACHE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data(), temp_bytes, k_in, k_out, v_in,
                                                     v_out, static_cast<int>(total), 0, end_bit,
                                                     detail::stream()));
  select_kernel<<<static_cast<unsigned>(rows), kSelectThreads, 0, detail::stream()>>>(
      k_out, v_out, static_cast<double*>(sums.data()), static_cast<const float*>(uniforms.data()),
      static_cast<std::int64_t*>(out.data()), vocab, keep, temperature, top_p);
  KVCACHE_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace kvcache::cuda
