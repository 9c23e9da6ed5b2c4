// cuda::rms_norm: RMSNorm in float32, one block per row (decode normalises a single row of
// 576–4096 values, prefill a few thousand rows; either way a row fits one block's loop).
//
// The float32 steps are cpu::rms_norm's: sum of squares, mean = sum / hidden, + eps, 1 / sqrt,
// then weight · (x · inv), each rounded as IEEE float32 (__f*_rn, so nvcc cannot contract them).
// The one step whose order differs is the sum: the CPU adds the squares left to right, this kernel
// gives each thread a fixed strided share and combines the shares with a fixed shuffle tree, so
// the result is deterministic run to run but may differ from the CPU's in the last bits of the sum,
// which moves the output by a few float32 ulps (a tree sum is also the more accurate one).
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kThreads = 256;  // a multiple of 32, at most 1024 (32 warps for the reduction)

// Sum of `v` over the block, the same value returned to every thread. The order is fixed by
// blockDim: a butterfly within each warp, then warp 0 over the per-warp sums.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    float s = lane < warps ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// x [rows, hidden] float32 with row stride ld_x (last dim contiguous); weight [hidden] float32;
// y [rows, hidden] Out contiguous. kVec values per load: 4 when hidden % 4 == 0 and x's rows and
// the weight are 16-byte aligned, else 1.
template <class Out, int kVec>
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const float* __restrict__ x, std::int64_t ld_x,
                    const float* __restrict__ weight, Out* __restrict__ y, std::int64_t hidden,
                    float eps) {
  const std::int64_t row = blockIdx.x;
  const auto* xr = reinterpret_cast<const Pack<float, kVec>*>(x + row * ld_x);
  const auto* w = reinterpret_cast<const Pack<float, kVec>*>(weight);
  auto* yr = reinterpret_cast<Pack<Out, kVec>*>(y + row * hidden);
  const std::int64_t packs = hidden / kVec;

  float sum = 0.0f;
  for (std::int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<float, kVec> v = xr[p];
    for (int j = 0; j < kVec; ++j) sum = __fmaf_rn(v.v[j], v.v[j], sum);
  }
  sum = block_sum(sum);
  // transformers: variance = x.pow(2).mean(-1); x * torch.rsqrt(variance + eps); weight * x.
  const float mean = __fdiv_rn(sum, static_cast<float>(hidden));
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));

  for (std::int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<float, kVec> v = xr[p];  // second read: an L1/L2 hit
    const Pack<float, kVec> wv = w[p];
    Pack<Out, kVec> o;
    for (int j = 0; j < kVec; ++j) {
      o.v[j] = detail::from_f32<Out>(__fmul_rn(wv.v[j], __fmul_rn(v.v[j], inv)));
    }
    yr[p] = o;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, DType out_dtype) {
  KVCACHE_CHECK(x.defined() && x.device() == Device::kCuda && x.rank() == 2 &&
                    x.dtype() == DType::kFloat32 && (x.size(1) <= 1 || x.stride(1) == 1) &&
                    (x.size(0) <= 1 || x.stride(0) >= x.size(1)),
                "cuda::rms_norm: expected x as a [rows, hidden] float32 CUDA tensor with a "
                "contiguous last dimension, got ",
                x.describe());
  KVCACHE_CHECK(weight.defined() && weight.device() == Device::kCuda && weight.rank() == 1 &&
                    weight.size(0) == x.size(1) && weight.dtype() == DType::kFloat32 &&
                    weight.is_contiguous(),
                "cuda::rms_norm: expected weight [", x.size(1), "] float32 on CUDA, got ",
                weight.describe());
  KVCACHE_CHECK(is_floating(out_dtype), "cuda::rms_norm: expected a float output dtype, got ",
                dtype_name(out_dtype));
  const std::int64_t rows = x.size(0), hidden = x.size(1);
  const std::int64_t ld_x = rows > 1 ? x.stride(0) : hidden;
  Tensor y = empty({rows, hidden}, out_dtype);
  if (rows == 0 || hidden == 0) return y;
  KVCACHE_CHECK(rows <= 0x7fffffff, "cuda::rms_norm: expected at most 2^31 - 1 rows, got ", rows);
  const bool vec =
      hidden % 4 == 0 && ld_x % 4 == 0 && aligned16(x.data()) && aligned16(weight.data());
  detail::dispatch_float(out_dtype, "cuda::rms_norm", [&](auto tag) {
    using Out = decltype(tag);
    const float* xp = static_cast<const float*>(x.data());
    const float* wp = static_cast<const float*>(weight.data());
    Out* yp = static_cast<Out*>(y.data());
    const auto blocks = static_cast<unsigned>(rows);
    if (vec) {
      rms_norm_kernel<Out, 4>
          <<<blocks, kThreads, 0, detail::stream()>>>(xp, ld_x, wp, yp, hidden, eps);
    } else {
      rms_norm_kernel<Out, 1>
          <<<blocks, kThreads, 0, detail::stream()>>>(xp, ld_x, wp, yp, hidden, eps);
    }
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
  return y;
}

}  // namespace kvcache::cuda
