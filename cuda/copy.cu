// The strided copy kernel the caches use to append new tokens and rearrange batch rows, and that
// makes strided device tensors contiguous. It moves whole elements of 1, 2, 4 or 8 bytes (dtype
// conversion is cast.cu's job), one thread per element of the destination.
#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

struct Strided4 {
  std::int64_t shape[4];
  std::int64_t dst_strides[4];
  std::int64_t src_strides[4];
};

template <class Word>
__global__ void strided_copy_kernel(Word* __restrict__ dst, const Word* __restrict__ src,
                                    Strided4 s, std::int64_t total) {
  for (std::int64_t linear = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       linear < total; linear += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t rest = linear, dst_off = 0, src_off = 0;
    for (int d = 3; d >= 0; --d) {
      const std::int64_t i = rest % s.shape[d];
      rest /= s.shape[d];
      dst_off += i * s.dst_strides[d];
      src_off += i * s.src_strides[d];
    }
    dst[dst_off] = src[src_off];
  }
}

// Two copies of one shape in one grid: linear indices [0, total) copy a, [total, 2·total) b.
template <class Word>
__global__ void strided_copy2_kernel(Word* __restrict__ dst_a, const Word* __restrict__ src_a,
                                     Strided4 a, Word* __restrict__ dst_b,
                                     const Word* __restrict__ src_b, Strided4 b,
                                     std::int64_t total) {
  for (std::int64_t linear = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       linear < 2 * total; linear += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const bool second = linear >= total;
    const Strided4& s = second ? b : a;
    std::int64_t rest = second ? linear - total : linear, dst_off = 0, src_off = 0;
    for (int d = 3; d >= 0; --d) {
      const std::int64_t i = rest % s.shape[d];
      rest /= s.shape[d];
      dst_off += i * s.dst_strides[d];
      src_off += i * s.src_strides[d];
    }
    (second ? dst_b : dst_a)[dst_off] = (second ? src_b : src_a)[src_off];
  }
}

template <class Word>
void launch_copy(const Tensor& dst, const Tensor& src, const Strided4& s, std::int64_t total) {
  constexpr int kThreads = 256;
  strided_copy_kernel<Word><<<detail::grid_for(total, kThreads), kThreads, 0, detail::stream()>>>(
      static_cast<Word*>(dst.data()), static_cast<const Word*>(src.data()), s, total);
  KVCACHE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

namespace {

// Checks one same-shape, same-dtype pair of CUDA tensors and returns its shape and strides padded
// to rank 4.
Strided4 plan_copy(const Tensor& dst, const Tensor& src) {
  KVCACHE_CHECK(dst.defined() && src.defined() && dst.device() == Device::kCuda &&
                    src.device() == Device::kCuda,
                "cuda::copy: expected two CUDA tensors, got ", dst.describe(), " and ",
                src.describe());
  KVCACHE_CHECK(dst.dtype() == src.dtype(), "cuda::copy: expected one dtype, got ",
                dtype_name(dst.dtype()), " and ", dtype_name(src.dtype()));
  KVCACHE_CHECK(dst.rank() == src.rank(), "cuda::copy: expected equal shapes, got ",
                dst.shape_string(), " and ", src.shape_string());
  Strided4 s{};
  const int pad = kMaxRank - dst.rank();
  for (int d = 0; d < kMaxRank; ++d) {
    s.shape[d] = 1;
    s.dst_strides[d] = s.src_strides[d] = 0;
  }
  for (int d = 0; d < dst.rank(); ++d) {
    KVCACHE_CHECK(dst.size(d) == src.size(d), "cuda::copy: expected equal shapes, got ",
                  dst.shape_string(), " and ", src.shape_string());
    s.shape[pad + d] = dst.size(d);
    s.dst_strides[pad + d] = dst.stride(d);
    s.src_strides[pad + d] = src.stride(d);
  }
  return s;
}

}  // namespace

void copy(const Tensor& dst, const Tensor& src) {
  const Strided4 s = plan_copy(dst, src);
  const std::int64_t total = dst.numel();
  if (total == 0) return;
  if (dst.is_contiguous() && src.is_contiguous()) {
    KVCACHE_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), dst.nbytes(),
                                       cudaMemcpyDeviceToDevice, detail::stream()));
    return;
  }
  switch (dst.element_size()) {
    case 1:
      return launch_copy<std::uint8_t>(dst, src, s, total);
    case 2:
      return launch_copy<std::uint16_t>(dst, src, s, total);
    case 4:
      return launch_copy<std::uint32_t>(dst, src, s, total);
    case 8:
      return launch_copy<std::uint64_t>(dst, src, s, total);
    default:
      KVCACHE_FAIL("cuda::copy: unsupported element size ", dst.element_size());
  }
}

void copy2(const Tensor& dst_a, const Tensor& src_a, const Tensor& dst_b, const Tensor& src_b) {
  const Strided4 a = plan_copy(dst_a, src_a), b = plan_copy(dst_b, src_b);
  KVCACHE_CHECK(dst_a.dtype() == dst_b.dtype() && dst_a.rank() == dst_b.rank(),
                "cuda::copy2: expected two pairs of one dtype and rank, got ", dst_a.describe(),
                " and ", dst_b.describe());
  for (int d = 0; d < dst_a.rank(); ++d) {
    KVCACHE_CHECK(dst_a.size(d) == dst_b.size(d),
                  "cuda::copy2: expected two pairs of one shape, got ", dst_a.shape_string(),
                  " and ", dst_b.shape_string());
  }
  const std::int64_t total = dst_a.numel();
  if (total == 0) return;
  constexpr int kThreads = 256;
  const unsigned grid = detail::grid_for(2 * total, kThreads);
  auto launch = [&](auto word) {
    using Word = decltype(word);
    strided_copy2_kernel<Word><<<grid, kThreads, 0, detail::stream()>>>(
        static_cast<Word*>(dst_a.data()), static_cast<const Word*>(src_a.data()), a,
        static_cast<Word*>(dst_b.data()), static_cast<const Word*>(src_b.data()), b, total);
    KVCACHE_CUDA_CHECK(cudaGetLastError());
  };
  switch (dst_a.element_size()) {
    case 2:
      return launch(std::uint16_t{});
    case 4:
      return launch(std::uint32_t{});
    default:
      copy(dst_a, src_a);
      copy(dst_b, src_b);
  }
}

}  // namespace kvcache::cuda
