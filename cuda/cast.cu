// cuda::cast: a float tensor of any strides (rank 0..4) into a new contiguous tensor of another
// float dtype. Every element goes through float32 (exact for all three inputs) and is rounded once
// to the destination (round to nearest even), the same path cpu::cast takes, so results are
// bit-identical to the CPU's.
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

// The source's shape and strides padded on the left to rank 4 (size 1, stride 0).
struct Source4 {
  std::int64_t shape[4];
  std::int64_t strides[4];
};

// Contiguous source: element i of the destination is element i of the source.
template <class Dst, class Src>
__global__ void cast_contiguous_kernel(Dst* __restrict__ dst, const Src* __restrict__ src,
                                       std::int64_t total) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = detail::from_f32<Dst>(detail::to_f32(src[i]));
  }
}

// Strided source: the destination's linear index is split into a 4-d index (row-major), which
// the source's strides turn into an element offset.
template <class Dst, class Src>
__global__ void cast_strided_kernel(Dst* __restrict__ dst, const Src* __restrict__ src, Source4 s,
                                    std::int64_t total) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t rest = i, offset = 0;
    for (int d = 3; d >= 0; --d) {
      offset += (rest % s.shape[d]) * s.strides[d];
      rest /= s.shape[d];
    }
    dst[i] = detail::from_f32<Dst>(detail::to_f32(src[offset]));
  }
}

}  // namespace

Tensor cast(const Tensor& src, DType dtype) {
  KVCACHE_CHECK(src.defined() && src.device() == Device::kCuda && is_floating(src.dtype()),
                "cuda::cast: expected a float32, float16 or bfloat16 CUDA tensor, got ",
                src.describe());
  KVCACHE_CHECK(is_floating(dtype), "cuda::cast: expected a float destination dtype, got ",
                dtype_name(dtype));
  Tensor out = empty(src.shape(), dtype);
  const std::int64_t total = src.numel();
  if (total == 0) return out;
  Source4 s{};
  const int pad = kMaxRank - src.rank();
  for (int d = 0; d < kMaxRank; ++d) {
    s.shape[d] = 1;
    s.strides[d] = 0;
  }
  for (int d = 0; d < src.rank(); ++d) {
    s.shape[pad + d] = src.size(d);
    s.strides[pad + d] = src.stride(d);
  }
  const bool contiguous = src.is_contiguous();
  constexpr int kThreads = 256;
  const unsigned blocks = detail::grid_for(total, kThreads);
  detail::dispatch_float(src.dtype(), "cuda::cast", [&](auto src_tag) {
    using Src = decltype(src_tag);
    detail::dispatch_float(dtype, "cuda::cast", [&](auto dst_tag) {
      using Dst = decltype(dst_tag);
      Dst* d = static_cast<Dst*>(out.data());
      const Src* p = static_cast<const Src*>(src.data());
      if (contiguous) {
        cast_contiguous_kernel<Dst, Src><<<blocks, kThreads, 0, detail::stream()>>>(d, p, total);
      } else {
        cast_strided_kernel<Dst, Src><<<blocks, kThreads, 0, detail::stream()>>>(d, p, s, total);
      }
    });
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace kvcache::cuda
